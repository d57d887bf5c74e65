#!/usr/bin/env python3
"""`apm export` output, checked by each platform's own validators.

Every config of corpus/check/ok plus the golden configs of
tests/export/ is exported to every target, then:
  - Kubernetes manifests: kubernetes-validate --strict against Kubernetes 1.33;
  - compose.yaml: check-jsonschema with the Compose specification's schema
    that check-jsonschema vendors (vendor.compose-spec, with its license);
  - apm.nomad.hcl: parsed by python-hcl2, and each group carries what the
    mapping promises (count, a task with its command);
  - systemd units: `systemd-analyze verify` (a missing executable or user of
    the exported config is not the unit's fault and is tolerated).
The validators are installed, pinned, into target/export-venv on first run
(as .ci/run does up front). Exit 0 when all pass, 1 with the failures, 77
(after `skipped: <why>`) when a validator cannot be had.

Usage: cargo build && python3 tests/export_validate.py [--apm target/debug/apm]
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "export-venv")
VENV_BIN = os.path.join(VENV, "bin")
PACKAGES = ["kubernetes-validate==1.37.0", "check-jsonschema==0.39.0", "python-hcl2==8.1.4"]
KUBERNETES = "1.33.0"
TARGETS = ["kubernetes", "nomad", "compose", "systemd"]


def skip(why):
    print(f"skipped: {why}")
    sys.exit(77)


def ensure_venv():
    probe = "import kubernetes_validate, check_jsonschema, hcl2"
    python = os.path.join(VENV_BIN, "python")
    if os.path.exists(python) and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return python
    if not os.path.exists(python) and subprocess.run([sys.executable, "-m", "venv", VENV]).returncode != 0:
        skip("cannot create a venv (python3-venv)")
    if subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES]).returncode != 0:
        skip("cannot install " + " ".join(PACKAGES))
    return python


def configs():
    cases = sorted(glob.glob(os.path.join(ROOT, "corpus/check/ok/*.conf")))
    cases += sorted(glob.glob(os.path.join(ROOT, "corpus/check/ok/*/apm.conf")))
    cases += sorted(glob.glob(os.path.join(ROOT, "tests/export/*/apm.conf")))
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default=os.environ.get("APM_BIN", os.path.join(ROOT, "target/debug/apm")))
    args = parser.parse_args()
    if shutil.which("systemd-analyze") is None:
        skip("systemd-analyze is missing (Debian package systemd)")
    python = ensure_venv()
    failures = []
    work = tempfile.mkdtemp(prefix="apm-export-")
    outputs = {target: [] for target in TARGETS}
    for index, config in enumerate(configs()):
        for target in TARGETS:
            out = os.path.join(work, target, str(index))
            # The environment the corpus runner compiles with (tests/it/corpus.rs).
            env = {**os.environ, "HOME": "/home/apm", "APP_DIR": "/srv/app"}
            run = subprocess.run([args.apm, "export", target, config, "-o", out], capture_output=True, text=True, env=env)
            if run.returncode == 1 and "nothing is exported" in run.stderr and "panicked" not in run.stderr:
                # Refused: it names files or users that only the corpus runner's memory holds.
                continue
            if run.returncode != 0 or "panicked" in run.stderr:
                failures.append(f"{config} to {target}: exit {run.returncode}: {run.stderr}")
                continue
            if target == "systemd" and "systemd refuses to run it" in run.stderr:
                # tests/export/hostile: the export already says systemd will
                # refuse the program's name, and systemd-analyze agrees.
                continue
            outputs[target].append((config, out))

    manifests = [f for _, out in outputs["kubernetes"] for f in sorted(glob.glob(os.path.join(out, "*.yaml")))]
    if manifests:
        run = subprocess.run([os.path.join(VENV_BIN, "kubernetes-validate"), "--strict", "--quiet", "-k", KUBERNETES, *manifests],
                             capture_output=True, text=True)
        if run.returncode != 0:
            failures.append("kubernetes-validate:\n" + run.stdout + run.stderr)

    composes = [os.path.join(out, "compose.yaml") for _, out in outputs["compose"]]
    run = subprocess.run([os.path.join(VENV_BIN, "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *composes],
                         capture_output=True, text=True)
    if run.returncode != 0:
        failures.append("check-jsonschema (compose-spec):\n" + run.stdout + run.stderr)

    nomad_check = r'''
import hcl2, sys
def labelled(block):
    """The (label, body) of a labelled block, python-hcl2 8's markers left out."""
    (label, body), = [(k, v) for k, v in block.items() if not k.startswith("__")]
    return label.strip('"'), body
for path in sys.argv[1:]:
    with open(path) as f:
        job = hcl2.load(f)
    name, spec = labelled(job["job"][0])
    assert name == "apm", path
    for group in spec.get("group", []):
        gname, g = labelled(group)
        assert isinstance(g["count"], int), (path, gname, "count")
        tname, task = labelled(g["task"][0])
        assert tname == gname and task["driver"].strip('"') == "exec", (path, gname)
        assert "command" in task["config"][0] and "kill_timeout" in task, (path, gname)
'''
    nomads = [os.path.join(out, "apm.nomad.hcl") for _, out in outputs["nomad"]]
    run = subprocess.run([python, "-c", nomad_check, *nomads], capture_output=True, text=True)
    if run.returncode != 0:
        failures.append("python-hcl2:\n" + run.stdout + run.stderr)

    # What the exported machine lacks is not the unit's fault.
    tolerated = ("is not executable", "Failed to resolve", "No such file or directory", "Unit is bound to inactive unit")
    for config, out in outputs["systemd"]:
        units = sorted(glob.glob(os.path.join(out, "*.service")))
        # A template is verified through one of its instances.
        units = [u.replace("@.service", "@0.service") if u.endswith("@.service") else u for u in units]
        for unit in units:
            if unit.endswith("@0.service"):
                shutil.copy(unit.replace("@0.service", "@.service"), unit)
        if not units:
            continue
        run = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", *units],
                             capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        bad = [line for line in (run.stdout + run.stderr).splitlines() if line.strip() and not any(t in line for t in tolerated)]
        if bad:
            failures.append(f"systemd-analyze verify {config}:\n" + "\n".join(bad))

    shutil.rmtree(work, ignore_errors=True)
    if len(outputs["systemd"]) < 35:
        failures.append(f"only {len(outputs['systemd'])} configs could be exported")
    counts = ", ".join(f"{t}: {len(outputs[t])}" for t in TARGETS)
    if failures:
        print("\n\n".join(failures))
        print(f"export validation: {len(failures)} failures ({counts})")
        sys.exit(1)
    print(f"export validation: all valid ({counts})")


if __name__ == "__main__":
    main()
