#!/usr/bin/env python3
"""Generate a Python client from openapi/openapi.json with openapi-python-client and
prove it types the whole API: the generator warns about nothing, every operation gets
a function, every documented status is parsed into a typed value (problem answers into
`Problem` with its `code` enum), and the client drives a real server: it creates a
VM, reads it back as a typed model, follows the job, and gets a typed problem for a
bad request.

Usage: scripts/check-generated-client.py [path/to/strata]
(the binary defaults to target/debug/strata; run `cargo build` first).
Needs `openapi-python-client` (pip); `.ci/run` installs it.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "openapi" / "openapi.json"
PACKAGE = "strata_client"


def fail(message):
    print(f"check-generated-client: {message}", file=sys.stderr)
    sys.exit(1)


def generate(work):
    config = work / "config.json"
    config.write_text(json.dumps({"package_name_override": PACKAGE, "post_hooks": []}))
    result = subprocess.run(
        [
            sys.executable, "-m", "openapi_python_client", "generate",
            "--path", str(DOCUMENT),
            "--output-path", str(work / PACKAGE),
            "--meta", "none",
            "--config", str(config),
        ],
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        fail(f"the generator failed:\n{output}")
    # The generator skips what it cannot type and says so with a warning.
    if re.search(r"warning|error|unable|skipp", output, re.IGNORECASE):
        fail(f"the generator reported problems:\n{output}")
    return work / PACKAGE


def check_operations(package, document):
    """Every operation has a function that parses each documented status."""
    count = 0
    for path, item in document["paths"].items():
        for method, operation in item.items():
            count += 1
            tag = operation["tags"][0]
            module = package / "api" / tag / f"{operation['operationId']}.py"
            if not module.exists():
                fail(f"{method.upper()} {path}: no generated function ({module.name})")
            source = module.read_text()
            for status in operation["responses"]:
                if f"response.status_code == {status}" not in source:
                    fail(f"{method.upper()} {path}: status {status} is not parsed into a type")
    return count


def start_server(binary, data_dir):
    process = subprocess.Popen(
        [str(binary), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--workers", "1", "--shutdown-grace-secs", "1"],
        stdout=subprocess.PIPE,
        env={**os.environ, "STRATA_LOG": "warn"},
        text=True,
    )
    line = process.stdout.readline().strip()
    prefix = "strata listening on "
    if not line.startswith(prefix):
        process.kill()
        fail(f"unexpected first line from the server: {line!r}")
    return process, line[len(prefix):]


def drive(base_url):
    """Use the generated client as a user would; every answer must come back typed."""
    client_module = importlib.import_module(PACKAGE)
    models = importlib.import_module(f"{PACKAGE}.models")
    create_vm = importlib.import_module(f"{PACKAGE}.api.vms.create_vm")
    get_vm = importlib.import_module(f"{PACKAGE}.api.vms.get_vm")
    get_job = importlib.import_module(f"{PACKAGE}.api.jobs.get_job")

    client = client_module.Client(base_url=base_url, raise_on_unexpected_status=True)
    deadline = time.monotonic() + 30
    readyz = importlib.import_module(f"{PACKAGE}.api.system.readyz")
    while not isinstance(readyz.sync(client=client), models.Health):
        if time.monotonic() > deadline:
            fail("the server did not become ready")
        time.sleep(0.2)

    body = models.CreateVm.from_dict(
        {"name": "generated-client", "disks": [{"name": "root", "size_bytes": 64 << 20}]}
    )
    job = create_vm.sync(client=client, body=body)
    if not isinstance(job, models.JobView):
        fail(f"create_vm answered {job!r}, not a JobView")
    while job.status.value in ("queued", "running"):
        job = get_job.sync(client=client, id=job.id, wait=5)
        if not isinstance(job, models.JobView):
            fail(f"get_job answered {job!r}, not a JobView")
    if job.status.value != "succeeded":
        fail(f"the create job ended {job.status.value}")

    vm = get_vm.sync(client=client, id=job.target.id)
    if not isinstance(vm, models.VmView) or vm.name != "generated-client":
        fail(f"get_vm answered {vm!r}")
    if len(vm.disks) != 1 or vm.disks[0].size_bytes != 64 << 20:
        fail(f"the VM's disks are not typed as sent: {vm.disks!r}")

    refused = create_vm.sync(client=client, body=models.CreateVm.from_dict({"name": " bad "}))
    if not isinstance(refused, models.Problem):
        fail(f"a bad name answered {refused!r}, not a Problem")
    if refused.code != models.ProblemCode.VALIDATION_FAILED:
        fail(f"a bad name answered code {refused.code!r}")


def main():
    binary = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "debug" / "strata"
    if not binary.exists():
        fail(f"{binary} does not exist: run `cargo build` first")
    document = json.loads(DOCUMENT.read_text())
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        package = generate(work)
        operations = check_operations(package, document)
        sys.path.insert(0, str(work))
        process, base_url = start_server(binary, work / "data")
        try:
            drive(base_url)
        finally:
            process.kill()
            process.wait()
    print(f"check-generated-client: {operations} operations typed; the client drove a live server")


if __name__ == "__main__":
    main()
