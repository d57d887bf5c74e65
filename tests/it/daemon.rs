//! The daemon and the CLI together: real daemons on isolated sockets and
//! state directories, real children (see `harness`).

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::certs;
use crate::harness::*;

// ───────────────────────────── tests ─────────────────────────────

#[test]
fn run_list_stop_start_remove_follow_the_process() {
    let d = Daemon::new("lifecycle");
    let run = d.ok(&[
        "run",
        "sleep",
        "1001",
        "-name",
        "sl",
        "-startup_grace",
        "100",
    ]);
    assert!(
        stdout(&run).contains("sl running (pid"),
        "{}",
        describe(&run)
    );
    let worker = d.wait_running("sl");
    assert_eq!(worker["enabled"], true);
    assert_eq!(worker["origin"]["kind"], "cli");
    let [pid] = pids(&worker)[..] else {
        panic!("one pid expected: {worker}")
    };
    assert!(alive(pid));
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/cmdline")).unwrap(),
        b"sleep\x001001\x00"
    );
    assert!(
        d.list()["daemon"]["pid"]
            .as_u64()
            .is_some_and(|p| Some(p as u32) == d.daemon_pid())
    );

    d.ok(&["stop", "sl"]);
    assert!(
        !alive(pid),
        "`apm stop` returned while pid {pid} still runs"
    );
    let worker = d.worker("sl").unwrap();
    assert_eq!(worker["status"], "stopped");
    assert_eq!(worker["enabled"], false);
    assert!(pids(&worker).is_empty());

    let start = d.ok(&["start", "sl"]);
    assert!(stdout(&start).contains("running"), "{}", describe(&start));
    let worker = d.wait_running("sl");
    let [new_pid] = pids(&worker)[..] else {
        panic!("one pid expected: {worker}")
    };
    assert!(alive(new_pid));
    assert_ne!(new_pid, pid);

    d.ok(&["remove", "sl"]);
    assert!(
        !alive(new_pid),
        "`apm remove` returned while pid {new_pid} still runs"
    );
    assert!(d.worker("sl").is_none(), "{}", d.list());
    assert_eq!(
        d.apm(&["stop", "sl"]).status.code(),
        Some(2),
        "a removed worker is unknown"
    );
}

#[test]
fn restart_err_stops_after_max_err_restarts_and_waits_err_delay() {
    let d = Daemon::new("restart-err");
    // Without restart_err an error exit is final.
    let plain = d.path("plain.txt");
    d.apm(&[
        "run",
        "sh",
        "-c",
        &format!("{}; exit 1", stamp(&plain)),
        "-name",
        "plain",
        "-startup_grace",
        "100",
    ]);
    let errs = d.path("errs.txt");
    let script = format!("{}; exit 1", stamp(&errs));
    d.apm(&[
        "run",
        "sh",
        "-c",
        &script,
        "-name",
        "errs",
        "-restart_err",
        "-max_err_restarts",
        "2",
        "-err_delay",
        "400",
        "-startup_grace",
        "100",
    ]);

    let worker = d.wait_status("errs", "errored");
    assert_eq!(restarts(&worker), 2, "{worker}");
    assert_eq!(worker["instances"][0]["last_exit"], "exit 1");
    let times = stamps(&errs);
    assert_eq!(
        times.len(),
        3,
        "the first run and exactly 2 restarts: {times:?}"
    );
    for pair in times.windows(2) {
        let gap_ms = (pair[1] - pair[0]) / 1_000_000;
        assert!(
            gap_ms >= 400,
            "restarted after {gap_ms} ms, err_delay is 400: {times:?}"
        );
    }

    // `plain` was started before `errs`, which has taken two err_delays since.
    let worker = d.worker("plain").unwrap();
    assert_eq!(worker["status"], "crashed", "{worker}");
    assert_eq!(restarts(&worker), 0);
    assert_eq!(worker["instances"][0]["last_exit"], "exit 1");
    assert_eq!(lines(&plain).len(), 1);
    // `errored` is final.
    assert_eq!(lines(&errs).len(), 3);
}

#[test]
fn restart_after_clean_exits_and_restart_on_exit_codes() {
    let d = Daemon::new("restart-clean");
    // restart_on_exit_codes overrides restart_err: exit 4 is not in the list.
    let four = d.path("four.txt");
    d.apm(&[
        "run",
        "sh",
        "-c",
        &format!("{}; exit 4", stamp(&four)),
        "-name",
        "four",
        "-restart_on_exit_codes",
        "3",
        "-restart_err",
        "-startup_grace",
        "100",
    ]);
    let three = d.path("three.txt");
    d.apm(&[
        "run",
        "sh",
        "-c",
        &format!("{}; exit 3", stamp(&three)),
        "-name",
        "three",
        "-restart_on_exit_codes",
        "3",
        "-max_err_restarts",
        "2",
        "-err_delay",
        "100",
        "-startup_grace",
        "100",
    ]);
    let clean = d.path("clean.txt");
    d.apm(&[
        "run",
        "sh",
        "-c",
        &format!("{}; exit 0", stamp(&clean)),
        "-name",
        "clean",
        "-restart",
        "-max_restarts",
        "2",
        "-restart_delay",
        "300",
        "-startup_grace",
        "100",
    ]);

    let worker = d.wait_status("clean", "errored");
    assert_eq!(restarts(&worker), 2, "{worker}");
    assert_eq!(worker["instances"][0]["last_exit"], "exit 0");
    let times = stamps(&clean);
    assert_eq!(times.len(), 3, "{times:?}");
    for pair in times.windows(2) {
        let gap_ms = (pair[1] - pair[0]) / 1_000_000;
        assert!(
            gap_ms >= 300,
            "restarted after {gap_ms} ms, restart_delay is 300: {times:?}"
        );
    }

    let worker = d.wait_status("three", "errored");
    assert_eq!(restarts(&worker), 2, "{worker}");
    assert_eq!(worker["instances"][0]["last_exit"], "exit 3");
    assert_eq!(lines(&three).len(), 3);

    let worker = d.worker("four").unwrap();
    assert_eq!(worker["status"], "crashed", "{worker}");
    assert_eq!(restarts(&worker), 0);
    assert_eq!(worker["instances"][0]["last_exit"], "exit 4");
    assert_eq!(lines(&four).len(), 1);
}

#[test]
fn err_grace_gives_long_runs_a_fresh_budget_but_not_fast_failures() {
    let d = Daemon::new("err-grace");
    // A fast failure takes far less than err_grace, a slow one far more.
    let common = [
        "-restart_err",
        "-max_err_restarts",
        "2",
        "-err_grace",
        "700",
        "-err_delay",
        "50",
        "-startup_grace",
        "100",
    ];
    let slow = d.path("slow.txt");
    d.run_sh(
        "slow",
        &format!("{}; sleep 1; exit 1", stamp(&slow)),
        &common,
    );
    let fast = d.path("fast.txt");
    let fast_script = format!("{}; exit 1", stamp(&fast));
    let mut args = vec!["run", "sh", "-c", fast_script.as_str(), "-name", "fast"];
    args.extend(common);
    d.apm(&args);

    let worker = d.wait_status("fast", "errored");
    assert_eq!(restarts(&worker), 2, "{worker}");
    assert_eq!(lines(&fast).len(), 3);

    // The slow one goes on past its max_err_restarts of 2.
    wait_until(PATIENCE, "`slow` to start a 5th time", || {
        lines(&slow).len() >= 5
    });
    let worker = d.worker("slow").unwrap();
    assert_ne!(worker["status"], "errored", "{worker}");
    assert_eq!(worker["instances"][0]["last_exit"], "exit 1");
}

#[test]
fn stop_sends_sigkill_after_kill_timeout_to_the_whole_group() {
    let d = Daemon::new("kill-timeout");
    d.run_sh(
        "stubborn",
        "trap '' TERM; while :; do sleep 0.1; done",
        &["-kill_timeout", "1500", "-startup_grace", "100"],
    );
    let worker = d.wait_running("stubborn");
    let [pid] = pids(&worker)[..] else {
        panic!("{worker}")
    };
    // The shell and, most of the time, one of its sleeps: the group has both.
    wait_until(PATIENCE, "the shell to start a sleep", || {
        group_members(pid).len() >= 2
    });

    let started = Instant::now();
    d.ok(&["stop", "stubborn"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "stop took {took:?}, kill_timeout is 1500 ms"
    );
    assert!(
        took < Duration::from_millis(1500) + PATIENCE,
        "stop took {took:?}"
    );
    assert!(!alive(pid));
    // SIGKILL is delivered asynchronously; the group must be empty very soon.
    wait_until(PATIENCE, "every process of the group to end", || {
        group_members(pid).is_empty()
    });
    let worker = d.worker("stubborn").unwrap();
    assert_eq!(worker["status"], "stopped");
    assert_eq!(worker["instances"][0]["last_exit"], "killed by SIGKILL");
}

#[test]
fn rename_keeps_the_process_and_its_output_follows_the_new_name_and_copy_starts_a_twin() {
    let d = Daemon::new("rename");
    d.run_sh(
        "old",
        "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done",
        &["-startup_grace", "100"],
    );
    let before = pids(&d.wait_running("old"));
    wait_until(PATIENCE, "output under the old name", || {
        d.log("old", false).contains("old | line 2")
    });

    d.ok(&["rename", "old", "new"]);
    assert!(d.worker("old").is_none(), "{}", d.list());
    assert_eq!(
        pids(&d.wait_running("new")),
        before,
        "a rename restarts nothing"
    );
    // The running process's next lines go to the new name's log at once.
    wait_until(PATIENCE, "output under the new name", || {
        d.log("new", false).contains("new | line")
    });

    d.ok(&["copy", "new", "twin"]);
    let twin = pids(&d.wait_running("twin"));
    assert_ne!(twin, before, "the copy is a process of its own");
    wait_until(PATIENCE, "the copy's own output", || {
        d.log("twin", false).contains("twin | line 1")
    });
    assert_eq!(
        pids(&d.wait_running("new")),
        before,
        "copying leaves the original alone"
    );

    // A new name that cannot be one is refused in a line about that name.
    let long = "w".repeat(201);
    for (command, bad, says) in [
        (
            "rename",
            "../x",
            "`../x` is not a valid worker name: use letters",
        ),
        (
            "copy",
            "twin#2",
            "`twin#2` is not a valid worker name: `#` is reserved",
        ),
        (
            "rename",
            long.as_str(),
            "201 characters long: use at most 200",
        ),
    ] {
        let refused = d.apm(&[command, "new", bad]);
        assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
        let err = stderr(&refused);
        assert!(err.contains(says) && err.lines().count() == 1, "{err}");
    }
    assert_eq!(pids(&d.wait_running("new")), before);
}

#[test]
fn wait_grep_restart_all_stopall_unload_and_boot_do_what_the_cli_says() {
    let d = Daemon::new("cli-table");
    for name in ["alpha", "beta"] {
        d.write(
            &format!("{name}.sh"),
            &format!("echo {name}-ready\nexec sleep 1000\n"),
        );
    }
    let config = d.load(
        "worker { name alpha; exec sh; params alpha.sh; startup_grace 100; }\n\
         worker { name beta; exec sh; params beta.sh; startup_grace 100; }\n",
    );
    d.ok(&["wait", "alpha", "--timeout", "20s"]);
    d.wait_running("beta");

    // A worker that never runs: `wait` gives up with exit 1.
    d.apm(&["run", "false", "-name", "never", "-startup_grace", "100"]);
    let waited = d.apm(&["wait", "never", "--timeout", "1s"]);
    assert_eq!(waited.status.code(), Some(1), "{}", describe(&waited));

    wait_until(PATIENCE, "both workers' first lines", || {
        stdout(&d.apm(&["grep", "ready"])).lines().count() == 2
    });
    let found = stdout(&d.ok(&["grep", "ready", "beta"]));
    let [line] = found.lines().collect::<Vec<_>>()[..] else {
        panic!("{found}")
    };
    assert!(
        line.starts_with("beta: ") && line.ends_with(" beta | beta-ready"),
        "{found}"
    );
    assert_eq!(d.apm(&["grep", "no line has this"]).status.code(), Some(1));
    assert_eq!(d.apm(&["grep", "ready", "nobody"]).status.code(), Some(2));

    // `restart` needs a worker's name, or --force to restart them all.
    assert_eq!(d.apm(&["restart"]).status.code(), Some(2));
    let before = [
        pids(&d.wait_running("alpha")),
        pids(&d.wait_running("beta")),
    ];
    d.apm(&["restart", "--force"]); // `never` fails again: exit 1
    for (name, old) in ["alpha", "beta"].into_iter().zip(before) {
        assert_ne!(pids(&d.wait_running(name)), old, "{name} restarted");
    }

    d.ok(&["stopall"]);
    for name in ["alpha", "beta", "never"] {
        let worker = d.worker(name).unwrap();
        assert!(
            ["stopped", "crashed"].contains(&worker["status"].as_str().unwrap()),
            "{worker}"
        );
    }
    assert!(d.socket_up(), "stopall leaves the daemon running");

    d.ok(&["unload", config.to_str().unwrap()]);
    assert_eq!(
        d.worker_names(),
        ["never"],
        "unload removes the file's workers"
    );

    // `boot` loads the system config, here named by APM_CONFIG.
    d.write("gamma.sh", "echo gamma-ready\nexec sleep 1000\n");
    let system = d.write(
        "system.conf",
        "worker { name gamma; exec sh; params gamma.sh; startup_grace 100; }\n",
    );
    let mut boot = d.command(&["boot"]);
    boot.env("APM_CONFIG", &system);
    let booted = run(boot);
    assert!(booted.status.success(), "{}", describe(&booted));
    d.wait_running("gamma");
}

#[test]
fn logs_rotate_at_log_max_size_keeping_log_max_files() {
    let d = Daemon::new("rotation");
    d.write(
        "chatty.sh",
        "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); echo \"line $i of a log that grows\"; done; echo finished; exec sleep 1010\n",
    );
    d.load(
        "worker { name chatty; exec sh; params chatty.sh; startup_grace 100; log_max_size 10K; log_max_files 2; }\n",
    );
    let log = d.home.join("logs").join("chatty.out.log");
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", log.display()));
    wait_until(PATIENCE, "the last line", || {
        d.log("chatty", false).contains("| finished")
    });
    for path in [log.clone(), numbered(1), numbered(2)] {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 0 && size <= 10 * 1024,
            "{}: {size} bytes",
            path.display()
        );
    }
    assert!(
        !numbered(3).exists(),
        "only log_max_files rotated files are kept"
    );
    // The kept files hold the end of the output, in order, none of it
    // lost or repeated across a rotation.
    let numbers: Vec<u32> = [numbered(2), numbered(1), log]
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            text.lines()
                .filter_map(|l| l.split("| line ").nth(1)?.split(' ').next()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    assert_eq!(numbers.last(), Some(&3000));
    assert!(
        numbers.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{numbers:?}"
    );
}

#[test]
fn strip_ansi_keeps_colour_codes_out_of_the_log() {
    let d = Daemon::new("strip-ansi");
    let script = r"printf '\033[1;31mred\033[0m alert\n'; exec sleep 1011";
    for (name, strip) in [("plain", "-strip_ansi=false"), ("stripped", "-strip_ansi")] {
        d.run_sh(name, script, &[strip, "-startup_grace", "100"]);
    }
    wait_until(PATIENCE, "both lines", || {
        d.log("plain", false).contains("alert") && d.log("stripped", false).contains("alert")
    });
    assert!(
        d.log("plain", false)
            .contains("plain | \u{1b}[1;31mred\u{1b}[0m alert"),
        "{:?}",
        d.log("plain", false)
    );
    assert!(
        d.log("stripped", false).contains("stripped | red alert"),
        "{:?}",
        d.log("stripped", false)
    );
}

#[test]
fn log_shows_the_last_lines_of_either_stream_and_follows_new_ones() {
    let d = Daemon::new("log-follow");
    d.run_sh(
        "ticker",
        "echo oops >&2; i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done",
        &["-startup_grace", "100"],
    );
    wait_until(PATIENCE, "five ticks", || {
        d.log("ticker", false).contains("| tick 5")
    });
    let last = stdout(&d.ok(&["log", "ticker", "--lines", "1"]));
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.contains("ticker | tick "), "{last}");
    let errors = d.log("ticker", true);
    assert!(
        errors.contains("ticker ! oops") && !errors.contains("tick 1"),
        "{errors}"
    );

    // `-f` prints the last lines, then each new one as it is written.
    let follow = d.follow_log(&["log", "ticker", "-f", "--lines", "2"]);
    let tick = |line: &str| -> u64 { line.rsplit(' ').next().unwrap().parse().unwrap() };
    let mut seen = Vec::new();
    while seen.len() < 6 {
        seen.push(tick(&follow.next_line()));
    }
    drop(follow);
    assert!(
        seen.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "lines in order, none missed or repeated: {seen:?}"
    );
}

#[test]
fn log_follow_goes_on_through_rotations_without_losing_a_line() {
    let d = Daemon::new("follow-rotation");
    // At most 400 40-byte lines a second into 10 KB files: a rotation every
    // 0.6 s or more, several while the follower reads 1,500 lines, each far
    // apart from the next (two rotations between two reads would skip a
    // whole file, as with `tail -F`).
    d.run_sh(
        "gush",
        "i=0; while :; do i=$((i+1)); echo \"line $i of a log that grows\"; \
         [ $((i % 20)) -eq 0 ] && sleep 0.05; done",
        &[
            "-startup_grace",
            "100",
            "-log_max_size",
            "10K",
            "-log_max_files",
            "2",
        ],
    );
    let follow = d.follow_log(&["log", "gush", "-f", "--lines", "1"]);
    let number = |line: &str| -> u64 {
        let n = line
            .split("| line ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next());
        n.and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line:?}"))
    };
    let mut seen = Vec::new();
    while seen.len() < 1500 {
        seen.push(number(&follow.next_line()));
    }
    drop(follow);
    let gaps: Vec<_> = seen
        .windows(2)
        .filter(|pair| pair[1] != pair[0] + 1)
        .collect();
    assert!(gaps.is_empty(), "lines missed or repeated at {gaps:?}");
    let rotated = d.home.join("logs").join("gush.out.log.2");
    assert!(rotated.exists(), "the log rotated while followed");
}

#[test]
fn run_and_load_say_which_keys_are_accepted_but_not_enforced() {
    let d = Daemon::new("unbuilt");
    // IPC is built: nothing to note.
    let ran = d.run_sh(
        "sampled",
        "exec sleep 600",
        &[
            "-ipc_timeout",
            "1000",
            "-listen",
            "jobs",
            "-startup_grace",
            "100",
        ],
    );
    assert!(!stderr(&ran).contains("note:"), "{}", describe(&ran));
    let plain = d.run_sh("plain", "exec sleep 600", &["-startup_grace", "100"]);
    assert!(!stderr(&plain).contains("note:"), "{}", describe(&plain));
    let path = d.write(
        "migrating.conf",
        "worker { name migrating; exec sleep; params 600; session_persist on; startup_grace 100; }\n",
    );
    // Session migration is built: nothing to note.
    let loaded = d.ok(&["load", path.to_str().unwrap()]);
    assert!(
        !stderr(&loaded).contains("does not enforce"),
        "{}",
        describe(&loaded)
    );
}

#[test]
fn load_says_when_a_name_is_taken_by_a_worker_from_elsewhere() {
    let d = Daemon::new("name_taken");
    d.run_sh("web", "exec sleep 600", &["-startup_grace", "100"]);
    let pid = d.worker("web").unwrap()["instances"][0]["pid"].clone();
    let path = d.write(
        "web.conf",
        "worker { name web; exec sleep; params 700; startup_grace 100; }\nworker { name other; exec sleep; params 700; startup_grace 100; }\n",
    );
    let loaded = d.ok(&["load", path.to_str().unwrap()]);
    assert!(
        stderr(&loaded).contains("note: this file's web is not loaded: the web already registered was started with `apm run` (`apm remove web` first, or rename one of them)"),
        "{}",
        describe(&loaded)
    );
    assert!(!stderr(&loaded).contains("other"), "{}", describe(&loaded));
    assert_eq!(d.worker("web").unwrap()["instances"][0]["pid"], pid);
    // Loading it again is no news for the workers that are its own.
    let again = d.ok(&["load", path.to_str().unwrap()]);
    assert!(!stderr(&again).contains("other"), "{}", describe(&again));
}

#[test]
fn signal_reaches_only_the_named_instance() {
    let d = Daemon::new("signals");
    let script = "trap 'echo got-usr1 $APM_INDEX' USR1; trap 'echo got-usr2 $APM_INDEX' USR2; echo ready $APM_INDEX; \
                  while :; do sleep 0.1; done";
    d.run_sh(
        "sig",
        script,
        &[
            "-instances",
            "2",
            "-env_index",
            "APM_INDEX",
            "-startup_grace",
            "100",
        ],
    );
    d.wait_running("sig");
    wait_until(PATIENCE, "both instances to trap their signals", || {
        let log = d.log("sig", false);
        log.contains("sig#0 | ready 0") && log.contains("sig#1 | ready 1")
    });

    let sent = d.ok(&["SIGUSR1", "sig#1"]);
    let pid1 = pids(&d.worker("sig").unwrap())[1];
    assert_eq!(stdout(&sent).trim(), format!("sent SIGUSR1 to pid {pid1}"));
    wait_until(PATIENCE, "instance 1 to log its USR1", || {
        d.log("sig", false).contains("sig#1 | got-usr1 1")
    });
    // A later signal to #0 as a fence: once it shows, an earlier USR1 to #0 would show too.
    d.ok(&["SIGUSR2", "sig#0"]);
    wait_until(PATIENCE, "instance 0 to log its USR2", || {
        d.log("sig", false).contains("sig#0 | got-usr2 0")
    });
    let log = d.log("sig", false);
    assert!(
        !log.contains("got-usr1 0"),
        "instance 0 got SIGUSR1:\n{log}"
    );
    assert!(
        !log.contains("got-usr2 1"),
        "instance 1 got SIGUSR2:\n{log}"
    );
    assert_eq!(log.matches("got-usr1").count(), 1, "{log}");

    let unknown = d.apm(&["SIGHUP", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", describe(&unknown));
    assert!(
        stderr(&unknown).contains("nosuch"),
        "{}",
        describe(&unknown)
    );
}

#[test]
fn env_env_index_and_apm_reach_the_child() {
    let d = Daemon::new("env");
    let script = r#"echo "vars FOO=$FOO BAR=$BAR APM=$APM IDX=$APM_INDEX"; sleep 1002"#;
    d.run_sh(
        "envy",
        script,
        &[
            "-instances",
            "2",
            "-env",
            "FOO=foo,BAR=b a r",
            "-env_index",
            "APM_INDEX",
            "-startup_grace",
            "100",
        ],
    );
    wait_until(
        PATIENCE,
        "both instances to print their environment",
        || {
            let log = d.log("envy", false);
            log.contains("envy#0 | vars FOO=foo BAR=b a r APM=1 IDX=0")
                && log.contains("envy#1 | vars FOO=foo BAR=b a r APM=1 IDX=1")
        },
    );
    // `apm env` shows the running process's environment as it really is.
    let env = stdout(&d.ok(&["env", "envy"]));
    for var in ["FOO=foo", "BAR=b a r", "APM=1", "APM_INDEX=0"] {
        assert!(env.lines().any(|l| l == var), "{var} in {env}");
    }
    let json: Value = serde_json::from_str(&stdout(&d.ok(&["env", "envy", "--json"]))).unwrap();
    assert_eq!(json["BAR"], "b a r", "{json}");
}

#[test]
fn startup_failure_prints_the_childs_stderr_and_exits_1() {
    let d = Daemon::new("startup-failure");
    let output = d.apm(&[
        "run",
        "sh",
        "-c",
        "echo boom >&2; exit 4",
        "-name",
        "bad",
        "-startup_grace",
        "1000",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let text = stdout(&output);
    assert!(text.contains("boom"), "{}", describe(&output));
    assert!(text.contains("exit 4"), "{}", describe(&output));
    assert!(
        text.contains("bad failed during startup"),
        "{}",
        describe(&output)
    );
    let worker = d.worker("bad").unwrap();
    assert_eq!(worker["status"], "crashed");
}

#[test]
fn a_quick_clean_exit_is_not_a_startup_failure() {
    let d = Daemon::new("clean-exit");
    let output = d.apm(&["run", "true", "-startup_grace", "300"]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(!stdout(&output).contains("failed"), "{}", describe(&output));
}

#[test]
fn stdout_and_stderr_logs_are_separate_named_and_survive_a_daemon_crash() {
    let d = Daemon::new("logs");
    d.run_sh(
        "lw",
        "echo out-line; echo err-line >&2; sleep 1003",
        &["-startup_grace", "100"],
    );
    wait_until(PATIENCE, "both lines in the logs", || {
        d.log("lw", false).contains("out-line") && d.log("lw", true).contains("err-line")
    });
    let check = |when: &str| {
        let out = d.log("lw", false);
        let err = d.log("lw", true);
        assert!(
            out.lines().any(|l| l.ends_with(" lw | out-line")),
            "{when}: stdout log:\n{out}"
        );
        assert!(
            err.lines().any(|l| l.ends_with(" lw ! err-line")),
            "{when}: stderr log:\n{err}"
        );
        assert!(
            !out.contains("err-line"),
            "{when}: stderr in the stdout log:\n{out}"
        );
        assert!(
            !err.contains("out-line"),
            "{when}: stdout in the stderr log:\n{err}"
        );
    };
    check("before the crash");
    d.wait_saved(&[("lw", true, &[])]);

    let pid = d.kill_daemon();
    // `apm log` starts a new daemon, which still finds the logs.
    check("after the crash");
    assert_ne!(d.daemon_pid(), Some(pid));
}

#[test]
fn update_instances_scales_up_keeping_instance_0_and_down_stopping_extras() {
    let d = Daemon::new("scale");
    d.ok(&[
        "run",
        "sleep",
        "1004",
        "-name",
        "sc",
        "-startup_grace",
        "100",
    ]);
    let [first] = pids(&d.wait_running("sc"))[..] else {
        panic!()
    };

    d.ok(&["update", "sc", "-instances", "3"]);
    let worker = wait_for("3 running instances", || {
        d.worker("sc")
            .filter(|w| w["instances"].as_array().unwrap().len() == 3 && w["status"] == "running")
    });
    let all = pids(&worker);
    assert_eq!(all.len(), 3);
    assert_eq!(all[0], first, "instance 0 was restarted: {worker}");
    assert!(all.iter().all(|&p| alive(p)));

    d.ok(&["update", "sc", "-instances", "1"]);
    let worker = wait_for("1 instance", || {
        d.worker("sc")
            .filter(|w| w["instances"].as_array().unwrap().len() == 1)
    });
    assert_eq!(pids(&worker), vec![first]);
    assert_eq!(worker["status"], "running");
    for &pid in &all[1..] {
        wait_until(PATIENCE, "extra instances to end", || !alive(pid));
    }
    assert!(alive(first));
}

/// Parses the RFC 3339 UTC timestamp that starts a log line into ms since the epoch.
fn log_time_ms(line: &str) -> i64 {
    let stamp = line.split(' ').next().unwrap();
    let number = |range: std::ops::Range<usize>| stamp[range].parse::<i64>().unwrap();
    let (y, m, d) = (number(0..4), number(5..7), number(8..10));
    let (h, min, s, ms) = (
        number(11..13),
        number(14..16),
        number(17..19),
        number(20..23),
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + h) * 60 + min) * 60_000 + s * 1000 + ms
}

#[test]
fn depends_on_starts_the_dependent_once_its_dependency_runs() {
    assert_eq!(log_time_ms("1970-01-01T00:00:01.002Z x | y"), 1002);
    assert_eq!(log_time_ms("2024-03-01T00:00:00.000Z"), 1_709_251_200_000);
    let d = Daemon::new("depends");
    let conf = d.write(
        "deps.conf",
        "worker { name a; exec sh; params -c, \"echo a-up; sleep 1005\"; startup_grace 300; }\n\
         worker { name b; exec sh; params -c, \"echo b-up; sleep 1005\"; depends_on a; startup_grace 100; }\n",
    );
    let load = d.ok(&["load", conf.to_str().unwrap()]);
    assert!(
        !stdout(&load).contains("depends_timeout"),
        "{}",
        describe(&load)
    );
    d.wait_running("a");
    let b = d.wait_running("b");
    let a = d.worker("a").unwrap();
    assert_eq!(a["origin"]["kind"], "file");
    // Both uptimes come from the same clock in one answer: b started at
    // least a's startup_grace after a did, that is once a ran.
    let uptime = |w: &Value| w["instances"][0]["uptime_ms"].as_u64().unwrap();
    assert!(
        uptime(&a) >= uptime(&b) + 299,
        "a up {} ms, b up {} ms",
        uptime(&a),
        uptime(&b)
    );
    let first_line = |name: &str, text: &str| {
        wait_for(&format!("{name}'s first line"), || {
            d.log(name, false)
                .lines()
                .next()
                .filter(|l| l.contains(text))
                .map(str::to_owned)
        })
    };
    let (a_line, b_line) = (first_line("a", "a | a-up"), first_line("b", "b | b-up"));
    assert!(
        log_time_ms(&b_line) > log_time_ms(&a_line),
        "b logged before a:\n{a_line}\n{b_line}"
    );
}

#[test]
fn depends_on_holds_whatever_the_order_of_the_file() {
    let d = Daemon::new("depends-order");
    let conf = d.write(
        "deps.conf",
        "worker { name b; exec sh; params -c, \"echo b-up; sleep 1006\"; depends_on a; depends_timeout 5000; startup_grace 100; }\n\
         worker { name a; exec sh; params -c, \"echo a-up; sleep 1006\"; startup_grace 300; }\n",
    );
    let started = Instant::now();
    let load = d.ok(&["load", conf.to_str().unwrap()]);
    assert!(
        !stdout(&load).contains("depends_timeout"),
        "{}",
        describe(&load)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "load took {:?}",
        started.elapsed()
    );
    let b = d.wait_running("b");
    let a = d.wait_running("a");
    let uptime = |w: &Value| w["instances"][0]["uptime_ms"].as_u64().unwrap();
    assert!(
        uptime(&a) >= uptime(&b) + 299,
        "a up {} ms, b up {} ms",
        uptime(&a),
        uptime(&b)
    );
}

#[test]
fn depends_on_a_missing_worker_starts_after_depends_timeout() {
    let d = Daemon::new("depends-missing");
    let conf = d.write(
        "missing.conf",
        "worker { name c; exec sh; params -c, \"echo c-up; sleep 1007\"; depends_on ghost; depends_timeout 500; startup_grace 100; }\n",
    );
    let started = Instant::now();
    let load = d.ok(&["load", conf.to_str().unwrap()]);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "load took {:?}",
        started.elapsed()
    );
    assert!(stdout(&load).contains("depends_on"), "{}", describe(&load));
    assert!(stdout(&load).contains("c running"), "{}", describe(&load));
    d.wait_running("c");
}

#[test]
fn a_killed_daemon_is_replaced_without_orphans_or_duplicates() {
    let d = Daemon::new("crash");
    // Command lines no other test (or other run of this test) uses.
    let arg = (100_000_000 + std::process::id()).to_string();
    let stopped_arg = (200_000_000 + std::process::id()).to_string();
    d.ok(&[
        "run",
        "sleep",
        &arg,
        "-name",
        "two",
        "-instances",
        "2",
        "-startup_grace",
        "100",
    ]);
    d.ok(&[
        "run",
        "sleep",
        &arg,
        "-name",
        "one",
        "-startup_grace",
        "100",
    ]);
    d.ok(&[
        "run",
        "sleep",
        &stopped_arg,
        "-name",
        "off",
        "-startup_grace",
        "100",
    ]);
    d.ok(&["stop", "off"]);
    d.wait_running("two");
    d.wait_running("one");
    let old: Vec<(u32, u64)> = ["one", "two"]
        .iter()
        .flat_map(|w| pids(&d.worker(w).unwrap()))
        .map(|pid| (pid, start_ticks(pid).unwrap()))
        .collect();
    assert_eq!(old.len(), 3);
    assert_eq!(processes_running(&["sleep", &arg]).len(), 3);

    // The stop and the processes must be in the state file before the crash.
    let [one_pid] = pids(&d.worker("one").unwrap())[..] else {
        panic!()
    };
    d.wait_saved(&[
        ("off", false, &[]),
        ("one", true, &[one_pid]),
        ("two", true, &pids(&d.worker("two").unwrap())),
    ]);
    let daemon = d.kill_daemon();

    // `apm ls` starts a new daemon, which brings everything back.
    assert_eq!(d.worker_names(), ["off", "one", "two"]);
    assert_ne!(d.daemon_pid(), Some(daemon));
    let one = d.wait_running("one");
    let two = d.wait_running("two");
    for &(pid, ticks) in &old {
        wait_until(PATIENCE, &format!("old process {pid} to end"), || {
            !same_process_alive(pid, ticks)
        });
    }
    let mut listed: Vec<u32> = pids(&one).into_iter().chain(pids(&two)).collect();
    listed.sort();
    assert_eq!(listed.len(), 3);
    let mut live = processes_running(&["sleep", &arg]);
    live.sort();
    assert_eq!(
        live, listed,
        "the processes running the command are exactly the listed ones"
    );

    let off = d.worker("off").unwrap();
    assert_eq!(off["status"], "stopped", "{off}");
    assert_eq!(off["enabled"], false);
    assert_eq!(
        processes_running(&["sleep", &stopped_arg]),
        Vec::<u32>::new()
    );
}

#[test]
fn what_a_command_changed_survives_a_daemon_killed_as_soon_as_it_answers() {
    let d = Daemon::new("crash-answered");
    // Each command is followed at once by the kill, with no wait for the
    // state file: the answer itself must mean the change is on disk.
    d.run_sh("kept", "exec sleep 600", &["-startup_grace", "100"]);
    d.run_sh("gone", "exec sleep 600", &["-startup_grace", "100"]);
    d.kill_daemon();
    assert_eq!(d.worker_names(), ["gone", "kept"]);
    d.ok(&["stop", "kept"]);
    d.ok(&["remove", "gone"]);
    d.kill_daemon();
    assert_eq!(d.worker_names(), ["kept"]);
    assert_eq!(d.worker("kept").unwrap()["enabled"], false);
    d.ok(&["rename", "kept", "renamed"]);
    d.kill_daemon();
    assert_eq!(d.worker_names(), ["renamed"]);

    // A state file that cannot be written (a full disk): the command is
    // done, and says that it is not saved. The restarted daemon may still be
    // saving what it restored (its `state.tmp` briefly exists); a command
    // that changes workers is answered once that is on disk.
    d.ok(&["stop", "renamed"]);
    std::os::unix::fs::symlink("/dev/full", d.home.join("state.tmp")).unwrap();
    let started = d.ok(&["start", "renamed"]);
    assert!(
        stderr(&started).contains("warning: done, but not saved"),
        "{}",
        describe(&started)
    );
    d.wait_running("renamed");
}

#[test]
fn a_killed_daemons_orphans_are_ended_even_when_their_group_leader_is_gone() {
    let d = Daemon::new("crash-orphans");
    let arg = (300_000_000 + std::process::id()).to_string();
    // The shell dies of SIGPIPE once the daemon that reads its stdout is
    // gone; its background sleep stays behind in the group.
    let script = format!("sleep {arg} & while :; do echo tick; sleep 0.1; done");
    d.run_sh("gc", &script, &["-startup_grace", "100"]);
    let [leader] = pids(&d.wait_running("gc"))[..] else {
        panic!()
    };
    let orphans = wait_for("the background sleep", || {
        Some(processes_running(&["sleep", &arg])).filter(|p| p.len() == 1)
    });
    d.wait_saved(&[("gc", true, &[leader])]);

    d.kill_daemon();
    // Once init has reaped the leader, only its group id recalls it.
    wait_until(PATIENCE, "the group leader to be reaped", || {
        stat_fields(leader).is_none()
    });
    assert!(
        alive(orphans[0]),
        "the background sleep should outlive its shell"
    );

    d.wait_running("gc");
    wait_until(PATIENCE, "the orphan to be ended", || !alive(orphans[0]));
    assert_eq!(
        processes_running(&["sleep", &arg]).len(),
        1,
        "exactly the new instance's sleep"
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let d = Daemon::new("second");
    d.ok(&["ls"]);
    let pid = d.daemon_pid().unwrap();
    let output = d.apm(&["daemon", "--foreground"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        stderr(&output).contains(&format!("pid {pid}")),
        "{}",
        describe(&output)
    );
    assert_eq!(d.daemon_pid(), Some(pid), "the pid file was replaced");
    assert!(alive(pid));
}

#[test]
fn a_foreground_daemon_stops_its_workers_and_exits_0_on_sigterm() {
    let d = Daemon::new("foreground");
    let mut daemon = d
        .command(&["daemon", "--foreground"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon_pid = daemon.id();
    // Starting nothing ourselves: a CLI call now could start a second daemon.
    wait_until(PATIENCE, "the foreground daemon to listen", || {
        d.socket_up() && d.daemon_pid() == Some(daemon_pid)
    });
    d.ok(&[
        "run",
        "sleep",
        "1008",
        "-name",
        "fg",
        "-instances",
        "2",
        "-startup_grace",
        "100",
    ]);
    let worker = d.wait_running("fg");
    let children = pids(&worker);
    assert_eq!(children.len(), 2);
    assert_eq!(d.list()["daemon"]["pid"], daemon_pid);

    kill(Pid::from_raw(daemon_pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_for("the daemon to exit", || daemon.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{status:?}");
    for pid in children {
        assert!(!alive(pid), "worker process {pid} outlived the daemon");
    }
    assert!(!d.socket_up());
    assert!(!d.home.join("apm.pid").exists());
}

#[test]
fn a_full_disk_drops_log_lines_but_loses_no_worker_and_blocks_no_child() {
    let d = Daemon::new("full-disk");
    // The daemon's own log and the worker's log both on a device that is
    // always full: every write fails with ENOSPC.
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut daemon = d
        .command(&["daemon", "--foreground"])
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let daemon_pid = daemon.id();
    wait_until(PATIENCE, "the foreground daemon to listen", || {
        d.socket_up() && d.daemon_pid() == Some(daemon_pid)
    });
    let done = d.path("done");
    // More output than a pipe holds: a daemon that stopped reading it
    // would leave the child blocked before it gets to `touch`.
    d.run_sh(
        "chatty",
        &format!(
            "head -c 2000000 /dev/zero | tr '\\0' x | fold -w 100; touch {done}; exec sleep 1009"
        ),
        &["-log", "/dev/full", "-startup_grace", "100"],
    );
    wait_until(PATIENCE, "the child to get through its output", || {
        Path::new(&done).exists()
    });
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon is still up"
    );
    assert_eq!(d.wait_running("chatty")["name"], "chatty");
    d.ok(&["exit", "daemon"]);
    let status = wait_for("the daemon to exit", || daemon.try_wait().unwrap());
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn an_unreadable_state_file_is_set_aside_and_ls_says_its_workers_were_not_restored() {
    let d = Daemon::new("state-unreadable");
    d.run_sh("kept", "exec sleep 1009", &["-startup_grace", "100"]);
    d.wait_running("kept");
    let pid = d.daemon_pid().unwrap();
    d.ok(&["exit", "daemon"]);
    // Once `exit daemon` is answered the daemon is gone: the next command
    // cannot reach it, nor its last state write land on the file below.
    assert!(!alive(pid), "daemon pid {pid} outlived `apm exit daemon`");
    let state = d.home.join("state.json");
    std::fs::write(
        &state,
        "{\"format\": 1, \"workers\": [ {\"name\": \"kept\", trunc",
    )
    .unwrap();
    let listed = d.ok(&["ls"]);
    let warning = stderr(&listed);
    assert!(
        warning.starts_with("warning: the state file")
            && warning.contains("set aside as")
            && warning.contains("were not restored"),
        "{warning}"
    );
    let notice = d.list()["daemon"]["notice"].as_str().unwrap().to_owned();
    let aside = notice
        .split("set aside as ")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert!(
        std::fs::read_to_string(aside).unwrap().ends_with("trunc"),
        "the unreadable file is kept for whoever can mend it"
    );
}

#[test]
fn a_worker_whose_file_broke_while_the_daemon_was_down_runs_as_it_last_ran() {
    let d = Daemon::new("state-file-broke");
    let good =
        "worker {\n    name filed;\n    exec sleep;\n    params 1009;\n    startup_grace 100;\n}\n";
    let config = d.load(good);
    d.wait_running("filed");
    // Down by a crash: `apm exit daemon` would keep it stopped.
    d.kill_daemon();
    // A typo made while the daemon was down loses nothing...
    std::fs::write(&config, good.replace("1009;", "1009")).unwrap();
    let warning = stderr(&d.ok(&["ls"]));
    assert!(
        warning.contains(
            "1 worker(s) run as they last ran, since their file no longer compiles: filed"
        ),
        "{warning}"
    );
    d.wait_running("filed");
    // ...and once the file is fixed, a reload applies it as usual.
    std::fs::write(&config, good.replace("1009", "1031")).unwrap();
    d.ok(&["reload", config.to_str().unwrap()]);
    wait_until(PATIENCE, "the fixed file's params to be applied", || {
        d.worker("filed").is_some_and(|w| {
            pids(&w).iter().any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.ends_with(b"1031\0"))
            })
        })
    });

    // A state file of a version that kept no such block (or a block that
    // no longer compiles) leaves the worker out, and `apm ls` names it.
    d.kill_daemon();
    std::fs::write(&config, good.replace("1009;", "1009")).unwrap();
    let state = d.home.join("state.json");
    let mut saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    saved["workers"][0]
        .as_object_mut()
        .unwrap()
        .remove("config");
    std::fs::write(&state, saved.to_string()).unwrap();
    let warning = stderr(&d.ok(&["ls"]));
    assert!(
        warning.contains("1 worker(s) of the state file could not be restored: filed"),
        "{warning}"
    );
    assert!(d.worker("filed").is_none(), "{}", d.list());
}

#[test]
fn a_log_that_cannot_be_opened_is_reported_once_with_its_reason() {
    let d = Daemon::new("log-unopenable");
    // A file name longer than Linux allows (255 bytes).
    let log = d.path(&format!("{}.log", "l".repeat(300)));
    d.run_sh(
        "unlogged",
        "while :; do echo line; sleep 0.05; done",
        &["-log", &log, "-startup_grace", "100"],
    );
    d.wait_daemon_log("File name too long");
    let text = d.daemon_log();
    assert_eq!(
        text.matches("cannot write log").count(),
        1,
        "once, not per line: {text}"
    );
    assert_eq!(d.wait_running("unlogged")["name"], "unlogged");
}

#[test]
fn a_client_of_another_uid_is_refused_with_exit_3() {
    let d = Daemon::new("peercred");
    d.ok(&[
        "run",
        "sleep",
        "1009",
        "-name",
        "mine",
        "-startup_grace",
        "100",
    ]);
    let pid = d.daemon_pid().unwrap();
    let mut command = d.command(&["ls"]);
    // Nobody needs nothing from the state directory to reach an abstract socket.
    command.current_dir("/").uid(65534).gid(65534);
    let output = run(command);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let text = stderr(&output);
    assert!(text.contains("permission denied"), "{text}");
    assert!(
        text.contains("root and its owner (uid 0)") && text.contains("allow_group"),
        "the rule is named: {text}"
    );
    assert!(text.contains("uid 65534"), "{text}");
    assert!(stdout(&output).is_empty(), "{}", describe(&output));
    // Refused before it sends anything: such a client cannot hold the
    // daemon waiting for its request.
    let silent = Command::new("python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(10)\ns.connect('\\0' + sys.argv[1])\nprint(s.recv(65536).decode())",
            &d.socket,
        ])
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&silent.stdout).contains("permission denied"),
        "{}",
        describe(&silent)
    );
    // The refused CLI started no daemon of its own.
    assert_eq!(d.daemon_pid(), Some(pid));
    assert_eq!(d.list()["daemon"]["pid"], pid);
    let daemons = d
        .processes()
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(env!("CARGO_BIN_EXE_apm").as_bytes()))
        })
        .count();
    assert_eq!(daemons, 1, "one apm daemon for this home");
}

#[test]
fn user_runs_the_child_as_that_user_and_an_unknown_user_is_refused() {
    let d = Daemon::new("user");
    let unknown = d.apm(&[
        "run",
        "sh",
        "-c",
        "id -u",
        "-name",
        "nope",
        "-user",
        "apm-no-such-user",
        "-path",
        "/",
    ]);
    assert_eq!(unknown.status.code(), Some(2), "{}", describe(&unknown));
    assert!(
        stderr(&unknown).contains("apm-no-such-user"),
        "{}",
        describe(&unknown)
    );

    let Some(user) = nix::unistd::User::from_name("apmtest").unwrap() else {
        prerequisite_missing(
            "no OS user `apmtest` (create it with `useradd --system --no-create-home apmtest`)",
        );
        return;
    };
    // The child's working directory must be one it may enter.
    d.run_sh(
        "as",
        "echo uid=$(id -u); sleep 1010",
        &["-user", "apmtest", "-path", "/"],
    );
    let worker = d.wait_running("as");
    let [pid] = pids(&worker)[..] else {
        panic!("{worker}")
    };
    wait_until(PATIENCE, "the child to print its uid", || {
        d.log("as", false)
            .contains(&format!("as | uid={}", user.uid))
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == user.uid.to_string()),
        "{uid_line}"
    );
}

#[test]
fn user_gives_the_child_that_users_home_and_name() {
    let Some(user) = nix::unistd::User::from_name("apmtest").unwrap() else {
        prerequisite_missing(
            "no OS user `apmtest` (create it with `useradd --system --no-create-home apmtest`)",
        );
        return;
    };
    let d = Daemon::new("user-env");
    d.run_sh(
        "as",
        "echo home=$HOME user=$USER logname=$LOGNAME; sleep 1012",
        &["-user", "apmtest", "-path", "/"],
    );
    let expected = format!(
        "as | home={} user=apmtest logname=apmtest",
        user.dir.display()
    );
    let log = wait_for("the child to print its environment", || {
        Some(d.log("as", false)).filter(|l| l.contains(" as | "))
    });
    assert!(log.contains(&expected), "expected `{expected}` in:\n{log}");
}

#[test]
fn a_request_of_another_protocol_version_gets_an_explained_refusal() {
    let d = Daemon::new("protocol");
    d.ok(&["ls"]);
    let version: String = serde_json::from_slice::<Value>(&d.ok(&["version", "--json"]).stdout)
        .unwrap()["daemon"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let ask = |request: Value| -> Value {
        let address = SocketAddr::from_abstract_name(d.socket.as_bytes()).unwrap();
        let mut stream = UnixStream::connect_addr(&address).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "one JSON line: {line:?}");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["exit"], 3, "{answer}");
        answer
    };
    // A newer CLI.
    let answer =
        ask(serde_json::json!({ "protocol": 999, "version": "9.9.9", "call": { "call": "ping" } }));
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("9.9.9"),
        "names the client's version: {error}"
    );
    assert!(
        error.contains(&format!("apm {version}")) && error.contains("protocol 1"),
        "names the daemon's version: {error}"
    );
    // Same version string, other protocol: still refused, and says why.
    let answer =
        ask(serde_json::json!({ "protocol": 999, "version": version, "call": { "call": "ping" } }));
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("protocol"), "{error}");
    // A call this daemon does not know, from a CLI of another version.
    let answer = ask(
        serde_json::json!({ "protocol": 999, "version": "9.9.9", "call": { "call": "teleport" } }),
    );
    assert!(
        answer["error"].as_str().unwrap().contains("9.9.9"),
        "{answer}"
    );
}

/// Pids of every worker, by name.
fn pid_map(d: &Daemon) -> std::collections::BTreeMap<String, Vec<u32>> {
    d.list()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_owned(), pids(w)))
        .collect()
}

#[test]
fn reload_applies_the_plan_and_keeps_untouched_processes() {
    let d = Daemon::new("reload_plan");
    let config = d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4101; startup_grace 100; }\n\
         worker { name b; exec sleep; params 4102; startup_grace 100; }\n\
         worker { name c; exec sleep; params 4103; startup_grace 100; }\n\
         worker { name gone; exec sleep; params 4104; startup_grace 100; }\n",
    );
    let file = config.to_str().unwrap();
    d.ok(&["load", file]);
    let before = pid_map(&d);
    d.write(
        "app.conf",
        "# edited\n\
         worker { name a; exec sleep; params 4101; startup_grace 100; kill_timeout 3s; }\n\
         worker { name b; exec sleep; params 4102; startup_grace 100; instances 3; }\n\
         worker { name c; exec sleep; params 4113; startup_grace 100; }\n\
         worker { name d; exec sleep; params 4105; startup_grace 100; }\n",
    );
    let check = stdout(&d.ok(&["check", file]));
    assert!(
        check.contains("~ update a in place: kill_timeout 2s → 3s"),
        "{check}"
    );
    let dry = stdout(&d.ok(&["reload", file, "--dry-run"]));
    assert!(
        dry.contains("- remove gone: no longer in the file; stopped and unloaded"),
        "{dry}"
    );
    assert_eq!(pid_map(&d), before, "--dry-run applies nothing");
    let reload = stdout(&d.ok(&["reload", file]));
    for line in [
        "~ update a in place",
        "↕ scale b 1 → 3",
        "~ restart c: params 4103 → 4113",
        "+ start d",
        "- remove gone: no longer in the file; stopped and unloaded",
    ] {
        assert!(reload.contains(line), "{line} missing from\n{reload}");
    }
    let after = pid_map(&d);
    assert_eq!(after["a"], before["a"], "a hot-updated in place");
    assert_eq!(
        after["b"][0], before["b"][0],
        "b's first instance untouched by scaling"
    );
    assert_eq!(after["b"].len(), 3);
    assert_ne!(after["c"], before["c"], "c restarted");
    assert!(after.contains_key("d") && !after.contains_key("gone"));
    assert!(!alive(before["gone"][0]));
    // Nothing changed since: a no-op.
    let again = stdout(&d.ok(&["reload", file]));
    assert!(again.contains("= 4 unchanged"), "{again}");
    assert_eq!(pid_map(&d)["a"], after["a"]);

    // `reload <worker>` applies that worker's part of its file's plan only.
    d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4121; startup_grace 100; kill_timeout 3s; }\n\
         worker { name b; exec sleep; params 4102; startup_grace 100; instances 3; }\n\
         worker { name c; exec sleep; params 4123; startup_grace 100; }\n\
         worker { name d; exec sleep; params 4105; startup_grace 100; }\n",
    );
    let one = stdout(&d.ok(&["reload", "c"]));
    assert!(
        one.contains("~ restart c: params 4113 → 4123") && !one.contains("restart a"),
        "{one}"
    );
    let now = pid_map(&d);
    assert_ne!(now["c"], after["c"]);
    assert_eq!(now["a"], after["a"], "a's change waits for its own reload");
    // `--all --force` restarts every worker of every file, changed or not.
    d.ok(&["reload", "--all", "--force"]);
    let forced = pid_map(&d);
    for name in ["a", "b", "c", "d"] {
        assert!(
            forced[name].iter().all(|pid| !now[name].contains(pid)),
            "{name} restarted: {:?} → {:?}",
            now[name],
            forced[name]
        );
    }
}

#[test]
fn sighup_reloads_every_loaded_file_and_the_daemon_stays() {
    let d = Daemon::new("sighup");
    let config = d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4401; startup_grace 100; }\n",
    );
    d.ok(&["load", config.to_str().unwrap()]);
    let before = pids(&d.wait_running("a"));
    let daemon = d.daemon_pid().unwrap();
    d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4402; startup_grace 100; }\n",
    );
    kill(Pid::from_raw(daemon as i32), Signal::SIGHUP).unwrap();
    let after = wait_for("the edited worker to restart", || {
        let worker = d.worker("a")?;
        let now = pids(&worker);
        (worker["status"] == "running" && !now.is_empty() && now != before).then_some(now)
    });
    let args = std::fs::read_to_string(format!("/proc/{}/cmdline", after[0])).unwrap();
    assert!(args.contains("4402"), "{args:?}");
    assert_eq!(
        d.daemon_pid(),
        Some(daemon),
        "SIGHUP does not stop the daemon"
    );
}

#[test]
fn a_reload_of_a_broken_file_changes_nothing() {
    let d = Daemon::new("reload_broken");
    let config = d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4201; startup_grace 100; }\n",
    );
    let file = config.to_str().unwrap();
    d.ok(&["load", file]);
    let before = pid_map(&d);
    d.write(
        "app.conf",
        "worker { name a; exec sleep; params 4202 startup_grace 100;\n",
    );
    let output = d.apm(&["reload", file]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(
        stderr(&output).contains("nothing was changed"),
        "{}",
        describe(&output)
    );
    assert_eq!(pid_map(&d), before);
}

#[test]
fn saveconf_writes_live_changes_into_the_file_keeping_its_comments() {
    let d = Daemon::new("saveconf");
    let original = "# Our services\n\n# the API\nworker {\n    name      api;      # public\n    exec      sleep;\n    params    4301;\n    instances 1;        // scale me\n    startup_grace 100;\n}\n\n// background jobs\nworker {\n    name jobs;\n    exec sleep;\n    params 4302;\n    startup_grace 100;\n}\n";
    let config = d.write("s.conf", original);
    let file = config.to_str().unwrap();
    d.ok(&["load", file]);
    d.ok(&["saveconf"]);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        original,
        "nothing changed, nothing written"
    );
    d.ok(&[
        "update",
        "api",
        "-instances",
        "3",
        "-kill_timeout",
        "5s",
        "-no-restart",
    ]);
    d.ok(&["rm", "jobs"]);
    d.ok(&["saveconf"]);
    let saved = std::fs::read_to_string(&config).unwrap();
    assert_eq!(
        saved,
        "# Our services\n\n# the API\nworker {\n    name      api;      # public\n    exec      sleep;\n    params    4301;\n    instances 3;        // scale me\n    startup_grace 100;\n    kill_timeout 5s;\n}\n"
    );
    // A command-line worker is saved to a file named for it.
    d.ok(&[
        "run",
        "sleep",
        "4303",
        "-name",
        "extra",
        "-startup_grace",
        "100",
    ]);
    let extra = d.path("extra.conf");
    d.ok(&["saveconf", "extra", &extra]);
    let text = std::fs::read_to_string(&extra).unwrap();
    assert!(
        text.starts_with("worker {\n") && text.contains("name          extra;"),
        "{text}"
    );
}

#[test]
fn auto_reload_applies_an_edit_of_an_included_file_and_ignores_a_broken_one() {
    let d = Daemon::new("auto_reload");
    d.write(
        "apm.conf",
        "daemon { auto_reload true; }\ninclude conf.d/*.conf;\n",
    );
    std::fs::create_dir_all(d.dir().join("conf.d")).unwrap();
    d.write(
        "conf.d/a.conf",
        "worker { name a; exec sleep; params 4401; startup_grace 100; }\n",
    );
    d.ok(&["load", &d.path("apm.conf")]);
    let first = pids(&d.wait_running("a"))[0];
    // An editor's save: write a new file, rename it over the old one.
    d.write(
        "conf.d/.a.conf.swp",
        "worker { name a; exec sleep; params 4401; startup_grace 100; instances 2; }\n",
    );
    std::fs::rename(
        d.dir().join("conf.d/.a.conf.swp"),
        d.dir().join("conf.d/a.conf"),
    )
    .unwrap();
    wait_until(PATIENCE, "the edit to scale a to 2", || {
        d.worker("a").is_some_and(|w| pids(&w).len() == 2)
    });
    assert_eq!(
        pids(&d.worker("a").unwrap())[0],
        first,
        "scaling kept instance 0"
    );
    // A new file matching the include glob is picked up too.
    d.write(
        "conf.d/b.conf",
        "worker { name b; exec sleep; params 4402; startup_grace 100; }\n",
    );
    d.wait_running("b");
    // A broken edit is logged with its position and changes nothing.
    d.write("conf.d/b.conf", "worker { name b exec sleep; }\n");
    d.wait_daemon_log("b.conf:1:17");
    assert!(d.worker("b").is_some(), "b still runs");
    assert_eq!(pids(&d.worker("a").unwrap()).len(), 2);
}

#[test]
fn watch_conf_reloads_only_the_worker_that_asks_for_it() {
    let d = Daemon::new("watch_conf");
    let text = |watched: u32, other: u32| {
        format!(
            "worker {{ name watched; exec sleep; params 4501; startup_grace 100; watch_conf true; instances {watched}; }}\n\
             worker {{ name other; exec sleep; params 4502; startup_grace 100; instances {other}; }}\n"
        )
    };
    d.load(&text(1, 1));
    d.wait_running("watched");
    d.write("apm.conf", &text(2, 2));
    wait_until(PATIENCE, "watched to scale to 2", || {
        d.worker("watched").is_some_and(|w| pids(&w).len() == 2)
    });
    let log = d.daemon_log();
    assert!(
        log.contains("↕ scale watched 1 → 2") && !log.contains("scale other"),
        "{log}"
    );
    assert_eq!(
        pids(&d.worker("other").unwrap()).len(),
        1,
        "other has no watch_conf"
    );
}

pub(crate) const PORT_APP: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("instance %s xff=%s host=%s\n" % (os.environ.get("APM_INDEX"), self.headers.get("X-Forwarded-For"), self.headers.get("X-Forwarded-Host"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn the_proxy_spreads_http_over_running_instances_and_answers_503_without_any() {
    let d = Daemon::new("proxy_http");
    let app = d.write("app.py", PORT_APP);
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    d.run_port_app(
        "web",
        &app,
        &server,
        &[
            "-instances",
            "2",
            "-env_index",
            "APM_INDEX",
            "-startup_grace",
            "300",
        ],
    );
    d.wait_running("web");
    let bodies: Vec<String> = (0..4)
        .map(|_| http_get(port).expect("an answer").1)
        .collect();
    assert!(
        bodies.iter().any(|b| b.starts_with("instance 0"))
            && bodies.iter().any(|b| b.starts_with("instance 1")),
        "{bodies:?}"
    );
    assert!(
        bodies[0].contains("xff=127.0.0.1") && bodies[0].contains("host=test.local"),
        "{bodies:?}"
    );
    d.ok(&["stop", "web"]);
    let (status, body) =
        http_get(port).expect("the listener stays open while the worker is stopped");
    assert_eq!(
        (status, body.as_str()),
        (503, "no instance of web is running\n")
    );
    d.ok(&["start", "web"]);
    wait_until(PATIENCE, "traffic to flow again", || {
        http_get(port).is_some_and(|(s, _)| s == 200)
    });
}

#[test]
fn a_converted_pm2_cluster_app_answers_on_its_pm2_port() {
    if !have_node() {
        prerequisite_missing("node is not installed");
        return;
    }
    let d = Daemon::new("convert_e2e");
    let port = free_port();
    d.write(
        "server.js",
        "const http = require('http');\nhttp.createServer((req, res) => res.end(`hello from ${process.pid} on ${process.env.PORT}\\n`)).listen(process.env.PORT, '127.0.0.1');\n",
    );
    let ecosystem = d.write(
        "ecosystem.config.js",
        &format!("module.exports = {{ apps: [{{ name: 'api', script: 'server.js', instances: 2, exec_mode: 'cluster', env: {{ PORT: {port} }}, listen_timeout: 300 }}] }};\n"),
    );
    let converted = d.path("apm.conf");
    d.ok(&["convert", ecosystem.to_str().unwrap(), &converted]);
    d.ok(&["check", &converted]);
    d.ok(&["load", &converted]);
    d.wait_running("api");
    let (status, body) = http_get(port).expect("an answer on the PM2 port");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("hello from"), "{body}");
    assert!(
        !body.contains(&format!("on {port}")),
        "each instance has a port of its own: {body}"
    );
}

pub(crate) const HEADERS_APP: &str = r#"
import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(1.5)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"6\r\nfirst\n\r\n")
            self.wfile.flush()
            time.sleep(1.5)
            self.wfile.write(b"5\r\nlast\n\r\n0\r\n\r\n")
            return
        if self.path == "/headers":
            body = "".join("%s: %s\n" % item for item in self.headers.items()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/hop":
            self.send_response(200)
            self.send_header("Connection", "close, X-Private")
            self.send_header("X-Private", "instance")
            self.send_header("Keep-Alive", "timeout=1")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"hop\n")
            self.close_connection = True
            return
        if self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers.get("Upgrade"))
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(1024)
                if not data:
                    return
                self.connection.sendall(data.upper())
        body = ("xff=%s id=%s subject=%s host=%s peer=%d\n" % (self.headers.get("X-Forwarded-For"), self.headers.get("X-Request-Id"), self.headers.get("X-Client-Cert-Subject"), self.headers.get("Host"), self.client_address[1])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                body += self.rfile.read(n)
                self.rfile.readline()
                if n == 0:
                    break
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answer = ("te=%s cl=%s body=%s\n" % (self.headers.get("Transfer-Encoding"), self.headers.get("Content-Length"), body.decode())).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

const BODY_APP: &str = r#"
import hashlib, http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        open(os.environ["MARKER"], "w").write(str(os.getpid()))
        time.sleep(3600)
    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(n)
                self.rfile.readline()
                if n == 0:
                    break
                digest.update(chunk)
                size += n
        else:
            left = int(self.headers.get("Content-Length", 0))
            while left:
                chunk = self.rfile.read(min(left, 65536))
                digest.update(chunk)
                size += len(chunk)
                left -= len(chunk)
        names = ",".join(k for k in self.headers.keys() if k.lower().startswith("x-m"))
        body = ("%d %s %s cookie=%s names=%s\n" % (size, digest.hexdigest(), self.path, self.headers.get("Cookie"), names)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-app-NAME", "1")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Answers every request on a keep-alive connection, and closes every
/// connection it has once the file `$MARKERS/close-now` appears (then
/// writes `$MARKERS/closed`), as an instance timing out idle connections.
/// A line in `$MARKERS/ended` for each connection that carried requests
/// and was closed by the other side.
const CLOSING_APP: &str = r#"
import os, socket, threading, time
markers = os.environ["MARKERS"]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(os.environ["PORT"])))
listener.listen(16)
open_connections = []
def serve(c):
    pending = b""
    answered = 0
    while True:
        while b"\r\n\r\n" not in pending:
            data = c.recv(65536)
            if not data:
                if answered:
                    with open(os.path.join(markers, "ended"), "a") as ended:
                        ended.write("a connection that carried %d requests\n" % answered)
                return
            pending += data
        head, pending = pending.split(b"\r\n\r\n", 1)
        body = b"answered " + head.split(b" ")[1] + b"\n"
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answered += 1
def closer():
    while not os.path.exists(os.path.join(markers, "close-now")):
        time.sleep(0.01)
    for c in list(open_connections):
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    open(os.path.join(markers, "closed"), "w").close()
threading.Thread(target=closer, daemon=True).start()
while True:
    c, _ = listener.accept()
    open_connections.append(c)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Loads `CLOSING_APP` as worker `c`; its port and markers directory.
fn load_closing_app(d: &Daemon) -> (u16, String) {
    let app = d.write("closing.py", CLOSING_APP);
    let markers = d.path("");
    let port = free_port();
    d.load(&format!(
        "worker {{ name c; exec python3; params {}; upstream port; startup_grace 300; server http://127.0.0.1:{port}; env MARKERS={markers}; }}\n",
        app.display()
    ));
    d.wait_running("c");
    (port, markers)
}

/// A keep-alive request to `CLOSING_APP`, read to the end of its answer.
fn ask_closing_app(client: &mut std::net::TcpStream, path: &str) {
    use std::io::{Read, Write};
    client
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !answer.ends_with(format!("answered {path}\n").as_bytes()) {
        let n = client.read(&mut buffer).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..n]);
    }
}

#[test]
fn a_request_meeting_a_connection_the_instance_just_closed_goes_out_on_a_new_one() {
    use std::io::{Read, Write};
    let d = Daemon::new("proxy_closed_idle");
    let (port, markers) = load_closing_app(&d);
    let mut client = connect(port);
    ask_closing_app(&mut client, "/1");
    // With the daemon stopped, the client's next request arrives first and
    // the instance's close of the connection it would go out on right
    // after: the daemon, woken, sends the request before it reads the close.
    let pid = d.daemon_pid().unwrap();
    let daemon = Pid::from_raw(pid as i32);
    kill(daemon, Signal::SIGSTOP).unwrap();
    // Every thread: the leader shows the group stop while a busy proxy
    // thread may still run, and would send the request before the close.
    wait_until(PATIENCE, "every thread of the daemon to stop", || {
        std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|mut tasks| {
            tasks.all(|task| {
                task.is_ok_and(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T'))
                    })
                })
            })
        })
    });
    client
        .write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    d.write("close-now", "");
    let closed = std::path::Path::new(&markers).join("closed");
    wait_until(PATIENCE, "the instance to close its connections", || {
        closed.exists()
    });
    kill(daemon, Signal::SIGCONT).unwrap();
    let mut second = String::new();
    let _ = client.read_to_string(&mut second);
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("answered /2\n"),
        "{second}"
    );
}

#[test]
fn an_idle_client_does_not_keep_a_connection_to_the_instance_open() {
    let d = Daemon::new("proxy_idle_upstream");
    let (port, markers) = load_closing_app(&d);
    let mut client = connect(port);
    ask_closing_app(&mut client, "/1");
    ask_closing_app(&mut client, "/2");
    // The client stays, idle (keep_alive is two minutes); the daemon's
    // connection to the instance goes once it would not be used again.
    let ended = std::path::Path::new(&markers).join("ended");
    wait_until(PATIENCE, "the connection to the instance to close", || {
        std::fs::read_to_string(&ended).is_ok_and(|e| e == "a connection that carried 2 requests\n")
    });
    ask_closing_app(&mut client, "/3");
}

#[test]
fn bodies_pass_whole_and_a_killed_instance_costs_only_its_own_request() {
    let sha256_hex = |bytes: &[u8]| {
        use std::io::Write;
        let mut python = Command::new("python3")
            .args(["-c", "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest(), end='')"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        python.stdin.take().unwrap().write_all(bytes).unwrap();
        String::from_utf8(python.wait_with_output().unwrap().stdout).unwrap()
    };
    let d = Daemon::new("proxy_bodies");
    let app = d.write("bodies.py", BODY_APP);
    let port = free_port();
    let marker = d.path("hung");
    d.load(&format!(
            "worker {{ name b; exec python3; params {}; instances 2; upstream port; startup_grace 1000; server http://127.0.0.1:{port}; env MARKER={marker}; }}\n",
            app.display()
        ));
    d.wait_running("b");
    let post = |head: &str, body: &[u8]| {
        use std::io::{Read, Write};
        let mut stream = connect(port);
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let empty = post(
        "POST /empty?a=1&b=2 HTTP/1.1\r\nHost: a\r\nCookie: k=v; s=t\r\nX-Mixed-Case: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"",
    );
    // Header names reach the instance as the client spelled them.
    assert!(
        empty.starts_with("HTTP/1.1 200")
            && empty.contains(&format!(
                "0 {} /empty?a=1&b=2 cookie=k=v; s=t names=X-Mixed-Case",
                sha256_hex(b"")
            )),
        "{empty}"
    );
    // Response header names reach the client in Title-Case (decision 16).
    assert!(empty.contains("\r\nX-App-Name: 1\r\n"), "{empty}");
    d.ok(&["update", "b", "-lowercase_hdrs", "-no-restart"]);
    wait_until(PATIENCE, "lowercase_hdrs to apply live", || {
        post(
            "POST / HTTP/1.1\r\nHost: a\r\nX-Mixed-Case: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"",
        )
        .contains("names=x-mixed-case")
    });
    let chunked = post(
        "POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert!(
        chunked.contains(&format!("11 {} /chunked", sha256_hex(b"hello world"))),
        "{chunked}"
    );
    let big: Vec<u8> = (0..10 << 20).map(|i: u32| (i % 251) as u8).collect();
    let streamed = post(
        &format!(
            "POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            big.len()
        ),
        &big,
    );
    assert!(
        streamed.contains(&format!("{} {} /big", big.len(), sha256_hex(&big))),
        "{streamed}"
    );
    // An instance killed while it holds a request: that request gets a 502.
    let hung = std::thread::spawn(move || http_get(port));
    wait_until(PATIENCE, "an instance to hold the request", || {
        std::fs::read_to_string(&marker).is_ok_and(|pid| !pid.is_empty())
    });
    let pid = std::fs::read_to_string(&marker).unwrap();
    assert!(
        Command::new("kill")
            .args(["-KILL", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(hung.join().unwrap().map(|(status, _)| status), Some(502));
    // Once the supervisor has seen the death, every request is answered.
    // Once the supervisor has seen the death (without restart_err the
    // instance stays down), every request goes to the live instance.
    wait_until(PATIENCE, "the killed instance to be marked crashed", || {
        d.worker("b").is_some_and(|w| {
            w["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["status"] == "crashed")
        })
    });
    for _ in 0..6 {
        let answer = post(
            "POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"",
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

/// Loads worker NAME: the headers app behind a `SCHEME://` listener on a
/// free port, with `settings` (TLS, proxy options, Vanguard); returns the
/// port and the config file.
fn load_headers_worker(d: &Daemon, name: &str, scheme: &str, settings: &str) -> (u16, PathBuf) {
    let app = d.write("headers.py", HEADERS_APP);
    let port = free_port();
    let config = d.load(&format!(
            "worker {{\n    name {name}; exec python3; params {}; upstream port; startup_grace 300;\n    server {scheme}://127.0.0.1:{port};\n    {settings}\n}}\n",
            app.display()
        ));
    d.wait_running(name);
    (port, config)
}

/// The TLS settings for the certificates of `certs::make_certificates`.
const SITE_TLS: &str = "tls on; tls_cert site.pem; tls_key site.key;";

/// The soft and hard limits of open files of process `pid`.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    let (soft, hard) = (fields.next().unwrap(), fields.next().unwrap());
    (soft.to_owned(), hard.to_owned())
}

#[test]
fn the_daemon_raises_its_open_files_limit_and_children_get_the_one_it_had() {
    let d = Daemon::new("nofile");
    d.start_with_ulimit("-S -n 256");
    let (soft, hard) = open_files_limits(d.daemon_pid().unwrap());
    assert_eq!(soft, hard, "the daemon takes its hard limit");
    let room = hard.parse::<u64>().unwrap() / 2;
    d.wait_daemon_log(&format!(
        "open files limit raised from 256 to {hard} (children get 256): room for about {room} proxied clients"
    ));
    d.run_sh("child", "exec sleep 600", &["-startup_grace", "100"]);
    let child = pids(&d.worker("child").unwrap())[0];
    assert_eq!(open_files_limits(child), ("256".to_owned(), hard));
}

#[test]
fn a_daemon_out_of_descriptors_waits_for_them_instead_of_spinning() {
    let d = Daemon::new("emfile");
    // A hard limit of 64: the daemon cannot raise it, and says what it allows.
    d.start_with_ulimit("-n 64");
    d.wait_daemon_log(
        "open files limit 64: room for about 32 proxied clients; a higher hard limit holds more (as root `ulimit -H -n 524288`",
    );
    let (port, _) = load_headers_worker(&d, "e", "http", "");
    let pid = d.daemon_pid().unwrap();
    // Idle clients, more than the daemon has descriptors for; those
    // beyond it wait in the listener's backlog.
    let clients: Vec<_> = (0..80)
        .map_while(|_| {
            std::net::TcpStream::connect_timeout(
                &(std::net::Ipv4Addr::LOCALHOST, port).into(),
                Duration::from_secs(1),
            )
            .ok()
        })
        .collect();
    d.wait_daemon_log(&format!(
        "cannot accept connections on http://127.0.0.1:{port}: Too many open files"
    ));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    // A daemon retrying accept at once burns its whole second (100 ticks).
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 30,
        "{spent} ticks in a second, {} clients",
        clients.len()
    );
    drop(clients);
    assert_eq!(http_get(port).map(|(s, _)| s), Some(200));
    d.ok(&["ls"]);
}

#[test]
fn max_conns_holds_extra_connections_back_and_keep_alive_closes_idle_ones() {
    use std::io::{Read, Write};
    let d = Daemon::new("proxy_conns");
    let (port, _) = load_headers_worker(&d, "c", "http", "max_conns 1; keep_alive 2s;");
    let mut first = connect(port);
    let (head, _) = exchange(&mut first, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buffer = [0u8; 4096];
    // The second connection waits while the first one is open...
    let mut second = connect(port);
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        second.read(&mut buffer).is_err(),
        "answered beyond max_conns"
    );
    // ...until keep_alive closes the idle first one; then it is served.
    let started = Instant::now();
    assert_eq!(
        first.read(&mut buffer).unwrap(),
        0,
        "the idle connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(9));
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    second.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_client_that_never_finishes_its_headers_is_timed_out_and_frees_its_slot() {
    use std::io::{Read, Write};
    let d = Daemon::new("proxy_slowloris");
    let (port, _) = load_headers_worker(&d, "s", "http", "max_conns 1; keep_alive 1s;");
    // From before the connection: keep_alive counts from when the daemon
    // accepted it, which a loaded machine may delay.
    let started = Instant::now();
    let mut slow = connect(port);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(15),
        "closed after {waited:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The only connection slot (max_conns 1) is free again.
    assert!(
        http_raw(
            port,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .starts_with("HTTP/1.1 200")
    );
    // A request being answered is not idle, however long its answer takes
    // to start or pauses in its body.
    let slow = http_raw(
        port,
        "GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        slow.starts_with("HTTP/1.1 200") && slow.contains("first\n") && slow.contains("last\n"),
        "{slow}"
    );
}

#[test]
fn the_proxy_distrusts_client_forwarding_headers_adds_trace_ids_and_passes_upgrades() {
    use std::io::{Read, Write};
    let d = Daemon::new("proxy_headers");
    let app = d.write("headers.py", HEADERS_APP);
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    // Through `apm run` flags, `-key=false` form included.
    d.run_port_app(
        "h",
        &app,
        &server,
        &[
            "-startup_grace",
            "300",
            "-trust_proxy=false",
            "-trace_header",
            "x-request-id",
        ],
    );
    d.wait_running("h");
    let spoofed = "GET /?token=s3cret HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nX-Client-Cert-Subject: CN=admin\r\nConnection: close\r\n\r\n";
    let answer = http_raw(port, spoofed);
    assert!(answer.contains("xff=127.0.0.1 id="), "{answer}");
    assert!(
        !answer.contains("6.6.6.6") && !answer.contains("id=None"),
        "{answer}"
    );
    // Only a verified certificate names the client.
    assert!(answer.contains("subject=None"), "{answer}");
    // The trace id is in the worker's log with the request (as a line of
    // apm's), the query string is not.
    let id = answer
        .split("id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let traced = format!(" apm | h {id} 127.0.0.1 GET / -> 200 in ");
    let log = || String::from_utf8(d.ok(&["log", "h", "--lines", "100"]).stdout).unwrap();
    wait_until(PATIENCE, "the trace id in the worker's log", || {
        log().contains(&traced)
    });
    assert!(!log().contains("s3cret"));
    let daemon_log = d.daemon_log();
    assert!(!daemon_log.contains(&id), "{daemon_log}");
    d.ok(&["update", "h", "-trust_proxy", "-no-restart"]);
    wait_until(PATIENCE, "trust_proxy to apply live", || {
        http_raw(port, spoofed).contains("xff=6.6.6.6, 127.0.0.1")
    });
    // An upgrade: after the 101, bytes flow both ways through the proxy.
    let mut stream = connect(port);
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "closed before the 101");
        seen.extend_from_slice(&buffer[..n]);
    }
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"HELLO");
}

#[test]
fn an_upstream_connection_idle_for_a_second_is_not_reused() {
    let d = Daemon::new("proxy_idle_upstream");
    let (port, _) = load_headers_worker(&d, "p", "http", "");
    let mut client = connect(port);
    // The port of the connection each request reached the instance on.
    let mut upstream_port = || {
        let (head, body) = exchange(&mut client, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let peer = body.trim_end().rsplit_once("peer=").expect(&body).1;
        peer.parse::<u16>().unwrap()
    };
    let first = upstream_port();
    assert_eq!(
        upstream_port(),
        first,
        "a keep-alive client's requests share a connection"
    );
    // Idle past apm's limit: the instance would still take a request on it,
    // but one that closes idle connections (Node after 5 s, gunicorn after
    // 2 s) could close it just as the request goes out, so apm opens a new one.
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(upstream_port(), first);
}

#[test]
fn the_proxy_listens_on_a_unix_socket() {
    use std::io::{Read, Write};
    let d = Daemon::new("proxy_unix");
    let app = d.write("headers.py", HEADERS_APP);
    let socket = d.path("api.sock");
    let server = format!("http://unix:{socket}");
    d.run_port_app("u", &app, &server, &["-startup_grace", "300"]);
    d.wait_running("u");
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("xff=6.6.6.6"),
        "trust_proxy is on by default: {answer}"
    );
    d.ok(&["rm", "u"]);
    assert!(
        !Path::new(&socket).exists(),
        "the socket file goes with its listener"
    );
}

#[test]
fn vanguard_refuses_banned_paths_and_rate_limits_per_client() {
    let d = Daemon::new("vanguard");
    let (port, _) = load_headers_worker(
        &d,
        "v",
        "http",
        "vanguard { rate_limit 1; rate_burst 3; ban_path *.php, /.env; ban_response \"go away\"; }",
    );
    let get = |target: &str| {
        http_raw(
            port,
            &format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
        )
    };
    for target in ["/wp-login.php", "/a/../.env", "/%2e%2e/.env?x=1"] {
        let answer = get(target);
        assert!(
            answer.starts_with("HTTP/1.1 403") && answer.ends_with("go away"),
            "{target}: {answer}"
        );
    }
    // The burst passes back to back; the next request is refused with Retry-After.
    let statuses: Vec<String> = (0..3)
        .map(|_| get("/").lines().next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        statuses,
        ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK"]
    );
    // A loaded machine may take long enough for a token to come back, so
    // look for the refusal among the next few requests.
    let refused = (0..10)
        .map(|_| get("/"))
        .find(|a| a.starts_with("HTTP/1.1 429"))
        .expect("a 429 after the burst");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: "),
        "{refused}"
    );
    let info = stdout(&d.ok(&["info", "v"]));
    assert!(
        info.contains("3 blocked by path") && !info.contains(" 0 rate-limited"),
        "{info}"
    );
}

#[test]
fn vanguard_judges_the_forwarded_client_only_with_trust_proxy_and_bans_expire() {
    let d = Daemon::new("vanguard-xff");
    let app = d.write("headers.py", HEADERS_APP);
    let (distrusting, trusting) = (free_port(), free_port());
    let rules = "ban_ip 203.0.113.0/24, 2001:db8::/32; rate_limit 1; rate_burst 1; ban_ttl 100ms;";
    d.load(&format!(
            "worker {{ name a; exec python3; params {app}; upstream port; startup_grace 300; server http://127.0.0.1:{distrusting}; trust_proxy false; vanguard {{ {rules} }} }}\n\
             worker {{ name b; exec python3; params {app}; upstream port; startup_grace 300; server http://127.0.0.1:{trusting}; trust_proxy true; vanguard {{ {rules} }} }}\n",
            app = app.display()
        ));
    d.wait_running("a");
    d.wait_running("b");
    let status = |port: u16, forwarded: &str| {
        let answer = http_raw(
            port,
            &format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {forwarded}\r\nConnection: close\r\n\r\n"
            ),
        );
        answer.get(9..12).unwrap_or_default().to_owned()
    };
    // Without trust_proxy a spoofed header is not the client; the socket is.
    assert_eq!(status(distrusting, "203.0.113.9"), "200");
    assert_eq!(status(trusting, "203.0.113.9"), "403");
    assert_eq!(status(trusting, "2001:db8::7"), "403", "an IPv6 range");
    // A second request within the second breaches a burst of 1; the ban
    // then holds for ban_ttl and lifts by itself.
    assert_eq!(status(trusting, "192.0.2.44"), "200");
    assert!((0..5).any(|_| status(trusting, "192.0.2.44") == "403"));
    wait_until(PATIENCE, "the ban to expire", || {
        status(trusting, "192.0.2.44") == "200"
    });
}

/// `https://` terminates TLS, and so does `http://` under `tls on`: the
/// reference's `tls` turns TLS on for every listener of the worker (W0009
/// says so at load), so its configs that write `http://` work.
#[test]
fn https_listeners_terminate_tls() {
    for scheme in ["https", "http"] {
        let d = Daemon::new(&format!("tls_{scheme}"));
        if !certs::make_certificates(d.dir()) {
            prerequisite_missing("openssl could not make test certificates");
            return;
        }
        let (port, _) = load_headers_worker(&d, "s", scheme, SITE_TLS);
        let client = format!(
            "import ssl, urllib.request\nctx = ssl.create_default_context(cafile={ca:?})\nprint(urllib.request.urlopen('https://127.0.0.1:{port}/', context=ctx, timeout=10).read().decode(), end='')\n",
            ca = d.path("ca.pem")
        );
        let output = std::process::Command::new("python3")
            .args(["-c", &client])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{scheme}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).starts_with("xff=127.0.0.1"),
            "{scheme}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        // Plain HTTP on the TLS port gets no answer from the app.
        assert!(
            !http_raw(
                port,
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            .contains("xff=")
        );
    }
}

#[test]
fn a_tls_client_that_never_finishes_its_handshake_is_timed_out_and_frees_its_slot() {
    use std::io::Read;
    let d = Daemon::new("tls_slowloris");
    if !certs::make_certificates(d.dir()) {
        prerequisite_missing("openssl could not make test certificates");
        return;
    }
    let settings = format!("{SITE_TLS} max_conns 1; keep_alive 1s;");
    let (port, _) = load_headers_worker(&d, "s", "https", &settings);
    let started = Instant::now();
    let mut silent = connect(port);
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(15),
        "closed after {waited:?}"
    );
    // The only slot is free again: a real TLS client is served.
    let client = format!(
        "import ssl, urllib.request\nctx = ssl.create_default_context(cafile={ca:?})\nprint(urllib.request.urlopen('https://127.0.0.1:{port}/', context=ctx, timeout=10).read().decode(), end='')\n",
        ca = d.path("ca.pem")
    );
    let output = Command::new("python3")
        .args(["-c", &client])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("xff=127.0.0.1"),
        "{}",
        describe(&output)
    );
}

#[test]
fn a_stop_lets_in_flight_requests_finish_and_no_longer_than_they_need() {
    let d = Daemon::new("drain");
    let app = d.write(
        "slow.py",
        "import http.server, os, time\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        open(os.environ['MARKER'], 'w').close()\n        time.sleep(1.0)\n        self.send_response(200)\n        self.send_header('Content-Length', '5')\n        self.end_headers()\n        self.wfile.write(b'done\\n')\n    def log_message(self, *a):\n        pass\nhttp.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    );
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let marker = d.path("request-arrived");
    let env = format!("MARKER={marker}");
    d.run_port_app(
        "slow",
        &app,
        &server,
        &[
            "-startup_grace",
            "300",
            "-drain_timeout",
            "10s",
            "-env",
            &env,
        ],
    );
    d.wait_running("slow");
    let request = std::thread::spawn(move || http_get(port));
    // The request is in flight (it takes a second) when the stop comes.
    wait_until(PATIENCE, "the request to reach the instance", || {
        Path::new(&marker).exists()
    });
    let started = Instant::now();
    d.ok(&["stop", "slow"]);
    assert_eq!(request.join().unwrap(), Some((200, "done\n".to_owned())));
    // The request had at most a second to go: the stop waited for it, not
    // for drain_timeout.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the stop took {:?}",
        started.elapsed()
    );
}

#[test]
fn tls_ca_requires_a_client_certificate_it_signed() {
    let d = Daemon::new("mtls");
    if !certs::make_certificates(d.dir()) {
        prerequisite_missing("openssl could not make test certificates");
        return;
    }
    assert!(certs::signed_by_ca(
        d.dir(),
        "client",
        "/CN=alice",
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    ));
    let (port, _) = load_headers_worker(&d, "m", "https", &format!("{SITE_TLS} tls_ca ca.pem;"));
    let fetch = |with_certificate: bool| {
        let load = if with_certificate {
            format!(
                "ctx.load_cert_chain({:?}, {:?})\n",
                d.path("client.pem"),
                d.path("client.key")
            )
        } else {
            String::new()
        };
        let client = format!(
            "import ssl, urllib.request\nctx = ssl.create_default_context(cafile={ca:?})\n{load}print(urllib.request.urlopen('https://127.0.0.1:{port}/', context=ctx, timeout=10).read().decode(), end='')\n",
            ca = d.path("ca.pem")
        );
        std::process::Command::new("python3")
            .args(["-c", &client])
            .output()
            .unwrap()
    };
    let with = fetch(true);
    assert!(
        with.status.success() && String::from_utf8_lossy(&with.stdout).starts_with("xff="),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    // The worker learns who the verified client is.
    assert!(
        String::from_utf8_lossy(&with.stdout).contains("subject=CN=alice"),
        "{}",
        String::from_utf8_lossy(&with.stdout)
    );
    let without = fetch(false);
    assert!(
        !without.status.success(),
        "a client without a certificate is refused in the handshake"
    );
}

#[test]
fn a_reload_swaps_certificates_for_new_connections_and_keeps_open_ones() {
    let d = Daemon::new("cert_swap");
    if !certs::make_certificates(d.dir()) {
        prerequisite_missing("openssl could not make test certificates");
        return;
    }
    let (port, config) = load_headers_worker(&d, "s", "https", SITE_TLS);
    // A client that keeps one connection open across the reload.
    let marker = d.path("reloaded");
    let client = format!(
        "import http.client, os, ssl, time\nctx = ssl.create_default_context(cafile={ca:?})\nc = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx, timeout=20)\nc.request('GET', '/'); r = c.getresponse(); r.read()\nprint(c.sock.getpeercert()['serialNumber'], flush=True)\nwhile not os.path.exists({marker:?}): time.sleep(0.02)\nc.request('GET', '/'); r = c.getresponse()\nprint(r.status, c.sock.getpeercert()['serialNumber'])\n",
        ca = d.path("ca.pem")
    );
    let mut open = std::process::Command::new("python3")
        .args(["-c", &client])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(open.stdout.as_mut().unwrap()),
        &mut first_line,
    )
    .unwrap();
    let old_serial = first_line.trim().to_owned();
    // New certificate files under the same names, then a reload.
    assert!(certs::sign(d.dir(), "site", 3));
    d.ok(&["reload", config.to_str().unwrap()]);
    std::fs::write(&marker, "").unwrap();
    let rest = open.wait_with_output().unwrap();
    let second = String::from_utf8_lossy(&rest.stdout).trim().to_owned();
    assert_eq!(
        second,
        format!("200 {old_serial}"),
        "the open connection kept its certificate and still works"
    );
    let fresh = format!(
        "import socket, ssl\nctx = ssl.create_default_context(cafile={ca:?})\ns = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port})), server_hostname='127.0.0.1')\nprint(s.getpeercert()['serialNumber'])\n",
        ca = d.path("ca.pem")
    );
    let new_serial = String::from_utf8_lossy(
        &std::process::Command::new("python3")
            .args(["-c", &fresh])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_owned();
    assert!(
        !new_serial.is_empty() && new_serial != old_serial,
        "new connections get the new certificate: {old_serial} vs {new_serial}"
    );
}

#[test]
fn hop_by_hop_fields_stay_on_their_own_connection() {
    let d = Daemon::new("proxy_hop");
    let (port, _) = load_headers_worker(&d, "h", "http", "");
    let mut client = connect(port);
    // What the client says of its connection to apm never reaches the
    // instance, and a field it names in `Connection` is removed with it.
    let (head, seen) = exchange(&mut client, b"GET /headers HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nX-Private: client\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers, deflate\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = seen.to_ascii_lowercase();
    for gone in [
        "connection:",
        "x-private:",
        "keep-alive:",
        "proxy-connection:",
        "upgrade:",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the instance:\n{seen}");
    }
    assert!(
        seen.contains("te: trailers\n")
            && seen.contains("x-kept: yes\n")
            && seen.contains("host: a\n"),
        "{seen}"
    );
    // What the instance says of its connection to apm never reaches the
    // client: its `Connection: close` closes that connection, not the client's.
    let (head, body) = exchange(&mut client, b"GET /hop HTTP/1.1\r\nHost: a\r\n\r\n");
    let lower = head.to_ascii_lowercase();
    assert!(
        head.starts_with("HTTP/1.1 200")
            && body == "hop\n"
            && !lower.contains("connection:")
            && !lower.contains("keep-alive:")
            && !lower.contains("x-private:"),
        "{head}"
    );
    let (head, _) = exchange(&mut client, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the client's connection stays open: {head}"
    );
}

#[test]
fn the_proxy_rejects_malformed_oversized_and_smuggling_requests() {
    let d = Daemon::new("proxy_bad_input");
    let (port, _) = load_headers_worker(&d, "b", "http", "");
    let status = |request: &str| {
        http_raw(port, request)
            .split(' ')
            .nth(1)
            .unwrap_or("closed")
            .to_owned()
    };
    // hyper refuses what is not HTTP: 400, or 501 for an unknown method.
    assert!(["400", "501"].contains(&status("NONSENSE\r\n\r\n").as_str()));
    assert!(["400", "501"].contains(&status("GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n").as_str()));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "x".repeat(1 << 20)
    );
    assert_eq!(status(&huge), "431");
    // Conflicting framing (RFC 9112, 6.3): Transfer-Encoding wins, the
    // instance never sees the Content-Length an app could pick instead, and
    // the connection closes after the answer, so what follows the chunked
    // body is never taken for a request.
    let mut smuggler = connect(port);
    smuggler
        .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut smuggler, &mut answer)
        .expect("the proxy closes the connection after answering");
    assert!(
        answer.matches("HTTP/1.1 ").count() == 1
            && answer.ends_with("te=chunked cl=None body=hello\n"),
        "{answer}"
    );
    // No tunnels: CONNECT is refused whole, not sent to the instance, and
    // the connection closes with the refusal.
    let mut tunnel = connect(port);
    tunnel
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .unwrap();
    let mut refusal = String::new();
    std::io::Read::read_to_string(&mut tunnel, &mut refusal).expect("closed after the refusal");
    assert!(
        refusal.starts_with("HTTP/1.1 501") && refusal.contains("reverse proxy"),
        "{refusal}"
    );
    // A target in absolute form names the host the instance sees.
    let absolute = http_raw(
        port,
        "GET http://named.example/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    );
    assert!(absolute.contains("host=named.example peer="), "{absolute}");
    // A host the proxy and the instance could read differently is refused
    // before it reaches the instance.
    for (request, fault) in [
        (
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            "needs a Host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
            "more than one Host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a.example/x\r\nConnection: close\r\n\r\n",
            "not a host",
        ),
        (
            "GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            "user information",
        ),
    ] {
        let answer = http_raw(port, request);
        assert!(
            answer.starts_with("HTTP/1.1 400")
                && answer.contains(fault)
                && !answer.contains("peer="),
            "{request:?}: {answer}"
        );
    }
    // HTTP/1.0 had no Host: such a request is still served.
    let old = http_raw(port, "GET / HTTP/1.0\r\n\r\n");
    assert!(old.starts_with("HTTP/1.0 200"), "{old}");
    // The proxy is still serving.
    assert_eq!(http_get(port).map(|(s, _)| s), Some(200));
}

#[test]
fn raw_tcp_is_spliced_and_a_banned_client_gets_a_reset() {
    use std::io::{Read, Write};
    let d = Daemon::new("tcp_reset");
    let app = d.write(
        "echo.py",
        "import os, socketserver\nclass E(socketserver.BaseRequestHandler):\n    def handle(self):\n        while True:\n            data = self.request.recv(1024)\n            if not data:\n                return\n            self.request.sendall(data)\nsocketserver.ThreadingTCPServer(('127.0.0.1', int(os.environ['PORT'])), E).serve_forever()\n",
    );
    let (open_port, banned_port) = (free_port(), free_port());
    d.load(&format!(
            "worker {{ name open; exec python3; params {app}; upstream port; startup_grace 300; server tcp://127.0.0.1:{open_port}; }}\n\
             worker {{ name shut; exec python3; params {app}; upstream port; startup_grace 300; server tcp://127.0.0.1:{banned_port};\n    vanguard {{ ban_ip 127.0.0.0/8; }}\n}}\n",
            app = app.display()
        ));
    d.wait_running("open");
    d.wait_running("shut");
    let mut stream = connect(open_port);
    stream.write_all(b"ping").unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping");
    let mut refused = connect(banned_port);
    // The reset reaches either the write or, if the write went out first, the read.
    let error = match refused.write_all(b"ping") {
        Err(error) => error,
        Ok(()) => refused
            .read(&mut [0u8; 4])
            .expect_err("a reset, not an orderly close"),
    };
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{error}"
    );
}

#[test]
fn watch_restarts_the_worker_when_a_watched_file_changes() {
    let d = Daemon::new("watch");
    let app = d.dir();
    std::fs::create_dir_all(app.join("node_modules/pkg")).unwrap();
    std::fs::write(app.join("server.js"), "1").unwrap();
    // No `-path`: the CLI's working directory, which holds APM_HOME, whose
    // state file (a `*.json`) changes with every restart.
    d.run_sh(
        "watched",
        "exec sleep 1013",
        &[
            "-watch",
            "*.js,*.json,config",
            "-watch_ignore",
            "*node_modules*",
            "-watch_delay",
            "50",
            "-startup_grace",
            "100",
        ],
    );
    let pid_after = |previous: u32| {
        wait_for("a restart", || {
            let worker = d.worker("watched")?;
            let pid = *pids(&worker).first()?;
            (pid != previous && worker["status"] == "running").then_some((pid, restarts(&worker)))
        })
    };
    let first = pids(&d.wait_running("watched"))[0];
    std::fs::write(app.join("server.js"), "2").unwrap();
    let (second, count) = pid_after(first);
    assert!(!alive(first), "the old process is gone");
    let log = d.daemon_log();
    assert!(
        log.contains(&format!(
            "watched: {} changed, restarting",
            app.join("server.js").display()
        )),
        "{log}"
    );

    // Neither ignored nor unmatched files, nor the state file, restart it;
    // nor does a change restart a stopped worker.
    d.run_sh(
        "resting",
        "exec sleep 1013",
        &[
            "-watch",
            "rest.txt",
            "-watch_delay",
            "50",
            "-startup_grace",
            "100",
        ],
    );
    d.ok(&["stop", "resting"]);
    std::fs::write(app.join("node_modules/pkg/index.js"), "x").unwrap();
    std::fs::write(app.join("notes.txt"), "x").unwrap();
    std::fs::write(app.join("rest.txt"), "x").unwrap();
    // A bound on something that must not happen: forty times watch_delay.
    std::thread::sleep(Duration::from_secs(2));
    let worker = d.worker("watched").unwrap();
    assert_eq!((pids(&worker)[0], restarts(&worker)), (second, count));
    assert_eq!(d.worker("resting").unwrap()["status"], "stopped");

    // A directory made after the start, with a file an editor renamed into
    // place; then a directory named by a pattern, made with its file in it.
    std::fs::create_dir_all(app.join("lib/deep")).unwrap();
    std::fs::write(app.join("lib/deep/.util.js.swp"), "x").unwrap();
    std::fs::rename(
        app.join("lib/deep/.util.js.swp"),
        app.join("lib/deep/util.js"),
    )
    .unwrap();
    let (third, _) = pid_after(second);
    let staged = d.dir().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("settings.ini"), "x").unwrap();
    std::fs::rename(&staged, app.join("config")).unwrap();
    let (fourth, _) = pid_after(third);

    // Watch keys apply live: the new watch sees the next change.
    d.ok(&[
        "update",
        "watched",
        "-watch",
        "*.ini",
        "-watch_delay",
        "60",
        "-no-restart",
    ]);
    assert_eq!(pids(&d.wait_running("watched"))[0], fourth);
    std::fs::write(app.join("config/settings.ini"), "y").unwrap();
    pid_after(fourth);

    // A worker from a file without `path` watches its file's directory.
    let site = app.join("site");
    std::fs::create_dir(&site).unwrap();
    let config = site.join("apm.conf");
    std::fs::write(
        &config,
        "worker { name filed; exec sleep; params 1013; watch pages; watch_delay 50; startup_grace 100; }\n",
    )
    .unwrap();
    d.ok(&["load", config.to_str().unwrap()]);
    let filed = pids(&d.wait_running("filed"))[0];
    std::fs::create_dir(site.join("pages")).unwrap();
    std::fs::write(site.join("pages/index.html"), "x").unwrap();
    wait_until(PATIENCE, "the file's worker to restart", || {
        d.worker("filed")
            .is_some_and(|w| w["status"] == "running" && pids(&w).first() != Some(&filed))
    });
}

#[test]
fn rolling_restarts_one_instance_at_a_time_and_stops_at_one_that_does_not_come_back() {
    let d = Daemon::new("rolling");
    let events = d.path("events");
    let broken = d.path("broken");
    // Each process says when it starts and when it is asked to stop; one
    // started while `broken` exists fails at once.
    let script = format!(
        "[ -e {broken} ] && exit 3; echo \"start $IDX $(date +%s%N)\" >> {events}; \
         trap 'echo \"stop $IDX $(date +%s%N)\" >> {events}; exit 0' TERM; sleep 1013 & wait $!"
    );
    d.run_sh(
        "rolled",
        &script,
        &[
            "-instances",
            "3",
            "-env_index",
            "IDX",
            "-rolling",
            "-rolling_delay",
            "600",
            "-startup_grace",
            "100",
        ],
    );
    let before = pids(&d.wait_running("rolled"));
    let seen = lines(&events).len();
    d.ok(&["restart", "rolled"]);
    // Answered once the last instance is back.
    let after = pids(&d.wait_running("rolled"));
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    let log: Vec<(String, u32, u128)> = lines(&events)[seen..]
        .iter()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (
                fields[0].to_owned(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect();
    let order: Vec<(&str, u32)> = log.iter().map(|(what, i, _)| (what.as_str(), *i)).collect();
    assert_eq!(
        order,
        [
            ("stop", 0),
            ("start", 0),
            ("stop", 1),
            ("start", 1),
            ("stop", 2),
            ("start", 2)
        ],
        "one at a time"
    );
    for pair in [(1, 2), (3, 4)] {
        let waited_ms = (log[pair.1].2 - log[pair.0].2) / 1_000_000;
        // startup_grace (running from then on) and rolling_delay make 700
        // ms from the spawn; the start line is written a little after it.
        assert!(
            waited_ms >= 500,
            "the next stop came {waited_ms} ms after the start"
        );
    }

    // A stopped worker has nothing to keep serving: all start at once.
    d.ok(&["stop", "rolled"]);
    let seen = lines(&events).len();
    d.ok(&["restart", "rolled"]);
    let starts: Vec<u128> = lines(&events)[seen..]
        .iter()
        .map(|line| line.split(' ').nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(starts.len(), 3, "{starts:?}");
    let spread_ms = (starts.iter().max().unwrap() - starts.iter().min().unwrap()) / 1_000_000;
    assert!(
        spread_ms < 600,
        "started {spread_ms} ms apart: one at a time"
    );
    let after = pids(&d.wait_running("rolled"));

    std::fs::write(&broken, "").unwrap();
    let failed = d.apm(&["restart", "rolled"]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let worker = d.worker("rolled").unwrap();
    let instances = worker["instances"].as_array().unwrap();
    assert_eq!(instances[0]["status"], "crashed", "{worker}");
    let kept: Vec<Value> = instances[1..].iter().map(|i| i["pid"].clone()).collect();
    assert_eq!(kept, [after[1], after[2]], "the others keep serving");
    let daemon_log = d.daemon_log();
    assert!(
        daemon_log
            .contains("rolled: rolling restart stopped: instance 0 did not come back (crashed)"),
        "{daemon_log}"
    );
}

#[test]
fn a_rolling_restart_of_a_proxied_worker_loses_no_request() {
    let d = Daemon::new("rolling-proxy");
    // An app that takes a while to listen: running is not serving yet.
    let app = d.write(
        "app.py",
        &PORT_APP.replace(
            "http.server.HTTPServer(",
            "import time; time.sleep(0.5); http.server.HTTPServer(",
        ),
    );
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    d.run_port_app(
        "web",
        &app,
        &server,
        &[
            "-instances",
            "2",
            "-rolling",
            "-rolling_delay",
            "100",
            "-drain_timeout",
            "1000",
            "-startup_grace",
            "100",
        ],
    );
    d.wait_serving("web");
    let before = pids(&d.worker("web").unwrap());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(http_get(port).map_or(0, |(status, _)| status));
            }
            statuses
        })
    };
    d.ok(&["restart", "web"]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = client.join().unwrap();
    let after = pids(&d.worker("web").unwrap());
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty() && statuses.len() > 10,
        "{} of {} requests failed, the first with {:?}",
        failed.len(),
        statuses.len(),
        failed.first()
    );
}

const HEALTH_APP: &str = r#"
import http.server, os
sick = os.path.join(os.environ["SICK_DIR"], "sick-" + os.environ["APM_INDEX"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = 503 if os.path.exists(sick) else 200
        # Written whole under another name and renamed, so that the test
        # never reads a probe's file between its truncation and its write.
        probe = sick.replace("sick-", "probe-")
        with open(probe + ".new", "w") as seen:
            seen.write("%s %s" % (self.path, self.headers.get("Host")))
        os.replace(probe + ".new", probe)
        body = b"ok\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
if os.environ.get("CERT"):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// Waits until every instance of the worker has passed a health check.
fn wait_healthy(d: &Daemon, name: &str) -> Vec<u32> {
    wait_for("every instance to be healthy", || {
        let worker = d.worker(name)?;
        let instances = worker["instances"].as_array()?;
        instances
            .iter()
            .all(|i| i["healthy"] == true && i["status"] == "running")
            .then(|| pids(&worker))
    })
}

#[test]
fn an_instance_failing_its_pull_health_checks_is_restarted_alone() {
    let d = Daemon::new("health-pull");
    let app = d.write("health.py", HEALTH_APP);
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let sick_dir = format!("SICK_DIR={}", d.dir().display());
    d.run_port_app(
        "web",
        &app,
        &server,
        &[
            "-instances",
            "2",
            "-env_index",
            "APM_INDEX",
            "-env",
            &sick_dir,
            // Each instance is checked on its own port, not this one.
            "-health_check",
            "http://localhost:3000/health",
            "-health_check_interval",
            "100",
            "-health_check_threshold",
            "2",
            "-startup_grace",
            "100",
        ],
    );
    let before = wait_healthy(&d, "web");
    let info = stdout(&d.ok(&["info", "web"]));
    assert!(info.contains(", serving, healthy"), "{info}");
    std::fs::write(d.dir().join("sick-1"), "").unwrap();
    d.wait_daemon_log("web#1: unhealthy (2 failed health check(s) in a row, the last: answered 503 Service Unavailable); restarting it");
    std::fs::remove_file(d.dir().join("sick-1")).unwrap();
    let after = wait_healthy(&d, "web");
    assert_eq!(after[0], before[0], "the healthy instance is left alone");
    assert_ne!(after[1], before[1]);
    let log = d.daemon_log();
    assert!(!log.contains("web#0: unhealthy"), "{log}");
    // Each instance got the URL's path and Host on its own port.
    for index in 0..2 {
        let seen = std::fs::read_to_string(d.dir().join(format!("probe-{index}"))).unwrap();
        assert_eq!(seen, "/health localhost:3000");
    }

    // An https:// URL is probed over TLS, the app's self-signed certificate
    // and all, at the URL itself when the worker has no `upstream port`.
    if !certs::self_signed(d.dir(), "app.key", "app.pem", "/CN=app") {
        prerequisite_missing("openssl could not make a certificate: the https probe is not tested");
        return;
    }
    let tls_port = free_port();
    let env: Vec<String> = [
        format!("PORT={tls_port}"),
        "APM_INDEX=tls".to_owned(),
        format!("CERT={}", d.path("app.pem")),
        format!("KEY={}", d.path("app.key")),
    ]
    .into_iter()
    .chain(std::iter::once(sick_dir.clone()))
    .collect();
    let mut args = vec!["run", "python3", app.to_str().unwrap(), "-name", "secure"];
    for pair in &env {
        args.extend(["-env", pair.as_str()]);
    }
    let url = format!("https://127.0.0.1:{tls_port}/ready");
    args.extend([
        "-health_check",
        &url,
        "-health_check_interval",
        "100",
        "-startup_grace",
        "2000",
    ]);
    d.ok(&args);
    wait_healthy(&d, "secure");
    let seen = std::fs::read_to_string(d.dir().join("probe-tls")).unwrap();
    assert_eq!(seen, format!("/ready 127.0.0.1:{tls_port}"));
}

#[test]
fn an_instance_that_stops_calling_apm_health_url_is_restarted() {
    let d = Daemon::new("health-push");
    let stop = d.path("stop-checking-in");
    let script = d.write(
        "pusher.py",
        &format!(
            "import os, time, urllib.request\n\
             url = os.environ['APM_HEALTH_URL']\n\
             while True:\n\
             \x20   if not os.path.exists({stop:?}):\n\
             \x20       urllib.request.urlopen(url).read()\n\
             \x20   time.sleep(0.05)\n"
        ),
    );
    d.ok(&[
        "run",
        "python3",
        script.to_str().unwrap(),
        "-name",
        "pusher",
        "-health_check",
        "on",
        "-health_check_interval",
        "1000",
        "-health_check_threshold",
        "2",
        "-startup_grace",
        "100",
    ]);
    let first = wait_healthy(&d, "pusher")[0];
    // The endpoint knows this process's token and no other.
    let env: Value = serde_json::from_str(&stdout(&d.ok(&["env", "pusher", "--json"]))).unwrap();
    let url = env["APM_HEALTH_URL"].as_str().unwrap().to_owned();
    let (authority, token) = url
        .strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.split_once('/'))
        .unwrap();
    let endpoint: u16 = authority.parse().unwrap();
    let ask = |path: &str| {
        http_raw(
            endpoint,
            &format!("GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    };
    assert!(ask(token).starts_with("HTTP/1.1 204"), "{}", ask(token));
    assert!(ask("0123456789abcdef0123456789abcdef").starts_with("HTTP/1.1 404"));
    assert_eq!(token.len(), 32);

    // The interval applies to the running check at once.
    d.ok(&[
        "update",
        "pusher",
        "-health_check_interval",
        "400",
        "-no-restart",
    ]);
    assert_eq!(pids(&d.worker("pusher").unwrap())[0], first);
    std::fs::write(&stop, "").unwrap();
    d.wait_daemon_log("pusher#0: unhealthy (2 failed health check(s) in a row, the last: no call to APM_HEALTH_URL in 400 ms); restarting it");
    std::fs::remove_file(&stop).unwrap();
    let second = wait_healthy(&d, "pusher")[0];
    assert_ne!(first, second);
    // The old process's token is gone with it.
    assert!(ask(token).starts_with("HTTP/1.1 404"));
}

#[test]
fn syslog_sends_each_line_as_an_rfc_5424_message_over_udp_and_tcp() {
    use std::io::Read;
    let d = Daemon::new("syslog");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(PATIENCE)).unwrap();
    let udp_url = format!("syslog://{}", udp.local_addr().unwrap());
    let script = "printf '\\033[31mred\\033[0m line\\n'; echo oops >&2; exec sleep 1017";
    d.run_sh(
        "sys",
        script,
        &[
            "-syslog",
            &udp_url,
            "-syslog_tag",
            "my app",
            "-startup_grace",
            "100",
        ],
    );
    let pid = pids(&d.wait_running("sys"))[0];
    let mut datagrams: Vec<String> = (0..2)
        .map(|_| {
            let mut buffer = [0u8; 2048];
            let n = udp.recv(&mut buffer).expect("a datagram");
            String::from_utf8_lossy(&buffer[..n]).into_owned()
        })
        .collect();
    datagrams.sort();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let expect = |pri: u8, text: &str, message: &str| {
        let fields: Vec<&str> = message.splitn(8, ' ').collect();
        assert_eq!(fields[0], format!("<{pri}>1"), "{message}");
        assert!(fields[1].ends_with('Z'), "an RFC 3339 time: {message}");
        assert_eq!(
            fields[2..7],
            [host.trim(), "myapp", &pid.to_string(), "-", "-"],
            "{message}"
        );
        assert_eq!(fields[7], text, "{message}");
    };
    // user.err for stderr, user.info for stdout; no escape codes.
    expect(11, "oops", &datagrams[0]);
    expect(14, "red line", &datagrams[1]);
    // The log file keeps the colours (`strip_ansi` is off).
    assert!(d.log("sys", false).contains("\u{1b}[31mred"));

    // Over TCP, each message is framed by its length (RFC 6587).
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_url = format!("tcp://{}", tcp.local_addr().unwrap());
    d.run_sh(
        "framed",
        "echo one; echo two; exec sleep 1017",
        &["-syslog", &tcp_url, "-startup_grace", "100"],
    );
    let (mut stream, _) = tcp.accept().unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut received = String::new();
    let mut buffer = [0u8; 1024];
    while !received.ends_with(" - - two") {
        let n = stream.read(&mut buffer).expect("the messages");
        assert!(n > 0, "closed after {received:?}");
        received.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    let (length, rest) = received.split_once(' ').unwrap();
    let first = &rest[..length.parse::<usize>().unwrap()];
    assert!(
        first.starts_with("<14>1 ") && first.contains(" framed ") && first.ends_with(" - - one"),
        "{received:?}"
    );
}

#[test]
fn statsd_reports_each_instances_gauges_over_udp() {
    let d = Daemon::new("statsd");
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(PATIENCE)).unwrap();
    let address = server.local_addr().unwrap();
    d.load(&format!(
        "worker {{\n    name metered;\n    exec sleep;\n    params 1019;\n    instances 2;\n    startup_grace 100;\n    statsd {{ host {address}; prefix \"my app\"; interval 100; }}\n}}\n"
    ));
    let pids = pids(&d.wait_running("metered"));
    let expected = |index: usize| {
        let memory = status_kib(pids[index], "VmRSS:") * 1024;
        move |lines: &[String]| {
            let gauge = |metric: &str| {
                let name = format!("my_app.metered.{index}.{metric}:");
                lines
                    .iter()
                    .find_map(|l| l.strip_prefix(&name)?.strip_suffix("|g"))
                    .map(str::to_owned)
            };
            gauge("up").as_deref() == Some("1")
                && gauge("restarts").as_deref() == Some("0")
                && gauge("cpu").is_some_and(|c| c.parse::<f64>().is_ok())
                && gauge("memory").is_some_and(|m| m.parse::<u64>().unwrap() * 2 > memory)
        }
    };
    let (first, second) = (expected(0), expected(1));
    // A report is a datagram of lines; both instances are in one.
    wait_until(PATIENCE, "a report of both running instances", || {
        let mut buffer = [0u8; 2048];
        let n = server.recv(&mut buffer).expect("a report");
        let lines: Vec<String> = String::from_utf8_lossy(&buffer[..n])
            .lines()
            .map(str::to_owned)
            .collect();
        first(&lines) && second(&lines)
    });
    // A stopped worker's instances are reported down.
    d.ok(&["stop", "metered"]);
    wait_until(PATIENCE, "a report of the stopped instances", || {
        let mut buffer = [0u8; 2048];
        let n = server.recv(&mut buffer).expect("a report");
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        text.contains("my_app.metered.0.up:0|g") && text.contains("my_app.metered.1.up:0|g")
    });
}

#[test]
fn memory_limit_puts_each_instance_in_a_cgroup_and_the_kernel_kills_one_over_it() {
    let d = Daemon::new("memory-limit");
    d.run_sh(
        "capped",
        "exec sleep 1021",
        &["-memory_limit", "48M", "-startup_grace", "100"],
    );
    let pid = pids(&d.wait_running("capped"))[0];
    if d.daemon_log().contains("memory_limit is not enforced") {
        prerequisite_missing(&format!("no memory cgroup here\n{}", d.daemon_log()));
        return;
    }
    // The process runs in a group of its own with the limit.
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let group = own
        .lines()
        .find_map(|l| {
            let (_, path) = l.split_once(":memory:").or_else(|| l.split_once("0::"))?;
            path.contains("-capped-0").then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("in no group of its own: {own}"));
    let dir = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|root| Path::new(root).join(group.trim_start_matches('/')))
        .find(|dir| dir.is_dir())
        .unwrap();
    let limit = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|file| std::fs::read_to_string(dir.join(file)).ok())
        .unwrap();
    assert_eq!(limit.trim(), (48 * 1024 * 1024).to_string());

    // One that goes over it is killed, said, and restarted by its policy.
    d.ok(&[
        "run",
        "python3",
        "-c",
        "import time; x = bytearray(200 * 1024 * 1024); time.sleep(1000)",
        "-name",
        "greedy",
        "-memory_limit",
        "48M",
        "-restart_err",
        "-err_delay",
        "100",
        "-startup_grace",
        "0",
    ]);
    d.wait_daemon_log(
        "greedy#0: killed by the kernel for going over memory_limit (50331648 bytes)",
    );
    wait_until(PATIENCE, "greedy to be restarted", || {
        d.worker("greedy").is_some_and(|w| restarts(&w) > 0)
    });
    d.ok(&["remove", "greedy"]);
    assert!(dir.exists());
    d.ok(&["exit", "daemon"]);
    assert!(!dir.exists(), "the groups go with the daemon");
}

#[test]
fn augur_reads_a_failed_start_and_lists_every_missing_dependency() {
    let d = Daemon::new("augur");
    let project = d.dir().join("api");
    std::fs::create_dir_all(project.join("node_modules/express")).unwrap();
    std::fs::write(project.join("node_modules/express/package.json"), "{}").unwrap();
    std::fs::write(
        project.join("package.json"),
        r#"{"dependencies": {"express": "4", "redis": "4", "ws": "8", "axios": "1"}}"#,
    )
    .unwrap();
    let path = project.display().to_string();
    // What Node prints when a dependency is missing, without needing Node.
    let failed = d.apm(&[
        "run",
        "sh",
        "-c",
        "echo \"Error: Cannot find module 'redis'\" >&2; echo \"  code: 'MODULE_NOT_FOUND',\" >&2; exit 1",
        "-name",
        "api",
        "-path",
        &path,
    ]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    let out = stdout(&failed);
    assert!(
        out.contains("  → missing node module redis — run npm install\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  → augur — also missing (2): ws axios   → cd {path} && npm install ws axios\n"
        )),
        "{out}"
    );
    // With augur_full_scan, a project missing dependencies is not started.
    let preflight = d.apm(&[
        "run",
        "sh",
        "-c",
        "echo started; exec sleep 1023",
        "-name",
        "checked",
        "-path",
        &path,
        "-augur_full_scan",
        "-startup_grace",
        "100",
    ]);
    assert_eq!(preflight.status.code(), Some(1), "{}", describe(&preflight));
    let out = stdout(&preflight);
    assert!(
        out.contains("augur_full_scan: 3 declared dependencies are not installed (not started)")
            && out.contains("augur — also missing (3): redis ws axios"),
        "{out}"
    );
    assert!(!d.log("checked", false).contains("started"));
    for module in ["redis", "ws", "axios"] {
        std::fs::create_dir_all(project.join("node_modules").join(module)).unwrap();
        std::fs::write(
            project
                .join("node_modules")
                .join(module)
                .join("package.json"),
            "{}",
        )
        .unwrap();
    }
    d.ok(&["start", "checked"]);
    d.wait_running("checked");

    // A real interpreter's failure.
    let python = d.apm(&[
        "run",
        "python3",
        "-c",
        "import apm_augur_absent_module",
        "-name",
        "py",
    ]);
    assert!(
        stdout(&python)
            .contains("  → missing Python module apm_augur_absent_module — pip install it"),
        "{}",
        describe(&python)
    );
}

#[test]
fn monitor_redraws_every_instance_until_its_count() {
    let d = Daemon::new("monitor");
    d.run_sh(
        "watched",
        "exec sleep 1025",
        &["-instances", "2", "-startup_grace", "100"],
    );
    let pids = pids(&d.wait_running("watched"));
    let started = Instant::now();
    let out = stdout(&d.ok(&["monitor", "--interval", "200ms", "--count", "3"]));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "it waits between frames"
    );
    let frames: Vec<&str> = out.split("apm monitor — ").skip(1).collect();
    assert_eq!(frames.len(), 3, "{out}");
    for frame in frames {
        for (index, pid) in pids.iter().enumerate() {
            let row = frame
                .lines()
                .find(|l| l.starts_with(&format!("watched#{index} ")))
                .unwrap_or_else(|| panic!("no row for instance {index}: {frame}"));
            let cells: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cells[1..3], ["running", pid.to_string().as_str()], "{row}");
        }
    }
    let refused = d.apm(&["monitor", "--interval", "0"]);
    assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
}

/// `METHOD PATH` to the GUI with extra header lines; the whole answer.
pub(crate) fn gui_request(port: u16, method: &str, path: &str, headers: &str) -> String {
    http_raw(
        port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}

#[test]
fn the_gui_serves_its_dashboard_and_api_and_asks_for_its_password() {
    let d = Daemon::new("gui");
    let port = free_port();
    std::fs::create_dir_all(&d.home).unwrap();
    std::fs::write(
        d.home.join("config.conf"),
        format!("daemon {{ gui_port {port}; gui_bind 127.0.0.1; }}\n"),
    )
    .unwrap();
    d.run_sh(
        "shown",
        "echo hello-gui; exec sleep 1027",
        &["-startup_grace", "100"],
    );
    let first = pids(&d.wait_running("shown"))[0];
    wait_until(PATIENCE, "the GUI to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Without a password, every request carries the token of `$APM_HOME`.
    let token = std::fs::read_to_string(d.home.join("gui.token")).unwrap();
    let auth = format!("X-Apm-Token: {token}\r\n");
    let page = gui_request(port, "GET", "/", &auth);
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("<title>apm</title>"),
        "{page}"
    );
    if have_node() {
        // The page's script at least parses.
        let script = page
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .unwrap()
            .0;
        let file = d.write("gui.js", script);
        let checked = run({
            let mut node = Command::new("node");
            node.arg("--check").arg(&file);
            node
        });
        assert!(checked.status.success(), "{}", describe(&checked));
    }
    let (_, body) = gui_request(port, "GET", "/api/workers", &auth)
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap();
    let listing: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listing["workers"][0]["name"], "shown", "{listing}");
    wait_until(PATIENCE, "the log to show the line", || {
        gui_request(port, "GET", "/api/workers/shown/logs", &auth).contains("hello-gui")
    });
    // A page whose host name was made to resolve to 127.0.0.1 is refused.
    let rebound = http_raw(
        port,
        "GET /api/workers HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
    );
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let local = http_raw(
        port,
        &format!("GET /api/workers HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"),
    );
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
    // A change needs the header a page of another site cannot send.
    let forged = gui_request(port, "POST", "/api/workers/shown/restart", &auth);
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    let restarted = gui_request(
        port,
        "POST",
        "/api/workers/shown/restart",
        &format!("X-Apm-Gui: 1\r\n{auth}"),
    );
    assert!(restarted.starts_with("HTTP/1.1 200"), "{restarted}");
    assert_ne!(pids(&d.wait_running("shown"))[0], first);

    // `apm gui stop` closes it, `apm gui` opens it again.
    assert!(stdout(&d.ok(&["gui", "stop"])).contains("is stopped"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let url = stdout(&d.ok(&["gui"]));
    assert_eq!(
        url.trim(),
        format!("apm GUI: http://127.0.0.1:{port}/?token={token}")
    );

    // A file that sets a password restarts it behind the password.
    d.load(&format!(
        "daemon {{ gui_port {port}; gui_bind 127.0.0.1; gui_password s3cret; }}\n"
    ));
    let asked = gui_request(port, "GET", "/api/workers", "");
    assert!(
        asked.starts_with("HTTP/1.1 401")
            && asked.to_lowercase().contains("www-authenticate: basic"),
        "{asked}"
    );
    let wrong = gui_request(port, "GET", "/", "Authorization: Basic dTp3cm9uZw==\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let right = gui_request(port, "GET", "/", "Authorization: Basic OnMzY3JldA==\r\n");
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");

    // All interfaces without a password are refused; the running GUI stays.
    std::fs::write(
        d.dir().join("open.conf"),
        format!("daemon {{ gui_port {}; }}\n", free_port()),
    )
    .unwrap();
    d.ok(&["load", d.path("open.conf").as_str()]);
    d.wait_daemon_log("GUI not started: the GUI would listen on 0.0.0.0 without a password");
    let still = gui_request(port, "GET", "/", "Authorization: Basic OnMzY3JldA==\r\n");
    assert!(still.starts_with("HTTP/1.1 200"), "{still}");
}

/// A config that takes a while to compile (65,536 inclusions, just under
/// the bound) does not stall the proxy: the daemon compiles it off the
/// thread that carries the listeners. It used to stall every listener for
/// the whole compile.
#[test]
fn loading_a_slow_config_does_not_stall_the_proxy() {
    let d = Daemon::new("slow_compile");
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    // An instance that never listens: the proxy itself answers 503.
    d.ok(&[
        "run",
        "sleep",
        "1000",
        "-name",
        "front",
        "-upstream",
        "port",
        "-server",
        &server,
    ]);
    wait_for("the listener", || http_get(port));
    for level in 0..15 {
        d.write(
            &format!("l{level}.conf"),
            &format!(
                "include l{next}.conf;\ninclude l{next}.conf;\n",
                next = level + 1
            ),
        );
    }
    d.write("l15.conf", "daemon { }\n");
    let config = d.write(
        "slow.conf",
        "include l0.conf;\nworker { name slow; exec sleep; params 1000; }\n",
    );
    let started = Instant::now();
    let mut load = d
        .command(&["load", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while load.try_wait().unwrap().is_none() {
        let asked = Instant::now();
        assert!(http_get(port).is_some(), "the listener stopped answering");
        slowest = slowest.max(asked.elapsed());
        answered += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load never ended"
        );
    }
    let loading = started.elapsed();
    let output = load.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    // The old daemon stalled for the whole compile; without one to overlap,
    // the test would prove nothing.
    assert!(
        loading >= Duration::from_millis(300),
        "the load took only {loading:?}: make the config slower"
    );
    assert!(
        slowest < Duration::from_millis(200) && slowest < loading / 2,
        "the proxy took {slowest:?} to answer while a {loading:?} load compiled ({answered} answers)"
    );
}

/// `daemon { }` is part of a reload's plan: `apm check` and `--dry-run`
/// show a changed `gui_port`, the reload starts the GUI without a daemon
/// restart, and taking the port back to 0 stops the GUI this file started.
/// A reload used to leave the GUI as the daemon's start had set it.
#[test]
fn a_reload_plans_and_applies_the_daemon_block() {
    let d = Daemon::new("daemonplan");
    let port = free_port();
    let config = d.write(
        "app.conf",
        "worker { name w; exec sleep; params 1031; startup_grace 100; }\n",
    );
    let file = config.to_str().unwrap();
    d.ok(&["load", file]);
    d.write(
        "app.conf",
        &format!(
            "daemon {{ gui_port {port}; gui_bind 127.0.0.1; }}\n\
             worker {{ name w; exec sleep; params 1031; startup_grace 100; }}\n"
        ),
    );
    let shown = format!(
        "~ daemon settings, applied live: gui_port 0 → {port}; gui_bind 0.0.0.0 → 127.0.0.1"
    );
    let check = stdout(&d.ok(&["check", file]));
    assert!(check.contains(&shown), "{check}");
    let dry = stdout(&d.ok(&["reload", file, "--dry-run"]));
    assert!(dry.contains(&shown), "{dry}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "--dry-run applies nothing"
    );
    let reload = stdout(&d.ok(&["reload", file]));
    assert!(reload.contains(&shown), "{reload}");
    wait_until(PATIENCE, "the GUI to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let json: Value =
        serde_json::from_str(&stdout(&d.ok(&["reload", file, "--dry-run", "--json"]))).unwrap();
    assert_eq!(json[0]["plan"]["daemon"], serde_json::json!([]), "{json}");

    d.write(
        "app.conf",
        "worker { name w; exec sleep; params 1031; startup_grace 100; }\n",
    );
    let reload = stdout(&d.ok(&["reload", file]));
    assert!(reload.contains(&format!("gui_port {port} → 0")), "{reload}");
    wait_until(PATIENCE, "the GUI to close", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
}
