//! The conversion corpus, `corpus/convert/`: one file per case with sections
//!
//! ```text
//! --- input ecosystem.config.js ---   the ecosystem file, under its own name
//! --- file .env ---                    other files beside it (package.json, .env), as needed
//! --- args --env production ---        optional: `--env NAME`
//! --- output ---                       golden: the apm config printed
//! --- warnings ---                     golden: the warnings, `line:column: message`
//! ```
//!
//! Conversions run with 4 CPUs and `process.env` = {HOME=/home/app,
//! DEPLOY_ENV=staging}. Every output must compile without errors.
//! `BLESS=1` rewrites the goldens.

use std::fs;
use std::path::Path;

use crate::sections::sections;

fn run_case(path: &Path) -> Result<(String, String), String> {
    let text = fs::read_to_string(path).unwrap();
    let sections = sections(&text);
    let dir = tempfile::tempdir().unwrap();
    let mut input = None;
    let mut env = None;
    for (name, body) in &sections {
        if let Some(file) = name
            .strip_prefix("input ")
            .or_else(|| name.strip_prefix("file "))
        {
            let target = dir.path().join(file);
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::write(&target, body).unwrap();
            if name.starts_with("input ") {
                input = Some((target, body.clone()));
            }
        } else if let Some(args) = name.strip_prefix("args ") {
            env = args.strip_prefix("--env ").map(str::to_owned);
        }
    }
    let (input, source) = input.ok_or("no `--- input NAME ---` section")?;
    let options = apm_convert::Options { env, cpus: 4 };
    let process_env = [
        ("HOME".into(), "/home/app".into()),
        ("DEPLOY_ENV".into(), "staging".into()),
    ];
    let dir_text = dir.path().display().to_string();
    let converted = evaluate(&input, &source, &process_env)
        .and_then(|value| apm_convert::convert(&input, &source, value, &options))
        .map_err(|e| e.replace(&dir_text, "<dir>"))?;
    let output = converted.text.replace(&dir_text, "<dir>");
    let warnings: String = converted
        .warnings
        .iter()
        .map(|w| format!("{}:{}: {}\n", w.line, w.column, w.message))
        .collect();
    // The output must be a valid config (paths refer to the temporary directory).
    let compilation = apm_compiler::compile(
        Path::new("out.conf"),
        &apm_compiler::MemLoader::new()
            .file("out.conf", converted.text.clone())
            .user("www-data")
            .user("app")
            .env("HOME", "/home/app"),
    )
    .unwrap();
    if compilation.has_errors() {
        return Err(format!(
            "the output does not compile:\n{}",
            apm_compiler::render::human(&compilation, false)
        ));
    }
    Ok((output, warnings))
}

#[test]
fn corpus_convert() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/convert");
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    paths.sort();
    let mut failures = Vec::new();
    for path in &paths {
        let text = fs::read_to_string(path).unwrap();
        let (output, warnings) = match run_case(path) {
            Ok(result) => result,
            Err(error) => (format!("ERROR: {error}\n"), String::new()),
        };
        let head = &text[..text.find("--- output ---").unwrap_or(text.len())];
        let expected = format!("{head}--- output ---\n{output}--- warnings ---\n{warnings}");
        if std::env::var_os("BLESS").is_some() {
            fs::write(path, &expected).unwrap();
        } else if text != expected {
            failures.push(format!(
                "{}: differs (BLESS=1 to update)\n--- expected\n{text}\n--- actual\n{expected}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        paths.len() >= 40,
        "corpus/convert has {} cases; keep at least 40",
        paths.len()
    );
}

/// Evaluates in this process, as the child `apm convert` starts does.
fn evaluate(
    path: &Path,
    source: &str,
    env: &[(String, String)],
) -> Result<serde_json::Value, String> {
    apm_convert::eval::evaluate(path, source, &apm_convert::eval::Sandbox { env, cpus: 4 })
}

fn convert_in(dir: &Path, name: &str, source: &str) -> Result<apm_convert::Converted, String> {
    let path = dir.join(name);
    fs::write(&path, source).unwrap();
    let options = apm_convert::Options { env: None, cpus: 2 };
    evaluate(&path, source, &[])
        .and_then(|value| apm_convert::convert(&path, source, value, &options))
}

fn convert_source(name: &str, source: &str) -> Result<apm_convert::Converted, String> {
    convert_in(tempfile::tempdir().unwrap().path(), name, source)
}

#[test]
fn bad_input_gets_a_clear_message_never_a_hang() {
    let cases = [
        (
            "syntax.config.js",
            "module.exports = { apps: [ { name: 'a', script: 'a.js' } ;",
            "SyntaxError",
        ),
        (
            "throws.config.js",
            "throw new Error('boom'); module.exports = { apps: [] }",
            "throws.config.js:1:7: Error: boom",
        ),
        (
            "loop.config.js",
            "while (true) {} module.exports = { apps: [] }",
            "infinite loop",
        ),
        (
            "number.config.js",
            "module.exports = 42",
            "not a PM2 ecosystem file",
        ),
        (
            "apps_number.config.js",
            "module.exports = { apps: 42 }",
            "not a list of apps",
        ),
        (
            "noscript.config.js",
            "module.exports = { apps: [{ name: 'a' }] }",
            "script",
        ),
        ("empty.config.js", "", "the file is empty"),
        (
            "app_code.js",
            "require('http').createServer().listen(8000)",
            "expects a PM2 ecosystem file",
        ),
        (
            "requires.config.js",
            "const x = require('lodash'); module.exports = { apps: [] }",
            "--node",
        ),
    ];
    for (name, source, expected) in cases {
        let error = convert_source(name, source)
            .err()
            .unwrap_or_else(|| panic!("{name} converted"));
        assert!(error.contains(expected), "{name}: {error}");
    }
}

#[test]
fn a_file_that_is_too_large_is_refused_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.config.js");
    let file = fs::File::create(&path).unwrap();
    file.set_len(apm_convert::eval::MAX_SIZE + 1).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apm"))
        .args(["convert", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not evaluated"));
}

/// Text from a hostile file (field names and values with newlines, `;`,
/// braces, `#` and quotes) reaches the output quoted or as one comment line:
/// compiled again, the output holds the one worker the file defines, with
/// its values intact, and nothing planted.
#[test]
fn input_text_cannot_plant_keys_or_workers_in_the_output() {
    let planted = "\nworker { exec /bin/planted; }\n";
    let source = format!(
        "module.exports = {{ apps: [{{
  name: 'api',
  script: 'api.js',
  cwd: {cwd},
  args: [{arg}],
  env: {{ B: {b}, C: {c} }},
  {field}: 1,
  stop_exit_codes: [{code}],
  log_date_format: {date},
}}] }}",
        cwd = serde_json::json!(format!("/srv/app{planted}")),
        arg = serde_json::json!(format!("x; }} {planted} #")),
        b = serde_json::json!(format!("v; }} {planted} # // y")),
        c = serde_json::json!("\"quoted\" 'q' `b` {x} \\ # y // z\r\u{1b}[2J"),
        field = serde_json::json!(format!(
            "bogus{planted}\u{2028}worker {{ exec /bin/planted2; }}"
        )),
        code = serde_json::json!(format!("1{planted}")),
        date = serde_json::json!(format!("YYYY{planted}")),
    );
    let converted = convert_source("hostile.config.js", &source).unwrap();
    let compilation = apm_compiler::compile(
        Path::new("out.conf"),
        &apm_compiler::MemLoader::new().file("out.conf", converted.text.clone()),
    )
    .unwrap();
    let config = &compilation.config;
    assert_eq!(config.workers.len(), 1, "{}", converted.text);
    let worker = &config.workers[0];
    assert_eq!(worker.name.value, "api");
    assert_eq!(worker.exec.value, "node");
    assert_eq!(
        worker.path.as_ref().map(|p| p.value.display().to_string()),
        Some(format!("/srv/app{planted}"))
    );
    let params: Vec<&str> = worker.params.iter().map(|p| p.value.as_str()).collect();
    assert_eq!(params, ["api.js", &format!("x; }} {planted} #")]);
    let env: Vec<String> = worker
        .env
        .iter()
        .map(|e| format!("{}={}", e.value.key, e.value.value))
        .collect();
    assert!(
        env.contains(&format!("B=v; }} {planted} # // y")),
        "{env:?}"
    );
    assert!(
        env.contains(&"C=\"quoted\" 'q' `b` {x} \\ # y // z\r\u{1b}[2J".to_owned()),
        "{env:?}"
    );
    for comment in converted.text.lines().filter(|l| l.starts_with('#')) {
        assert!(!comment.contains(['\u{1b}', '\u{2028}']), "{comment}");
    }
    for warning in &converted.warnings {
        assert!(!warning.message.contains(['\n', '\u{1b}']), "{warning:?}");
    }
    assert!(
        !compilation
            .diagnostics
            .iter()
            .any(|d| d.severity() == apm_compiler::Severity::Error),
        "{}",
        apm_compiler::render::human(&compilation, false)
    );
}

/// `dotenv` reads `.env*` files beside the ecosystem file only: not one
/// above it, not an absolute path elsewhere, not through a symbolic link.
#[test]
fn dotenv_reads_only_env_files_beside_the_ecosystem_file() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("app");
    fs::create_dir(&dir).unwrap();
    fs::write(outer.path().join(".env"), "SECRET=outside\n").unwrap();
    fs::write(dir.join(".env.production"), "MODE=production\n").unwrap();
    std::os::unix::fs::symlink(outer.path().join(".env"), dir.join(".env.link")).unwrap();
    let with = |path: &str| {
        format!(
            "const path = require('path');
require('dotenv').config({{ path: {path} }});
module.exports = {{ apps: [{{ name: 'a', script: 'a.js', env: {{ V: process.env.SECRET || process.env.MODE }} }}] }}"
        )
    };
    let beside = convert_in(
        &dir,
        "ok.config.js",
        &with("path.join(__dirname, '.env.production')"),
    )
    .unwrap();
    assert!(beside.text.contains("V=production"), "{}", beside.text);
    let outside = outer.path().join(".env").display().to_string();
    for (name, requested) in [
        ("up.config.js", "'../.env'".to_owned()),
        ("sub.config.js", "'./sub/../../.env'".to_owned()),
        ("absolute.config.js", format!("'{outside}'")),
        ("link.config.js", "'.env.link'".to_owned()),
        ("other.config.js", "'/etc/passwd'".to_owned()),
    ] {
        let error = convert_in(&dir, name, &with(&requested))
            .err()
            .unwrap_or_else(|| panic!("{name}: {requested} was read"));
        assert!(
            error.contains("dotenv") && !error.contains("outside"),
            "{name}: {error}"
        );
    }
}

/// `apm convert FILE` through the binary, in `dir`.
fn apm_convert(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apm"))
        .arg("convert")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A file that needs a module outside the sandbox is refused by name, and
/// the local node never runs it unasked (it used to stand in silently, as
/// the invoking user: here it would have written `ran`).
#[test]
fn a_file_needing_child_process_is_refused_and_node_runs_only_with_node() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("ecosystem.config.js"),
        "require('fs').writeFileSync(__dirname + '/ran', 'x');
module.exports = { apps: [{ name: 'a', script: 'a.js' }] }",
    )
    .unwrap();
    let (status, stdout, stderr) = apm_convert(dir.path(), &["ecosystem.config.js"]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("module `fs`") && stderr.contains("--node"),
        "{stderr}"
    );
    assert!(!dir.path().join("ran").exists(), "the file ran");

    if !std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        crate::harness::prerequisite_missing("node is not installed; --node was not tried");
        return;
    }
    let (status, stdout, stderr) = apm_convert(dir.path(), &["--node", "ecosystem.config.js"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("worker {"), "{stdout}");
    let uid = nix::unistd::getuid();
    assert!(
        stderr.contains("--node: running `ecosystem.config.js`")
            && stderr.contains(&format!("as uid {uid}"))
            && stderr.contains("outside any sandbox"),
        "{stderr}"
    );
    assert!(dir.path().join("ran").exists());
}

/// Memory and CPU bombs end quickly with a clear error. The CLI runs under
/// a 2 GiB data limit of its own: evaluated in apm's process, the bomb
/// would abort it at that limit instead (or take the machine's memory).
#[test]
fn memory_and_cpu_bombs_end_quickly_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "memory.config.js",
            "var s = 'x'; for (var i = 0; i < 40; i++) { s = s + s; } module.exports = { apps: [{ script: s }] }",
            "memory",
        ),
        (
            "regex.config.js",
            "/(a+)+$/.test('a'.repeat(40) + '!'); module.exports = { apps: [] }",
            "did not finish evaluating the file within 2 s",
        ),
        (
            "recursion.config.js",
            "function f(n) { return n === 0 ? 0 : 1 + f(n - 1); } module.exports = { apps: [{ script: 'x' + f(1e9) }] }",
            "recursion",
        ),
    ];
    for (name, source, expected) in cases {
        fs::write(dir.path().join(name), source).unwrap();
        let started = std::time::Instant::now();
        let output = std::process::Command::new("prlimit")
            .arg(format!("--data={}", 2u64 << 30))
            .arg(env!("CARGO_BIN_EXE_apm"))
            .args(["convert", "--timeout", "2s", name])
            .current_dir(dir.path())
            .output();
        let Ok(output) = output else {
            crate::harness::prerequisite_missing("prlimit (util-linux) is not installed");
            return;
        };
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(stderr.lines().count() <= 12, "{name}: {stderr}");
        assert!(
            elapsed < std::time::Duration::from_secs(10),
            "{name}: {elapsed:?}"
        );
    }
}

/// A script without an extension is looked at as PM2 looks at it when it
/// starts the app: bytes that are not text (a NUL, or too many control
/// bytes) make a binary that runs itself; an executable with a node `#!`
/// line runs itself (what node would run); other text, UTF-8 included,
/// runs with node.
#[test]
fn a_script_without_an_extension_is_run_as_its_content_says() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    fs::write(bin.join("server"), b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    fs::write(
        bin.join("noisy"),
        [0x1bu8, 0x01, 0x02, 0x03, b'a', b'b', b'c'].repeat(20),
    )
    .unwrap();
    fs::write(bin.join("cli"), "#!/usr/bin/env node\nconsole.log('hi')\n").unwrap();
    fs::set_permissions(bin.join("cli"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        bin.join("text"),
        "// héllo wörld, ünïcode\nrequire('./x')\n",
    )
    .unwrap();
    let converted = convert_in(
        dir.path(),
        "ecosystem.config.js",
        "module.exports = { apps: [
            { name: 'server', script: 'bin/server' },
            { name: 'noisy', script: 'bin/noisy' },
            { name: 'cli', script: 'bin/cli' },
            { name: 'text', script: 'bin/text' },
        ] }",
    )
    .unwrap();
    // Each block's `name` and `exec` values, by name.
    let exec_of = |name: &str| {
        let value = |block: &str, key: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(' '))
                .map(|v| v.trim().trim_end_matches(';').to_owned())
        };
        converted
            .text
            .split("worker {")
            .find(|block| value(block, "name").as_deref() == Some(name))
            .and_then(|block| value(block, "exec"))
            .unwrap()
    };
    assert_eq!(exec_of("server"), "bin/server", "{}", converted.text);
    assert_eq!(exec_of("noisy"), "bin/noisy", "{}", converted.text);
    assert_eq!(exec_of("cli"), "bin/cli", "{}", converted.text);
    assert_eq!(exec_of("text"), "node", "{}", converted.text);
}

/// Through the CLI (the child evaluation), an error the file throws is
/// reported at the file's line and column under the name the user gave,
/// not at the wrapper's call site.
#[test]
fn a_throw_is_reported_at_the_users_line_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("ecosystem.config.js"),
        "// needs a secret\nconst secret = process.env.APM_TEST_UNSET_SECRET;\nif (!secret) throw new Error('set the secret');\nmodule.exports = { apps: [{ script: 'api.js' }] };\n",
    )
    .unwrap();
    let (status, _, stderr) = apm_convert(dir.path(), &["ecosystem.config.js"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ecosystem.config.js:3:20: Error: set the secret"),
        "{stderr}"
    );
}
