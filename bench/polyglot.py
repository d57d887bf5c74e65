#!/usr/bin/env python3
"""Benchmark of the PHP, Perl and Lua connectors, with wrk on loopback
(`wrk -t2 -c64 --latency`, DURATION each, default 10s) against, in one run:
  - a PHP hello-world under apm's PHP connector, 2 instances ("apm php"),
  - the same page served the way PHP users deploy it today: nginx (1 worker)
    with php-fpm (pm static, 2 children, opcache as Debian ships it),
    FastCGI over a unix socket ("nginx+fpm"),
  - a Perl hello-world under apm's Perl connector, 2 instances ("apm perl"),
  - the same as a PSGI app under Starman with 2 workers ("starman"),
  - a Lua hello-world under apm's Lua connector (lua5.4), 2 instances ("apm lua").
Each setup is measured ROUNDS times (default 3), the setups taking turns;
prints the medians of req/s, p50, p99 and the CPU time the serving processes
(daemon or web server, and the app's processes) spent per request, and the
ratios apm php / nginx+fpm and apm perl / starman (targets: req/s >= 1.0,
with a p99 no worse). The `failed` column counts timeouts, socket errors and
non-2xx answers: a preforking server such as Starman serves one keep-alive
connection per worker, and wrk counts no latency for the connections that
wait, so its p99 describes only the connections it served.
Needs wrk, nginx, php-cli, php-fpm, perl with JSON::XS, starman, lua5.4,
lua-cjson and lua-luv (`apt-get install wrk nginx-light php-cli php-fpm
libjson-xs-perl starman lua5.4 lua-cjson lua-luv`; the script installs them
when run as root).

Usage: cargo build --release && [ROUNDS=3] [DURATION=10s] python3 bench/polyglot.py
(APM_BIN=path measures another apm binary.)
"""

import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile

from common import apm_env, daemon_in_foreground, free_port, wait_port
from proxy import apm_pids, children, ensure, wait_instances, wrk

PHP_APP = """<?php
require_once %s;
$apm = new ApmModule(function (ApmSession $s) {
    $s->write('Hello World', ['x-status' => '200', 'content-type' => 'text/plain', 'x-instance' => $s->instance_id]);
    $s->close();
});
$apm->run();
"""

FPM_PAGE = """<?php
header('Content-Type: text/plain');
echo 'Hello World';
"""

PERL_APP = """use lib %s;
use ApmModule;
ApmModule->new(sub {
    my ($s) = @_;
    $s->write('Hello World', { 'x-status' => '200', 'content-type' => 'text/plain', 'x-instance' => $s->{instance_id} });
    $s->close;
})->run;
"""

PSGI_APP = """sub { [200, ['Content-Type' => 'text/plain'], ['Hello World']] };
"""

LUA_APP = """package.path = %s .. '/?.lua;' .. package.path
local ApmModule = require('apm_module')
ApmModule.new(function(s)
  s:write('Hello World', { ['x-status'] = '200', ['content-type'] = 'text/plain', ['x-instance'] = s.instance_id })
  s:close()
end):run()
"""


def php_fpm():
    """The php-fpm binary Debian installs (php-fpm8.2 on bookworm)."""
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    if not found:
        raise SystemExit("php-fpm is missing: apt-get install php-fpm")
    return found[-1]


def write(root, name, text):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def main():
    for tool, package in [("wrk", "wrk"), ("nginx", "nginx-light"), ("php", "php-cli"), ("starman", "starman"), ("lua5.4", "lua5.4")]:
        ensure(tool, package)
    if not glob.glob("/usr/sbin/php-fpm*"):
        ensure("php-fpm", "php-fpm")
    for check, package in [(["perl", "-MJSON::XS", "-e", "1"], "libjson-xs-perl"), (["lua5.4", "-e", "require('cjson') require('luv')"], "lua-cjson lua-luv")]:
        if subprocess.run(check, capture_output=True).returncode != 0:
            if os.geteuid() != 0:
                raise SystemExit(f"apt-get install {package}")
            subprocess.run(["apt-get", "install", "-y", "-qq", *package.split()], check=True, stdout=subprocess.DEVNULL)
    apm = os.path.abspath(os.environ.get("APM_BIN", "target/release/apm"))
    duration = os.environ.get("DURATION", "10s")
    rounds = int(os.environ.get("ROUNDS", "3"))
    connectors = os.path.abspath("connectors")
    root = tempfile.mkdtemp(prefix="apm-bench-polyglot-")
    procs = []
    env = apm_env(root, "polyglot")
    try:
        php_app = write(root, "hello.php", PHP_APP % json.dumps(os.path.join(connectors, "apm_module.php")))
        perl_app = write(root, "hello.pl", PERL_APP % json.dumps(connectors))
        lua_app = write(root, "hello.lua", LUA_APP % json.dumps(connectors))
        ports = {name: free_port() for name in ["php", "perl", "lua", "fpm", "starman"]}
        apm_conf = write(root, "apm.conf", "".join(
            f"worker {{ name {name}; exec {exec}; params {app}; instances 2; server http://127.0.0.1:{ports[name]}; startup_grace 200; }}\n"
            for name, exec, app in [("php", "php", php_app), ("perl", "perl", perl_app), ("lua", "lua5.4", lua_app)]))
        daemon_in_foreground(apm, env)
        subprocess.run([apm, "load", apm_conf], env=env, check=True, capture_output=True)
        for name in ["php", "perl", "lua"]:
            wait_port(ports[name])
            wait_instances(ports[name], 2)

        # nginx + php-fpm as a PHP site runs today: a static pool of 2
        # children behind FastCGI on a unix socket, which nginx's workers
        # (www-data when started as root) reach through the run's directory.
        os.chmod(root, 0o711)
        page = write(root, "index.php", FPM_PAGE)
        fpm_conf = write(root, "php-fpm.conf", f"""[global]
pid = {root}/php-fpm.pid
error_log = {root}/php-fpm.log
daemonize = no
[www]
listen = {root}/php-fpm.sock
listen.mode = 0666
pm = static
pm.max_children = 2
""")
        procs.append(subprocess.Popen([php_fpm(), "--nodaemonize", "--allow-to-run-as-root", "--fpm-config", fpm_conf]))
        nginx_conf = write(root, "nginx.conf", f"""worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{ports['fpm']};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {page};
            fastcgi_pass unix:{root}/php-fpm.sock;
        }}
    }}
}}
""")
        procs.append(subprocess.Popen(["nginx", "-c", nginx_conf, "-g", "daemon off;"]))
        psgi = write(root, "hello.psgi", PSGI_APP)
        procs.append(subprocess.Popen(["starman", "--workers", "2", "--listen", f"127.0.0.1:{ports['starman']}", psgi],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name in ["fpm", "starman"]:
            wait_port(ports[name])

        # Each setup with the processes that serve it, whose CPU per
        # request is measured: a steadier figure than req/s here.
        fpm, nginx, starman = procs

        def apm_serving(worker):
            daemon, instances = apm_pids(apm, env, worker)
            return [daemon, *instances]

        targets = {
            "apm php": (ports["php"], apm_serving("php")),
            "nginx+fpm": (ports["fpm"], [*children(nginx.pid), fpm.pid, *children(fpm.pid)]),
            "apm perl": (ports["perl"], apm_serving("perl")),
            "starman": (ports["starman"], [starman.pid, *children(starman.pid)]),
            "apm lua": (ports["lua"], apm_serving("lua")),
        }
        # The setups take turns and each row is the median of its runs: a
        # shared 2-core machine drifts by more than the differences measured.
        runs = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (port, pids) in targets.items():
                runs[name].append(wrk(port, "http", pids, duration))
        results = {name: tuple(statistics.median([run[i] for run in measured]) for i in range(4)) for name, measured in runs.items()}
        print(f"medians of {rounds} interleaved runs of wrk -t2 -c64 -d{duration}")
        print("CPU: what the daemon or web server and the app's processes spent per request, in µs")
        print("failed: requests of all runs that got no answer in time or a non-2xx one (a server that serves")
        print("one keep-alive connection per worker, as Starman does, leaves the other connections waiting)")
        print(f"{'setup':<10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU':>6} {'failed':>7}   req/s of each run")
        for name, (rps, p50, p99, cpu) in results.items():
            failed = sum(run[4] for run in runs[name])
            print(f"{name:<10} {rps:>10.0f} {p50:>8.2f} {p99:>8.2f} {cpu:>6.1f} {failed:>7}   " + " ".join(f"{run[0]:.0f}" for run in runs[name]))
        for ours, theirs in [("apm php", "nginx+fpm"), ("apm perl", "starman")]:
            rps, _, p99, _ = results[ours]
            other_rps, _, other_p99, _ = results[theirs]
            print(f"{ours} / {theirs} req/s: {rps / other_rps:.2f} (target >= 1.0); p99 {p99:.2f} vs {other_p99:.2f} ms (target: no worse)")
        rps, _, _, cpu = results["apm lua"]
        print(f"apm lua (2 instances): {rps:.0f} req/s, {cpu:.1f} µs of CPU per request")
    finally:
        subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
