#!/usr/bin/env python3
"""Benchmark of `watch` against PM2's `--watch`, measured in one run on the
same machine, with ratios:

  - time to watch a tree of DIRS directories (FILES files; a node_modules
    of as many again, ignored): from the worker's start until the daemon
    holds a watch on every directory (apm; read from the daemon's inotify
    descriptors; PM2's chokidar is not measured this way)
  - daemon memory while watching that tree
  - from a file written to the restarted child's first output line, less
    `watch_delay` (100 ms for both): the median and the slowest of ROUNDS
    edits

Usage: cargo build --release && python3 bench/watch.py [--apm target/release/apm] [--skip-pm2] [--dirs 2000]
"""

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time

from daemon import Apm, Pm2, rss_mb

DELAY_MS = 100
ROUNDS = 5
SCRIPT = 'echo "started $$"; exec sleep 100000'


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


def wait_restart(log, before, deadline_s):
    start = time.perf_counter()
    while starts_in(log) == before:
        if time.perf_counter() - start > deadline_s:
            return False
        time.sleep(0.0005)
    return True


def warm_up(tree, log, deadline_s=600):
    """Writes a file each second until the watcher restarts the child: a
    watcher still scanning the tree (chokidar has no signal of its end)
    misses writes."""
    start = time.perf_counter()
    target = os.path.join(tree, "src", "d0", "d0", "f1.js")
    while True:
        before = starts_in(log)
        with open(target, "w") as out:
            out.write("module.exports = 0;\n")
        if wait_restart(log, before, 1):
            break
        if time.perf_counter() - start > deadline_s:
            raise SystemExit("the watcher never restarted the child")
    time.sleep(1)


def restart_latency(tree, log, dirs):
    """Median seconds from a write to the next child's first line, less the
    delay; the slowest one too."""
    warm_up(tree, log)
    runs = []
    for i in range(ROUNDS):
        before = starts_in(log)
        d = i * 50 % dirs
        target = os.path.join(tree, "src", f"d{d // 50}", f"d{d}", "f0.js")
        start = time.perf_counter()
        with open(target, "w") as out:
            out.write(f"module.exports = {i};\n")
        if not wait_restart(log, before, 600):
            raise SystemExit(f"no restart in 600 s after writing {target}")
        runs.append(time.perf_counter() - start - DELAY_MS / 1000)
        time.sleep(0.5)  # lets the new child settle before the next edit
    return statistics.median(runs), max(runs)


def wait_for(what, condition, deadline_s=120):
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > deadline_s:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.001)
    return time.perf_counter() - start


def measure_apm(apm, tree, dirs):
    apm("ls")
    pid = apm.daemon_pid()
    idle = rss_mb(pid)
    start = time.perf_counter()
    apm("run", "sh", "-c", SCRIPT, "-name", "w", "-path", tree, "-watch", "*.js",
        "-watch_ignore", "*node_modules*", "-watch_delay", str(DELAY_MS), "-startup_grace", "0")
    # src, its d0..dN/50 and their dN, and the tree itself.
    expected = 1 + 1 + (dirs + 49) // 50 + dirs
    wait_for("apm to watch the tree", lambda: inotify_watches(pid) >= expected)
    setup = time.perf_counter() - start
    memory = rss_mb(pid)
    log = os.path.join(apm.env["APM_HOME"], "logs", "w.out.log")
    wait_for("the first child", lambda: starts_in(log) >= 1)
    return setup, memory, idle, restart_latency(tree, log, dirs)


def measure_pm2(pm2, tree, dirs):
    pm2("ls")
    pid = pm2.daemon_pid()
    idle = rss_mb(pid)
    pm2("start", "sh", "--name", "w", "--interpreter", "none", "--cwd", tree, "--watch", "--ignore-watch",
        "node_modules", "--watch-delay", str(DELAY_MS / 1000), "--", "-c", SCRIPT)  # in seconds
    log = os.path.join(pm2.home, "logs", "w-out.log")
    wait_for("the first child", lambda: starts_in(log) >= 1)
    latency = restart_latency(tree, log, dirs)
    return rss_mb(pid), idle, latency


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
        setup, apm_mem, apm_idle, apm_latency = measure_apm(apm, tree, args.dirs)
        apm.stop()
        pm2_mem = pm2_idle = pm2_latency = None
        if pm2:
            pm2_mem, pm2_idle, pm2_latency = measure_pm2(pm2, tree, args.dirs)
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
    row("write to new child's output - delay", apm_latency[0], pm2_latency and pm2_latency[0], "ms", 1000)
    row("  the slowest of " + str(ROUNDS), apm_latency[1], pm2_latency and pm2_latency[1], "ms", 1000)


if __name__ == "__main__":
    main()
