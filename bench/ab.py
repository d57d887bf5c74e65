#!/usr/bin/env python3
"""Two apm builds, or one build with two worker settings, side by side on
one backend: the daemon's CPU per request and req/s under `wrk -t2 -c64`,
rounds interleaved (the order flips each round) and medians taken, so a
change of a percent or two shows through the machine's drift. This is how
`bench/README.md`'s per-change figures (the held-bytes count, the route's
copies, decision 16's share) were measured. Each daemon runs in the
foreground in this script's session, with the hello backend as its one
worker (`scale.start_daemon`).

A and B name each side: a binary, optionally followed by `:` and what to
add to the worker's block (`A=target/release/apm:"lowercase_hdrs true;"`).
Build the backend with `cargo build --release --examples -p apm-runtime`.

Usage: A=/tmp/apm-before B=target/release/apm [THREADS=2] [ROUNDS=8] [DURATION=6] python3 bench/ab.py
"""

import os
import shutil
import statistics
import tempfile

from common import tear_down
from proxy import wrk
from scale import start_daemon


def side(spec):
    """(binary, worker settings) of a side's spec `binary[:settings]`."""
    binary, _, settings = spec.partition(":")
    return os.path.abspath(binary), settings


def main():
    sides = {name: side(os.environ[name]) for name in ("A", "B")}
    threads = os.environ.get("THREADS", "2")
    rounds = int(os.environ.get("ROUNDS", "8"))
    duration = f"{os.environ.get('DURATION', '6')}s"
    hello = os.path.abspath(os.environ.get("HELLO", "target/release/examples/hello"))
    root = tempfile.mkdtemp(prefix="apm-bench-ab-")
    started = {}
    try:
        for name, (apm, settings) in sides.items():
            env, port, pids = start_daemon(apm, root, threads, hello, name, settings)
            started[name] = (env, port, pids[0])
        runs = {name: [] for name in sides}
        for round_number in range(rounds):
            order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
            for name in order:
                _, port, pid = started[name]
                rps, _, _, cpu, errors, _ = wrk(port, "http", [pid], duration)
                if errors:
                    raise SystemExit(f"{name}: {errors} requests failed")
                runs[name].append((rps, cpu))
        print(f"medians of {rounds} interleaved rounds of wrk -t2 -c64 -d{duration}, proxy_threads {threads}")
        print(f"{'side':4} {'req/s':>8} {'daemon CPU µs/req':>18}  spec")
        medians = {}
        for name, measured in runs.items():
            medians[name] = (statistics.median(r for r, _ in measured), statistics.median(c for _, c in measured))
            print(f"{name:4} {medians[name][0]:8.0f} {medians[name][1]:18.2f}  {os.environ[name]}")
        (rps_a, cpu_a), (rps_b, cpu_b) = medians["A"], medians["B"]
        print(f"B / A: req/s {rps_b / rps_a:.3f}, daemon CPU per request {cpu_b / cpu_a:.3f}")
    finally:
        # Each daemon's own directory goes with it; the other's stays
        # until that daemon has stopped.
        for name, (env, _, _) in started.items():
            tear_down(sides[name][0], env, [], os.path.join(root, name))
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
