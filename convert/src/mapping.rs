//! The PM2 field table: what each field of an app becomes in apm, or why
//! it has none. The conversion and `docs/convert.md` both come from `FIELDS`.

use apm_compiler::ir::WorkerSpec;
use apm_compiler::values::MAX_WORKER_NAME;
use serde_json::{Map, Value};

/// What converting one app collects: settings in order, warnings (`# WARN:`
/// above the block) and notes (`# NOTE:`).
#[derive(Debug, Default)]
pub struct Out {
    pub settings: Vec<(String, Vec<String>)>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

impl Out {
    pub fn set(&mut self, key: &str, values: Vec<String>) {
        match self.settings.iter_mut().find(|(k, _)| k == key) {
            Some((_, existing)) => *existing = values,
            None => self.settings.push((key.to_owned(), values)),
        }
    }

    fn set1(&mut self, key: &str, value: impl Into<String>) {
        self.set(key, vec![value.into()]);
    }

    fn warn(&mut self, text: impl Into<String>) {
        self.warnings.push(text.into());
    }

    fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// One app of the ecosystem file, with what the conversion knows around it.
pub struct App<'a> {
    pub fields: &'a Map<String, Value>,
    /// The directory of the ecosystem file.
    pub dir: &'a str,
    pub cpus: usize,
    /// How the script is started, decided once (it may look at the file).
    launch: Launch,
}

/// How PM2 starts an app's script (`Common.sink.resolveInterpreter`, after
/// `prepareAppConf` turned a command line into `bash -c`).
#[derive(Debug, PartialEq)]
enum Launch {
    /// This interpreter runs `script`, the script as the params name it.
    Interpreter {
        interpreter: String,
        script: String,
        note: Option<String>,
    },
    /// The script is the program: `interpreter: none`, or a binary.
    Itself,
    /// A command line (a `script` with a space): `bash -c` runs it.
    Shell,
}

impl<'a> App<'a> {
    pub fn new(fields: &'a Map<String, Value>, dir: &'a str, cpus: usize) -> Self {
        let mut app = App {
            fields,
            dir,
            cpus,
            launch: Launch::Itself,
        };
        app.launch = app.decide_launch();
        app
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).filter(|v| !v.is_null())
    }

    fn truthy(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| match v {
            Value::Bool(b) => *b,
            Value::String(s) => !matches!(s.as_str(), "false" | "0" | ""),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        })
    }

    /// The app's port when it can be known: `env.PORT`, `port`.
    pub fn port(&self) -> Option<String> {
        self.get("port")
            .or_else(|| self.get("env").and_then(|e| e.get("PORT")))
            .map(scalar)
            .filter(|p| p.parse::<u16>().is_ok_and(|n| n > 0))
    }

    /// Cluster mode: asked for, or PM2's own choice for a node script with
    /// `instances` and no `exec_mode`.
    fn cluster(&self) -> bool {
        match self.get("exec_mode") {
            Some(mode) => matches!(mode.as_str(), Some("cluster" | "cluster_mode")),
            None => self.get("instances").is_some() && self.interpreter() == Some("node"),
        }
    }

    fn interpreter(&self) -> Option<&str> {
        match &self.launch {
            Launch::Interpreter { interpreter, .. } => Some(interpreter),
            Launch::Itself | Launch::Shell => None,
        }
    }

    fn script(&self) -> String {
        self.get("script").map(scalar).unwrap_or_default()
    }

    fn explicit_interpreter(&self) -> Option<String> {
        self.get("interpreter")
            .or_else(|| self.get("exec_interpreter"))
            .map(scalar)
    }

    fn decide_launch(&self) -> Launch {
        let script = self.script();
        let explicit = self.explicit_interpreter();
        let interpreter = |interpreter: &str, note: Option<String>| Launch::Interpreter {
            interpreter: interpreter.to_owned(),
            script: script.clone(),
            note,
        };
        match explicit.as_deref() {
            Some("none" | "") => return Launch::Itself,
            Some(explicit) => return interpreter(explicit, None),
            None if script.contains(' ') => return Launch::Shell,
            None => {}
        }
        let file = script
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("");
        if let Some((_, extension)) = file.rsplit_once('.')
            && let Some((_, known)) = INTERPRETERS.iter().find(|(e, _)| *e == extension)
        {
            return interpreter(known, None);
        }
        // PM2 looks at the file when it starts the app: a binary runs as it
        // is, anything else (a text file, a directory) with node.
        let directory = || {
            interpreter(
                "node",
                Some(format!(
                    "`{script}` is a directory: PM2 runs it with node, which starts its package.json `main` or index.js"
                )),
            )
        };
        let Some(found) = self.script_file(&script) else {
            if script.ends_with('/') {
                return directory();
            }
            return interpreter(
                "node",
                Some(format!(
                    "`{script}` has no extension and was not found at conversion time: like PM2, apm runs it with node unless it is a binary; if it is a program, set `exec {script};`"
                )),
            );
        };
        match sniff(&found) {
            Sniffed::Binary => Launch::Itself,
            // Running it directly is what node would do, and needs no path.
            Sniffed::Text { shebang } if shebang.contains("node") && executable(&found) => {
                Launch::Itself
            }
            Sniffed::Text { shebang } => Launch::Interpreter {
                interpreter: "node".to_owned(),
                script: if script.contains('/') || self.base().join(&script).exists() {
                    script.clone()
                } else {
                    found.display().to_string()
                },
                note: Some(if shebang.is_empty() || shebang.contains("node") {
                    format!(
                        "`{script}` has no extension and is not a binary: PM2 runs it with node, and so does apm"
                    )
                } else {
                    format!(
                        "`{script}` starts with `{shebang}` but has no extension: PM2 runs it with node, and so does apm; to run it as its first line says, set `exec {script};`"
                    )
                }),
            },
            Sniffed::Directory => directory(),
        }
    }

    /// Where PM2 starts the app: `cwd` (relative to the ecosystem file's
    /// directory), else that directory.
    fn base(&self) -> std::path::PathBuf {
        let dir = std::path::Path::new(self.dir);
        self.get("cwd")
            .map(scalar)
            .map_or_else(|| dir.to_path_buf(), |cwd| dir.join(cwd))
    }

    /// The script's file as PM2 finds it: from `cwd`, else a bare name on PATH.
    fn script_file(&self, script: &str) -> Option<std::path::PathBuf> {
        let beside = self.base().join(script);
        if beside.exists() {
            return Some(beside);
        }
        if script.contains('/') {
            return None;
        }
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(script))
                .find(|candidate| candidate.is_file() && executable(candidate))
        })
    }
}

fn executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// What a script file is, as PM2's `isbinaryfile` tells from its first bytes.
#[derive(Debug, PartialEq)]
enum Sniffed {
    Binary,
    /// Text, with its `#!` line if it has one (else empty).
    Text {
        shebang: String,
    },
    Directory,
}

/// How many bytes PM2 looks at.
const SNIFF_BYTES: usize = 512;

fn sniff(path: &std::path::Path) -> Sniffed {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.is_dir() {
        return Sniffed::Directory;
    }
    let mut bytes = Vec::with_capacity(SNIFF_BYTES);
    // O_NONBLOCK: a FIFO named as the script must not hang the conversion.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path);
    if let Ok(file) = opened
        && file.metadata().is_ok_and(|m| m.is_file())
    {
        let _ = file.take(SNIFF_BYTES as u64).read_to_end(&mut bytes);
    }
    sniff_bytes(&bytes)
}

/// PM2's test: a NUL byte, or more than one byte in ten that is neither
/// text nor part of a UTF-8 character, makes a binary.
fn sniff_bytes(bytes: &[u8]) -> Sniffed {
    if bytes.contains(&0) {
        return Sniffed::Binary;
    }
    let text = String::from_utf8_lossy(bytes);
    let suspicious = text
        .chars()
        .filter(|&c| {
            c == char::REPLACEMENT_CHARACTER
                || (c.is_control() && !('\u{7}'..='\u{e}').contains(&c))
        })
        .count();
    if suspicious * 10 > bytes.len() {
        return Sniffed::Binary;
    }
    let shebang = text
        .lines()
        .next()
        .filter(|line| line.starts_with("#!"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    Sniffed::Text { shebang }
}

/// A JSON value as the text of one config value.
pub fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        // JavaScript has one number type: a computed 2 may arrive as 2.0.
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// A string or an array of strings (PM2 accepts both in many fields).
fn list(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().map(scalar).collect(),
        Value::String(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        other => vec![scalar(other)],
    }
}

/// Milliseconds from PM2's numbers or strings like "10s".
fn millis(value: &Value) -> String {
    scalar(value)
}

pub struct Field {
    /// The PM2 field; `env_*` stands for every `env_NAME`.
    pub pm2: &'static str,
    /// What it becomes, for the docs.
    pub becomes: &'static str,
    pub convert: fn(&App, &Value, &mut Out),
}

fn none(_: &App, _: &Value, _: &mut Out) {}

macro_rules! field {
    ($pm2:literal, $becomes:literal, $convert:expr) => {
        Field {
            pm2: $pm2,
            becomes: $becomes,
            convert: $convert,
        }
    };
}

/// Interpreters PM2 picks by the script's extension.
const INTERPRETERS: &[(&str, &str)] = &[
    ("js", "node"),
    ("cjs", "node"),
    ("mjs", "node"),
    ("ts", "node"),
    ("py", "python3"),
    ("sh", "bash"),
    ("rb", "ruby"),
    ("pl", "perl"),
    ("php", "php"),
    ("coffee", "coffee"),
    ("ls", "lsc"),
];

fn launch(app: &App, _: &Value, out: &mut Out) {
    let script = app.script();
    let explicit = app.explicit_interpreter();
    if script.rsplit_once('.').is_some_and(|(_, e)| e == "ts") && explicit.is_none() {
        out.warn("`script` is TypeScript: PM2 runs it through ts-node; set `exec` to your TypeScript runner (e.g. `exec npx; params tsx, app.ts;`)");
    }
    if app.interpreter().is_some_and(|i| {
        i.rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("python"))
    }) {
        // PM2 sets it so that python's output reaches the logs line by line.
        out.set("env", vec!["PYTHONUNBUFFERED=1".to_owned()]);
    }
    let mut params: Vec<String> = Vec::new();
    for key in ["interpreter_args", "node_args"] {
        if let Some(value) = app.get(key) {
            params.extend(shell_words(value, out, key));
        }
    }
    let exec = match &app.launch {
        Launch::Interpreter {
            interpreter,
            script,
            note,
        } => {
            if let Some(note) = note {
                out.note(note.clone());
            }
            params.push(script.clone());
            interpreter.clone()
        }
        Launch::Itself => script,
        Launch::Shell => {
            out.note("`script` is a command line: PM2 runs it with `bash -c`, and so does apm");
            if app.get("args").is_some() {
                out.warn("`args` is dropped: PM2 ignores it when `script` is a command line (put the arguments in `script`)");
            }
            out.set1("exec", "bash");
            out.set("params", vec!["-c".to_owned(), script]);
            return;
        }
    };
    if let Some(args) = app.get("args") {
        params.extend(shell_words(args, out, "args"));
    }
    out.set1("exec", exec);
    if !params.is_empty() {
        out.set("params", params);
    }
}

/// `args` as a string is split like a shell would; as an array it is taken as is.
fn shell_words(value: &Value, out: &mut Out, key: &str) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => {
            let text = scalar(other);
            shell_words::split(&text).unwrap_or_else(|e| {
                out.warn(format!("`{key}` could not be split like a shell would ({e}); it is passed as one argument"));
                vec![text]
            })
        }
    }
}

fn name(_: &App, value: &Value, out: &mut Out) {
    let original = scalar(value);
    let name: String = original
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_WORKER_NAME)
        .collect();
    // A worker needs a name: an app named `` (or after a script like `/`).
    let name = if name.is_empty() {
        "app".to_owned()
    } else {
        name
    };
    if name != original {
        out.note(format!(
            "name `{original}` became `{name}`: apm names use letters, digits, `_`, `.` and `-`, at most {MAX_WORKER_NAME} of them"
        ));
    }
    out.set1("name", name);
}

fn cwd(app: &App, value: &Value, out: &mut Out) {
    let _ = app;
    out.set1("path", scalar(value));
}

fn instances(app: &App, value: &Value, out: &mut Out) {
    let text = scalar(value);
    let count = match text.parse::<i64>() {
        Ok(n) if n > 0 => n as usize,
        Ok(0) | Err(_) if text == "0" || text == "max" => app.cpus,
        Ok(n) if n < 0 => app.cpus.saturating_sub(n.unsigned_abs() as usize).max(1),
        _ => {
            out.warn(format!(
                "`instances: {text}` is not a count; 1 instance is used"
            ));
            1
        }
    };
    if count != text.parse::<usize>().unwrap_or(0) {
        out.note(format!(
            "instances `{text}` is {count} on this machine ({} CPUs) at conversion time",
            app.cpus
        ));
    }
    if count > 1 {
        out.set1("instances", count.to_string());
    }
}

fn exec_mode(app: &App, _: &Value, out: &mut Out) {
    if !app.cluster() {
        return;
    }
    // Cluster mode shares one port between instances; apm gives each
    // instance its own port and load-balances the original one.
    out.set1("upstream", "port");
    out.set1("port_env", "PORT");
    match app.port() {
        Some(port) => {
            out.set("server", vec![format!("http://0.0.0.0:{port}")]);
            out.note(format!("cluster mode: apm listens on port {port} and gives each instance its own port in PORT"));
        }
        None => out.warn("cluster mode without a known port: add `server http://0.0.0.0:PORT;` for the port the app listens on"),
    }
}

fn env(app: &App, value: &Value, out: &mut Out) {
    let Value::Object(vars) = value else {
        out.warn("`env` is not an object and is ignored");
        return;
    };
    let mut entries: Vec<String> = Vec::new();
    for (key, value) in vars {
        // In cluster mode apm sets PORT per instance.
        if app.cluster() && key == "PORT" && app.port().is_some() {
            continue;
        }
        entries.push(format!("{key}={}", scalar(value)));
    }
    if !entries.is_empty() {
        let existing = out
            .settings
            .iter()
            .find(|(k, _)| k == "env")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        out.set("env", [existing, entries].concat());
    }
}

fn autorestart(_: &App, value: &Value, out: &mut Out) {
    let on = !matches!(value, Value::Bool(false)) && scalar(value) != "false";
    if out.settings.iter().any(|(k, _)| k == "restart") && on {
        return;
    }
    out.set1("restart", on.to_string());
    out.set1("restart_err", on.to_string());
}

fn max_restarts(_: &App, value: &Value, out: &mut Out) {
    out.set1("max_err_restarts", scalar(value));
}

fn min_uptime(_: &App, value: &Value, out: &mut Out) {
    out.set1("err_grace", millis(value));
}

fn restart_delay(_: &App, value: &Value, out: &mut Out) {
    out.set1("restart_delay", millis(value));
    out.set1("err_delay", millis(value));
}

fn kill_timeout(_: &App, value: &Value, out: &mut Out) {
    out.set1("kill_timeout", millis(value));
    out.note("PM2 stops with SIGINT, apm with SIGTERM: make sure the app handles SIGTERM");
}

fn stop_exit_codes(_: &App, value: &Value, out: &mut Out) {
    let codes = list(value);
    if codes.iter().any(|c| c == "0") {
        out.set1("restart", "false");
        if codes == ["0"] {
            return;
        }
    }
    out.warn(format!(
        "`stop_exit_codes: {}` (no restart on these codes) has no direct equivalent: apm's `restart_on_exit_codes` lists the codes that do restart",
        codes.join(", ")
    ));
}

fn watch(app: &App, value: &Value, out: &mut Out) {
    let globs = match value {
        Value::Bool(false) => return,
        Value::Bool(true) => vec!["*".to_owned()],
        other => list(other),
    };
    out.set("watch", globs);
    // PM2 never watches node_modules or dot-files, at any depth: `.*` is one
    // at the top of the tree, `*/.*` one below it.
    let mut ignore = vec![
        "*node_modules*".to_owned(),
        ".*".to_owned(),
        "*/.*".to_owned(),
    ];
    match app.get("ignore_watch") {
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(glob) => ignore.push(glob.clone()),
                    _ => out.warn("a regular expression in `ignore_watch` cannot be converted: write it as a glob in `watch_ignore`"),
                }
            }
        }
        Some(Value::Object(_)) => out.warn("a regular expression in `ignore_watch` cannot be converted: write it as a glob in `watch_ignore`"),
        Some(more) => ignore.extend(list(more)),
        None => {}
    }
    out.set("watch_ignore", ignore);
}

fn watch_delay(_: &App, value: &Value, out: &mut Out) {
    out.set1("watch_delay", millis(value));
}

/// A PM2 log path as apm reads it: `~` is the home directory, relative
/// paths start at the app's `cwd`, and `NULL` discards.
fn log_path(app: &App, path: &str) -> Option<String> {
    match path {
        "NULL" | "/dev/null" => Some("/dev/null".to_owned()),
        "true" | "false" | "" => None,
        _ if path.starts_with("~/") => Some(format!("$HOME/{}", &path[2..])),
        _ if path.starts_with('/') => Some(path.to_owned()),
        _ => Some(match app.get("cwd").map(scalar) {
            Some(cwd) => format!(
                "{}/{}",
                cwd.trim_end_matches('/'),
                path.trim_start_matches("./")
            ),
            None => path.to_owned(),
        }),
    }
}

fn logs(app: &App, _: &Value, out: &mut Out) {
    if app.truthy("disable_logs") == Some(true) {
        out.set1("log", "/dev/null");
        return;
    }
    let path = |key: &str, old: &str| {
        app.get(key)
            .or_else(|| app.get(old))
            .map(scalar)
            .and_then(|p| log_path(app, &p))
    };
    let out_file = path("out_file", "output");
    let err_file = path("error_file", "error");
    let combined = path("log_file", "log");
    match (out_file, err_file, combined) {
        (None, None, Some(combined)) => out.set1("log", combined),
        (out_file, err_file, combined) => {
            if let Some(file) = out_file {
                out.set1("log", file);
            }
            if let Some(file) = err_file {
                out.set1("err_log", file);
            }
            if combined.is_some() {
                out.warn("`log_file` (both streams combined, besides out_file and error_file) is dropped: apm writes each stream once");
            }
        }
    }
}

/// day.js tokens to strftime, longest first.
const DATE_TOKENS: &[(&str, &str)] = &[
    ("YYYY", "%Y"),
    ("YY", "%y"),
    ("MM", "%m"),
    ("DD", "%d"),
    ("HH", "%H"),
    ("hh", "%I"),
    ("mm", "%M"),
    ("ss", "%S"),
    ("SSS", "%3f"),
    ("ZZ", "%z"),
    ("Z", "%:z"),
    ("A", "%p"),
];

fn log_date_format(_: &App, value: &Value, out: &mut Out) {
    let format = scalar(value);
    let mut result = String::new();
    let mut rest = format.as_str();
    'outer: while !rest.is_empty() {
        for (token, strftime) in DATE_TOKENS {
            if let Some(after) = rest.strip_prefix(token) {
                result.push_str(strftime);
                rest = after;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        result.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.set1("log_time_format", result);
}

fn uid(_: &App, value: &Value, out: &mut Out) {
    out.set1("user", scalar(value));
}

/// The variable PM2 puts each instance's index in, unless `instance_var`.
const INSTANCE_VAR: &str = "NODE_APP_INSTANCE";

fn instance_var(_: &App, value: &Value, out: &mut Out) {
    out.set1("env_index", scalar(value));
}

fn increment_var(app: &App, value: &Value, out: &mut Out) {
    let var = scalar(value);
    if var == "PORT" && app.cluster() {
        return; // each instance gets its own PORT in `upstream port` mode
    }
    out.warn(format!("`increment_var {var}` has no equivalent; `env_index` gives each instance its index in a variable to add to a base value"));
}

fn max_memory_restart(_: &App, value: &Value, out: &mut Out) {
    out.set1("memory_limit", scalar(value));
    out.note("max_memory_restart becomes a cgroup memory limit: the kernel ends the process on breach and the restart policy applies (needs a root daemon)");
}

fn listen_timeout(_: &App, value: &Value, out: &mut Out) {
    out.set1("startup_grace", millis(value));
}

fn autostart(_: &App, value: &Value, out: &mut Out) {
    if matches!(value, Value::Bool(false)) || scalar(value) == "false" {
        out.set1("autostart", "false");
    }
}

fn port(app: &App, value: &Value, out: &mut Out) {
    if !app.cluster() {
        let existing = out
            .settings
            .iter()
            .find(|(k, _)| k == "env")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        out.set(
            "env",
            [existing, vec![format!("PORT={}", scalar(value))]].concat(),
        );
    }
}

fn filter_env(_: &App, _: &Value, out: &mut Out) {
    out.warn(
        "`filter_env` has no equivalent: children inherit the daemon's environment plus `env`",
    );
}

/// Every PM2 app field apm knows, in the order the output is built.
pub static FIELDS: &[Field] = &[
    field!(
        "name",
        "`name` (characters apm does not allow become `-`)",
        name
    ),
    field!(
        "script",
        "`exec`: the interpreter (explicit, or by extension: .js → node, .py → python3, .sh → bash, .rb → ruby, .pl → perl, .php → php), then the script in `params`; `interpreter none` runs the script itself. Without a known extension apm decides as PM2 does when it starts the app: a binary file runs itself, anything else (a text file whatever its `#!` line, a directory, a file not found at conversion time) runs with node, with a note; a text file with a node `#!` line that is executable runs itself. A command line (a `script` with a space) runs with `bash -c`. Without `name`, the app is named after the script's file up to its last dot (`./service-worker/` → `service-worker`), or a command line's program",
        launch
    ),
    field!("interpreter", "see `script`", none),
    field!(
        "exec_interpreter",
        "see `script` (older name of `interpreter`)",
        none
    ),
    field!("interpreter_args", "`params` before the script", none),
    field!("node_args", "`params` before the script", none),
    field!(
        "args",
        "`params` after the script; a string is split like a shell would",
        none
    ),
    field!(
        "cwd",
        "`path`; without it, the ecosystem file's directory",
        cwd
    ),
    field!(
        "instances",
        "`instances`; `max`, `0` and `-1` become the CPU count at conversion time (`-N`: CPUs minus N), with a note",
        instances
    ),
    field!(
        "exec_mode",
        "`cluster` becomes `upstream port; port_env PORT;` and `server http://0.0.0.0:PORT` when the port is known (`env.PORT`, `port`), else a warning saying what to add",
        exec_mode
    ),
    field!(
        "env",
        "`env KEY=value` entries (objects become JSON); in cluster mode PORT is left to apm",
        env
    ),
    field!(
        "env_*",
        "with `--env NAME`, `env_NAME` is merged over `env`, as `pm2 start --env NAME` does; the others are ignored",
        none
    ),
    field!(
        "port",
        "`env PORT=…` in fork mode; the listener port in cluster mode",
        port
    ),
    field!(
        "filter_env",
        "no equivalent (warning): children inherit the daemon's environment",
        filter_env
    ),
    field!(
        "instance_var",
        "`env_index`; without it `env_index NODE_APP_INSTANCE`, which PM2 sets for every app (fork mode too)",
        instance_var
    ),
    field!(
        "increment_var",
        "none: in cluster mode each instance gets its own `PORT`; otherwise a warning suggesting `env_index`",
        increment_var
    ),
    field!(
        "autorestart",
        "`restart` and `restart_err` (PM2 restarts after clean and error exits alike; default on)",
        autorestart
    ),
    field!("max_restarts", "`max_err_restarts`", max_restarts),
    field!(
        "min_uptime",
        "`err_grace`: a process up that long gets a fresh restart budget",
        min_uptime
    ),
    field!(
        "restart_delay",
        "`restart_delay` and `err_delay`",
        restart_delay
    ),
    field!(
        "exp_backoff_restart_delay",
        "no equivalent (warning): use `restart_delay`/`err_delay`",
        |_, _, out| {
            out.warn("`exp_backoff_restart_delay` has no equivalent: apm waits `err_delay` before every restart")
        }
    ),
    field!(
        "kill_timeout",
        "`kill_timeout`, with a note that PM2 stops with SIGINT and apm with SIGTERM",
        kill_timeout
    ),
    field!(
        "stop_exit_codes",
        "`[0]` becomes `restart false`; other lists a warning (apm lists the codes that do restart, in `restart_on_exit_codes`)",
        stop_exit_codes
    ),
    field!(
        "shutdown_with_message",
        "no equivalent (warning)",
        |_, _, out| out.warn("`shutdown_with_message` has no equivalent: apm stops with SIGTERM")
    ),
    field!(
        "cron_restart",
        "no equivalent (warning): schedule `apm restart NAME` with cron",
        |_, _, out| {
            out.warn("`cron_restart` has no equivalent: schedule `apm restart <name>` with cron or a systemd timer")
        }
    ),
    field!(
        "wait_ready",
        "no equivalent (warning): `startup_grace` is how long a start is watched",
        |_, _, out| out.warn(
            "`wait_ready` has no equivalent: apm considers an instance up after `startup_grace`"
        )
    ),
    field!("listen_timeout", "`startup_grace`", listen_timeout),
    field!(
        "watch",
        "`watch` (true watches everything, `*`), with `watch_ignore *node_modules*, .*, */.*` as PM2 never watches those",
        watch
    ),
    field!(
        "ignore_watch",
        "`watch_ignore`, after the PM2 defaults",
        none
    ),
    field!("watch_delay", "`watch_delay`", watch_delay),
    field!(
        "watch_options",
        "no equivalent (warning): apm watches with inotify",
        |_, _, out| out
            .warn("`watch_options` (chokidar options) has no equivalent: apm watches with inotify")
    ),
    field!("out_file", "`log`", logs),
    field!("output", "`log` (older name of `out_file`)", none),
    field!("error_file", "`err_log`", none),
    field!("error", "`err_log` (older name of `error_file`)", none),
    field!(
        "log_file",
        "`log` when neither `out_file` nor `error_file` is set; otherwise dropped with a warning",
        none
    ),
    field!("log", "see `log_file`", none),
    field!("disable_logs", "`log /dev/null`", none),
    field!(
        "merge_logs",
        "none needed: apm writes every instance of a worker to one file, each line prefixed with `name#N`",
        none
    ),
    field!("combine_logs", "see `merge_logs`", none),
    field!(
        "log_date_format",
        "`log_time_format`, day.js tokens translated to strftime (YYYY → %Y, MM → %m, DD → %d, HH → %H, mm → %M, ss → %S, SSS → %3f, Z → %:z)",
        log_date_format
    ),
    field!("time", "none needed: apm timestamps every line", none),
    field!(
        "log_type",
        "no equivalent (warning): apm writes text lines",
        |_, _, out| out
            .warn("`log_type` (json logs) has no equivalent: apm writes timestamped text lines")
    ),
    field!("uid", "`user`", uid),
    field!(
        "gid",
        "no equivalent (warning): apm runs children with `user`'s groups",
        |_, _, out| out.warn("`gid` has no equivalent: a child runs with the groups of its `user`")
    ),
    field!(
        "max_memory_restart",
        "`memory_limit` (a cgroup limit), with a note",
        max_memory_restart
    ),
    field!(
        "autostart",
        "`autostart false` registers the worker stopped",
        autostart
    ),
    field!("namespace", "no equivalent (warning)", |_, _, out| out
        .warn("`namespace` has no equivalent: act on workers by name")),
    field!(
        "treekill",
        "none needed: apm always stops the whole process group",
        none
    ),
    field!(
        "source_map_support",
        "no equivalent (warning): pass `--enable-source-maps` in `node_args`",
        |_, _, out| out.warn(
            "`source_map_support` has no equivalent: add `--enable-source-maps` to the node params"
        )
    ),
    field!(
        "vizion",
        "no equivalent (warning): apm does not track versioning metadata",
        |_, _, out| out.warn("`vizion` (versioning metadata) has no equivalent")
    ),
    field!(
        "pmx",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`pmx` (PM2's monitoring agent) has no equivalent")
    ),
    field!(
        "automation",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`automation` (PM2's monitoring agent) has no equivalent")
    ),
    field!(
        "force",
        "no equivalent (warning): apm refuses duplicate names",
        |_, _, out| out.warn("`force` has no equivalent: apm worker names are unique")
    ),
    field!("windowsHide", "none needed: apm runs on Linux only", none),
    field!(
        "append_env_to_name",
        "no equivalent (warning)",
        |_, _, out| out.warn("`append_env_to_name` has no equivalent: set `name` yourself")
    ),
    field!(
        "name_prefix",
        "no equivalent (warning): set `name`",
        |_, _, out| out.warn("`name_prefix` has no equivalent: set `name` yourself")
    ),
    field!(
        "pid_file",
        "not written (a warning says so): `apm ls --json` gives the pids",
        |_, _, out| out.warn("`pid_file` is not written: `apm ls --json` gives the pids")
    ),
    field!(
        "kill_retry_time",
        "none needed: apm sends SIGKILL once, after `kill_timeout`",
        none
    ),
    field!(
        "disable_source_map_support",
        "see `source_map_support`",
        none
    ),
    field!(
        "username",
        "none: PM2 records who started the process; `uid` is the user to run as",
        none
    ),
    field!("install_url", "no equivalent (warning)", |_, _, out| out
        .warn("`install_url` has no equivalent")),
    field!("execute_command", "no equivalent (warning)", |_, _, out| {
        out.warn("`execute_command` has no equivalent")
    }),
    field!(
        "post_update",
        "no equivalent (warning): PM2's dashboard hooks",
        |_, _, out| out.warn("`post_update` (dashboard hooks) has no equivalent")
    ),
    field!(
        "trace",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`trace` (PM2's transaction tracing) has no equivalent")
    ),
    field!("disable_trace", "none needed: apm does no tracing", none),
    field!(
        "v8",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`v8` (PM2's monitoring agent) has no equivalent")
    ),
    field!(
        "event_loop_inspector",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`event_loop_inspector` (PM2's monitoring agent) has no equivalent")
    ),
    field!(
        "deep_monitoring",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`deep_monitoring` (PM2's monitoring agent) has no equivalent")
    ),
    field!(
        "io",
        "no equivalent (warning): PM2's monitoring agent",
        |_, _, out| out.warn("`io` (PM2's monitoring agent) has no equivalent")
    ),
    field!("write", "none needed", none),
];

/// PM2's other names for fields, and the name the table uses.
pub static ALIASES: &[(&str, &str)] = &[
    ("exec", "script"),
    ("cmd", "script"),
    ("command", "script"),
    ("interpreterArgs", "interpreter_args"),
    ("out", "out_file"),
    ("out_log", "out_file"),
    ("err", "error_file"),
    ("err_file", "error_file"),
    ("err_log", "error_file"),
    ("pid", "pid_file"),
    ("cron", "cron_restart"),
    ("user", "uid"),
];

/// The app's fields under the names the table uses. A field under its own
/// name wins over an alias of it, whatever their order (PM2 reads `cmd`
/// only when `script` is absent).
pub fn canonical(fields: &Map<String, Value>) -> Map<String, Value> {
    let alias_of = |key: &str| ALIASES.iter().find(|(alias, _)| *alias == key);
    let mut out: Map<String, Value> = fields
        .iter()
        .filter(|(key, _)| alias_of(key).is_none())
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (key, value) in fields {
        if let Some((_, name)) = alias_of(key) {
            out.entry(name.to_owned()).or_insert_with(|| value.clone());
        }
    }
    out
}

/// PM2's name for an app without one: its script's file name up to the
/// last dot (`api.js` → `api`, `./service-worker/` → `service-worker`);
/// for a command line, its program's (`node -e …` → `node`).
fn name_from_script(script: &str) -> String {
    let program = script.split_whitespace().next().unwrap_or_default();
    let file = program
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    match file.rfind('.') {
        Some(dot) if dot > 0 => file[..dot].to_owned(),
        _ => file.to_owned(),
    }
}

/// PM2 fields that are booleans, and those that may also be something else
/// (`watch: ['src']`, `log_file: 'out.log'`).
const BOOLEANS: &[&str] = &[
    "autostart",
    "autorestart",
    "disable_logs",
    "time",
    "source_map_support",
    "disable_source_map_support",
    "wait_ready",
    "shutdown_with_message",
    "merge_logs",
    "combine_logs",
    "vizion",
    "execute_command",
    "force",
    "append_env_to_name",
    "trace",
    "disable_trace",
    "v8",
    "event_loop_inspector",
    "deep_monitoring",
    "automation",
    "treekill",
    "windowsHide",
    "write",
];
const BOOLEAN_OR_MORE: &[&str] = &["watch", "log_file", "filter_env", "pmx"];

/// Boolean fields given as strings (`autostart: 'false'`, a value read from
/// `process.env`) or numbers, as the booleans they mean. A value that means
/// neither is dropped with a warning, as PM2 drops it for its default.
pub fn booleans(fields: &mut Map<String, Value>) -> Vec<String> {
    let mut warnings = Vec::new();
    for key in BOOLEANS.iter().chain(BOOLEAN_OR_MORE) {
        let Some(value) = fields.get(*key) else {
            continue;
        };
        let only_boolean = BOOLEANS.contains(key);
        let meaning = match value {
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                "1" | "yes" | "on" if only_boolean => Some(true),
                "0" | "no" | "off" | "" if only_boolean => Some(false),
                _ => None,
            },
            Value::Number(n) if only_boolean => n.as_f64().map(|n| n != 0.0),
            _ => continue,
        };
        match meaning {
            Some(meaning) => {
                fields.insert((*key).to_owned(), Value::Bool(meaning));
            }
            None if only_boolean => {
                warnings.push(format!(
                    "`{key}: {value}` is not a boolean and is ignored (PM2 keeps its default)"
                ));
                fields.remove(*key);
            }
            None => {}
        }
    }
    warnings
}

/// Runs the table over one app. Unknown fields get a warning.
pub fn convert(app: &App) -> Out {
    let mut out = Out::default();
    // PM2's defaults that differ from apm's, before the fields that change them.
    if app.get("autorestart").is_none() {
        autorestart(app, &Value::Bool(true), &mut out);
    }
    // PM2 gives every app's instances their index (`God.injectVariables`:
    // fork mode too, as `instances` defaults to 1): code that runs a job
    // only where `NODE_APP_INSTANCE` is `0` depends on it.
    if app.get("instance_var").is_none() {
        instance_var(app, &Value::String(INSTANCE_VAR.to_owned()), &mut out);
    }
    if app.get("name").is_none()
        && let Some(script) = app.get("script").map(scalar)
    {
        name(app, &Value::String(name_from_script(&script)), &mut out);
    }
    for field in FIELDS {
        let value = if field.pm2 == "script" {
            app.get("script").cloned().unwrap_or(Value::Null)
        } else {
            app.get(field.pm2).cloned().unwrap_or(Value::Null)
        };
        if value.is_null() && !matches!(field.pm2, "out_file") {
            continue;
        }
        // Turning a PM2 feature off is what apm does anyway: nothing to say.
        if value == Value::Bool(false) && !matches!(field.pm2, "autorestart" | "autostart") {
            continue;
        }
        (field.convert)(app, &value, &mut out);
    }
    if app.get("cwd").is_none() {
        out.set1("path", app.dir);
    }
    for key in app.fields.keys() {
        let known = FIELDS.iter().any(|f| f.pm2 == key) || key.starts_with("env_");
        if !known {
            out.warn(format!("unknown PM2 field `{key}` is ignored"));
        }
    }
    // The canonical order: the order of the schema table.
    let rank = |key: &str| {
        WorkerSpec::KEYS
            .iter()
            .position(|k| k.name == key)
            .unwrap_or(usize::MAX)
    };
    out.settings.sort_by_key(|(key, _)| rank(key));
    out
}
