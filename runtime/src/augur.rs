//! Augur, the startup-failure diagnostician: for an instance that failed
//! its start, one-line hints read from its stderr (the classifier), and
//! the dependencies its project declares but does not have installed (the
//! deep scan: `package.json` against `node_modules`, `composer.json`
//! against `vendor`), so that "copied the code, forgot to install"
//! takes one restart instead of one per missing package.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What augur found for a failed start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub hints: Vec<String>,
    /// Declared dependencies not installed, beyond those the hints name.
    pub missing: Option<Missing>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Missing {
    pub names: Vec<String>,
    /// The command that installs them, run in the project's directory.
    pub install: String,
}

pub fn diagnose(stderr: &str, project: Option<&Path>) -> Diagnosis {
    let (hints, named) = classify(stderr);
    let missing = project.and_then(scan).and_then(|mut missing| {
        missing.names.retain(|n| !named.contains(n));
        (!missing.names.is_empty()).then(|| Missing {
            install: format!("{} {}", missing.install, missing.names.join(" ")),
            names: missing.names,
        })
    });
    Diagnosis { hints, missing }
}

/// `augur_full_scan`: what keeps a process of the project in `dir` from
/// starting (its declared dependencies not installed), if anything.
pub fn preflight(dir: &Path) -> Option<String> {
    let missing = scan(dir)?;
    (!missing.names.is_empty()).then(|| {
        format!(
            "augur_full_scan: {} declared dependencies are not installed (not started)",
            missing.names.len()
        )
    })
}

/// The text between `start` and the next `end` after it.
fn between<'t>(text: &'t str, start: &str, end: &str) -> Option<&'t str> {
    let from = text.find(start)? + start.len();
    let rest = &text[from..];
    Some(&rest[..rest.find(end)?])
}

/// The hints for stderr, each once, and the packages they name as missing.
fn classify(stderr: &str) -> (Vec<String>, Vec<String>) {
    let mut hints: Vec<String> = Vec::new();
    let mut named = Vec::new();
    let mut hint = |text: String| {
        if !hints.contains(&text) {
            hints.push(text);
        }
    };
    for line in stderr.lines() {
        if let Some(module) = between(line, "Cannot find module '", "'") {
            if module.starts_with('.') || module.starts_with('/') {
                hint(format!("a file the program requires is missing: {module}"));
            } else {
                // `pkg/sub` and `@scope/pkg/sub` come from `pkg` and `@scope/pkg`.
                let parts = if module.starts_with('@') { 2 } else { 1 };
                let package: Vec<&str> = module.split('/').take(parts).collect();
                let package = package.join("/");
                hint(format!("missing node module {package} — run npm install"));
                named.push(package);
            }
        } else if let Some(module) = between(line, "No module named '", "'") {
            let top = module.split('.').next().unwrap_or(module);
            hint(format!(
                "missing Python module {top} — pip install it (its package name may differ)"
            ));
            named.push(top.to_owned());
        } else if let Some(file) = between(line, "Can't locate ", " in @INC") {
            let module = file.trim_end_matches(".pm").replace('/', "::");
            hint(format!("missing Perl module {module} — run cpan {module}"));
        } else if let Some(library) = line.split("cannot load such file -- ").nth(1) {
            let library = library.split_whitespace().next().unwrap_or(library);
            hint(format!(
                "missing Ruby library {library} — run bundle install or gem install {library}"
            ));
        } else if let Some(class) = between(line, "Class '", "' not found")
            .or_else(|| between(line, "Class \"", "\" not found"))
        {
            hint(format!(
                "PHP class {class} not found — run composer install, or check its namespace"
            ));
        } else if let Some(function) = line.split("Call to undefined function ").nth(1) {
            let function = function.split('(').next().unwrap_or(function);
            hint(format!(
                "undefined PHP function {function} — a PHP extension may be missing"
            ));
        } else if let Some(class) = line.split("Could not find or load main class ").nth(1) {
            hint(format!(
                "Java main class {} not found — check the classpath",
                class.trim()
            ));
        } else if line.contains("UnsupportedClassVersionError") {
            hint("compiled for a newer Java than the one that runs it".to_owned());
        } else if line.contains("ClassNotFoundException") || line.contains("NoClassDefFoundError") {
            hint("a Java class is missing from the classpath".to_owned());
        } else if let Some(command) = command_not_found(line) {
            hint(format!(
                "command {command} not found — install it or fix PATH"
            ));
        } else if line.contains("EADDRINUSE") || line.contains("Address already in use") {
            hint(
                "its port is already in use: another process listens on it (`ss -ltnp` names it)"
                    .to_owned(),
            );
        } else if line.contains("ECONNREFUSED") || line.contains("Connection refused") {
            hint("a service it connects to at start is not running or not reachable".to_owned());
        } else if line.contains("EACCES") || line.contains("Permission denied") {
            hint(
                "permission denied: check file modes, the `user` it runs as, and ports below 1024"
                    .to_owned(),
            );
        } else if line.contains("nil pointer dereference") {
            hint("the Go program dereferenced a nil pointer at start (trace above)".to_owned());
        } else if line.starts_with("panic:") {
            hint("the Go program panicked at start (trace above)".to_owned());
        } else if line.contains("IndentationError") || line.contains("TabError") {
            hint("a Python indentation error at the line shown".to_owned());
        } else if line.contains("SyntaxError")
            || line.contains("Parse error")
            || line.contains("syntax error")
        {
            hint("a syntax error in the program, at the line shown".to_owned());
        } else if line.starts_with("NameError") || line.contains("Error: NameError") {
            hint("a Python name used before it is defined".to_owned());
        } else if line.contains("Failed opening required") {
            hint("a file the PHP program requires is missing".to_owned());
        } else if line.contains("ImportError") {
            hint(
                "a Python import failed: check the installed version of the package named"
                    .to_owned(),
            );
        }
    }
    (hints, named)
}

/// `bash: foo: command not found`, `sh: 1: foo: not found`.
fn command_not_found(line: &str) -> Option<&str> {
    let rest = line
        .strip_suffix(": command not found")
        .or_else(|| line.strip_suffix(": not found"))?;
    rest.rsplit(": ").next().filter(|c| !c.is_empty())
}

/// The declared dependencies of the project in `dir` that are not
/// installed, with the command that installs such a list.
fn scan(dir: &Path) -> Option<Missing> {
    let manifest = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let declared = |json: &serde_json::Value, sections: &[&str]| -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for name in sections
            .iter()
            .filter_map(|s| json.get(*s)?.as_object())
            .flat_map(|deps| deps.keys())
        {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    };
    if let Some(json) = manifest("package.json") {
        let names = declared(&json, &["dependencies", "devDependencies"])
            .into_iter()
            // Node looks in `node_modules` of the directory and of each above it.
            .filter(|name| {
                !dir.ancestors().any(|d| {
                    d.join("node_modules")
                        .join(name)
                        .join("package.json")
                        .is_file()
                })
            })
            .collect();
        return Some(Missing {
            names,
            install: format!("cd {} && npm install", dir.display()),
        });
    }
    if let Some(json) = manifest("composer.json") {
        let names = declared(&json, &["require", "require-dev"])
            .into_iter()
            // The platform's own (`php`, `ext-json`) are not packages.
            .filter(|name| name.contains('/'))
            .filter(|name| !dir.join("vendor").join(name).is_dir())
            .collect();
        return Some(Missing {
            names,
            install: format!("cd {} && composer require", dir.display()),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hints(stderr: &str) -> Vec<String> {
        classify(stderr).0
    }

    #[test]
    fn each_languages_missing_dependency_is_named() {
        let cases = [
            (
                "Error: Cannot find module 'redis'\nRequire stack:",
                "missing node module redis — run npm install",
            ),
            (
                "Error: Cannot find module '@aws-sdk/client-s3/dist'",
                "missing node module @aws-sdk/client-s3 — run npm install",
            ),
            (
                "Error: Cannot find module './config'",
                "a file the program requires is missing: ./config",
            ),
            (
                "ModuleNotFoundError: No module named 'yaml.loader'",
                "missing Python module yaml — pip install it (its package name may differ)",
            ),
            (
                "Can't locate JSON/XS.pm in @INC (you may need to install",
                "missing Perl module JSON::XS — run cpan JSON::XS",
            ),
            (
                "<internal:lib>: cannot load such file -- sinatra (LoadError)",
                "missing Ruby library sinatra — run bundle install or gem install sinatra",
            ),
            (
                "PHP Fatal error:  Uncaught Error: Class \"Monolog\\Logger\" not found",
                "PHP class Monolog\\Logger not found — run composer install, or check its namespace",
            ),
            (
                "Call to undefined function mb_strlen() in",
                "undefined PHP function mb_strlen — a PHP extension may be missing",
            ),
            (
                "Error: Could not find or load main class com.example.Main",
                "Java main class com.example.Main not found — check the classpath",
            ),
            (
                "sh: 1: nodemon: not found",
                "command nodemon not found — install it or fix PATH",
            ),
            (
                "bash: gunicorn: command not found",
                "command gunicorn not found — install it or fix PATH",
            ),
            (
                "Error: listen EADDRINUSE: address already in use :::3000",
                "its port is already in use: another process listens on it (`ss -ltnp` names it)",
            ),
            (
                "panic: runtime error: invalid memory address or nil pointer dereference",
                "the Go program dereferenced a nil pointer at start (trace above)",
            ),
            (
                "    ^\nSyntaxError: Unexpected token '}'",
                "a syntax error in the program, at the line shown",
            ),
            (
                "IndentationError: unexpected indent",
                "a Python indentation error at the line shown",
            ),
        ];
        for (stderr, hint) in cases {
            assert_eq!(hints(stderr), [hint], "{stderr}");
        }
        assert!(hints("all fine, just exiting").is_empty());
        assert_eq!(
            hints("EACCES\nPermission denied").len(),
            1,
            "each hint once"
        );
    }

    #[test]
    fn the_deep_scan_lists_what_the_manifest_declares_and_is_not_installed() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("app");
        std::fs::create_dir_all(project.join("node_modules/express")).unwrap();
        std::fs::write(project.join("node_modules/express/package.json"), "{}").unwrap();
        // Found in a node_modules above the project, as Node finds it.
        std::fs::create_dir_all(dir.path().join("node_modules/@scope/util")).unwrap();
        std::fs::write(
            dir.path().join("node_modules/@scope/util/package.json"),
            "{}",
        )
        .unwrap();
        std::fs::write(
            project.join("package.json"),
            r#"{"dependencies": {"express": "4", "redis": "4", "@scope/util": "1"}, "devDependencies": {"ws": "8"}}"#,
        )
        .unwrap();
        let diagnosis = diagnose("Error: Cannot find module 'redis'", Some(&project));
        assert_eq!(
            diagnosis.hints,
            ["missing node module redis — run npm install"]
        );
        let missing = diagnosis.missing.unwrap();
        assert_eq!(missing.names, ["ws"], "redis is named by the hint already");
        assert_eq!(
            missing.install,
            format!("cd {} && npm install ws", project.display())
        );

        let php = dir.path().join("php");
        std::fs::create_dir_all(php.join("vendor/monolog/monolog")).unwrap();
        std::fs::write(
            php.join("composer.json"),
            r#"{"require": {"php": ">=8.1", "ext-json": "*", "monolog/monolog": "3", "guzzlehttp/guzzle": "7"}}"#,
        )
        .unwrap();
        let missing = diagnose("", Some(&php)).missing.unwrap();
        assert_eq!(missing.names, ["guzzlehttp/guzzle"]);
        assert!(
            diagnose("", Some(dir.path())).missing.is_none(),
            "no manifest"
        );
    }
}
