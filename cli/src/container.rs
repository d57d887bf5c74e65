//! `apm container FILE`: apm as a container's PID 1 (issue 21).
//!
//! The process the container starts is a small init: it forks the daemon
//! (which runs FILE's workers in the foreground), forwards it the signals
//! a container platform sends, reaps every process that ends up as its
//! child, and exits with the daemon's status. The daemon lives in a
//! process of its own so that reaping with `waitpid(-1)` can never take
//! a worker's exit status from tokio, which waits for each worker by pid.

use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

use crate::client::Place;
use crate::exit;

/// The signals passed on to the daemon; SIGCHLD is the init's own.
const FORWARDED: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
];

pub fn run(place: Place, file: PathBuf, socket: bool) -> u8 {
    let file = match std::path::absolute(&file) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("apm: {}: {e}", file.display());
            return exit::FAILED;
        }
    };
    // Outside a PID namespace of its own (`docker run --init`, a test),
    // orphans of the workers still come here rather than to the host's init.
    if std::process::id() != 1
        && let Err(e) = nix::sys::prctl::set_child_subreaper(true)
    {
        eprintln!("apm: cannot become a child subreaper: {e}");
    }
    // Blocked before the fork, so that none is lost before the loop below
    // waits for them; the daemon unblocks them (tokio handles them there).
    let mut watched = SigSet::empty();
    watched.add(Signal::SIGCHLD);
    for signal in FORWARDED {
        watched.add(signal);
    }
    if let Err(e) = watched.thread_block() {
        eprintln!("apm: cannot block signals: {e}");
        return exit::FAILED;
    }
    // SAFETY: no thread has been started yet in this process (main calls
    // this before any runtime), so the child may run arbitrary code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = watched.thread_unblock();
            crate::daemon::run_container(place, file, socket)
        }
        Ok(ForkResult::Parent { child }) => init(child, &watched),
        Err(e) => {
            eprintln!("apm: cannot start the daemon: {e}");
            exit::FAILED
        }
    }
}

/// Reaps every child until the daemon itself ends, then answers with its
/// status (128+N when a signal N ended it, as shells report it).
fn init(daemon: Pid, watched: &SigSet) -> u8 {
    loop {
        match watched.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(signal) => {
                let _ = kill(daemon, signal);
                continue;
            }
            Err(_) => continue,
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == daemon => return code as u8,
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == daemon => {
                    return 128 + signal as u8;
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
