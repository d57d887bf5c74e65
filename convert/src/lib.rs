//! `apm convert`: PM2 ecosystem files to apm config. Like `caddy adapt`, it
//! takes a foreign config and returns native config text plus warnings.
//!
//! The only crate that links `boa_engine`, which evaluates JavaScript
//! ecosystem files in a sandbox (see `eval`); `mapping` is the table of PM2
//! fields that drives both the conversion and `docs/convert.md`.

pub mod eval;
pub mod mapping;

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

pub struct Options {
    /// Merge `env_NAME` over `env`, as `pm2 start --env NAME` does.
    pub env: Option<String>,
    pub cpus: usize,
}

/// A warning with where its app is in the ecosystem file.
#[derive(Debug, PartialEq)]
pub struct Warning {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug)]
pub struct Converted {
    pub text: String,
    pub warnings: Vec<Warning>,
}

fn apps(value: Value) -> Result<(Vec<Value>, Vec<String>), String> {
    let mut notes = Vec::new();
    let apps = match value {
        Value::Array(apps) => apps,
        Value::Object(mut object) => {
            for (section, what) in [("deploy", "deployment"), ("static", "static file serving")] {
                if object.remove(section).is_some() {
                    notes.push(format!("the `{section}` section ({what}) has no equivalent in apm and is not converted"));
                }
            }
            match object.remove("apps").or_else(|| object.remove("pm2")) {
                Some(Value::Array(apps)) => apps,
                Some(single @ Value::Object(_)) => vec![single],
                Some(_) => return Err("`apps` is not a list of apps".to_owned()),
                None if object.contains_key("script") => vec![Value::Object(object)],
                None => return Err("the file defines no apps: export `{ apps: [...] }`, an array of apps, or one app with `script`".to_owned()),
            }
        }
        Value::Null => return Err("the file exports nothing (is `module.exports` set?)".to_owned()),
        other => {
            return Err(format!(
                "the file exports {}, not an object with `apps`",
                kind(&other)
            ));
        }
    };
    Ok((apps, notes))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        Value::Null => "null",
    }
}

/// Where an app is in the source: its name's string literal, else `apps`.
fn position(source: &str, name: Option<&str>) -> (usize, usize) {
    let needles: Vec<String> = match name {
        Some(name) => ["'", "\"", "`"]
            .iter()
            .map(|q| format!("{q}{name}{q}"))
            .chain([format!("name: {name}")])
            .collect(),
        None => vec!["apps".to_owned()],
    };
    let offset = needles
        .iter()
        .filter_map(|n| source.find(n.as_str()))
        .min()
        .unwrap_or(0);
    let line = source[..offset].matches('\n').count() + 1;
    let column = source[..offset]
        .rsplit('\n')
        .next()
        .map_or(0, |l| l.chars().count())
        + 1;
    (line, column)
}

/// Converts the value an ecosystem file evaluated to (`eval`); `source` is
/// only searched for where each app is, for the warnings.
pub fn convert(
    path: &Path,
    source: &str,
    value: Value,
    options: &Options,
) -> Result<Converted, String> {
    let (apps, notes) = apps(value)?;
    let dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_default();
    let file_name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut text = format!(
        "# Converted from {} by `apm convert`.\n",
        one_line(&file_name)
    );
    let mut warnings = Vec::new();
    for note in &notes {
        warn(&mut text, &mut warnings, (1, 1), note);
    }
    let mut converted = 0;
    for (index, app) in apps.iter().enumerate() {
        let Value::Object(fields) = app else {
            warnings.push(Warning {
                line: 1,
                column: 1,
                message: format!("app #{index} is {}, not an object; skipped", kind(app)),
            });
            continue;
        };
        let fields = merge_env(&mapping::canonical(fields), options.env.as_deref());
        let name = fields.get("name").map(mapping::scalar);
        let (line, column) = position(source, name.as_deref());
        if !fields.contains_key("script") {
            let which = name.map_or(format!("app #{}", index + 1), |n| format!("app `{n}`"));
            warnings.push(Warning {
                line,
                column,
                message: one_line(&format!("{which} has no `script`; skipped")),
            });
            text.push('\n');
            comment(
                &mut text,
                "WARN",
                &format!("{which} has no `script` and was not converted"),
            );
            continue;
        }
        let out = mapping::convert(&mapping::App {
            fields: &fields,
            dir: &dir,
            cpus: options.cpus,
        });
        text.push('\n');
        for note in &out.notes {
            comment(&mut text, "NOTE", note);
        }
        for warning in &out.warnings {
            warn(&mut text, &mut warnings, (line, column), warning);
        }
        text.push_str(&apm_compiler::print::nested("worker", &out.settings));
        converted += 1;
    }
    if converted == 0 {
        return Err("no app could be converted (every app needs `script`)".to_owned());
    }
    Ok(Converted { text, warnings })
}

/// A `# TAG: …` line of the output. Comments are the one place the output
/// holds input text unquoted (values go through `print`, which quotes), so
/// the text is made one line here: a field name with a newline must not end
/// the comment and start a live key or worker.
fn comment(text: &mut String, tag: &str, message: &str) {
    let _ = writeln!(text, "# {tag}: {}", one_line(message));
}

/// A warning both above its block and on stderr, in the same words.
fn warn(
    text: &mut String,
    warnings: &mut Vec<Warning>,
    (line, column): (usize, usize),
    message: &str,
) {
    comment(text, "WARN", message);
    warnings.push(Warning {
        line,
        column,
        message: one_line(message),
    });
}

/// Text from the input made safe to print on one line: control characters
/// (newlines, terminal escapes) and Unicode line breaks as escapes.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `env_NAME` merged over `env` for `--env NAME`.
fn merge_env(fields: &Map<String, Value>, env: Option<&str>) -> Map<String, Value> {
    let mut fields = fields.clone();
    if let Some(name) = env
        && let Some(Value::Object(overrides)) = fields.get(&format!("env_{name}")).cloned()
    {
        let mut merged = match fields.get("env") {
            Some(Value::Object(base)) => base.clone(),
            _ => Map::new(),
        };
        merged.extend(overrides);
        fields.insert("env".to_owned(), Value::Object(merged));
    }
    fields
}

/// The mapping table as Markdown, for `docs/convert.md`.
pub fn mapping_reference() -> String {
    let mut out = String::from(
        "# `apm convert`: PM2 fields\n\n<!-- Generated from convert/src/mapping.rs; `BLESS=1 cargo test --test it docs` regenerates it. -->\n\n\
         `apm convert ecosystem.config.js > apm.conf` evaluates a PM2 ecosystem file (`.js`, `.cjs`, `.mjs`, ESM under \
         `\"type\": \"module\"`, `.json` — which PM2 reads as JavaScript — and `.yml`/`.yaml`) and prints one `worker { }` block \
         per app. Fields with no equivalent become `# WARN:` comments above their block, and are printed to stderr with the \
         app's line and column. `--env NAME` merges `env_NAME` like `pm2 start --env NAME`.\n\n\
         The file is evaluated by an embedded JavaScript engine in a child process of apm limited to 1 GiB of memory and \
         `--timeout` (10 s by default) of time. It sees `process.env`, `__dirname`, and `require` or `import` of `path`, `os` \
         and `dotenv`; `dotenv` reads only `.env*` files in the ecosystem file's own directory (no `..`, no symbolic links). A \
         file that requires anything else (`fs`, `child_process`, a package) is refused with the module's name. \
         `--node` evaluates it with the local `node` instead, as the user running apm and with everything that user may do \
         (apm says so on stderr first): use it only for a file you trust. Input text that reaches the output is quoted, \
         and in comments kept on one line, so no field name or value can add keys or workers.\n\n| PM2 field | in apm |\n|---|---|\n",
    );
    for field in mapping::FIELDS {
        let _ = writeln!(
            out,
            "| `{}` | {} |",
            field.pm2,
            field.becomes.replace('|', "\\|")
        );
    }
    out.push_str("\nPM2's other names for fields are read as the names above: ");
    out.push_str(
        &mapping::ALIASES
            .iter()
            .map(|(alias, name)| format!("`{alias}` → `{name}`"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push_str(".\n\nAny other field is reported as unknown and ignored. Every app also gets `path` (its `cwd`, else the ecosystem file's directory) and, unless `autorestart: false`, `restart` and `restart_err`, since PM2 restarts by default.\n");
    out
}
