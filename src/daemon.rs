//! The daemon: owns the control socket and the supervisor, restores what a
//! previous daemon left, and answers the CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use apm_compiler::ir::WorkerSpec;
use apm_compiler::loader::{FsLoader, Overlay};
use apm_compiler::{compile, plan, print, render};
use apm_runtime::state::{self, Origin, SavedProcess, SavedWorker};
use apm_runtime::supervisor::{self, Command, Handle, Supervisor};
use apm_runtime::{locked, log, procfs, unbuilt};
use nix::sys::signal::Signal;
use nix::unistd::Uid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::client::{self, Place};
use crate::exit;
use crate::protocol::{Call, PROTOCOL, Pong, ReloadTarget, Request, Response, VERSION};
use crate::watch::{self, Watcher};

#[path = "gui.rs"]
mod gui;

/// A request line longer than this is refused.
const MAX_REQUEST: u64 = 1 << 20;
/// How long orphans of a crashed daemon get to end after SIGTERM.
const ORPHAN_GRACE: Duration = Duration::from_secs(3);

/// Who may use the socket (decisions: the daemon, rule 2).
struct Access {
    owner: Uid,
    allow_group: Option<String>,
}

impl Access {
    fn admits(&self, uid: Uid) -> bool {
        if uid.is_root() || uid == self.owner {
            return true;
        }
        let Some(group) = self.allow_group.as_deref() else {
            return false;
        };
        let Ok(Some(group)) = nix::unistd::Group::from_name(group) else {
            return false;
        };
        let Ok(Some(user)) = nix::unistd::User::from_uid(uid) else {
            return false;
        };
        user.gid == group.gid || group.mem.contains(&user.name)
    }

    fn refusal(&self, uid: Uid) -> String {
        let group = match &self.allow_group {
            Some(g) => format!(", and members of group `{g}` (allow_group)"),
            None => String::new(),
        };
        format!(
            "permission denied: this apm daemon serves root and its owner (uid {}){group}; you are uid {uid}. \
             Run apm as that user, or set `daemon {{ allow_group NAME; }}` in its config",
            self.owner
        )
    }
}

struct Daemon {
    place: Place,
    supervisor: Handle,
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
}

pub fn run(place: Place, detach: bool) -> u8 {
    if detach {
        // Its own session: no terminal, and no signal of the CLI's group reaches it.
        let _ = nix::unistd::setsid();
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
    runtime.block_on(serve(place))
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
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let owner = match client::call(place, Call::Ping, false) {
                Ok(response) => serde_json::from_value::<Pong>(response.data)
                    .map_or("another process".to_owned(), |p| format!("pid {}", p.pid)),
                Err(_) => "another process".to_owned(),
            };
            Err(format!(
                "an apm daemon already runs on @{} ({owner}); stop it with `apm exit daemon`",
                place.socket
            ))
        }
        Err(e) => Err(format!("cannot listen on @{}: {e}", place.socket)),
    }
}

async fn serve(place: Place) -> u8 {
    if let Err(e) = std::fs::create_dir_all(&place.home) {
        log(format_args!(
            "apm: cannot create {}: {e}",
            place.home.display()
        ));
        return exit::FAILED;
    }
    let _ = std::fs::set_permissions(&place.home, std::fs::Permissions::from_mode(0o700));
    let listener = match bind(&place) {
        Ok(listener) => listener,
        Err(message) => {
            log(format_args!("apm: {message}"));
            return exit::FAILED;
        }
    };
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
        Ok((soft, raised)) if raised > soft => log(format_args!(
            "open files limit raised from {soft} to {raised} (children get {soft})"
        )),
        Ok(_) => {}
        Err(e) => log(format_args!("cannot raise the open files limit: {e}")),
    }
    let supervisor = Supervisor::spawn(&place.home);
    let access = Access {
        owner: nix::unistd::geteuid(),
        allow_group: allow_group(&place.home),
    };
    let (watcher, mut due) = Watcher::start();
    let daemon = Arc::new_cyclic(|this| Daemon {
        place,
        supervisor,
        access,
        exit: Notify::new(),
        watcher,
        notice: std::sync::OnceLock::new(),
        this: this.clone(),
        gui: std::sync::Mutex::default(),
        gui_settings: std::sync::Mutex::default(),
    });
    let reloading = daemon.clone();
    tokio::spawn(async move {
        while let Some(due) = due.recv().await {
            reload_logged(&reloading, due, "auto reload").await;
        }
    });
    restore(&daemon).await;
    let loading = daemon.clone();
    tokio::spawn(async move { load_user_config(&loading).await });

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
    let mut errors = apm_runtime::AcceptErrors::default();
    let control = format!("@{}", daemon.place.socket);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(daemon.clone(), stream));
                }
                Err(e) => errors.failed(e, &control).await,
            },
            _ = terminate.recv() => { shutdown(&daemon, "SIGTERM").await; break; }
            _ = interrupt.recv() => { shutdown(&daemon, "SIGINT").await; break; }
            _ = hangup.recv() => { tokio::spawn(reload_all_logged(daemon.clone())); }
            _ = daemon.exit.notified() => break,
        }
    }
    let _ = std::fs::remove_file(&pid_file);
    log(format_args!("daemon stopped"));
    exit::OK
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

async fn shutdown(daemon: &Daemon, why: &str) {
    log(format_args!("{why}: stopping every worker"));
    let _ = daemon
        .supervisor
        .call(|reply| Command::Shutdown { reply })
        .await;
    // The workers' last state, written by the state thread, must not be
    // cut off by the process's end, nor land after the daemon is gone.
    if let Err(e) = daemon.supervisor.saved().await {
        log(format_args!("the final state was not saved: {e}"));
    }
}

/// `allow_group` from `$APM_HOME/config.conf`, when it sets one.
fn allow_group(home: &Path) -> Option<String> {
    let compilation = compile(&home.join("config.conf"), &FsLoader).ok()?;
    compilation.config.daemon.allow_group.map(|g| g.value)
}

/// Ends the processes a crashed daemon left and registers its workers again,
/// starting those that were meant to run.
async fn restore(daemon: &Daemon) {
    let path = daemon.place.home.join("state.json");
    let saved = match state::load(&path) {
        Ok(Some(saved)) => saved,
        Ok(None) => return,
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
            return;
        }
    };
    let processes: Vec<SavedProcess> = saved
        .workers
        .iter()
        .flat_map(|w| w.processes.iter().copied())
        .collect();
    let ended = supervisor::end_orphans(&processes, ORPHAN_GRACE).await;
    if ended > 0 {
        log(format_args!(
            "ended {ended} process(es) left by the previous daemon"
        ));
    }
    let mut to_start = Vec::new();
    let mut unrestored = Vec::new();
    let mut as_last_run = Vec::new();
    for worker in saved.workers {
        let (name, running) = (worker.name.clone(), worker.running);
        let restored = match restorable(&worker) {
            Ok((spec, broken_file)) => daemon
                .supervisor
                .call(|reply| Command::Register {
                    name: name.clone(),
                    spec: Box::new(spec),
                    origin: worker.origin,
                    start: false,
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
    // Files that workers came from are watched again, as when they were loaded.
    for file in files_of(&daemon.supervisor).await {
        let _ = compile_file(daemon, &file).await;
    }
    for name in to_start {
        let supervisor = daemon.supervisor.clone();
        tokio::spawn(async move {
            let _ = supervisor
                .call(|reply| Command::Start { name, reply })
                .await;
        });
    }
}

/// The per-user config, `$APM_HOME/config.conf`, is loaded when the daemon
/// starts; workers already restored from the state file are left alone.
async fn load_user_config(daemon: &Daemon) {
    let path = daemon.place.home.join("config.conf");
    if !path.is_file() {
        return;
    }
    match load(daemon, &path).await {
        Ok(_) => log(format_args!("loaded {}", path.display())),
        Err(response) => log(format_args!(
            "cannot load {}: {}",
            path.display(),
            response.error.unwrap_or_default()
        )),
    }
}

/// A loaded file that sets `gui_port` starts the GUI with its settings (or
/// restarts it, if they changed); a failure is logged, the load goes on.
async fn follow_gui_settings(daemon: &Daemon, settings: gui::Settings) {
    *locked(&daemon.gui_settings) = Some(settings.clone());
    if locked(&daemon.gui)
        .as_ref()
        .is_some_and(|g| g.settings == settings)
    {
        return;
    }
    // Settings it refuses leave a running GUI as it is.
    if let Some(refused) = gui::refusal(&settings) {
        log(format_args!("GUI not started: {refused}"));
        return;
    }
    match start_gui(daemon, settings).await {
        Ok(url) => log(format_args!("GUI on {url}")),
        Err(e) => log(format_args!("GUI not started: {e}")),
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
    if let Some(url) = locked(&daemon.gui).as_ref().map(|g| g.url.clone()) {
        return Response::data(serde_json::json!({ "url": url }));
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
            Response::data(serde_json::json!({ "url": url }))
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

/// The spec to restore a saved worker with: from its file as the file is
/// now, or, when the file cannot be read or has errors (edited while the
/// daemon was down), from the block it last ran with, and then why. A
/// file that compiles but no longer defines the worker has let it go.
fn restorable(worker: &SavedWorker) -> Result<(WorkerSpec, Option<String>), String> {
    let path = match &worker.origin {
        Origin::Cli { config } => return compile_block(config).map(|spec| (spec, None)),
        Origin::File { path } => path,
    };
    let broken = match compile(path, &FsLoader) {
        Err(e) => format!("cannot read {}: {e}", path.display()),
        Ok(compilation) if compilation.has_errors() => format!(
            "{} has errors:\n{}",
            path.display(),
            render::human(&compilation, false)
        ),
        Ok(compilation) => {
            return compilation
                .config
                .workers
                .into_iter()
                .find(|w| w.name.value == worker.name)
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
    let (read, mut write) = stream.into_split();
    // Refused before anything is read: a client that may not drive the
    // daemon must not hold it waiting for a line either.
    let response = if !daemon.access.admits(uid) {
        log(format_args!("refused a client of uid {uid}"));
        Response::error(exit::UNREACHABLE, daemon.access.refusal(uid))
    } else {
        let mut line = String::new();
        if BufReader::new(read.take(MAX_REQUEST))
            .read_line(&mut line)
            .await
            .is_err()
        {
            return;
        }
        match serde_json::from_str::<Request>(&line) {
            Ok(request) if request.protocol == PROTOCOL => dispatch(&daemon, request.call).await,
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
    let mut bytes = serde_json::to_vec(&response).unwrap_or_default();
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

fn result<T: serde::Serialize>(result: Result<T, String>, failure: u8) -> Response {
    match result {
        Ok(data) => Response::data(data),
        Err(message) => Response::error(failure, message),
    }
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
        Call::Run { config, start } => {
            let spec = compile_block(&config).map_err(|e| Response::error(exit::FAILED, e))?;
            let name = spec.name.value.clone();
            let origin = Origin::Cli {
                config: print::worker(&spec),
            };
            let unenforced = unbuilt::worker_note(&spec);
            result(
                sup.call(|reply| Command::Register {
                    name,
                    spec: Box::new(spec),
                    origin,
                    start,
                    reply,
                })
                .await,
                exit::FAILED,
            )
            .noting(unenforced)
        }
        Call::Load { path } => load(daemon, &path).await?,
        Call::Unload { path } => {
            daemon.watcher.forget(&path);
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
        Call::Start { name } => {
            Response::data(call(daemon, |reply| Command::Start { name, reply }).await?)
        }
        Call::Stop { name } => {
            Response::data(call(daemon, |reply| Command::Stop { name, reply }).await?)
        }
        Call::Restart { name } => {
            Response::data(call(daemon, |reply| Command::Restart { name, reply }).await?)
        }
        Call::RestartAll => {
            let statuses = call(daemon, |reply| Command::List { reply }).await?;
            let mut reports = Vec::new();
            for status in statuses {
                reports.push(
                    call(daemon, |reply| Command::Restart {
                        name: status.name,
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
            Response::data(
                call(daemon, |reply| Command::Rename {
                    old: name,
                    new,
                    origin,
                    reply,
                })
                .await?,
            )
        }
        Call::Copy { name, new } => {
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
                    start: true,
                    reply,
                })
                .await?,
            )
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
            let (plan, _) = file_plan(daemon, &path, force).await?;
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
                let (mut plan, specs) = file_plan(daemon, &path, force).await?;
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
                    apply(daemon, &path, &plan, specs).await
                };
                reloads.push(serde_json::json!({ "file": path, "text": plan.render(), "plan": plan, "applied": applied }));
            }
            Response::data(reloads).noting(unenforced)
        }
        Call::Gui { stop } => gui_call(daemon, stop).await,
        Call::Exit => {
            shutdown(daemon, "apm exit daemon").await;
            daemon.exit.notify_one();
            Response::data(pong(daemon))
        }
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
    let (mut plan, specs) = match file_plan(daemon, &due.root, false).await {
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

/// The plan that reloading `path` would apply, with the file's new specs.
async fn file_plan(
    daemon: &Daemon,
    path: &Path,
    force: bool,
) -> Result<(plan::Plan, Vec<WorkerSpec>), Response> {
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
    let plan = plan::diff(
        &current.iter().collect::<Vec<_>>(),
        &new.iter().collect::<Vec<_>>(),
        force,
    );
    Ok((plan, new))
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
    // Stops first, so a renamed worker's listener is free for its new name.
    let (stops, others): (Vec<&plan::Step>, Vec<&plan::Step>) = plan
        .steps
        .iter()
        .partition(|s| matches!(s, plan::Step::Stop { .. }));
    for step in stops.into_iter().chain(others) {
        let name = step.worker().to_owned();
        let spec = || {
            specs
                .iter()
                .find(|s| s.name.value == name)
                .cloned()
                .map(Box::new)
        };
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
                    let start = spec.autostart.value;
                    (
                        "start",
                        sup.call(|reply| Command::Register {
                            name: name.clone(),
                            spec,
                            origin,
                            start,
                            reply,
                        })
                        .await,
                    )
                }
                None => continue,
            },
            plan::Step::Stop { .. } => (
                "stop",
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

/// `apm load`: start the file's workers, skipping those already running.
/// All are registered before any starts, so `depends_on` holds whatever the
/// order of the file.
async fn load(daemon: &Daemon, path: &Path) -> Result<Response, Response> {
    let compilation = compile_file(daemon, path).await?;
    if compilation.config.daemon.gui_port.value != 0 {
        follow_gui_settings(daemon, gui::Settings::of(&compilation.config.daemon)).await;
    }
    let unenforced = unbuilt::notes(&compilation.config);
    let existing = call(daemon, |reply| Command::List { reply }).await?;
    let mut to_start = Vec::new();
    let mut skipped = Vec::new();
    let mut notes = Vec::new();
    let this_file = Origin::File {
        path: path.to_path_buf(),
    };
    for spec in compilation.config.workers {
        let name = spec.name.value.clone();
        let autostart = spec.autostart.value;
        let registered = existing.iter().find(|s| s.name == name);
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
        }
        match registered {
            Some(status) if status.instances.iter().all(|i| i.pid.is_some()) => skipped.push(name),
            // `autostart false`: registered, started only by `apm start`.
            Some(_) if !autostart => skipped.push(name),
            Some(_) => to_start.push(name),
            None => {
                call(daemon, |reply| Command::Register {
                    name: name.clone(),
                    spec: Box::new(spec),
                    origin: this_file.clone(),
                    start: false,
                    reply,
                })
                .await?;
                if autostart {
                    to_start.push(name);
                } else {
                    skipped.push(name);
                }
            }
        }
    }
    let starts: Vec<_> = to_start
        .iter()
        .map(|name| {
            let (supervisor, name) = (daemon.supervisor.clone(), name.clone());
            tokio::spawn(async move {
                supervisor
                    .call(|reply| Command::Start { name, reply })
                    .await
            })
        })
        .collect();
    let mut outcomes: Vec<serde_json::Value> = skipped
        .into_iter()
        .map(|worker| serde_json::json!({ "worker": worker, "report": null }))
        .collect();
    for (name, start) in to_start.into_iter().zip(starts) {
        let report = start
            .await
            .map_err(|e| Response::error(exit::FAILED, e.to_string()))?
            .map_err(|e| Response::error(exit::FAILED, e))?;
        outcomes.push(serde_json::json!({ "worker": name, "report": report }));
    }
    Ok(Response::data(outcomes).noting(notes.into_iter().chain(unenforced)))
}
