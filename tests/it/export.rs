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

/// An output directory others may write to (`-o` into a shared place):
/// uid 65534 plants a symbolic link and a FIFO where the export's files
/// go, and a hard link stands for what another user could link on a
/// system without `protected_hardlinks`. The export writes through none
/// of them: each is replaced by the export's own file.
#[test]
fn an_export_never_writes_through_what_was_planted_in_its_directory() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        prerequisite_missing("not root: another user's links cannot be planted");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victims: Vec<PathBuf> = ["linked", "hard"]
        .iter()
        .map(|name| {
            let victim = dir.path().join(name);
            std::fs::write(&victim, "precious\n").unwrap();
            victim
        })
        .collect();
    let plant = |script: String| {
        let status = Command::new("sh")
            .args(["-c", &script])
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    };
    plant(format!(
        "ln -s {} {}/a.yaml",
        victims[0].display(),
        out.display()
    ));
    plant(format!("mkfifo {}/c.yaml", out.display()));
    std::fs::hard_link(&victims[1], out.join("b.yaml")).unwrap();
    // Another user's file, of one name: theirs to keep, never written into.
    plant(format!("echo theirs > {}/d.yaml", out.display()));
    let mut theirs = std::fs::File::open(out.join("d.yaml")).unwrap();
    let config = dir.path().join("apm.conf");
    std::fs::write(
        &config,
        "worker { name a; exec /bin/a; }\nworker { name b; exec /bin/b; }\nworker { name c; exec /bin/c; }\nworker { name d; exec /bin/d; }\n",
    )
    .unwrap();
    let mut export = Command::new(env!("CARGO_BIN_EXE_apm"));
    export
        .args(["export", "kubernetes"])
        .arg(&config)
        .arg("-o")
        .arg(&out);
    // The old code waited forever on the FIFO.
    let child = export
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = crate::harness::run_child(child, crate::harness::CLI_TIMEOUT)
        .expect("the export hung on what was planted");
    assert!(
        output.status.success(),
        "{}",
        crate::harness::describe(&output)
    );
    for victim in &victims {
        assert_eq!(std::fs::read_to_string(victim).unwrap(), "precious\n");
    }
    let mut kept = String::new();
    std::io::Read::read_to_string(&mut theirs, &mut kept).unwrap();
    assert_eq!(kept, "theirs\n", "another user's file was written into");
    for name in ["a.yaml", "b.yaml", "c.yaml", "d.yaml"] {
        let path = out.join(name);
        assert!(
            std::fs::symlink_metadata(&path).unwrap().is_file(),
            "{name}"
        );
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("kind: \"Deployment\"")
        );
    }
}

#[test]
fn an_export_again_over_its_own_files_leaves_exactly_the_new_text() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("apm.conf");
    let out = dir.path().join("out");
    let export = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_apm"))
            .args(["export", "kubernetes"])
            .arg(&config)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(output.status.success());
        std::fs::read_to_string(out.join("a.yaml")).unwrap()
    };
    let long = export("worker { name a; exec /bin/a; params a-long-argument-of-some-length; }\n");
    // Shorter now: nothing of the old text is left at its end.
    let short = export("worker { name a; exec /bin/a; }\n");
    assert!(short.len() < long.len());
    assert!(
        short.ends_with("command:\n            - \"/bin/a\"\n"),
        "{short}"
    );
}

/// Without `-o`, stdout holds exactly the files `-o` writes, one after
/// the other; only several systemd units (which have no document
/// separator) are each headed by their name.
#[test]
fn an_export_to_stdout_is_the_files_it_would_write() {
    let cases = repo("tests/export");
    for entry in std::fs::read_dir(&cases).unwrap() {
        let case = entry.unwrap().path();
        if !case.join("apm.conf").exists() {
            continue;
        }
        for target in TARGETS {
            let out = tempfile::tempdir().unwrap();
            let run = |to_dir: bool| {
                let mut command = Command::new(env!("CARGO_BIN_EXE_apm"));
                command
                    .args(["export", target, "apm.conf"])
                    .current_dir(&case);
                if to_dir {
                    command.arg("-o").arg(out.path());
                }
                let output = command.output().unwrap();
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                String::from_utf8(output.stdout).unwrap()
            };
            let stdout = run(false);
            assert_eq!(run(true), "", "-o writes nothing on stdout");
            let files: Vec<(String, String)> = std::fs::read_dir(out.path())
                .unwrap()
                .map(|e| {
                    let path = e.unwrap().path();
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    (name, std::fs::read_to_string(&path).unwrap())
                })
                .collect();
            let headed = target == "systemd" && files.len() > 1;
            let mut expected_len = 0;
            for (name, text) in &files {
                let piece = if headed {
                    format!("# ==> {name} <==\n{text}")
                } else {
                    text.clone()
                };
                assert!(
                    stdout.contains(&piece),
                    "{target} {}: {name} is not on stdout as written",
                    case.display()
                );
                expected_len += piece.len();
            }
            assert_eq!(
                stdout.len(),
                expected_len,
                "{target} {}: stdout holds more than the files:\n{stdout}",
                case.display()
            );
            assert_eq!(
                stdout.matches("# ==> ").count(),
                if headed { files.len() } else { 0 }
            );
        }
    }
}
