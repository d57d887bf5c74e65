//! The data-driven tests of `corpus/check/`.
//!
//! A case is a file `NAME.conf`, or a directory `NAME/` whose root is
//! `apm.conf` with any files it includes. Cases in `ok/` must compile without
//! diagnostics, and their IR is compared with `NAME.ir.json`. Cases in `err/`
//! and `warn/` carry their expectations inline, as comments:
//!
//! ```text
//! #~ E0004 3:9             a diagnostic with this code at line 3, column 9 of this file
//! #~ W0001 inc/a.conf:2:5  … of another file of the case
//! ```
//!
//! The runner checks that the diagnostics are exactly those, then compares
//! the colour-free human rendering with `NAME.human`. `warn/` cases must have
//! no errors. `BLESS=1 cargo test` rewrites the goldens.
//!
//! Files are served from memory with a fixed environment (`HOME=/home/apm`,
//! `APP_DIR=/srv/app`) and the users `root`, `apm` and `www-data`, so results
//! do not depend on the machine.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use apm_compiler::{MemLoader, Severity, codes, compile, render, schema};

const KINDS: [&str; 3] = ["ok", "err", "warn"];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/check")
}

struct Case {
    kind: &'static str,
    name: String,
    /// Files of the case, relative to the case root, and their contents.
    files: Vec<(PathBuf, Vec<u8>)>,
    root: PathBuf,
}

impl Case {
    fn golden(&self) -> PathBuf {
        let extension = if self.kind == "ok" {
            "ir.json"
        } else {
            "human"
        };
        corpus_dir()
            .join(self.kind)
            .join(format!("{}.{extension}", self.name))
    }
}

fn files_under(dir: &Path, prefix: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let relative = prefix.join(path.file_name().unwrap());
        if path.is_dir() {
            files_under(&path, &relative, out);
        } else {
            out.push((relative, fs::read(&path).unwrap()));
        }
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for kind in KINDS {
        let dir = corpus_dir().join(kind);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut files = Vec::new();
                files_under(&path, Path::new(""), &mut files);
                cases.push(Case {
                    kind,
                    name,
                    files,
                    root: "apm.conf".into(),
                });
            } else if let Some(stem) = name.strip_suffix(".conf") {
                let files = vec![(PathBuf::from(&name), fs::read(&path).unwrap())];
                cases.push(Case {
                    kind,
                    name: stem.to_owned(),
                    files,
                    root: name.clone().into(),
                });
            }
        }
    }
    cases
}

fn loader(case: &Case) -> MemLoader {
    let mut loader = MemLoader::new()
        .env("HOME", "/home/apm")
        .env("APP_DIR", "/srv/app")
        .user("root")
        .user("apm")
        .user("www-data");
    for (path, contents) in &case.files {
        loader.add_file(path, contents.clone());
    }
    loader
}

/// `#~ CODE [file:]line:col` annotations of every file of a case.
fn expectations(case: &Case) -> Vec<(String, String, usize, usize)> {
    let mut expected = Vec::new();
    for (path, contents) in &case.files {
        for line in String::from_utf8_lossy(contents).lines() {
            let Some(annotation) = line.trim_start().strip_prefix("#~") else {
                continue;
            };
            let mut words = annotation.split_whitespace();
            let (Some(code), Some(position)) = (words.next(), words.next()) else {
                panic!("{}/{}: malformed annotation `{line}`", case.kind, case.name);
            };
            let mut parts: Vec<&str> = position.rsplitn(3, ':').collect();
            parts.reverse();
            let (file, line_no, column) = match parts.as_slice() {
                [file, line, column] => (PathBuf::from(file), line, column),
                [line, column] => (path.clone(), line, column),
                _ => panic!(
                    "{}/{}: malformed position `{position}`",
                    case.kind, case.name
                ),
            };
            expected.push((
                code.to_owned(),
                file.display().to_string(),
                line_no.parse().unwrap(),
                column.parse().unwrap(),
            ));
        }
    }
    expected.sort();
    expected.sort();
    expected
}

fn bless() -> bool {
    std::env::var_os("BLESS").is_some()
}

fn check_golden(path: &Path, actual: &str, failures: &mut Vec<String>) {
    if bless() {
        fs::write(path, actual).unwrap();
        return;
    }
    match fs::read_to_string(path) {
        Ok(expected) if expected == actual => {}
        Ok(expected) => failures.push(format!(
            "{}: golden differs (BLESS=1 to update)\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        )),
        Err(_) => failures.push(format!("{}: golden missing (BLESS=1 to create)", path.display())),
    }
}

#[test]
fn corpus_check() {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let id = format!("{}/{}", case.kind, case.name);
        let compilation =
            compile(&case.root, &loader(case)).unwrap_or_else(|e| panic!("{id}: {e}"));
        let mut actual: Vec<_> = compilation
            .diagnostics
            .iter()
            .map(|d| {
                let start = compilation.sources.start(d.primary.span);
                let file = compilation
                    .sources
                    .path(d.primary.span.file)
                    .display()
                    .to_string();
                (d.code.id.to_owned(), file, start.line, start.column)
            })
            .collect();
        actual.sort();
        let expected = expectations(case);
        if case.kind == "ok" {
            if !compilation.diagnostics.is_empty() {
                failures.push(format!(
                    "{id}: expected no diagnostics, got\n{}",
                    render::human(&compilation, false)
                ));
                continue;
            }
            let ir = serde_json::to_string_pretty(&compilation.config).unwrap() + "\n";
            check_golden(&case.golden(), &ir, &mut failures);
            continue;
        }
        if expected.is_empty() {
            failures.push(format!(
                "{id}: a case in {} needs `#~ CODE line:col` annotations",
                case.kind
            ));
        }
        if actual != expected {
            failures.push(format!(
                "{id}: diagnostics differ\n  missing:    {:?}\n  unexpected: {:?}\n{}",
                expected
                    .iter()
                    .filter(|e| !actual.contains(e))
                    .collect::<Vec<_>>(),
                actual
                    .iter()
                    .filter(|a| !expected.contains(a))
                    .collect::<Vec<_>>(),
                render::human(&compilation, false)
            ));
        }
        if case.kind == "warn" && compilation.count(Severity::Error) > 0 {
            failures.push(format!("{id}: a warn/ case must have no errors"));
        }
        if case.kind == "err" && compilation.count(Severity::Error) == 0 {
            failures.push(format!("{id}: an err/ case must have an error"));
        }
        check_golden(
            &case.golden(),
            &render::human(&compilation, false),
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Goldens whose case is gone would silently stop being checked.
#[test]
fn corpus_has_no_orphan_goldens() {
    let goldens: BTreeSet<PathBuf> = cases().iter().map(Case::golden).collect();
    for kind in KINDS {
        for entry in fs::read_dir(corpus_dir().join(kind)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".ir.json") || name.ends_with(".human") {
                assert!(
                    goldens.contains(&path),
                    "orphan golden {}: remove it or restore its case",
                    path.display()
                );
            }
        }
    }
}

/// Together the cases exercise every diagnostic code and every key.
#[test]
fn corpus_covers_every_code_and_key() {
    let cases = cases();
    let expected: BTreeSet<String> = cases
        .iter()
        .flat_map(|c| expectations(c).into_iter().map(|e| e.0))
        .collect();
    let missing_codes: Vec<&str> = codes::ALL
        .iter()
        .map(|c| c.id)
        .filter(|id| !expected.contains(*id))
        .collect();
    assert!(
        missing_codes.is_empty(),
        "no corpus case expects {missing_codes:?}"
    );

    let ok_text: String = cases
        .iter()
        .filter(|c| c.kind == "ok")
        .flat_map(|c| {
            c.files
                .iter()
                .map(|(_, text)| String::from_utf8_lossy(text).into_owned())
        })
        .collect::<Vec<_>>()
        .join("\n");
    let used: BTreeSet<&str> = ok_text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let missing_keys: Vec<&str> = schema::all_keys()
        .map(|k| k.name)
        .filter(|k| !used.contains(k))
        .collect();
    assert!(
        missing_keys.is_empty(),
        "no ok/ corpus case sets {missing_keys:?}"
    );
    assert!(
        cases.len() >= 80,
        "the corpus has {} cases; keep at least 80",
        cases.len()
    );
}

/// Printing a valid case's workers and compiling the text again gives the
/// same IR: the printer is what `apm run` state and `saveconf` rely on.
#[test]
fn corpus_workers_print_back_to_the_same_ir() {
    for case in cases().iter().filter(|c| c.kind == "ok") {
        let compilation = compile(&case.root, &loader(case)).unwrap();
        for original in &compilation.config.workers {
            let text = apm_compiler::print::worker(original);
            let reprinted = compile(
                Path::new("printed.conf"),
                &loader(case).file("printed.conf", text.clone()),
            )
            .unwrap();
            // Alone, a worker's `depends_on` names workers it no longer sees.
            let errors: Vec<_> = reprinted
                .diagnostics
                .iter()
                .filter(|d| d.code.id != "W0005")
                .collect();
            assert!(
                errors.is_empty(),
                "ok/{}: printed text does not compile: {errors:?}\n{text}",
                case.name
            );
            let mut again = reprinted.config.workers[0].clone();
            let mut original = original.clone();
            (again.span, original.span) = (None, None);
            assert_eq!(
                again, original,
                "ok/{}: printed text means something else:\n{text}",
                case.name
            );
        }
    }
}

/// `apm fmt` is idempotent on every corpus file, and a formatted valid
/// config means exactly what it meant before.
#[test]
fn corpus_formats_idempotently_and_keeps_meaning() {
    for case in cases() {
        let mut formatted = MemLoader::new()
            .env("HOME", "/home/apm")
            .env("APP_DIR", "/srv/app")
            .user("root")
            .user("apm")
            .user("www-data");
        for (path, contents) in &case.files {
            let Ok(text) = std::str::from_utf8(contents) else {
                continue;
            };
            let once = apm_compiler::format::format(text);
            if let Some(once) = &once {
                assert_eq!(
                    apm_compiler::format::format(once).as_ref(),
                    Some(once),
                    "{}/{}: {} is not idempotent",
                    case.kind,
                    case.name,
                    path.display()
                );
            }
            formatted.add_file(path, once.unwrap_or_else(|| text.to_owned()));
        }
        if case.kind == "ok" {
            let before = compile(&case.root, &loader(&case)).unwrap();
            let after = compile(&case.root, &formatted).unwrap();
            assert_eq!(
                after.diagnostics,
                vec![],
                "ok/{}: formatted text has diagnostics",
                case.name
            );
            let strip = |c: apm_compiler::Config| {
                c.workers
                    .into_iter()
                    .map(|mut w| {
                        w.span = None;
                        w
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                strip(after.config),
                strip(before.config),
                "ok/{}: formatting changed the meaning",
                case.name
            );
        }
    }
}

fn changed_lines(before: &str, after: &str) -> usize {
    let diff = similar::TextDiff::from_lines(before, after);
    diff.iter_all_changes()
        .filter(|c| c.tag() != similar::ChangeTag::Equal)
        .count()
}

/// `saveconf` keeps every byte of a file whose workers did not change, and
/// a change of one value changes only its statement.
#[test]
fn corpus_saves_unchanged_files_byte_for_byte_and_edits_one_statement() {
    use apm_compiler::schema::Setting;
    use apm_compiler::values::Millis;
    for case in cases().iter().filter(|c| c.kind == "ok") {
        let compilation = compile(&case.root, &loader(case)).unwrap();
        let live: Vec<_> = compilation.config.workers.iter().collect();
        assert_eq!(
            apm_compiler::save::save(&compilation, &live, true),
            vec![],
            "ok/{}: saving unchanged workers changed files",
            case.name
        );
        let Some(first) = compilation.config.workers.first() else {
            continue;
        };
        let mut edited = first.clone();
        let span = first.kill_timeout.span.or(first.span);
        edited.kill_timeout = Setting::new(Millis(12_345), span);
        let mut live: Vec<_> = vec![&edited];
        live.extend(compilation.config.workers.iter().skip(1));
        let saved = apm_compiler::save::save(&compilation, &live, true);
        assert_eq!(saved.len(), 1, "ok/{}: one file changes", case.name);
        let (path, text) = &saved[0];
        let before = String::from_utf8(
            case.files
                .iter()
                .find(|(p, _)| p == path)
                .unwrap()
                .1
                .clone(),
        )
        .unwrap();
        // One line replaced, or one inserted (a one-line block changes its line).
        assert!(
            changed_lines(&before, text) <= 2,
            "ok/{}:\n{text}",
            case.name
        );
        let mut reloaded = loader(case);
        reloaded.add_file(path, text.clone());
        let again = compile(&case.root, &reloaded).unwrap();
        assert_eq!(
            again.diagnostics,
            vec![],
            "ok/{}: saved text has diagnostics:\n{text}",
            case.name
        );
        assert_eq!(
            again.config.workers[0].kill_timeout.value,
            Millis(12_345),
            "ok/{}:\n{text}",
            case.name
        );
    }
}
