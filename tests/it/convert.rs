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
    let options = apm_convert::Options {
        node: false,
        env,
        cpus: 4,
        fallback_to_node: false,
        process_env: vec![
            ("HOME".into(), "/home/app".into()),
            ("DEPLOY_ENV".into(), "staging".into()),
        ],
    };
    let dir_text = dir.path().display().to_string();
    let converted = apm_convert::convert(&input, &source, &options)
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

fn convert_source(name: &str, source: &str) -> Result<apm_convert::Converted, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    fs::write(&path, source).unwrap();
    let options = apm_convert::Options {
        node: false,
        env: None,
        cpus: 2,
        fallback_to_node: true,
        process_env: vec![],
    };
    apm_convert::convert(&path, source, &options)
}

#[test]
fn bad_input_gets_a_clear_message_never_a_hang() {
    let cases = [
        (
            "syntax.config.js",
            "module.exports = { apps: [ { name: 'a', script: 'a.js' } ;",
            "SyntaxError",
        ),
        ("throws.config.js", "throw new Error('boom')", "boom"),
        ("loop.config.js", "while (true) {}", "infinite loop"),
        ("number.config.js", "module.exports = 42", "a number"),
        (
            "noscript.config.js",
            "module.exports = { apps: [{ name: 'a' }] }",
            "script",
        ),
        ("empty.config.js", "", "defines no apps"),
        (
            "requires.config.js",
            "const x = require('lodash'); module.exports = {}",
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
