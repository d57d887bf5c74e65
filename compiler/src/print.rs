//! Printing IR back as config text, in the canonical layout. What it prints
//! compiles to the same IR: a corpus test checks that for every valid case.

use std::fmt::Write as _;

use crate::ir::WorkerSpec;
use crate::values::quote;

fn statements(out: &mut String, indent: &str, settings: &[(&'static str, Vec<String>)]) {
    let width = settings.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, values) in settings {
        let values: Vec<String> = values.iter().map(|v| quote(v)).collect();
        let _ = writeln!(out, "{indent}{key:<width$} {};", values.join(", "));
    }
}

/// A `worker { }` block with the keys the spec sets explicitly.
pub fn worker(spec: &WorkerSpec) -> String {
    let mut out = String::from("worker {\n");
    statements(&mut out, "    ", &spec.settings());
    for (name, settings) in [
        ("vanguard", spec.vanguard.as_ref().map(|v| v.settings())),
        ("statsd", spec.statsd.as_ref().map(|s| s.settings())),
    ] {
        if let Some(settings) = settings {
            let _ = writeln!(out, "\n    {name} {{");
            statements(&mut out, "        ", &settings);
            out.push_str("    }\n");
        }
    }
    out.push_str("}\n");
    out
}
