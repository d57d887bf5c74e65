#!/usr/bin/env python3
"""Benchmark of IPC between workers through the apm daemon, with its
anchors measured in the same run on the same machine:

  - request/reply round trip, a Node worker asking a Python worker
    through the daemon, p50/p99          (target: at or below Redis's)
  - `send` messages per second from a Node worker to a Node listener
                                         (target: >= 100,000/s)
  - anchor: Node's own `process.send` round trip between a parent and a
    child (what PM2 users have)
  - anchor: request/reply over Redis pub/sub (`redis-server` from Debian,
    RESP spoken over raw sockets), requester and responder in two
    processes

Usage: cargo build --release && python3 bench/ipc.py [--apm target/release/apm] [--n 2000] [--sends 200000]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import apm_env, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_CONNECTOR = os.path.join(ROOT, "connectors", "apm_module.node.js")
PY_CONNECTORS = os.path.join(ROOT, "connectors")

# The Node worker that measures: on `ctl.bench` it runs round trips to the
# Python responder, or floods the sink with sends.
DRIVER = """
const ApmModule = require(%(connector)s);
const apm = new ApmModule();
function quantiles(ms) {
  ms.sort((a, b) => a - b);
  return { p50: ms[Math.floor(ms.length * 0.5)], p99: ms[Math.floor(ms.length * 0.99)] };
}
apm.onChannel = async (channel, data, reply) => {
  if (data.op === 'rtt') {
    const ms = [];
    for (let i = 0; i < data.n; i++) {
      const t = process.hrtime.bigint();
      const got = await apm.request('bench.py', i, 5000);
      if (got !== i) throw new Error('a wrong reply: ' + got);
      ms.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    return quantiles(ms);
  }
  const payload = 'x'.repeat(data.size);
  for (let sent = 0; sent < data.n; sent += 2000) {
    for (let i = sent; i < Math.min(data.n, sent + 2000); i++) apm.send('bench.sink', payload);
    await new Promise((resolve) => setImmediate(resolve));
  }
  return 'sent';
};
"""

# The Node listener that counts what reaches it, and when.
SINK = """
const ApmModule = require(%(connector)s);
const apm = new ApmModule();
let count = 0, first = 0n, last = 0n;
apm.onChannel = (channel, data, reply) => {
  if (channel === 'bench.sink') {
    last = process.hrtime.bigint();
    if (count++ === 0) first = last;
    return undefined;
  }
  const seconds = Number(last - first) / 1e9;
  const answer = { count: count, seconds: seconds };
  count = 0;
  return answer;
};
"""

RESPONDER = """
import sys
sys.path.insert(0, %(connectors)r)
from apm_module import ApmModule
apm = ApmModule()
apm.on_channel = lambda channel, data, reply: reply(data)
apm.run()
"""

NODE_PARENT = """
const { fork } = require('child_process');
const n = Number(process.argv[2]);
if (process.argv[3] === 'child') {
  process.on('message', (m) => process.send(m));
} else {
  const child = fork(__filename, [String(n), 'child']);
  const ms = [];
  let i = 0, t = 0n;
  const next = () => { t = process.hrtime.bigint(); child.send(i); };
  child.on('message', (m) => {
    ms.push(Number(process.hrtime.bigint() - t) / 1e6);
    if (++i < n) return next();
    ms.sort((a, b) => a - b);
    console.log(JSON.stringify({ p50: ms[Math.floor(n * 0.5)], p99: ms[Math.floor(n * 0.99)] }));
    child.kill();
  });
  next();
}
"""

def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def read_reply(f):
    line = f.readline()
    if line[:1] == b"*":
        return [read_reply(f) for _ in range(int(line[1:]))]
    if line[:1] == b"$":
        return f.read(int(line[1:]) + 2)[:-2]
    return line


def subscribed(port, channel):
    """A subscriber on `channel` and a publisher: their replies' streams."""
    sub = socket.create_connection(("127.0.0.1", port))
    pub = socket.create_connection(("127.0.0.1", port))
    sub.sendall(resp("SUBSCRIBE", channel))
    f = sub.makefile("rb")
    read_reply(f)
    return f, pub, pub.makefile("rb")


def redis_responder(port):
    """The responder's side, in a process of its own: answers each message
    on `req` by publishing it on `rep`."""
    f, pub, pf = subscribed(port, "req")
    print("ready", flush=True)
    while True:
        message = read_reply(f)
        pub.sendall(resp("PUBLISH", "rep", message[2]))
        read_reply(pf)


def quantiles(ms):
    ms.sort()
    return {"p50": ms[len(ms) // 2], "p99": ms[int(len(ms) * 0.99)]}


def redis_round_trip(n):
    server = shutil.which("redis-server")
    if server is None:
        return None
    port = free_port()
    redis = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        responder = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--redis-responder", str(port)],
                                     stdout=subprocess.PIPE)
        responder.stdout.readline()
        f, pub, pf = subscribed(port, "rep")
        ms = []
        for i in range(n):
            t = time.perf_counter()
            pub.sendall(resp("PUBLISH", "req", json.dumps(i)))
            read_reply(pf)
            message = read_reply(f)
            if json.loads(message[2]) != i:
                raise RuntimeError("a wrong reply from Redis")
            ms.append((time.perf_counter() - t) * 1000)
        responder.kill()
        return quantiles(ms)
    finally:
        redis.kill()
        redis.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default=os.path.join(ROOT, "target", "release", "apm"))
    parser.add_argument("--n", type=int, default=2000, help="round trips per measure")
    parser.add_argument("--sends", type=int, default=200000)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="apm-bench-ipc-")
    env = apm_env(root, "ipc")
    apm = lambda *a, **kw: subprocess.run([args.apm, *a], env=env, capture_output=True, text=True, **kw)
    files = {
        "driver.js": DRIVER % {"connector": json.dumps(NODE_CONNECTOR)},
        "sink.js": SINK % {"connector": json.dumps(NODE_CONNECTOR)},
        "responder.py": RESPONDER % {"connectors": PY_CONNECTORS},
        "parent.js": NODE_PARENT,
    }
    for name, text in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    config = os.path.join(root, "apm.conf")
    with open(config, "w") as f:
        f.write(f"worker {{ name driver; exec node; params {root}/driver.js; listen ctl.bench; }}\n"
                f"worker {{ name sink; exec node; params {root}/sink.js; listen bench.sink, ctl.sink; }}\n"
                f"worker {{ name responder; exec python3; params {root}/responder.py; listen bench.py; }}\n")
    try:
        loaded = apm("load", config)
        if loaded.returncode != 0:
            sys.exit(loaded.stderr)

        def ask(channel, data):
            deadline = time.time() + 10
            while True:
                out = apm("request", channel, json.dumps(data), "--timeout", "120s")
                if out.returncode == 0:
                    return json.loads(out.stdout)
                if time.time() > deadline:
                    sys.exit(f"{channel}: {out.stderr}")
                time.sleep(0.05)

        ask("ctl.bench", {"op": "rtt", "n": 100})  # warm-up
        through_apm = ask("ctl.bench", {"op": "rtt", "n": args.n})
        ask("ctl.sink", "reset")
        ask("ctl.bench", {"op": "send", "n": args.sends, "size": 64})
        time.sleep(0.5)  # the sink reads what is still on its way
        sink = ask("ctl.sink", "count")
        dropped = sum(i["ipc_dropped"] for i in json.loads(apm("info", "sink", "--json").stdout)["status"]["instances"])
    finally:
        apm("exit", "daemon")
    node = json.loads(subprocess.run(["node", os.path.join(root, "parent.js"), str(args.n)],
                                     capture_output=True, text=True, check=True).stdout)
    redis = redis_round_trip(args.n)
    shutil.rmtree(root, ignore_errors=True)

    rate = sink["count"] / sink["seconds"] if sink["seconds"] else float("nan")
    print(f"round trip, {args.n} requests one after another (ms):")
    print(f"  apm, Node -> daemon -> Python -> daemon -> Node   p50 {through_apm['p50']:.3f}  p99 {through_apm['p99']:.3f}")
    print(f"  Node process.send, parent <-> child             p50 {node['p50']:.3f}  p99 {node['p99']:.3f}")
    if redis:
        print(f"  Redis pub/sub request/reply (Python, RESP)      p50 {redis['p50']:.3f}  p99 {redis['p99']:.3f}")
        verdict = "met" if through_apm["p50"] <= redis["p50"] else "MISSED"
        print(f"  target p50 <= Redis's: {verdict}")
    else:
        print("  Redis: skipped (redis-server is not installed: apt-get install redis-server)")
    print(f"send, {args.sends} messages of 64 bytes, Node -> daemon -> Node:")
    print(f"  {sink['count']} received in {sink['seconds']:.3f} s: {rate:,.0f} messages/s, {dropped} dropped")
    print(f"  target >= 100,000/s: {'met' if rate >= 100000 else 'MISSED'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--redis-responder"]:
        redis_responder(int(sys.argv[2]))
    else:
        main()
