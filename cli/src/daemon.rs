//! The daemon: owns the control socket and the supervisor, restores what a
//! previous daemon left, and answers the CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apm_compiler::ir::{DaemonConfig, WorkerSpec};
use apm_compiler::loader::{FsLoader, Overlay};
use apm_compiler::{compile, plan, print, render};
use apm_runtime::observe::console::Console;
use apm_runtime::process::procfs;
use apm_runtime::process::state::{self, Environment, Origin, SavedProcess, SavedWorker};
use apm_runtime::process::supervisor::{self, Begin, Command, Handle, Supervisor};
use apm_runtime::{locked, log, unbuilt};
use nix::sys::signal::Signal;
use nix::unistd::Uid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::client::{self, Place};
use crate::exit;
use crate::protocol::{Call, PROTOCOL, Pong, ReloadTarget, Request, Response, VERSION};
use crate::watch::{self, Watcher};

#[path = "api.rs"]
mod api;
#[path = "gui.rs"]
mod gui;
#[path = "metrics.rs"]
mod metrics;

/// A request line longer than this is refused.
const MAX_REQUEST: u64 = 1 << 20;
/// How long orphans of a crashed daemon get to end after SIGTERM.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// Who may use the socket (decisions: the daemon, rule 2), and what a
/// member of `allow_group` may do (docs/cli.md, decision 33).
struct Access {
    owner: Uid,
    /// `allow_group` and the file that set it. A file loaded or reloaded
    /// that sets it takes it over; the file that set it takes it away when
    /// it is reloaded without it, or unloaded.
    allow_group: std::sync::Mutex<Option<(String, PathBuf)>>,
}

enum Role {
    /// Root or the daemon's owner.
    Owner,
    /// A member of `allow_group`, named.
    Member(String),
}

impl Access {
    fn role(&self, uid: Uid) -> Option<Role> {
        if uid.is_root() || uid == self.owner {
            return Some(Role::Owner);
        }
        let name = locked(&self.allow_group).as_ref()?.0.clone();
        let group = nix::unistd::Group::from_name(&name).ok()??;
        let user = nix::unistd::User::from_uid(uid).ok()??;
        (user.gid == group.gid || group.mem.contains(&user.name)).then_some(Role::Member(name))
    }

    fn refusal(&self, uid: Uid) -> String {
        let group = match &*locked(&self.allow_group) {
            Some((g, _)) => format!(", and members of group `{g}` (allow_group)"),
            None => String::new(),
        };
        format!(
            "permission denied: this apm daemon serves root and its owner (uid {}){group}; you are uid {uid}. \
             Run apm as that user, or set `daemon {{ allow_group NAME; }}` in its config",
            self.owner
        )
    }

    /// Why a member may not make this call, when it may not.
    fn member_refusal(&self, group: &str, call: &Call) -> Option<String> {
        (self.owner.is_root() && !call.open_to_members()).then(|| {
            format!(
                "permission denied: {}. Ask root to do it",
                crate::protocol::allow_group_rule(group)
            )
        })
    }

    /// Takes the `allow_group` of a file just loaded or reloaded.
    fn follow(&self, file: &Path, group: Option<&str>) {
        let mut current = locked(&self.allow_group);
        match follow_file(&mut current, file, group.map(str::to_owned)) {
            Some(Some(group)) => log(format_args!(
                "allow_group is now `{group}` (from {})",
                file.display()
            )),
            Some(None) => log(format_args!(
                "allow_group removed: {} no longer sets it",
                file.display()
            )),
            None => {}
        }
    }

    /// A file unloaded takes away the `allow_group` it set.
    fn forget(&self, file: &Path) {
        self.follow(file, None);
    }
}

/// A daemon-wide setting that several files may set, and the file it
/// came from: a file loaded or reloaded that sets it takes it over; the file
/// that set it takes it away when it is reloaded without it, or unloaded.
/// What it is now, when that changed.
fn follow_file<T: Clone + PartialEq>(
    current: &mut Option<(T, PathBuf)>,
    file: &Path,
    value: Option<T>,
) -> Option<Option<T>> {
    let new = match value {
        Some(value) => Some((value, file.to_path_buf())),
        None if current.as_ref().is_some_and(|(_, f)| f == file) => None,
        None => return None,
    };
    if *current == new {
        return None;
    }
    *current = new;
    Some(current.as_ref().map(|(value, _)| value.clone()))
}

struct Daemon {
    place: Place,
    supervisor: Handle,
    /// The variable every process it starts carries (`supervisor::marked_groups`).
    marker: (String, String),
    access: Access,
    exit: Notify,
    watcher: Arc<Watcher>,
    /// Set when the state file, or workers in it, could not be restored.
    notice: std::sync::OnceLock<String>,
    /// Itself, for the tasks it starts that call back (the GUI).
    this: std::sync::Weak<Daemon>,
    /// The web dashboard, while it runs.
    gui: std::sync::Mutex<Option<gui::Gui>>,
    /// The GUI settings of the last loaded file that set `gui_port`.
    gui_settings: std::sync::Mutex<Option<gui::Settings>>,
    /// The `daemon { }` each loaded file last applied: what its plans compare with.
    daemon_blocks: std::sync::Mutex<std::collections::HashMap<PathBuf, DaemonConfig>>,
    /// `proxy_threads` and the file that set it (`follow_file`).
    proxy_threads: std::sync::Mutex<Option<(u32, PathBuf)>>,
}

/// `apm container FILE`: the daemon in the foreground with FILE's workers
/// only, no state restored and, unless `socket`, no control socket.
pub struct Container {
    file: PathBuf,
    socket: bool,
}

pub fn run(place: Place, detach: bool) -> u8 {
    start(place, detach, None)
}

pub fn run_container(place: Place, file: PathBuf, socket: bool) -> u8 {
    start(place, false, Some(Container { file, socket }))
}

fn start(place: Place, detach: bool, container: Option<Container>) -> u8 {
    // Nothing a caller had open reaches the workers (decisions: the daemon, rule 8).
    if let Err(e) = apm_runtime::sys::close_inherited_descriptors() {
        log(format_args!("apm: cannot close inherited descriptors: {e}"));
        return exit::FAILED;
    }
    if detach {
        // Its own session: no terminal, and no signal of the CLI's group reaches it.
        let _ = nix::unistd::setsid();
    }
    // Traffic has threads of its own; this runtime's thread is the
    // supervisor's and the control socket's.
    let threads = proxy_threads(None);
    if let Err(e) = apm_runtime::traffic::threads::serve_on(threads, crate::give_back_freed_memory)
    {
        log(format_args!("apm: cannot start the proxy's threads: {e}"));
        return exit::FAILED;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            log(format_args!("apm: cannot start the daemon's runtime: {e}"));
            return exit::FAILED;
        }
    };
    // In a container, workers' lines (and the daemon's) go to apm's stdout
    // and stderr through one writer each (docs/cli.md, decision 120).
    let console = match container.as_ref().map(|_| Console::open()) {
        None => None,
        Some(Ok(console)) => {
            apm_runtime::observe::daemon_log::to_console(console.err.clone());
            Some(Arc::new(console))
        }
        Some(Err(e)) => {
            log(format_args!("apm: cannot write to stdout and stderr: {e}"));
            return exit::FAILED;
        }
    };
    let code = runtime.block_on(serve(place, container, console.clone()));
    if let Some(console) = console {
        runtime.block_on(console.flushed(CONSOLE_FLUSH));
    }
    // The final state is written by now; a blocking task still stuck in the
    // kernel (a log write to a stalled disk or FIFO) must not keep the
    // process alive, which `exit daemon` waits to see gone.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

fn bind(place: &Place) -> Result<UnixListener, String> {
    let address = place
        .address()
        .map_err(|e| format!("invalid socket name @{}: {e}", place.socket))?;
    match std::os::unix::net::UnixListener::bind_addr(&address) {
        Ok(listener) => {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            UnixListener::from_std(listener).map_err(|e| e.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(name_taken(place)),
        Err(e) => Err(format!("cannot listen on @{}: {e}", place.socket)),
    }
}

/// Why the socket name cannot be had: a daemon of ours holds it, or
/// someone else does (a local user can bind any abstract name first).
fn name_taken(place: &Place) -> String {
    let ours = |uid: u32| uid == 0 || uid == nix::unistd::geteuid().as_raw();
    match client::holder_of(place) {
        Some(holder) if ours(holder.uid) => {
            let pid = client::call(place, Call::Ping, false)
                .ok()
                .and_then(|response| serde_json::from_value::<Pong>(response.data).ok())
                .map_or(holder.pid, |pong| pong.pid as i32);
            format!(
                "an apm daemon already runs on @{} (pid {pid}); stop it with `apm exit daemon`",
                place.socket
            )
        }
        Some(holder) => format!(
            "the socket name @{} is held by a process of {}, not by an apm daemon of root or this user: \
             it may be squatting the name to receive apm's requests. Have root stop it (`kill {}`), or run the \
             daemon on another name with APM_SOCKET",
            place.socket,
            holder.describe(),
            holder.pid
        ),
        None => format!(
            "the socket name @{} is held by another process, which could not be identified (root can see it \
             with `ss -xlp | grep {}`); stop it, or run the daemon on another name with APM_SOCKET",
            place.socket, place.socket
        ),
    }
}

/// How often the daemon returns memory it freed to the system.
const FREED_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

async fn serve(
    mut place: Place,
    container: Option<Container>,
    console: Option<Arc<Console>>,
) -> u8 {
    place.home = std::path::absolute(&place.home).unwrap_or(place.home);
    // Not the directory of whichever command started it (docs/cli.md,
    // decision 48); `home` is absolute by now.
    let _ = std::env::set_current_dir("/");
    if let Err(e) = std::fs::create_dir_all(&place.home) {
        log(format_args!(
            "apm: cannot create {}: {e}",
            place.home.display()
        ));
        return exit::FAILED;
    }
    let _ = std::fs::set_permissions(&place.home, std::fs::Permissions::from_mode(0o700));
    let listener = match container
        .as_ref()
        .is_none_or(|c| c.socket)
        .then(|| bind(&place))
    {
        None => None,
        Some(Ok(listener)) => Some(listener),
        Some(Err(message)) => {
            log(format_args!("apm: {message}"));
            return exit::FAILED;
        }
    };
    apm_runtime::observe::daemon_log::rotate_at(&daemon_log_file(&place));
    // Counts of repeated log lines are summarised once their minute is
    // over, also when nothing else is logged.
    tokio::spawn(async {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            apm_runtime::observe::daemon_log::flush();
        }
    });
    let pid_file = place.home.join("apm.pid");
    // Holding the socket makes this the only daemon: any pid file left is stale.
    if let Ok(old) = std::fs::read_to_string(&pid_file) {
        log(format_args!(
            "replacing the stale pid file of pid {}",
            old.trim()
        ));
    }
    let _ = std::fs::write(&pid_file, format!("{}\n", std::process::id()));
    log(format_args!(
        "apm {VERSION} daemon started (pid {}) on @{}",
        std::process::id(),
        place.socket
    ));

    match apm_runtime::sys::raise_open_files_limit() {
        Ok((soft, hard)) => log(format_args!("{}", open_files_note(soft, hard))),
        Err(e) => log(format_args!("cannot raise the open files limit: {e}")),
    }
    let marker = (
        "APM_SPAWNED_BY".to_owned(),
        format!("@{} {}", place.socket, place.home.display()),
    );
    let supervisor = Supervisor::spawn(
        &place.home,
        base_environment(&place, container.is_some()),
        marker.clone(),
        console.clone(),
    );
    let access = Access {
        owner: nix::unistd::geteuid(),
        allow_group: std::sync::Mutex::new(allow_group(&boot_config(&place.home))),
    };
    let (watcher, mut due) = Watcher::start();
    let daemon = Arc::new_cyclic(|this| Daemon {
        place,
        supervisor,
        marker,
        access,
        exit: Notify::new(),
        watcher,
        notice: std::sync::OnceLock::new(),
        this: this.clone(),
        gui: std::sync::Mutex::default(),
        gui_settings: std::sync::Mutex::default(),
        daemon_blocks: std::sync::Mutex::default(),
        proxy_threads: std::sync::Mutex::default(),
    });
    let reloading = daemon.clone();
    tokio::spawn(async move {
        while let Some(due) = due.recv().await {
            reload_logged(&reloading, due, "auto reload").await;
        }
    });
    // Each thread's heap is its own: the proxy's threads do the same for theirs.
    tokio::spawn(async {
        let mut ticks = tokio::time::interval(FREED_MEMORY_EVERY);
        loop {
            ticks.tick().await;
            crate::give_back_freed_memory();
        }
    });
    // Before the workers start: `apm container`'s init passes SIGTERM on
    // at any time, and the default action would leave them running.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut terminate, mut interrupt, mut hangup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            log(format_args!("apm: cannot handle signals"));
            return exit::FAILED;
        }
    };
    if container.is_none() {
        restore(&daemon).await;
    }
    let _ = daemon
        .supervisor
        .call(|reply| Command::Restored { reply })
        .await;
    if let Some(container) = &container
        && let Err(response) = load(&daemon, &container.file, Registered::Start).await
    {
        log(format_args!(
            "apm: cannot load {}: {}",
            container.file.display(),
            response.error.unwrap_or_default()
        ));
        return exit::FAILED;
    }
    let loading = daemon.clone();
    let boot = container.is_none();
    tokio::spawn(async move {
        if boot {
            load_user_config(&loading).await;
        }
        // The accept loop below runs by now on this same thread.
        crate::notify::send("READY=1");
    });
    crate::notify::spawn_watchdog();

    let mut errors = apm_runtime::AcceptErrors::default();
    let control = format!("@{}", daemon.place.socket);
    let accept = || async {
        match &listener {
            Some(listener) => listener.accept().await,
            None => std::future::pending().await,
        }
    };
    // A container has no later daemon to hand its workers to.
    let keep_desired = container.is_none();
    loop {
        tokio::select! {
            accepted = accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(daemon.clone(), stream));
                }
                Err(e) => errors.failed(e, &control).await,
            },
            _ = terminate.recv() => { shutdown(&daemon, "SIGTERM", keep_desired).await; break; }
            _ = interrupt.recv() => { shutdown(&daemon, "SIGINT", keep_desired).await; break; }
            _ = hangup.recv() => { tokio::spawn(reload_all_logged(daemon.clone())); }
            _ = daemon.exit.notified() => break,
        }
    }
    let _ = std::fs::remove_file(&pid_file);
    log(format_args!("daemon stopped"));
    if container.is_some() {
        return how_workers_ended(&daemon).await;
    }
    exit::OK
}

/// The most `apm container` waits at its exit for the lines still queued
/// to be read from its stdout and stderr.
const CONSOLE_FLUSH: Duration = Duration::from_secs(2);

/// `apm container`'s status (docs/cli.md, decision 100): 0 when every
/// process exited 0 or ended by the stop signal apm sent it, else the
/// first other ending in the file's order: its code, or 128+N for
/// signal N.
async fn how_workers_ended(daemon: &Daemon) -> u8 {
    let Ok(workers) = call(daemon, |reply| Command::List { reply }).await else {
        return exit::FAILED;
    };
    let mut code = exit::OK;
    for worker in &workers {
        for instance in &worker.instances {
            let ended = match instance.last_exit.as_deref() {
                None | Some("exit 0") => continue,
                Some(reason) => reason,
            };
            // What apm's own stop ended (the supervisor stops with SIGTERM).
            if ended == "killed by SIGTERM" {
                continue;
            }
            log(format_args!(
                "{}:{} ended: {ended}",
                worker.name, instance.index
            ));
            if code == exit::OK {
                code = status_code(ended);
            }
        }
    }
    code
}

/// The status a shell would report for an ending as `InstanceStatus::last_exit`
/// spells it (`ExitStatus`'s Display).
fn status_code(ended: &str) -> u8 {
    if let Some(code) = ended.strip_prefix("exit ") {
        return code.parse::<i32>().map_or(exit::FAILED, |code| code as u8);
    }
    ended
        .strip_prefix("killed by ")
        .and_then(|name| name.parse::<nix::sys::signal::Signal>().ok())
        .map_or(exit::FAILED, |signal| 128 + signal as u8)
}

/// SIGHUP: every loaded config file is reloaded, as `apm reload --all`
/// does (the meaning nginx and supervisord give it, and what `systemctl
/// reload` sends); the daemon itself never stops on it.
async fn reload_all_logged(daemon: Arc<Daemon>) {
    log(format_args!("SIGHUP: reloading every loaded config file"));
    for root in files_of(&daemon.supervisor).await {
        reload_logged(&daemon, watch::Due { root, only: None }, "SIGHUP reload").await;
    }
}

/// Stops every worker. A signal keeps what each is meant to do, so that the
/// next daemon (after a reboot) brings back what ran; `apm exit daemon`,
/// the user's own "stop everything", records them all as stopped
/// (docs/cli.md, decision 49).
async fn shutdown(daemon: &Daemon, why: &str, keep_desired: bool) {
    crate::notify::send("STOPPING=1");
    log(format_args!("{why}: stopping every worker"));
    let _ = daemon
        .supervisor
        .call(|reply| {
            if keep_desired {
                Command::Shutdown { reply }
            } else {
                Command::StopAll { reply }
            }
        })
        .await;
    // The workers' last state, written by the state thread, must not be
    // cut off by the process's end, nor land after the daemon is gone.
    if let Err(e) = daemon.supervisor.saved().await {
        log(format_args!("the final state was not saved: {e}"));
    }
}

/// The daemon's open-files limit, for its log: how many proxied clients it
/// leaves room for (each holds its own descriptor and its instance's),
/// and, below what apm's service scripts and systemd give a service, how
/// to have more.
fn open_files_note(soft: u64, hard: u64) -> String {
    let limit = if hard > soft {
        format!("open files limit raised from {soft} to {hard} (children get {soft})")
    } else {
        format!("open files limit {hard}")
    };
    let room = format!("room for about {} proxied clients", hard / 2);
    if hard < crate::install::SERVICE_OPEN_FILES {
        format!(
            "{limit}: {room}; a higher hard limit holds more (as root `ulimit -H -n {}` before \
             starting the daemon, or LimitNOFILE= in its systemd unit)",
            crate::install::SERVICE_OPEN_FILES
        )
    } else {
        format!("{limit}: {room}")
    }
}

/// The config the daemon loads as it starts: `APM_CONFIG` (the service
/// `apm install` registers sets `/etc/apm/apm.conf`), else
/// `$APM_HOME/config.conf` (docs/cli.md, decision 85).
fn boot_config(home: &Path) -> PathBuf {
    std::env::var_os("APM_CONFIG")
        .filter(|path| !path.is_empty())
        .map_or_else(|| home.join("config.conf"), PathBuf::from)
}

/// The daemon log the daemon rotates when it is its stderr: `APM_LOG` (the
/// service's `/var/log/apm.log`), else `$APM_HOME/apm.log`.
fn daemon_log_file(place: &Place) -> PathBuf {
    std::env::var_os("APM_LOG")
        .filter(|path| !path.is_empty())
        .map_or_else(|| place.log_file(), PathBuf::from)
}

/// `allow_group` from the boot config, when it sets one, read before the
/// socket takes calls so that members are not refused meanwhile.
fn allow_group(path: &Path) -> Option<(String, PathBuf)> {
    let path = path.to_path_buf();
    let compilation = compile(&path, &FsLoader).ok()?;
    compilation
        .config
        .daemon
        .allow_group
        .map(|g| (g.value, path))
}

/// The variables of the daemon's own environment that every worker's
/// processes get (with `LC_*`), and nothing else of it: it is the
/// environment of whichever command started the daemon (docs/cli.md,
/// decision 47).
const BASE_ENVIRONMENT: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

/// What the processes of workers from files get before their `env_file`
/// and `env`: `BASE_ENVIRONMENT`, and where this daemon is, so that an
/// `apm` a worker runs drives the daemon that runs it.
///
/// In a container (`whole`), all of apm's environment: the platform set it
/// for the program (docs/cli.md, decision 121).
fn base_environment(place: &Place, whole: bool) -> Vec<(String, String)> {
    let mut base: Vec<(String, String)> = Environment::of_this_process()
        .0
        .into_iter()
        .filter(|(key, _)| {
            whole || BASE_ENVIRONMENT.contains(&key.as_str()) || key.starts_with("LC_")
        })
        .collect();
    base.push(("APM_HOME".to_owned(), place.home.display().to_string()));
    base.push(("APM_SOCKET".to_owned(), place.socket.clone()));
    base
}

/// Ends the processes a crashed daemon left (those it recorded, and every
/// one that carries its mark, which covers those it started after its last
/// state was written) and registers its workers again, starting those that
/// were meant to run.
async fn restore(daemon: &Daemon) {
    let path = daemon.place.home.join("state.json");
    let saved = match state::load(&path) {
        Ok(saved) => saved,
        Err(e) => {
            let aside = path.with_extension(format!("corrupt-{}", std::process::id()));
            let kept = match std::fs::rename(&path, &aside) {
                Ok(()) => format!("set aside as {}", aside.display()),
                Err(rename) => format!("left in place ({rename})"),
            };
            let notice = format!(
                "the state file {} could not be read ({e}): {kept}; the workers it listed were not restored",
                path.display()
            );
            log(format_args!("{notice}"));
            let _ = daemon.notice.set(notice);
            None
        }
    };
    let mut processes: Vec<SavedProcess> = saved
        .iter()
        .flat_map(|s| &s.workers)
        .flat_map(|w| w.processes.iter().copied())
        .collect();
    processes.extend(supervisor::marked_groups(&daemon.marker));
    processes.sort_by_key(|p| (p.pid, p.start_ticks));
    processes.dedup();
    let ended = supervisor::end_orphans(&processes, ORPHAN_GRACE).await;
    if ended > 0 {
        log(format_args!(
            "ended {ended} process group(s) left by the previous daemon"
        ));
    }
    let Some(saved) = saved else {
        return;
    };
    let mut to_start = Vec::new();
    let mut unrestored = Vec::new();
    let mut as_last_run = Vec::new();
    let mut files = FileSpecs::default();
    let count = saved.workers.len();
    for worker in saved.workers {
        let (name, running) = (worker.name.clone(), worker.running);
        let restored = match restorable(&worker, &mut files) {
            Ok((spec, broken_file)) => daemon
                .supervisor
                .call(|reply| Command::Register {
                    name: name.clone(),
                    spec: Box::new(spec),
                    // A file's workers get the base environment, whatever
                    // they were attached from (`saveconf`).
                    environment: match worker.origin {
                        Origin::Cli { .. } => worker.environment,
                        Origin::File { .. } => Environment::default(),
                    },
                    origin: worker.origin,
                    begin: if running {
                        Begin::Enabled
                    } else {
                        Begin::Stopped
                    },
                    reply,
                })
                .await
                .map(|_| broken_file)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match restored {
            Err(e) => {
                log(format_args!("cannot restore {name}: {e}"));
                unrestored.push(name);
                continue;
            }
            Ok(Some(why)) => {
                log(format_args!("{name} is restored as it last ran: {why}"));
                as_last_run.push(name.clone());
            }
            Ok(None) => {}
        }
        if running {
            to_start.push(name);
        }
    }
    log(format_args!(
        "restored {} of {count} worker(s) ({} to run); config files compiled: {}",
        count - unrestored.len(),
        to_start.len(),
        files.compiled.len()
    ));
    let mut notices = Vec::new();
    if !unrestored.is_empty() {
        notices.push(format!(
            "{} worker(s) of the state file could not be restored: {} (the daemon log says why; fix and load again)",
            unrestored.len(),
            unrestored.join(", ")
        ));
    }
    if !as_last_run.is_empty() {
        notices.push(format!(
            "{} worker(s) run as they last ran, since their file no longer compiles: {} (`apm reload FILE` once it is fixed)",
            as_last_run.len(),
            as_last_run.join(", ")
        ));
    }
    if !notices.is_empty() {
        let _ = daemon.notice.set(notices.join("; "));
    }
    // Files that workers came from are watched again, as when they were
    // loaded; so are the `allow_group` and the GUI one of them set.
    for file in files_of(&daemon.supervisor).await {
        if let Ok(compilation) = compile_file(daemon, &file).await {
            let _ = follow_daemon_block(daemon, &file, compilation.config.daemon).await;
        }
    }
    for name in to_start {
        let supervisor = daemon.supervisor.clone();
        tokio::spawn(async move {
            let _ = supervisor
                .call(|reply| Command::Start {
                    name,
                    index: None,
                    reply,
                })
                .await;
        });
    }
}

/// The boot config (`boot_config`) is loaded when the daemon starts;
/// workers already restored from the state file are left alone.
async fn load_user_config(daemon: &Daemon) {
    let path = boot_config(&daemon.place.home);
    if !path.is_file() {
        return;
    }
    match load(daemon, &path, Registered::StayAsRestored).await {
        Ok(_) => log(format_args!("loaded {}", path.display())),
        Err(response) => log(format_args!(
            "cannot load {}: {}",
            path.display(),
            response.error.unwrap_or_default()
        )),
    }
}

/// Applies a file's `daemon { }` as it is loaded or reloaded, and records it
/// for the file's next plan: `allow_group` is followed, a `gui_port` starts
/// the GUI with its settings or restarts it with changed ones, and a
/// `gui_port` taken back to 0 stops the GUI this file's settings started
/// (docs/cli.md, decision 101). `auto_reload` is followed by the watcher
/// as the file compiles. A GUI that fails to start is logged and returned.
async fn follow_daemon_block(
    daemon: &Daemon,
    path: &Path,
    block: DaemonConfig,
) -> Result<(), String> {
    daemon
        .access
        .follow(path, block.allow_group.as_ref().map(|g| g.value.as_str()));
    follow_proxy_threads(
        daemon,
        path,
        block.proxy_threads.span.map(|_| block.proxy_threads.value),
    );
    let before = locked(&daemon.daemon_blocks).insert(path.to_path_buf(), block.clone());
    if block.gui_port.value != 0 {
        return follow_gui_settings(daemon, gui::Settings::of(&block)).await;
    }
    let Some(before) = before.filter(|b| b.gui_port.value != 0) else {
        return Ok(());
    };
    let set_by_file = gui::Settings::of(&before);
    let running = {
        let mut gui = locked(&daemon.gui);
        if gui.as_ref().is_some_and(|g| g.settings == set_by_file) {
            gui.take()
        } else {
            None
        }
    };
    if let Some(running) = running {
        *locked(&daemon.gui_settings) = None;
        log(format_args!(
            "GUI on {} stopped: {} sets gui_port 0 now",
            running.url,
            path.display()
        ));
        running.stop().await;
    }
    Ok(())
}

/// How many threads the proxy serves new connections on: what a file
/// set, or else `APM_PROXY_THREADS` (which the tests use), or else one per
/// core the daemon may use (docs/cli.md, proxy_threads decision).
fn proxy_threads(set_by_file: Option<u32>) -> usize {
    let from_environment = || {
        std::env::var("APM_PROXY_THREADS")
            .ok()
            .and_then(|n| n.trim().parse::<u32>().ok())
    };
    apm_runtime::traffic::threads::wanted(set_by_file.or_else(from_environment).unwrap_or(0))
}

/// Takes the `proxy_threads` of a file just loaded, reloaded (`None` when
/// it does not set it) or unloaded (`None`): new connections go to that
/// many threads; those beyond a lowered count finish what they serve.
fn follow_proxy_threads(daemon: &Daemon, file: &Path, set: Option<u32>) {
    let Some(now) = follow_file(&mut locked(&daemon.proxy_threads), file, set) else {
        return;
    };
    let count = proxy_threads(now);
    match apm_runtime::traffic::threads::serve_on(count, crate::give_back_freed_memory) {
        Ok(()) => log(format_args!(
            "the proxy serves new connections on {count} thread(s) ({})",
            match now {
                Some(_) => format!("proxy_threads of {}", file.display()),
                None => format!("{} no longer sets proxy_threads", file.display()),
            }
        )),
        Err(e) => log(format_args!("cannot start more proxy threads: {e}")),
    }
}

/// A loaded file that sets `gui_port` starts the GUI with its settings (or
/// restarts it, if they changed); a failure is logged and returned, the
/// load goes on.
async fn follow_gui_settings(daemon: &Daemon, settings: gui::Settings) -> Result<(), String> {
    *locked(&daemon.gui_settings) = Some(settings.clone());
    if locked(&daemon.gui)
        .as_ref()
        .is_some_and(|g| g.settings == settings)
    {
        return Ok(());
    }
    // Settings it refuses leave a running GUI as it is.
    let started = match gui::refusal(&settings) {
        Some(refused) => Err(refused),
        None => start_gui(daemon, settings).await,
    };
    match started {
        Ok(url) => {
            log(format_args!("GUI on {url}"));
            Ok(())
        }
        Err(e) => {
            log(format_args!("GUI not started: {e}"));
            Err(e)
        }
    }
}

/// Starts the GUI in place of the one running, if any; its URL.
async fn start_gui(daemon: &Daemon, settings: gui::Settings) -> Result<String, String> {
    // The old one lets go of its port first.
    let old = locked(&daemon.gui).take();
    if let Some(old) = old {
        old.stop().await;
    }
    let this = daemon
        .this
        .upgrade()
        .ok_or_else(|| "the daemon is stopping".to_owned())?;
    let started = gui::start(this, settings)?;
    let url = started.url.clone();
    *locked(&daemon.gui) = Some(started);
    Ok(url)
}

/// `apm gui [stop]`.
async fn gui_call(daemon: &Daemon, stop: bool) -> Response {
    if stop {
        let running = locked(&daemon.gui).take();
        let mut stopped = None;
        if let Some(gui) = running {
            stopped = Some(gui.url.clone());
            gui.stop().await;
        }
        return Response::data(serde_json::json!({ "stopped": stopped }));
    }
    // The address with its token, for whoever may drive the daemon.
    let link = || locked(&daemon.gui).as_ref().map(|g| g.link.clone());
    if let Some(link) = link() {
        return Response::data(serde_json::json!({ "url": link }));
    }
    // Without a file that set `gui_port`: the reference's port, and the
    // other settings' defaults.
    let settings = locked(&daemon.gui_settings)
        .clone()
        .unwrap_or(gui::Settings {
            port: DEFAULT_GUI_PORT,
            bind: apm_compiler::values::Ip::default().0,
            password: None,
        });
    match start_gui(daemon, settings).await {
        Ok(url) => {
            log(format_args!("GUI on {url}"));
            Response::data(serde_json::json!({ "url": link().unwrap_or(url) }))
        }
        Err(e) => Response::error(exit::FAILED, e),
    }
}

/// `apm gui`'s port when no loaded file names one (the reference's example).
const DEFAULT_GUI_PORT: u16 = 6789;

/// Compiles one `worker { }` block; the errors rendered for people.
fn compile_block(text: &str) -> Result<WorkerSpec, String> {
    let loader = Overlay {
        path: PathBuf::from("/apm/worker.conf"),
        contents: text.to_owned(),
        inner: &FsLoader,
    };
    let compilation = compile(&loader.path, &loader).map_err(|e| e.to_string())?;
    if compilation.has_errors() {
        return Err(render::human(&compilation, false));
    }
    compilation
        .config
        .workers
        .into_iter()
        .next()
        .ok_or_else(|| "no worker in the config".to_owned())
}

/// The config files a restore has read, each compiled once however many
/// workers it defines: its workers by name, or why it is broken.
#[derive(Default)]
struct FileSpecs {
    compiled: std::collections::HashMap<
        PathBuf,
        Result<std::collections::HashMap<String, WorkerSpec>, String>,
    >,
}

impl FileSpecs {
    fn of(
        &mut self,
        path: &Path,
    ) -> &mut Result<std::collections::HashMap<String, WorkerSpec>, String> {
        self.compiled
            .entry(path.to_path_buf())
            .or_insert_with(|| match compile(path, &FsLoader) {
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
                Ok(compilation) if compilation.has_errors() => Err(format!(
                    "{} has errors:\n{}",
                    path.display(),
                    render::human(&compilation, false)
                )),
                Ok(compilation) => Ok(compilation
                    .config
                    .workers
                    .into_iter()
                    .map(|spec| (spec.name.value.clone(), spec))
                    .collect()),
            })
    }
}

/// The spec to restore a saved worker with: from its file as the file is
/// now, or, when the file cannot be read or has errors (edited while the
/// daemon was down), from the block it last ran with, and then why. A
/// file that compiles but no longer defines the worker has let it go.
fn restorable(
    worker: &SavedWorker,
    files: &mut FileSpecs,
) -> Result<(WorkerSpec, Option<String>), String> {
    let path = match &worker.origin {
        Origin::Cli { config } => return compile_block(config).map(|spec| (spec, None)),
        Origin::File { path } => path,
    };
    let broken = match files.of(path) {
        Err(broken) => broken.clone(),
        Ok(specs) => {
            return specs
                .remove(&worker.name)
                .map(|spec| (spec, None))
                .ok_or_else(|| format!("{} no longer defines `{}`", path.display(), worker.name));
        }
    };
    match &worker.config {
        Some(config) => compile_block(config).map(|spec| (spec, Some(broken))),
        None => Err(broken),
    }
}

async fn connection(daemon: Arc<Daemon>, stream: UnixStream) {
    let uid = match stream.peer_cred() {
        Ok(cred) => Uid::from_raw(cred.uid()),
        Err(_) => return,
    };
    let (read, write) = stream.into_split();
    // Refused before anything is read: a client that may not drive the
    // daemon must not hold it waiting for a line either.
    let Some(role) = daemon.access.role(uid) else {
        log(format_args!("refused a client of uid {uid}"));
        let refusal = Response::error(exit::UNREACHABLE, daemon.access.refusal(uid));
        return answer(write, &refusal).await;
    };
    let response = {
        let mut line = String::new();
        if BufReader::new(read.take(MAX_REQUEST))
            .read_line(&mut line)
            .await
            .is_err()
        {
            return;
        }
        match serde_json::from_str::<Request>(&line) {
            Ok(request) if request.protocol == PROTOCOL => match &role {
                Role::Member(group) => match daemon.access.member_refusal(group, &request.call) {
                    Some(refusal) => Response::error(exit::UNREACHABLE, refusal),
                    None => dispatch(&daemon, request.call).await,
                },
                Role::Owner => dispatch(&daemon, request.call).await,
            },
            Ok(request) => Response::error(
                exit::UNREACHABLE,
                version_mismatch(&request.version, Some(request.protocol)),
            ),
            Err(_) => {
                let version = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_owned));
                match version {
                    Some(version) if version != VERSION => {
                        Response::error(exit::UNREACHABLE, version_mismatch(&version, None))
                    }
                    _ => Response::error(exit::USAGE, "the daemon could not read this request"),
                }
            }
        }
    };
    answer(write, &response).await;
}

async fn answer(mut write: tokio::net::unix::OwnedWriteHalf, response: &Response) {
    let mut bytes = serde_json::to_vec(response).unwrap_or_default();
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
    let _ = write.shutdown().await;
}

fn version_mismatch(cli: &str, protocol: Option<u32>) -> String {
    let cli_protocol = protocol
        .map(|p| format!(", protocol {p}"))
        .unwrap_or_default();
    format!(
        "this CLI (apm {cli}{cli_protocol}) cannot drive the running daemon (apm {VERSION}, protocol {PROTOCOL}); stop \
         the daemon with `apm exit daemon` from its own version, then run the command again"
    )
}

/// Naming a worker or instance that does not exist is a usage error (exit 2);
/// other failures exit 1.
fn failure_code(message: &str) -> u8 {
    if message.starts_with("no worker named") || message.contains("does not exist") {
        exit::USAGE
    } else {
        exit::FAILED
    }
}

async fn call<T>(
    daemon: &Daemon,
    command: impl FnOnce(supervisor::Reply<T>) -> Command,
) -> Result<T, Response> {
    daemon
        .supervisor
        .call(command)
        .await
        .map_err(|e| Response::error(failure_code(&e), e))
}

async fn dispatch(daemon: &Daemon, call_: Call) -> Response {
    let changes = call_.changes_workers();
    let (Ok(mut response) | Err(mut response)) = handle(daemon, call_).await;
    // Answered once the state file holds the change (a failed call may have
    // changed some workers too): a daemon killed right after must not
    // bring back what the user was told is gone, or lose what was added.
    if changes && let Err(e) = daemon.supervisor.saved().await {
        response.notices.push(format!(
            "warning: done, but not saved ({e}): a daemon restarted now would not know of it"
        ));
    }
    response
}

async fn handle(daemon: &Daemon, call_: Call) -> Result<Response, Response> {
    let sup = &daemon.supervisor;
    Ok(match call_ {
        Call::Ping => Response::data(pong(daemon)),
        Call::Run {
            config,
            start,
            environment,
            named,
        } => {
            let spec = compile_block(&config).map_err(|e| Response::error(exit::FAILED, e))?;
            let name = spec.name.value.clone();
            let unenforced = unbuilt::worker_note(&spec);
            let existing = sup
                .call(|reply| Command::Info {
                    name: name.clone(),
                    reply,
                })
                .await;
            let started = match existing {
                Ok((status, current)) => {
                    let again = Again {
                        status,
                        current: *current,
                        environment,
                        start,
                        named,
                    };
                    run_again(daemon, again, spec).await?
                }
                Err(_) => {
                    let origin = Origin::Cli {
                        config: print::worker(&spec),
                    };
                    let begin = if start {
                        Begin::Started
                    } else {
                        Begin::Stopped
                    };
                    call(daemon, |reply| Command::Register {
                        name,
                        spec: Box::new(spec),
                        origin,
                        environment,
                        begin,
                        reply,
                    })
                    .await?
                }
            };
            Response::data(started).noting(unenforced)
        }
        Call::Load { path } => load(daemon, &path, Registered::Start).await?,
        Call::Unload { path } => {
            daemon.watcher.forget(&path);
            daemon.access.forget(&path);
            follow_proxy_threads(daemon, &path, None);
            locked(&daemon.daemon_blocks).remove(&path);
            let statuses = call(daemon, |reply| Command::List { reply }).await?;
            let mut removed = Vec::new();
            for status in statuses
                .into_iter()
                .filter(|s| s.origin == Origin::File { path: path.clone() })
            {
                call(daemon, |reply| Command::Remove {
                    name: status.name.clone(),
                    reply,
                })
                .await?;
                removed.push(status.name);
            }
            Response::data(removed)
        }
        Call::Start { name, index } => {
            Response::data(call(daemon, |reply| Command::Start { name, index, reply }).await?)
        }
        Call::Stop { name, index } => {
            Response::data(call(daemon, |reply| Command::Stop { name, index, reply }).await?)
        }
        Call::Restart { name, index, force } => Response::data(
            call(daemon, |reply| Command::Restart {
                name,
                index,
                force,
                reply,
            })
            .await?,
        ),
        // `apm restart --force`: "restart all workers, ignoring rolling".
        Call::RestartAll => {
            let statuses = call(daemon, |reply| Command::List { reply }).await?;
            let mut reports = Vec::new();
            for status in statuses {
                reports.push(
                    call(daemon, |reply| Command::Restart {
                        name: status.name,
                        index: None,
                        force: true,
                        reply,
                    })
                    .await?,
                );
            }
            Response::data(reports)
        }
        Call::Remove { name } => {
            Response::data(call(daemon, |reply| Command::Remove { name, reply }).await?)
        }
        Call::StopAll => Response::data(call(daemon, |reply| Command::StopAll { reply }).await?),
        Call::Update {
            name,
            settings,
            restart,
        } => {
            let (status, current) = call(daemon, |reply| Command::Info {
                name: name.clone(),
                reply,
            })
            .await?;
            let merged = merge_settings(current.settings(), settings);
            let text = print::worker_with(&merged, &current);
            let spec = compile_block(&text).map_err(|e| Response::error(exit::FAILED, e))?;
            if spec.name.value != name {
                return Err(Response::error(
                    exit::USAGE,
                    "use `apm rename` to change a worker's name",
                ));
            }
            // A worker from a file stays tied to it (and comes back from it after
            // a crash) until `saveconf` writes the change there.
            let origin = match status.origin {
                Origin::File { path } => Origin::File { path },
                Origin::Cli { .. } => Origin::Cli {
                    config: print::worker(&spec),
                },
            };
            Response::data(
                call(daemon, |reply| Command::Update {
                    name,
                    spec: Box::new(spec),
                    origin,
                    environment: None,
                    restart,
                    reply,
                })
                .await?,
            )
        }
        Call::Rename { name, new } => {
            let (_, spec) = call(daemon, |reply| Command::Info {
                name: name.clone(),
                reply,
            })
            .await?;
            let renamed = renamed(&spec, &new).map_err(|e| Response::error(exit::USAGE, e))?;
            let origin = Origin::Cli {
                config: print::worker(&renamed),
            };
            let notes = call(daemon, |reply| Command::Rename {
                old: name,
                new,
                origin,
                reply,
            })
            .await?;
            Response::data(()).noting(notes)
        }
        Call::Copy {
            name,
            new,
            environment,
        } => {
            let (_, spec) = call(daemon, |reply| Command::Info {
                name: name.clone(),
                reply,
            })
            .await?;
            let copy = renamed(&spec, &new).map_err(|e| Response::error(exit::USAGE, e))?;
            let origin = Origin::Cli {
                config: print::worker(&copy),
            };
            Response::data(
                call(daemon, |reply| Command::Register {
                    name: new,
                    spec: Box::new(copy),
                    origin,
                    environment,
                    begin: Begin::Started,
                    reply,
                })
                .await?,
            )
        }
        Call::Send { channel, data } => {
            let delivered = apm_runtime::ipc::router().operator_send(&channel, &data);
            Response::data(serde_json::json!({ "delivered": delivered }))
        }
        Call::Request {
            channel,
            data,
            timeout_ms,
        } => {
            let outcome = apm_runtime::ipc::router()
                .operator_request(&channel, &data, timeout_ms.map(Duration::from_millis))
                .await;
            Response::data(serde_json::json!({ "data": outcome.data, "status": outcome.status }))
        }
        Call::Signal {
            name,
            index,
            signal,
        } => {
            let signal: Signal = signal
                .parse()
                .map_err(|_| Response::error(exit::USAGE, format!("unknown signal `{signal}`")))?;
            Response::data(
                call(daemon, |reply| Command::Signal {
                    name,
                    index,
                    signal,
                    reply,
                })
                .await?,
            )
        }
        Call::List => {
            let workers = call(daemon, |reply| Command::List { reply }).await?;
            Response::data(serde_json::json!({ "workers": workers, "daemon": pong(daemon) }))
        }
        Call::Table => {
            let rows = call(daemon, |reply| Command::Table { reply }).await?;
            Response::data(serde_json::json!({ "workers": rows, "daemon": pong(daemon) }))
        }
        Call::Info { name } => {
            let (status, spec) = call(daemon, |reply| Command::Info { name, reply }).await?;
            Response::data(
                serde_json::json!({ "status": status, "config": spec, "text": print::worker(&spec) }),
            )
        }
        Call::Wait { name, timeout_ms } => {
            let timeout = Duration::from_millis(timeout_ms);
            Response::data(
                call(daemon, |reply| Command::Wait {
                    name,
                    timeout,
                    reply,
                })
                .await?,
            )
        }
        Call::Plan { path, force } => {
            let (plan, _, _) = file_plan(daemon, &path, force).await?;
            Response::data(serde_json::json!({ "file": path, "text": plan.render(), "plan": plan }))
        }
        Call::Reload {
            target,
            force,
            dry_run,
        } => {
            let files = reload_targets(daemon, target).await?;
            let mut reloads = Vec::new();
            let mut unenforced = Vec::new();
            for (path, only) in files {
                let (mut plan, specs, block) = file_plan(daemon, &path, force).await?;
                if let Some(name) = &only {
                    plan.steps.retain(|step| step.worker() == name);
                }
                unenforced.extend(
                    specs
                        .iter()
                        .filter(|spec| only.as_ref().is_none_or(|name| spec.name.value == *name))
                        .filter_map(unbuilt::worker_note),
                );
                let applied = if dry_run {
                    Vec::new()
                } else {
                    if let Err(e) = follow_daemon_block(daemon, &path, block).await {
                        unenforced.push(format!("the GUI was not started: {e}"));
                    }
                    apply(daemon, &path, &plan, specs).await
                };
                reloads.push(serde_json::json!({ "file": path, "text": plan.render(), "plan": plan, "applied": applied }));
            }
            Response::data(reloads).noting(unenforced)
        }
        Call::Gui { stop } => gui_call(daemon, stop).await,
        Call::Exit => {
            let kept = call(daemon, |reply| Command::List { reply })
                .await?
                .into_iter()
                .filter(|s| s.enabled)
                .map(|s| s.name)
                .collect::<Vec<_>>();
            shutdown(daemon, "apm exit daemon", false).await;
            daemon.exit.notify_one();
            let mut answer = serde_json::to_value(pong(daemon)).unwrap_or_default();
            answer["stopped"] = serde_json::json!(kept);
            Response::data(answer)
        }
        Call::Attach { name, path } => attach(daemon, name, path).await?,
    })
}

fn pong(daemon: &Daemon) -> Pong {
    let pid = std::process::id();
    Pong {
        pid,
        version: VERSION.to_owned(),
        protocol: PROTOCOL,
        memory_bytes: procfs::stat(pid).map_or(0, |s| s.rss_bytes),
        notice: daemon.notice.get().cloned(),
        proxy_threads: apm_runtime::traffic::threads::loads(),
    }
}

/// The worker keys of `current` with the keys of `update` replaced.
fn merge_settings(
    current: Vec<(&'static str, Vec<String>)>,
    update: Vec<(String, Vec<String>)>,
) -> Vec<(String, Vec<String>)> {
    let mut merged: Vec<(String, Vec<String>)> = current
        .into_iter()
        .filter(|(k, _)| !update.iter().any(|(u, _)| u == k))
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    merged.extend(update);
    merged
}

fn renamed(spec: &WorkerSpec, new: &str) -> Result<WorkerSpec, String> {
    apm_compiler::values::check_worker_name(new).map_err(|problem| match problem.help {
        Some(help) => format!("{}: {help}", problem.message),
        None => problem.message,
    })?;
    let settings = merge_settings(
        spec.settings(),
        vec![("name".to_owned(), vec![new.to_owned()])],
    );
    compile_block(&print::worker_with(&settings, spec))
}

/// The config files the registered workers came from, sorted, each once.
async fn files_of(supervisor: &Handle) -> Vec<PathBuf> {
    let statuses = supervisor
        .call(|reply| Command::List { reply })
        .await
        .unwrap_or_default();
    let mut files: Vec<PathBuf> = statuses
        .into_iter()
        .filter_map(|s| match s.origin {
            Origin::File { path } => Some(path),
            Origin::Cli { .. } => None,
        })
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Compiles a loaded config file; one without errors is watched for
/// `auto_reload` and `watch_conf`. The compile runs on a blocking thread:
/// this thread carries the proxy, and a large config takes seconds.
#[expect(
    clippy::result_large_err,
    reason = "the error is the call's answer, made at most once per call"
)]
async fn compile_file(daemon: &Daemon, path: &Path) -> Result<apm_compiler::Compilation, Response> {
    let owned = path.to_path_buf();
    let compilation = tokio::task::spawn_blocking(move || compile_checked(&owned))
        .await
        .map_err(|e| {
            Response::error(
                exit::FAILED,
                format!("compiling {} failed: {e}", path.display()),
            )
        })??;
    daemon.watcher.track(path, &compilation);
    Ok(compilation)
}

/// A config file compiled, with its certificates checked; errors rendered.
#[expect(
    clippy::result_large_err,
    reason = "the error is the call's answer, made at most once per call"
)]
fn compile_checked(path: &Path) -> Result<apm_compiler::Compilation, Response> {
    let mut compilation = compile(path, &FsLoader).map_err(|e| {
        Response::error(
            exit::USAGE,
            format!("cannot read `{}`: {e}", path.display()),
        )
    })?;
    crate::tls_check::check(&mut compilation);
    if compilation.has_errors() {
        return Err(Response::error(
            exit::FAILED,
            format!(
                "{} has errors; nothing was changed\n{}",
                path.display(),
                render::human(&compilation, false)
            ),
        ));
    }
    Ok(compilation)
}

/// A reload nobody waits for (the watcher found it due, or SIGHUP asked
/// for it): what it does, and errors with their file, line and column, go
/// to the daemon log; a file with errors keeps the running config.
async fn reload_logged(daemon: &Daemon, due: watch::Due, why: &str) {
    let (mut plan, specs, block) = match file_plan(daemon, &due.root, false).await {
        Ok(found) => found,
        Err(response) => {
            log(format_args!(
                "{why} of {}: {}",
                due.root.display(),
                response.error.unwrap_or_default().trim_end()
            ));
            return;
        }
    };
    // The daemon's log says why a GUI did not start.
    let _ = follow_daemon_block(daemon, &due.root, block).await;
    if let Some(only) = &due.only {
        plan.steps
            .retain(|step| only.iter().any(|w| w == step.worker()));
    }
    if plan.is_noop() {
        return;
    }
    log(format_args!(
        "{why} of {}:\n{}",
        due.root.display(),
        plan.render().trim_end()
    ));
    for applied in apply(daemon, &due.root, &plan, specs).await {
        if let Some(error) = applied.error {
            log(format_args!(
                "{why}: {} {}: {error}",
                applied.action, applied.worker
            ));
        }
    }
}

/// The plan that reloading `path` would apply, with the file's new specs
/// and its `daemon { }`.
async fn file_plan(
    daemon: &Daemon,
    path: &Path,
    force: bool,
) -> Result<(plan::Plan, Vec<WorkerSpec>, DaemonConfig), Response> {
    let compilation = compile_file(daemon, path).await?;
    let statuses = call(daemon, |reply| Command::List { reply }).await?;
    let mut current = Vec::new();
    for status in statuses.into_iter().filter(|s| {
        s.origin
            == Origin::File {
                path: path.to_path_buf(),
            }
    }) {
        let (_, spec) = call(daemon, |reply| Command::Info {
            name: status.name,
            reply,
        })
        .await?;
        current.push(*spec);
    }
    let new = compilation.config.workers;
    let mut plan = plan::diff(
        &current.iter().collect::<Vec<_>>(),
        &new.iter().collect::<Vec<_>>(),
        force,
    );
    let block = compilation.config.daemon;
    if let Some(applied) = locked(&daemon.daemon_blocks).get(path) {
        plan.daemon = plan::daemon_changes(applied, &block);
    }
    Ok((plan, new, block))
}

/// Which files a reload reads, each with the one worker to reload when the
/// target named a worker.
async fn reload_targets(
    daemon: &Daemon,
    target: ReloadTarget,
) -> Result<Vec<(PathBuf, Option<String>)>, Response> {
    let statuses = call(daemon, |reply| Command::List { reply }).await?;
    let file_of = |origin: &Origin| match origin {
        Origin::File { path } => Some(path.clone()),
        Origin::Cli { .. } => None,
    };
    match target {
        ReloadTarget::Named { name, path } => match statuses.iter().find(|s| s.name == name) {
            Some(status) => match file_of(&status.origin) {
                Some(file) => Ok(vec![(file, Some(name))]),
                None => Err(Response::error(
                    exit::USAGE,
                    format!(
                        "`{name}` was started from the command line, not a file: change it with `apm update {name} …`"
                    ),
                )),
            },
            None if path.is_file() => Ok(vec![(path, None)]),
            None => Err(Response::error(
                exit::USAGE,
                format!("`{name}` is neither a loaded worker nor a config file"),
            )),
        },
        ReloadTarget::All => {
            let files = files_of(&daemon.supervisor).await;
            Ok(files.into_iter().map(|f| (f, None)).collect())
        }
    }
}

/// What applying one step did.
#[derive(serde::Serialize)]
struct Applied {
    worker: String,
    action: &'static str,
    error: Option<String>,
    report: Option<supervisor::StartReport>,
}

/// Applies a plan step by step; a failing worker is reported and the rest
/// of the plan still applies.
async fn apply(
    daemon: &Daemon,
    path: &Path,
    plan: &plan::Plan,
    specs: Vec<WorkerSpec>,
) -> Vec<Applied> {
    let mut applied = Vec::new();
    let mut specs: std::collections::HashMap<String, WorkerSpec> = specs
        .into_iter()
        .map(|spec| (spec.name.value.clone(), spec))
        .collect();
    // Removals first, so a renamed worker's listener is free for its new name.
    let (stops, others): (Vec<&plan::Step>, Vec<&plan::Step>) = plan
        .steps
        .iter()
        .partition(|s| matches!(s, plan::Step::Remove { .. }));
    for step in stops.into_iter().chain(others) {
        let name = step.worker().to_owned();
        // Each worker has one step, so its spec is taken, not cloned.
        let mut spec = || specs.remove(&name).map(Box::new);
        let origin = Origin::File {
            path: path.to_path_buf(),
        };
        let sup = &daemon.supervisor;
        let (action, result) = match step {
            // Certificate files may have new contents under the same paths:
            // an unchanged TLS worker takes them for new connections.
            plan::Step::Unchanged { .. } => match spec().filter(|s| s.tls.value) {
                Some(spec) => {
                    let refreshed = sup
                        .call(|reply| Command::Update {
                            name: name.clone(),
                            spec,
                            origin,
                            environment: None,
                            restart: false,
                            reply,
                        })
                        .await;
                    if let Err(error) = refreshed {
                        log(format_args!(
                            "{name}: cannot reload its certificates: {error}"
                        ));
                    }
                    continue;
                }
                None => continue,
            },
            plan::Step::Start { .. } => match spec() {
                Some(spec) => {
                    let begin = if spec.autostart.value {
                        Begin::Started
                    } else {
                        Begin::Stopped
                    };
                    (
                        "start",
                        sup.call(|reply| Command::Register {
                            name: name.clone(),
                            spec,
                            origin,
                            environment: Environment::default(),
                            begin,
                            reply,
                        })
                        .await,
                    )
                }
                None => continue,
            },
            plan::Step::Remove { .. } => (
                "remove",
                sup.call(|reply| Command::Remove {
                    name: name.clone(),
                    reply,
                })
                .await
                .map(|()| None),
            ),
            plan::Step::Restart { forced: true, .. } => (
                "restart",
                sup.call(|reply| Command::Restart {
                    name: name.clone(),
                    index: None,
                    force: false,
                    reply,
                })
                .await
                .map(Some),
            ),
            plan::Step::Restart { .. } | plan::Step::Update { .. } => match spec() {
                Some(spec) => {
                    let restart = matches!(step, plan::Step::Restart { .. });
                    let action = if restart { "restart" } else { "update" };
                    (
                        action,
                        sup.call(|reply| Command::Update {
                            name: name.clone(),
                            spec,
                            origin,
                            environment: None,
                            restart,
                            reply,
                        })
                        .await,
                    )
                }
                None => continue,
            },
        };
        let (error, report) = match result {
            Ok(report) => (
                report
                    .as_ref()
                    .filter(|r| !r.ok())
                    .map(|_| "failed to start".to_owned()),
                report,
            ),
            Err(e) => (Some(e), None),
        };
        applied.push(Applied {
            worker: name,
            action,
            error,
            report,
        });
    }
    applied
}

/// `apm run` of a name that `apm run` registered before: the worker takes
/// the new block and caller's environment, as a reload takes a file's
/// (only what changed is applied: `-instances` alone scales, live keys
/// apply in place, anything else restarts it), and is started if it is not
/// running. The same block and environment change nothing, so a call the
/// CLI replays after a daemon crash answers as the first would have
/// (docs/cli.md, decision 51).
async fn run_again(
    daemon: &Daemon,
    again: Again,
    spec: WorkerSpec,
) -> Result<Option<supervisor::StartReport>, Response> {
    let Again {
        status,
        current,
        environment,
        start,
        named,
    } = again;
    let name = spec.name.value.clone();
    let same = current == spec && *status.environment == environment;
    // A name that came from the executable's is not a wish to replace
    // another program of that name.
    if !named && !same {
        return Err(Response::error(
            exit::FAILED,
            format!(
                "a worker named `{name}` already exists (this one's name comes from its program): give it another \
                 with `-name`, or change that one with `apm run … -name {name}` or `apm update {name} …`"
            ),
        ));
    }
    if let Origin::File { path } = &status.origin {
        return Err(Response::error(
            exit::FAILED,
            format!(
                "a worker named `{name}` was loaded from {}: change it there and `apm reload {name}`, or with `apm update {name} …`",
                path.display()
            ),
        ));
    }
    let steps = plan::diff(&[&current], &[&spec], false).steps;
    let restart = *status.environment != environment
        || steps
            .iter()
            .any(|step| matches!(step, plan::Step::Restart { .. }));
    let origin = Origin::Cli {
        config: print::worker(&spec),
    };
    let restarted = call(daemon, |reply| Command::Update {
        name: name.clone(),
        spec: Box::new(spec),
        origin,
        environment: Some(environment),
        restart,
        reply,
    })
    .await?;
    if restarted.is_some() || !start {
        return Ok(restarted);
    }
    call(daemon, |reply| Command::Start {
        name,
        index: None,
        reply,
    })
    .await
    .map(Some)
}

/// What `run_again` is given besides the new block.
struct Again {
    status: supervisor::WorkerStatus,
    current: WorkerSpec,
    environment: Environment,
    start: bool,
    /// Whether the caller named the worker (`-name`).
    named: bool,
}

/// `apm saveconf W FILE` has written W into FILE: W is FILE's from now on,
/// so that `apm reload FILE` manages it. Its processes run on; their next
/// start gets the base environment and the file's `env`, as any file's
/// worker (docs/cli.md, decision 54).
async fn attach(daemon: &Daemon, name: String, path: PathBuf) -> Result<Response, Response> {
    let compilation = compile_file(daemon, &path).await?;
    let Some(spec) = compilation
        .config
        .workers
        .into_iter()
        .find(|w| w.name.value == name)
    else {
        return Err(Response::error(
            exit::FAILED,
            format!("{} does not define `{name}`", path.display()),
        ));
    };
    call(daemon, |reply| Command::Update {
        name,
        spec: Box::new(spec),
        origin: Origin::File { path },
        environment: Some(Environment::default()),
        restart: false,
        reply,
    })
    .await?;
    Ok(Response::data(serde_json::Value::Null))
}

/// What a load does with a worker of the file that is registered already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Registered {
    /// Start it unless it runs (`apm load`).
    Start,
    /// Leave it as the state file had it (the daemon's own load of
    /// `config.conf` at its start: a worker stopped before `apm exit
    /// daemon` stays stopped).
    StayAsRestored,
}

/// `apm load`: start the file's workers, skipping those already running.
/// All are registered before any starts, so `depends_on` holds whatever the
/// order of the file.
async fn load(
    daemon: &Daemon,
    path: &Path,
    registered_ones: Registered,
) -> Result<Response, Response> {
    let compilation = compile_file(daemon, path).await?;
    let mut warnings = Vec::new();
    if let Err(e) = follow_daemon_block(daemon, path, compilation.config.daemon.clone()).await {
        // On the terminal too (decisions.md, the daemon, rule 4).
        warnings.push(format!("warning: the GUI was not started: {e}"));
    }
    let unenforced = unbuilt::notes(&compilation.config);
    let existing = call(daemon, |reply| Command::List { reply }).await?;
    let existing: std::collections::HashMap<&str, &supervisor::WorkerStatus> =
        existing.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut to_start = Vec::new();
    let mut registrations = Vec::new();
    // Those not started, each with why, for people.
    let mut skipped: Vec<(String, &str)> = Vec::new();
    let mut notes = Vec::new();
    let this_file = Origin::File {
        path: path.to_path_buf(),
    };
    for spec in compilation.config.workers {
        let name = spec.name.value.clone();
        let autostart = spec.autostart.value;
        let registered = existing.get(name.as_str()).copied();
        // A worker of that name from elsewhere is left as it is, and this
        // file's is not loaded: say so, or "already running" would pass
        // another program off as this file's.
        if let Some(other) = registered.filter(|s| s.origin != this_file) {
            let from = match &other.origin {
                Origin::File { path } => format!("loaded from {}", path.display()),
                Origin::Cli { .. } => "started with `apm run`".to_owned(),
            };
            notes.push(format!(
                "this file's {name} is not loaded: the {name} already registered was {from} (`apm remove {name}` first, or rename one of them)"
            ));
            skipped.push((name, "is not loaded from this file (see the note)"));
            continue;
        }
        const NOT_AUTOSTARTED: &str =
            "is registered, not started (autostart false): `apm start` starts it";
        match registered {
            Some(status) if status.instances.iter().all(|i| i.pid.is_some()) => {
                skipped.push((name, "is already running"));
            }
            Some(_) if registered_ones == Registered::StayAsRestored => {
                skipped.push((name, "stays stopped, as it was"));
            }
            // `autostart false`: registered, started only by `apm start`.
            Some(_) if !autostart => skipped.push((name, NOT_AUTOSTARTED)),
            Some(_) => registrations.push((name, true, None)),
            None => {
                // Sent at once and awaited below: the supervisor handles
                // the registrations as one burst.
                let (supervisor, origin) = (daemon.supervisor.clone(), this_file.clone());
                let register_name = name.clone();
                let registration = tokio::spawn(async move {
                    supervisor
                        .call(|reply| Command::Register {
                            name: register_name,
                            spec: Box::new(spec),
                            origin,
                            environment: Environment::default(),
                            begin: Begin::Stopped,
                            reply,
                        })
                        .await
                });
                if !autostart {
                    skipped.push((name.clone(), NOT_AUTOSTARTED));
                }
                registrations.push((name, autostart, Some(registration)));
            }
        }
    }
    // In the file's order, those registered before among the new ones.
    for (name, autostart, registration) in registrations {
        if let Some(registration) = registration {
            registration
                .await
                .map_err(|e| Response::error(exit::FAILED, e.to_string()))?
                .map_err(|e| Response::error(failure_code(&e), e))?;
        }
        if autostart {
            to_start.push(name);
        }
    }
    let starts: Vec<_> = to_start
        .iter()
        .map(|name| {
            let (supervisor, name) = (daemon.supervisor.clone(), name.clone());
            tokio::spawn(async move {
                supervisor
                    .call(|reply| Command::Start {
                        name,
                        index: None,
                        reply,
                    })
                    .await
            })
        })
        .collect();
    let mut outcomes: Vec<serde_json::Value> = skipped
        .into_iter()
        .map(|(worker, why)| serde_json::json!({ "worker": worker, "report": null, "why": why }))
        .collect();
    for (name, start) in to_start.into_iter().zip(starts) {
        let report = start
            .await
            .map_err(|e| Response::error(exit::FAILED, e.to_string()))?
            .map_err(|e| Response::error(exit::FAILED, e))?;
        outcomes.push(serde_json::json!({ "worker": name, "report": report }));
    }
    let mut response = Response::data(outcomes).noting(notes.into_iter().chain(unenforced));
    response.notices.extend(warnings);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::open_files_note;

    #[test]
    fn the_open_files_note_says_what_the_limit_allows_and_below_a_services_how_to_have_more() {
        assert_eq!(
            open_files_note(1024, 524_288),
            "open files limit raised from 1024 to 524288 (children get 1024): room for about 262144 proxied clients"
        );
        assert_eq!(
            open_files_note(1_048_576, 1_048_576),
            "open files limit 1048576: room for about 524288 proxied clients"
        );
        assert_eq!(
            open_files_note(4096, 524_287),
            "open files limit raised from 4096 to 524287 (children get 4096): room for about 262143 proxied clients; \
             a higher hard limit holds more (as root `ulimit -H -n 524288` before starting the daemon, or \
             LimitNOFILE= in its systemd unit)"
        );
    }
}
