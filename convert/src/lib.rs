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
    /// Evaluate with the local `node` instead of the embedded engine.
    pub node: bool,
    /// Merge `env_NAME` over `env`, as `pm2 start --env NAME` does.
    pub env: Option<String>,
    pub cpus: usize,
    /// Let the local node stand in when the embedded engine fails.
    pub fallback_to_node: bool,
    /// What the file sees as `process.env`.
    pub process_env: Vec<(String, String)>,
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
    /// How the file was evaluated, for a note when node stood in for boa.
    pub evaluated_by: &'static str,
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

pub fn convert(path: &Path, source: &str, options: &Options) -> Result<Converted, String> {
    let sandbox = eval::Sandbox {
        env: &options.process_env,
        cpus: options.cpus,
    };
    let (value, evaluated_by) = if options.node {
        (eval::evaluate_with_node(path)?, "node")
    } else {
        match eval::evaluate(path, source, &sandbox) {
            Ok(value) => (value, "boa"),
            // node stands in for what the embedded engine cannot do (a real
            // package, syntax it lacks), not for a file that never ends.
            Err(error)
                if eval::shape(path, source) != eval::Shape::Yaml
                    && !error.contains("did not finish")
                    && options.fallback_to_node
                    && eval::node_available() =>
            {
                let value = eval::evaluate_with_node(path).map_err(|node_error| {
                    format!("{error}\n(node could not evaluate it either: {node_error})")
                })?;
                (value, "node")
            }
            Err(error) => return Err(error),
        }
    };
    let (apps, notes) = apps(value)?;
    let dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_default();
    let file_name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut text = format!("# Converted from {file_name} by `apm convert`.\n");
    if evaluated_by == "node" && !options.node {
        text.push_str(
            "# NOTE: evaluated with the local node: the embedded engine could not run the file.\n",
        );
    }
    for note in &notes {
        let _ = writeln!(text, "# WARN: {note}");
    }
    let mut warnings: Vec<Warning> = notes
        .into_iter()
        .map(|message| Warning {
            line: 1,
            column: 1,
            message,
        })
        .collect();
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
                message: format!("{which} has no `script`; skipped"),
            });
            let _ = writeln!(
                text,
                "\n# WARN: {which} has no `script` and was not converted"
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
            let _ = writeln!(text, "# NOTE: {note}");
        }
        for warning in &out.warnings {
            let _ = writeln!(text, "# WARN: {warning}");
            warnings.push(Warning {
                line,
                column,
                message: warning.clone(),
            });
        }
        text.push_str(&apm_compiler::print::nested("worker", &out.settings));
        converted += 1;
    }
    if converted == 0 {
        return Err("no app could be converted (every app needs `script`)".to_owned());
    }
    Ok(Converted {
        text,
        warnings,
        evaluated_by,
    })
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
         app's line and column. `--env NAME` merges `env_NAME` like `pm2 start --env NAME`; `--node` evaluates with the local \
         node (needed when the file requires real packages; also used automatically, with a note, when the embedded engine \
         fails and node is installed).\n\n| PM2 field | in apm |\n|---|---|\n",
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
