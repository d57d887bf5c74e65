#!/usr/bin/env python3
"""Benchmark of apm's proxy on several threads (`daemon { proxy_threads N; }`,
issue 22), with wrk on loopback (`wrk -t2 -c64 --latency`) against, in one
run and in interleaved rounds:
  - the tiny hyper backend behind apm with `proxy_threads 1`,
  - the same behind apm with `proxy_threads 2` (a daemon of its own),
  - the same behind nginx with `worker_processes 2`, forwarding what apm
    forwards (the client's Host and X-Forwarded-For/-Proto/-Host),
  - the same behind hyper's floor on 2 threads (runtime/examples/floor.rs,
    `THREADS=2`: the least a hyper proxy does, per thread a runtime and a
    `SO_REUSEPORT` listener): what apm's machinery could reach with 2
    threads if it added nothing per request.
Prints the medians of req/s, p50, p99, the CPU time the proxy and the
backend spent per request and the CPU time wrk spent per request (on two
shared cores, a costlier proxy also costs its client: waiting for it, wrk
sleeps and is woken more often), the ratios 2 threads / 1 thread
(targets: CPU per request no more than 5 % above) and apm 2 threads /
nginx 2 workers (target: req/s at least nginx's), and the floor / nginx;
then the p99 and the maximum of `apm ls`
with the 2-thread daemon idle and with its proxy saturated by wrk (target:
p99 <= 10 ms), beside those of `/bin/true` run in alternation (what the
machine adds to starting any process) and of the daemon's own answer to
`apm ls`'s request over its socket (the daemon's share).
Needs wrk and nginx (`apt-get install wrk nginx`; installed when run as root).

Usage: cargo build --release --examples -p apm-runtime && cargo build --release && python3 bench/scale.py
SHORT=1 runs 1 round of 3 s and 20 `apm ls` calls; ROUNDS and DURATION set
the rounds and the seconds of each wrk run. APM_BIN measures another binary.
"""

import json
import os
import socket
import statistics
import subprocess
import tempfile
import time

from common import apm_env, daemon_in_foreground, free_port, nginx_conf, tear_down, wait_port
from proxy import apm_pids, children, ensure, wrk

FORWARDED = ('proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";'
             " proxy_set_header Host $http_host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"
             " proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;")


def start_daemon(apm, root, threads, backend_exe, name=None, settings=""):
    """A daemon of its own (`name`, by default after its thread count)
    whose proxy has `threads` threads, with the hello backend as its one
    worker, with `settings` added to the worker's block; its environment,
    port and the pids that serve it (daemon, instance). The daemon runs in
    the foreground, in this script's session, as nginx (`daemon off`) and
    the floor do."""
    name = name or f"t{threads}"
    env = apm_env(os.path.join(root, name), f"scale-{name}")
    port = free_port()
    conf = os.path.join(root, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"daemon {{ proxy_threads {threads}; }}\n"
                f"worker {{ name hello; exec {backend_exe}; upstream port; server http://127.0.0.1:{port}; startup_grace 200; {settings} }}\n")
    daemon_in_foreground(apm, env)
    subprocess.run([apm, "load", conf], env=env, check=True, capture_output=True)
    wait_port(port)
    daemon, instances = apm_pids(apm, env, "hello")
    return env, port, [daemon, *instances]


def ls_latencies(apm, env, calls):
    """The wall time of each of `calls` runs of `apm ls`, in ms; of as many
    runs of `/bin/true` in alternation with them: what starting any
    process costs on the machine at that moment (on a shared virtual
    machine, the whole machine now and then stalls for 50-100 ms under
    load, whatever runs); and of the daemon's answer to the request
    `apm ls` makes, asked over its socket by this process (no process
    started)."""
    version = subprocess.run([apm, "--version"], env=env, check=True, capture_output=True, text=True).stdout.split()[1]
    request = json.dumps({"protocol": 1, "version": version, "call": {"call": "table"}}).encode() + b"\n"
    times, reference, answers = [], [], []
    for _ in range(calls):
        for command, into in (([apm, "ls"], times), (["/bin/true"], reference)):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
            into.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as control:
            control.connect("\0" + env["APM_SOCKET"])
            control.sendall(request)
            answer = control.makefile("rb").readline()
        answers.append((time.perf_counter() - started) * 1000)
        assert b'"ok":true' in answer.replace(b" ", b""), answer[:200]
    return times, reference, answers


def p99(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main():
    ensure("wrk", "wrk")
    ensure("nginx", "nginx")
    short = os.environ.get("SHORT") == "1"
    rounds = int(os.environ.get("ROUNDS", "1" if short else "3"))
    duration = int(os.environ.get("DURATION", "3" if short else "10"))
    ls_calls = 20 if short else 200
    hello = os.path.abspath("target/release/examples/hello")
    floor = os.path.abspath("target/release/examples/floor")
    apm = os.path.abspath(os.environ.get("APM_BIN", "target/release/apm"))
    root = tempfile.mkdtemp(prefix="apm-bench-scale-")
    procs, envs = [], []
    try:
        backend = free_port()
        procs.append(subprocess.Popen([hello], env=dict(os.environ, PORT=str(backend))))
        wait_port(backend)
        nginx_port = free_port()
        conf = nginx_conf(root, backend, [f"listen 127.0.0.1:{nginx_port}; location / {{ {FORWARDED} }}"], workers=2)
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"]))
        wait_port(nginx_port)
        floor_port = free_port()
        procs.append(subprocess.Popen([floor], env=dict(os.environ, PORT=str(floor_port), UPSTREAM=str(backend), THREADS="2")))
        wait_port(floor_port)

        targets = {}
        for threads in (1, 2):
            env, port, pids = start_daemon(apm, root, threads, hello)
            envs.append(env)
            targets[f"apm t{threads}"] = (port, pids)
        # nginx's workers and the backend, as apm's daemon and its instance.
        targets["nginx w2"] = (nginx_port, [*children(procs[1].pid), procs[0].pid])
        targets["floor t2"] = (floor_port, [procs[2].pid, procs[0].pid])

        runs = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (port, pids) in targets.items():
                runs[name].append(wrk(port, "http", pids, f"{duration}s"))
        results = {name: [statistics.median(run[i] for run in measured) for i in (0, 1, 2, 3, 5)] for name, measured in runs.items()}
        print(f"medians of {rounds} interleaved runs of wrk -t2 -c64 -d{duration}s")
        print("CPU: what the proxy and the backend spent per request, in µs; wrk: what wrk spent per request")
        print(f"{'setup':<9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU':>6} {'wrk':>6}   req/s of each run")
        for name, (rps, p50, p99_ms, cpu, client) in results.items():
            print(f"{name:<9} {rps:>10.0f} {p50:>8.2f} {p99_ms:>8.2f} {cpu:>6.1f} {client:>6.1f}   " + " ".join(f"{run[0]:.0f}" for run in runs[name]))
        one, two, nginx, floor_t2 = results["apm t1"], results["apm t2"], results["nginx w2"], results["floor t2"]
        print(f"CPU per request, 2 threads / 1 thread: {two[3] / one[3]:.2f} (target <= 1.05)")
        print(f"req/s, 2 threads / 1 thread: {two[0] / one[0]:.2f}")
        print(f"req/s, apm 2 threads / nginx 2 workers: {two[0] / nginx[0]:.2f} (target >= 1.0)")
        print(f"req/s, hyper's floor 2 threads / nginx 2 workers: {floor_t2[0] / nginx[0]:.2f}; apm 2 threads / the floor: {two[0] / floor_t2[0]:.2f}")

        # The control socket with the proxy idle, then saturated.
        env, (port, _) = envs[1], targets["apm t2"]
        idle, idle_reference, idle_answers = ls_latencies(apm, env, ls_calls)
        load = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{duration + 60}s", f"http://127.0.0.1:{port}/"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(1)  # wrk's connections are open and busy
            busy, busy_reference, busy_answers = ls_latencies(apm, env, ls_calls)
        finally:
            load.terminate()
            load.wait()
        print(f"apm ls ({ls_calls} calls), 2 proxy threads: idle p99 {p99(idle):.1f} ms, max {max(idle):.1f} ms; "
              f"proxy saturated p99 {p99(busy):.1f} ms (target <= 10 ms), median {statistics.median(busy):.1f} ms, max {max(busy):.1f} ms")
        print(f"/bin/true in alternation with them: idle p99 {p99(idle_reference):.1f} ms; "
              f"proxy saturated p99 {p99(busy_reference):.1f} ms, median {statistics.median(busy_reference):.1f} ms, max {max(busy_reference):.1f} ms")
        print(f"the daemon's answer to ls over its socket, no process started: idle p99 {p99(idle_answers):.2f} ms; "
              f"proxy saturated p99 {p99(busy_answers):.2f} ms, median {statistics.median(busy_answers):.2f} ms, max {max(busy_answers):.2f} ms")
    finally:
        for env in envs[1:]:
            subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
        tear_down(apm, envs[0] if envs else apm_env(root, "scale-t1"), procs, root)


if __name__ == "__main__":
    main()
