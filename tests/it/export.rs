//! `apm export`: golden outputs of representative configs, and every
//! export of the check corpus checked by each platform's own validator.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{prerequisite_missing, repo};

const TARGETS: [&str; 4] = ["kubernetes", "nomad", "compose", "systemd"];

/// What `apm export TARGET apm.conf -o DIR` wrote and said, as one text,
/// with the case's directory written `<dir>`.
fn export_text(case: &Path, target: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_apm"))
        .args(["export", target, "apm.conf", "-o"])
        .arg(out.path())
        .current_dir(case)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut text = String::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        text.push_str(&format!("==> {name} <==\n"));
        text.push_str(&std::fs::read_to_string(&file).unwrap());
    }
    text.push_str("==> stderr <==\n");
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.replace(&case.to_string_lossy().into_owned(), "<dir>")
}

#[test]
fn exports_match_their_golden_outputs() {
    let cases = repo("tests/export");
    let mut checked = 0;
    for entry in std::fs::read_dir(&cases).unwrap() {
        let case = entry.unwrap().path();
        if !case.join("apm.conf").exists() {
            continue;
        }
        for target in TARGETS {
            let golden = case.join(format!("{target}.golden"));
            let text = export_text(&case, target);
            if std::env::var_os("BLESS").is_some() {
                std::fs::write(&golden, &text).unwrap();
            }
            let expected = std::fs::read_to_string(&golden).unwrap_or_default();
            assert!(
                text == expected,
                "{} differs (BLESS=1 cargo test --test it export regenerates it):\n{}",
                golden.display(),
                similar::TextDiff::from_lines(&expected, &text).unified_diff()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn a_config_with_errors_is_not_exported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("apm.conf");
    std::fs::write(&config, "worker { instances 2; }\n").unwrap();
    let out = dir.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_apm"))
        .args(["export", "systemd"])
        .arg(&config)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing is exported"));
    assert!(!out.exists());
}

/// tests/export_validate.py: kubernetes-validate, the Compose schema,
/// python-hcl2 and systemd-analyze over every export of the check corpus.
#[test]
fn every_export_of_the_check_corpus_passes_its_platform_validator() {
    let output = Command::new("python3")
        .arg(repo("tests/export_validate.py"))
        .args(["--apm", env!("CARGO_BIN_EXE_apm")])
        .output()
        .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.code() == Some(77) {
        prerequisite_missing(report.trim());
        return;
    }
    assert!(output.status.success(), "{report}");
    assert!(report.contains("export validation: all valid"), "{report}");
}
