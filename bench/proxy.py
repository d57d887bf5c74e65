#!/usr/bin/env python3
"""Benchmark of apm's proxy, with wrk on loopback (`wrk -t2 -c64 -d10s
--latency`) against, in one run:
  - a tiny hyper backend directly,
  - the same backend behind nginx (proxy_pass with an upstream keepalive
    pool, 1 worker), as it is ("nginx") and forwarding what apm forwards:
    the client's Host and X-Forwarded-For/-Proto/-Host ("nginx+xf", the
    comparison of equal work),
  - the same backend behind the least a hyper proxy does (no header read or
    added; runtime/examples/floor.rs), plain HTTP only: the part of apm's
    cost that is hyper's own,
  - the same backend behind apm (`upstream port`, 1 instance),
  - the same again with a Vanguard block of 100 path rules, 1,000 CIDRs and
    a rate limit that is not hit,
  - a Node hello-world under apm's Node connector, 2 instances,
  - the same app written with `http` under PM2 cluster mode, `-i 2` (PM2
    from npm, in a temporary directory; SKIP_PM2=1 leaves both Node rows out).
Each setup is measured ROUNDS times (default 3), the setups taking turns;
prints the medians of req/s, p50, p99 and the CPU time the serving processes
(proxy and app) spent per request, the ratio apm / nginx (target: at or above
nginx's req/s, with a p99 no worse), the ratio with / without Vanguard
(target: >= 0.95), the ratio Node connector / PM2 (target: >= 1.0) and the
daemon's memory under load (target: under 50 MB).
With TLS=1, nginx and apm terminate TLS (a certificate made with openssl for
the run) and wrk speaks HTTPS to them. Needs wrk, nginx and openssl
(`apt-get install wrk nginx openssl`; the script installs them when run as
root).

Usage: cargo build --release --examples -p apm-runtime && cargo build --release && [TLS=1] python3 bench/proxy.py
(APM_BIN=path measures another apm binary.)
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from common import apm_env, free_port, nginx_conf, tear_down, wait_port


def ensure(tool, package):
    if shutil.which(tool):
        return
    if os.geteuid() != 0:
        raise SystemExit(f"{tool} is missing: apt-get install {package}")
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, stdout=subprocess.DEVNULL)


def wrk(port, scheme, pids, duration="10s"):
    """req/s, p50 and p99 in ms, the CPU time the processes `pids` (proxy
    and app) spent per request, in µs, the requests that failed (socket
    errors and timeouts, answers other than 2xx/3xx), and the CPU time wrk
    itself spent per request, in µs (on a shared machine, what a slower
    server costs its client: waiting, it sleeps and is woken more often)."""
    before = cpu_ticks(pids)
    load = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{duration}", "--latency", f"{scheme}://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    out = load.stdout.read()
    # Reaped here, not by communicate(), for its resource usage.
    _, status, usage = os.wait4(load.pid, 0)
    load.returncode = os.waitstatus_to_exitcode(status)
    if status != 0:
        raise subprocess.CalledProcessError(status, load.args, out)
    ticks = cpu_ticks(pids) - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))

    def latency(pct):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    client = (usage.ru_utime + usage.ru_stime) * 1e6 / requests
    return rps, latency(50), latency(99), ticks * 1e6 / os.sysconf("SC_CLK_TCK") / requests, errors, client


def cpu_ticks(pids):
    """CPU time (user + system, in clock ticks) used so far by the
    processes `pids`, all their threads."""
    total = 0
    for pid in pids:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass  # a thread that ended in between
    return total


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def apm_pids(apm, env, worker):
    """The daemon's pid and those of `worker`'s instances."""
    listing = json.loads(subprocess.run([apm, "ls", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    instances = [i["pid"] for w in listing["workers"] if w["name"] == worker for i in w["instances"]]
    return listing["daemon"]["pid"], instances


def make_certificate(root, name="site", usage="serverAuth", subject="/CN=127.0.0.1"):
    """A certificate signed by the run's CA (made on first use, in ca.pem),
    with the extensions strict RFC 5280 validators (sslyze) require."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)
    if not os.path.exists(os.path.join(root, "ca.pem")):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=apm bench CA", "-set_serial", "1",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    with open(os.path.join(root, f"{name}.cnf"), "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
                "subjectAltName=IP:127.0.0.1\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", str(2 + len(os.listdir(root))), "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.cnf")
    return os.path.join(root, f"{name}.pem"), os.path.join(root, f"{name}.key")


VANGUARD_RULES = "rate_limit 1000000; ban_path {}; ban_ip {};".format(
    ", ".join(f"/blocked-{i}*" for i in range(100)),
    ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(1000)),
)


NODE_CONNECTOR_APP = """
const ApmModule = require(%s);
new ApmModule((session) => {
    session.write('Hello World', { 'content-type': 'text/plain', 'x-instance': String(session.instance_id) });
    session.close();
});
"""

NODE_HTTP_APP = """
require('http').createServer((request, response) => {
    response.writeHead(200, { 'content-type': 'text/plain' });
    response.end('Hello World');
}).listen(Number(process.env.PORT), '127.0.0.1');
"""


def wait_instances(port, count, deadline=10):
    """Until requests reach `count` instances (each has said `ready`)."""
    import http.client
    end, seen = time.time() + deadline, set()
    while len(seen) < count:
        if time.time() > end:
            raise SystemExit(f"only instances {seen} answer on {port}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", "/")
        seen.add(connection.getresponse().getheader("x-instance"))
        connection.close()


def node_targets(apm, env, root):
    """Starts the Node connector app under apm and the plain-http app under
    PM2; returns their ports and PM2, to stop at the end."""
    from daemon import Pm2

    connector_app, http_app = os.path.join(root, "hello_connector.js"), os.path.join(root, "hello_http.js")
    with open(connector_app, "w") as f:
        f.write(NODE_CONNECTOR_APP % json.dumps(os.path.abspath("connectors/apm_module.node.js")))
    with open(http_app, "w") as f:
        f.write(NODE_HTTP_APP)
    node_port, pm2_port = free_port(), free_port()
    conf = os.path.join(root, "node.conf")
    with open(conf, "w") as f:
        f.write(f"worker {{ name node; exec node; params {connector_app}; instances 2; server http://127.0.0.1:{node_port}; startup_grace 200; }}\n")
    subprocess.run([apm, "load", conf], env=env, check=True, capture_output=True)
    wait_port(node_port)
    wait_instances(node_port, 2)
    pm2 = Pm2(root)
    pm2.env["PORT"] = str(pm2_port)
    pm2("start", http_app, "-i", "2", "--name", "hello")
    wait_port(pm2_port)
    daemon, instances = apm_pids(apm, env, "node")
    # PM2's cluster master hands each connection to a worker: count it too.
    pm2_pids = [pm2.daemon_pid(), *children(pm2.daemon_pid())]
    return {"apm node": (node_port, "http", [daemon, *instances]), "pm2 -i 2": (pm2_port, "http", pm2_pids)}, pm2


def main():
    ensure("wrk", "wrk")
    ensure("nginx", "nginx")
    ensure("openssl", "openssl")
    tls = os.environ.get("TLS") == "1"
    scheme = "https" if tls else "http"
    hello = os.path.abspath("target/release/examples/hello")
    apm = os.path.abspath(os.environ.get("APM_BIN", "target/release/apm"))
    root = tempfile.mkdtemp(prefix="apm-bench-proxy-")
    procs = []
    pm2 = None
    env = apm_env(root, "proxy")
    try:
        backend = free_port()
        procs.append(subprocess.Popen([hello], env=dict(os.environ, PORT=str(backend))))
        wait_port(backend)

        cert, key = make_certificate(root) if tls else (None, None)
        nginx_port, nginx_xf_port = free_port(), free_port()

        def nginx_listen(port):
            return f"listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};" if tls else f"listen 127.0.0.1:{port};"

        proxy = 'proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";'
        # What apm adds to a forwarded request, for a comparison of equal work.
        forwarded = "proxy_set_header Host $http_host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;"
        conf = nginx_conf(root, backend, [
            f"{nginx_listen(nginx_port)} location / {{ {proxy} }}",
            f"{nginx_listen(nginx_xf_port)} location / {{ {proxy} {forwarded} }}",
        ])
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"]))
        wait_port(nginx_port)
        wait_port(nginx_xf_port)

        # The least a hyper proxy does (runtime/examples/floor.rs): what apm's
        # own work per request is measured against.
        floor_port = free_port()
        procs.append(subprocess.Popen([os.path.abspath("target/release/examples/floor")], env=dict(os.environ, PORT=str(floor_port), UPSTREAM=str(backend))))
        wait_port(floor_port)

        apm_port, guarded_port = free_port(), free_port()
        tls_keys = f"tls on; tls_cert {cert}; tls_key {key};" if tls else ""
        workers = "".join(
            f"worker {{ name {name}; exec {hello}; upstream port; server {scheme}://127.0.0.1:{port}; startup_grace 200; {tls_keys} {extra} }}\n"
            for name, port, extra in [("hello", apm_port, ""), ("guarded", guarded_port, f"vanguard {{ {VANGUARD_RULES} }}")]
        )
        apm_conf = os.path.join(root, "apm.conf")
        with open(apm_conf, "w") as f:
            f.write(workers)
        subprocess.run([apm, "load", apm_conf], env=env, check=True, capture_output=True)
        wait_port(apm_port)
        wait_port(guarded_port)

        # Each setup with the processes that serve it (proxy and app), whose
        # CPU per request is measured: a steadier figure than req/s here.
        backend_pid = procs[0].pid
        apm_daemon, (hello_pid,) = apm_pids(apm, env, "hello")
        targets = {
            "direct": (backend, "http", [backend_pid]),
            "nginx": (nginx_port, scheme, [*children(procs[1].pid), backend_pid]),
            "nginx+xf": (nginx_xf_port, scheme, [*children(procs[1].pid), backend_pid]),
            **({} if tls else {"hyper": (floor_port, "http", [procs[2].pid, backend_pid])}),
            "apm": (apm_port, scheme, [apm_daemon, hello_pid]),
            "apm+vg": (guarded_port, scheme, [apm_daemon, *apm_pids(apm, env, "guarded")[1]]),
        }
        if not tls and os.environ.get("SKIP_PM2") != "1":
            node, pm2 = node_targets(apm, env, root)
            targets.update(node)
        # The setups take turns, ROUNDS times, and each row is the median
        # of its runs: a shared 2-core machine drifts by more than the
        # differences measured here, and turns spread the drift evenly.
        rounds = int(os.environ.get("ROUNDS", "3"))
        runs = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (port, target_scheme, pids) in targets.items():
                runs[name].append(wrk(port, target_scheme, pids))
        results = {name: tuple(statistics.median([run[i] for run in measured]) for i in range(4)) for name, measured in runs.items()}
        with open(f"/proc/{apm_daemon}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        print(f"medians of {rounds} interleaved runs of wrk -t2 -c64 -d10s")
        print("CPU: what the proxy and the app processes spent per request, in µs")
        print(f"{'setup':<9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU':>6}   req/s of each run")
        for name, (rps, p50, p99, cpu) in results.items():
            print(f"{name:<9} {rps:>10.0f} {p50:>8.2f} {p99:>8.2f} {cpu:>6.1f}   " + " ".join(f"{run[0]:.0f}" for run in runs[name]))
        apm_rps, _, apm_p99, _ = results["apm"]
        for nginx in ["nginx", "nginx+xf"]:
            nginx_rps, _, nginx_p99, _ = results[nginx]
            print(f"{'with TLS: ' if tls else ''}apm / {nginx} req/s: {apm_rps / nginx_rps:.2f} (target >= 1.0); p99 {apm_p99:.2f} vs {nginx_p99:.2f} ms (target: no worse)")
        print(f"apm with / without Vanguard (100 paths, 1,000 CIDRs, rate limit not hit) req/s: {results['apm+vg'][0] / apm_rps:.2f} (target >= 0.95)")
        print(f"apm daemon peak memory under load: {rss:.1f} MB (target < 50 MB)")
        if "pm2 -i 2" in results:
            print(f"apm Node connector (2 instances) / PM2 cluster mode (-i 2) req/s: {results['apm node'][0] / results['pm2 -i 2'][0]:.2f} (target >= 1.0)")
    finally:
        tear_down(apm, env, procs, root, pm2)


if __name__ == "__main__":
    main()
