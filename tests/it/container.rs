//! `apm container FILE`: apm as PID 1 of a new PID namespace, as a
//! container platform starts it (issue 21).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{self, Daemon, PATIENCE};

/// `apm container CONFIG` as PID 1 of its own PID namespace, or `None`
/// (after saying why) when `unshare` cannot make one here.
fn start_as_pid_1(daemon: &Daemon, config: &str) -> Option<(Child, Pid)> {
    let usable = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        harness::prerequisite_missing("`unshare --pid --fork --mount-proc` (util-linux, as root)");
        return None;
    }
    let file = daemon.write("container.conf", config);
    let apm = env!("CARGO_BIN_EXE_apm");
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--mount-proc", apm, "container"])
        .arg(&file)
        .env("APM_HOME", &daemon.home)
        .env("APM_SOCKET", &daemon.socket)
        // What a platform sets for the program (decision 121).
        .env("PLATFORM_VAR", "from-the-platform")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let unshare = command.spawn().unwrap();
    // unshare's one child is the namespace's PID 1; signals go to it.
    let children = format!("/proc/{0}/task/{0}/children", unshare.id());
    let init = harness::wait_for("the namespace's PID 1", || {
        let text = std::fs::read_to_string(&children).ok()?;
        text.split_whitespace().next()?.parse::<i32>().ok()
    });
    Some((unshare, Pid::from_raw(init)))
}

/// SIGTERM to PID 1; the namespace's status once it ended, and how long it took.
fn terminate(unshare: Child, init: Pid) -> (std::process::Output, Duration) {
    let sent = Instant::now();
    kill(init, Signal::SIGTERM).unwrap();
    let output = harness::run_child(unshare, PATIENCE).expect("apm container did not end");
    (output, sent.elapsed())
}

#[test]
fn orphans_of_workers_are_reaped() {
    let daemon = Daemon::new("container-reap");
    let gpid = daemon.path("grandchild.pid");
    let reaped = daemon.path("reaped");
    // The child forks a grandchild and exits before it: the grandchild
    // ends as an orphan of PID 1, and stays a zombie unless PID 1 reaps it.
    let script = daemon.write(
        "orphaner.sh",
        &format!(
            "( sleep 0.1 & echo $! > {gpid} )\n\
             g=$(cat {gpid})\n\
             while s=$(grep -E State:\\|PPid: /proc/$g/status 2>/dev/null); do echo \"grandchild $s\"; sleep 0.05; done\n\
             echo gone > {reaped}\n\
             exec sleep 600\n"
        ),
    );
    let config = format!(
        "worker {{ name orphaner; exec sh; params {}; kill_timeout 5s; }}\n",
        script.display()
    );
    let Some((unshare, init)) = start_as_pid_1(&daemon, &config) else {
        return;
    };
    harness::wait_until(PATIENCE, "the grandchild to be reaped", || {
        std::path::Path::new(&reaped).exists()
    });
    let (output, _) = terminate(unshare, init);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        harness::describe(&output)
    );
}

/// Runs one worker whose shell sets TRAP for SIGTERM as PID 1, stops
/// it with SIGTERM once it runs: apm's status, and how long the stop took.
fn stopped(test: &str, trap: &str, kill_timeout: &str) -> Option<(Option<i32>, Duration)> {
    let daemon = Daemon::new(test);
    let ready = daemon.path("ready");
    let script = format!("trap {trap} TERM; touch {ready}; while :; do sleep 0.05; done");
    let config = format!(
        "worker {{ name w; exec sh; params -c \"{script}\"; kill_timeout {kill_timeout}; }}\n"
    );
    let (unshare, init) = start_as_pid_1(&daemon, &config)?;
    harness::wait_until(PATIENCE, "the worker to start", || {
        std::path::Path::new(&ready).exists()
    });
    let (output, took) = terminate(unshare, init);
    eprintln!("{}", harness::describe(&output));
    Some((output.status.code(), took))
}

#[test]
fn sigterm_stops_workers_and_apm_exits_with_their_status() {
    if let Some((code, _)) = stopped("container-status", "'exit 3'", "5s") {
        assert_eq!(code, Some(3));
    }
}

#[test]
fn a_worker_deaf_to_sigterm_is_killed_after_kill_timeout() {
    if let Some((code, took)) = stopped("container-deaf", "''", "1s") {
        // 128 + SIGKILL, as a shell reports it.
        assert_eq!(code, Some(137));
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(4),
            "stopped after {took:?}, kill_timeout is 1s"
        );
    }
}

/// The lines of one of apm's streams, read on a thread as they come.
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    fn read(stream: impl std::io::Read + Send + 'static) -> Lines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                shared.lock().unwrap().push(line);
            }
        });
        Lines(lines)
    }

    fn wait_for(&self, line: &str) {
        harness::wait_until(PATIENCE, line, || self.has(line));
    }

    fn has(&self, line: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l == line)
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn workers_output_goes_to_apms_stdout_and_stderr_with_their_names() {
    let daemon = Daemon::new("container-console");
    let b_log = daemon.path("b.log");
    let config = format!(
        "worker {{ name a; exec sh; params -c \"echo hello $PLATFORM_VAR; echo oops >&2; exec sleep 600\"; }}\n\
         worker {{ name b; instances 2; exec sh; params -c \"echo from b; exec sleep 600\"; log {b_log}; }}\n"
    );
    let Some((mut unshare, init)) = start_as_pid_1(&daemon, &config) else {
        return;
    };
    let out = Lines::read(unshare.stdout.take().unwrap());
    let err = Lines::read(unshare.stderr.take().unwrap());
    // A worker gets the environment the platform gave apm.
    for line in [
        "a | hello from-the-platform",
        "b#0 | from b",
        "b#1 | from b",
    ] {
        out.wait_for(line);
    }
    err.wait_for("a ! oops");
    assert!(!out.has("a ! oops") && !err.has("a | hello from-the-platform"));
    // A log file the config names is written too; the default ones are not.
    harness::wait_until(PATIENCE, "b's log file", || {
        let lines = std::fs::read_to_string(&b_log).unwrap_or_default();
        lines.contains(" b#0 | from b\n") && lines.contains(" b#1 | from b\n")
    });
    assert!(!daemon.home.join("logs").join("a.out.log").exists());
    let (output, _) = terminate(unshare, init);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        err.all().iter().any(|l| l.ends_with(" daemon stopped")),
        "the daemon's own lines go to stderr: {:?}",
        err.all()
    );
}

#[test]
fn a_worker_flooding_a_stdout_nobody_reads_holds_neither_the_others_nor_memory() {
    let daemon = Daemon::new("container-flood");
    let long = "x".repeat(1000);
    let config = format!(
        "worker {{ name flood; exec yes; params {long}; }}\n\
         worker {{ name steady; exec sh; params -c \"i=0; while [ $i -lt 50 ]; do echo line $i; echo err $i >&2; i=$((i+1)); sleep 0.01; done; exec sleep 600\"; }}\n"
    );
    let Some((mut unshare, init)) = start_as_pid_1(&daemon, &config) else {
        return;
    };
    let stdout = unshare.stdout.take().unwrap();
    let err = Lines::read(unshare.stderr.take().unwrap());
    // apm's stdout is not read: its pipe and queue fill up, and the flood
    // waits in its writes; stderr, the daemon and its memory go on.
    err.wait_for("steady ! err 49");
    let children = format!("/proc/{init}/task/{init}/children");
    let daemon_pid: u32 = std::fs::read_to_string(&children)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let rss = harness::status_kib(daemon_pid, "VmRSS:");
    assert!(
        rss < 64 * 1024,
        "the daemon holds {rss} KiB with stdout blocked"
    );
    // Read now: every line arrives whole, the steady worker's among the flood's.
    let out = Lines::read(stdout);
    out.wait_for("steady | line 49");
    let flood = format!("flood | {long}");
    let lines = out.all();
    let mixed: Vec<&String> = lines
        .iter()
        .filter(|l| **l != flood && !l.starts_with("steady | line "))
        .collect();
    assert!(
        mixed.is_empty(),
        "lines not whole: {:?}",
        &mixed[..mixed.len().min(3)]
    );
    assert!(lines.iter().filter(|l| **l == flood).count() > 100);
    let (output, _) = terminate(unshare, init);
    assert_eq!(output.status.code(), Some(0));
}
