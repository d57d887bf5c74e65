#!/usr/bin/env python3
"""Autobahn fuzzing-client cases through apm's WebSocket proxy.

Runs the Autobahn TestSuite's fuzzing-client cases (with `kosoku`, a native
runner of Autobahn's case files, from PyPI) against a WebSocket echo server
(the `websockets` library, PyPI) twice: directly, then through an isolated apm
daemon whose worker runs the same echo server in `upstream port` mode behind a
`ws://` listener. apm splices WebSocket bytes, so every case must get the same
verdict (behavior and close behavior) through apm as directly. The echo
server's own verdicts (a few are FAILED or NON-STRICT) are not apm's and do
not matter. Then the cases run once more against a `ws://` listener in
connector mode, where apm itself speaks WebSocket and hands the messages to
the Python connector's echo app: every case must pass there (the
permessage-deflate cases, 12.* and 13.*, do not apply). Exit 0 when all of
that holds, else print the cases at fault and exit 1.

Both packages are installed, pinned, into a venv under target/ on first run
(what .ci/run does up front):
    python3 -m venv target/autobahn-venv
    target/autobahn-venv/bin/pip install -q kosoku==0.1.0 websockets==17.4

Usage: cargo build && python3 tests/autobahn.py [--apm target/debug/apm]
       [--quick] [-i CASE_GLOB]... [-x CASE_GLOB]... [-p PARALLELISM] [--json FILE]
The apm binary may also be given in $APM_BIN.
"""

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "autobahn-venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
PACKAGES = ["kosoku==0.1.0", "websockets==17.4"]


def ensure_venv():
    """Create the venv and install the pinned packages unless they already
    import (about 4 s the first time, 0.1 s after)."""
    probe = "import kosoku, websockets, sys; sys.exit(websockets.version.version != '17.4')"
    if os.path.exists(VENV_PYTHON) and subprocess.run([VENV_PYTHON, "-c", probe], capture_output=True).returncode == 0:
        return
    if not os.path.exists(VENV_PYTHON):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES], check=True)


def echo_server():
    """The backend: echo every message, on 127.0.0.1:$PORT."""
    # websockets fails messages of more than 4096 fragments (Autobahn 9.3/9.4
    # send up to 4 MiB in 64-byte fragments): lift that limit.
    os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(1 << 30))
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def echo(ws):
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass  # protocol errors the cases provoke: websockets closes as it should

    async def main():
        # No keepalive pings: an unsolicited ping ends the 12.x/13.x cases that
        # run past the ping interval, making the verdict depend on speed.
        async with serve(echo, "127.0.0.1", int(os.environ["PORT"]), max_size=None, compression="deflate", ping_interval=None) as server:
            await server.serve_forever()

    asyncio.run(main())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_websocket(port, deadline=30):
    """Until a WebSocket handshake on the port succeeds (through apm, the
    listener may be up before its instance is)."""
    from websockets.sync.client import connect
    end = time.time() + deadline
    while True:
        try:
            with connect(f"ws://127.0.0.1:{port}/", open_timeout=2) as ws:
                ws.send("ping")
                if ws.recv(timeout=2) == "ping":
                    return
        except Exception as error:  # noqa: BLE001 - any failure means not yet
            if time.time() > end:
                raise SystemExit(f"no WebSocket echo on port {port}: {error}")
            time.sleep(0.05)


# The bulk of the permessage-deflate cases (12.2-12.5, 13.2-13.7: the same
# 18 sizes over other data sets and parameters), left out by --quick.
QUICK_EXCLUDE = [f"12.{i}.*" for i in range(2, 6)] + [f"13.{i}.*" for i in range(2, 8)]

# Verdicts are compared on behavior and close behavior; a case whose verdict
# differs is run again (directly and through apm) up to RETRIES times, and
# differs only when no verdict seen through apm was also seen directly: a few
# cases hinge on how the echo server's reads happen to split the input (4.1.3:
# NON-STRICT when it fails the connection before echoing the message).
RETRIES = 2

# apm terminates WebSockets for connectors without permessage-deflate (it
# does not offer the extension), so the compression cases do not apply.
NO_DEFLATE = ["12.*", "13.*"]
CONNECTOR_APP = os.path.join(ROOT, "tests", "apps", "connector_echo.py")


def fuzz(port, include, exclude, parallelism):
    """Runs the cases against ws://127.0.0.1:port; returns ({case: Result},
    seconds)."""
    from kosoku import FailureError, run_fuzzingclient
    started = time.time()
    try:
        results = asyncio.run(run_fuzzingclient(f"ws://127.0.0.1:{port}", include, exclude, concurrency=parallelism))
    except FailureError as failure:  # some case did not pass: it carries every result
        results = failure.results
    return {r.case_id: r for r in results}, time.time() - started


def verdict(result):
    return f"{result.behavior.value}/{result.behavior_close.value}" if result else "missing"


# OK and NON-STRICT are both passes in Autobahn's terms, and which one a
# case gets can hinge on how the server's reads split the input: through a
# proxy, 4.1.5's text message and the invalid frame after it arrive in one
# read, so the server fails the connection before it echoes the text
# (NON-STRICT) where directly it echoes first (OK). Passes are compared as
# passes; every other verdict must be the same.
PASSES = {"OK", "NON-STRICT"}


def outcome(result):
    if not result:
        return "missing"
    parts = [v.value for v in (result.behavior, result.behavior_close)]
    return "/".join("pass" if p in PASSES else p for p in parts)


def case_key(case):
    return tuple(int(part) if part.isdigit() else 0 for part in case.split("."))


def summary(name, results, seconds):
    counts = collections.Counter(verdict(r) for r in results.values())
    slowest = sorted(results.values(), key=lambda r: -r.duration)[:3]
    print(f"{name}: {len(results)} cases in {seconds:.1f}s: " + ", ".join(f"{n} {v}" for v, n in counts.most_common())
          + "; slowest " + ", ".join(f"{r.case_id} {r.duration / 1000:.1f}s" for r in slowest))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apm", default=os.environ.get("APM_BIN", os.path.join(ROOT, "target", "debug", "apm")))
    parser.add_argument("-i", "--include", action="append", metavar="CASE", help="case id or glob, e.g. 9.* (default: all)")
    parser.add_argument("-x", "--exclude", action="append", metavar="CASE", help="case id or glob to leave out")
    parser.add_argument("--quick", action="store_true", help="leave out the bulk of the compression cases: " + " ".join(QUICK_EXCLUDE))
    parser.add_argument("-p", "--parallelism", type=int, default=2, help="cases run at once")
    parser.add_argument("--json", metavar="FILE", help="write both runs' verdicts and case durations (ms) to FILE")
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
        ensure_venv()
        os.execv(VENV_PYTHON, [VENV_PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
    if args.echo:
        return echo_server()

    apm = os.path.abspath(args.apm)
    if not os.access(apm, os.X_OK):
        raise SystemExit(f"no apm binary at {apm} (cargo build, or --apm / APM_BIN)")
    exclude = (args.exclude or []) + (QUICK_EXCLUDE if args.quick else [])
    root = tempfile.mkdtemp(prefix="apm-autobahn-")
    env = dict(os.environ, APM_HOME=os.path.join(root, "home"), APM_SOCKET=f"apm-autobahn-{os.getpid()}", NO_COLOR="1")
    echo_command = [VENV_PYTHON, os.path.abspath(__file__), "--echo"]
    direct_server = None
    try:
        port = free_port()
        direct_server = subprocess.Popen(echo_command, env=dict(os.environ, PORT=str(port)), stderr=subprocess.DEVNULL, start_new_session=True)
        wait_websocket(port)
        direct, direct_seconds = fuzz(port, args.include, exclude, args.parallelism)
        summary("direct", direct, direct_seconds)

        listen, terminated = free_port(), free_port()
        conf = os.path.join(root, "autobahn.conf")
        with open(conf, "w") as f:
            f.write(f"worker {{ name echo; exec {VENV_PYTHON}; params {echo_command[1]} --echo; upstream port; server ws://127.0.0.1:{listen}; }}\n"
                    f"worker {{ name connector; exec python3; params {CONNECTOR_APP}; server ws://127.0.0.1:{terminated}; }}\n")
        loaded = subprocess.run([apm, "load", conf], env=env, capture_output=True, text=True)
        if loaded.returncode != 0:
            raise SystemExit(f"apm load failed:\n{loaded.stdout}{loaded.stderr}")
        wait_websocket(listen)
        proxied, proxied_seconds = fuzz(listen, args.include, exclude, args.parallelism)
        summary("through apm", proxied, proxied_seconds)
        if not direct:
            raise SystemExit("autobahn: no case ran")

        seen = {case: ({outcome(direct.get(case))}, {outcome(proxied.get(case))}) for case in set(direct) | set(proxied)}
        differing = sorted((case for case, (d, a) in seen.items() if not d & a), key=case_key)
        for attempt in range(RETRIES):
            if not differing:
                break
            print(f"running again: {' '.join(differing)}")
            again_direct, _ = fuzz(port, differing, None, 1)
            again_proxied, _ = fuzz(listen, differing, None, 1)
            for case in differing:
                seen[case][0].add(outcome(again_direct.get(case)))
                seen[case][1].add(outcome(again_proxied.get(case)))
                proxied[case] = again_proxied.get(case) or proxied.get(case)
            differing = [case for case in differing if not seen[case][0] & seen[case][1]]

        if args.json:
            with open(args.json, "w") as f:
                json.dump({name: {case: [verdict(r), r.duration] for case, r in results.items()} for name, results in [("direct", direct), ("apm", proxied)]},
                          f, indent=1, sort_keys=True)
        for case in differing:
            r = proxied.get(case)
            print(f"  {case}: direct {' or '.join(sorted(seen[case][0]))}, through apm {' or '.join(sorted(seen[case][1]))}"
                  + (f" ({r.result} {r.result_close})" if r else ""))
        print(f"autobahn: {len(seen) - len(differing)} passed, {len(differing)} failed (same verdict through apm as direct)")

        # Connector mode: apm itself speaks WebSocket with the client.
        wait_websocket(terminated)
        connector, connector_seconds = fuzz(terminated, args.include, exclude + NO_DEFLATE, args.parallelism)
        summary("apm terminating, Python connector", connector, connector_seconds)
        failing = sorted((c for c, r in connector.items() if any(v.value not in PASSES | {"INFORMATIONAL"} for v in (r.behavior, r.behavior_close))), key=case_key)
        for case in failing:
            r = connector[case]
            print(f"  {case}: {verdict(r)} ({r.result} {r.result_close})")
        print(f"autobahn, connector mode: {len(connector) - len(failing)} passed, {len(failing)} failed")
        sys.exit(1 if differing or failing or not connector else 0)
    finally:
        if direct_server is not None:
            os.killpg(direct_server.pid, signal.SIGKILL)
            direct_server.wait()
        if os.path.exists(os.path.join(env["APM_HOME"], "apm.pid")):  # the daemon started
            subprocess.run([apm, "exit", "daemon"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
