#!/usr/bin/env python3
"""Where apm's proxy spends its CPU per request, against the least a hyper
proxy does (runtime/examples/floor.rs) on the same backend and load: for
each, the proxy process's CPU per request split into kernel and user time,
then apm's user-space functions that cost more per request than the
floor's, in ns per request. This is the breakdown behind `proxy.py`'s CPU
column (issue 22's "CPU per request"): what is apm's own, what is hyper's
and tokio's, and what the kernel does for both. nginx with one worker,
forwarding what apm forwards, is profiled in the same rounds: how far
below hyper's floor a proxy must go to do as much with the same CPU.

perf samples the proxy process alone (4 kHz, no call graphs), while `wrk
-t2 -c64` keeps it busy; apm, the floor and nginx take turns, ROUNDS times
(default 3), and the figures are medians. The apm binary needs its symbols:
build it with `cargo build --profile sizeprobe` (the release profile,
unstripped); the floor and the backend come from the same profile's
examples. The daemon serves on one proxy thread, as the floor does, and
nginx on one worker; THREADS=2 profiles two of each (what `scale.py`
compares), where what the threads share shows.

Needs wrk, perf and nginx (`apt-get install wrk linux-perf nginx-light`).

Usage: cargo build --profile sizeprobe --bin apm && cargo build --profile sizeprobe --examples -p apm-runtime
       python3 bench/profile.py
"""

import collections
import json
import os
import re
import statistics
import subprocess
import tempfile

from common import apm_env, daemon_in_foreground, free_port, nginx_conf, tear_down, wait_port
from proxy import children
from scale import FORWARDED

PROFILE = os.environ.get("PROFILE_DIR", "target/sizeprobe")
SAMPLES_PER_SECOND = 4000
# A sample stands for this much CPU time, in ns.
NS_PER_SAMPLE = 1e9 / SAMPLES_PER_SECOND


def profile(pids, port, seconds=6):
    """perf samples of the processes `pids` while wrk loads `port`: (samples by
    (kernel or user, symbol), requests served meanwhile)."""
    data = tempfile.mktemp(suffix=".perf")
    load = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{seconds + 3}s", f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    try:
        # The first second warms up; perf then samples while wrk still runs.
        subprocess.run(["sleep", "1"], check=True)
        subprocess.run(["perf", "record", "-q", "-F", str(SAMPLES_PER_SECOND), "-p", ",".join(map(str, pids)), "-o", data, "--", "sleep", str(seconds)], check=True, capture_output=True)
        out = load.communicate()[0]
    finally:
        load.kill()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "-n", "--sort", "symbol", "--stdio"], capture_output=True, text=True, check=True).stdout
    os.unlink(data)
    samples = collections.Counter()
    for line in report.splitlines():
        m = re.match(r"\s+[\d.]+%\s+(\d+)\s+\[(.)\]\s+(.*)", line)
        if m:
            # Generic arguments differ between the two binaries' symbols.
            name = re.sub(r"<[^<>]*>", "<>", m.group(3).strip())
            samples[("kernel" if m.group(2) == "k" else "user", name)] += int(m.group(1))
    return samples, rps * seconds


def per_request(samples, requests):
    """ns per request of each entry of `samples`."""
    return {key: n * NS_PER_SAMPLE / requests for key, n in samples.items()}


def main():
    hello = os.path.abspath(f"{PROFILE}/examples/hello")
    floor = os.path.abspath(f"{PROFILE}/examples/floor")
    apm = os.path.abspath(os.environ.get("APM_BIN", f"{PROFILE}/apm"))
    root = tempfile.mkdtemp(prefix="apm-bench-profile-")
    threads = os.environ.get("THREADS", "1")
    env = dict(apm_env(root, "profile"), APM_PROXY_THREADS=threads)
    procs = []
    try:
        backend, floor_port, apm_port, nginx_port = free_port(), free_port(), free_port(), free_port()
        procs.append(subprocess.Popen([hello], env=dict(os.environ, PORT=str(backend))))
        wait_port(backend)
        procs.append(subprocess.Popen([floor], env=dict(os.environ, PORT=str(floor_port), UPSTREAM=str(backend), THREADS=threads)))
        wait_port(floor_port)
        procs.append(subprocess.Popen(["nginx", "-c", nginx_conf(root, backend, [f"listen 127.0.0.1:{nginx_port}; location / {{ {FORWARDED} }}"], workers=int(threads)), "-g", "daemon off;"]))
        wait_port(nginx_port)
        nginx_workers = children(procs[2].pid)
        conf = os.path.join(root, "apm.conf")
        with open(conf, "w") as f:
            f.write(f"worker {{ name hello; exec {hello}; upstream port; server http://127.0.0.1:{apm_port}; startup_grace 200; }}\n")
        daemon_in_foreground(apm, env)
        subprocess.run([apm, "load", conf], env=env, check=True, capture_output=True)
        wait_port(apm_port)
        daemon = json.loads(subprocess.run([apm, "ls", "--json"], env=env, capture_output=True, text=True, check=True).stdout)["daemon"]["pid"]

        rounds = int(os.environ.get("ROUNDS", "3"))
        runs = {"apm": [], "floor": [], "nginx": []}
        for _ in range(rounds):
            for name, pids, port in [("apm", [daemon], apm_port), ("floor", [procs[1].pid], floor_port), ("nginx", nginx_workers, nginx_port)]:
                runs[name].append(per_request(*profile(pids, port)))

        def median(name, pick):
            return statistics.median(sum(v for k, v in run.items() if pick(k)) for run in runs[name])

        print(f"medians of {rounds} interleaved rounds, {threads} thread(s) or worker(s) each, the proxy's CPU per request (ns)")
        print(f"{'proxy':8} {'total':>7} {'kernel':>7} {'user':>7}")
        for name in runs:
            total = median(name, lambda k: True)
            kernel = median(name, lambda k: k[0] == "kernel")
            user = median(name, lambda k: k[0] == "user")
            print(f"{name:8} {total:7.0f} {kernel:7.0f} {user:7.0f}")
        nginx, floor = median("nginx", lambda k: True), median("floor", lambda k: True)
        print(f"nginx / floor: {nginx / floor:.2f} (a hyper proxy below 1.0 would do as much as nginx per core)")
        for side, shown, note in [("user", 25, "; a function\ninlined differently in the two binaries shows on one side only"), ("kernel", 12, "")]:
            print(f"\napm's {side} functions costing more than the floor's (ns per request{note})")
            names = {k for run in runs["apm"] for k in run if k[0] == side}
            extra = {k: statistics.median(r.get(k, 0) for r in runs["apm"]) - statistics.median(r.get(k, 0) for r in runs["floor"]) for k in names}
            for key, ns in sorted(extra.items(), key=lambda kv: -kv[1])[:shown]:
                print(f"{ns:7.0f}  {key[1][:110]}")
        # What the floor spends more in: where a function of apm's list was
        # inlined into another in the floor's binary, its cost shows here.
        print("\nthe floor's user functions costing more than apm's (ns per request)")
        names = {k for run in runs["floor"] for k in run if k[0] == "user"}
        less = {k: statistics.median(r.get(k, 0) for r in runs["floor"]) - statistics.median(r.get(k, 0) for r in runs["apm"]) for k in names}
        for key, ns in sorted(less.items(), key=lambda kv: -kv[1])[:10]:
            print(f"{ns:7.0f}  {key[1][:110]}")
    finally:
        tear_down(apm, env, procs, root)


if __name__ == "__main__":
    main()
