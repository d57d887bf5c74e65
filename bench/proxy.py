#!/usr/bin/env python3
"""Benchmark of apm's proxy in `upstream port` mode, with wrk on loopback
(`wrk -t2 -c64 -d10s --latency`) against, in one run:
  - a tiny hyper backend directly,
  - the same backend behind nginx (proxy_pass with an upstream keepalive
    pool, 1 worker),
  - the same backend behind apm (`upstream port`, 1 instance).
Prints req/s, p50 and p99 and the ratio apm / nginx (target: at or above
nginx's req/s, with a p99 no worse), and the daemon's memory under load
(target: under 50 MB). Needs wrk and nginx (`apt-get install wrk nginx`;
the script installs them when run as root).

Usage: cargo build --release --examples -p apm-runtime && cargo build --release && python3 bench/proxy.py
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=10):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def ensure(tool, package):
    if shutil.which(tool):
        return
    if os.geteuid() != 0:
        raise SystemExit(f"{tool} is missing: apt-get install {package}")
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, stdout=subprocess.DEVNULL)


def wrk(port):
    out = subprocess.run(["wrk", "-t2", "-c64", "-d10s", "--latency", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def latency(pct):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rps, latency(50), latency(99)


def main():
    ensure("wrk", "wrk")
    ensure("nginx", "nginx")
    hello = os.path.abspath("target/release/examples/hello")
    apm = os.path.abspath("target/release/apm")
    root = tempfile.mkdtemp(prefix="apm-bench-proxy-")
    procs = []
    env = dict(os.environ, APM_HOME=os.path.join(root, "home"), APM_SOCKET=f"apm-bench-proxy-{os.getpid()}")
    try:
        backend = free_port()
        procs.append(subprocess.Popen([hello], env=dict(os.environ, PORT=str(backend))))
        wait_port(backend)

        nginx_port = free_port()
        conf = os.path.join(root, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
""")
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"]))
        wait_port(nginx_port)

        apm_port = free_port()
        subprocess.run([apm, "run", hello, "-name", "hello", "-upstream", "port", "-server", f"http://127.0.0.1:{apm_port}", "-startup_grace", "200"], env=env, check=True, capture_output=True)
        wait_port(apm_port)

        results = {"direct": wrk(backend), "nginx": wrk(nginx_port), "apm": wrk(apm_port)}
        daemon_pid = json.loads(subprocess.run([apm, "ls", "--json"], env=env, capture_output=True, text=True, check=True).stdout)["daemon"]["pid"]
        with open(f"/proc/{daemon_pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        print(f"{'setup':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
        for name, (rps, p50, p99) in results.items():
            print(f"{name:<8} {rps:>10.0f} {p50:>8.2f} {p99:>8.2f}")
        apm_rps, _, apm_p99 = results["apm"]
        nginx_rps, _, nginx_p99 = results["nginx"]
        print(f"apm / nginx req/s: {apm_rps / nginx_rps:.2f} (target >= 1.0); p99 {apm_p99:.2f} vs {nginx_p99:.2f} ms (target: no worse)")
        print(f"apm daemon peak memory under load: {rss:.1f} MB (target < 50 MB)")
        print("not measured yet: apm's Node connector against PM2 cluster mode (the connector mode is not built)")
    finally:
        subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
        for p in procs:
            p.terminate()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
