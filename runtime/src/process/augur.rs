//! Augur, the startup-failure diagnostician: for an instance that failed
//! its start, one-line hints read from its stderr (the classifier), and
//! the dependencies its project needs but does not have installed (the
//! deep scan: `package.json` against `node_modules`, `composer.json`
//! against `vendor`, `requirements.txt` against the interpreter's
//! site-packages, a `Gemfile` against the gem directories, and without
//! any manifest the entry file's imports), so that "copied the code,
//! forgot to install" takes one restart instead of one per missing
//! package. It reads files only: it runs no interpreter.

mod node;
mod python;
mod ruby;

use std::path::{Path, PathBuf};

use apm_compiler::ir::WorkerSpec;
use serde::{Deserialize, Serialize};

use crate::process::procfs::Listener;

/// What augur found for a failed start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub hints: Vec<String>,
    /// Dependencies of the project not installed, beyond those the hints name.
    pub missing: Option<Missing>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Missing {
    pub names: Vec<String>,
    /// The command that installs them, run in the project's directory.
    pub install: String,
}

pub fn diagnose(stderr: &str, spec: &WorkerSpec) -> Diagnosis {
    diagnose_program(
        stderr,
        &Program::of(spec),
        &crate::process::procfs::tcp_listener,
    )
}

/// `augur_full_scan`: what keeps a process of the worker from starting
/// (dependencies of its project not installed), if anything.
pub fn preflight(spec: &WorkerSpec) -> Option<String> {
    preflight_message(&Program::of(spec))
}

fn preflight_message(program: &Program) -> Option<String> {
    let scan = scan(program)?;
    let what = scan.what[usize::from(scan.names.len() > 1)];
    (!scan.names.is_empty()).then(|| {
        format!(
            "augur_full_scan: {} {what} not installed (not started)",
            scan.names.len()
        )
    })
}

/// The first MiB of a regular file, as text. A project's files are its
/// owner's choice and the daemon reads them in its supervisor: a FIFO
/// must not hold it, nor a huge file fill it.
fn read_text(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const LARGEST: u64 = 1 << 20;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(LARGEST).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// What augur needs of a worker: the program it runs and where.
#[derive(Clone, Debug, Default)]
struct Program {
    /// Its `path`; without one nothing is scanned (the daemon's own
    /// directory is no project).
    dir: Option<PathBuf>,
    exec: String,
    params: Vec<String>,
    /// Its `env` entries, which win over the daemon's environment.
    env: Vec<(String, String)>,
}

impl Program {
    fn of(spec: &WorkerSpec) -> Program {
        Program {
            dir: spec.path.as_ref().map(|p| p.value.clone()),
            exec: spec.exec.value.clone(),
            params: spec.params.iter().map(|p| p.value.clone()).collect(),
            env: spec
                .env
                .iter()
                .map(|e| (e.value.key.clone(), e.value.value.clone()))
                .collect(),
        }
    }

    /// An environment variable as the worker sees it.
    fn var(&self, key: &str) -> Option<String> {
        match self.env.iter().rev().find(|(k, _)| k == key) {
            Some((_, value)) => Some(value.clone()),
            None => std::env::var(key).ok(),
        }
    }

    /// Where a command the worker runs is found: relative to its
    /// directory when it has a slash, else through its PATH. Not resolved
    /// through symlinks: a venv's `bin/python` tells its venv by where it is.
    fn which(&self, command: &str) -> Option<PathBuf> {
        let executable = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if command.contains('/') {
            let path = match &self.dir {
                Some(dir) => dir.join(command),
                None => PathBuf::from(command),
            };
            return executable(&path).then_some(path);
        }
        let path = self.var("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(command))
            .find(|candidate| executable(candidate))
    }

    /// The source file the program starts from: its first param that
    /// names a Node or Python file, or the exec itself when it is one.
    fn entry(&self) -> Option<(Language, PathBuf)> {
        let dir = self.dir.as_deref()?;
        self.params
            .iter()
            .chain(std::iter::once(&self.exec))
            .find_map(|name| Some((Language::of(name)?, dir.join(name))))
            .filter(|(_, path)| path.is_file())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Language {
    Node,
    Python,
}

impl Language {
    fn of(file: &str) -> Option<Language> {
        let extension = Path::new(file).extension()?.to_str()?;
        match extension {
            "js" | "mjs" | "cjs" => Some(Language::Node),
            "py" => Some(Language::Python),
            _ => None,
        }
    }
}

fn diagnose_program(
    stderr: &str,
    program: &Program,
    listener: &dyn Fn(u16) -> Option<Listener>,
) -> Diagnosis {
    let (hints, named) = classify(stderr, listener);
    let missing = scan(program).and_then(|scan| {
        let names: Vec<String> = scan
            .names
            .into_iter()
            .filter(|n| !named.iter().any(|m| same_package(m, n)))
            .collect();
        (!names.is_empty()).then(|| Missing {
            install: match scan.install {
                Install::Listing(command) => format!("{command} {}", names.join(" ")),
                Install::Whole(command) => command,
            },
            names,
        })
    });
    Diagnosis { hints, missing }
}

/// Whether a module a hint names is the package a scan lists: Python's
/// names ignore case and treat `-`, `_` and `.` alike (PEP 503).
fn same_package(a: &str, b: &str) -> bool {
    python::normalise(a) == python::normalise(b)
}

/// The text between `start` and the next `end` after it.
fn between<'t>(text: &'t str, start: &str, end: &str) -> Option<&'t str> {
    let from = text.find(start)? + start.len();
    let rest = &text[from..];
    Some(&rest[..rest.find(end)?])
}

/// The hints for stderr, each once, and the packages they name as missing.
/// `listener` tells who listens on a port a failed bind names.
fn classify(
    stderr: &str,
    listener: &dyn Fn(u16) -> Option<Listener>,
) -> (Vec<String>, Vec<String>) {
    let mut hints: Vec<String> = Vec::new();
    let mut named = Vec::new();
    let mut hint = |text: String| {
        if !hints.contains(&text) {
            hints.push(text);
        }
    };
    let lines: Vec<&str> = stderr.lines().collect();
    for (at, line) in lines.iter().enumerate() {
        let line = *line;
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
        } else if line.contains("EADDRINUSE")
            || line.to_ascii_lowercase().contains("address already in use")
        {
            hint(port_in_use(busy_port(&lines, at), listener));
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

/// The port a failed bind names: on its line (Node's `:::3000`, Go's
/// `listen tcp :8080: bind: …`), else on the nearest line that names one
/// (Python's `OSError: [Errno 98] Address already in use` names none; its
/// traceback or the program's own output may).
fn busy_port(lines: &[&str], at: usize) -> Option<u16> {
    // A Python traceback through socketserver puts the program's own
    // line (with its address) about 10 lines above the error.
    const NEARBY: usize = 20;
    (0..=NEARBY)
        .flat_map(|d| [at.checked_sub(d), Some(at + d).filter(|_| d > 0)])
        .flatten()
        .filter_map(|i| lines.get(i))
        .find_map(|line| port_named(line))
}

/// A port a line names as an address: `host:port` where the host is
/// empty, an IP address (`[::]`, `0.0.0.0`, `::` as in Node's `:::3000`),
/// `localhost`, `*` or a URL's; `port 8000` or `--port=8000`; or Python's
/// `('0.0.0.0', 8000)`. Times (`12:30:45`) and `Errno 98` are not ports.
fn port_named(line: &str) -> Option<u16> {
    let port = |digits: &str| {
        let digits: String = digits.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u16>().ok().filter(|&p| p > 0)
    };
    let starts_with_digit = |text: &str| text.starts_with(|c: char| c.is_ascii_digit());
    let host_like = |host: &str| {
        let (url, host) = match host.split_once("://") {
            Some((_, host)) => (true, host),
            None => (false, host),
        };
        host.is_empty()
            || host == "*"
            || host == "localhost"
            || host.chars().all(|c| c == ':')
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok()
            || url
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
    };
    let mut after_port = false;
    for word in line
        .split(|c: char| c.is_whitespace() || "\"'(),".contains(c))
        .filter(|w| !w.is_empty())
    {
        // Go's `listen tcp :8080: bind:` ends the address with a colon.
        let address = word.strip_suffix(':').unwrap_or(word);
        if let Some((host, digits)) = address.rsplit_once(':')
            && starts_with_digit(digits)
            && host_like(host)
        {
            return port(digits);
        }
        let option = word.trim_start_matches('-').to_ascii_lowercase();
        if let Some(digits) = option.strip_prefix("port=") {
            return port(digits);
        }
        if after_port && starts_with_digit(word) {
            return port(word);
        }
        after_port = word
            .trim_start_matches('-')
            .trim_end_matches(':')
            .eq_ignore_ascii_case("port");
    }
    // Python's address tuple: `('0.0.0.0', 8000)`.
    let quoted = line.split_once(['\'', '"'])?.1;
    let (host, rest) = quoted.split_once(['\'', '"'])?;
    let digits = rest.strip_prefix(',')?.trim_start();
    (host_like(host) && starts_with_digit(digits))
        .then(|| port(digits))
        .flatten()
}

/// The hint for a port in use, naming who holds it when that is visible.
fn port_in_use(port: Option<u16>, listener: &dyn Fn(u16) -> Option<Listener>) -> String {
    let Some(port) = port else {
        return "its port is already in use: another process listens on it (`ss -ltnp` names it)"
            .to_owned();
    };
    match listener(port) {
        Some(Listener {
            process: Some((pid, command)),
            ..
        }) => format!("port {port} is already in use by pid {pid} ({command})"),
        Some(Listener { uid, process: None }) => format!(
            "port {port} is already in use by a process of uid {uid} that the daemon cannot see (`ss -ltnp` as root names it)"
        ),
        None => format!(
            "port {port} is already in use, though nothing listens on it now (`ss -ltnp` as root names a holder)"
        ),
    }
}

/// `bash: foo: command not found`, `sh: 1: foo: not found`.
fn command_not_found(line: &str) -> Option<&str> {
    let rest = line
        .strip_suffix(": command not found")
        .or_else(|| line.strip_suffix(": not found"))?;
    rest.rsplit(": ").next().filter(|c| !c.is_empty())
}

/// What a project needs and does not have installed.
struct Scan {
    names: Vec<String>,
    /// What one name and several names are, for `augur_full_scan`'s message.
    what: [&'static str; 2],
    install: Install,
}

/// The command that installs what is missing, run in the project.
enum Install {
    /// Followed by the missing names.
    Listing(String),
    /// Installs everything the manifest declares.
    Whole(String),
}

/// The dependencies of the program's project that are not installed:
/// those its manifest declares (the first of `package.json`,
/// `composer.json`, `requirements.txt`, `Gemfile`), or without any, those
/// its entry file imports.
fn scan(program: &Program) -> Option<Scan> {
    let dir = program.dir.as_deref()?;
    let manifest = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&read_text(&dir.join(name))?).ok()
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
    let cd = |command: &str| format!("cd {} && {command}", dir.display());
    if let Some(json) = manifest("package.json") {
        let names = declared(&json, &["dependencies", "devDependencies"])
            .into_iter()
            .filter(|name| !node::installed(dir, name))
            .collect();
        return Some(Scan {
            names,
            what: ["declared dependency is", "declared dependencies are"],
            install: Install::Listing(cd("npm install")),
        });
    }
    if let Some(json) = manifest("composer.json") {
        let names = declared(&json, &["require", "require-dev"])
            .into_iter()
            // The platform's own (`php`, `ext-json`) are not packages.
            .filter(|name| name.contains('/'))
            .filter(|name| !dir.join("vendor").join(name).is_dir())
            .collect();
        return Some(Scan {
            names,
            what: ["declared dependency is", "declared dependencies are"],
            install: Install::Listing(cd("composer require")),
        });
    }
    if dir.join("requirements.txt").is_file() {
        let python = python::Environment::of(program);
        let pip = python.pip();
        return Some(Scan {
            names: python.missing_requirements(&dir.join("requirements.txt"), dir),
            what: ["declared dependency is", "declared dependencies are"],
            install: Install::Whole(cd(&format!("{pip} install -r requirements.txt"))),
        });
    }
    if dir.join("Gemfile").is_file() {
        return Some(Scan {
            names: ruby::missing_gems(dir),
            what: ["declared gem is", "declared gems are"],
            install: Install::Whole(cd("bundle install")),
        });
    }
    let (language, entry) = program.entry()?;
    let source = read_text(&entry)?;
    match language {
        Language::Node => Some(Scan {
            names: node::imports(&source)
                .into_iter()
                .filter(|name| !node::resolvable(program, &entry, name))
                .collect(),
            what: ["imported package is", "imported packages are"],
            install: Install::Listing(cd("npm install")),
        }),
        Language::Python => {
            let python = python::Environment::of(program);
            let pip = python.pip();
            Some(Scan {
                names: python.missing_imports(&source, &entry)?,
                what: ["imported module is", "imported modules are"],
                install: Install::Listing(cd(&format!("{pip} install"))),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a file of a test's project, with its directories.
    pub(super) fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn hints(stderr: &str) -> Vec<String> {
        classify(stderr, &|_| None).0
    }

    /// A program run in `dir`, diagnosed as if nothing listened anywhere.
    fn in_dir(dir: &Path) -> Program {
        Program {
            dir: Some(dir.to_path_buf()),
            ..Program::default()
        }
    }

    fn diagnose(stderr: &str, program: &Program) -> Diagnosis {
        diagnose_program(stderr, program, &|_| None)
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
                "port 3000 is already in use, though nothing listens on it now (`ss -ltnp` as root names a holder)",
            ),
            (
                "OSError: [Errno 98] Address already in use",
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
        let diagnosis = diagnose("Error: Cannot find module 'redis'", &in_dir(&project));
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
        let missing = diagnose("", &in_dir(&php)).missing.unwrap();
        assert_eq!(missing.names, ["guzzlehttp/guzzle"]);
        assert!(
            diagnose("", &in_dir(dir.path())).missing.is_none(),
            "no manifest"
        );
    }

    #[test]
    fn the_port_of_a_failed_bind_is_read_from_each_runtimes_words() {
        let cases = [
            (
                "Error: listen EADDRINUSE: address already in use :::3000",
                Some(3000),
            ),
            (
                "Error: listen EADDRINUSE: address already in use 127.0.0.1:3001",
                Some(3001),
            ),
            ("listen tcp :8080: bind: address already in use", Some(8080)),
            (
                "listen tcp 0.0.0.0:8081: bind: address already in use",
                Some(8081),
            ),
            (
                "listen tcp [::]:8082: bind: address already in use",
                Some(8082),
            ),
            (
                "ERROR:    [Errno 98] error while attempting to bind on address ('0.0.0.0', 8000): address already in use",
                Some(8000),
            ),
            ("    s.bind((\"\", 8001))", Some(8001)),
            ("Port 5000 is in use by another program.", Some(5000)),
            ("serving with --port=5001", Some(5001)),
            ("Listening on http://localhost:5002/", Some(5002)),
            ("OSError: [Errno 98] Address already in use", None),
            ("2026-12-04 12:30:45 starting", None),
            ("  File \"/srv/app.py\", line 12, in <module>", None),
            ("listen tcp :70000: bind: address already in use", None),
        ];
        for (line, port) in cases {
            assert_eq!(port_named(line), port, "{line}");
        }
    }

    #[test]
    fn a_python_bind_failure_finds_its_port_on_a_nearby_line() {
        let traceback = "Traceback (most recent call last):
  File \"/srv/app.py\", line 4, in <module>
    server = HTTPServer((\"0.0.0.0\", 8765), Handler)
  File \"/usr/lib/python3.11/socketserver.py\", line 466, in server_bind
    self.socket.bind(self.server_address)
OSError: [Errno 98] Address already in use";
        let busy = |port| {
            (port == 8765).then(|| Listener {
                uid: 0,
                process: Some((1234, "python3 -m http.server 8765".to_owned())),
            })
        };
        assert_eq!(
            classify(traceback, &busy).0,
            ["port 8765 is already in use by pid 1234 (python3 -m http.server 8765)"]
        );
        // Too far from the error to be its port.
        let far = format!(
            "listening on 0.0.0.0:9999\n{}OSError: [Errno 98] Address already in use",
            "x\n".repeat(21)
        );
        assert_eq!(
            classify(&far, &busy).0,
            ["its port is already in use: another process listens on it (`ss -ltnp` names it)"]
        );
        let hidden = |_| {
            Some(Listener {
                uid: 1001,
                process: None,
            })
        };
        assert_eq!(
            classify("listen tcp :8080: bind: address already in use", &hidden).0,
            [
                "port 8080 is already in use by a process of uid 1001 that the daemon cannot see (`ss -ltnp` as root names it)"
            ]
        );
    }

    #[test]
    fn the_holder_of_a_port_is_this_test_when_it_listens() {
        let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let stderr = format!("Error: listen EADDRINUSE: address already in use :::{port}");
        let diagnosis = diagnose_program(
            &stderr,
            &Program::default(),
            &crate::process::procfs::tcp_listener,
        );
        let me = std::process::id();
        assert_eq!(diagnosis.hints.len(), 1);
        assert!(
            diagnosis.hints[0].starts_with(&format!("port {port} is already in use by pid {me} (")),
            "{:?}",
            diagnosis.hints
        );
    }

    #[test]
    fn each_manifest_gets_its_install_command_and_without_one_the_entry_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("py");
        write(
            &python.join("requirements.txt"),
            "Flask>=2\napm-augur-absent-one\n",
        );
        let program = Program {
            exec: "python3".to_owned(),
            params: vec!["app.py".to_owned()],
            ..in_dir(&python)
        };
        let diagnosis = diagnose("ModuleNotFoundError: No module named 'flask'", &program);
        assert_eq!(
            diagnosis.missing,
            Some(Missing {
                names: vec!["apm-augur-absent-one".to_owned()],
                install: format!("cd {} && pip install -r requirements.txt", python.display()),
            }),
            "flask is named by the hint already"
        );
        let venv = python.join("venv");
        write(&venv.join("pyvenv.cfg"), "home = /nonexistent\n");
        assert_eq!(
            diagnose("", &program).missing.unwrap().install,
            format!(
                "cd {} && {}/bin/pip install -r requirements.txt",
                python.display(),
                venv.display()
            )
        );

        let ruby = dir.path().join("rb");
        write(&ruby.join("Gemfile"), "gem 'apm-augur-absent-gem'\n");
        assert_eq!(
            diagnose("", &in_dir(&ruby)).missing,
            Some(Missing {
                names: vec!["apm-augur-absent-gem".to_owned()],
                install: format!("cd {} && bundle install", ruby.display()),
            })
        );

        let node = dir.path().join("js");
        write(
            &node.join("src/server.mjs"),
            "import express from 'express';\nimport fs from 'node:fs';\nimport { x } from './x.js';\nconst ws = require('ws');\n",
        );
        std::fs::create_dir_all(node.join("node_modules/express")).unwrap();
        let program = Program {
            exec: "node".to_owned(),
            params: vec![
                "--enable-source-maps".to_owned(),
                "src/server.mjs".to_owned(),
            ],
            ..in_dir(&node)
        };
        assert_eq!(
            diagnose("", &program).missing,
            Some(Missing {
                names: vec!["ws".to_owned()],
                install: format!("cd {} && npm install ws", node.display()),
            })
        );
        assert_eq!(
            preflight_message(&program).as_deref(),
            Some("augur_full_scan: 1 imported package is not installed (not started)")
        );
        // The exec itself may be the entry file.
        let script = Program {
            exec: "src/server.mjs".to_owned(),
            ..in_dir(&node)
        };
        assert_eq!(diagnose("", &script).missing.unwrap().names, ["ws"]);
        assert!(
            diagnose("", &in_dir(&node)).missing.is_none(),
            "no entry file"
        );
    }

    /// A project's files are its owner's: a FIFO or a huge file where a
    /// manifest belongs must not hold or fill the daemon, which scans them
    /// in its supervisor.
    #[test]
    fn a_fifo_or_a_huge_file_in_the_project_does_not_hold_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = |path: &Path| {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
        };
        let node = dir.path().join("node");
        std::fs::create_dir_all(&node).unwrap();
        fifo(&node.join("package.json"));
        let python = dir.path().join("python");
        std::fs::create_dir_all(&python).unwrap();
        std::fs::write(
            python.join("requirements.txt"),
            "-r more.txt\napm-augur-absent\n",
        )
        .unwrap();
        fifo(&python.join("more.txt"));
        let ruby = dir.path().join("ruby");
        std::fs::create_dir_all(&ruby).unwrap();
        std::fs::write(ruby.join("Gemfile"), "gem 'apm-augur-absent'\n").unwrap();
        fifo(&ruby.join("Gemfile.lock"));
        let huge = dir.path().join("huge");
        std::fs::create_dir_all(&huge).unwrap();
        let file = std::fs::File::create(huge.join("requirements.txt")).unwrap();
        file.set_len(1 << 40).unwrap();

        let (done, finished) = std::sync::mpsc::channel();
        let projects = [node, python, ruby, huge];
        std::thread::spawn(move || {
            let found: Vec<Option<Missing>> = projects
                .iter()
                .map(|p| diagnose("", &in_dir(p)).missing)
                .collect();
            done.send(found).unwrap();
        });
        let found = finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the scans end");
        assert_eq!(found[0], None);
        assert_eq!(found[1].as_ref().unwrap().names, ["apm-augur-absent"]);
        assert_eq!(found[2].as_ref().unwrap().names, ["apm-augur-absent"]);
        assert_eq!(found[3], None, "its first MiB declares nothing");
    }
}
