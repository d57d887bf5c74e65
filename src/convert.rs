//! `apm convert`: a PM2 ecosystem file in, apm config out.

use std::path::Path;

use crate::exit;

pub fn run(file: &Path, output: Option<&Path>, node: bool, env: Option<String>, force: bool) -> u8 {
    let size = match std::fs::metadata(file) {
        Ok(meta) => meta.len(),
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            return exit::USAGE;
        }
    };
    if size > apm_convert::eval::MAX_SIZE {
        eprintln!(
            "apm: `{}` is {size} bytes; an ecosystem file over {} bytes is not evaluated",
            file.display(),
            apm_convert::eval::MAX_SIZE
        );
        return exit::FAILED;
    }
    if let Some(output) = output
        && output.exists()
        && !force
    {
        eprintln!(
            "apm: `{}` exists; add --force to overwrite it",
            output.display()
        );
        return exit::USAGE;
    }
    let source = match std::fs::read(file) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            return exit::USAGE;
        }
    };
    let options = apm_convert::Options {
        node,
        env,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        fallback_to_node: true,
        process_env: std::env::vars().collect(),
    };
    let converted = match apm_convert::convert(file, &source, &options) {
        Ok(converted) => converted,
        Err(message) => {
            eprintln!("apm: cannot convert `{}`: {message}", file.display());
            return exit::FAILED;
        }
    };
    for warning in &converted.warnings {
        eprintln!(
            "{}:{}:{}: warning: {}",
            file.display(),
            warning.line,
            warning.column,
            warning.message
        );
    }
    match output {
        Some(output) => match crate::files::write_atomically(output, &converted.text) {
            Ok(()) => {
                eprintln!(
                    "wrote {}; check it with `apm check {}`",
                    output.display(),
                    output.display()
                );
                exit::OK
            }
            Err(e) => {
                eprintln!("apm: cannot write `{}`: {e}", output.display());
                exit::FAILED
            }
        },
        None => {
            print!("{}", converted.text);
            exit::OK
        }
    }
}
