#!/usr/bin/env python3
"""Benchmark of `watch` against PM2's `--watch`, measured in one run on the
same machine, with ratios:

  - time to watch a tree of DIRS directories (FILES files; a node_modules
    of as many again, ignored): from the worker's start until the daemon
    holds a watch on every directory (apm; read from the daemon's inotify
    descriptors; PM2's chokidar is not measured this way)
  - daemon memory while watching that tree
  - from a file written to the restarted child's first output line, less
    `watch_delay` (100 ms for both): the median of ROUNDS edits

Usage: cargo build --release && python3 bench/watch.py [--apm target/release/apm] [--skip-pm2] [--dirs 2000]
"""

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import tempfile
import time

from common import apm_env

DELAY_MS = 100
ROUNDS = 9
SCRIPT = 'echo "started $$"; exec sleep 100000'


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def inotify_watches(pid):
    """How many inotify watches the process holds, over all its instances."""
    count = 0
    for fdinfo in glob.glob(f"/proc/{pid}/fdinfo/*"):
        try:
            with open(fdinfo) as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            pass
    return count


def make_tree(root, dirs):
    files = 0
    for d in range(dirs):
        for top in ("src", "node_modules"):
            path = os.path.join(root, top, f"d{d // 50}", f"d{d}")
            os.makedirs(path, exist_ok=True)
            for f in range(5):
                with open(os.path.join(path, f"f{f}.js"), "w") as out:
                    out.write("module.exports = 1;\n")
                files += 1
    return files


def starts_in(log):
    try:
        with open(log) as f:
            return sum(1 for line in f if "started " in line)
    except FileNotFoundError:
        return 0


def restart_latency(tree, log):
    """Median seconds from a write to the next child's first line, less the delay."""
    runs = []
    for i in range(ROUNDS):
        before = starts_in(log)
        target = os.path.join(tree, "src", f"d{i}", f"d{i * 50}", "f0.js")
        start = time.perf_counter()
        with open(target, "w") as out:
            out.write(f"module.exports = {i};\n")
        while starts_in(log) == before:
            if time.perf_counter() - start > 30:
                raise SystemExit(f"no restart after writing {target}")
            time.sleep(0.0005)
        runs.append(time.perf_counter() - start - DELAY_MS / 1000)
        time.sleep(0.5)  # lets the new child settle before the next edit
    return statistics.median(runs)


def wait_for(what, condition, deadline_s=120):
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > deadline_s:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.001)
    return time.perf_counter() - start


class Apm:
    def __init__(self, binary, root):
        self.binary = binary
        self.env = apm_env(root, "watch")

    def __call__(self, *args):
        return subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, check=True).stdout

    def daemon_pid(self):
        with open(os.path.join(self.env["APM_HOME"], "apm.pid")) as f:
            return int(f.read())

    def measure(self, tree, dirs):
        self("ls")
        pid = self.daemon_pid()
        idle = rss_mb(pid)
        start = time.perf_counter()
        self("run", "sh", "-c", SCRIPT, "-name", "w", "-path", tree, "-watch", "*.js",
             "-watch_ignore", "*node_modules*", "-watch_delay", str(DELAY_MS), "-startup_grace", "0")
        # src, its d0..dN/50 and their dN, and the tree itself.
        expected = 1 + 1 + (dirs + 49) // 50 + dirs
        wait_for("apm to watch the tree", lambda: inotify_watches(pid) >= expected)
        setup = time.perf_counter() - start
        log = os.path.join(self.env["APM_HOME"], "logs", "w.out.log")
        wait_for("the first child", lambda: starts_in(log) >= 1)
        return setup, rss_mb(pid), idle, restart_latency(tree, log)

    def stop(self):
        subprocess.run([self.binary, "exit", "daemon"], env=self.env, capture_output=True)


class Pm2:
    def __init__(self, root):
        prefix = os.path.join(root, "pm2")
        print("installing pm2 from npm ...", flush=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", prefix, "pm2"], check=True)
        self.binary = os.path.join(prefix, "node_modules", ".bin", "pm2")
        self.home = os.path.join(root, "pm2-home")
        self.env = dict(os.environ, PM2_HOME=self.home)

    def __call__(self, *args, cwd=None):
        return subprocess.run([self.binary, *args], env=self.env, cwd=cwd, capture_output=True, text=True, check=True).stdout

    def measure(self, tree):
        self("ls")
        with open(os.path.join(self.home, "pm2.pid")) as f:
            pid = int(f.read())
        idle = rss_mb(pid)
        self("start", "sh", "--name", "w", "--interpreter", "none", "--watch", "--ignore-watch", "node_modules",
             "--watch-delay", str(DELAY_MS), "--", "-c", SCRIPT, cwd=tree)
        log = os.path.join(self.home, "logs", "w-out.log")
        wait_for("the first child", lambda: starts_in(log) >= 1)
        time.sleep(3)  # chokidar's initial scan has no signal of its end
        return rss_mb(pid), idle, restart_latency(tree, log)

    def stop(self):
        subprocess.run([self.binary, "kill"], env=self.env, capture_output=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--skip-pm2", action="store_true", help="measure apm alone")
    parser.add_argument("--dirs", type=int, default=2000)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="apm-bench-watch-")
    apm = Apm(os.path.abspath(args.apm), root)
    pm2 = None if args.skip_pm2 else Pm2(root)
    try:
        tree = os.path.join(root, "tree")
        files = make_tree(tree, args.dirs)
        print(f"tree: {args.dirs} directories of 5 .js files under src/ and as many under node_modules/ ({files} files)")
        setup, apm_mem, apm_idle, apm_latency = apm.measure(tree, args.dirs)
        apm.stop()
        pm2_mem = pm2_idle = pm2_latency = None
        if pm2:
            pm2_mem, pm2_idle, pm2_latency = pm2.measure(tree)
            pm2.stop()
    finally:
        apm.stop()
        if pm2:
            pm2.stop()
        shutil.rmtree(root, ignore_errors=True)

    def row(name, a, p, unit, scale):
        ratio = f"{p / a:.1f}x" if p else "-"
        shown = (lambda v: f"{v * scale:.1f} {unit}" if v is not None else "-")
        print(f"{name:<36} {shown(a):>10} {shown(p):>10} {ratio:>8}")

    print(f"{'measure':<36} {'apm':>10} {'pm2':>10} {'pm2/apm':>8}")
    row("time to watch the tree", setup, None, "ms", 1000)
    row("daemon memory, idle", apm_idle, pm2_idle, "MB", 1)
    row("daemon memory, watching the tree", apm_mem, pm2_mem, "MB", 1)
    row("write to new child's output - delay", apm_latency, pm2_latency, "ms", 1000)


if __name__ == "__main__":
    main()
