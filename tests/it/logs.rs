//! Capturing workers' output under pressure.

use std::time::Duration;

use crate::harness::*;

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
    let rss = status_kib(daemon, "VmRSS:");
    assert!(rss < 64 * 1024, "the daemon holds {rss} KiB");
    // Once the FIFOs have no reader, their writes fail and the daemon ends
    // at once: no thread of it stays stuck opening a FIFO nobody reads.
    drop(readers);
    let exit = d.ok(&["exit", "daemon"]);
    assert_eq!(
        stdout(&exit).lines().next(),
        Some("daemon stopped"),
        "{}",
        describe(&exit)
    );
}

/// `prefix` colours (`çN-`) and `log_time_format` shape every line, `apm log
/// --err` still tells the streams apart although the stamp has spaces, and
/// `strip_ansi` leaves the colours out.
#[test]
fn prefix_colours_and_time_format_shape_the_lines() {
    let d = Daemon::new("log_style");
    let script = "echo out-line; echo err-line >&2; exec sleep 600";
    let shared = d.path("styled.log");
    d.run_sh(
        "styled",
        script,
        &[
            "-prefix",
            "ç208-api",
            "-log_time_format",
            "%Y/%m/%d %H:%M:%S UTC",
            "-log",
            &shared,
        ],
    );
    d.run_sh("plain", script, &["-prefix", "ç2-quiet", "-strip_ansi"]);
    wait_until(PATIENCE, "both lines in the shared log", || {
        std::fs::read_to_string(&shared)
            .is_ok_and(|t| t.contains("err-line") && t.contains("out-line"))
    });
    let text = std::fs::read_to_string(&shared).unwrap();
    for line in text.lines() {
        // `YYYY/MM/DD HH:MM:SS UTC`, then the coloured prefix.
        let shape: String = line
            .chars()
            .take(23)
            .map(|c| if c.is_ascii_digit() { '9' } else { c })
            .collect();
        assert_eq!(shape, "9999/99/99 99:99:99 UTC", "{line:?}");
        assert!(
            line[23..].starts_with(" \x1b[38;5;208mapi\x1b[0m "),
            "{line:?}"
        );
    }
    let errors = stdout(&d.ok(&["log", "styled", "--err"]));
    assert!(
        errors.contains("err-line") && !errors.contains("out-line"),
        "{errors}"
    );
    let outs = stdout(&d.ok(&["log", "styled"]));
    assert!(
        outs.contains("out-line") && !outs.contains("err-line"),
        "{outs}"
    );

    wait_until(PATIENCE, "the plain worker's line", || {
        d.log("plain", false).contains("out-line")
    });
    let plain = d.log("plain", false);
    assert!(
        plain.contains(" quiet | out-line") && !plain.contains('\x1b'),
        "{plain:?}"
    );
}
