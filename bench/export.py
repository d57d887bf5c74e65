#!/usr/bin/env python3
"""Benchmark of `apm export`: whole-process time of exporting a generated
1,000-worker config (HTTP listeners, health checks, env, rolling restarts,
memory limits) to each target, written with -o into a new directory (a
first export) and into one that holds the files already (an export again).

Beside each figure, `apm check` of the same file (compiling it, the part
`apm export` shares) as a reference measured in the same rounds: the runs
alternate, and each figure is a median, printed with its ratio to the
reference, since the machine may be shared.

Target (2-core machine, release build): each export under 100 ms.

Usage: cargo build --release && python3 bench/export.py [--apm target/release/apm] [--rounds N]
"""

import argparse
import os
import shutil
import tempfile

import statistics
import subprocess
import time

TARGETS = ["kubernetes", "nomad", "compose", "systemd"]


def worker(i):
    return (
        f"worker {{\n"
        f"    name w{i};\n"
        f"    exec /usr/bin/node;\n"
        f"    params server.js, --id, {i};\n"
        f"    instances {1 + i % 4};\n"
        f"    upstream port;\n"
        f"    server http://0.0.0.0:{10000 + i};\n"
        f"    health_check http://127.0.0.1:{10000 + i}/health;\n"
        f"    env NODE_ENV=production;\n"
        f"    env API_TOKEN=t{i};\n"
        f"    rolling on;\n"
        f"    memory_limit 256M;\n"
        f"    restart_err on;\n"
        f"}}\n"
    )


def timed(argv):
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    root = tempfile.mkdtemp(prefix="apm-bench-export-")
    try:
        config = os.path.join(root, "apm.conf")
        with open(config, "w") as f:
            f.write("".join(worker(i) for i in range(1000)))
        runs = {"check": []}
        for target in TARGETS:
            runs[(target, "new")] = []
            runs[(target, "again")] = []
        for round in range(args.rounds):
            runs["check"].append(timed([apm, "check", config]))
            for target in TARGETS:
                fresh = os.path.join(root, f"{target}-{round}")
                runs[(target, "new")].append(timed([apm, "export", target, config, "-o", fresh]))
                again = os.path.join(root, target)
                runs[(target, "again")].append(timed([apm, "export", target, config, "-o", again]))
        check = statistics.median(runs["check"])
        print(f"reference, apm check of the same 1,000 workers: {check * 1000:.1f} ms")
        for target in TARGETS:
            for kind, what in [("new", "into a new directory"), ("again", "over its own files")]:
                took = statistics.median(runs[(target, kind)])
                verdict = "met" if took < 0.100 else "MISSED"
                print(
                    f"apm export {target} -o, {what}: {took * 1000:.1f} ms, "
                    f"{took / check:.2f}x apm check (target < 100 ms: {verdict})"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
