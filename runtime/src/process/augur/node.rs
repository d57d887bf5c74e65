//! Node: where a package is installed, and the packages a source file
//! imports.

use std::path::Path;

use super::Program;

/// Node's built-in modules, requirable without the `node:` prefix:
/// `require('module').builtinModules` of Node 20.20.
const BUILTINS: &[&str] = &[
    "_http_agent",
    "_http_client",
    "_http_common",
    "_http_incoming",
    "_http_outgoing",
    "_http_server",
    "_stream_duplex",
    "_stream_passthrough",
    "_stream_readable",
    "_stream_transform",
    "_stream_wrap",
    "_stream_writable",
    "_tls_common",
    "_tls_wrap",
    "assert",
    "assert/strict",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "dns/promises",
    "domain",
    "events",
    "fs",
    "fs/promises",
    "http",
    "http2",
    "https",
    "inspector",
    "inspector/promises",
    "module",
    "net",
    "os",
    "path",
    "path/posix",
    "path/win32",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "readline/promises",
    "repl",
    "stream",
    "stream/consumers",
    "stream/promises",
    "stream/web",
    "string_decoder",
    "sys",
    "timers",
    "timers/promises",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "util/types",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

/// Whether `name` is installed for a file or directory at `from`: Node
/// looks in `node_modules` of its directory and of each above it.
pub(super) fn installed(from: &Path, name: &str) -> bool {
    from.ancestors().any(|dir| {
        dir.join("node_modules")
            .join(name)
            .join("package.json")
            .is_file()
    })
}

/// Whether Node finds package `name` for the entry file `entry`: in a
/// `node_modules` above it (a package, a directory or a file), or in a
/// `NODE_PATH` directory.
pub(super) fn resolvable(program: &Program, entry: &Path, name: &str) -> bool {
    let found_in = |dir: &Path| {
        let path = dir.join(name);
        path.is_dir()
            || ["js", "json", "node"]
                .iter()
                .any(|e| path.with_extension(e).is_file())
    };
    let node_path = program.var("NODE_PATH").unwrap_or_default();
    entry
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("node_modules"))
        .chain(std::env::split_paths(&node_path))
        .any(|dir| found_in(&dir))
}

/// The packages a source file imports by bare name (`require('x')`,
/// `import … from 'x'`, `import 'x'`, `import('x')`, `export … from
/// 'x'`), each once: not Node's built-ins, not relative or absolute
/// paths; `x/sub` and `@scope/x/sub` as `x` and `@scope/x`. Lines that
/// are comments are skipped.
pub(super) fn imports(source: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut in_block_comment = false;
    for line in source.lines() {
        let mut code = line.trim();
        if in_block_comment {
            match code.find("*/") {
                Some(end) => {
                    in_block_comment = false;
                    code = &code[end + 2..];
                }
                None => continue,
            }
        }
        if code.starts_with("//") || code.starts_with('*') {
            continue;
        }
        if let Some(start) = code.find("/*")
            && !code[start..].contains("*/")
        {
            in_block_comment = true;
            code = &code[..start];
        }
        for specifier in specifiers(code) {
            if let Some(name) = package(specifier)
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names
}

/// The module specifiers a line of code names: the string after
/// `require(`, `import(`, `from` or a statement's `import`.
fn specifiers(code: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for (keyword, needs_paren) in [("require", true), ("import", true), ("from", false)] {
        let mut rest = code;
        while let Some(at) = rest.find(keyword) {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + keyword.len()..];
            rest = after;
            // A part of a longer name (`myrequire`, `.from`) is not the keyword.
            if before.is_some_and(|c| c.is_alphanumeric() || "_$.".contains(c)) {
                continue;
            }
            let argument = match after.trim_start().strip_prefix('(') {
                Some(inside) if needs_paren => quoted(inside),
                _ => quoted(after),
            };
            found.extend(argument);
        }
    }
    found
}

/// The text of the string literal `rest` starts with (after spaces).
fn quoted(rest: &str) -> Option<&str> {
    let rest = rest.trim_start();
    let quote = rest.chars().next().filter(|c| "'\"`".contains(*c))?;
    let body = &rest[1..];
    Some(&body[..body.find(quote)?])
}

/// The package a bare specifier names, if it is neither a path nor built in.
fn package(specifier: &str) -> Option<String> {
    // npm's names, and paths within packages; a template's `${x}` is none.
    let allowed = |c: char| c.is_ascii_alphanumeric() || "@/._-~".contains(c);
    if specifier.is_empty()
        || !specifier.chars().all(allowed)
        || specifier.starts_with(['.', '/'])
        || specifier.starts_with("node:")
        || specifier.contains(':')
        || BUILTINS.contains(&specifier)
    {
        return None;
    }
    let parts = if specifier.starts_with('@') { 2 } else { 1 };
    let package: Vec<&str> = specifier.split('/').take(parts).collect();
    let package = package.join("/");
    (!BUILTINS.contains(&package.as_str())).then_some(package)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_bare_packages_that_are_not_built_in() {
        let source = r#"
            'use strict';
            const express = require('express');
            const { readFile } = require("fs/promises");
            const path = require('node:path');
            const local = require('./lib/local');
            import React, { useState } from "react";
            import '@scope/side-effect/register';
            export { x } from 'lodash/fp';
            const lazy = await import('chalk');
            import os from 'os';
            // const commented = require('commented-out');
            /* const blocked = require('blocked-out');
               require('also-blocked'); */
            const myrequire = (x) => x; myrequire('not-a-module');
            const url = require(`https://example.com/x`);
            const twice = require('express');
        "#;
        assert_eq!(
            imports(source),
            ["express", "react", "@scope/side-effect", "lodash", "chalk"]
        );
    }

    #[test]
    fn an_import_is_resolvable_from_any_node_modules_above_or_node_path() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("srv/app");
        std::fs::create_dir_all(app.join("node_modules/express")).unwrap();
        std::fs::create_dir_all(dir.path().join("srv/node_modules/@scope/util")).unwrap();
        std::fs::write(dir.path().join("srv/node_modules/single.js"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("global/chalk")).unwrap();
        let entry = app.join("server.js");
        let mut program = Program::default();
        for name in ["express", "@scope/util", "single"] {
            assert!(resolvable(&program, &entry, name), "{name}");
        }
        assert!(!resolvable(&program, &entry, "chalk"));
        program.env.push((
            "NODE_PATH".to_owned(),
            dir.path().join("global").display().to_string(),
        ));
        assert!(resolvable(&program, &entry, "chalk"));
        assert!(!resolvable(&program, &entry, "redis"));
    }
}
