#!/usr/bin/env python3
"""Benchmark of `apm convert`: a 100-app ecosystem file converted with the
embedded engine, whole process (target: under 50 ms, release). The
reference measured in the same run is `node` loading the same file and
printing its JSON, which is the least PM2 itself does (its CLI takes
~200 ms more to start).

Usage: cargo build --release && python3 bench/convert.py [--apm target/release/apm]
"""

import argparse
import contextlib
import os
import shutil
import tempfile

from common import median_time


def ecosystem(apps):
    entries = ",\n".join(
        f"""    {{
      name: 'app-{i}',
      script: './services/app-{i}.js',
      instances: {1 + i % 4},
      exec_mode: '{'cluster' if i % 2 else 'fork'}',
      env: {{ NODE_ENV: 'development', PORT: {3000 + i}, SHARD: '{i}' }},
      env_production: {{ NODE_ENV: 'production' }},
      max_memory_restart: '300M',
      autorestart: true,
      max_restarts: 10,
      min_uptime: '5s',
      watch: {'true' if i % 5 == 0 else 'false'},
      out_file: path.join(__dirname, 'logs', 'app-{i}.out.log'),
    }}"""
        for i in range(apps)
    )
    return f"const path = require('path');\nmodule.exports = {{\n  apps: [\n{entries}\n  ]\n}};\n"


@contextlib.contextmanager
def ecosystem_file(apps):
    """A temporary ecosystem file of `apps` apps, removed afterwards."""
    root = tempfile.mkdtemp(prefix="apm-bench-convert-")
    try:
        path = os.path.join(root, "ecosystem.config.js")
        with open(path, "w") as f:
            f.write(ecosystem(apps))
        yield path
    finally:
        shutil.rmtree(root, ignore_errors=True)


def time_convert(apm, path):
    """Times `apm convert` of the file and prints the figure against its target."""
    converted = median_time([apm, "convert", path])
    print(f"apm convert, 100 apps: {converted * 1000:.1f} ms (target < 50 ms: {'met' if converted < 0.050 else 'MISSED'})")
    return converted


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    with ecosystem_file(100) as path:
        converted = time_convert(apm, path)
        if shutil.which("node"):
            node = median_time(["node", "-e", f"process.stdout.write(JSON.stringify(require({path!r})))"])
            print(f"reference, node loading the same file: {node * 1000:.1f} ms; apm / node = {converted / node:.2f}")


if __name__ == "__main__":
    main()
