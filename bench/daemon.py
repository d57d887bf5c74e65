#!/usr/bin/env python3
"""Benchmark of the apm daemon and CLI against PM2, measured in one run on
the same machine, with ratios:

  - CLI `list` latency with 50 workers running      (apm: < 5 ms and >= 30x faster than `pm2 ls`)
  - daemon memory idle and with 50 workers          (apm: < 10 MB and < 20 MB)
  - time from `run` to the child's first output line (apm: < 10 ms)
  - `list` latency with 1,000 workers               (apm: < 50 ms)

PM2 is installed from npm into a temporary directory with its own PM2_HOME;
apm runs with its own APM_HOME and socket. Both are stopped at the end.

Usage: cargo build --release && python3 bench/daemon.py [--apm target/release/apm] [--skip-pm2]
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from common import apm_env, median_time, print_rows


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Apm:
    def __init__(self, binary, root):
        self.binary = binary
        self.env = apm_env(root, "daemon")

    def __call__(self, *args):
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, check=True).stdout

    def daemon_pid(self):
        with open(os.path.join(self.env["APM_HOME"], "apm.pid")) as f:
            return int(f.read())

    def run_sleepers(self, count, first=0):
        for i in range(first, first + count):
            self("run", "sleep", "100000", "-name", f"w{i}", "-startup_grace", "0")

    def first_output(self):
        start = time.perf_counter()
        self("run", "sh", "-c", "echo apm-ready; exec sleep 100000", "-name", "probe", "-startup_grace", "0")
        return wait_since(start, os.path.join(self.env["APM_HOME"], "logs", "probe.out.log"), "apm-ready")

    def list_time(self, repeat=21):
        return median_time([self.binary, "ls"], self.env, repeat)

    def stop(self):
        subprocess.run([self.binary, "exit", "daemon"], env=self.env, capture_output=True)


def wait_since(start, path, text, deadline_s=10):
    while time.perf_counter() - start < deadline_s:
        try:
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    return time.perf_counter() - start
        except FileNotFoundError:
            pass
        time.sleep(0.0002)
    raise SystemExit(f"timed out waiting for {text!r} in {path}")


class Pm2:
    def __init__(self, root, timeout=None):
        """PM2 from npm; an install that takes longer than `timeout`
        seconds raises subprocess.TimeoutExpired."""
        prefix = os.path.join(root, "pm2")
        print("installing pm2 from npm ...", flush=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", prefix, "pm2"], check=True, timeout=timeout)
        self.binary = os.path.join(prefix, "node_modules", ".bin", "pm2")
        self.home = os.path.join(root, "pm2-home")
        self.env = dict(os.environ, PM2_HOME=self.home)

    def __call__(self, *args):
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, check=True).stdout

    def daemon_pid(self):
        with open(os.path.join(self.home, "pm2.pid")) as f:
            return int(f.read())

    def run_sleepers(self, count):
        for i in range(count):
            self("start", "sleep", "--name", f"w{i}", "--interpreter", "none", "--", "100000")

    def first_output(self):
        start = time.perf_counter()
        self("start", "sh", "--name", "probe", "--interpreter", "none", "--", "-c", "echo pm2-ready; exec sleep 100000")
        return wait_since(start, os.path.join(self.home, "logs", "probe-out.log"), "pm2-ready")

    def list_time(self, repeat=5):
        return median_time([self.binary, "ls"], self.env, repeat)

    def stop(self):
        subprocess.run([self.binary, "kill"], env=self.env, capture_output=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--skip-pm2", action="store_true", help="measure apm alone")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="apm-bench-daemon-")
    apm = Apm(os.path.abspath(args.apm), root)
    pm2 = None if args.skip_pm2 else Pm2(root)
    rows = []
    try:
        apm("version")
        apm("ls")  # starts the daemon
        apm_idle = rss_mb(apm.daemon_pid())
        apm_first = apm.first_output()
        apm.run_sleepers(49)
        apm_mem50 = rss_mb(apm.daemon_pid())
        apm_list50 = apm.list_time()
        pm2_idle = pm2_mem50 = pm2_list50 = pm2_first = None
        if pm2:
            pm2("ls")
            pm2_idle = rss_mb(pm2.daemon_pid())
            pm2_first = pm2.first_output()
            pm2.run_sleepers(49)
            pm2_mem50 = rss_mb(pm2.daemon_pid())
            pm2_list50 = pm2.list_time()
            pm2.stop()
        apm.run_sleepers(950, first=49)
        apm_list1000 = apm.list_time(repeat=11)

        def ratio(pm2_value, apm_value):
            return f"{pm2_value / apm_value:.1f}x" if pm2_value else "-"

        def ms(v):
            return f"{v * 1000:.1f} ms" if v is not None else "-"

        def mb(v):
            return f"{v:.1f} MB" if v is not None else "-"

        rows = [
            ("list, 50 workers", ms(apm_list50), ms(pm2_list50), ratio(pm2_list50, apm_list50), "< 5 ms, >= 30x", apm_list50 < 0.005 and (not pm2_list50 or pm2_list50 / apm_list50 >= 30)),
            ("daemon memory, idle", mb(apm_idle), mb(pm2_idle), ratio(pm2_idle, apm_idle), "< 10 MB", apm_idle < 10),
            ("daemon memory, 50 workers", mb(apm_mem50), mb(pm2_mem50), ratio(pm2_mem50, apm_mem50), "< 20 MB", apm_mem50 < 20),
            ("run to first output line", ms(apm_first), ms(pm2_first), ratio(pm2_first, apm_first), "< 10 ms", apm_first < 0.010),
            ("list, 1,000 workers", ms(apm_list1000), "-", "-", "< 50 ms", apm_list1000 < 0.050),
        ]
    finally:
        apm.stop()
        if pm2:
            pm2.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_rows(rows)


if __name__ == "__main__":
    main()
