#!/usr/bin/env python3
"""The shipped binary: its size (target: at most 12 MB, stripped), the
newest glibc symbol version it needs (its glibc baseline), and `apm
convert`'s time for a 100-app ecosystem file beside it (target: under
50 ms), since the size comes from building the JavaScript engine small.

Usage: cargo build --release && python3 bench/size.py [--apm target/release/apm]
"""

import argparse
import os
import re
import subprocess

from convert import ecosystem_file, time_convert

MB = 1_000_000


def glibc_baseline(binary):
    """The highest GLIBC_x.y version among the binary's dynamic symbols."""
    symbols = subprocess.run(["readelf", "--dyn-syms", "--wide", binary], check=True, capture_output=True, text=True).stdout
    versions = {tuple(int(n) for n in v.split(".")) for v in re.findall(r"@GLIBC_(\d+(?:\.\d+)+)", symbols)}
    return ".".join(str(n) for n in max(versions)) if versions else "none"


def stripped(binary):
    sections = subprocess.run(["readelf", "--sections", "--wide", binary], check=True, capture_output=True, text=True).stdout
    return ".symtab" not in sections


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    size = os.path.getsize(apm)
    print(f"apm binary: {size / MB:.2f} MB ({size} bytes), {'stripped' if stripped(apm) else 'NOT stripped'} "
          f"(target <= 12 MB: {'met' if size <= 12 * MB else 'MISSED'})")
    print(f"glibc baseline (newest symbol version it needs): GLIBC_{glibc_baseline(apm)}")
    with ecosystem_file(100) as path:
        time_convert(apm, path)


if __name__ == "__main__":
    main()
