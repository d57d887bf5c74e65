//! `apm export`: the compiled config as another platform's files.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
    // One write, not several per line (stderr is unbuffered).
    let mut warnings = String::new();
    for warning in &output.warnings {
        let _ = writeln!(warnings, "warning: {warning}");
    }
    let _ = std::io::stderr().lock().write_all(warnings.as_bytes());
    match &args.output {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("apm: cannot create `{}`: {e}", dir.display());
                return exit::FAILED;
            }
            if let Err((path, e)) = write_all(dir, &output.files) {
                eprintln!("apm: cannot write `{}`: {e}", path.display());
                return exit::FAILED;
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

/// Writes the files into `dir`, one after the other: creating files in one
/// directory from several threads measured slower (they queue on the
/// directory's lock).
fn write_all(dir: &Path, files: &[(String, String)]) -> Result<(), (PathBuf, std::io::Error)> {
    files.iter().try_for_each(|(name, text)| {
        let path = dir.join(name);
        write_file(&path, text.as_bytes()).map_err(|e| (path, e))
    })
}

/// Writes `text` to `path`, never through something planted there: a
/// symbolic link, a FIFO or a device, or a file that is another's or has
/// another name (a hard link) is replaced by a new file, not written
/// into. A regular file of ours with one name is overwritten in place:
/// truncating it to nothing first, or renaming a new file over it, makes
/// ext4 flush it as it is closed, which made writing 1,000 files again
/// take 90 ms rather than 15.
fn write_file(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let open = |new: bool| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(!new)
            .create_new(new)
            // A FIFO without a reader fails at once (ENXIO) rather than wait.
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
    };
    // The length of what is there, when it is a file of ours to overwrite.
    let ours = |file: &std::fs::File| {
        let meta = file.metadata().ok()?;
        let ours = meta.file_type().is_file()
            && meta.nlink() == 1
            && meta.uid() == nix::unistd::geteuid().as_raw();
        ours.then_some(meta.len())
    };
    match open(false) {
        Ok(mut file) => {
            if let Some(old) = ours(&file) {
                file.write_all(text)?;
                // Only a longer old text leaves something to cut.
                if old > text.len() as u64 {
                    file.set_len(text.len() as u64)?;
                }
                return Ok(());
            }
        }
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ELOOP | nix::libc::ENXIO)) => {}
        Err(e) => return Err(e),
    }
    std::fs::remove_file(path)?;
    open(true)?.write_all(text)
}
