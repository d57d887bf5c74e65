//! The `apm` binary run as users run it, on real files.

use std::path::Path;
use std::process::{Command, Output};

use crate::certs;
use crate::harness::prerequisite_missing;

fn apm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apm"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn write(dir: &Path, path: &str, text: &str) {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn check_valid_file_with_includes_prints_a_summary_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "apm.conf",
        "include conf.d/*.conf;\nworker { name api; exec node; params server.js; instances 4; server http://127.0.0.1:3000; }\n",
    );
    write(
        dir.path(),
        "conf.d/b.conf",
        "worker { exec python3; params b.py; }\n",
    );
    write(
        dir.path(),
        "conf.d/a.conf",
        "worker { name a; exec ./a.sh; }\n",
    );
    let output = apm(&["check", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with("✓ apm.conf: 3 workers, 0 warnings\n"),
        "{text}"
    );
    // Filename order: a.conf, b.conf, then the worker after the include.
    let order: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, ["a", "python3", "api"]);
    assert!(
        text.contains("4 × node server.js") && text.contains("http://127.0.0.1:3000"),
        "{text}"
    );
}

#[test]
fn check_says_which_keys_this_version_accepts_without_enforcing_them() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "apm.conf",
        "worker { name api; exec node; listen jobs; session_persist on; }\nworker { name plain; exec node; }\n\
         worker { name spliced; exec node; upstream port; session_persist on; }\n",
    );
    let output = apm(&["check", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert_eq!(
        crate::harness::note_lines(&output),
        [
            "note: worker `spliced` sets `session_persist` with `upstream port`: sessions move \
             between instances only through a connector (`upstream connector`); its spliced \
             WebSockets and TCP connections are drained instead (waited for, up to \
             `kill_timeout`, before an instance is stopped)",
        ]
    );
    let json = apm(&["check", "--json", "apm.conf"], dir.path());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        report["not_enforced"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
}

#[test]
fn check_json_reports_positions_and_nulls_the_config_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "apm.conf",
        "worker {\n  name api\n  exec node;\n}\nworker { exec x; instnaces 2; }\n",
    );
    let output = apm(&["check", "--format", "json", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["config"], serde_json::Value::Null);
    let diagnostics = report["diagnostics"].as_array().unwrap();
    let codes: Vec<&str> = diagnostics
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["E0004", "W0001"]);
    let missing_semi = &diagnostics[0];
    assert_eq!(
        (
            missing_semi["file"].as_str(),
            missing_semi["line"].as_u64(),
            missing_semi["column"].as_u64()
        ),
        (Some("apm.conf"), Some(2), Some(11))
    );
    assert!(
        missing_semi["help"]
            .as_str()
            .unwrap()
            .contains("add `;` at the end of line 2")
    );
    assert_eq!(report["errors"], 1);
    assert_eq!(report["warnings"], 1);
    assert_eq!(diagnostics[1]["help"], "did you mean `instances`?");
}

#[test]
fn check_json_carries_the_ir_when_valid() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "apm.conf",
        "worker { exec node; kill_timeout 3s; server https://0.0.0.0:8443; tls on; tls_cert c.pem; tls_key k.pem; trust_proxy false; }\n",
    );
    // A real certificate and key: `apm check` loads them as TLS would.
    let made = certs::self_signed(dir.path(), "k.pem", "c.pem", "/CN=localhost");
    if !made {
        prerequisite_missing("openssl could not make a test certificate");
        return;
    }
    let output = apm(&["check", "apm.conf", "--json"], dir.path());
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let worker = &report["config"]["workers"][0];
    assert_eq!(worker["kill_timeout"], 3000);
    assert_eq!(
        worker["server"][0],
        serde_json::json!({"scheme": "https", "host": "0.0.0.0", "port": 8443})
    );
    assert_eq!(worker["tls_cert"], "c.pem");
}

#[test]
fn check_github_format_annotates_and_warnings_can_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "apm.conf",
        "worker { exec node; colour red; }\n",
    );
    let output = apm(&["check", "--format=github", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout(&output),
        "::warning file=apm.conf,line=1,col=21,endLine=1,endColumn=27,title=W0001::unknown key `colour` in `worker { }`; it is ignored\n"
    );
    let denied = apm(&["check", "--deny-warnings", "apm.conf"], dir.path());
    assert_eq!(denied.status.code(), Some(1));
}

#[test]
fn check_reports_a_missing_file_in_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let output = apm(&["check", "nope.conf"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "apm: cannot read `nope.conf`: No such file or directory (os error 2)\n"
    );
    assert!(output.stdout.is_empty());
    let usage = apm(&["check", "--format", "yaml", "x.conf"], dir.path());
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn check_rejects_invalid_utf8_at_the_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("apm.conf"),
        b"worker { exec node; }\n# caf\xe9\n",
    )
    .unwrap();
    let output = apm(&["check", "--json", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let d = &report["diagnostics"][0];
    assert_eq!(
        (d["code"].as_str(), d["line"].as_u64(), d["column"].as_u64()),
        (Some("E0001"), Some(2), Some(6))
    );
}

#[test]
fn check_does_not_start_a_daemon_or_need_one() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "apm.conf", "worker { exec node; }\n");
    let home = dir.path().join("home");
    let output = Command::new(env!("CARGO_BIN_EXE_apm"))
        .args(["check", "apm.conf"])
        .current_dir(dir.path())
        .env("APM_HOME", &home)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(!home.exists(), "apm check must not create daemon state");
}

#[test]
fn explain_prints_the_long_text_of_a_code() {
    let dir = tempfile::tempdir().unwrap();
    let output = apm(&["explain", "e0004"], dir.path());
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stdout(&output).starts_with("E0004 (error): missing `;`\n\nEvery statement ends with `;`")
    );
    let list = apm(&["explain"], dir.path());
    assert!(stdout(&list).lines().any(|l| l.starts_with("W0006")));
    assert_eq!(
        apm(&["explain", "E9999"], dir.path()).status.code(),
        Some(2)
    );
}

#[test]
fn check_reports_a_certificate_and_key_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    for (key, cert) in [("k1.pem", "c1.pem"), ("k2.pem", "c2.pem")] {
        let made = certs::self_signed(dir.path(), key, cert, "/CN=localhost");
        if !made {
            prerequisite_missing("openssl could not make a test certificate");
            return;
        }
    }
    write(
        dir.path(),
        "apm.conf",
        "worker { exec x; server https://127.0.0.1:9443; tls on; tls_cert c1.pem; tls_key k2.pem; }\n",
    );
    let output = apm(&["check", "--format", "github", "apm.conf"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.starts_with("::error file=apm.conf,line=1,col=66,")
            && text.contains("title=E0018")
            && text.contains("c1.pem"),
        "{text}"
    );
}

#[test]
fn fmt_checks_shows_the_diff_and_rewrites_keeping_comments() {
    let dir = tempfile::tempdir().unwrap();
    let messy = "# the api\nworker{name api;exec node;   params server.js;}\n";
    write(dir.path(), "apm.conf", messy);
    let read = || std::fs::read_to_string(dir.path().join("apm.conf")).unwrap();

    let check = apm(&["fmt", "apm.conf", "--check"], dir.path());
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("apm.conf is not formatted"),
        "{}",
        stderr(&check)
    );
    let diff = apm(&["fmt", "apm.conf", "--diff"], dir.path());
    assert_eq!(diff.status.code(), Some(1));
    let text = stdout(&diff);
    assert!(
        text.contains("-worker{name api;exec node;   params server.js;}")
            && text.contains("+worker {"),
        "{text}"
    );
    assert_eq!(read(), messy, "--check and --diff leave the file alone");

    let rewrite = apm(&["fmt", "apm.conf"], dir.path());
    assert_eq!(rewrite.status.code(), Some(0), "{}", stderr(&rewrite));
    let formatted = read();
    assert!(formatted.starts_with("# the api\n"), "{formatted}");
    assert_ne!(formatted, messy);
    assert_eq!(
        apm(&["fmt", "apm.conf", "--check"], dir.path())
            .status
            .code(),
        Some(0)
    );

    write(
        dir.path(),
        "broken.conf",
        "worker { name x; exec \"unclosed; }\n",
    );
    let broken = apm(&["fmt", "broken.conf"], dir.path());
    assert_eq!(broken.status.code(), Some(1));
    assert!(
        stderr(&broken).contains("syntax errors"),
        "{}",
        stderr(&broken)
    );
}

/// The help a new user reaches for: `apm help run` and `apm run --help` show
/// the worker flags with defaults in the units configs use, mark the
/// features not built yet (none now), and point to the full listing; `apm help` names
/// the `ls` alias and the help command itself.
#[test]
fn help_shows_the_worker_flags_of_run_and_update() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["help", "run"][..],
        &["run", "--help"],
        &["update", "--help"],
    ] {
        let output = apm(args, dir.path());
        let text = stdout(&output);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(
            text.contains("-keep_alive") && text.contains("[default: 2m]"),
            "{args:?}:\n{text}"
        );
        assert!(text.contains("-restart_delay") && text.contains("[default: 250ms]"));
        // IPC and session hand-off are built: no flag is marked as not.
        assert!(
            text.lines()
                .any(|l| l.contains("-listen") && !l.contains("not built yet")),
            "{args:?}:\n{text}"
        );
        assert!(!text.contains("not built yet"), "{args:?}:\n{text}");
        assert!(text.contains("`apm -h --full`"), "{args:?}:\n{text}");
        assert!(!text.contains("defaults to the daemon log"), "{text}");
    }
    let output = apm(&["help"], dir.path());
    let text = stdout(&output);
    assert!(output.status.success());
    assert!(text.contains("[alias: ls]"), "{text}");
    assert!(text.contains("apm help COMMAND"), "{text}");
    let log = stdout(&apm(&["help", "log"], dir.path()));
    for flag in ["--err", "--follow", "--lines"] {
        let line = log
            .lines()
            .find(|l| l.trim_start().starts_with('-') && l.contains(flag))
            .unwrap_or_default();
        assert!(
            line.split(flag)
                .nth(1)
                .is_some_and(|rest| rest.trim().len() > 10),
            "{log}"
        );
    }
}

/// A file of millions of mistakes: `apm check` keeps the first diagnostics
/// in detail, counts the rest, stops reading a file after 10,000 syntax
/// errors, and refuses a file over the size bound unread. It took 48.7 s,
/// 8.9 GB and 911 MB of output for 2.5 million errors.
#[test]
fn check_of_a_file_of_millions_of_mistakes_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "braces.conf", &"}\n".repeat(2_000_000));
    write(dir.path(), "keys.conf", &"bogus value;\n".repeat(300_000));
    for (file, expected) in [
        ("braces.conf", "… and 9,902 more errors, not shown"),
        ("keys.conf", "more warnings, not shown"),
    ] {
        let started = std::time::Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_apm"))
            .args(["check", file])
            .current_dir(dir.path())
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(60) {
                child.kill().unwrap();
                panic!("{file}: `apm check` still running after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(1), "{file}");
        assert!(
            text.len() < 100_000,
            "{file}: {} bytes of output",
            text.len()
        );
        assert!(text.contains(expected), "{file}: {text}");
        assert_eq!(
            text.matches("Error:").count() + text.matches("Warning:").count(),
            100,
            "{file}"
        );
    }

    let huge = std::fs::File::create(dir.path().join("huge.conf")).unwrap();
    huge.set_len(apm_compiler::include::MAX_BYTES as u64 + 1)
        .unwrap();
    let output = apm(&["check", "huge.conf"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("is over 16 MiB"),
        "{}",
        stderr(&output)
    );
}
