//! Printing IR back as config text, in the canonical layout. What it prints
//! compiles to the same IR: a corpus test checks that for every valid case.

use std::fmt::Write as _;

use crate::ir::WorkerSpec;
use crate::values::quote;

fn statements<K: AsRef<str>>(out: &mut String, indent: &str, settings: &[(K, Vec<String>)]) {
    let width = settings
        .iter()
        .map(|(key, _)| key.as_ref().len())
        .max()
        .unwrap_or(0);
    for (key, values) in settings {
        let values: Vec<String> = values.iter().map(|v| quote(v)).collect();
        let _ = writeln!(
            out,
            "{indent}{:<width$} {};",
            key.as_ref(),
            values.join(", ")
        );
    }
}

/// A `worker { }` block with the keys the spec sets explicitly.
pub fn worker(spec: &WorkerSpec) -> String {
    worker_with(&spec.settings(), spec)
}

/// A `worker { }` block with these worker keys, and the `vanguard { }` and
/// `statsd { }` blocks of `spec`: how `apm update` changes some keys.
pub fn worker_with<K: AsRef<str>>(settings: &[(K, Vec<String>)], spec: &WorkerSpec) -> String {
    let mut out = String::from("worker {\n");
    statements(&mut out, "    ", settings);
    for (name, settings) in [
        ("vanguard", spec.vanguard.as_ref().map(|v| v.settings())),
        ("statsd", spec.statsd.as_ref().map(|s| s.settings())),
    ] {
        if let Some(settings) = settings {
            out.push('\n');
            for line in nested(name, &settings).lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    out.push_str("}\n");
    out
}

/// A nested block (`vanguard { }`, `statsd { }`) at the left margin.
pub fn nested<K: AsRef<str>>(name: &str, settings: &[(K, Vec<String>)]) -> String {
    if settings.is_empty() {
        return format!("{name} {{ }}\n");
    }
    let mut out = format!("{name} {{\n");
    statements(&mut out, "    ", settings);
    out.push_str("}\n");
    out
}
