#!/usr/bin/env python3
"""Benchmark of apm with many workers, against PM2 in the same run:

  - `apm load` of 1,000 workers of 2 instances each (2,000 `sleep`
    processes): time until all 2,000 run, against PM2 starting the same
    1,000 apps of 2 instances from one ecosystem file
  - `apm ls` latency with them running (median, p99; target < 10 ms), in
    rounds interleaved with `pm2 ls` when PM2 runs the same apps
  - daemon memory: total and per worker, for apm and PM2
  - `apm check` of the largest configs a config may be (100,000 statements,
    compiler/src/include.rs): 11,000 workers of bench/check.py's 9
    statements, and 33,000 of 3 (`worker { name; exec; }`): time and peak
    RSS (target < 150 MB), beside `cat` of the same files. The 100,000
    workers of issue 22 are past that limit.

The machine may be shared: every figure comes with its reference from the
same run, and the lead reruns it on a quiet machine.

Usage: cargo build --release && python3 bench/many.py [--apm target/release/apm]
       [--short] [--skip-pm2] [--workers N] [--pm2-apps N]
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from check import generate, run as run_measured
from common import apm_env, print_rows, tear_down
from daemon import Pm2, rss_mb

INSTANCES = 2


def config(count):
    return "".join(
        f"worker {{\n    name w{i};\n    exec sleep;\n    params 100000;\n    instances {INSTANCES};\n}}\n"
        for i in range(count)
    )


def timed(argv, env):
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def wait_until(what, condition, deadline_s=600):
    end = time.time() + deadline_s
    while time.time() < end:
        if condition():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def apm_running(apm, env):
    listing = json.loads(subprocess.run([apm, "ls", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    return sum(1 for w in listing["workers"] for i in w["instances"] if i["pid"] is not None)


def pm2_running(pm2):
    return sum(1 for app in json.loads(pm2("jlist")) if app.get("pm2_env", {}).get("status") == "online" and app.get("pid"))


def pm2_ecosystem(root, count):
    path = os.path.join(root, "ecosystem.config.js")
    apps = [
        {"name": f"w{i}", "script": "sleep", "args": "100000", "interpreter": "none", "exec_mode": "fork", "instances": INSTANCES, "autorestart": False}
        for i in range(count)
    ]
    with open(path, "w") as f:
        f.write("module.exports = " + json.dumps({"apps": apps}) + ";\n")
    return path


def minimal(root, count):
    """A config of `count` workers of 3 statements each: the most workers
    a config may hold."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "apm.conf")
    with open(path, "w") as f:
        f.write("".join(f"worker {{ name w{i}; exec sleep; }}\n" for i in range(count)))
    return [path]


def measure_check(apm, root, make, count):
    """Median time, peak RSS (MB), median `cat` time of the files and peak
    KB per worker of `apm check` on the config `make` writes in `root`."""
    os.makedirs(root)
    files = make(root)
    run_measured([apm, "check", "apm.conf"], root)  # warm the page cache
    runs = [run_measured([apm, "check", "apm.conf"], root) for _ in range(3)]
    peak_kib = max(m for _, m in runs)
    cat = statistics.median(run_measured(["cat", *files], root)[0] for _ in range(3))
    return statistics.median(t for t, _ in runs), peak_kib / 1024, cat, peak_kib / count


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--short", action="store_true", help="fewer rounds, PM2 with 200 apps, smaller checks")
    parser.add_argument("--skip-pm2", action="store_true")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--pm2-apps", type=int, help="how many apps PM2 starts (default: --workers; 200 with --short)")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    rounds = 21 if args.short else 101
    pm2_apps = args.pm2_apps or (200 if args.short else args.workers)
    check_sizes = (5_000, 10_000) if args.short else (11_000, 33_000)
    root = tempfile.mkdtemp(prefix="apm-bench-many-")
    env = apm_env(root, "many")
    pm2 = None
    rows = []
    try:
        conf = os.path.join(root, "many.conf")
        with open(conf, "w") as f:
            f.write(config(args.workers))
        subprocess.run([apm, "ls"], env=env, check=True, capture_output=True)  # starts the daemon
        with open(os.path.join(env["APM_HOME"], "apm.pid")) as f:
            apm_pid = int(f.read())
        apm_idle = rss_mb(apm_pid)
        processes = args.workers * INSTANCES
        start = time.perf_counter()
        subprocess.run([apm, "load", conf], env=env, check=True, capture_output=True)
        wait_until(f"{processes} apm processes", lambda: apm_running(apm, env) == processes)
        apm_load = time.perf_counter() - start
        apm_mem = rss_mb(apm_pid)

        pm2_load = pm2_idle = pm2_mem = None
        if not args.skip_pm2:
            try:
                pm2 = Pm2(root, timeout=120)
                pm2("ls")
                pm2_idle = rss_mb(pm2.daemon_pid())
                ecosystem = pm2_ecosystem(root, pm2_apps)
                start = time.perf_counter()
                pm2("start", ecosystem)
                wait_until(f"{pm2_apps * INSTANCES} PM2 processes", lambda: pm2_running(pm2) == pm2_apps * INSTANCES)
                pm2_load = time.perf_counter() - start
                pm2_mem = rss_mb(pm2.daemon_pid())
            except (subprocess.SubprocessError, SystemExit, OSError) as e:
                print(f"PM2 anchor incomplete: {type(e).__name__}: {e}")
                if pm2 is not None:
                    pm2.stop()
                pm2, pm2_load = None, None

        # Interleaved rounds: apm ls, apm version (the floor: a process
        # start and one small request), then pm2 ls (fewer: it takes far
        # longer).
        apm_ls, floor, pm2_ls = [], [], []
        for i in range(rounds):
            apm_ls.append(timed([apm, "ls"], env))
            floor.append(timed([apm, "version"], env))
            if pm2 is not None and pm2_load is not None and i % 5 == 0:
                pm2_ls.append(timed([pm2.binary, "ls"], pm2.env))

        checks = [
            (f"check {check_sizes[0]} workers of 9 keys", *measure_check(apm, os.path.join(root, "check-9"), lambda d: generate(d, check_sizes[0]), check_sizes[0])),
            (f"check {check_sizes[1]} workers of 3 keys", *measure_check(apm, os.path.join(root, "check-3"), lambda d: minimal(d, check_sizes[1]), check_sizes[1])),
        ]

        def ms(v):
            return f"{v * 1000:.1f} ms" if v is not None else "-"

        def mb(v):
            return f"{v:.1f} MB" if v is not None else "-"

        def ratio(pm2_value, apm_value):
            return f"{pm2_value / apm_value:.1f}x" if pm2_value else "-"

        apm_median, apm_p99 = statistics.median(apm_ls), percentile(apm_ls, 99)
        pm2_median = statistics.median(pm2_ls) if pm2_ls else None
        apm_per_worker = (apm_mem - apm_idle) * 1024 / args.workers
        pm2_per_worker = (pm2_mem - pm2_idle) * 1024 / pm2_apps if pm2_mem else None
        # PM2 with fewer apps than apm: its per-app figures scale, its totals do not.
        same = pm2_apps == args.workers
        rows = [
            (f"load: all {processes} running", ms(apm_load), ms(pm2_load) + ("" if same else f" ({pm2_apps} apps)"), ratio(pm2_load, apm_load) if same else "-", "", True),
            ("load: per process", ms(apm_load / processes), ms(pm2_load / (pm2_apps * INSTANCES)) if pm2_load else "-", ratio(pm2_load / (pm2_apps * INSTANCES), apm_load / processes) if pm2_load else "-", "", True),
            ("apm ls, median", ms(apm_median), ms(pm2_median), ratio(pm2_median, apm_median), "< 10 ms", apm_median < 0.010),
            ("apm ls, p99", ms(apm_p99), "-", "-", "", True),
            ("apm version (start + ping), median", ms(statistics.median(floor)), "-", "-", "", True),
            ("daemon memory, idle", mb(apm_idle), mb(pm2_idle), ratio(pm2_idle, apm_idle), "", True),
            (f"daemon memory, {args.workers} workers", mb(apm_mem), mb(pm2_mem) + ("" if same else f" ({pm2_apps} apps)"), ratio(pm2_mem, apm_mem) if same else "-", "", True),
            ("daemon memory per worker", f"{apm_per_worker:.1f} KB", f"{pm2_per_worker:.1f} KB" if pm2_per_worker else "-", ratio(pm2_per_worker, apm_per_worker), "", True),
        ]
        for name, check_time, check_peak, cat_time, per_worker in checks:
            rows.append((f"{name}, time", ms(check_time), "-", "-", f"cat {ms(cat_time)}", True))
            rows.append((f"{name}, peak", mb(check_peak), "-", "-", "< 150 MB", check_peak < 150))
            rows.append((f"{name}, per worker", f"{per_worker:.1f} KB", "-", "-", "", True))
    finally:
        tear_down(apm, env, [], root, pm2)
    print_rows(rows)


if __name__ == "__main__":
    main()
