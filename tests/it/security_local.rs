//! What a hostile local user tries against a root daemon and its CLI
//! (issue 23, local users): squatting the control socket's name, the
//! dashboard without a secret, descriptors leaking into workers,
//! `allow_group`, a flood of refused connections in the daemon log, and
//! an instance's port taken before the instance binds it.
//! The attacker runs as uid 65534 through `setpriv`.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::harness::*;

/// The system's Python, which another user may run (a pyenv shim in
/// root's home may not be).
const PYTHON: &str = "/usr/bin/python3";

/// Whether the tests can act as another user: root, with `setpriv` and
/// the system's Python.
fn can_be_nobody() -> bool {
    if !std::path::Path::new(PYTHON).exists() {
        prerequisite_missing("no /usr/bin/python3 for the attacker's scripts");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        prerequisite_missing("not root: another user's attacks cannot be played");
        return false;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        prerequisite_missing("setpriv (util-linux) is not installed");
        return false;
    }
    true
}

/// `setpriv` to uid and gid 65534 without supplementary groups, then `program`.
fn as_nobody(program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", program])
        .current_dir("/")
        .stdin(Stdio::null());
    command
}

/// A process of uid 65534 holding a daemon's socket name: it binds the
/// name and, when `listening`, accepts connections and prints what each
/// sent before it closed.
struct Squatter {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

const SQUATTER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind("\0" + sys.argv[1])
listening = sys.argv[2] == "listen"
if listening:
    s.listen(16)
print("ready", flush=True)
while listening:
    c, _ = s.accept()
    c.settimeout(5)
    got = b""
    try:
        while True:
            data = c.recv(65536)
            if not data:
                break
            got += data
    except socket.timeout:
        pass
    print("received %d bytes %r" % (len(got), got), flush=True)
    c.close()
sys.stdin.read()
"#;

impl Squatter {
    fn start(socket: &str, listening: bool) -> Squatter {
        Squatter::run(
            SQUATTER,
            &[socket, if listening { "listen" } else { "bind" }],
        )
    }

    /// uid 65534 running the Python `script` with `args`; it prints
    /// `ready` once it holds what it squats.
    fn run(script: &str, args: &[&str]) -> Squatter {
        let mut child = as_nobody(PYTHON)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let squatter = Squatter { child, lines };
        assert_eq!(squatter.next_line(), "ready");
        squatter
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("a line from the squatter")
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_cli_sends_nothing_to_another_users_process_on_the_daemons_socket_name() {
    if !can_be_nobody() {
        return;
    }
    let d = Daemon::new("squat");
    let squatter = Squatter::start(&d.socket, true);
    // A request that carries a secret in its environment.
    let output = d.apm(&[
        "run",
        "sleep",
        "1101",
        "-name",
        "secretive",
        "-env",
        "API_TOKEN=hunter2",
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let text = stderr(&output);
    assert!(
        text.contains("uid 65534 (nobody)") && text.contains("nothing was sent"),
        "the message names who answered and what happened: {text}"
    );
    assert!(text.contains("APM_SOCKET"), "and what to do: {text}");
    assert_eq!(
        squatter.next_line(),
        "received 0 bytes b''",
        "the squatter got a connection and not one byte of the request"
    );
    assert!(d.daemon_pid().is_none(), "no daemon was started behind it");
}

#[test]
fn a_daemon_that_finds_its_socket_name_taken_says_by_whom_and_the_cli_says_it_at_once() {
    if !can_be_nobody() {
        return;
    }
    let d = Daemon::new("squat-bind");
    // Bound without listening: connecting is refused, so the CLI starts a
    // daemon, which cannot have the name.
    let _squatter = Squatter::start(&d.socket, false);
    let started = std::time::Instant::now();
    let output = d.apm(&["ls"]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let text = stderr(&output);
    assert!(
        text.contains("the daemon it started ended")
            && text.contains(&format!("the socket name @{} is held by", d.socket))
            && text.contains("uid 65534 (nobody)"),
        "{text}"
    );
    // Not the 10 s the CLI gives a daemon that does not listen yet.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    // Run in the foreground it says the same and exits 1.
    let foreground = d.apm(&["daemon", "--foreground"]);
    assert_eq!(
        foreground.status.code(),
        Some(1),
        "{}",
        describe(&foreground)
    );
    assert!(
        stderr(&foreground).contains("uid 65534 (nobody)"),
        "{}",
        describe(&foreground)
    );
}

/// The descriptors `pid` has open, each with what it points to.
fn descriptors(pid: u32) -> Vec<(u32, String)> {
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|entry| {
            let fd = entry.file_name().to_str().unwrap().parse().unwrap();
            let target = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            (fd, target)
        })
        .collect();
    fds.sort();
    fds
}

#[test]
fn a_descriptor_open_in_the_shell_that_starts_the_daemon_reaches_no_worker() {
    let d = Daemon::new("fds");
    let secret = d.write("root-only", "the root-only secret\n");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The shell's `exec 7<FILE` leaves a descriptor without close-on-exec
    // in the CLI, which starts the daemon.
    let output = run({
        let mut shell = Command::new("sh");
        shell
            .args([
                "-c",
                "exec 7<\"$1\"; exec \"$0\" run sleep 1102 -name plain",
                env!("CARGO_BIN_EXE_apm"),
                secret.to_str().unwrap(),
            ])
            .current_dir(d.dir())
            .env("APM_HOME", &d.home)
            .env("APM_SOCKET", &d.socket)
            .stdin(Stdio::null());
        shell
    });
    assert!(output.status.success(), "{}", describe(&output));
    let leaked = |pid: u32| {
        descriptors(pid)
            .into_iter()
            .filter(|(_, target)| target.contains("root-only"))
            .collect::<Vec<_>>()
    };
    let daemon = d.daemon_pid().unwrap();
    assert!(leaked(daemon).is_empty(), "{:?}", descriptors(daemon));
    let [plain] = pids(&d.wait_running("plain"))[..] else {
        panic!("one instance")
    };
    let fds: Vec<u32> = descriptors(plain).into_iter().map(|(fd, _)| fd).collect();
    assert_eq!(fds, [0, 1, 2], "{:?}", descriptors(plain));
    // The same for a worker that runs as another user.
    let user = if nix::unistd::User::from_name("apmtest")
        .ok()
        .flatten()
        .is_some()
    {
        "apmtest"
    } else {
        "nobody"
    };
    d.ok(&[
        "run", "sleep", "1103", "-name", "other", "-user", user, "-path", "/",
    ]);
    let [other] = pids(&d.wait_running("other"))[..] else {
        panic!("one instance")
    };
    let fds: Vec<u32> = descriptors(other).into_iter().map(|(fd, _)| fd).collect();
    assert_eq!(fds, [0, 1, 2], "{:?}", descriptors(other));
    // A connector child got its channel (it serves only once it said
    // `ready` over it, which `wait_running` waits for), and nothing of the
    // caller's.
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/connector_echo.py");
    d.ok(&[
        "run",
        "python3",
        app.to_str().unwrap(),
        "-name",
        "connected",
        "-server",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    let [connected] = pids(&d.wait_running("connected"))[..] else {
        panic!("one instance")
    };
    let fds = descriptors(connected);
    assert!(
        fds.iter().any(|(_, target)| target.starts_with("socket:")),
        "{fds:?}"
    );
    assert!(leaked(connected).is_empty(), "{fds:?}");
}

#[test]
fn thousands_of_refused_connections_grow_the_daemon_log_by_a_few_lines() {
    if !can_be_nobody() {
        return;
    }
    let d = Daemon::new("refusals");
    d.ok(&["ls"]);
    let before = d.daemon_log().len();
    let flood = as_nobody(PYTHON)
        .args([
            "-c",
            "import socket, sys\n\
             for _ in range(3000):\n\
             \x20   s = socket.socket(socket.AF_UNIX)\n\
             \x20   s.connect('\\0' + sys.argv[1])\n\
             \x20   assert b'permission denied' in s.recv(65536)\n\
             \x20   s.close()\n\
             print('done')",
            &d.socket,
        ])
        .output()
        .unwrap();
    assert!(flood.status.success(), "{}", describe(&flood));
    // The daemon is still answering, and has logged every refusal it is
    // going to log by the time it answers this.
    d.ok(&["ls"]);
    let log = d.daemon_log();
    let grown = &log[before..];
    let refusals = grown.matches("refused a client of uid 65534").count();
    assert!(
        (1..=10).contains(&refusals),
        "{refusals} refusal lines:\n{grown}"
    );
    assert!(
        grown.len() < 2000,
        "the log grew by {} bytes:\n{grown}",
        grown.len()
    );
}

#[test]
fn the_daemon_log_is_rotated_past_its_size() {
    let d = Daemon::new("log-rotation");
    std::fs::create_dir_all(&d.home).unwrap();
    // A log as full as the daemon keeps it: its next line starts a new file.
    let full = "x".repeat(1023) + "\n";
    std::fs::write(d.home.join("apm.log"), full.repeat(10 * 1024)).unwrap();
    d.ok(&["ls"]);
    let rotated = std::fs::read_to_string(d.home.join("apm.log.1")).unwrap();
    assert!(
        rotated.len() == 10 * 1024 * 1024 && rotated.lines().all(|l| l == full.trim_end()),
        "apm.log.1 holds the full file as it was ({} bytes)",
        rotated.len()
    );
    // The daemon goes on writing to the new file.
    d.wait_daemon_log("daemon started");
    d.ok(&["run", "sleep", "1104", "-name", "after-rotation"]);
    let log = d.daemon_log();
    assert!(log.len() < 64 * 1024, "{log}");
    assert!(!log.contains("xxxx"), "{log}");
}

/// The name of the group that is uid 65534's own, which makes that user a
/// member without changing the system's groups.
fn nobodys_group() -> Option<String> {
    let nobody = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(65534)).ok()??;
    Some(nix::unistd::Group::from_gid(nobody.gid).ok()??.name)
}

/// The CLI as uid 65534, with the test daemon's socket.
fn apm_as_nobody(d: &Daemon, args: &[&str]) -> std::process::Output {
    let mut command = d.command(args);
    command.current_dir("/").uid(65534).gid(65534);
    run(command)
}

#[test]
fn allow_group_members_control_a_root_daemons_workers_but_run_nothing_new_and_it_applies_live() {
    if !can_be_nobody() {
        return;
    }
    let Some(group) = nobodys_group() else {
        prerequisite_missing("uid 65534 has no group to be a member of");
        return;
    };
    let d = Daemon::new("allow-group");
    d.run_sh("kept", "exec sleep 1105", &["-startup_grace", "100"]);
    let first = pids(&d.wait_running("kept"))[0];
    let outsider = apm_as_nobody(&d, &["ls"]);
    assert_eq!(outsider.status.code(), Some(3), "{}", describe(&outsider));

    // Loading a file that sets it applies at once.
    let access = d.write(
        "access.conf",
        &format!("daemon {{ allow_group {group}; }}\n"),
    );
    d.ok(&["load", access.to_str().unwrap()]);
    let listed = apm_as_nobody(&d, &["ls"]);
    assert!(
        listed.status.success() && stdout(&listed).contains("kept"),
        "{}",
        describe(&listed)
    );
    let restarted = apm_as_nobody(&d, &["restart", "kept"]);
    assert!(restarted.status.success(), "{}", describe(&restarted));
    assert_ne!(pids(&d.wait_running("kept"))[0], first);

    // What runs is not theirs to choose.
    let denied: [&[&str]; 5] = [
        &["run", "id", "-name", "mine"],
        &["update", "kept", "-params", "1"],
        &["copy", "kept", "copied"],
        &["remove", "kept"],
        &["exit", "daemon"],
    ];
    for args in denied {
        let refused = apm_as_nobody(&d, args);
        assert_eq!(
            refused.status.code(),
            Some(3),
            "{args:?}: {}",
            describe(&refused)
        );
        let text = stderr(&refused);
        assert!(
            text.contains(&format!("members of group `{group}` (allow_group)"))
                && text.contains("run any command as root"),
            "{args:?}: the rule is named: {text}"
        );
    }
    assert_eq!(d.worker_names(), ["kept"]);
    assert_eq!(d.wait_running("kept")["name"], "kept");

    // Reloading the file without it takes it away, at once too.
    std::fs::write(&access, "daemon { }\n").unwrap();
    d.ok(&["reload", access.to_str().unwrap()]);
    let refused = apm_as_nobody(&d, &["ls"]);
    assert_eq!(refused.status.code(), Some(3), "{}", describe(&refused));
    d.wait_daemon_log("allow_group removed");

    // `apm check` says what members may do.
    std::fs::write(&access, format!("daemon {{ allow_group {group}; }}\n")).unwrap();
    let checked = d.ok(&["check", access.to_str().unwrap()]);
    assert!(
        stdout(&checked).contains("run any command as root"),
        "{}",
        describe(&checked)
    );
}

/// `GET PATH` to the GUI on `port` with extra header lines: the status.
fn gui_status(port: u16, path: &str, headers: &str) -> u16 {
    let answer = http_raw(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"),
    );
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// Wrong guesses sent one after another for two seconds: how many were
/// looked at (401) and how many refused unseen (429).
fn guess_for_two_seconds(port: u16, wrong: &str) -> (usize, usize) {
    let (mut looked_at, mut refused) = (0, 0);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < until {
        match gui_status(port, "/api/workers", wrong) {
            401 => looked_at += 1,
            429 => refused += 1,
            other => panic!("a wrong guess got {other}"),
        }
    }
    (looked_at, refused)
}

#[test]
fn the_gui_wants_its_token_on_loopback_and_a_burst_of_guesses_is_slowed_and_summarised() {
    if !can_be_nobody() {
        return;
    }
    let d = Daemon::new("gui-token");
    let port = free_port();
    d.load(&format!(
        "daemon {{ gui_port {port}; gui_bind 127.0.0.1; }}\n"
    ));
    let printed = stdout(&d.ok(&["gui"]));
    let token_file = d.home.join("gui.token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(
        printed.trim(),
        format!("apm GUI: http://127.0.0.1:{port}/?token={token}")
    );
    // Loopback is no boundary: any local user could connect.
    assert_eq!(gui_status(port, "/api/workers", ""), 401);
    assert_eq!(gui_status(port, "/", ""), 401);
    assert_eq!(
        gui_status(port, "/api/workers", &format!("X-Apm-Token: {token}\r\n")),
        200
    );
    assert_eq!(gui_status(port, &format!("/?token={token}"), ""), 200);
    // The token file is the daemon user's alone, from its creation.
    let meta = std::fs::metadata(&token_file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));
    let read = as_nobody("cat").arg(&token_file).output().unwrap();
    assert!(
        !read.status.success() && !String::from_utf8_lossy(&read.stdout).contains(&token),
        "{}",
        describe(&read)
    );

    // Guessing: a few looked at, the rest refused unseen.
    let (looked_at, refused) =
        guess_for_two_seconds(port, "X-Apm-Token: 0123456789abcdef0123456789abcdef\r\n");
    assert!(looked_at <= 8, "{looked_at} guesses looked at in 2 s");
    assert!(refused > looked_at, "{refused} refused");
    d.wait_daemon_log("wrong tokens in a row from 127.0.0.1");
    let gui_lines = d.daemon_log().matches("GUI: ").count();
    assert!(gui_lines <= 10, "{gui_lines} lines:\n{}", d.daemon_log());

    // With a password, the same for wrong passwords.
    d.load(&format!(
        "daemon {{ gui_port {port}; gui_bind 127.0.0.1; gui_password s3cret; }}\n"
    ));
    wait_until(PATIENCE, "the GUI to ask for its password", || {
        gui_status(port, "/", "Authorization: Basic OnMzY3JldA==\r\n") == 200
    });
    let (looked_at, refused) = guess_for_two_seconds(port, "Authorization: Basic dTp3cm9uZw==\r\n");
    assert!(looked_at <= 8, "{looked_at} passwords looked at in 2 s");
    assert!(refused > looked_at, "{refused} refused");
    d.wait_daemon_log("wrong passwords in a row from 127.0.0.1");
}

/// What the late binder does before it is `PORT_APP`: it says which port
/// it got, then binds it only once the test says so (a slow start, in
/// which another user may take it).
const AWAIT_GO: &str = r#"
import os, time
open("port.txt.tmp", "w").write(os.environ["PORT"])
os.rename("port.txt.tmp", "port.txt")
while not os.path.exists("go"):
    time.sleep(0.05)
"#;

/// uid 65534 listening on a port: it says `accepted` for each connection
/// and answers any request on it `squatter`.
const PORT_SQUATTER: &str = r#"
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def serve(c):
    c.settimeout(2)
    try:
        if c.recv(65536):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nsquatter\n")
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    print("accepted", flush=True)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

impl Squatter {
    /// How many connections it accepted from now for `window`.
    fn accepted_within(&self, window: Duration) -> usize {
        let until = std::time::Instant::now() + window;
        let mut accepted = 0;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "accepted" => accepted += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        accepted
    }

    /// Forgets what it said so far.
    fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

/// The port an instance of the late binder got, once it is not `before`.
fn late_binders_port(d: &Daemon, before: Option<u16>) -> u16 {
    wait_for("the instance's port", || {
        let port = std::fs::read_to_string(d.dir().join("port.txt"))
            .ok()?
            .parse()
            .ok()?;
        (Some(port) != before).then_some(port)
    })
}

/// A daemon whose worker `late` (with `settings`) binds its port only once
/// the test writes `go`: the daemon, the worker's front port and the
/// instance's port.
fn late_binder(name: &str, settings: &str) -> (Daemon, u16, u16) {
    let d = Daemon::new(name);
    d.write("app.py", &format!("{AWAIT_GO}{PORT_APP}"));
    let front = free_port();
    d.load(&format!(
        "worker {{ name late; exec python3; params app.py; upstream port; startup_grace 60; \
         {settings} server http://127.0.0.1:{front}; }}\n"
    ));
    let port = late_binders_port(&d, None);
    (d, front, port)
}

#[test]
fn another_user_listening_on_an_instances_port_before_it_gets_none_of_its_clients() {
    if !can_be_nobody() {
        return;
    }
    let (d, front, port) = late_binder("port-squat", "");
    // The port the daemon chose is where no outgoing connection lands.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let last: u16 = range.split_whitespace().nth(1).unwrap().parse().unwrap();
    if last < 65_000 {
        assert!(port > last, "{port} is inside the ephemeral range ..{last}");
    }
    // Awaiting a slow instance costs the daemon next to nothing.
    let daemon = d.daemon_pid().unwrap();
    let before = cpu_ticks(daemon);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(daemon) - before;
    assert!(
        spent < 30,
        "{spent} ticks in a second, awaiting an instance"
    );
    // Another user takes it first, and listens.
    let squatter = Squatter::run(PORT_SQUATTER, &[&port.to_string()]);
    assert_eq!(
        http_get(port).map(|(_, body)| body).as_deref(),
        Some("squatter\n")
    );
    let found = format!(
        "late#0: port {port} is listened on by uid 65534, neither the instance's user (uid 0) nor one of its processes: it gets no traffic"
    );
    d.wait_daemon_log(&found);
    // The worker's clients are not sent there, however long they ask, and
    // the stranger's port is looked at once a second.
    squatter.drain();
    let asking = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_millis(2500);
        while std::time::Instant::now() < until {
            let (status, body) = http_get(front).expect("an answer from the proxy");
            assert_eq!(status, 503, "{body}");
            assert!(!body.contains("squatter"), "{body}");
        }
    });
    let probes = squatter.accepted_within(Duration::from_millis(2500));
    asking.join().unwrap();
    assert!(probes <= 4, "{probes} probes in 2.5 s");
    assert_eq!(d.daemon_log().matches(&found).count(), 1, "said once");
    // An instance that moves on leaves its port alone. (The restart
    // answers once the new instance serves, which is at the end.)
    std::thread::scope(|scope| {
        let restarting = scope.spawn(|| d.ok(&["restart", "late"]));
        let second = late_binders_port(&d, Some(port));
        let stale_probes = squatter.accepted_within(Duration::from_millis(2500));
        assert!(stale_probes <= 1, "{stale_probes} probes of a port left");
        drop(squatter);
        // A stranger on the new port, who leaves before the instance binds
        // it: the instance is then served.
        let squatter = Squatter::run(PORT_SQUATTER, &[&second.to_string()]);
        d.wait_daemon_log(&format!(
            "late#0: port {second} is listened on by uid 65534"
        ));
        drop(squatter);
        d.write("go", "");
        restarting.join().unwrap();
    });
    let (status, body) = http_get(front).expect("an answer from the proxy");
    assert_eq!((status, body.as_str()), (200, "instance\n"));
}

#[test]
fn an_instance_whose_port_another_user_took_before_its_bind_starts_again_at_once_uncounted() {
    if !can_be_nobody() {
        return;
    }
    let (d, front, port) = late_binder("port-retake", "err_delay 30000;");
    let squatter = Squatter::run(PORT_SQUATTER, &[&port.to_string()]);
    d.wait_daemon_log(&format!("late#0: port {port} is listened on by uid 65534"));
    // Its bind fails; with `err_delay 30000`, a counted restart would come
    // only after the test's patience.
    d.write("go", "");
    d.wait_daemon_log(&format!(
        "late#0: port {port} was taken by another listener before the instance bound it; \
         started again at once on another port"
    ));
    let second = late_binders_port(&d, Some(port));
    assert_ne!(second, port);
    d.wait_serving("late");
    let (status, body) = http_get(front).expect("an answer from the proxy");
    assert_eq!((status, body.as_str()), (200, "instance\n"));
    let worker = d.worker("late").unwrap();
    assert_eq!(worker["instances"][0]["restarts"], 0, "{worker}");
    squatter.drain();
    assert_eq!(squatter.accepted_within(Duration::from_millis(300)), 0);
}

/// An `upstream port` app that answers `instance` on its port.
const PORT_APP: &str = r#"
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "9")
        self.end_headers()
        self.wfile.write(b"instance\n")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn an_instance_whose_command_switches_user_itself_is_served_on_its_port() {
    use std::os::unix::fs::PermissionsExt;
    if !can_be_nobody() {
        return;
    }
    let d = Daemon::new("port-setpriv");
    // uid 65534 reads the app from the test's directory.
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.write("app.py", PORT_APP);
    let front = free_port();
    d.load(&format!(
        "worker {{ name switched; exec setpriv; \
         params --reuid=65534 --regid=65534 --clear-groups {PYTHON} app.py; \
         upstream port; server http://127.0.0.1:{front}; }}\n"
    ));
    wait_until(PATIENCE, "the instance to serve", || {
        http_get(front).is_some_and(|(status, body)| status == 200 && body == "instance\n")
    });
    assert!(
        !d.daemon_log().contains("is listened on by"),
        "{}",
        d.daemon_log()
    );
}
