"""What the benchmark scripts share: timing a command, ports, and an apm
daemon environment of their own."""

import os
import shutil
import socket
import statistics
import subprocess
import time


def median_time(argv, env=None, repeat=11):
    """The median wall time (s) of running `argv` to its end, `repeat` times."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def apm_env(root, name):
    """The environment of a daemon of the benchmark's own: its home under
    `root`, a socket no other run uses, no colours in its output."""
    return dict(os.environ, APM_HOME=os.path.join(root, "home"), APM_SOCKET=f"apm-bench-{name}-{os.getpid()}", NO_COLOR="1")


def daemon_in_foreground(apm, env, deadline=10):
    """Starts the daemon of `env` in the foreground, in this script's
    session, and waits until it answers on its control socket; `apm load`
    then uses it. Benchmarks that compare apm's proxy with servers run in
    the foreground here (nginx `daemon off`, hyper's floor) start it so
    (`proxy.py` does not: it also compares with PM2, whose daemon detaches
    as apm's does by default): with the kernel's autogroups
    (`/proc/sys/kernel/sched_autogroup_enabled`), a daemon that detaches
    into a session of its own is scheduled as a group apart from wrk, and
    every wake-up between the two crosses groups (measured with `scale.py`:
    0.87 of nginx's req/s so, 0.95 in one session). Its instances are in
    its session either way, as a foreground server's backend is here."""
    daemon = subprocess.Popen([apm, "daemon", "--foreground"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not accepts(socket.AF_UNIX, "\0" + env["APM_SOCKET"], deadline):
        raise RuntimeError(f"apm daemon --foreground did not answer (exit status {daemon.poll()})")
    return daemon


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(family, address, deadline=10):
    """Whether something accepts connections on `address` (of socket
    `family`) within `deadline` seconds."""
    end = time.time() + deadline
    while time.time() < end:
        with socket.socket(family) as probe:
            probe.settimeout(0.2)
            try:
                probe.connect(address)
                return True
            except OSError:
                time.sleep(0.02)
    return False


def wait_port(port, deadline=10):
    if not accepts(socket.AF_INET, ("127.0.0.1", port), deadline):
        raise SystemExit(f"nothing listens on {port}")


def nginx_conf(root, backend, servers, workers=1, connections=1024):
    """Writes the run's nginx.conf (in `root`): `workers` worker processes
    of `connections` connections each, a keep-alive pool to the loopback
    port `backend`, and a server block around each of `servers`; returns
    its path."""
    path = os.path.join(root, "nginx.conf")
    blocks = "\n".join(f"    server {{ {server} }}" for server in servers)
    with open(path, "w") as f:
        f.write(f"""worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
worker_rlimit_nofile {connections + 100};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
{blocks}
}}
""")
    return path


def tear_down(apm, env, procs, root, pm2=None):
    """Ends what a benchmark started: PM2, the apm daemon, the processes
    `procs`, and the run's directory."""
    if pm2 is not None:
        pm2.stop()
    subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True)
    for p in procs:
        p.terminate()
    shutil.rmtree(root, ignore_errors=True)


def print_rows(rows):
    """Prints (measure, apm, pm2, pm2/apm, target, met) rows as aligned
    columns under a header."""
    header = ("measure", "apm", "pm2", "pm2/apm", "target")
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(5)]
    line = "{:<%d} {:>%d} {:>%d} {:>%d}  {:<%d} {}" % tuple(widths)
    print(line.format(*header, "met"))
    for name, a, p, r, target, met in rows:
        print(line.format(name, a, p, r, target, "yes" if met else "NO"))
