#!/usr/bin/env python3
"""Make the upgrade fixture: a data directory written by today's strata, with jobs of
every kind queued, interrupted mid-job and finished, and what today's strata does with
it.

    scripts/make-upgrade-fixture.py                 # a new fixture, packed and recorded
    scripts/make-upgrade-fixture.py --record-only   # re-record the committed tarball

Writes tests/fixtures/upgrade-v1/{data.tar.gz, jobs.txt, expected.json}; see the
README.md there for what they hold. Runs `cargo build` and uses target/debug/strata,
qemu-img, qemu-io, tar and gzip, and only the Python standard library. A new fixture
has new ids throughout (and the README's figures change with it).

How the states are made. strata is driven over HTTP only, in two runs over one data
directory:

1. History and set-up (`--workers 4`): every VM, snapshot, clone and template the
   last run needs, plus finished jobs: succeeded, failed (an injected qemu-img failure,
   a grow refused at run time) and cancelled (queued, and running).
2. The freeze (`--workers N`, N = the number of interrupted jobs, and
   `STRATA_FAULT=disk_delete:planned:pause=3600000`). Each interrupted job is started
   alone and held mid-job: `disk_delete`, whose plan never has a file step, by the
   fault point; every other kind by the qemu-img stand-in
   scripts/upgrade-fixture-qemu-img.sh, which lets the job's first steps run and holds
   the next qemu-img call (before running it, or after it ran when the step is the
   plan's last). `vm_delete` and `snapshot_delete` are held in shapes that have steps
   (flattening their linked clones, merging). Once the N jobs hold all N workers,
   every job accepted after them stays queued. Then strata is killed with SIGKILL:
   the journal is frozen as a crash leaves it. The next start (today's or a newer
   strata) resumes the interrupted jobs, then runs the queued ones.

Recovery at start resumes every interrupted job before any worker runs, so
interrupted jobs can only be made in the last run, and only one kind can be held by
the fault switch there: `template_to_vm` (no parameters, no file step) is therefore
never interrupted, only queued and finished.

Guest bytes: recognisable patterns are written with qemu-io into the active layer of
stopped VMs before snapshots are taken; a model of every disk's content (per 64 KiB
granule) follows each job as it is expected to end. The recording step checks the
model against what today's strata leaves, with `qemu-io read -P` and `qemu-img
check`, before writing it to expected.json.
"""

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "upgrade-v1"
BIN = ROOT / "target" / "debug" / "strata"
WRAPPER = ROOT / "scripts" / "upgrade-fixture-qemu-img.sh"

KIB = 1024
MIB = 1024 * KIB
GRANULE = 64 * KIB
ROOT_SIZE = 2 * MIB
DATA_SIZE = 1 * MIB
STD_DISKS = [("root", ROOT_SIZE), ("data", DATA_SIZE)]
FAULT = "disk_delete:planned:pause=3600000"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# --------------------------------------------------------------------------- model


class Model:
    """Expected guest content: one byte value per 64 KiB granule of each disk, for the
    present state of every VM/template (by name) and for every snapshot."""

    def __init__(self):
        self.present = {}  # vm name -> {disk name: [granule byte]}
        self.snapshots = {}  # (vm name, snapshot name) -> {disk name: [...]}
        self.next_pattern = 0x10

    def pattern(self):
        value = self.next_pattern
        self.next_pattern = 0x10 + (self.next_pattern - 0x10 + 11) % 0xE0
        return value

    def new_vm(self, vm, disks):
        self.present[vm] = {name: [0] * (size // GRANULE) for name, size in disks}

    def write(self, vm, disk, pattern, offset, length):
        cells = self.present[vm][disk]
        for g in range(offset // GRANULE, (offset + length) // GRANULE):
            cells[g] = pattern

    def snapshot(self, vm, name):
        self.snapshots[(vm, name)] = {d: list(c) for d, c in self.present[vm].items()}

    def copy_vm(self, source, target, snapshot=None):
        content = self.snapshots[(source, snapshot)] if snapshot else self.present[source]
        self.present[target] = {d: list(c) for d, c in content.items()}

    def revert(self, vm, snapshot):
        for disk, cells in self.snapshots[(vm, snapshot)].items():
            if disk in self.present[vm]:
                self.present[vm][disk] = list(cells)

    def grow(self, vm, disk, size):
        cells = self.present[vm][disk]
        cells.extend([0] * (size // GRANULE - len(cells)))

    def forget_vm(self, vm):
        self.present.pop(vm, None)
        for key in [k for k in self.snapshots if k[0] == vm]:
            del self.snapshots[key]

    def forget_snapshot(self, vm, name):
        del self.snapshots[(vm, name)]

    @staticmethod
    def regions(cells):
        """[pattern, offset, length] runs (bytes) covering the whole disk."""
        runs = []
        for g, value in enumerate(cells):
            if runs and runs[-1][0] == value:
                runs[-1][2] += GRANULE
            else:
                runs.append([value, g * GRANULE, GRANULE])
        return runs

    def to_json(self):
        return {
            "present": {
                vm: {d: self.regions(c) for d, c in disks.items()}
                for vm, disks in sorted(self.present.items())
            },
            "snapshots": [
                {"vm": vm, "snapshot": snap, "disks": {d: self.regions(c) for d, c in disks.items()}}
                for (vm, snap), disks in sorted(self.snapshots.items())
            ],
        }


# -------------------------------------------------------------------------- server


class Server:
    """One strata process over a data directory, driven over HTTP."""

    def __init__(self, data_dir, workers, gate=None, env=None, log_path=None):
        command = [
            str(BIN), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
            "--workers", str(workers), "--shutdown-grace-secs", "1",
        ]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        environment["STRATA_LOG"] = "info,sqlx=warn,tower_http=warn"
        if gate is not None:
            command += ["--qemu-img", str(WRAPPER)]
            environment["UPGRADE_FIXTURE_GATE"] = str(gate)
            environment["UPGRADE_FIXTURE_REAL_QEMU_IMG"] = shutil.which("qemu-img")
        environment.update(env or {})
        self.log = open(log_path or os.devnull, "ab")
        self.process = subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=self.log
        )
        line = self.process.stdout.readline().decode().strip()
        prefix = "strata listening on "
        if not line.startswith(prefix):
            raise Failure(f"unexpected first line from strata: {line!r}")
        self.base = line[len(prefix):]
        self.wait_ready()

    def wait_ready(self):
        for _ in range(1200):
            try:
                if self.call("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise Failure("strata never became ready")

    def kill(self):
        """SIGKILL, like a crash: nothing is cleaned up."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self.log.close()

    def call(self, method, path, body=None, raw=None):
        data, headers = None, {}
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        elif raw is not None:
            data, headers = raw, {"Content-Type": "application/octet-stream"}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        return status, (json.loads(text) if text else None)

    def get(self, path):
        status, body = self.call("GET", path)
        if status != 200:
            raise Failure(f"GET {path}: {status} {body}")
        return body

    def accept(self, method, path, body=None, raw=None):
        """A request that must answer 202 with a job."""
        status, job = self.call(method, path, body, raw)
        if status != 202:
            raise Failure(f"{method} {path} {body or ''}: {status} {job}")
        return job

    def wait(self, job):
        for _ in range(40):
            current = self.get(f"/v1/jobs/{job['id']}?wait=30")
            if current["status"] in ("succeeded", "failed", "cancelled"):
                return current
        raise Failure(f"job {job['id']} did not end")

    def ok(self, method, path, body=None, raw=None):
        """Accept, wait, and require success."""
        job = self.wait(self.accept(method, path, body, raw))
        if job["status"] != "succeeded":
            raise Failure(f"{method} {path}: {job}")
        return job

    def ends(self, job, status, code=None):
        job = self.wait(job)
        got_code = (job.get("error") or {}).get("code")
        if job["status"] != status or (code and got_code != code):
            raise Failure(f"expected {status} {code or ''}, got {job}")
        return job

    def settle(self):
        """Wait until no job is queued or running."""
        while True:
            # One listing, so a job claimed in between is not missed.
            listing = self.get("/v1/jobs?limit=1000")
            assert listing["next_cursor"] is None
            pending = [j for j in listing["items"] if j["status"] in ("queued", "running")]
            if not pending:
                return
            for job in pending:
                self.wait(job)


# ------------------------------------------------------------------------- fixture


class Gate:
    """Control of the qemu-img stand-in (see upgrade-fixture-qemu-img.sh)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.disarm()

    def disarm(self):
        (self.path / "plan").write_text("-1 spent\n")

    def arm(self, passes, action):
        (self.path / "plan").write_text(f"{passes} {action}\n")

    def held(self):
        return sorted(p.name for p in self.path.glob("held.*") if not p.name.endswith(".tmp"))

    def wait_new_hold(self, before):
        for _ in range(1200):
            new = [h for h in self.held() if h not in before]
            if new:
                if len(new) > 1:
                    raise Failure(f"more than one call held: {new}")
                if (self.path / "plan").read_text().split()[1] != "spent":
                    raise Failure("the plan was not spent by the held call")
                return new[0]
            time.sleep(0.05)
        raise Failure("no qemu-img call was held")

    def release(self, held):
        (self.path / held).unlink()


class Maker:
    def __init__(self, work):
        self.work = Path(work)
        self.data = self.work / "data"
        self.gate = Gate(self.work / "gate")
        self.model = Model()
        self.vms = {}  # name -> id (VMs and templates)
        self.snaps = {}  # (vm name, snapshot name) -> id
        self.server = None
        # What the fixture holds, for the checks after the freeze: job id -> (label,
        # expected status in the fixture, expected next_step if interrupted).
        self.jobs = {}
        self.images = self.work / "images"
        self.images.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------- helpers

    def start(self, workers, env=None, name="run"):
        self.server = Server(
            self.data, workers, gate=self.gate.path, env=env, log_path=self.work / f"{name}.log"
        )

    def note(self, job, label, status, next_step=None):
        self.jobs[job["id"]] = (label, status, next_step)
        return job

    def vm_view(self, name):
        return self.server.get(f"/v1/vms/{self.vms[name]}")

    def disk_id(self, vm, disk):
        view = self.vm_view(vm)
        return next(d["id"] for d in view["disks"] if d["name"] == disk)

    def create_vm(self, name, disks=STD_DISKS):
        job = self.server.ok(
            "POST", "/v1/vms",
            {"name": name, "disks": [{"name": n, "size_bytes": s} for n, s in disks]},
        )
        self.vms[name] = job["target"]["id"]
        self.model.new_vm(name, disks)
        return job

    def paint(self, vm, disk, offset, length, pattern=None):
        """Write a pattern into the active layer of a stopped VM's disk."""
        pattern = pattern or self.model.pattern()
        view = self.vm_view(vm)
        assert view["state"] == "stopped", view
        path = next(d["active_path"] for d in view["disks"] if d["name"] == disk)
        qemu_io(path, f"write -P {pattern:#x} {offset} {length}")
        self.model.write(vm, disk, pattern, offset, length)

    def paint_std(self, vm, small=False):
        """Big writes (1 MiB / 512 KiB) or small ones (128 KiB / 128 KiB)."""
        if small:
            self.paint(vm, "root", 1 * MIB, 128 * KIB)
            self.paint(vm, "data", 512 * KIB, 128 * KIB)
        else:
            self.paint(vm, "root", 0, 1 * MIB)
            self.paint(vm, "data", 0, 512 * KIB)

    def snapshot(self, vm, name):
        job = self.server.ok("POST", f"/v1/vms/{self.vms[vm]}/snapshots", {"name": name})
        self.snaps[(vm, name)] = job["target"]["id"]
        self.model.snapshot(vm, name)
        return job

    def std_vm(self, name, snapshots=("s1",)):
        """root 2 MiB + data 1 MiB, big writes, then per snapshot: take it, small writes."""
        self.create_vm(name)
        self.paint_std(name)
        for snap in snapshots:
            self.snapshot(name, snap)
            self.paint_std(name, small=True)

    def clone(self, source, name, mode, snapshot=None):
        body = {"name": name, "mode": mode}
        if snapshot:
            body["snapshot_id"] = self.snaps[(source, snapshot)]
        return self.server.accept("POST", f"/v1/vms/{self.vms[source]}/clone", body)

    def expect_clone(self, job, source, name, snapshot=None):
        self.vms[name] = job["target"]["id"]
        self.model.copy_vm(source, name, snapshot)

    def template_create(self, source, name, snapshot=None):
        body = {"name": name, "from_vm_id": self.vms[source]}
        if snapshot:
            body["snapshot_id"] = self.snaps[(source, snapshot)]
        return self.server.accept("POST", "/v1/templates", body)

    def template(self, name):
        """A one-disk template (root 2 MiB, 1 MiB written) made from a VM's present."""
        self.create_vm(f"{name}-src", [("root", ROOT_SIZE)])
        self.paint(f"{name}-src", "root", 0, 1 * MIB)
        job = self.server.wait(self.template_create(f"{name}-src", name))
        assert job["status"] == "succeeded", job
        self.expect_clone(job, f"{name}-src", name)

    def deploy(self, template, name, mode, count=None):
        body = {"name": name, "mode": mode}
        if count:
            body["count"] = count
        return self.server.accept("POST", f"/v1/templates/{self.vms[template]}/deploy", body)

    def expect_deploy(self, job, template, name, count=None):
        names = [f"{name}-{i}" for i in range(1, count + 1)] if count else [name]
        for vm_name, vm_id in zip(names, job["detail"]["vm_ids"]):
            self.vms[vm_name] = vm_id
            self.model.copy_vm(template, vm_name)

    def upload_image(self, name):
        """A standalone qcow2 (2 MiB, 768 KiB written) to import; its content model."""
        path = self.images / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(ROOT_SIZE)], check=True)
        pattern = self.model.pattern()
        qemu_io(str(path), f"write -P {pattern:#x} {256 * KIB} {768 * KIB}")
        cells = [0] * (ROOT_SIZE // GRANULE)
        for g in range(4, 16):
            cells[g] = pattern
        return path.read_bytes(), cells

    def import_template(self, name):
        raw, cells = self.upload_image(name)
        query = urllib.parse.urlencode({"name": name, "format": "qcow2"})
        job = self.server.accept("POST", f"/v1/templates/import?{query}", raw=raw)
        self.vms[name] = job["target"]["id"]
        self.model.present[name] = {"root": cells}
        return job

    def hold(self, passes, action, submit):
        """Submit one job with the stand-in armed: its first `passes` image writes run,
        the next one holds. Returns the job (running)."""
        before = self.gate.held()
        self.gate.arm(passes, action)
        job = submit()
        self.last_held = self.gate.wait_new_hold(before)
        current = self.server.get(f"/v1/jobs/{job['id']}")
        if current["status"] != "running":
            raise Failure(f"held job is not running: {current}")
        return job

    def wait_paused(self, job):
        """A job held by the fault switch at `planned`: its plan is journaled."""
        for _ in range(1200):
            current = self.server.get(f"/v1/jobs/{job['id']}")
            if current["status"] == "running" and "space_needed_bytes" in (current["detail"] or {}):
                return job
            time.sleep(0.05)
        raise Failure(f"job never reached its fault point: {job}")

    # ------------------------------------------------------------- run 1

    def history(self):
        """Finished jobs of many kinds: succeeded, failed and cancelled."""
        self.history_of_a_vm()
        self.history_of_templates_and_clones()
        self.history_of_failures()
        self.history_of_cancels()

    def history_of_a_vm(self):
        """Snapshots, a delete that merges, a revert, a disk added, grown and removed,
        then every snapshot collapsed."""
        s = self.server
        self.std_vm("h-life", snapshots=("s1", "s2"))
        vm = self.vms["h-life"]
        s.ok("DELETE", f"/v1/snapshots/{self.snaps[('h-life', 's1')]}")
        self.model.forget_snapshot("h-life", "s1")
        s.ok("POST", f"/v1/snapshots/{self.snaps[('h-life', 's2')]}/revert", {})
        self.model.revert("h-life", "s2")
        extra = s.ok("POST", f"/v1/vms/{vm}/disks", {"name": "extra", "size_bytes": MIB})["target"]["id"]
        s.ok("POST", f"/v1/vms/{vm}/disks/{extra}/resize", {"size_bytes": 2 * MIB})
        s.ok("DELETE", f"/v1/vms/{vm}/disks/{extra}")
        s.ok("DELETE", f"/v1/vms/{vm}/snapshots")
        self.model.forget_snapshot("h-life", "s2")

    def history_of_templates_and_clones(self):
        """A template made, deployed linked, one deployed VM flattened and the other
        deleted, converted to a VM and back, then deleted; an image imported; a linked
        clone of the present and a full one of a snapshot."""
        s = self.server
        self.template("h-tpl")
        job = s.wait(self.deploy("h-tpl", "h-dep", "linked", count=2))
        self.expect_deploy(job, "h-tpl", "h-dep", count=2)
        s.ok("POST", f"/v1/vms/{self.vms['h-dep-1']}/disks/{self.disk_id('h-dep-1', 'root')}/flatten")
        s.ok("DELETE", f"/v1/vms/{self.vms['h-dep-2']}")
        self.model.forget_vm("h-dep-2")
        s.ok("POST", f"/v1/templates/{self.vms['h-tpl']}/convert-to-vm")
        s.ok("POST", f"/v1/vms/{self.vms['h-tpl']}/convert-to-template")
        s.ok("DELETE", f"/v1/templates/{self.vms['h-tpl']}")
        self.model.forget_vm("h-tpl")
        s.wait(self.import_template("h-imported"))
        self.std_vm("h-clone-src")
        job = s.wait(self.clone("h-clone-src", "h-clone-l", "linked"))
        self.expect_clone(job, "h-clone-src", "h-clone-l")
        job = s.wait(self.clone("h-clone-src", "h-clone-f", "full", snapshot="s1"))
        self.expect_clone(job, "h-clone-src", "h-clone-f", snapshot="s1")

    def history_of_failures(self):
        """qemu-img fails creating a VM (it stays, `error`), a disk (likewise; the last
        run deletes it) and a full deploy (nothing stays); a grow queued behind a larger
        one is refused when it runs."""
        s = self.server
        self.gate.arm(0, "fail")
        job = s.accept("POST", "/v1/vms", {"name": "h-broken", "disks": [{"name": "root", "size_bytes": MIB}]})
        s.ends(job, "failed", "qemu_failed")
        self.vms["h-broken"] = job["target"]["id"]
        self.create_vm("i-diskd", [("root", MIB)])
        self.gate.arm(0, "fail")
        job = s.accept("POST", f"/v1/vms/{self.vms['i-diskd']}/disks", {"name": "broken", "size_bytes": MIB})
        s.ends(job, "failed", "qemu_failed")
        self.template("h-tpl2")
        self.gate.arm(0, "fail")
        s.ends(self.deploy("h-tpl2", "h-dep-full", "full"), "failed", "qemu_failed")

        self.create_vm("h-grow", [("root", MIB)])
        resize = f"/v1/vms/{self.vms['h-grow']}/disks/{self.disk_id('h-grow', 'root')}/resize"
        held = self.hold(0, "hold-before", lambda: s.accept("POST", resize, {"size_bytes": 4 * MIB}))
        second = s.accept("POST", resize, {"size_bytes": 3 * MIB})
        self.gate.release(self.last_held)
        s.ends(held, "succeeded")
        s.ends(second, "failed", "disk_shrink_refused")
        self.model.grow("h-grow", "root", 4 * MIB)

    def history_of_cancels(self):
        """A queued snapshot and a queued VM deletion cancelled behind a held snapshot,
        then a running full clone cancelled (its copy is killed, the clone rolled back)."""
        s = self.server
        self.std_vm("h-cancel", snapshots=())
        vm = self.vms["h-cancel"]
        held = self.hold(0, "hold-before", lambda: s.accept("POST", f"/v1/vms/{vm}/snapshots", {"name": "s1"}))
        queued = s.accept("POST", f"/v1/vms/{vm}/snapshots", {"name": "never"})
        s.ends(s.accept("POST", f"/v1/jobs/{queued['id']}/cancel"), "cancelled")
        deletion = s.accept("DELETE", f"/v1/vms/{vm}")
        s.ends(s.accept("POST", f"/v1/jobs/{deletion['id']}/cancel"), "cancelled")
        self.gate.release(self.last_held)
        s.ends(held, "succeeded")
        self.snaps[("h-cancel", "s1")] = held["target"]["id"]
        self.model.snapshot("h-cancel", "s1")
        copy = self.hold(1, "hold-before", lambda: self.clone("h-cancel", "h-cancel-copy", "full", snapshot="s1"))
        s.accept("POST", f"/v1/jobs/{copy['id']}/cancel")
        s.ends(copy, "cancelled")
        self.gate.release(self.last_held)  # the marker of the killed call

    def setup_for_freeze(self):
        """VMs, snapshots, clones and templates the last run's jobs work on (`i-*` for
        the interrupted jobs, `q-*` for the queued ones)."""
        s = self.server
        for name in ["i-diskc", "i-diskd2", "i-resize", "i-snapc", "i-clone-lp", "i-clone-fp",
                     "i-tcreate", "q-disk", "q-resize", "q-vmdel", "q-snap"]:
            self.std_vm(name, snapshots=())
        for name in ["i-vmdel", "i-sdel", "i-sdelf", "i-revert", "i-clone-ls", "i-clone-fs",
                     "i-flat-src", "i-v2t", "q-vmdelf", "q-revert", "q-sdel", "q-sdelf",
                     "q-clone", "q-flat-src", "q-v2t"]:
            self.std_vm(name)
        for name in ["i-sdall", "q-sdall"]:
            self.std_vm(name, snapshots=("s1", "s2"))
        # A merge that streams: little under the snapshot, much on top of it.
        self.create_vm("q-sdels", [("root", ROOT_SIZE)])
        self.paint("q-sdels", "root", 0, 128 * KIB)
        self.snapshot("q-sdels", "s1")
        self.paint("q-sdels", "root", 256 * KIB, 1536 * KIB)
        # A deletion that only drops: s2 is left without children by a revert to s1.
        self.std_vm("q-sdeld", snapshots=("s1", "s2"))
        s.ok("POST", f"/v1/snapshots/{self.snaps[('q-sdeld', 's1')]}/revert", {})
        self.model.revert("q-sdeld", "s1")
        # Linked clones of s1 that flattening deletions and flattens work on.
        for source, clone in [("i-vmdel", "i-vmdel-c"), ("i-sdelf", "i-sdelf-c"),
                              ("i-flat-src", "i-flat-c"), ("q-vmdelf", "q-vmdelf-c"),
                              ("q-sdelf", "q-sdelf-c"), ("q-flat-src", "q-flat-c")]:
            job = s.wait(self.clone(source, clone, "linked", snapshot="s1"))
            assert job["status"] == "succeeded", job
            self.expect_clone(job, source, clone, snapshot="s1")
        for name in ["i-tdeploy-t", "q-tdel-t", "q-deploy-t", "q-t2v-t"]:
            self.template(name)

    # ------------------------------------------------------------- run 2

    def interrupted(self, label, next_step, passes, action, submit):
        """Hold a job mid-job (see `hold`); `next_step` is what its journal must say."""
        job = self.hold(passes, action, submit)
        self.note(job, label, "running", next_step)
        log(f"  held {label}")
        return job

    def queued(self, label, job):
        return self.note(job, label, "queued")

    def freeze_interrupted(self):
        """Hold one job of each kind mid-job: copying steps first (their qemu-img
        timeout is a day), then the fault-held deletions, then steps that create or
        grow a file (two minutes: the run is killed well before)."""
        self.freeze_merges()
        self.freeze_copies()
        self.freeze_disk_deletes()
        self.freeze_creates()

    def freeze_merges(self):
        s, vm, m = self.server, self.vms, self.model
        self.interrupted("vm_delete with flatten_dependents: first clone disk streamed", 1, 1, "hold-before",
                         lambda: s.accept("DELETE", f"/v1/vms/{vm['i-vmdel']}?flatten_dependents=true"))
        m.forget_vm("i-vmdel")
        self.interrupted("snapshot_delete (commit on both disks): first committed", 1, 1, "hold-before",
                         lambda: s.accept("DELETE", f"/v1/snapshots/{self.snaps[('i-sdel', 's1')]}"))
        m.forget_snapshot("i-sdel", "s1")
        self.interrupted("snapshot_delete with flatten_dependents: first clone disk streamed", 1, 1, "hold-before",
                         lambda: s.accept("DELETE", f"/v1/snapshots/{self.snaps[('i-sdelf', 's1')]}?flatten_dependents=true"))
        m.forget_snapshot("i-sdelf", "s1")
        self.interrupted("snapshot_delete_all: first disk merged", 1, 1, "hold-before",
                         lambda: s.accept("DELETE", f"/v1/vms/{vm['i-sdall']}/snapshots"))
        m.forget_snapshot("i-sdall", "s1")
        m.forget_snapshot("i-sdall", "s2")
        self.interrupted("vm_to_template (2 disks merged, 1 snapshot): first disk merged", 1, 1, "hold-before",
                         lambda: s.accept("POST", f"/v1/vms/{vm['i-v2t']}/convert-to-template"))
        m.forget_snapshot("i-v2t", "s1")
        flat_root = self.disk_id("i-flat-c", "root")
        self.interrupted("disk_flatten: its one stream ran, not journaled", 0, 0, "hold-after",
                         lambda: s.accept("POST", f"/v1/vms/{vm['i-flat-c']}/disks/{flat_root}/flatten"))

    def freeze_copies(self):
        job = self.interrupted("vm_clone full of a snapshot: first disk copied", 1, 1, "hold-before",
                               lambda: self.clone("i-clone-fs", "i-clone-fs-c", "full", snapshot="s1"))
        self.expect_clone(job, "i-clone-fs", "i-clone-fs-c", snapshot="s1")
        job = self.interrupted("vm_clone full of the present: present frozen, first disk copied", 3, 3,
                               "hold-before", lambda: self.clone("i-clone-fp", "i-clone-fp-c", "full"))
        self.expect_clone(job, "i-clone-fp", "i-clone-fp-c")
        job = self.interrupted("template_create of the present: present frozen, first disk copied", 3, 3,
                               "hold-before", lambda: self.template_create("i-tcreate", "i-tcreate-t"))
        self.expect_clone(job, "i-tcreate", "i-tcreate-t")
        job = self.interrupted("template_deploy full, 2 VMs: first copied", 1, 1, "hold-before",
                               lambda: self.deploy("i-tdeploy-t", "i-deployed", "full", count=2))
        self.expect_deploy(job, "i-tdeploy-t", "i-deployed", count=2)
        self.interrupted("template_import: its one copy ran, not journaled", 0, 0, "hold-after",
                         lambda: self.import_template("i-imported"))

    def freeze_disk_deletes(self):
        """disk_delete has no file step: held by the fault switch once its plan is
        journaled. One disk whose creation failed (previous status `error`), one ready."""
        for owner, disk, what in [("i-diskd", "broken", "failed"), ("i-diskd2", "data", "ready")]:
            path = f"/v1/vms/{self.vms[owner]}/disks/{self.disk_id(owner, disk)}"
            job = self.wait_paused(self.server.accept("DELETE", path))
            self.note(job, f"disk_delete of a {what} disk: plan journaled, held by the fault switch", "running", 0)
            self.model.present[owner].pop(disk, None)
            log(f"  paused disk_delete of a {what} disk")

    def freeze_creates(self):
        s, vm, m = self.server, self.vms, self.model
        job = self.interrupted("vm_create (2 disks): first file created", 0, 1, "hold-before",
                               lambda: s.accept("POST", "/v1/vms", {"name": "i-create", "disks": [
                                   {"name": n, "size_bytes": sz} for n, sz in STD_DISKS]}))
        vm["i-create"] = job["target"]["id"]
        m.new_vm("i-create", STD_DISKS)
        self.interrupted("disk_create: its file created, not journaled", 0, 0, "hold-after",
                         lambda: s.accept("POST", f"/v1/vms/{vm['i-diskc']}/disks", {"name": "extra", "size_bytes": MIB}))
        m.present["i-diskc"]["extra"] = [0] * (MIB // GRANULE)
        resize = f"/v1/vms/{vm['i-resize']}/disks/{self.disk_id('i-resize', 'root')}/resize"
        self.interrupted("disk_resize: the grow ran, not journaled", 0, 0, "hold-after",
                         lambda: s.accept("POST", resize, {"size_bytes": 4 * MIB}))
        m.grow("i-resize", "root", 4 * MIB)
        job = self.interrupted("snapshot_create (2 disks): first overlay created", 0, 1, "hold-before",
                               lambda: s.accept("POST", f"/v1/vms/{vm['i-snapc']}/snapshots", {"name": "s1"}))
        self.snaps[("i-snapc", "s1")] = job["target"]["id"]
        m.snapshot("i-snapc", "s1")
        self.interrupted("snapshot_revert (2 disks): first overlay created", 0, 1, "hold-before",
                         lambda: s.accept("POST", f"/v1/snapshots/{self.snaps[('i-revert', 's1')]}/revert", {}))
        m.revert("i-revert", "s1")
        job = self.interrupted("vm_clone linked of a snapshot: first overlay created", 0, 1, "hold-before",
                               lambda: self.clone("i-clone-ls", "i-clone-ls-c", "linked", snapshot="s1"))
        self.expect_clone(job, "i-clone-ls", "i-clone-ls-c", snapshot="s1")
        job = self.interrupted("vm_clone linked of the present: present frozen", 0, 2, "hold-before",
                               lambda: self.clone("i-clone-lp", "i-clone-lp-c", "linked"))
        self.expect_clone(job, "i-clone-lp", "i-clone-lp-c")

    def freeze_queued(self):
        """Jobs of every kind accepted while all workers are held: they stay queued."""
        self.queue_vm_and_disk_jobs()
        self.queue_deletions()
        self.queue_snapshot_jobs()
        self.queue_copies()

    def queue_vm_and_disk_jobs(self):
        s, vm, m = self.server, self.vms, self.model
        job = self.queued("vm_create (2 disks)", s.accept("POST", "/v1/vms", {
            "name": "q-create", "disks": [{"name": n, "size_bytes": sz} for n, sz in STD_DISKS]}))
        vm["q-create"] = job["target"]["id"]
        m.new_vm("q-create", STD_DISKS)
        self.queued("disk_create", s.accept("POST", f"/v1/vms/{vm['q-disk']}/disks", {"name": "extra", "size_bytes": MIB}))
        m.present["q-disk"]["extra"] = [0] * (MIB // GRANULE)
        data = self.disk_id("q-disk", "data")
        self.queued("disk_delete of a ready disk", s.accept("DELETE", f"/v1/vms/{vm['q-disk']}/disks/{data}"))
        m.present["q-disk"].pop("data")
        resize = f"/v1/vms/{vm['q-resize']}/disks/{self.disk_id('q-resize', 'root')}/resize"
        self.queued("disk_resize to 3 MiB", s.accept("POST", resize, {"size_bytes": 3 * MIB}))
        self.queued("disk_resize to 2.5 MiB, accepted against 2 MiB (refused when it runs)",
                    s.accept("POST", resize, {"size_bytes": 5 * MIB // 2}))
        m.grow("q-resize", "root", 3 * MIB)
        flat_root = self.disk_id("q-flat-c", "root")
        self.queued("disk_flatten", s.accept("POST", f"/v1/vms/{vm['q-flat-c']}/disks/{flat_root}/flatten"))
        self.queued("vm_to_template (1 snapshot collapsed)", s.accept("POST", f"/v1/vms/{vm['q-v2t']}/convert-to-template"))
        m.forget_snapshot("q-v2t", "s1")
        self.queued("template_to_vm", s.accept("POST", f"/v1/templates/{vm['q-t2v-t']}/convert-to-vm"))
        self.queued("template_import", self.import_template("q-imported"))

    def queue_deletions(self):
        s, vm, m = self.server, self.vms, self.model
        self.queued("vm_delete", s.accept("DELETE", f"/v1/vms/{vm['q-vmdel']}"))
        m.forget_vm("q-vmdel")
        self.queued("vm_delete of a VM whose creation failed (previous_status error)",
                    s.accept("DELETE", f"/v1/vms/{vm['h-broken']}"))
        self.queued("vm_delete of a template (DELETE /v1/templates)",
                    s.accept("DELETE", f"/v1/templates/{vm['q-tdel-t']}"))
        m.forget_vm("q-tdel-t")
        self.queued("vm_delete with flatten_dependents (locks its linked clone)",
                    s.accept("DELETE", f"/v1/vms/{vm['q-vmdelf']}?flatten_dependents=true"))
        m.forget_vm("q-vmdelf")
        for owner, snap, label in [("q-sdel", "s1", "snapshot_delete that commits"),
                                   ("q-sdels", "s1", "snapshot_delete that streams"),
                                   ("q-sdeld", "s2", "snapshot_delete that drops")]:
            self.queued(label, s.accept("DELETE", f"/v1/snapshots/{self.snaps[(owner, snap)]}"))
            m.forget_snapshot(owner, snap)
        self.queued("snapshot_delete with flatten_dependents (locks its linked clone)",
                    s.accept("DELETE", f"/v1/snapshots/{self.snaps[('q-sdelf', 's1')]}?flatten_dependents=true"))
        m.forget_snapshot("q-sdelf", "s1")
        self.queued("snapshot_delete_all (2 snapshots)", s.accept("DELETE", f"/v1/vms/{vm['q-sdall']}/snapshots"))
        m.forget_snapshot("q-sdall", "s1")
        m.forget_snapshot("q-sdall", "s2")

    def queue_snapshot_jobs(self):
        s, vm, m = self.server, self.vms, self.model
        job = self.queued("snapshot_create", s.accept("POST", f"/v1/vms/{vm['q-snap']}/snapshots", {"name": "s1"}))
        self.snaps[("q-snap", "s1")] = job["target"]["id"]
        m.snapshot("q-snap", "s1")
        job = self.queued("snapshot_create behind the interrupted disk_resize of its VM",
                          s.accept("POST", f"/v1/vms/{vm['i-resize']}/snapshots", {"name": "after-grow"}))
        self.snaps[("i-resize", "after-grow")] = job["target"]["id"]
        m.snapshot("i-resize", "after-grow")
        self.queued("snapshot_revert", s.accept("POST", f"/v1/snapshots/{self.snaps[('q-revert', 's1')]}/revert", {}))
        m.revert("q-revert", "s1")

    def queue_copies(self):
        """One source copied every way, in a row; deploys, one behind the interrupted
        deploy of its template."""
        for name, mode, snap in [("q-clone-ls", "linked", "s1"), ("q-clone-lp", "linked", None),
                                 ("q-clone-fs", "full", "s1"), ("q-clone-fp", "full", None)]:
            what = f"vm_clone {mode} of {'a snapshot' if snap else 'the present'}"
            job = self.queued(what, self.clone("q-clone", name, mode, snapshot=snap))
            self.expect_clone(job, "q-clone", name, snapshot=snap)
        for name, snap in [("q-tcreate-s", "s1"), ("q-tcreate-p", None)]:
            job = self.queued(f"template_create of {'a snapshot' if snap else 'the present'}",
                              self.template_create("q-clone", name, snapshot=snap))
            self.expect_clone(job, "q-clone", name, snapshot=snap)
        for template, name, mode, count, label in [
            ("q-deploy-t", "q-linked", "linked", 2, "template_deploy linked, 2 VMs"),
            ("q-deploy-t", "q-full", "full", None, "template_deploy full"),
            ("i-tdeploy-t", "q-behind", "linked", None,
             "template_deploy linked behind the interrupted deploy of its template"),
        ]:
            job = self.queued(label, self.deploy(template, name, mode, count))
            self.expect_deploy(job, template, name, count)

    # ------------------------------------------------------------- checks and packing

    def check_frozen(self):
        """After the kill: the journal holds exactly the states meant."""
        db = sqlite3.connect(self.data / "strata.db")
        rows = {r[0]: r[1:] for r in db.execute(
            "SELECT id, status, phase, next_step, plan IS NOT NULL FROM jobs")}
        db.close()
        for job_id, (label, status, next_step) in self.jobs.items():
            got_status, phase, got_step, has_plan = rows[job_id]
            if status == "running":
                ok = (got_status, phase, got_step, has_plan) == ("running", "executing", next_step, 1)
            else:
                ok = (got_status, phase, has_plan) == ("queued", None, 0)
            if not ok:
                raise Failure(f"{label} ({job_id}): {rows[job_id]}")
        running = [r for r in rows.values() if r[0] == "running"]
        queued = [r for r in rows.values() if r[0] == "queued"]
        if len(running) != sum(1 for j in self.jobs.values() if j[1] == "running") or len(queued) != sum(
                1 for j in self.jobs.values() if j[1] == "queued"):
            raise Failure("unexpected queued or running jobs in the fixture")
        log(f"fixture: {len(running)} interrupted, {len(queued)} queued, {len(rows)} jobs in all")

    def checkpoint(self):
        db = sqlite3.connect(self.data / "strata.db")
        mode = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if mode[0] != 0:
            raise Failure(f"checkpoint failed: {mode}")
        db.close()
        for suffix in ("-wal", "-shm"):
            path = self.data / f"strata.db{suffix}"
            if path.exists():
                if path.stat().st_size and suffix == "-wal":
                    raise Failure("the WAL was not emptied")
                path.unlink()
        (self.data / "strata.lock").unlink(missing_ok=True)

    def check_no_paths(self):
        """The database names no file by path (error messages of failed jobs quote the
        qemu-img command line, paths included: text only); every backing file is a bare
        name."""
        copy = self.work / "paths-check.db"
        shutil.copy(self.data / "strata.db", copy)
        db = sqlite3.connect(copy)
        db.execute("UPDATE jobs SET error_message = NULL")
        dump = "\n".join(db.iterdump())
        db.close()
        for needle in (str(self.work), "/tmp", ".qcow2", "/volumes"):
            if needle in dump:
                raise Failure(f"the database holds {needle!r}")
        for path in sorted((self.data / "volumes").iterdir()):
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(path)],
                check=True, capture_output=True).stdout)
            backing = info.get("backing-filename")
            if backing and "/" in backing:
                raise Failure(f"{path.name} names its backing file by path: {backing}")


def qemu_io(path, command, read_only=False):
    args = ["qemu-io", "-f", "qcow2"] + (["-r"] if read_only else []) + ["-c", command, path]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0 or "failed" in out.stdout or "failed" in out.stderr:
        raise Failure(f"qemu-io {command} {path}: {out.stdout} {out.stderr}")


def pack(data_dir, tarball):
    subprocess.run(
        ["tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
         "--mtime=2026-01-01 00:00:00Z", "-C", str(data_dir.parent), "-cf", "-", data_dir.name],
        check=True, stdout=open(str(tarball) + ".tmp", "wb"))
    subprocess.run(["gzip", "-9", "-n", "-f", str(tarball) + ".tmp"], check=True)
    os.replace(str(tarball) + ".tmp.gz", tarball)


def dump_jobs(db_path, out, labels):
    """Every jobs row as it is in the fixture, for reviewers."""
    db = sqlite3.connect(db_path)
    rows = db.execute(
        "SELECT seq, id, kind, status, phase, next_step, past_no_return, cancel_requested,"
        " error_code, target_type, target_id, vm_id, params,"
        " (SELECT group_concat(vm_id, ' ') FROM job_vms WHERE job_seq = jobs.seq)"
        " FROM jobs ORDER BY seq").fetchall()
    db.close()
    lines = [
        "# jobs table of tests/fixtures/upgrade-v1/data.tar.gz (data/strata.db), oldest first.",
        "# seq id kind status [phase next_step past_no_return cancel_requested] error_code",
        "#   target, vm_id, job_vms (every VM the job locks), params (the JSON column)",
        "",
    ]
    for (seq, id_, kind, status, phase, step, past, cancel, code, ttype, tid, vm_id, params, locks) in rows:
        journal = ""
        if phase:
            journal = f" [phase={phase} next_step={step} past_no_return={past} cancel_requested={cancel}]"
        lines.append(f"{seq:3} {id_} {kind} {status}{journal}{' ' + code if code else ''}")
        if id_ in labels:
            lines.append(f"      ({labels[id_]})")
        lines.append(f"      target={ttype}:{tid} vm_id={vm_id} job_vms={locks}")
        lines.append(f"      params={params}")
    Path(out).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------- record


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


SERVICE_SOURCES = ["src", "migrations", "build.rs", "Cargo.toml", "Cargo.lock"]


def provenance():
    if git("status", "--porcelain", "--", *SERVICE_SOURCES):
        raise Failure("the service's sources have uncommitted changes: commit or stash them first")
    return {
        "service_commit": git("log", "-1", "--format=%H %s", "--", *SERVICE_SOURCES),
        "made_at_commit": git("rev-parse", "HEAD"),
        "script": "scripts/make-upgrade-fixture.py",
    }


def fixture_view(db_path):
    db = sqlite3.connect(db_path)
    jobs = {r[0]: r[1] for r in db.execute("SELECT id, status FROM jobs")}
    vm_ids = sorted({r[0] for r in db.execute("SELECT vm_id FROM job_vms UNION SELECT id FROM vms")})
    db.close()
    return jobs, vm_ids


def resources(server):
    """Every VM and template with its disks (and a VM's snapshots), by name."""
    out = {}
    for kind, path in (("vm", "/v1/vms"), ("template", "/v1/templates")):
        listing = server.get(f"{path}?limit=1000")
        assert listing["next_cursor"] is None
        for item in listing["items"]:
            entry = {"id": item["id"], "kind": kind, "status": item["status"], "disks": {}}
            if kind == "vm":
                entry["state"] = item["state"]
                snaps = server.get(f"/v1/vms/{item['id']}/snapshots?limit=1000")["items"]
                entry["snapshots"] = {s["name"]: {"id": s["id"], "status": s["status"]} for s in snaps}
            for disk in item["disks"]:
                d = {"id": disk["id"], "size_bytes": disk["size_bytes"]}
                if kind == "vm":  # a template's disks show neither
                    d["status"], d["chain_length"] = disk["status"], len(disk["chain"])
                entry["disks"][disk["name"]] = d
            out[item["name"]] = entry
    return out


def disk_paths(server, res):
    """(vm name, disk name) -> active file; (vm, snapshot, disk) -> frozen file."""
    present, frozen = {}, {}
    for name, entry in res.items():
        if entry["kind"] == "vm":
            view = server.get(f"/v1/vms/{entry['id']}")
            for disk in view["disks"]:
                present[(name, disk["name"])] = disk["active_path"]
            names = {d["id"]: d["name"] for d in view["disks"]}
            for snap_name, snap in entry["snapshots"].items():
                for volume in server.get(f"/v1/snapshots/{snap['id']}")["volumes"]:
                    frozen[(name, snap_name, names[volume["disk_id"]])] = volume["path"]
        else:
            for disk in server.get(f"/v1/templates/{entry['id']}")["disks"]:
                present[(name, disk["name"])] = disk["path"]
    return present, frozen


def backing_chain(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", "-f", "qcow2", path],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise Failure(f"qemu-img info --backing-chain {path}: {out.stderr}")
    return [i["filename"] for i in json.loads(out.stdout)]


def check_bytes(server, res, content, data_dir):
    present, frozen = disk_paths(server, res)
    if sorted(content["present"]) != sorted(res):
        raise Failure(f"model VMs {sorted(content['present'])} != service VMs {sorted(res)}")
    for vm, disks in content["present"].items():
        if sorted(disks) != sorted(res[vm]["disks"]):
            raise Failure(f"{vm}: model disks {sorted(disks)} != {sorted(res[vm]['disks'])}")
        for disk, regions in disks.items():
            for pattern, offset, length in regions:
                qemu_io(present[(vm, disk)], f"read -P {pattern:#x} {offset} {length}", read_only=True)
    expected_snaps = {(s["vm"], s["snapshot"]) for s in content["snapshots"]}
    actual_snaps = {(vm, snap) for vm, e in res.items() for snap in e.get("snapshots", {})}
    if expected_snaps != actual_snaps:
        raise Failure(f"snapshots: model {sorted(expected_snaps)} != service {sorted(actual_snaps)}")
    for snap in content["snapshots"]:
        for disk, regions in snap["disks"].items():
            for pattern, offset, length in regions:
                path = frozen[(snap["vm"], snap["snapshot"], disk)]
                qemu_io(path, f"read -P {pattern:#x} {offset} {length}", read_only=True)
    referenced = set()
    for path in list(present.values()) + list(frozen.values()):
        referenced.update(backing_chain(path))
    on_disk = {str(p) for p in (data_dir / "volumes").iterdir()}
    if on_disk != referenced:
        raise Failure(f"files not referenced: {sorted(on_disk - referenced)}; missing: {sorted(referenced - on_disk)}")
    for path in sorted(on_disk):
        out = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True, text=True)
        if out.returncode != 0:
            raise Failure(f"qemu-img check {path}: {out.stdout}")
    leftovers = list((data_dir / "imports").glob("*")) if (data_dir / "imports").exists() else []
    if leftovers:
        raise Failure(f"uploads left: {leftovers}")


def record(tarball, content, labels):
    """Run today's strata on a fresh copy of the fixture and write what it did."""
    work = Path(tempfile.mkdtemp(prefix="strata-upgrade-record-"))
    try:
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(work)], check=True)
        data = work / "data"
        before, vm_ids = fixture_view(data / "strata.db")
        server = Server(data, 2, log_path=work / "record.log")
        try:
            server.settle()
            listing = server.get("/v1/jobs?limit=1000")
            assert listing["next_cursor"] is None and len(listing["items"]) == len(before)
            jobs = [{
                "id": j["id"], "kind": j["kind"], "target": j["target"], "vm_id": j["vm_id"],
                "in_fixture": before[j["id"]], "status": j["status"],
                "error_code": (j["error"] or {}).get("code"), "label": labels.get(j["id"]),
                "cancel_requested": j["cancel_requested"],
                "merges": [m["action"] for m in (j["detail"] or {}).get("merges", [])],
            } for j in reversed(listing["items"])]
            kinds = sorted({j["kind"] for j in jobs})
            by_kind = {k: [j["id"] for j in server.get(f"/v1/jobs?kind={k}&limit=1000")["items"]] for k in kinds}
            by_vm = {v: [j["id"] for j in server.get(f"/v1/jobs?vm_id={v}&limit=1000")["items"]] for v in vm_ids}
            res = resources(server)
            check_bytes(server, res, content, data)
            gone = sorted(set(vm_ids) - {e["id"] for e in res.values()})
        finally:
            server.stop()
        return {
            "made_by": provenance(),
            "jobs": jobs,
            "listing": {"newest_first": [j["id"] for j in listing["items"]], "by_kind": by_kind, "by_vm": by_vm},
            "resources": res,
            "gone_vm_ids": gone,
            "content": content,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- main

INTERRUPTED_JOBS = 20


def build_fixture(work):
    maker = Maker(work)
    log("run 1: history and set-up")
    maker.start(workers=4, name="run1")
    maker.history()
    maker.setup_for_freeze()
    maker.server.settle()
    maker.server.stop()
    log("run 2: interrupted and queued jobs")
    maker.start(workers=INTERRUPTED_JOBS, env={"STRATA_FAULT": FAULT}, name="run2")
    started = time.monotonic()
    maker.freeze_interrupted()
    held = [i for i, j in maker.jobs.items() if j[1] == "running"]
    if len(held) != INTERRUPTED_JOBS:
        raise Failure(f"{len(held)} jobs held, the run has {INTERRUPTED_JOBS} workers")
    maker.freeze_queued()
    for job_id in held:
        job = maker.server.get(f"/v1/jobs/{job_id}")
        if job["status"] != "running" or job["error"]:
            raise Failure(f"an interrupted job did not hold: {job}")
    maker.server.kill()
    log(f"killed strata {time.monotonic() - started:.1f} s into run 2")
    maker.check_frozen()
    maker.checkpoint()
    maker.check_no_paths()
    return maker


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record-only", action="store_true",
                        help="only run today's strata on the committed tarball and rewrite expected.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    tarball, expected = FIXTURE / "data.tar.gz", FIXTURE / "expected.json"
    provenance()
    subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)
    if args.record_only:
        previous = json.loads(expected.read_text())
        # The recording is what the release that wrote the fixture does with it: a newer
        # service would turn its own behaviour into the expectation.
        was, now = previous["made_by"]["service_commit"], provenance()["service_commit"]
        if was.split()[0] != now.split()[0]:
            raise Failure(f"the fixture was written and recorded by {was.split()[0]}; "
                          f"the service sources here are at {now.split()[0]}: check that commit out to re-record")
        content = previous["content"]
        labels = {j["id"]: j["label"] for j in previous["jobs"] if j["label"]}
    else:
        work = Path(tempfile.mkdtemp(prefix="strata-upgrade-fixture-"))
        log(f"work directory {work}")
        maker = build_fixture(work)
        FIXTURE.mkdir(parents=True, exist_ok=True)
        pack(maker.data, tarball)
        content = maker.model.to_json()
        labels = {i: j[0] for i, j in maker.jobs.items()}
        dump_jobs(maker.data / "strata.db", FIXTURE / "jobs.txt", labels)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log("recording what today's strata does with it")
    recorded = record(tarball, content, labels)
    expected.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    log(f"wrote {tarball} ({tarball.stat().st_size} bytes) and {expected}")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        log(f"error: {e}")
        sys.exit(1)
