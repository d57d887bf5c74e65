//! Evaluating an ecosystem file to its JSON value: JavaScript (CommonJS or
//! ESM) with the embedded boa engine in a sandbox, JSON as PM2 reads it (a
//! JavaScript expression), YAML with a YAML parser; or the local `node`.

use std::path::Path;

use boa_engine::builtins::promise::PromiseState;
use boa_engine::module::Module;
use boa_engine::{Context, JsString, JsValue, NativeFunction, Source, js_string};
use serde_json::Value;

/// Files larger than this are refused before evaluation.
pub const MAX_SIZE: u64 = 4 * 1024 * 1024;
/// What an evaluation may print (the file's value as JSON); past it the
/// evaluation is refused, so a file cannot make apm hold more.
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;
/// Loop iterations a file may run: enough for any real config, and an
/// infinite loop ends with an error instead of a hang.
const LOOP_LIMIT: u64 = 10_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    CommonJs,
    Module,
    Json,
    Yaml,
}

/// How to read a file: by extension, and `"type": "module"` in the nearest
/// package.json for `.js`.
pub fn shape(path: &Path, source: &str) -> Shape {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "json" => Shape::Json,
        "yml" | "yaml" => Shape::Yaml,
        "mjs" => Shape::Module,
        "cjs" => Shape::CommonJs,
        _ if package_type_module(path) || looks_like_module(source) => Shape::Module,
        _ => Shape::CommonJs,
    }
}

fn package_type_module(path: &Path) -> bool {
    let dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut dir = dir.as_deref();
    while let Some(d) = dir {
        if let Ok(text) = std::fs::read_to_string(d.join("package.json")) {
            return serde_json::from_str::<Value>(&text).is_ok_and(|v| v["type"] == "module");
        }
        dir = d.parent();
    }
    false
}

fn looks_like_module(source: &str) -> bool {
    source.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("export default") || l.starts_with("export const") || l.starts_with("import ")
    })
}

/// The environment the file sees as `process.env`.
pub struct Sandbox<'a> {
    pub env: &'a [(String, String)],
    pub cpus: usize,
}

/// Files that cannot be ecosystems are refused before they run, saying what
/// was expected: an empty file, or one that never names `apps` nor an app's
/// script (an app's own code, another tool's settings), which would
/// otherwise fail on whatever it does first.
pub fn expect_ecosystem(path: &Path, source: &str) -> Result<(), String> {
    const EXPECTED: &str = "apm convert expects a PM2 ecosystem file: JavaScript that exports `{ apps: [{ name, script }] }` (ecosystem.config.js), or JSON or YAML with `apps`";
    let path = path.display();
    if source.trim().is_empty() {
        return Err(format!("{path}: the file is empty; {EXPECTED}"));
    }
    if !names_an_app(source) {
        return Err(format!(
            "{path}: this is not a PM2 ecosystem file: it never names `apps`, `script` or `cmd` (is it an app's own code, or another tool's settings?); {EXPECTED}"
        ));
    }
    Ok(())
}

/// The word `apps`, or an app's script as a key (`script:`, `"cmd" :`).
fn names_an_app(source: &str) -> bool {
    let boundary =
        |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
    let word_at = |at: usize, word: &str| {
        boundary(source[..at].chars().next_back())
            && boundary(source[at + word.len()..].chars().next())
    };
    let as_key = |at: usize, word: &str| {
        source[at + word.len()..]
            .trim_start_matches(['"', '\''])
            .trim_start()
            .starts_with(':')
    };
    ["apps", "script", "cmd", "command", "exec"]
        .iter()
        .any(|word| {
            source
                .match_indices(word)
                .any(|(at, _)| word_at(at, word) && (*word == "apps" || as_key(at, word)))
        })
}

pub fn evaluate(path: &Path, source: &str, sandbox: &Sandbox) -> Result<Value, String> {
    expect_ecosystem(path, source)?;
    match shape(path, source) {
        Shape::Yaml => serde_yaml_ng::from_str(source).map_err(|e| format!("invalid YAML: {e}")),
        shape => run_boa(path, source, shape, sandbox),
    }
}

/// The ecosystem file as the engine saw it, to point errors at the user's
/// line: frames in the prelude or the wrapper's call are not the user's.
struct Origin {
    /// The file as the user named it, which is also the engine's name for it.
    path: String,
    lines: usize,
    /// Characters the wrapper put before the file's first line.
    first_line_shift: usize,
    /// Where a syntax error is when the engine does not say (it gives no
    /// position for an unterminated string): a JSON parser's position.
    syntax_fallback: Option<(usize, usize)>,
}

impl Origin {
    fn new(path: &Path, source: &str, first_line_shift: usize) -> Self {
        Origin {
            path: path.display().to_string(),
            lines: source.lines().count().max(1),
            first_line_shift,
            syntax_fallback: None,
        }
    }

    /// `line:column` in the file, when the engine's position is in it.
    fn place(&self, line: usize, column: usize) -> Option<(usize, usize)> {
        let column = if line == 1 {
            column.checked_sub(self.first_line_shift)?
        } else {
            column
        };
        (line >= 1 && line <= self.lines).then_some((line, column))
    }

    /// A frame line of boa's backtrace, `at NAME (PATH:LINE:COL)`, when it
    /// is in the file: the function's name and the place.
    fn frame(&self, line: &str) -> Option<(String, (usize, usize))> {
        let inner = line.trim().strip_prefix("at ")?.strip_suffix(')')?;
        let (rest, column) = inner.rsplit_once(':')?;
        let (rest, line) = rest.rsplit_once(':')?;
        let name = rest.strip_suffix(&format!(" ({}", self.path))?;
        let place = self.place(line.parse().ok()?, column.parse().ok()?)?;
        Some((name.to_owned(), place))
    }
}

/// An error the engine raised, as `FILE:LINE:COL: what` at the user's line:
/// boa's own position of a thrown error is the outermost frame (the
/// wrapper's call), so the innermost frame in the file is found in its
/// backtrace; a syntax error's position is in its message.
fn js_error(error: boa_engine::JsError, context: &mut Context, origin: &Origin) -> String {
    let display = error.to_string();
    let (what, frames): (String, Vec<_>) = match error.try_native(context) {
        Ok(native) => {
            let message = native.message().trim();
            let (message, place) = match message.rsplit_once(" at line ") {
                Some((text, at)) if *native.kind() == boa_engine::JsNativeErrorKind::Syntax => {
                    let place = at.split_once(", col ").and_then(|(l, c)| {
                        origin.place(l.trim().parse().ok()?, c.trim().parse().ok()?)
                    });
                    (text, place)
                }
                _ if *native.kind() == boa_engine::JsNativeErrorKind::Syntax => {
                    (message, origin.syntax_fallback)
                }
                _ => (message, None),
            };
            let frames = place.map(|p| vec![(String::new(), p)]).unwrap_or_default();
            (format!("{}: {message}", native.kind()), frames)
        }
        Err(_) => (
            display.lines().next().unwrap_or_default().to_owned(),
            Vec::new(),
        ),
    };
    let frames: Vec<_> = if frames.is_empty() {
        display.lines().filter_map(|l| origin.frame(l)).collect()
    } else {
        frames
    };
    let mut message = match frames.first() {
        Some((_, (line, column))) => format!("{}:{line}:{column}: {what}", origin.path),
        None => format!("{}: {what}", origin.path),
    };
    // The calls that led there, when the throw was inside a function; a
    // deep recursion lists every frame: the first few tell.
    const MAX_FRAMES: usize = 8;
    if frames.len() > 1 {
        for (name, (line, column)) in frames.iter().take(MAX_FRAMES) {
            message.push_str(&format!(
                "\n    at {name} ({}:{line}:{column})",
                origin.path
            ));
        }
        if frames.len() > MAX_FRAMES {
            message.push_str(&format!(
                "\n    … {} more frames",
                frames.len() - MAX_FRAMES
            ));
        }
    }
    if display.starts_with("RuntimeLimitError") {
        return format!(
            "the file did not finish: it ran over {LOOP_LIMIT} loop iterations or too deep a recursion (an infinite loop?)\n{message}"
        );
    }
    message
}

/// Globals of the CommonJS wrapper: `module`, `exports`, `require` of the
/// few modules ecosystem files use, `process`, `__dirname`, `__filename`.
fn prelude(path: &Path, sandbox: &Sandbox) -> String {
    let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = file.parent().unwrap_or(Path::new("/"));
    let env: serde_json::Map<String, Value> = sandbox
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let json = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        r#"
var module = {{ exports: {{}} }};
var exports = module.exports;
var __filename = {file};
var __dirname = {dir};
var process = {{ env: {env}, cwd: function () {{ return __dirname; }}, platform: "linux", argv: ["node", __filename], versions: {{}} }};
var __apm_modules = {{
  path: {{
    sep: "/",
    join: function () {{ return Array.prototype.slice.call(arguments).filter(function (p) {{ return p !== ""; }}).join("/").replace(/\/+/g, "/"); }},
    resolve: function () {{
      var parts = Array.prototype.slice.call(arguments), out = __dirname;
      parts.forEach(function (p) {{ out = p.charAt(0) === "/" ? p : out + "/" + p; }});
      var stack = [];
      out.split("/").forEach(function (s) {{ if (s === "..") stack.pop(); else if (s !== "" && s !== ".") stack.push(s); }});
      return "/" + stack.join("/");
    }},
    dirname: function (p) {{ var i = p.lastIndexOf("/"); return i <= 0 ? (i === 0 ? "/" : ".") : p.slice(0, i); }},
    basename: function (p, ext) {{ var b = p.slice(p.lastIndexOf("/") + 1); return ext && b.slice(-ext.length) === ext ? b.slice(0, -ext.length) : b; }},
    extname: function (p) {{ var b = p.slice(p.lastIndexOf("/") + 1), i = b.lastIndexOf("."); return i <= 0 ? "" : b.slice(i); }}
  }},
  os: {{
    cpus: function () {{ var a = []; for (var i = 0; i < {cpus}; i++) a.push({{ model: "cpu", speed: 0 }}); return a; }},
    hostname: function () {{ return "localhost"; }},
    platform: function () {{ return "linux"; }},
    homedir: function () {{ return process.env.HOME || "/root"; }},
    EOL: "\n"
  }},
  dotenv: {{
    config: function (options) {{
      var text = __apm_read_dotenv(options && options.path ? String(options.path) : "");
      var parsed = {{}};
      text.split("\n").forEach(function (line) {{
        var m = line.match(/^\s*(?:export\s+)?([\w.-]+)\s*=\s*(.*)?\s*$/);
        if (!m) return;
        var v = (m[2] || "").trim();
        if ((v.charAt(0) === '"' && v.slice(-1) === '"') || (v.charAt(0) === "'" && v.slice(-1) === "'")) v = v.slice(1, -1);
        parsed[m[1]] = v;
        if (process.env[m[1]] === undefined) process.env[m[1]] = v;
      }});
      return {{ parsed: parsed }};
    }}
  }}
}};
function require(name) {{
  name = String(name).replace(/^node:/, "");
  if (__apm_modules[name]) return __apm_modules[name];
  throw new Error({refusal}.replace("{{module}}", name));
}}
"#,
        file = json(&file.display().to_string()),
        dir = json(&dir.display().to_string()),
        env = Value::Object(env),
        cpus = sandbox.cpus,
        refusal = json(&refusal("{module}")),
    )
}

/// Why a module outside the sandbox is refused, and what `--node` would mean.
fn refusal(module: &str) -> String {
    format!(
        "the file needs the module `{module}`, which apm convert does not provide (it provides `path`, `os` and `dotenv`). \
         `apm convert --node FILE` would run the file with the local node as the user running apm, with everything that user \
         may do: use it only for a file you trust"
    )
}

/// `import` of the modules `require` provides (default and named exports),
/// and a refusal naming any other, as `require` gives. Nothing is loaded
/// from disk.
struct SandboxImports;

impl boa_engine::module::ModuleLoader for SandboxImports {
    async fn load_imported_module(
        self: std::rc::Rc<Self>,
        _referrer: boa_engine::module::Referrer,
        request: boa_engine::module::ModuleRequest,
        context: &std::cell::RefCell<&mut Context>,
    ) -> boa_engine::JsResult<Module> {
        let specifier = request.specifier().to_std_string_escaped();
        let name = specifier.trim_start_matches("node:");
        let context = &mut **context.borrow_mut();
        let provided = context
            .global_object()
            .get(js_string!("__apm_modules"), context)?
            .as_object()
            .map(|modules| modules.get(JsString::from(name), context))
            .transpose()?
            .and_then(|module| module.as_object());
        let Some(module) = provided else {
            return Err(boa_engine::JsNativeError::error()
                .with_message(refusal(name))
                .into());
        };
        let mut exports = vec![js_string!("default")];
        for key in module.own_property_keys(context)? {
            if let boa_engine::property::PropertyKey::String(key) = key {
                exports.push(key);
            }
        }
        Ok(Module::synthetic(
            &exports,
            boa_engine::module::SyntheticModuleInitializer::from_copy_closure_with_captures(
                |synthetic, module: &boa_engine::JsObject, context| {
                    synthetic.set_export(&js_string!("default"), module.clone().into())?;
                    for key in module.own_property_keys(context)? {
                        if let boa_engine::property::PropertyKey::String(key) = key {
                            let value = module.get(key.clone(), context)?;
                            synthetic.set_export(&key, value)?;
                        }
                    }
                    Ok(())
                },
                module,
            ),
            None,
            None,
            context,
        ))
    }
}

fn run_boa(path: &Path, source: &str, shape: Shape, sandbox: &Sandbox) -> Result<Value, String> {
    let mut context = Context::builder()
        .module_loader(std::rc::Rc::new(SandboxImports))
        .build()
        .map_err(|e| e.to_string())?;
    context
        .runtime_limits_mut()
        .set_loop_iteration_limit(LOOP_LIMIT);
    context.runtime_limits_mut().set_recursion_limit(2_000);
    // The only files the sandbox may read besides the ecosystem file: `.env*` beside it.
    let dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let read_dotenv = NativeFunction::from_copy_closure_with_captures(
        |_, args, dir: &std::path::PathBuf, context| {
            let requested = args
                .first()
                .map(|a| a.to_string(context))
                .transpose()?
                .map(|s| s.to_std_string_escaped())
                .unwrap_or_default();
            let text = read_dotenv(dir, &requested)
                .map_err(|e| boa_engine::JsNativeError::error().with_message(e))?;
            Ok(JsValue::from(JsString::from(text.as_str())))
        },
        dir,
    );
    context
        .register_global_callable(js_string!("__apm_read_dotenv"), 1, read_dotenv)
        .map_err(|e| e.to_string())?;
    let prelude_origin = Origin::new(Path::new(PRELUDE), "", 0);
    context
        .eval(Source::from_bytes(&prelude(path, sandbox)).with_path(Path::new(PRELUDE)))
        .map_err(|e| js_error(e, &mut context, &prelude_origin))?;
    // Wrappers open on the first line, so line numbers stay the file's.
    let (opening, closing) = match shape {
        Shape::Json => ("(", "\n)"),
        Shape::CommonJs => (
            "(function (module, exports, require, __dirname, __filename) {",
            "\n})(module, exports, require, __dirname, __filename); module.exports",
        ),
        Shape::Module => ("", ""),
        Shape::Yaml => unreachable!("YAML is not JavaScript"),
    };
    let mut origin = Origin::new(path, source, opening.chars().count());
    if shape == Shape::Module {
        return module_exports(path, source, &mut context, &origin);
    }
    let wrapped = format!("{opening}{source}{closing}");
    let value = context
        .eval(Source::from_bytes(&wrapped).with_path(path))
        .map_err(|e| {
            if shape == Shape::Json {
                origin.syntax_fallback =
                    serde_json::from_str::<Value>(source)
                        .err()
                        .map(|e| match e.column() {
                            // A line break that ended a string: the end of the line before.
                            0 if e.line() > 1 => {
                                let before = source.lines().nth(e.line() - 2).unwrap_or_default();
                                (e.line() - 1, before.chars().count() + 1)
                            }
                            column => (e.line(), column),
                        });
            }
            js_error(e, &mut context, &origin)
        })?;
    to_json(&value, &mut context, &origin)
}

/// The name the prelude's code has in the engine's positions.
const PRELUDE: &str = "<apm convert prelude>";

/// `dotenv.config({ path })`: `requested` (empty for `.env`) must name a
/// `.env*` file directly in `dir`, relative or absolute, and not through a
/// symbolic link: the file may be hostile, and apm may run as root. A file
/// that does not exist reads as empty, as dotenv has it.
fn read_dotenv(dir: &Path, requested: &str) -> Result<String, String> {
    use nix::fcntl::OFlag;
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let requested = if requested.is_empty() {
        ".env"
    } else {
        requested
    };
    let path = dir.join(requested);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let beside = path.parent().map(|p| p.components().eq(dir.components()));
    let lexically_plain = !Path::new(requested)
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir));
    if !name.starts_with(".env") || beside != Some(true) || !lexically_plain {
        return Err(format!(
            "dotenv: `{requested}` is refused: apm convert reads only `.env*` files in the ecosystem file's directory ({})",
            dir.display()
        ));
    }
    // O_NOFOLLOW: a `.env` that is a symbolic link could lead anywhere;
    // O_NONBLOCK: a FIFO must not hang the evaluation.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Err(format!(
                "dotenv: `{requested}` is a symbolic link; apm convert reads only plain `.env*` files beside the ecosystem file"
            ));
        }
        Err(e) => return Err(format!("dotenv: cannot read `{requested}`: {e}")),
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(format!("dotenv: `{requested}` is not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("dotenv: cannot read `{requested}`: {e}"))?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(format!("dotenv: `{requested}` is over {MAX_SIZE} bytes"));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn to_json(value: &JsValue, context: &mut Context, origin: &Origin) -> Result<Value, String> {
    value
        .to_json(context)
        .map_err(|e| js_error(e, context, origin))
        .map(|v| v.unwrap_or(Value::Null))
}

/// An ES module's `default` export, or its named `apps` export.
fn module_exports(
    path: &Path,
    source: &str,
    context: &mut Context,
    origin: &Origin,
) -> Result<Value, String> {
    let module = Module::parse(Source::from_bytes(source).with_path(path), None, context)
        .map_err(|e| js_error(e, context, origin))?;
    let promise = module.load_link_evaluate(context);
    context
        .run_jobs()
        .map_err(|e| js_error(e, context, origin))?;
    if let PromiseState::Rejected(error) = promise.state() {
        let error = boa_engine::JsError::from_opaque(error);
        return Err(js_error(error, context, origin));
    }
    let namespace = module.namespace(context);
    let default = namespace
        .get(js_string!("default"), context)
        .map_err(|e| js_error(e, context, origin))?;
    if !default.is_undefined() {
        return to_json(&default, context, origin);
    }
    let apps = namespace
        .get(js_string!("apps"), context)
        .map_err(|e| js_error(e, context, origin))?;
    if apps.is_undefined() {
        return Err("the module exports neither `default` nor `apps`".to_owned());
    }
    Ok(serde_json::json!({ "apps": to_json(&apps, context, origin)? }))
}

/// Evaluates with the local `node`, for files that require real packages:
/// with every right of the user running apm (only `--node` asks for it).
pub fn evaluate_with_node(path: &Path, timeout: std::time::Duration) -> Result<Value, String> {
    let absolute = std::path::absolute(path).map_err(|e| e.to_string())?;
    let file = Value::String(absolute.display().to_string()).to_string();
    let source = std::fs::read_to_string(path).unwrap_or_default();
    expect_ecosystem(path, &source)?;
    let script = match shape(path, &source) {
        Shape::Module => format!(
            "import({file}.startsWith('/') ? 'file://' + {file} : {file}).then(m => process.stdout.write(JSON.stringify(m.default !== undefined ? m.default : {{ apps: m.apps }})), e => {{ console.error(String(e && e.stack || e)); process.exit(1); }})"
        ),
        _ => format!("process.stdout.write(JSON.stringify(require({file})))"),
    };
    let mut node = std::process::Command::new("node");
    node.args(["-e", &script])
        .current_dir(absolute.parent().unwrap_or(Path::new("/")));
    let finished = run_child(node, timeout).map_err(|e| format!("node {e}"))?;
    if !finished.status.success() {
        return Err(format!(
            "node could not evaluate the file:\n{}",
            String::from_utf8_lossy(&finished.stderr).trim_end()
        ));
    }
    serde_json::from_slice(&finished.stdout)
        .map_err(|e| format!("node printed something that is not JSON: {e}"))
}

/// Reads a child's pipe on a thread of its own, up to `limit` bytes and
/// one more (to tell that it was over); the bytes arrive on the receiver.
fn read_bounded(
    pipe: Option<impl std::io::Read + Send + 'static>,
    limit: usize,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    use std::io::Read as _;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(pipe) = pipe {
            let _ = pipe.take(limit as u64 + 1).read_to_end(&mut bytes);
        }
        let _ = sender.send(bytes);
    });
    receiver
}

/// How a child evaluation ended, and what it printed.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How much of a child's stderr is kept for the error message.
const MAX_STDERR: usize = 64 * 1024;

/// Runs an evaluation in a child process and waits for it: it is killed
/// at `timeout`, and what it prints is read up to a bound (the pipe is
/// closed past it), so neither a file that never ends nor one whose value
/// is huge can hang apm or fill its memory.
pub fn run_child(
    mut command: std::process::Command,
    timeout: std::time::Duration,
) -> Result<Finished, String> {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot be started: {e}"))?;
    let stdout = read_bounded(child.stdout.take(), MAX_OUTPUT);
    let stderr = read_bounded(child.stderr.take(), MAX_STDERR);
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "did not finish evaluating the file within {} s (`--timeout` allows more)",
                timeout.as_secs_f64()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // A process the child left behind may hold the pipes open: wait a
    // little for what they carried, not for them to close.
    let collect = |receiver: std::sync::mpsc::Receiver<Vec<u8>>| {
        receiver
            .recv_timeout(std::time::Duration::from_secs(1))
            .unwrap_or_default()
    };
    let (stdout, mut stderr) = (collect(stdout), collect(stderr));
    if stdout.len() > MAX_OUTPUT {
        return Err(format!(
            "evaluated the file to a value of more than {} MiB; apm refuses it",
            MAX_OUTPUT / (1024 * 1024)
        ));
    }
    stderr.truncate(MAX_STDERR);
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}
