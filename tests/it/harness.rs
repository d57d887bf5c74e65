//! What every daemon test needs: an isolated daemon (`Daemon`), waits with
//! deadlines, process inspection and small HTTP clients. Every test owns
//! its daemon, which is shut down and, failing that, killed with everything
//! it started when the test ends, pass or fail. Nothing waits a fixed time:
//! conditions are polled with generous deadlines, because CI has two loaded
//! cores. The daemons inherit the test's environment: `APM_PROXY_THREADS`
//! there sets how many proxy threads they serve on (`.ci/run` runs the
//! proxy's tests with 2 and with 1).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// How long to wait for anything that should happen soon.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);
/// How long one CLI call may take before the test gives up on it.
pub(crate) const CLI_TIMEOUT: Duration = Duration::from_secs(60);

// ───────────────────────────── harness ─────────────────────────────

/// A running `apm log -f`; it is killed when dropped.
pub(crate) struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    pub(crate) fn next_line(&self) -> String {
        self.lines.recv_timeout(PATIENCE).expect("a followed line")
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One isolated daemon: its own `APM_HOME` (inside a temporary directory that
/// also holds the test's files) and its own abstract socket name.
pub(crate) struct Daemon {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) home: PathBuf,
    pub(crate) socket: String,
}

impl Daemon {
    pub(crate) fn new(test: &str) -> Daemon {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::Builder::new()
            .prefix(&format!("apm-it-{test}-"))
            .tempdir()
            .unwrap();
        let home = dir.path().join("home");
        let socket = format!(
            "apm-it-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Daemon { dir, home, socket }
    }

    /// The temporary directory: the CLI's working directory and the place for files.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut command = self.command_of(env!("CARGO_BIN_EXE_apm"));
        command.args(args);
        command
    }

    /// Starts the daemon under the open-files limits a shell's `ulimit
    /// ULIMIT` sets (`-n 64`, `-S -n 256`).
    pub(crate) fn start_with_ulimit(&self, ulimit: &str) {
        let mut command = self.command_of("sh");
        command.args([
            "-c",
            &format!("ulimit {ulimit} && exec \"$0\" ls"),
            env!("CARGO_BIN_EXE_apm"),
        ]);
        let output = run(command);
        assert!(output.status.success(), "{}", describe(&output));
    }

    fn command_of(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(self.dir())
            .env("APM_HOME", &self.home)
            .env("APM_SOCKET", &self.socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// `apm run sh -c SCRIPT -name NAME FLAGS…`, which must succeed.
    pub(crate) fn run_sh(&self, name: &str, script: &str, flags: &[&str]) -> Output {
        let mut args = vec!["run", "sh", "-c", script, "-name", name];
        args.extend_from_slice(flags);
        self.ok(&args)
    }

    /// `apm run python3 APP -name NAME -upstream port -server SERVER FLAGS…`,
    /// which must succeed.
    pub(crate) fn run_port_app(
        &self,
        name: &str,
        app: &Path,
        server: &str,
        flags: &[&str],
    ) -> Output {
        let app = app.to_str().unwrap();
        let mut args = vec![
            "run",
            "python3",
            app,
            "-name",
            name,
            "-upstream",
            "port",
            "-server",
            server,
        ];
        args.extend_from_slice(flags);
        self.ok(&args)
    }

    /// The daemon's log as written so far (empty before it exists).
    pub(crate) fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.home.join("apm.log")).unwrap_or_default()
    }

    /// Waits until the daemon's log says `text`.
    /// Waits until every instance of the worker takes traffic.
    pub(crate) fn wait_serving(&self, name: &str) {
        wait_until(
            PATIENCE,
            &format!("every instance of {name} to serve"),
            || {
                self.worker(name).is_some_and(|w| {
                    w["instances"]
                        .as_array()
                        .is_some_and(|i| i.iter().all(|i| i["serving"] == true))
                })
            },
        );
    }

    pub(crate) fn wait_daemon_log(&self, text: &str) {
        wait_until(PATIENCE, &format!("the daemon log to say `{text}`"), || {
            self.daemon_log().contains(text)
        });
    }

    /// Runs the CLI and returns what it did.
    pub(crate) fn apm(&self, args: &[&str]) -> Output {
        run(self.command(args))
    }

    /// Runs the CLI and insists that it succeeds.
    pub(crate) fn ok(&self, args: &[&str]) -> Output {
        let output = self.apm(args);
        assert_eq!(
            output.status.code(),
            Some(0),
            "apm {args:?} failed:\n{}",
            describe(&output)
        );
        output
    }

    /// `apm ls --json`.
    pub(crate) fn list(&self) -> Value {
        let output = self.ok(&["ls", "--json"]);
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("apm ls --json: {e}:\n{}", describe(&output)))
    }

    pub(crate) fn worker(&self, name: &str) -> Option<Value> {
        self.list()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
    }

    pub(crate) fn worker_names(&self) -> Vec<String> {
        self.list()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the worker's instances all have `status`; returns the worker.
    pub(crate) fn wait_status(&self, name: &str, status: &str) -> Value {
        self.wait_instances(&format!("`{name}` to be {status}"), name, |i| {
            i["status"] == status
        })
    }

    /// Waits until the worker's instances all run and, when it has
    /// `server` lines, get traffic.
    pub(crate) fn wait_running(&self, name: &str) -> Value {
        self.wait_instances(&format!("`{name}` to be running and serving"), name, |i| {
            i["status"] == "running" && i["serving"] != false
        })
    }

    fn wait_instances(&self, what: &str, name: &str, ready: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || {
            self.worker(name).filter(|w| {
                let instances = w["instances"].as_array().unwrap();
                !instances.is_empty() && instances.iter().all(&ready)
            })
        })
    }

    /// The daemon's pid from `$APM_HOME/apm.pid`.
    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.home.join("apm.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills the daemon with SIGKILL, as a crash would, and waits until it
    /// is gone; returns its pid.
    pub(crate) fn kill_daemon(&self) -> u32 {
        let pid = self.daemon_pid().expect("a running daemon");
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        wait_until(PATIENCE, "the daemon to die", || !alive(pid));
        pid
    }

    /// `apm log …` with `-f` among `args`, its lines read as they come.
    pub(crate) fn follow_log(&self, args: &[&str]) -> Follower {
        let mut child = self.command(args).stdout(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Follower { child, lines }
    }

    /// Until the state file (written on a thread of its own, shortly after
    /// each change) says what a test about a daemon crash relies on: for
    /// each named worker, whether it should run and the pids it has.
    pub(crate) fn wait_saved(&self, expected: &[(&str, bool, &[u32])]) {
        wait_until(PATIENCE, "the state file to record the workers", || {
            let Some(state) = std::fs::read(self.home.join("state.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            else {
                return false;
            };
            let workers = state["workers"].as_array().cloned().unwrap_or_default();
            expected.iter().all(|(name, running, pids)| {
                workers.iter().any(|w| {
                    let saved: Vec<u64> = w["processes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p["pid"].as_u64())
                        .collect();
                    w["name"] == *name
                        && w["running"] == *running
                        && pids.iter().all(|pid| saved.contains(&u64::from(*pid)))
                })
            })
        });
    }

    /// `apm log NAME [--err] --lines 1000`.
    pub(crate) fn log(&self, name: &str, err: bool) -> String {
        let mut args = vec!["log", name, "--lines", "1000"];
        if err {
            args.push("--err");
        }
        stdout(&self.ok(&args))
    }

    /// Writes a file in the temporary directory and returns its path.
    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes `text` as `apm.conf` in the temporary directory and loads it.
    pub(crate) fn load(&self, text: &str) -> PathBuf {
        let config = self.write("apm.conf", text);
        self.ok(&["load", config.to_str().unwrap()]);
        config
    }

    /// A path in the temporary directory, as a string for scripts.
    pub(crate) fn path(&self, name: &str) -> String {
        self.dir().join(name).display().to_string()
    }

    /// Whether something listens on the socket (connecting starts nothing).
    pub(crate) fn socket_up(&self) -> bool {
        let address = SocketAddr::from_abstract_name(self.socket.as_bytes()).unwrap();
        UnixStream::connect_addr(&address).is_ok()
    }

    /// Every process that carries this daemon's `APM_HOME` in its
    /// environment: the daemon and every child it started.
    pub(crate) fn processes(&self) -> Vec<u32> {
        let marker = format!("APM_HOME={}", self.home.display()).into_bytes();
        all_pids()
            .into_iter()
            .filter(|&pid| pid != std::process::id())
            .filter(|&pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == marker))
            })
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.daemon_pid();
        // A graceful stop first; a CLI stuck on a broken daemon is killed.
        if let Ok(child) = self
            .command(&["exit", "daemon"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let _ = run_child(child, Duration::from_secs(20));
        }
        if let Some(pid) = pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if alive(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        // Whatever is left (children of a killed daemon): end it too.
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Runs a command to its end, with a watchdog.
pub(crate) fn run(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    run_child(child, CLI_TIMEOUT)
        .unwrap_or_else(|| panic!("{command:?} did not finish within {CLI_TIMEOUT:?}"))
}

pub(crate) fn run_child(child: std::process::Child, timeout: Duration) -> Option<Output> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.ok(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            None
        }
    }
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `note: ` lines of a command's output (`apm check`'s notes).
pub(crate) fn note_lines(output: &Output) -> Vec<String> {
    stdout(output)
        .lines()
        .filter(|l| l.starts_with("note: "))
        .map(str::to_owned)
        .collect()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub(crate) fn describe(output: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    )
}

/// Polls `condition` every 20 ms until it holds; panics after `timeout`.
pub(crate) fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it gives a value, within `PATIENCE`.
pub(crate) fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    wait_until(PATIENCE, what, || {
        found = f();
        found.is_some()
    });
    found.unwrap()
}

pub(crate) fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Fields of `/proc/PID/stat` after the command name: [0] is the state.
pub(crate) fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat[stat.rfind(')')? + 2..]
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    )
}

/// CPU time (user and system) `pid` has spent, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid).expect("a live process's stat");
    // utime and stime: fields 14 and 15 of the whole line (proc(5)).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Whether the process exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f[0] != "Z")
}

/// The process's start time in clock ticks since boot.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `ticks`.
pub(crate) fn same_process_alive(pid: u32, ticks: u64) -> bool {
    alive(pid) && start_ticks(pid) == Some(ticks)
}

/// Live processes whose process group is `pgid`.
pub(crate) fn group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f[0] != "Z" && f[2] == pgid.to_string()))
        .collect()
}

/// Live processes whose command line is exactly `argv`.
pub(crate) fn processes_running(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            alive(pid) && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted)
        })
        .collect()
}

pub(crate) fn pids(worker: &Value) -> Vec<u32> {
    worker["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

pub(crate) fn restarts(worker: &Value) -> u64 {
    worker["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap())
        .sum()
}

/// The lines of a file the children write to (empty when it does not exist yet).
pub(crate) fn lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Nanosecond timestamps a child wrote with `date +%s%N`, one per line.
pub(crate) fn stamps(path: &str) -> Vec<u128> {
    lines(path)
        .iter()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// A shell snippet that appends the current time in ns to `file`.
pub(crate) fn stamp(file: &str) -> String {
    format!("date +%s%N >> {file}")
}

pub(crate) fn free_port() -> u16 {
    // The port is free when asked, not held: two calls before anything binds
    // may get the same one from the kernel (a test that loads several
    // listeners at once saw E0021). No port is handed out twice in this run.
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// One HTTP/1.1 GET; the status code and body.
pub(crate) fn http_get(port: u16) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A client connection to a local port. Reads time out after 30 s, so a
/// daemon that never answers fails the test instead of hanging it.
pub(crate) fn connect(port: u16) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Sends `request` on a connection that stays open and reads its one
/// answer (with a `Content-Length`): its head and its body.
pub(crate) fn exchange(
    stream: &mut (impl std::io::Read + std::io::Write),
    request: &[u8],
) -> (String, String) {
    stream.write_all(request).unwrap();
    read_one_answer(stream)
}

fn read_one_answer(stream: &mut impl std::io::Read) -> (String, String) {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no Content-Length: {text}"));
            if body.len() >= length {
                return (head.to_owned(), body.to_owned());
            }
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "closed before a whole answer: {text:?}");
        seen.extend_from_slice(&buffer[..n]);
    }
}

/// A raw HTTP/1.1 exchange: the request text, then the whole answer until close.
pub(crate) fn http_raw(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = connect(port);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// Whether Node.js can be run here (the Node tests skip without it).
pub(crate) fn have_node() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Says that a test cannot run here, where `cargo test` shows it, and fails
/// under `CI=true`, where every prerequisite is installed by `.ci/run` and a
/// missing one is a broken setup, not a reason to pass. The caller returns
/// after it. Written to stderr directly, not with `eprintln!`, because the
/// test harness captures the macro's output and shows it only on failure.
pub(crate) fn prerequisite_missing(why: &str) {
    use std::io::Write;
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("a prerequisite is missing under CI=true: {why}");
    }
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// A memory figure of a process (`VmRSS:`, `VmHWM:`) from
/// `/proc/PID/status`, in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A path inside the repository.
pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}
