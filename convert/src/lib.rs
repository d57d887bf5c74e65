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
        Value::Object(object) if object.is_empty() => {
            return Err("the file exports an empty object: `module.exports` was never set (expected `module.exports = { apps: [...] }`)".to_owned());
        }
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
                None if mapping::canonical(&object).contains_key("script") => {
                    vec![Value::Object(object)]
                }
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

/// Where an app is in the source: its name's string literal (past those of
/// the `earlier` apps of that name before it), else `apps`.
fn position(source: &str, name: Option<&str>, earlier: usize) -> (usize, usize) {
    let needles: Vec<String> = match name {
        Some(name) => ["'", "\"", "`"]
            .iter()
            .map(|q| format!("{q}{name}{q}"))
            .chain([format!("name: {name}")])
            .collect(),
        None => vec!["apps".to_owned()],
    };
    // The app after `earlier` others of its name: the next occurrence.
    let mut offsets: Vec<usize> = needles
        .iter()
        .flat_map(|n| source.match_indices(n.as_str()).map(|(at, _)| at))
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    let offset = offsets
        .get(earlier)
        .or(offsets.first())
        .copied()
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
    let mut blocks = Vec::new();
    let mut names_seen = Vec::new();
    for (index, app) in apps.iter().enumerate() {
        let Value::Object(fields) = app else {
            warnings.push(Warning {
                line: 1,
                column: 1,
                message: format!(
                    "app #{} is {}, not an object; skipped",
                    index + 1,
                    kind(app)
                ),
            });
            continue;
        };
        let mut fields = merge_env(&mapping::canonical(fields), options.env.as_deref());
        let boolean_warnings = mapping::booleans(&mut fields);
        let name = fields.get("name").map(mapping::scalar);
        let earlier = names_seen.iter().filter(|n| **n == name).count();
        let at = position(source, name.as_deref(), earlier);
        names_seen.push(name.clone());
        let which = name.map_or(format!("app #{}", index + 1), |n| format!("app `{n}`"));
        let out = match fields.get("script").map(mapping::scalar).as_deref() {
            None => Err("has no `script`".to_owned()),
            // PM2 swaps its own static file server in for this script.
            Some("serve") => Err("runs PM2's static file server (`script: 'serve'`), which apm has no equivalent for".to_owned()),
            Some(_) => {
                let mut out = mapping::convert(&mapping::App::new(&fields, &dir, options.cpus));
                out.warnings.extend(boolean_warnings);
                Ok(out)
            }
        };
        blocks.push((which, at, out));
    }
    if blocks.iter().all(|(_, _, out)| out.is_err()) {
        let reasons: Vec<String> = blocks
            .iter()
            .filter_map(|(which, _, out)| out.as_ref().err().map(|why| format!("{which} {why}")))
            .collect();
        return Err(format!(
            "no app could be converted (every app needs `script`, or PM2's `cmd`): {}",
            reasons.join("; ")
        ));
    }
    distinct_names(&mut blocks);
    for (which, at, out) in &blocks {
        text.push('\n');
        let out = match out {
            Ok(out) => out,
            Err(why) => {
                warn(
                    &mut text,
                    &mut warnings,
                    *at,
                    &format!("{which} {why}; not converted"),
                );
                continue;
            }
        };
        for note in &out.notes {
            comment(&mut text, "NOTE", note);
        }
        for warning in &out.warnings {
            warn(&mut text, &mut warnings, *at, warning);
        }
        text.push_str(&apm_compiler::print::nested("worker", &out.settings));
    }
    Ok(Converted { text, warnings })
}

/// One app on its way to the output: how warnings name it, where it is in
/// the source, and its conversion, or why it is skipped.
type Block = (String, (usize, usize), Result<mapping::Out, String>);

/// PM2 lets apps share a name (they are acted on together); apm names one
/// worker each. A repeated name gets the first free `-2`, `-3`…, with a
/// warning above the renamed block.
fn distinct_names(blocks: &mut [Block]) {
    let name_of = |out: &mapping::Out| {
        out.settings
            .iter()
            .find(|(key, _)| key == "name")
            .and_then(|(_, values)| values.first().cloned())
            .unwrap_or_default()
    };
    let mut taken: std::collections::HashSet<String> = blocks
        .iter()
        .filter_map(|(_, _, out)| out.as_ref().ok().map(name_of))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (which, _, out) in blocks.iter_mut() {
        let Ok(out) = out else { continue };
        let name = name_of(out);
        if seen.insert(name.clone()) {
            continue;
        }
        let renamed = (2..)
            .map(|n| {
                let suffix = format!("-{n}");
                let room = apm_compiler::values::MAX_WORKER_NAME.saturating_sub(suffix.len());
                format!("{}{suffix}", &name[..name.floor_char_boundary(room)])
            })
            .find(|candidate| !taken.contains(candidate))
            .unwrap_or_default();
        let shares = if which.contains(&format!("`{name}`")) {
            format!("{which} shares its name with an app before it")
        } else {
            format!("{which} is named `{name}` like an app before it")
        };
        out.warnings.push(format!(
            "{shares} (PM2 allows that, apm does not): this worker is named `{renamed}`"
        ));
        out.set("name", vec![renamed.clone()]);
        taken.insert(renamed.clone());
        seen.insert(renamed);
    }
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
    out.push_str(".\n\nAny other field is reported as unknown and ignored. Every app also gets `path` (its `cwd`, else the ecosystem file's directory) and, unless `autorestart: false`, `restart` and `restart_err`, since PM2 restarts by default. Apps that share a name (PM2 allows it) become workers named `NAME`, `NAME-2`, `NAME-3`… (a name another app has is skipped), with a warning. Boolean fields given as strings or numbers (`autostart: 'false'`, `watch: 'true'`, a value read from `process.env`) convert as the booleans they mean (`true`/`false`, and for fields that can only be booleans also `1`/`0`, `yes`/`no`, `on`/`off`, an empty string); any other value of a boolean-only field is ignored with a warning, as PM2 keeps its default. An app with `script: 'serve'` (PM2's static file server) is not converted, with a warning. A file that is empty, or never names `apps`, `script` or `cmd` (an app's own code, another tool's settings), is refused before it runs, saying what was expected; an error the file throws is reported at its `FILE:LINE:COLUMN`.\n");
    out
}
