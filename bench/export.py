#!/usr/bin/env python3
"""Benchmark of `apm export`: whole-process time of exporting a generated
1,000-worker config (HTTP listeners, health checks, env, rolling restarts,
memory limits) to each target, written to a directory with -o.

Beside each figure, `apm check` of the same file (compiling it, the part
`apm export` shares) as a reference measured in the same run.

Target (2-core machine, release build): each export under 100 ms.

Usage: cargo build --release && python3 bench/export.py [--apm target/release/apm]
"""

import argparse
import os
import shutil
import tempfile

from common import median_time

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    root = tempfile.mkdtemp(prefix="apm-bench-export-")
    try:
        config = os.path.join(root, "apm.conf")
        with open(config, "w") as f:
            f.write("".join(worker(i) for i in range(1000)))
        check = median_time([apm, "check", config], repeat=5)
        print(f"reference, apm check of the same 1,000 workers: {check * 1000:.1f} ms")
        for target in TARGETS:
            out = os.path.join(root, target)
            took = median_time([apm, "export", target, config, "-o", out], repeat=5)
            print(f"apm export {target}, 1,000 workers: {took * 1000:.1f} ms (target < 100 ms: {'met' if took < 0.100 else 'MISSED'})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
