//! The saveconf corpus, `corpus/save/`: each case is one file with sections
//!
//! ```text
//! --- file ---            the config on disk (its root file)
//! --- file/inc.conf ---   another file of it, as many as needed
//! --- live ---            the live workers, as config text
//! --- saved ---           the golden: the root file as `saveconf` writes it
//! --- saved/inc.conf ---  … another file it writes
//! ```
//!
//! A file without a `saved` section must not be written. The runner also
//! compiles what it saved and checks that it means the live workers, so a
//! value is never written back in a way that changes the file's structure.
//! `BLESS=1` rewrites the `saved` sections.

use std::fs;
use std::path::Path;

use apm_compiler::{MemLoader, compile};

use crate::sections::sections;

const ROOT: &str = "apm.conf";

fn loader(files: &[(String, String)]) -> MemLoader {
    let mut loader = MemLoader::new()
        .env("HOME", "/home/apm")
        .user("root")
        .user("apm");
    for (path, text) in files {
        loader.add_file(path, text.clone());
    }
    loader
}

/// The files of one side of a case: `side` is the root, `side/PATH` the others.
fn side(sections: &[(String, String)], side: &str) -> Vec<(String, String)> {
    sections
        .iter()
        .filter_map(|(name, body)| {
            if name == side {
                Some((ROOT.to_owned(), body.clone()))
            } else {
                name.strip_prefix(&format!("{side}/"))
                    .map(|path| (path.to_owned(), body.clone()))
            }
        })
        .collect()
}

fn workers_of(config: apm_compiler::Config) -> Vec<apm_compiler::ir::WorkerSpec> {
    config
        .workers
        .into_iter()
        .map(|mut w| {
            w.span = None;
            w
        })
        .collect()
}

/// Checks one case; `Err` says what differs.
fn check(path: &Path, text: &str) -> Result<(), String> {
    let sections = sections(text);
    let on_disk = side(&sections, "file");
    let current = compile(Path::new(ROOT), &loader(&on_disk)).unwrap();
    let live = compile(Path::new(ROOT), &loader(&side(&sections, "live"))).unwrap();
    for (name, compilation) in [("file", &current), ("live", &live)] {
        if compilation.has_errors() {
            return Err(format!(
                "the {name} config has errors:\n{}",
                apm_compiler::render::human(compilation, false)
            ));
        }
    }
    let specs: Vec<_> = live.config.workers.iter().collect();
    let saved: Vec<(String, String)> = apm_compiler::save::save(&current, &specs, true)
        .into_iter()
        .map(|(path, text)| (path.display().to_string(), text))
        .collect();
    if std::env::var_os("BLESS").is_some() {
        let head = match text.find("--- saved") {
            Some(at) => &text[..at],
            None => text,
        };
        let mut out = head.to_owned();
        for (file, body) in &saved {
            let name = if file == ROOT {
                "saved".to_owned()
            } else {
                format!("saved/{file}")
            };
            out.push_str(&format!("--- {name} ---\n{body}"));
        }
        fs::write(path, out).unwrap();
        return Ok(());
    }
    let expected = side(&sections, "saved");
    if saved != expected {
        let show = |files: &[(String, String)]| {
            files
                .iter()
                .map(|(p, t)| format!("[{p}]\n{t}"))
                .collect::<String>()
        };
        return Err(format!(
            "saved files differ (BLESS=1 to update)\n--- expected\n{}--- actual\n{}",
            show(&expected),
            show(&saved)
        ));
    }
    let mut after = loader(&on_disk);
    for (file, text) in &saved {
        after.add_file(file, text.clone());
    }
    let again = compile(Path::new(ROOT), &after).unwrap();
    if !again.diagnostics.is_empty() {
        return Err(format!(
            "the saved config has diagnostics:\n{}",
            apm_compiler::render::human(&again, false)
        ));
    }
    if workers_of(again.config) != workers_of(live.config) {
        return Err("the saved config does not mean the live workers".to_owned());
    }
    Ok(())
}

#[test]
fn corpus_save_edits_in_place() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/save");
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "save"))
        .collect();
    entries.sort();
    let failures: Vec<String> = entries
        .iter()
        .filter_map(|path| {
            check(path, &fs::read_to_string(path).unwrap())
                .err()
                .map(|why| format!("{}: {why}", path.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        entries.len() >= 10,
        "corpus/save has {} cases; keep at least 10",
        entries.len()
    );
}

/// End to end: a file edited after its load is given the live values back
/// by `apm saveconf`, inside `vanguard { }` and `statsd { }` too, with every
/// comment of the edited file where it is.
#[test]
fn saveconf_writes_nested_blocks_back_value_by_value() {
    use crate::harness::Daemon;
    let d = Daemon::new("saveconf_nested");
    let loaded = "worker {\n    name api;\n    exec sleep;\n    params 4310;\n    startup_grace 100;\n    vanguard {\n        # per client\n        rate_limit 10;  # measured\n    }\n    statsd {\n        prefix shop;  # team\n    }\n}\n";
    let config = d.write("nested.conf", loaded);
    d.ok(&["load", config.to_str().unwrap()]);
    // Edited on disk, not reloaded: new comments, other values.
    let edited = loaded
        .replace(
            "rate_limit 10;",
            "# raised for the sale\n        rate_limit 99;",
        )
        .replace(
            "prefix shop;  # team",
            "prefix shop;  # team\n        interval 1s;  # for the dashboard",
        );
    std::fs::write(&config, &edited).unwrap();
    d.ok(&["saveconf"]);
    // The key the live worker does not have goes with its line, the
    // comment after it on that line included, as for a worker's own keys.
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        loaded.replace(
            "rate_limit 10;",
            "# raised for the sale\n        rate_limit 10;"
        ),
    );
}
