//! `apm run` and `apm update` flags: every worker key of the schema table is
//! a flag (decisions: the CLI, rules 1 and 2). Flags become a `worker { }`
//! block that the compiler checks like any config file.

use apm_compiler::ir::WorkerSpec;
use apm_compiler::schema::{KeyDef, Scope};
use apm_compiler::values::{Kind, quote};

/// Flags and positional words of `run` or `update`.
#[derive(Debug, Default, PartialEq)]
pub struct Flags {
    /// Words that are not flags: the executable and its params for `run`.
    pub words: Vec<String>,
    /// Settings in the order given; a repeated many-value key appends.
    pub settings: Vec<(&'static str, Vec<String>)>,
    /// `-no-restart` on `update`: apply without restarting.
    pub no_restart: bool,
}

const BOOL_WORDS: [&str; 8] = ["true", "false", "on", "off", "yes", "no", "1", "0"];

fn worker_key(name: &str) -> Option<&'static KeyDef> {
    Scope::Worker.key_index(name).map(|i| &WorkerSpec::KEYS[i])
}

impl Flags {
    fn set(&mut self, key: &'static KeyDef, values: Vec<String>) {
        match self.settings.iter_mut().find(|(k, _)| *k == key.name) {
            Some((_, existing)) if key.many => existing.extend(values),
            Some((_, existing)) => *existing = values,
            None => self.settings.push((key.name, values)),
        }
    }

    /// Parses the arguments after the command. For `run`, words after the
    /// executable are its params unless they name a known flag, and
    /// everything after `--` is a param.
    pub fn parse(args: &[String], update: bool) -> Result<Flags, String> {
        let mut flags = Flags::default();
        let mut args = args.iter().peekable();
        while let Some(arg) = args.next() {
            if arg == "--" {
                flags.words.extend(args.by_ref().cloned());
                break;
            }
            let Some(flag) = arg
                .strip_prefix("--")
                .or_else(|| arg.strip_prefix('-'))
                .filter(|f| !f.is_empty())
            else {
                flags.words.push(arg.clone());
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            if update && name == "no-restart" && inline.is_none() {
                flags.no_restart = true;
                continue;
            }
            if let Some(key) = name
                .strip_prefix("no-")
                .and_then(worker_key)
                .filter(|k| k.kind == Kind::Bool)
            {
                flags.set(key, vec!["false".into()]);
                continue;
            }
            let Some(key) = worker_key(name) else {
                // After the executable, an unknown flag is the program's own.
                if !flags.words.is_empty() && !update {
                    flags.words.push(arg.clone());
                    continue;
                }
                let hint =
                    apm_compiler::diag::did_you_mean(name, WorkerSpec::KEYS.iter().map(|k| k.name));
                return Err(format!(
                    "unknown flag `{arg}`{}",
                    hint.map(|h| format!("; {h}")).unwrap_or_default()
                ));
            };
            let value = match inline {
                Some(value) => value,
                None if key.kind == Kind::Bool => match args.peek() {
                    Some(next) if BOOL_WORDS.contains(&next.to_ascii_lowercase().as_str()) => {
                        args.next().cloned().unwrap_or_default()
                    }
                    _ => "true".to_owned(),
                },
                None => args
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("`{arg}` needs a value: {}", key.kind.describe()))?,
            };
            let values = if key.many {
                value.split(',').map(str::trim).map(str::to_owned).collect()
            } else {
                vec![value]
            };
            flags.set(key, values);
        }
        Ok(flags)
    }
}

/// A `worker { }` block from settings, for the compiler.
pub fn worker_block(settings: &[(String, Vec<String>)]) -> String {
    let mut out = String::from("worker {\n");
    for (key, values) in settings {
        let values: Vec<String> = values.iter().map(|v| quote(v)).collect();
        out.push_str(&format!("    {key} {};\n", values.join(", ")));
    }
    out.push_str("}\n");
    out
}

/// Settings of `run`: the executable, its params, then the flags; the
/// working directory defaults to the caller's.
pub fn run_settings(
    flags: &Flags,
    cwd: &std::path::Path,
) -> Result<Vec<(String, Vec<String>)>, String> {
    let (exec, params) = flags
        .words
        .split_first()
        .ok_or("apm run needs the program to run: apm run <exec> [params…] [flags…]")?;
    let mut settings = vec![("exec".to_owned(), vec![exec.clone()])];
    if !params.is_empty() {
        settings.push(("params".to_owned(), params.to_vec()));
    }
    if !flags.settings.iter().any(|(k, _)| *k == "path") {
        settings.push((
            "path".to_owned(),
            vec![cwd.display().to_string().replace('$', "$$")],
        ));
    }
    settings.extend(
        flags
            .settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone())),
    );
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn words_after_the_executable_are_params_unless_they_are_flags() {
        let flags = Flags::parse(&args("python worker.py --port 3000 -name jobs -restart_err -instances=2 -env A=1,B=2 -env C=3"), false).unwrap();
        assert_eq!(flags.words, args("python worker.py --port 3000"));
        assert_eq!(
            flags.settings,
            vec![
                ("name", vec!["jobs".to_owned()]),
                ("restart_err", vec!["true".to_owned()]),
                ("instances", vec!["2".to_owned()]),
                (
                    "env",
                    vec!["A=1".to_owned(), "B=2".to_owned(), "C=3".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn booleans_double_dash_negation_and_verbatim_params() {
        let flags = Flags::parse(
            &args("node --restart false -no-watch_conf app.js -- -name x"),
            false,
        )
        .unwrap();
        assert_eq!(flags.words, args("node app.js -name x"));
        assert_eq!(
            flags.settings,
            vec![
                ("restart", vec!["false".to_owned()]),
                ("watch_conf", vec!["false".to_owned()])
            ]
        );
        assert_eq!(
            Flags::parse(&args("-instnaces 3 node"), false).unwrap_err(),
            "unknown flag `-instnaces`; did you mean `instances`?"
        );
        assert!(
            Flags::parse(&args("node -instances"), false)
                .unwrap_err()
                .contains("needs a value")
        );
    }

    #[test]
    fn update_takes_no_restart_as_the_apply_mode() {
        let flags = Flags::parse(&args("-instances 8 -no-restart"), true).unwrap();
        assert!(flags.no_restart);
        assert_eq!(flags.settings, vec![("instances", vec!["8".to_owned()])]);
    }
}
