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

/// The numbers of a worker's `TICK N` lines of one stream (`marker` `|`
/// or `!`) in a log file, in order, after checking that each line is whole
/// and written under `names`, in that order (all of the first name's lines
/// before the second's).
fn ticks(path: &std::path::Path, names: &[&str], marker: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let separator = format!(" {marker} ");
    let mut numbers = Vec::new();
    let mut at = 0;
    for line in text.lines().filter(|l| !l.starts_with("before")) {
        let Some((stamp_and_name, tick)) = line.split_once(&separator) else {
            assert!(
                line.contains(" | ") || line.contains(" ! "),
                "a split line: {line:?}"
            );
            continue;
        };
        let name = stamp_and_name.split(' ').nth(1).unwrap_or_default();
        let index = names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("{line:?} is not under {names:?}"));
        assert!(index >= at, "{line:?} after a line of {}", names[at]);
        at = index;
        let number = tick
            .strip_prefix("TICK ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a split line: {line:?}"));
        numbers.push(number);
    }
    numbers
}

fn assert_consecutive(numbers: &[u32], from: u32, what: &str) {
    let expected: Vec<u32> = (from..from + numbers.len() as u32).collect();
    assert_eq!(
        numbers, expected,
        "{what}: lines lost, repeated or reordered"
    );
}

const TICKER: &str =
    "i=0; while :; do i=$((i+1)); echo TICK $i; echo TICK $i >&2; sleep 0.005; done";

/// `apm rename OLD NEW` moves OLD's log files to NEW's while its process
/// runs: the lines written before and after the rename are all in NEW's
/// files, in order, each whole and once, and `apm log NEW` shows the next
/// ones at once (decision 108).
#[test]
fn a_rename_moves_the_running_worker_s_logs_with_no_line_lost_split_or_repeated() {
    let d = Daemon::new("rename_logs");
    d.run_sh("old", TICKER, &["-startup_grace", "100"]);
    let logs = d.home.join("logs");
    wait_until(PATIENCE, "the old name's lines", || {
        d.log("old", false).contains("old | TICK 50")
    });

    let renamed = d.ok(&["rename", "old", "new"]);
    assert_eq!(stderr(&renamed), "", "no note: {}", describe(&renamed));
    // The next lines are under the new name, in its log, within the deadline.
    wait_until(PATIENCE, "the new name's lines in `apm log new`", || {
        d.log("new", false).contains("new | TICK") && d.log("new", true).contains("new ! TICK")
    });
    for stream in ["out", "err"] {
        assert!(
            !logs.join(format!("old.{stream}.log")).exists(),
            "the old {stream} log was moved"
        );
    }
    d.ok(&["stop", "new"]);
    for stream in ["out", "err"] {
        let marker = if stream == "out" { "|" } else { "!" };
        let numbers = ticks(
            &logs.join(format!("new.{stream}.log")),
            &["old", "new"],
            marker,
        );
        assert!(numbers.len() > 50, "{stream}: {numbers:?}");
        assert_consecutive(&numbers, 1, stream);
    }
}

/// A rename leaves the old log where the new name already has one (its
/// lines go on there) or where the config names the file (`log`): the
/// rename says so, and no line is lost or repeated across the switch.
#[test]
fn a_rename_that_cannot_move_the_logs_says_why_and_loses_no_line() {
    let d = Daemon::new("rename_kept_logs");
    let fixed = d.path("fixed.log");
    d.run_sh("taken", TICKER, &["-startup_grace", "100"]);
    d.run_sh("fixed", TICKER, &["-startup_grace", "100", "-log", &fixed]);
    let logs = d.home.join("logs");
    // The daemon makes the directory as it opens the first log: maybe not yet.
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(
        logs.join("reused.out.log"),
        "before: a former worker's line\n",
    )
    .unwrap();
    wait_until(PATIENCE, "both workers' lines", || {
        d.log("taken", false).contains("taken | TICK 20")
            && d.log("fixed", false).contains("fixed | TICK 20")
    });

    let renamed = d.ok(&["rename", "taken", "reused"]);
    let old_out = logs.join("taken.out.log");
    assert_eq!(
        stderr(&renamed),
        format!(
            "apm: note: its earlier output stays in {} ({} exists already); from now on it goes to {}\n",
            old_out.display(),
            logs.join("reused.out.log").display(),
            logs.join("reused.out.log").display()
        ),
        "{}",
        describe(&renamed)
    );
    let renamed = d.ok(&["rename", "fixed", "still-fixed"]);
    assert_eq!(
        stderr(&renamed),
        format!("apm: note: its output still goes to {fixed}, which `log` names\n"),
        "{}",
        describe(&renamed)
    );
    wait_until(PATIENCE, "the new names' lines", || {
        d.log("reused", false).contains("reused | TICK")
            && d.log("still-fixed", false).contains("still-fixed | TICK")
    });
    d.ok(&["stop", "reused"]);
    d.ok(&["stop", "still-fixed"]);

    let before = ticks(&old_out, &["taken"], "|");
    let after = ticks(&logs.join("reused.out.log"), &["reused"], "|");
    assert!(
        std::fs::read_to_string(logs.join("reused.out.log"))
            .unwrap()
            .starts_with("before: a former worker's line\n"),
        "the file already there is appended to"
    );
    assert_consecutive(&before, 1, "the old file");
    assert_consecutive(&after, before.len() as u32 + 1, "across the switch");
    // The err stream's file did not exist under the new name: it moved.
    assert!(!logs.join("taken.err.log").exists());
    assert_consecutive(
        &ticks(&logs.join("reused.err.log"), &["taken", "reused"], "!"),
        1,
        "the moved err log",
    );
    // A log the config names keeps every line, before and after.
    for marker in ["|", "!"] {
        let fixed_lines = ticks(
            std::path::Path::new(&fixed),
            &["fixed", "still-fixed"],
            marker,
        );
        assert_consecutive(&fixed_lines, 1, "the named log");
    }
}
