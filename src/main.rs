//! The `apm` binary: the global allocator and `main`. Everything else is
//! the `apm-cli` crate, built for size, so that this crate's opt-level, which
//! under fat LTO is also the whole-program pass's, stays 3 (docs/cli.md,
//! decision 118).

use std::process::ExitCode;

fn main() -> ExitCode {
    apm_cli::main()
}

// The proxy allocates per request (heads, frames, bodies); mimalloc gave the
// connector path 4-7 % more requests per second than glibc's malloc in
// paired runs of the same benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// `hypot` (the JavaScript engine's `Math.hypot`) is the one symbol that
// needs glibc 2.35: glibc 2.35 added a new version of it, and the linker
// takes the newest. Bound to the version every x86-64 glibc has, the binary
// runs on glibc 2.34 (RHEL 9 and its rebuilds) too (docs/cli.md, decision
// 93). Under fat LTO every call to `hypot` is in this crate's module, which
// this directive names.
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
std::arch::global_asm!(".symver hypot, hypot@GLIBC_2.2.5");
