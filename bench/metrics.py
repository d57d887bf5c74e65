#!/usr/bin/env python3
"""Benchmark of what watching apm costs the daemon:

  - a scrape of /metrics with 1,000 instances running     (apm: < 10 ms)
  - the dashboard open (what its page asks, as often as it asks),
    in the daemon's CPU                                      (apm: < 1 % of a core)

The daemon runs with its own APM_HOME and socket, 1,000 `sleep` instances
(10 workers of 100) and a dashboard on a free loopback port; it is stopped
at the end.

Each scrape reads every instance's /proc/PID/stat; the kernel's part of
that is most of a scrape's time.

Usage: cargo build --release && python3 bench/metrics.py [--apm target/release/apm] [--seconds 20]
"""

import argparse
import http.client
import os
import statistics
import subprocess
import tempfile
import time

from common import apm_env, free_port, wait_port

PASSWORD_HEADER = {"Authorization": "Basic OmJlbmNo"}  # any user, password "bench"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get(connection, path):
    connection.request("GET", path, headers=PASSWORD_HEADER)
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
    return body


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        env = apm_env(root, "metrics")
        apm = lambda *a: subprocess.run([args.apm, *a], env=env, capture_output=True, text=True, check=True).stdout
        gui = free_port()
        config = os.path.join(root, "apm.conf")
        with open(config, "w") as f:
            f.write(f"daemon {{ gui_port {gui}; gui_bind 127.0.0.1; gui_password bench; }}\n")
            for w in range(10):
                f.write(f"worker {{ name sleepers{w}; exec sleep; params 100000; instances 100; startup_grace 0; }}\n")
        try:
            apm("load", config)
            wait_port(gui)
            pid = int(open(os.path.join(env["APM_HOME"], "apm.pid")).read())
            connection = http.client.HTTPConnection("127.0.0.1", gui, timeout=30)
            deadline = time.time() + 60
            running = lambda: sum(1 for line in get(connection, "/metrics").splitlines()
                                  if line.startswith(b"apm_instance_up{") and line.endswith(b" 1"))
            while running() < 1000:
                if time.time() > deadline:
                    raise SystemExit("the 1,000 instances did not all start")
                time.sleep(0.5)
            times = []
            for _ in range(50):
                start = time.perf_counter()
                get(connection, "/metrics")
                times.append(time.perf_counter() - start)
            scrape = statistics.median(times)
            listing = []
            for _ in range(20):
                start = time.perf_counter()
                get(connection, "/api/workers")
                listing.append(time.perf_counter() - start)
            print(f"(the listing alone, /api/workers: median {statistics.median(listing) * 1000:.2f} ms)")
            print(f"/metrics with 1,000 instances: median {scrape * 1000:.2f} ms, "
                  f"p90 {sorted(times)[44] * 1000:.2f} ms ({'ok' if scrape < 0.010 else 'OVER'} < 10 ms)")

            # The page: the listing and the traffic every 2 s, a worker's
            # log live (Server-Sent Events) all along.
            live = http.client.HTTPConnection("127.0.0.1", gui, timeout=30)
            live.request("GET", "/api/workers/sleepers0/logs/live?lines=200", headers=PASSWORD_HEADER)
            if live.getresponse().status != 200:
                raise SystemExit("the live log was refused")
            before, start = cpu_seconds(pid), time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                get(connection, "/api/workers")
                get(connection, "/api/traffic")
                time.sleep(2)
            share = (cpu_seconds(pid) - before) / (time.perf_counter() - start) * 100
            live.close()
            print(f"dashboard open, 1,000 instances: {share:.2f} % of a core "
                  f"({'ok' if share < 1 else 'OVER'} < 1 %)")
        finally:
            subprocess.run([args.apm, "exit", "daemon"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
