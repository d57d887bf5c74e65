//! The plan corpus, `corpus/reload/`: each case is one file with sections
//!
//! ```text
//! --- old ---           the config before (its root file)
//! --- old/inc.conf ---  another file of the old config, as many as needed
//! --- new ---           the config after
//! --- new/inc.conf ---
//! --- plan ---          the golden: the plan rendered for people
//! ```
//!
//! A line `--- force ---` before `--- plan ---` asks for `--force`. The runner
//! compiles both sides from memory (both must be free of errors), diffs them
//! and compares the rendering; `BLESS=1` rewrites the plan section.

use std::fs;
use std::path::Path;

use apm_compiler::{MemLoader, compile, plan};

use crate::sections::sections;

fn side(sections: &[(String, String)], side: &str) -> MemLoader {
    let mut loader = MemLoader::new()
        .env("HOME", "/home/apm")
        .user("root")
        .user("apm");
    for (name, body) in sections {
        if name == side {
            loader.add_file("apm.conf", body.clone());
        } else if let Some(path) = name.strip_prefix(&format!("{side}/")) {
            loader.add_file(path, body.clone());
        }
    }
    loader
}

#[test]
fn corpus_reload_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/reload");
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let mut failures = Vec::new();
    let mut count = 0;
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "reload"))
    {
        count += 1;
        let text = fs::read_to_string(path).unwrap();
        let sections = sections(&text);
        let mut configs = Vec::new();
        for name in ["old", "new"] {
            let compilation = compile(Path::new("apm.conf"), &side(&sections, name)).unwrap();
            if compilation.has_errors() {
                failures.push(format!(
                    "{}: the {name} config has errors:\n{}",
                    path.display(),
                    apm_compiler::render::human(&compilation, false)
                ));
            }
            configs.push(compilation.config);
        }
        let force = sections.iter().any(|(n, _)| n == "force");
        let old: Vec<_> = configs[0].workers.iter().collect();
        let new: Vec<_> = configs[1].workers.iter().collect();
        let mut plan = plan::diff(&old, &new, force);
        plan.daemon = plan::daemon_changes(&configs[0].daemon, &configs[1].daemon);
        let actual = plan.render();
        let expected = sections
            .iter()
            .find(|(n, _)| n == "plan")
            .map(|(_, b)| b.clone());
        if std::env::var_os("BLESS").is_some() {
            let head = match text.find("--- plan ---") {
                Some(at) => &text[..at],
                None => &text,
            };
            fs::write(path, format!("{head}--- plan ---\n{actual}")).unwrap();
        } else if expected.as_deref() != Some(actual.as_str()) {
            failures.push(format!(
                "{}: plan differs (BLESS=1 to update)\n--- expected\n{}\n--- actual\n{actual}",
                path.display(),
                expected.unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        count >= 30,
        "corpus/reload has {count} cases; keep at least 30"
    );
}
