//! `apm convert`: a PM2 ecosystem file in, apm config out.
//!
//! An ecosystem file is a program, and a hostile one must not get apm's
//! rights (often root) or its resources: the embedded engine runs it in a
//! child process of apm (`apm convert --evaluate-only`) under a memory and
//! CPU limit and a deadline, and the local node runs it only when `--node`
//! asks, after apm says what that means.

use std::path::Path;
use std::time::Duration;

use apm_convert::eval;
use nix::sys::resource::{Resource, setrlimit};

use crate::exit;

/// The address space the evaluating child may use: a real ecosystem file
/// needs a few MiB; a string-doubling bomb reaches this within a second.
const MEMORY_LIMIT: u64 = 1024 * 1024 * 1024;
/// How much the evaluating child's allocator reserves at a time.
const ARENA_RESERVE: (&str, &str) = ("MIMALLOC_ARENA_RESERVE", "64MiB");

/// How to evaluate the file.
pub struct How {
    pub node: bool,
    pub env: Option<String>,
    pub timeout: Duration,
}

fn read_source(file: &Path) -> Result<String, u8> {
    let size = match std::fs::metadata(file) {
        Ok(meta) => meta.len(),
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            return Err(exit::USAGE);
        }
    };
    if size > eval::MAX_SIZE {
        eprintln!(
            "apm: `{}` is {size} bytes; an ecosystem file over {} bytes is not evaluated",
            file.display(),
            eval::MAX_SIZE
        );
        return Err(exit::FAILED);
    }
    match std::fs::read(file) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            Err(exit::USAGE)
        }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Text the file chose (an error it threw, a value) as apm prints it:
/// escapes instead of control characters, so it cannot drive the terminal.
fn printable(text: &str) -> String {
    text.lines()
        .map(apm_convert::one_line)
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn run(file: &Path, output: Option<&Path>, how: &How, force: bool) -> u8 {
    let source = match read_source(file) {
        Ok(source) => source,
        Err(code) => return code,
    };
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
    let value = if how.node {
        announce_node(file);
        eval::evaluate_with_node(file, how.timeout)
    } else {
        evaluate_in_child(file, how.timeout)
    };
    let options = apm_convert::Options {
        env: how.env.clone(),
        cpus: cpus(),
    };
    let converted =
        match value.and_then(|value| apm_convert::convert(file, &source, value, &options)) {
            Ok(converted) => converted,
            Err(message) => {
                eprintln!(
                    "apm: cannot convert `{}`: {}",
                    file.display(),
                    printable(&message)
                );
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

/// `--node` runs the file with the caller's every right: say so before it runs.
fn announce_node(file: &Path) {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| "?".to_owned(), |u| u.name);
    eprintln!(
        "apm: --node: running `{}` with the local `node` (the first on PATH) as uid {uid} ({user}), \
         outside any sandbox: the file can read and change whatever {user} may, run programs and use the network. \
         Use --node only for a file you trust.",
        file.display()
    );
}

/// The file's value from a child process of apm that evaluates it with the
/// embedded engine under `MEMORY_LIMIT`, a CPU limit and `timeout`.
fn evaluate_in_child(file: &Path, timeout: Duration) -> Result<serde_json::Value, String> {
    let mut child = std::process::Command::new("/proc/self/exe");
    child
        .arg("convert")
        .arg("--evaluate-only")
        .arg(format!("--timeout={}ms", timeout.as_millis()))
        .arg("--")
        .arg(file)
        // mimalloc reserves a 1 GiB arena up front, which RLIMIT_DATA counts:
        // with MEMORY_LIMIT at 1 GiB about one evaluation in 25 failed for
        // memory it never used. A small reserve leaves the limit to the file.
        .env(ARENA_RESERVE.0, ARENA_RESERVE.1);
    let finished =
        eval::run_child(child, timeout).map_err(|e| format!("the embedded engine {e}"))?;
    let stderr = String::from_utf8_lossy(&finished.stderr);
    if finished.status.success() {
        return serde_json::from_slice(&finished.stdout)
            .map_err(|e| format!("the evaluation printed something that is not JSON: {e}"));
    }
    if finished.status.code() == Some(exit::FAILED.into()) {
        return Err(stderr.trim_end().to_owned());
    }
    use std::os::unix::process::ExitStatusExt as _;
    Err(match finished.status.signal() {
        // Rust reports an allocation the limit refused, then aborts.
        _ if stderr.contains("memory allocation of") => format!(
            "evaluating the file took more than {} MiB of memory (a memory bomb?); apm stopped it",
            MEMORY_LIMIT / (1024 * 1024)
        ),
        Some(signal) if signal == nix::sys::signal::Signal::SIGXCPU as i32 => format!(
            "evaluating the file took more than {} s of CPU time; apm stopped it (`--timeout` allows more)",
            timeout.as_secs_f64()
        ),
        _ => format!(
            "evaluating the file failed ({}):\n{}",
            finished.status,
            stderr.trim_end()
        ),
    })
}

/// The child's side of `evaluate_in_child`: limits itself, evaluates, and
/// prints the value as JSON (or the error on stderr, exiting 1).
pub fn evaluate_only(file: &Path, timeout: Duration) -> u8 {
    // Limits the kernel enforces, whatever the file makes the engine do.
    let cpu = timeout.as_secs() + 1;
    if let Err(e) = setrlimit(Resource::RLIMIT_DATA, MEMORY_LIMIT, MEMORY_LIMIT)
        .and_then(|()| setrlimit(Resource::RLIMIT_CPU, cpu, cpu + 1))
    {
        eprintln!("cannot limit the evaluation's resources: {e}");
        return exit::FAILED;
    }
    let source = match read_source(file) {
        Ok(source) => source,
        Err(code) => return code,
    };
    // The file sees its caller's environment, not the allocator setting
    // apm gave its own child.
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| name != ARENA_RESERVE.0)
        .collect();
    let sandbox = eval::Sandbox {
        env: &env,
        cpus: cpus(),
    };
    match eval::evaluate(file, &source, &sandbox) {
        Ok(value) => {
            print!("{value}");
            exit::OK
        }
        Err(message) => {
            eprintln!("{message}");
            exit::FAILED
        }
    }
}
