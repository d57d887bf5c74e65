#!/usr/bin/env python3
"""Benchmark of `apm reload`: 200 workers run from one file; one worker's
params change; the reload must restart exactly that one and return in under
100 ms plus that worker's own start time. The reference measured in the
same run is `apm reload` of the unchanged file (a no-op plan), which pays
the compile and the round trip only.

Usage: cargo build --release && python3 bench/reload.py [--apm target/release/apm]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from common import apm_env

WORKERS = 200


def config(changed):
    return "".join(
        f"worker {{ name w{i}; exec sleep; params {700000 + i + (1 if changed and i == 100 else 0)}; startup_grace 0; }}\n"
        for i in range(WORKERS)
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    root = tempfile.mkdtemp(prefix="apm-bench-reload-")
    env = apm_env(root, "reload")
    path = os.path.join(root, "apm.conf")

    def run(*argv):
        return subprocess.run([apm, *argv], env=env, capture_output=True, text=True, check=True).stdout

    def pids():
        return {w["name"]: [i["pid"] for i in w["instances"]] for w in json.loads(run("ls", "--json"))["workers"]}

    try:
        with open(path, "w") as f:
            f.write(config(False))
        run("load", path)
        noop = []
        for _ in range(5):
            start = time.perf_counter()
            run("reload", path)
            noop.append(time.perf_counter() - start)
        before = pids()
        changed = []
        for round_ in range(5):
            with open(path, "w") as f:
                f.write(config(round_ % 2 == 0))
            start = time.perf_counter()
            run("reload", path)
            changed.append(time.perf_counter() - start)
        after = pids()
        restarted = [name for name in before if before[name] != after[name]]
        reload_ms = statistics.median(changed) * 1000
        noop_ms = statistics.median(noop) * 1000
        print(f"reload with 1 of {WORKERS} workers changed: {reload_ms:.1f} ms (target < 100 ms plus its start: {'met' if reload_ms < 100 else 'MISSED'})")
        print(f"reference, no-op reload of the same file: {noop_ms:.1f} ms; ratio {reload_ms / noop_ms:.2f}")
        print(f"workers restarted: {restarted} (exactly one expected: {'yes' if restarted == ['w100'] else 'NO'})")
    finally:
        subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
