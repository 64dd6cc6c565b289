#!/usr/bin/env python3
"""Check openapi/openapi.json the way a client generator reads it.

1. It is a valid OpenAPI 3.1 document (openapi-spec-validator).
2. Every example in it (schemas, parameters, bodies) validates against its own schema
   (jsonschema, draft 2020-12, with the document's components for $ref).

Usage: scripts/check-openapi.py [openapi/openapi.json]
Needs: pip install openapi-spec-validator jsonschema (see .ci/run).
"""
import json
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate


def examples(doc):
    """(where, schema, example) for every example the document gives."""
    for name, schema in doc.get("components", {}).get("schemas", {}).items():
        if "example" in schema:
            yield f"components.schemas.{name}", schema, schema["example"]
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            for p in op.get("parameters", []):
                if "example" in p and "schema" in p:
                    yield f"{method.upper()} {path} ?{p['name']}", p["schema"], p["example"]
            media = op.get("requestBody", {}).get("content", {})
            for content_type, body in media.items():
                if "example" in body and "schema" in body:
                    yield f"{method.upper()} {path} body", body["schema"], body["example"]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "openapi/openapi.json"
    with open(path) as f:
        doc = json.load(f)
    validate(doc)
    failures = []
    count = 0
    for where, schema, example in examples(doc):
        count += 1
        rooted = dict(schema)
        rooted["components"] = doc.get("components", {})
        validator = Draft202012Validator(rooted)
        for error in validator.iter_errors(example):
            failures.append(f"{where}: {error.json_path}: {error.message}")
    if failures:
        print("\n".join(failures))
        print(f"{len(failures)} problem(s) in {count} examples")
        sys.exit(1)
    print(f"{path}: valid OpenAPI 3.1; {count} examples validate against their schemas")


if __name__ == "__main__":
    main()
