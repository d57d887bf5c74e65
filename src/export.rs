//! `apm export`: the compiled config as another platform's files.

use std::io::Write as _;
use std::path::PathBuf;

use apm_compiler::{FsLoader, compile, render};
use apm_export::{Options, Target};

use crate::exit;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetArg {
    Kubernetes,
    Nomad,
    Compose,
    Systemd,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[arg(value_enum)]
    target: TargetArg,
    /// The config file to export.
    file: PathBuf,
    /// Write the files into this directory (created if missing) instead of stdout.
    #[arg(short, long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// The container image that holds the programs (Kubernetes, Compose).
    #[arg(long, default_value = "apm-app:latest")]
    image: String,
}

pub fn run(args: &ExportArgs) -> u8 {
    let compilation = match compile(&args.file, &FsLoader) {
        Ok(compilation) => compilation,
        Err(error) => {
            eprintln!("apm: cannot read `{}`: {error}", args.file.display());
            return exit::USAGE;
        }
    };
    if compilation.has_errors() {
        eprint!("{}", render::human(&compilation, false));
        eprintln!(
            "apm: `{}` has errors; nothing is exported",
            args.file.display()
        );
        return exit::FAILED;
    }
    let target = match args.target {
        TargetArg::Kubernetes => Target::Kubernetes,
        TargetArg::Nomad => Target::Nomad,
        TargetArg::Compose => Target::Compose,
        TargetArg::Systemd => Target::Systemd,
    };
    let output = apm_export::export(
        &compilation,
        target,
        &Options {
            image: args.image.clone(),
        },
    );
    let mut stderr = std::io::stderr().lock();
    for warning in &output.warnings {
        let _ = writeln!(stderr, "warning: {warning}");
    }
    match &args.output {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("apm: cannot create `{}`: {e}", dir.display());
                return exit::FAILED;
            }
            for (name, text) in &output.files {
                let path = dir.join(name);
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!("apm: cannot write `{}`: {e}", path.display());
                    return exit::FAILED;
                }
            }
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            let several = output.files.len() > 1 && target == Target::Systemd;
            for (name, text) in &output.files {
                // Unit files have no document separator: each is headed by its name.
                let head = if several {
                    format!("# ==> {name} <==\n")
                } else {
                    String::new()
                };
                let _ = stdout.write_all(format!("{head}{text}").as_bytes());
            }
        }
    }
    std::mem::forget(compilation);
    exit::OK
}
