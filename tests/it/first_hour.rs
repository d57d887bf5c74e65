//! What a new user, a PM2 migrant and a crash-happy machine meet in their
//! first hour (issue 24): the environment and directory workers run with,
//! what `exit daemon` leaves, crashes at awkward instants, `run` again,
//! `saveconf` then `reload`, and starts that answer once traffic flows.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::harness::*;

/// A command line no other test (or other run of this test) uses.
fn unique_arg(base: u32) -> String {
    (base + std::process::id()).to_string()
}

/// `apm run` of a worker `api` that sleeps.
const RUN_API: [&str; 7] = [
    "run",
    "sleep",
    "1013",
    "-name",
    "api",
    "-startup_grace",
    "50",
];

/// The worker's instances that have a process.
fn live_pids(d: &Daemon, name: &str) -> Vec<u32> {
    d.worker(name).map(|w| pids(&w)).unwrap_or_default()
}

#[test]
fn a_workers_environment_is_its_callers_and_never_that_of_whoever_started_the_daemon() {
    let d = Daemon::new("env-callers");
    let secret = format!("secret-{}", std::process::id());
    let script =
        r#"echo "FOO=${FOO-unset} PATH=${PATH:+set} APM_HOME=${APM_HOME:+set}"; exec sleep 1013"#;
    let run_with = |name: &str, foo: Option<&str>| {
        let mut command = d.command(&["run", "sh", "-c", script, "-name", name]);
        if let Some(foo) = foo {
            command.env("FOO", foo);
        }
        let output = run(command);
        assert!(output.status.success(), "{}", describe(&output));
    };
    let says = |name: &str, text: &str| {
        wait_until(PATIENCE, &format!("{name} to say {text}"), || {
            d.log(name, false).contains(text)
        });
    };
    // The first command starts the daemon with FOO=first.
    run_with("a", Some("first"));
    run_with("b", Some(&secret));
    run_with("c", None);
    says("a", "FOO=first PATH=set APM_HOME=set");
    says("b", &format!("FOO={secret} PATH=set"));
    says("c", "FOO=unset PATH=set");
    // A file's worker gets the daemon's base set and its own `env`, not
    // the loading shell's variables.
    let config = d.write(
        "apm.conf",
        &format!(
            "worker {{\n    name filed;\n    exec sh;\n    params -c '{script}';\n    env BAR=bar;\n}}\n"
        ),
    );
    let mut load = d.command(&["load", config.to_str().unwrap()]);
    load.env("FOO", "loader");
    assert!(run(load).status.success());
    says("filed", "FOO=unset PATH=set APM_HOME=set");

    // The caller's environment is kept with the worker across a crash, in
    // a file only the daemon's user reads, and printed nowhere.
    d.wait_saved(&[("b", true, &live_pids(&d, "b"))]);
    let b = live_pids(&d, "b");
    d.kill_daemon();
    d.wait_running("b");
    wait_until(PATIENCE, "b to be restarted", || live_pids(&d, "b") != b);
    wait_until(PATIENCE, "b's new process to say its FOO", || {
        d.log("b", false).matches(&format!("FOO={secret}")).count() == 2
    });
    use std::os::unix::fs::PermissionsExt;
    let state = d.home.join("state.json");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "state.json holds callers' environments"
    );
    for shown in [
        stdout(&d.ok(&["ls", "--json"])),
        stdout(&d.ok(&["info", "b", "--json"])),
        stdout(&d.ok(&["info", "b"])),
        d.daemon_log(),
    ] {
        assert!(!shown.contains(&secret), "the secret was printed: {shown}");
    }

    // The other order: a daemon started by a command with FOO set gives it
    // to no worker.
    let other = Daemon::new("env-starter");
    let mut starter = other.command(&["ls"]);
    starter.env("FOO", "starter");
    assert!(run(starter).status.success());
    other.ok(&["run", "sh", "-c", script, "-name", "late"]);
    let config = other.write(
        "apm.conf",
        &format!("worker {{\n    name filed;\n    exec sh;\n    params -c '{script}';\n}}\n"),
    );
    other.ok(&["load", config.to_str().unwrap()]);
    for name in ["late", "filed"] {
        wait_until(PATIENCE, &format!("{name} to say FOO=unset"), || {
            other.log(name, false).contains("FOO=unset PATH=set")
        });
    }
}

#[test]
fn a_worker_without_path_runs_in_its_files_directory_and_apm_runs_in_the_callers() {
    let d = Daemon::new("workdir");
    let elsewhere = d.dir().join("elsewhere");
    let project = d.dir().join("project");
    let caller = d.dir().join("caller");
    for dir in [&elsewhere, &project, &caller] {
        std::fs::create_dir_all(dir).unwrap();
    }
    // The daemon starts from a directory that is neither of the two.
    let mut first = d.command(&["ls"]);
    first.current_dir(&elsewhere);
    assert!(run(first).status.success());
    let config = project.join("apm.conf");
    std::fs::write(
        &config,
        "worker {\n    name filed;\n    exec sh;\n    params -c 'echo \"in $(pwd)\"; exec sleep 1013';\n}\n",
    )
    .unwrap();
    d.ok(&["load", config.to_str().unwrap()]);
    let mut run_there = d.command(&[
        "run",
        "sh",
        "-c",
        "echo \"in $(pwd)\"; exec sleep 1013",
        "-name",
        "ran",
    ]);
    run_there.current_dir(&caller);
    assert!(run(run_there).status.success());
    for (name, dir) in [("filed", &project), ("ran", &caller)] {
        let line = format!("in {}", dir.display());
        wait_until(PATIENCE, &format!("{name} to say `{line}`"), || {
            d.log(name, false).lines().any(|l| l.ends_with(&line))
        });
    }
}

#[test]
fn exit_daemon_keeps_every_worker_stopped_and_says_so_while_a_crash_brings_them_back() {
    let d = Daemon::new("exit-sticks");
    let arg = unique_arg(410_000_000);
    // The per-user config, loaded at every daemon start, stays stopped too.
    std::fs::create_dir_all(&d.home).unwrap();
    std::fs::write(
        d.home.join("config.conf"),
        format!("worker {{\n    name own;\n    exec sleep;\n    params {arg};\n}}\n"),
    )
    .unwrap();
    d.ok(&["run", "sleep", &arg, "-name", "ran"]);
    d.wait_running("ran");
    d.wait_running("own");
    let exited = stdout(&d.ok(&["exit", "daemon"]));
    assert!(
        exited.contains("2 worker(s) stopped and kept stopped: own, ran")
            && exited.contains("apm start NAME"),
        "{exited}"
    );
    // Even `apm ls` starts a daemon: it lists them and starts nothing.
    for name in ["ran", "own"] {
        let worker = d.worker(name).unwrap();
        assert_eq!(worker["enabled"], false, "{worker}");
        assert_eq!(worker["status"], "stopped", "{worker}");
    }
    assert_eq!(processes_running(&["sleep", &arg]), Vec::<u32>::new());
    d.ok(&["start", "ran"]);
    d.wait_running("ran");
    // A crash keeps what was meant to run, as before.
    d.wait_saved(&[("ran", true, &live_pids(&d, "ran"))]);
    d.kill_daemon();
    d.wait_running("ran");
    assert_eq!(d.worker("own").unwrap()["enabled"], false);
}

/// Kills the daemon whose pid file says `pid` changed from `old`, after
/// `delay` (the instant of the crash is what is tested).
fn kill_new_daemon_after(d: &Daemon, old: Option<u32>, delay: Duration) {
    let pid = wait_for("a new daemon", || {
        d.daemon_pid().filter(|&p| Some(p) != old)
    });
    std::thread::sleep(delay);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    wait_until(PATIENCE, "the daemon to die", || !alive(pid));
}

#[test]
fn a_daemon_killed_at_any_instant_of_a_run_or_a_restore_leaves_no_process_behind() {
    let d = Daemon::new("crash-instants");
    let arg = unique_arg(420_000_000);
    let run_args = [
        "run",
        "sleep",
        &arg,
        "-name",
        "many",
        "-instances",
        "20",
        "-startup_grace",
        "50",
    ];
    let quiet = |args: &[&str]| {
        d.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    for delay_ms in [10, 25, 50] {
        let delay = Duration::from_millis(delay_ms);
        d.ok(&["ls"]);
        let old = d.daemon_pid();
        let cli = quiet(&run_args);
        std::thread::sleep(delay);
        let _ = kill(Pid::from_raw(old.unwrap() as i32), Signal::SIGKILL);
        wait_until(PATIENCE, "the daemon to die", || !alive(old.unwrap()));
        // The next daemon (the CLI's replay, or this `ls`, starts it) is
        // killed in turn while it restores.
        let listing = quiet(&["ls"]);
        kill_new_daemon_after(&d, old, delay);
        let _ = run_child(cli, CLI_TIMEOUT);
        let _ = run_child(listing, CLI_TIMEOUT);
        // The next command: a daemon that ends every leftover and brings
        // the worker back, exactly once.
        d.ok(&run_args);
        let worker = d.wait_running("many");
        assert_eq!(worker["enabled"], true, "{worker}");
        let mut listed = pids(&worker);
        listed.sort();
        wait_until(PATIENCE, "only the listed processes to run", || {
            let mut live = processes_running(&["sleep", &arg]);
            live.sort();
            live == listed
        });
        d.ok(&["exit", "daemon"]);
        assert_eq!(
            processes_running(&["sleep", &arg]),
            Vec::<u32>::new(),
            "after a crash {delay_ms} ms in, a process outlived `apm exit daemon`"
        );
        d.ok(&["remove", "many"]);
    }
}

#[test]
fn a_run_replayed_after_a_crash_answers_as_the_first_would_have() {
    let d = Daemon::new("replay");
    d.ok(&["ls"]);
    let old = d.daemon_pid();
    // The start report waits 6 s of startup grace: the crash comes while
    // the worker is registered and saved, well before the answer.
    let cli = d
        .command(&[
            "run",
            "sleep",
            "1013",
            "-name",
            "slow",
            "-startup_grace",
            "6000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_saved(&[("slow", true, &[])]);
    d.kill_daemon();
    let output = run_child(cli, CLI_TIMEOUT).expect("the CLI to end");
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    assert!(
        stdout(&output).contains("slow running"),
        "{}",
        describe(&output)
    );
    assert_ne!(d.daemon_pid(), old);
    assert_eq!(live_pids(&d, "slow").len(), 1);
}

/// A Python app that listens on `PORT` only after `delay` seconds.
fn slow_listener(d: &Daemon, delay: f64) -> std::path::PathBuf {
    d.write(
        "slow_listener.py",
        &format!(
            "import http.server, os, time\ntime.sleep({delay})\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200)\n        self.send_header('Content-Length', '2')\n        self.end_headers()\n        self.wfile.write(b'ok')\n    def log_message(self, *a):\n        pass\nhttp.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n"
        ),
    )
}

#[test]
fn load_answers_once_the_proxy_routes_to_the_instances() {
    let d = Daemon::new("routable");
    let app = slow_listener(&d, 0.7);
    let port = free_port();
    d.load(&format!(
        "worker {{\n    name web;\n    exec python3;\n    params {};\n    upstream port;\n    server http://127.0.0.1:{port};\n    instances 2;\n    startup_grace 50;\n}}\n",
        app.display()
    ));
    assert_eq!(
        http_get(port).map(|(status, _)| status),
        Some(200),
        "the first request after `apm load` returned"
    );
    // One that never listens is reported, without failing the start.
    let never = d.write("never.py", "import time\ntime.sleep(1000)\n");
    let other = free_port();
    let output = d.ok(&[
        "run",
        "python3",
        never.to_str().unwrap(),
        "-name",
        "deaf",
        "-upstream",
        "port",
        "-server",
        &format!("http://127.0.0.1:{other}"),
        "-startup_grace",
        "50",
    ]);
    assert!(
        stdout(&output).contains("but not taking traffic"),
        "{}",
        describe(&output)
    );
}

#[test]
fn restart_force_restarts_every_instance_at_once_under_rolling() {
    let d = Daemon::new("force-rolling");
    d.ok(&[
        "run",
        "sleep",
        "1013",
        "-name",
        "rolled",
        "-instances",
        "3",
        "-rolling",
        "-rolling_delay",
        "3s",
        "-startup_grace",
        "50",
    ]);
    let before = pids(&d.wait_running("rolled"));
    let started = std::time::Instant::now();
    d.ok(&["restart", "rolled", "--force"]);
    // Rolling would take two `rolling_delay`s (6 s) before it answered.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let after = pids(&d.wait_running("rolled"));
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "{before:?} → {after:?}"
    );
}

#[test]
fn run_again_with_a_name_changes_that_worker_as_the_reference_says() {
    let d = Daemon::new("run-again");
    let arg = unique_arg(430_000_000);
    d.ok(&["run", "sleep", &arg, "-name", "api", "-startup_grace", "50"]);
    let [first] = pids(&d.wait_running("api"))[..] else {
        panic!()
    };
    // More instances: the running one stays.
    d.ok(&[
        "run",
        "sleep",
        &arg,
        "-name",
        "api",
        "-instances",
        "3",
        "-startup_grace",
        "50",
    ]);
    let scaled = pids(&d.wait_running("api"));
    assert_eq!(scaled.len(), 3);
    assert!(scaled.contains(&first), "{first} in {scaled:?}");
    // Another program: restarted with it.
    d.ok(&RUN_API);
    let worker = d.wait_running("api");
    assert_eq!(pids(&worker).len(), 1);
    assert!(!pids(&worker).contains(&first));
    // A stopped one is started again.
    d.ok(&["stop", "api"]);
    d.ok(&RUN_API);
    d.wait_running("api");
    // A name that comes from the program's is not a wish to replace
    // another program of that name; the same call again changes nothing.
    d.ok(&["run", "sleep", "1013", "-startup_grace", "50"]);
    let [unnamed] = pids(&d.wait_running("sleep"))[..] else {
        panic!()
    };
    let other = d.apm(&["run", "sleep", "1019"]);
    assert_eq!(other.status.code(), Some(1), "{}", describe(&other));
    assert!(
        stderr(&other).contains("already exists"),
        "{}",
        describe(&other)
    );
    d.ok(&["run", "sleep", "1013", "-startup_grace", "50"]);
    assert_eq!(pids(&d.worker("sleep").unwrap()), [unnamed]);
    // A file's worker is changed in its file.
    d.load("worker {\n    name filed;\n    exec sleep;\n    params 1013;\n}\n");
    let refused = d.apm(&["run", "sleep", "1", "-name", "filed"]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        stderr(&refused).contains("was loaded from") && stderr(&refused).contains("apm reload"),
        "{}",
        describe(&refused)
    );
}

#[test]
fn saveconf_of_a_cli_worker_into_a_file_hands_it_to_that_file() {
    let d = Daemon::new("saveconf-attach");
    d.ok(&RUN_API);
    let [pid] = pids(&d.wait_running("api"))[..] else {
        panic!()
    };
    let file = d.path("api.conf");
    let saved = stdout(&d.ok(&["saveconf", "api", &file]));
    assert!(saved.contains("api now comes from"), "{saved}");
    assert_eq!(d.worker("api").unwrap()["origin"]["path"], file.as_str());
    // The reference's recipe: then manage it from the file.
    let reload = d.ok(&["reload", &file]);
    assert!(
        stdout(&reload).contains("1 unchanged"),
        "{}",
        describe(&reload)
    );
    assert_eq!(pids(&d.worker("api").unwrap()), [pid]);
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen("    exec", "    instances 2;\n    exec", 1),
    )
    .unwrap();
    d.ok(&["reload", &file]);
    let scaled = pids(&d.wait_running("api"));
    assert_eq!(scaled.len(), 2, "{scaled:?}");
    assert!(scaled.contains(&pid));
}

/// Loads a file of `count` workers `w0`… with `autostart false` (they
/// cost a restore its work, and no processes), once they are saved.
fn load_stopped_workers(d: &Daemon, count: usize) {
    let workers: String = (0..count)
        .map(|i| format!("worker {{\n    name w{i};\n    exec sleep;\n    params 1013;\n    autostart false;\n}}\n"))
        .collect();
    d.load(&workers);
    let last = format!("w{}", count - 1);
    d.wait_saved(&[(last.as_str(), false, &[])]);
}

#[test]
fn a_restore_compiles_each_config_file_once_however_many_workers_it_has() {
    let d = Daemon::new("restore-once");
    load_stopped_workers(&d, 300);
    d.kill_daemon();
    assert_eq!(d.worker_names().len(), 300);
    d.wait_daemon_log("restored 300 of 300 worker(s) (0 to run); config files compiled: 1");
}

#[test]
fn a_daemon_killed_in_the_middle_of_a_restore_forgets_no_worker() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::new("restore-killed");
    load_stopped_workers(&d, 600);
    let state = d.home.join("state.json");
    let inode = || std::fs::metadata(&state).map_or(0, |m| m.ino());
    for _ in 0..3 {
        d.kill_daemon();
        let written = inode();
        let listing = d
            .command(&["ls"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The new daemon is killed the moment it first replaces the state
        // file: were that in the middle of its restore, the file would
        // list only the workers registered so far.
        let deadline = std::time::Instant::now() + PATIENCE;
        while inode() == written {
            assert!(std::time::Instant::now() < deadline, "no state written");
            std::thread::sleep(Duration::from_micros(200));
        }
        let pid = d.daemon_pid().unwrap();
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        wait_until(PATIENCE, "the daemon to die", || !alive(pid));
        let _ = run_child(listing, CLI_TIMEOUT);
        assert_eq!(d.worker_names().len(), 600);
    }
}

#[test]
fn load_says_why_a_worker_is_not_started_and_that_the_gui_was_refused() {
    let d = Daemon::new("load-says");
    let port = free_port();
    let loaded = d.load(&format!(
        "daemon {{ gui_port {port}; }}\nworker {{\n    name later;\n    exec sleep;\n    params 1013;\n    autostart false;\n}}\n"
    ));
    let again = d.ok(&["load", loaded.to_str().unwrap()]);
    let text = stdout(&again);
    assert!(
        text.contains("later is registered, not started (autostart false)")
            && !text.contains("already running"),
        "{text}"
    );
    assert!(
        stderr(&again).contains("the GUI was not started")
            && stderr(&again).contains("gui_password"),
        "{}",
        describe(&again)
    );
}

#[test]
fn a_gui_started_from_a_loaded_file_comes_back_after_a_crash() {
    let d = Daemon::new("gui-back");
    let port = free_port();
    d.load(&format!(
        "daemon {{ gui_port {port}; gui_bind 127.0.0.1; }}\nworker {{\n    name w;\n    exec sleep;\n    params 1013;\n}}\n"
    ));
    let listening = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    wait_until(PATIENCE, "the GUI to listen", listening);
    d.wait_saved(&[("w", true, &live_pids(&d, "w"))]);
    d.kill_daemon();
    d.ok(&["ls"]);
    wait_until(PATIENCE, "the GUI to listen again", listening);
}

#[test]
fn memory_limit_under_a_daemon_not_run_as_root_is_said_on_the_terminal() {
    if !nix::unistd::geteuid().is_root() {
        crate::harness::prerequisite_missing("needs root to run a daemon as uid 65534");
        return;
    }
    let d = Daemon::new("memory-nonroot");
    nix::unistd::chown(
        d.dir(),
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    // A CLI only talks to a daemon of its own uid (or root's).
    let as_nobody = |args: &[&str]| {
        let mut command = d.command(args);
        command.uid(65534).gid(65534);
        run(command)
    };
    let output = as_nobody(&[
        "run",
        "sleep",
        "1013",
        "-name",
        "capped",
        "-memory_limit",
        "48M",
        "-startup_grace",
        "50",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        stdout(&output).contains("memory_limit is not enforced"),
        "{}",
        describe(&output)
    );
    let listing: Value = serde_json::from_slice(&as_nobody(&["ls", "--json"]).stdout).unwrap();
    assert_eq!(listing["workers"][0]["name"], "capped");
    assert!(as_nobody(&["exit", "daemon"]).status.success());
}
