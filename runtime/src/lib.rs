//! apm's runtime: applies worker specs (IR, never syntax) to real
//! processes. `lifecycle` is the pure state machine of one instance;
//! `supervisor` performs its effects; `logs`, `state` and `procfs` are
//! what it needs around that. `unsafe` is allowed in `sys` only.
#![deny(unsafe_code)]

pub mod connector;
pub mod lifecycle;
pub mod logs;
pub mod procfs;
pub mod proxy;
mod session;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod tls;
pub mod unbuilt;
mod upstream;
pub mod vanguard;

/// The daemon log is its stderr: one timestamped line per event. A log
/// that cannot be written (a full disk) loses the line, not the daemon:
/// `eprintln!` would panic.
pub fn log(message: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{} {message}", timestamp());
}

/// Now, in RFC 3339 with milliseconds, UTC.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
