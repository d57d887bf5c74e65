#!/usr/bin/env python3
"""Benchmark of `apm check`: whole-process time and peak memory on generated
configs of 1,000, 10,000 and 11,000 workers (8 keys each, 100 workers per
include file), plus a one-worker file. 11,000 such workers are about the
largest config allowed (a config holds at most 100,000 statements, docs/cli.md
decision 36); bench/many.py measures the largest config of minimal workers.

Every figure is printed beside a reference measured in the same run on the
same files, so the ratios mean something on any machine:
  - `cat` of all the files (the floor: reading the bytes),
  - the 10,000-worker time, for the 11,000-worker run (no growth faster than
    the worker count).

Targets (2-core machine, release build): 10,000 workers under 100 ms,
11,000 workers within 1.2 x 1.1 of 10,000, one worker under 5 ms.

Usage: cargo build --release && python3 bench/check.py [--apm target/release/apm]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

WORKERS_PER_FILE = 100
# The largest config of these workers under the statement bound, and how
# much slower than 10,000 workers it may be: its share, with 20 % slack.
LARGEST = 11_000
LINEAR = 1.2 * LARGEST / 10_000


def worker(i):
    return (
        f"worker {{\n"
        f"    name        w{i};\n"
        f"    exec        node;\n"
        f"    params      server.js, --port, {10000 + i % 50000};\n"
        f"    instances   {1 + i % 4};\n"
        f"    restart_err true;\n"
        f"    kill_timeout 3s;\n"
        f"    env         NODE_ENV=production, SHARD={i};\n"
        f"    server      http://127.{i // 60000}.0.1:{1024 + i % 60000}, unix:/run/w{i}.sock;\n"
        f"}}\n"
    ).replace("unix:/run", "http://unix:/run")


def generate(root, count):
    os.makedirs(os.path.join(root, "workers"))
    with open(os.path.join(root, "apm.conf"), "w") as f:
        f.write("daemon { gui_port 0; }\ninclude workers/*.conf;\n")
    files = [os.path.join(root, "apm.conf")]
    for start in range(0, count, WORKERS_PER_FILE):
        path = os.path.join(root, "workers", f"{start // WORKERS_PER_FILE:06}.conf")
        with open(path, "w") as f:
            f.write("".join(worker(i) for i in range(start, min(count, start + WORKERS_PER_FILE))))
        files.append(path)
    return files


def run(argv, cwd):
    """Wall time (s) and peak RSS (KiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0,):
        raise SystemExit(f"{argv} exited {proc.returncode}: {proc.stderr.read().decode()[:500]}")
    return elapsed, usage.ru_maxrss


def measure(argv, cwd, repeat):
    runs = [run(argv, cwd) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), max(m for _, m in runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    lines_per_worker = worker(0).count("\n")
    print(f"{'workers':>8} {'lines':>9} {'apm check':>10} {'peak RSS':>10} {'cat':>8} {'x cat':>7} {'target':>8}")
    times = {}
    for count, repeat in ((1, 21), (1_000, 9), (10_000, 7), (LARGEST, 5)):
        root = tempfile.mkdtemp(prefix=f"apm-bench-{count}-")
        try:
            files = generate(root, count)
            run([apm, "check", "apm.conf"], root)  # warm the page cache
            elapsed, peak = measure([apm, "check", "apm.conf"], root, repeat)
            cat, _ = measure(["cat", *files], root, repeat)
            times[count] = elapsed
            target = {1: "< 5 ms", 10_000: "< 100 ms"}.get(count, "")
            if count == LARGEST:
                target = f"{elapsed / times[10_000]:.2f}x/{LINEAR:.2f}x"
            print(
                f"{count:>8} {count * lines_per_worker:>9} {elapsed * 1000:>8.1f}ms {peak / 1024:>8.1f}MB"
                f" {cat * 1000:>6.1f}ms {elapsed / cat:>6.1f}x {target:>8}"
            )
        finally:
            shutil.rmtree(root)
    ok = times[1] < 0.005 and times[10_000] < 0.100 and times[LARGEST] <= LINEAR * times[10_000]
    print("targets met" if ok else "targets MISSED")


if __name__ == "__main__":
    main()
