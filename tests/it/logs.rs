//! Capturing workers' output under pressure.

use std::time::Duration;

use crate::harness::*;

/// A memory figure of a process (`VmRSS:`, `VmHWM:`) from
/// `/proc/PID/status`, in KiB.
pub(crate) fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Long lines on several streams, to log files that take nothing more
/// (here FIFOs nobody reads: a stalled disk), wait in a queue of bounded
/// bytes per file, not of 1,024 lines of up to 64 KiB each (which took the
/// daemon to 455 MB).
#[test]
fn long_lines_to_a_stalled_log_keep_the_daemon_small() {
    use std::os::unix::fs::OpenOptionsExt;
    let d = Daemon::new("long_lines");
    let mut readers = Vec::new();
    for w in 0..4 {
        let mut flags = vec![];
        for stream in ["out", "err"] {
            let fifo = d.dir().join(format!("{stream}{w}.fifo"));
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            // Held open and never read: the daemon's writes fill the pipe, then wait.
            readers.push(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(&fifo)
                    .unwrap(),
            );
            flags.push(format!(
                "-{}",
                if stream == "out" { "log" } else { "err_log" }
            ));
            flags.push(fifo.display().to_string());
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        d.run_sh(
            &format!("spew{w}"),
            "head -c 1000000000 /dev/zero | tr '\\0' x & \
             head -c 1000000000 /dev/zero | tr '\\0' y >&2; wait",
            &flags,
        );
    }
    let daemon = d.daemon_pid().unwrap();
    // Every writer ends up waiting for the daemon, which waits for the FIFOs.
    wait_until(
        Duration::from_secs(60),
        "every worker's output to wait for the daemon",
        || {
            let writers: Vec<u32> = d
                .processes()
                .into_iter()
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "tr")
                })
                .collect();
            writers.len() == 8
                && writers.iter().all(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                        .is_ok_and(|w| w.contains("pipe_write"))
                })
        },
    );
    let rss = rss_kib(daemon, "VmRSS:");
    assert!(rss < 64 * 1024, "the daemon holds {rss} KiB");
    // Once the FIFOs have no reader, their writes fail and the daemon ends
    // at once: no thread of it stays stuck opening a FIFO nobody reads.
    drop(readers);
    let exit = d.ok(&["exit", "daemon"]);
    assert_eq!(
        stdout(&exit).trim(),
        "daemon stopped",
        "{}",
        describe(&exit)
    );
}
