#!/usr/bin/env python3
"""The shipped binary: its size (target: at most 12 MB, stripped), the
newest glibc symbol version it needs (its glibc baseline), and `apm
convert`'s time for a 100-app ecosystem file beside it (target: under
50 ms), since the size comes from building the JavaScript engine small.

With --against OTHER (another build of apm, e.g. main's), it prints that
binary's size too and times the two conversions in alternation, with the
ratio of the medians: the figure to trust on a loaded machine.

With --crates BINARY (a build of the same profile without `strip`, e.g.
`cargo build --profile sizeprobe`), it also prints how many bytes of code
and named data each crate contributes, read from the symbol table.

Usage: cargo build --release && python3 bench/size.py [--apm target/release/apm]
           [--against OTHER] [--crates target/sizeprobe/apm]
"""

import argparse
import os
import re
import statistics
import subprocess
from collections import Counter

from common import median_time
from convert import ecosystem_file, time_convert

MB = 1_000_000


# Version needs that are not a GLIBC_x.y but only exist from one: packed
# relative relocations (`-z pack-relative-relocs`) need glibc 2.36.
GLIBC_ABI_VERSIONS = {"GLIBC_ABI_DT_RELR": (2, 36)}


def glibc_baseline(binary):
    """The oldest glibc the binary loads on: the highest version it needs."""
    needs = subprocess.run(["readelf", "--version-info", "--wide", binary], check=True, capture_output=True, text=True).stdout
    versions = {tuple(int(n) for n in v.split(".")) for v in re.findall(r"Name: GLIBC_(\d+(?:\.\d+)+)", needs)}
    versions |= {version for name, version in GLIBC_ABI_VERSIONS.items() if f"Name: {name}" in needs}
    return ".".join(str(n) for n in max(versions)) if versions else "none"


def stripped(binary):
    sections = subprocess.run(["readelf", "--sections", "--wide", binary], check=True, capture_output=True, text=True).stdout
    return ".symtab" not in sections


# Paths that name no crate of ours: a generic of theirs is charged to the
# first crate among its type arguments (`core::ptr::drop_in_place<boa_engine::…>`
# is boa's), the way `cargo bloat` does.
LANGUAGE_CRATES = {"core", "alloc", "std"}


def crate_of(symbol):
    """The crate a demangled symbol's code belongs to, or a bucket for the rest."""
    crates = re.findall(r"(?:^|[<(&*\s,;])(?:dyn |mut |const )?([A-Za-z_][A-Za-z0-9_]*)::", symbol)
    if not crates:
        return "[C or unnamed]"
    theirs = [c for c in crates if c not in LANGUAGE_CRATES]
    return theirs[0] if theirs else crates[0]


def crate_sizes(unstripped):
    """Bytes of each crate's symbols (code and named data) and the total of
    the binary's loaded sections, from `nm` on a binary that still has them."""
    listing = subprocess.run(["nm", "--size-sort", "--print-size", "--demangle", unstripped],
                             check=True, capture_output=True, text=True).stdout
    sizes = Counter()
    counted = set()
    for line in listing.splitlines():
        address, size, _kind, name = line.split(" ", 3)
        # Identical functions folded by the linker share one address.
        if address not in counted:
            counted.add(address)
            sizes[crate_of(name)] += int(size, 16)
    return sizes


def print_crate_sizes(unstripped, shown=25):
    sizes = crate_sizes(unstripped)
    named = sum(sizes.values())
    print(f"per crate, from the symbols of {unstripped} ({named / MB:.2f} MB named):")
    for crate, size in sizes.most_common(shown):
        print(f"  {size / MB:6.2f} MB  {size / named:5.1%}  {crate}")
    rest = sum(size for _, size in sizes.most_common()[shown:])
    print(f"  {rest / MB:6.2f} MB  {rest / named:5.1%}  ({len(sizes) - shown} more)")


def compare_convert(apm, other, path, rounds=9):
    """Times `apm convert` of the file with both binaries in alternation."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(median_time([apm, "convert", path], repeat=1))
        theirs.append(median_time([other, "convert", path], repeat=1))
    ours, theirs = statistics.median(ours), statistics.median(theirs)
    print(f"apm convert, 100 apps, alternating: {ours * 1000:.1f} ms vs {theirs * 1000:.1f} ms for {other}: "
          f"ratio {ours / theirs:.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default="target/release/apm")
    parser.add_argument("--against", metavar="OTHER", help="another apm binary to compare size and convert time with")
    parser.add_argument("--crates", metavar="UNSTRIPPED", help="print the per-crate breakdown of this unstripped build")
    args = parser.parse_args()
    apm = os.path.abspath(args.apm)
    size = os.path.getsize(apm)
    print(f"apm binary: {size / MB:.2f} MB ({size} bytes), {'stripped' if stripped(apm) else 'NOT stripped'} "
          f"(target <= 12 MB: {'met' if size <= 12 * MB else 'MISSED'})")
    if args.against:
        other = os.path.abspath(args.against)
        print(f"against {other}: {os.path.getsize(other) / MB:.2f} MB; size ratio {size / os.path.getsize(other):.2f}")
    print(f"glibc baseline (newest symbol version it needs): GLIBC_{glibc_baseline(apm)}")
    with ecosystem_file(100) as path:
        time_convert(apm, path)
        if args.against:
            compare_convert(apm, other, path)
    if args.crates:
        print_crate_sizes(args.crates)


if __name__ == "__main__":
    main()
