#!/usr/bin/env python3
"""Parse a Prometheus text exposition (stdin) with the Prometheus project's own Python
parser (prometheus_client.parser) and print its samples as JSON, one list:
[{"name": ..., "labels": {...}, "value": ...}, ...]. Exits non-zero on text the parser
refuses. Used by tests/api/metrics.rs.

Usage: curl -s http://127.0.0.1:8080/metrics | scripts/parse-metrics.py
"""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append(
            {
                "family": family.name,
                "type": family.type,
                "name": sample.name,
                "labels": sample.labels,
                "value": sample.value,
            }
        )
json.dump(samples, sys.stdout)
