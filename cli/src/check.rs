//! `apm check` and `apm explain`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use apm_compiler::{FsLoader, Severity, codes, compile, render};

use crate::client::Place;
use crate::{commands, exit};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Source snippets and a summary, for people.
    #[default]
    Human,
    /// One JSON object, for programs.
    Json,
    /// GitHub Actions workflow commands, to annotate pull requests.
    Github,
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The config file to check.
    file: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Shorthand for `--format json`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// Exit 1 on warnings too.
    #[arg(long)]
    deny_warnings: bool,
}

pub fn run(args: &CheckArgs) -> u8 {
    crate::free_memory_at_once();
    let mut compilation = match compile(&args.file, &FsLoader) {
        Ok(compilation) => compilation,
        Err(error) => {
            eprintln!("apm: cannot read `{}`: {error}", args.file.display());
            return exit::USAGE;
        }
    };
    crate::tls_check::check(&mut compilation);
    let format = if args.json { Format::Json } else { args.format };
    let unenforced = apm_runtime::unbuilt::notes(&compilation.config);
    // Not a fault of the config, but what it hands out should be said.
    let access = compilation
        .config
        .daemon
        .allow_group
        .as_ref()
        .map(|group| crate::protocol::allow_group_rule(&group.value));
    let mut trust = apm_runtime::traffic::vanguard::trust_notes(&compilation.config);
    trust.extend(apm_runtime::traffic::connector::persist_notes(
        &compilation.config,
    ));
    // With a daemon running (none is started), the plan a reload would apply.
    let plan = if compilation.has_errors() {
        None
    } else {
        commands::plan_of(&Place::from_env(), &args.file)
    };
    let output = match format {
        Format::Human => {
            let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let mut text = render::human(&compilation, color);
            for note in trust.iter().chain(&unenforced).chain(&access) {
                text.push_str(&format!("note: {note}\n"));
            }
            if let Some(text_plan) = plan.as_ref().and_then(|p| p["text"].as_str()) {
                text.push_str("plan if reloaded now (`apm reload` applies it):\n");
                text.push_str(text_plan);
            }
            text
        }
        Format::Json => {
            let mut report = render::json(&compilation);
            report["not_enforced"] = serde_json::json!(unenforced);
            if let Some(access) = &access {
                report["access"] = serde_json::json!(access);
            }
            report["notes"] = serde_json::json!(trust);
            if let Some(plan) = plan {
                report["plan"] = plan["plan"].clone();
            }
            format!("{report:#}\n")
        }
        Format::Github => render::github(&compilation),
    };
    // A closed pipe (`apm check … | head`) is not an error of the config.
    let _ = std::io::stdout().lock().write_all(output.as_bytes());
    let failed = compilation.has_errors()
        || (args.deny_warnings && compilation.count(Severity::Warning) > 0);
    // The process exits next: freeing a large config piece by piece would
    // only add to the run time.
    std::mem::forget(compilation);
    if failed { exit::FAILED } else { exit::OK }
}

pub fn explain(code: Option<&str>) -> u8 {
    let Some(code) = code else {
        for code in codes::ALL {
            println!("{}  {}", code.id, code.title);
        }
        return exit::OK;
    };
    match codes::lookup(code) {
        Some(code) => {
            let severity = match code.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            println!(
                "{} ({severity}): {}\n\n{}",
                code.id, code.title, code.explanation
            );
            exit::OK
        }
        None => {
            eprintln!("apm: unknown code `{code}`; `apm explain` lists them all");
            exit::USAGE
        }
    }
}

/// `apm fmt`.
pub fn fmt(file: &std::path::Path, check: bool, diff: bool) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            return exit::USAGE;
        }
    };
    let Some(formatted) = apm_compiler::format::format(&text) else {
        eprintln!(
            "apm: `{}` has syntax errors; fix them first (`apm check {}`)",
            file.display(),
            file.display()
        );
        return exit::FAILED;
    };
    if formatted == text {
        return exit::OK;
    }
    if diff {
        let name = file.display().to_string();
        print!(
            "{}",
            similar::TextDiff::from_lines(&text, &formatted)
                .unified_diff()
                .header(&name, &name)
        );
    }
    if check || diff {
        if check {
            eprintln!("{} is not formatted", file.display());
        }
        return exit::FAILED;
    }
    match crate::files::write_atomically(file, &formatted) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("apm: cannot write `{}`: {e}", file.display());
            exit::FAILED
        }
    }
}
