//! The whole compile step on arbitrary input, then every renderer.
#![no_main]

use std::path::Path;

use apm_compiler::{MemLoader, compile, render};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The bytes after the first NUL become the files the root may include,
    // so include expansion is fuzzed too.
    let (root, included) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let loader = MemLoader::new()
        .file("apm.conf", root)
        .file("inc.conf", included)
        .file("conf.d/a.conf", included)
        .env("HOME", "/home/fuzz");
    let compilation = compile(Path::new("apm.conf"), &loader).expect("the in-memory root exists");
    render::human(&compilation, false);
    render::json(&compilation);
    render::github(&compilation);
});
