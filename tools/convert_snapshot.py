#!/usr/bin/env python3
"""Runs `apm convert` then `apm check` over every ecosystem/process file of a
PM2 checkout and tabulates what happens: a development aid for `apm convert`
fidelity against files nobody here wrote. Nothing of PM2 is kept: the files
are read from the checkout given on the command line, outputs go to a
temporary directory.

Usage: python3 tools/convert_snapshot.py PM2_CHECKOUT [--apm target/debug/apm] [-v]

A file counts as an ecosystem when it mentions `script` (every PM2 app has
one, or `cmd`/`exec`); the others (app scripts, `pm2 serve` configs, data)
must be refused with a message saying what was expected.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

DIRS = ["test/fixtures", "examples", "lib/templates"]
EXTENSIONS = (".js", ".cjs", ".mjs", ".json", ".yml", ".yaml")
APP_KEY = re.compile(r"""["']?\b(script|cmd|exec)\b["']?\s*:""")


def candidates(root):
    for top in DIRS:
        for base, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if d != "node_modules")
            for name in sorted(files):
                if name.endswith(EXTENSIONS) and name != "package.json":
                    yield os.path.join(base, name)


def first_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[0][:160] if lines else ""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout")
    parser.add_argument("--apm", default="target/debug/apm")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    table = collections.Counter()
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for index, path in enumerate(candidates(args.checkout)):
            with open(path, encoding="utf-8", errors="replace") as f:
                ecosystem = bool(APP_KEY.search(f.read()))
            out = os.path.join(out_dir, f"{index}.conf")
            # The file's own directory, as a user would run it.
            converted = subprocess.run(
                [apm, "convert", "--timeout=5s", path, out],
                capture_output=True, text=True, cwd=os.path.dirname(path),
            )
            if converted.returncode != 0:
                outcome, detail = "convert failed", first_line(
                    converted.stderr.replace("apm: cannot convert", ""))
            else:
                checked = subprocess.run(
                    [apm, "check", out], capture_output=True, text=True)
                if checked.returncode != 0:
                    outcome, detail = "check failed", first_line(
                        checked.stdout + checked.stderr)
                else:
                    outcome, detail = "ok", ""
            kind = "ecosystem" if ecosystem else "other"
            table[(kind, outcome)] += 1
            rows.append((kind, outcome, os.path.relpath(path, args.checkout), detail))
    for kind, outcome, path, detail in rows:
        if args.verbose or (kind, outcome) != ("ecosystem", "ok"):
            print(f"{kind:9} {outcome:14} {path}\n{'':25}{detail}" if detail
                  else f"{kind:9} {outcome:14} {path}")
    print()
    for kind in ("ecosystem", "other"):
        total = sum(n for (k, _), n in table.items() if k == kind)
        parts = ", ".join(f"{o}: {n}" for (k, o), n in sorted(table.items()) if k == kind)
        print(f"{kind}: {total} files ({parts})")
    failed = sum(n for (k, o), n in table.items() if k == "ecosystem" and o != "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
