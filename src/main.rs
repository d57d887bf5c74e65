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
