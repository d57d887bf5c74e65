#!/usr/bin/env python3
"""Memory per idle keep-alive client: CLIENTS (default 50,000) clients each
send one request, read the answer and stay connected, against apm's proxy
(`upstream port`, 1 instance) and against nginx (1 worker, an upstream
keepalive pool) in turn, both in front of the same tiny hyper backend.
For each: the proxy's resident memory per idle client, once apm's
connections to the instance have closed (after 1 s idle) and both have
given freed memory back, and the p99 of a light `wrk -t1 -c4` load run
while the clients are held, against the same load with no idle client.
Target: apm's memory per idle client at or below nginx's.

Each proxy holds one descriptor per client, and this script as many:
RLIMIT_NOFILE's hard limit must be above CLIENTS plus a wave of 2,000 (the
script raises the soft limit; it cannot raise the hard one without
CAP_SYS_RESOURCE). Clients
connect from several source addresses (127.0.1.x for apm, 127.0.2.x for
nginx, 20,000 clients each) so that no address runs out of ephemeral ports.
ROUNDS (default 1) alternates the two setups and prints medians. Needs wrk
and nginx.

Usage: cargo build --release --examples -p apm-runtime && cargo build --release && python3 bench/idle.py
       CLIENTS=5000 python3 bench/idle.py   (the short run)
"""

import json
import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import tempfile
import time

from common import apm_env, daemon_in_foreground, free_port, nginx_conf, tear_down, wait_port

# Linux's IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect(), so one
# source address serves every destination's own range of ports.
IP_BIND_ADDRESS_NO_PORT = 24
PER_SOURCE_ADDRESS = 20_000
# Long enough that no client is closed for being idle during a run.
KEEP_ALIVE_S = 600
# Clients open in waves this large, a pause apart: apm keeps a new
# client's connection to the instance through its first idle second (the
# client may well ask again at once), so without pauses each proxy would
# hold two descriptors for every client answered in the last second, and
# a run's size would be bounded by how fast its clients come rather than
# by the open-files limit.
WAVE = 2_000
WAVE_PAUSE_S = 1.5


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def settled_rss_kib(pid, at_least_s):
    """The RSS once it stops changing: at least `at_least_s` seconds from
    now (apm closes idle upstream connections after 1 s and returns freed
    memory every 5 s), then until three samples in a row agree within 1 %."""
    end = time.time() + at_least_s
    samples = []
    while True:
        samples.append(rss_kib(pid))
        recent = samples[-3:]
        if time.time() >= end and len(recent) == 3 and max(recent) - min(recent) <= max(recent) // 100:
            return recent[-1]
        if time.time() > end + 60:
            raise SystemExit(f"the memory of {pid} did not settle: {samples[-6:]} KiB")
        time.sleep(0.5)


class IdleClients:
    """`count` keep-alive connections to 127.0.0.1:`port`, each having sent
    one request and read its whole answer; closed on `close()`."""

    REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def __init__(self, port, count, subnet):
        self.sockets = []
        selector = selectors.DefaultSelector()
        pending = {}
        opened = 0
        wave_end = WAVE
        deadline = time.time() + 120 + count / WAVE * WAVE_PAUSE_S
        while opened < count or pending:
            if time.time() > deadline:
                raise SystemExit(f"only {len(self.sockets)} of {count} clients got their answer")
            # A bounded number connecting at once: the listen backlog is finite.
            if not pending and opened == wave_end < count:
                time.sleep(WAVE_PAUSE_S)
                wave_end += WAVE
            while opened < min(count, wave_end) and len(pending) < 1000:
                s = socket.socket()
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((f"127.0.{subnet}.{2 + opened // PER_SOURCE_ADDRESS}", 0))
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                selector.register(s, selectors.EVENT_WRITE)
                pending[s] = b""
                opened += 1
            for key, events in selector.select(timeout=1):
                s = key.fileobj
                if events & selectors.EVENT_WRITE:
                    error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise SystemExit(f"connect to {port}: {os.strerror(error)}")
                    s.send(self.REQUEST)
                    selector.modify(s, selectors.EVENT_READ)
                    continue
                pending[s] += s.recv(4096)
                if self.answered(pending[s]):
                    selector.unregister(s)
                    del pending[s]
                    self.sockets.append(s)
        selector.close()

    @staticmethod
    def answered(received):
        head, _, body = received.partition(b"\r\n\r\n")
        if not _:
            return False
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {head[:80]!r}")
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if length:
            return len(body) >= int(length.group(1))
        return body.endswith(b"0\r\n\r\n")  # chunked

    def close(self):
        for s in self.sockets:
            s.close()


def wrk_p99_ms(port):
    """The p99 latency of a light load: 4 connections, 5 s."""
    out = subprocess.run(["wrk", "-t1", "-c4", "-d5s", "--latency", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure(pid, port, clients, subnet):
    """Bytes of `pid`'s memory per idle client, and the light load's p99
    with the clients idle."""
    before = settled_rss_kib(pid, 6)
    held = IdleClients(port, clients, subnet)
    try:
        after = settled_rss_kib(pid, 8)
        p99 = wrk_p99_ms(port)
    finally:
        held.close()
    return (after - before) * 1024 / clients, p99


def main():
    clients = int(os.environ.get("CLIENTS", "50000"))
    rounds = int(os.environ.get("ROUNDS", "1"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < clients + WAVE + 100:
        raise SystemExit(f"RLIMIT_NOFILE's hard limit is {hard}: {clients} clients need {clients + WAVE + 100} (raise it as root: ulimit -Hn, or fewer CLIENTS)")
    # The daemon and nginx inherit it: each holds one descriptor per client.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hello = os.path.abspath("target/release/examples/hello")
    apm = os.path.abspath(os.environ.get("APM_BIN", "target/release/apm"))
    root = tempfile.mkdtemp(prefix="apm-bench-idle-")
    env = apm_env(root, "idle")
    procs = []
    try:
        backend = free_port()
        procs.append(subprocess.Popen([hello], env=dict(os.environ, PORT=str(backend))))
        wait_port(backend)
        nginx_port, apm_port = free_port(), free_port()
        proxy = 'proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";'
        conf = nginx_conf(root, backend, [f"listen 127.0.0.1:{nginx_port} backlog=4096; keepalive_timeout {KEEP_ALIVE_S}s; location / {{ {proxy} }}"], connections=clients + 1000)
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"]))
        wait_port(nginx_port)
        with open(f"/proc/{procs[1].pid}/task/{procs[1].pid}/children") as f:
            (nginx_worker,) = [int(p) for p in f.read().split()]
        apm_conf = os.path.join(root, "apm.conf")
        with open(apm_conf, "w") as f:
            f.write(f"worker {{ name hello; exec {hello}; upstream port; server http://127.0.0.1:{apm_port}; keep_alive {KEEP_ALIVE_S * 1000}; startup_grace 200; }}\n")
        daemon_in_foreground(apm, env)
        subprocess.run([apm, "load", apm_conf], env=env, check=True, capture_output=True)
        wait_port(apm_port)
        listing = json.loads(subprocess.run([apm, "ls", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
        daemon = listing["daemon"]["pid"]
        targets = {"apm": (daemon, apm_port, 1), "nginx": (nginx_worker, nginx_port, 2)}
        # Warm both (allocator arenas, upstream pools), and the reference
        # p99 of the light load with no idle client.
        quiet = {name: [] for name in targets}
        results = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (pid, port, subnet) in targets.items():
                quiet[name].append(wrk_p99_ms(port))
                results[name].append(measure(pid, port, clients, subnet))
        print(f"{clients} idle keep-alive clients, medians of {rounds} interleaved round(s)")
        print(f"{'proxy':<6} {'bytes/client':>12} {'p99 ms idle-loaded':>19} {'p99 ms alone':>13}")
        medians = {}
        for name in targets:
            per_client = statistics.median(r[0] for r in results[name])
            p99 = statistics.median(r[1] for r in results[name])
            medians[name] = per_client
            print(f"{name:<6} {per_client:>12.0f} {p99:>19.2f} {statistics.median(quiet[name]):>13.2f}")
        print(f"apm / nginx memory per idle client: {medians['apm'] / max(medians['nginx'], 1):.2f} (target <= 1.0)")
    finally:
        tear_down(apm, env, procs, root)


if __name__ == "__main__":
    main()
