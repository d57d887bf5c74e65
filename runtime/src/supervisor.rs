//! The supervisor: one task owns every worker. Commands from the control
//! socket and events from children and timers arrive on one channel; each
//! event goes through the instance's `Lifecycle`, and the effects it returns
//! are performed here. Nothing else touches processes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apm_compiler::ir::WorkerSpec;
use apm_compiler::values::ServerUrl;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::lifecycle::{Effect, Event, ExitStatus, Lifecycle, Phase, Policy};
use crate::logs::{self, LogFiles, Stream, Target};
use crate::proxy::Backend;
use crate::state::{Origin, SavedProcess, SavedWorker, Saver, State};
use crate::{procfs, sys};

/// One instance's state, as `list` and `info` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub index: usize,
    pub status: String,
    pub pid: Option<u32>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub last_exit: Option<String>,
    /// For a worker with `server` lines: whether the proxy sends this
    /// instance traffic (it runs, and accepts on its port or said `ready`).
    #[serde(default)]
    pub serving: Option<bool>,
    /// For a worker with `health_check`: whether this process has passed
    /// a check.
    #[serde(default)]
    pub healthy: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub status: String,
    /// The desired state.
    pub enabled: bool,
    pub instances: Vec<InstanceStatus>,
    pub origin: Origin,
    pub out_log: PathBuf,
    pub err_log: PathBuf,
    /// Vanguard's decisions and current bans, for workers with rules.
    pub vanguard: Option<crate::vanguard::Stats>,
}

/// How the instances of a worker came through their start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartReport {
    pub worker: String,
    pub instances: Vec<InstanceStart>,
    /// Set when the start waited for `depends_on` and gave up waiting.
    pub dependency_timeout: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceStart {
    pub index: usize,
    pub pid: Option<u32>,
    pub ok: bool,
    /// How it ended, when it did not come up.
    pub exit: Option<String>,
    pub uptime_ms: u64,
    /// The first bytes of its stderr, when its first attempt failed.
    pub stderr: String,
    pub error: Option<String>,
    /// Augur's reading of a failed start.
    #[serde(default)]
    pub diagnosis: Option<crate::augur::Diagnosis>,
}

impl StartReport {
    pub fn ok(&self) -> bool {
        self.instances.iter().all(|i| i.ok)
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, String>>;

pub enum Command {
    Register {
        name: String,
        spec: Box<WorkerSpec>,
        origin: Origin,
        start: bool,
        reply: Reply<Option<StartReport>>,
    },
    Start {
        name: String,
        reply: Reply<StartReport>,
    },
    Stop {
        name: String,
        reply: Reply<()>,
    },
    Restart {
        name: String,
        reply: Reply<StartReport>,
    },
    Remove {
        name: String,
        reply: Reply<()>,
    },
    Update {
        name: String,
        spec: Box<WorkerSpec>,
        origin: Origin,
        restart: bool,
        reply: Reply<Option<StartReport>>,
    },
    Rename {
        old: String,
        new: String,
        origin: Origin,
        reply: Reply<()>,
    },
    Signal {
        name: String,
        index: Option<usize>,
        signal: Signal,
        reply: Reply<Vec<u32>>,
    },
    /// Answered once every message before it is handled (`Handle::saved`).
    Handed {
        reply: Reply<()>,
    },
    List {
        reply: Reply<Vec<WorkerStatus>>,
    },
    Info {
        name: String,
        reply: Reply<(WorkerStatus, Box<WorkerSpec>)>,
    },
    Wait {
        name: String,
        timeout: Duration,
        reply: Reply<()>,
    },
    StopAll {
        reply: Reply<()>,
    },
    /// Stops every process but keeps each worker's desired state, so a new
    /// daemon brings them back.
    Shutdown {
        reply: Reply<()>,
    },
}

enum Msg {
    Command(Command),
    Event {
        id: u64,
        event: Event,
    },
    /// A worker's wait for `depends_on` may have run out.
    Recheck,
    /// A file the worker's `watch` patterns match changed.
    Changed {
        name: String,
        file: PathBuf,
    },
    /// What the health check of an instance's process `pid` found.
    Health {
        id: u64,
        pid: u32,
        verdict: crate::health::Verdict,
    },
}

#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    saved: Arc<crate::state::Progress>,
}

impl Handle {
    /// Sends a command built around a reply channel and awaits the reply.
    pub async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Command(command(reply)))
            .map_err(|_| "the supervisor has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the supervisor has stopped".to_owned())?
    }

    /// Waits until the state file holds every change answered so far.
    pub async fn saved(&self) -> Result<(), String> {
        // Messages are handled in order, each with its changes handed to
        // the state thread before the next: once this one is answered,
        // every change answered before it has been handed over.
        self.call(|reply| Command::Handed { reply }).await?;
        self.saved.caught_up().await
    }
}

struct Instance {
    id: u64,
    index: usize,
    life: Lifecycle,
    start_ticks: Option<u64>,
    started: Option<Instant>,
    stderr_head: Arc<Mutex<Vec<u8>>>,
    spawn_error: Option<String>,
    last_exit: Option<ExitStatus>,
    cpu_sample: Option<(u64, Instant)>,
    /// Where the current process's stdout and stderr lines go.
    targets: Option<(watch::Sender<Target>, watch::Sender<Target>)>,
    /// The loopback port of the current process, with `upstream port`.
    port: Option<Port>,
    /// The current process's connector channel, with `upstream connector`.
    link: Option<Arc<crate::connector::Link>>,
    /// The current process's health check, with `health_check`.
    health: Option<crate::health::Check>,
    /// Its memory cgroup, with `memory_limit`.
    cgroup: Option<crate::cgroup::Group>,
    /// Whether the current process has passed a health check.
    healthy: bool,
}

/// An instance's loopback port with `upstream port`. It gets traffic once
/// the process accepts connections on it.
impl Instance {
    /// How the proxy reaches this instance, while it may get traffic.
    fn backend(&self) -> Option<Backend> {
        if !matches!(self.life.phase, Phase::Running { .. }) {
            return None;
        }
        match (&self.link, &self.port) {
            (Some(link), _) => link.is_ready().then(|| Backend::Connector(link.clone())),
            (None, Some(port)) => port.accepting().then_some(Backend::Port(port.address)),
            (None, None) => None,
        }
    }
}

struct Port {
    address: std::net::SocketAddr,
    accepting: Arc<std::sync::atomic::AtomicBool>,
}

impl Port {
    fn new(number: u16) -> Port {
        Port {
            address: std::net::SocketAddr::from(([127, 0, 0, 1], number)),
            accepting: Arc::default(),
        }
    }

    fn accepting(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Tries to connect until the process accepts, then has the listeners
    /// updated. Ends when the instance moves on to another process.
    fn probe(&self, tx: mpsc::UnboundedSender<Msg>) {
        let (address, accepting) = (self.address, self.accepting.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(5);
            while Arc::strong_count(&accepting) > 1 {
                if tokio::net::TcpStream::connect(address).await.is_ok() {
                    accepting.store(true, std::sync::atomic::Ordering::Release);
                    let _ = tx.send(Msg::Recheck);
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        });
    }
}

struct Worker {
    spec: Arc<WorkerSpec>,
    /// For a worker from a file, `spec` as a `worker { }` block, which the
    /// state file keeps to restore it from (a CLI worker's origin is one).
    file_block: Option<String>,
    policy: Policy,
    origin: Origin,
    /// The desired state.
    enabled: bool,
    instances: Vec<Instance>,
    /// While set, the worker waits for its `depends_on` until this instant.
    deps_deadline: Option<Instant>,
    /// The running instances' addresses, for the proxy's listeners.
    routes: watch::Sender<crate::proxy::Route>,
    /// Its Vanguard, kept (with its rate state and bans) while the rules stay.
    guard: Option<crate::proxy::Guard>,
    /// Its TLS setup, rebuilt when its TLS keys change (new connections use it).
    tls: crate::proxy::TlsSetting,
    deps_timed_out: bool,
    /// A rolling restart under way (`rolling`).
    rolling: Option<Rolling>,
    /// Its health check settings, which its processes' checks follow.
    health_settings: watch::Sender<crate::health::Settings>,
    /// Where its lines go too, with `syslog`.
    syslog: Option<Arc<crate::syslog::Sink>>,
    /// Its metrics reporter, with `statsd { }`.
    statsd: Option<crate::statsd::Reporter>,
}

/// A rolling restart: instance `current` was restarted at `since`; the
/// next one is once it serves and `rolling_delay` has passed.
struct Rolling {
    current: usize,
    since: Instant,
    next_at: Option<Instant>,
    /// Whether a wake-up at the deadline of `current` is set.
    deadline_set: bool,
}

impl Rolling {
    fn at(current: usize, now: Instant) -> Rolling {
        Rolling {
            current,
            since: now,
            next_at: None,
            deadline_set: false,
        }
    }
}

/// How long a rolling restart waits, beyond the instance's stop and
/// `startup_grace`, for a restarted instance to take traffic (accept on its
/// port, say ready on its connector, pass a health check) before it stops,
/// leaving the others as they are.
const ROLLING_PATIENCE: Duration = Duration::from_secs(30);

enum Waiter {
    Start {
        name: String,
        reply: Reply<StartReport>,
    },
    Stop {
        name: String,
        reply: Reply<()>,
    },
    Remove {
        name: String,
        reply: Reply<()>,
    },
    Running {
        name: String,
        deadline: Instant,
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

pub struct Supervisor {
    workers: BTreeMap<String, Worker>,
    /// Instance id → (worker name, index).
    ids: HashMap<u64, (String, usize)>,
    next_id: u64,
    tx: mpsc::UnboundedSender<Msg>,
    home: PathBuf,
    logs: LogFiles,
    saver: Saver,
    waiters: Vec<Waiter>,
    dirty: bool,
    /// The proxy's listeners by address, each with the worker it serves.
    listeners: HashMap<String, (String, crate::proxy::Listener)>,
    /// Listener addresses already reported as unusable, to say it once.
    warned_listeners: Vec<String>,
    /// The file watches of the workers with `watch` patterns, by worker.
    watching: HashMap<String, Watching>,
    /// The endpoint push-mode health checks call, once one is needed.
    check_ins: Option<crate::health::Endpoint>,
    /// Workers whose `memory_limit` could not be enforced, to say it once.
    warned_memory: Vec<String>,
}

/// A worker's file watch and what it was made from.
struct Watching {
    /// The spec it was made for; another one is looked at again.
    source: Arc<WorkerSpec>,
    spec: crate::filewatch::WatchSpec,
    /// None when it could not start (said once, in the daemon log).
    #[expect(dead_code, reason = "held: the watch ends when it is dropped")]
    watch: Option<crate::filewatch::FileWatch>,
}

impl Supervisor {
    /// Starts the supervisor task; `home` is `APM_HOME`.
    pub fn spawn(home: &Path) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        let saver = Saver::spawn(home.join("state.json"));
        let saved = saver.progress();
        let supervisor = Supervisor {
            workers: BTreeMap::new(),
            ids: HashMap::new(),
            next_id: 0,
            tx: tx.clone(),
            home: home.to_path_buf(),
            logs: LogFiles::default(),
            saver,
            waiters: Vec::new(),
            dirty: false,
            listeners: HashMap::new(),
            warned_listeners: Vec::new(),
            watching: HashMap::new(),
            check_ins: None,
            warned_memory: Vec::new(),
        };
        tokio::spawn(supervisor.run(rx));
        Handle { tx, saved }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Command(command) => self.command(command),
                Msg::Event { id, event } => self.event(id, event),
                Msg::Recheck => {}
                Msg::Changed { name, file } => self.changed(&name, &file),
                Msg::Health { id, pid, verdict } => self.health(id, pid, verdict),
            }
            self.settle();
        }
    }

    /// After every message: dependency waits, shrinking workers, waiters, state file.
    fn settle(&mut self) {
        self.start_ready_dependents();
        self.advance_rolling();
        self.drop_retired_instances();
        self.answer_waiters();
        // After the waiters: a removed worker's listener closes before the
        // CLI hears that it is gone.
        self.reconcile_listeners();
        self.reconcile_watches();
        self.publish_backends();
        self.publish_stats();
        if std::mem::take(&mut self.dirty) {
            self.saver.save(self.snapshot());
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Register {
                name,
                spec,
                origin,
                start,
                reply,
            } => {
                if self.workers.contains_key(&name) {
                    let _ = reply.send(Err(format!("a worker named `{name}` already exists")));
                    return;
                }
                self.insert(name.clone(), *spec, origin, false);
                if start {
                    self.start(&name);
                    self.waiters.push(Waiter::Start {
                        name,
                        reply: remap(reply, Some),
                    });
                } else {
                    let _ = reply.send(Ok(None));
                }
            }
            Command::Start { name, reply } => {
                let Some(reply) = self.checked(&name, reply) else {
                    return;
                };
                self.start(&name);
                self.waiters.push(Waiter::Start { name, reply });
            }
            Command::Stop { name, reply } => {
                let Some(reply) = self.checked(&name, reply) else {
                    return;
                };
                self.stop(&name, true);
                self.waiters.push(Waiter::Stop { name, reply });
            }
            Command::Restart { name, reply } => {
                let Some(reply) = self.checked(&name, reply) else {
                    return;
                };
                self.restart(&name);
                self.waiters.push(Waiter::Start { name, reply });
            }
            Command::Remove { name, reply } => {
                let Some(reply) = self.checked(&name, reply) else {
                    return;
                };
                self.stop(&name, true);
                self.waiters.push(Waiter::Remove { name, reply });
            }
            Command::Update {
                name,
                spec,
                origin,
                restart,
                reply,
            } => self.update(name, *spec, origin, restart, reply),
            Command::Rename {
                old,
                new,
                origin,
                reply,
            } => {
                let result = self.rename(&old, &new, origin);
                let _ = reply.send(result);
            }
            Command::Signal {
                name,
                index,
                signal,
                reply,
            } => {
                let _ = reply.send(self.signal(&name, index, signal));
            }
            Command::Handed { reply } => {
                let _ = reply.send(Ok(()));
            }
            Command::List { reply } => {
                let names: Vec<String> = self.workers.keys().cloned().collect();
                let _ = reply.send(Ok(names.iter().map(|n| self.status(n)).collect()));
            }
            Command::Info { name, reply } => {
                let result = self.exists(&name).map(|_| {
                    let spec = Box::new(self.workers[&name].spec.as_ref().clone());
                    (self.status(&name), spec)
                });
                let _ = reply.send(result);
            }
            Command::Wait {
                name,
                timeout,
                reply,
            } => {
                let Some(reply) = self.checked(&name, reply) else {
                    return;
                };
                let deadline = Instant::now() + timeout;
                self.wake_at(deadline);
                self.waiters.push(Waiter::Running {
                    name,
                    deadline,
                    reply,
                });
            }
            Command::StopAll { reply } => {
                let names: Vec<String> = self.workers.keys().cloned().collect();
                for name in &names {
                    self.stop(name, true);
                }
                self.waiters.push(Waiter::Shutdown { reply });
            }
            Command::Shutdown { reply } => {
                let names: Vec<String> = self.workers.keys().cloned().collect();
                for name in &names {
                    self.stop(name, false);
                }
                self.waiters.push(Waiter::Shutdown { reply });
            }
        }
    }

    /// The reply back when the worker exists; otherwise it is answered with
    /// the error here.
    fn checked<T>(&self, name: &str, reply: Reply<T>) -> Option<Reply<T>> {
        match self.exists(name) {
            Ok(()) => Some(reply),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }

    fn exists(&self, name: &str) -> Result<(), String> {
        if self.workers.contains_key(name) {
            Ok(())
        } else {
            Err(format!("no worker named `{name}`"))
        }
    }

    fn new_instance(&mut self, name: &str, index: usize) -> Instance {
        self.next_id += 1;
        self.ids.insert(self.next_id, (name.to_owned(), index));
        Instance {
            id: self.next_id,
            index,
            life: Lifecycle::default(),
            start_ticks: None,
            started: None,
            stderr_head: Arc::default(),
            spawn_error: None,
            last_exit: None,
            cpu_sample: None,
            targets: None,
            port: None,
            link: None,
            health: None,
            healthy: false,
            cgroup: None,
        }
    }

    /// Adds a worker; with `enabled` it is marked to run but not started.
    fn insert(&mut self, name: String, spec: WorkerSpec, origin: Origin, enabled: bool) {
        let count = spec.instances.value as usize;
        let instances = (0..count).map(|i| self.new_instance(&name, i)).collect();
        let worker = Worker {
            policy: Policy::from_spec(&spec),
            guard: guard_for(&spec),
            tls: tls_for(&name, &spec),
            health_settings: watch::channel(health_settings(&spec)).0,
            syslog: syslog_for(&name, &spec),
            statsd: statsd_for(&name, &spec),
            file_block: file_block(&spec, &origin),
            spec: Arc::new(spec),
            origin,
            enabled,
            instances,
            deps_deadline: None,
            deps_timed_out: false,
            rolling: None,
            routes: watch::channel(crate::proxy::Route::default()).0,
        };
        self.workers.insert(name, worker);
        self.dirty = true;
    }

    fn deps_running(&self, worker: &Worker) -> bool {
        worker.spec.depends_on.iter().all(|dep| {
            self.workers.get(&dep.value).is_some_and(|d| {
                d.instances
                    .iter()
                    .all(|i| matches!(i.life.phase, Phase::Running { .. }))
            })
        })
    }

    fn start(&mut self, name: &str) {
        let now = Instant::now();
        let Some(worker) = self.workers.get(name) else {
            return;
        };
        let waits = !self.deps_running(worker);
        let timeout = worker.spec.depends_timeout.as_duration();
        let worker = self.workers.get_mut(name).expect("checked above");
        worker.enabled = true;
        worker.deps_timed_out = false;
        self.dirty = true;
        if waits {
            worker.deps_deadline = Some(now + timeout);
            self.wake_at(now + timeout);
            return;
        }
        self.send_all(name, Event::Start);
    }

    fn stop(&mut self, name: &str, disable: bool) {
        if let Some(worker) = self.workers.get_mut(name) {
            worker.deps_deadline = None;
            worker.rolling = None;
            if disable {
                worker.enabled = false;
                self.dirty = true;
            }
        }
        self.send_all(name, Event::Stop);
    }

    fn restart(&mut self, name: &str) {
        let Some(worker) = self.workers.get_mut(name) else {
            return;
        };
        worker.enabled = true;
        self.dirty = true;
        // Rolling keeps some instances serving; with none running there is
        // nothing to keep, and they all start at once.
        let serving = worker
            .instances
            .iter()
            .any(|i| matches!(i.life.phase, Phase::Running { .. }));
        if worker.spec.rolling.value && worker.instances.len() > 1 && serving {
            worker.rolling = Some(Rolling::at(0, Instant::now()));
            self.step(name, 0, Event::Restart);
        } else {
            worker.rolling = None;
            self.send_all(name, Event::Restart);
        }
    }

    /// Moves rolling restarts on: the next instance restarts once the one
    /// restarted before it serves and `rolling_delay` has passed. One that
    /// does not come back stops the rolling restart, so the instances not
    /// yet restarted keep serving with their previous process.
    fn advance_rolling(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.rolling.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let worker = self.workers.get_mut(&name).expect("listed above");
            let rolling = worker.rolling.as_mut().expect("listed above");
            let Some(instance) = worker.instances.get(rolling.current) else {
                worker.rolling = None;
                continue;
            };
            let spec = &worker.spec;
            let serves = (spec.server.is_empty() || instance.backend().is_some())
                && (spec.health_check.is_none() || instance.healthy);
            let deadline = rolling.since
                + spec.drain_timeout.as_duration()
                + spec.kill_timeout.as_duration()
                + spec.startup_grace.as_duration()
                + ROLLING_PATIENCE;
            let mut next = None;
            let mut wake = None;
            match instance.life.phase {
                Phase::Running { .. } if serves => match rolling.next_at {
                    None => {
                        let at = now + spec.rolling_delay.as_duration();
                        rolling.next_at = Some(at);
                        wake = Some(at);
                    }
                    Some(at) if now >= at => {
                        *rolling = Rolling::at(rolling.current + 1, now);
                        next = Some(rolling.current);
                    }
                    Some(_) => {}
                },
                Phase::Starting { .. }
                | Phase::Running { .. }
                | Phase::Stopping { .. }
                | Phase::Draining { .. }
                    if now < deadline =>
                {
                    if !std::mem::replace(&mut rolling.deadline_set, true) {
                        wake = Some(deadline);
                    }
                }
                ref phase => {
                    let why = match phase {
                        Phase::Starting { .. }
                        | Phase::Running { .. }
                        | Phase::Stopping { .. }
                        | Phase::Draining { .. } => format!(
                            "is not serving {} s after its restart",
                            (deadline - rolling.since).as_secs()
                        ),
                        other => format!("did not come back ({})", other.name()),
                    };
                    crate::log(format_args!(
                        "{name}: rolling restart stopped: instance {} {why}; the instances after it keep their processes",
                        rolling.current
                    ));
                    worker.rolling = None;
                }
            }
            if let Some(index) = next {
                if index < worker.instances.len() {
                    self.step(&name, index, Event::Restart);
                } else {
                    worker.rolling = None;
                }
            }
            if let Some(at) = wake {
                self.wake_at(at);
            }
        }
    }

    fn send_all(&mut self, name: &str, event: Event) {
        let count = self.workers.get(name).map_or(0, |w| w.instances.len());
        for index in 0..count {
            self.step(name, index, event);
        }
    }

    fn event(&mut self, id: u64, event: Event) {
        if let Some((name, index)) = self.ids.get(&id).cloned() {
            self.step(&name, index, event);
        }
    }

    /// Feeds an event to one instance and performs the effects, which may
    /// produce further events (a spawn's outcome).
    fn step(&mut self, name: &str, index: usize, event: Event) {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let Some(worker) = self.workers.get_mut(name) else {
                return;
            };
            let Some(instance) = worker.instances.get_mut(index) else {
                return;
            };
            if let Event::Exited { status } = event {
                // The leader is gone; end whatever it left in its group.
                if let Some(pid) = instance.life.phase.pid() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                if instance
                    .cgroup
                    .as_ref()
                    .is_some_and(|g| g.killed_for_memory())
                {
                    let limit = worker
                        .spec
                        .memory_limit
                        .as_ref()
                        .map(|l| l.value.0)
                        .unwrap_or_default();
                    crate::log(format_args!(
                        "{name}#{index}: killed by the kernel for going over memory_limit ({limit} bytes)"
                    ));
                }
                instance.last_exit = Some(status);
                instance.start_ticks = None;
                self.dirty = true;
            }
            let id = instance.id;
            let effects = instance.life.step(event, Instant::now(), &worker.policy);
            for effect in effects {
                match effect {
                    Effect::Spawn => queue.push_back(self.spawn_process(name, index)),
                    Effect::Terminate(pid) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    }
                    Effect::Kill(pid) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    Effect::Wake(at) => {
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep_until(at.into()).await;
                            let _ = tx.send(Msg::Event {
                                id,
                                event: Event::Wake,
                            });
                        });
                    }
                }
            }
        }
    }

    /// Sends a `Recheck` at `at`, for waits that are not an instance's.
    fn wake_at(&self, at: Instant) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _ = tx.send(Msg::Recheck);
        });
    }

    /// Starts a process for an instance; returns the event that tells how it went.
    fn spawn_process(&mut self, name: &str, index: usize) -> Event {
        let worker = &self.workers[name];
        let spec = worker.spec.clone();
        let (out_target, err_target) = self.log_targets(&spec, index);
        let worker = self.workers.get_mut(name).expect("present");
        let instance = &mut worker.instances[index];
        instance.stderr_head = Arc::default();
        instance.spawn_error = None;
        instance.port = None;
        instance.link = None;
        instance.health = None;
        instance.healthy = false;
        let port = if spec.upstream.value == "port" {
            match crate::proxy::free_port() {
                Ok(port) => Some(port),
                Err(error) => {
                    return spawn_failed(name, instance, format!("no free loopback port: {error}"));
                }
            }
        } else {
            None
        };
        instance.port = port.map(Port::new);
        if spec.augur_full_scan.value
            && let Some(problem) = spec
                .path
                .as_ref()
                .and_then(|path| crate::augur::preflight(&path.value))
        {
            return spawn_failed(name, instance, problem);
        }
        let cgroup = match &spec.memory_limit {
            Some(limit) => match memory_group(name, &self.home, instance, limit.value.0) {
                Ok(procs) => Some(procs),
                Err(error) => {
                    if !self.warned_memory.iter().any(|w| w == name) {
                        self.warned_memory.push(name.to_owned());
                        crate::log(format_args!(
                            "{name}: memory_limit is not enforced: {error} (it needs a root daemon and a memory cgroup controller)"
                        ));
                    }
                    None
                }
            },
            None => {
                instance.cgroup = None;
                None
            }
        };
        let mut command = match build_command(&spec, index, port, cgroup) {
            Ok(command) => command,
            Err(error) => return spawn_failed(name, instance, error),
        };
        let listening = instance.port.as_ref().map(|p| p.accepting.clone());
        let health = match health_mode(&spec, port, listening, &mut self.check_ins) {
            Ok(Some((mode, url))) => {
                if let Some(url) = url {
                    command.env("APM_HEALTH_URL", url);
                }
                Some(mode)
            }
            Ok(None) => None,
            Err(error) => return spawn_failed(name, instance, error),
        };
        // Only a worker that receives traffic gets a connector channel.
        let channel = if spec.upstream.value == "connector" && !spec.server.is_empty() {
            match std::os::unix::net::UnixStream::pair() {
                Ok((ours, theirs)) => {
                    sys::pass_channel(&mut command, theirs.into());
                    command.env("APM_FD", sys::CONNECTOR_FD.to_string());
                    Some(ours)
                }
                Err(error) => {
                    return spawn_failed(name, instance, format!("no connector channel: {error}"));
                }
            }
        } else {
            None
        };
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return spawn_failed(
                    name,
                    instance,
                    format!("cannot start `{}`: {error}", spec.exec.value),
                );
            }
        };
        let Some(pid) = child.id() else {
            return spawn_failed(
                name,
                instance,
                "the process ended before it could be watched".to_owned(),
            );
        };
        // The child has its end of the channel; ours must be the only other.
        drop(command);
        if let Some(port) = &instance.port {
            port.probe(self.tx.clone());
        }
        if let Some(channel) = channel {
            let tx = self.tx.clone();
            let label = format!("{name}#{index}");
            match crate::connector::Link::start(channel, label, index, pid, move || {
                let _ = tx.send(Msg::Recheck);
            }) {
                Ok(link) => instance.link = Some(link),
                Err(error) => crate::log(format_args!(
                    "{name}#{index}: no connector channel: {error}"
                )),
            }
        }
        if let Some(mode) = health {
            let (tx, id) = (self.tx.clone(), instance.id);
            let report = move |verdict| {
                let _ = tx.send(Msg::Health { id, pid, verdict });
            };
            let settings = worker.health_settings.subscribe();
            instance.health = Some(crate::health::start(mode, settings, report));
        }
        instance.start_ticks = procfs::stat(pid).map(|s| s.start_ticks);
        instance.started = Some(Instant::now());
        instance.cpu_sample = None;
        self.dirty = true;
        let (out_tx, out_rx) = watch::channel(out_target);
        let (err_tx, err_rx) = watch::channel(err_target);
        instance.targets = Some((out_tx, err_tx));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(logs::pump(stdout, Stream::Out, pid, out_rx, None));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(logs::pump(
                stderr,
                Stream::Err,
                pid,
                err_rx,
                Some(instance.stderr_head.clone()),
            ));
        }
        let (tx, id) = (self.tx.clone(), instance.id);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => exit_status(status),
                Err(_) => ExitStatus::Signal(Signal::SIGKILL as i32),
            };
            let _ = tx.send(Msg::Event {
                id,
                event: Event::Exited { status },
            });
        });
        Event::Spawned { pid }
    }

    fn update(
        &mut self,
        name: String,
        spec: WorkerSpec,
        origin: Origin,
        restart: bool,
        reply: Reply<Option<StartReport>>,
    ) {
        let Some(worker) = self.workers.get_mut(&name) else {
            let _ = reply.send(Err(format!("no worker named `{name}`")));
            return;
        };
        let mut same_but_count = spec.clone();
        same_but_count.instances = worker.spec.instances.clone();
        let only_scaling = same_but_count == *worker.spec;
        let target = spec.instances.value as usize;
        worker.policy = Policy::from_spec(&spec);
        if spec.vanguard != worker.spec.vanguard {
            worker.guard = guard_for(&spec);
        }
        // New certificates serve new connections; open ones keep theirs.
        if (&spec.tls, &spec.tls_cert, &spec.tls_key, &spec.tls_ca)
            != (
                &worker.spec.tls,
                &worker.spec.tls_cert,
                &worker.spec.tls_key,
                &worker.spec.tls_ca,
            )
            || spec.tls.value
        {
            worker.tls = tls_for(&name, &spec);
        }
        if (&spec.syslog, &spec.syslog_tag) != (&worker.spec.syslog, &worker.spec.syslog_tag) {
            worker.syslog = syslog_for(&name, &spec);
        }
        if spec.statsd.as_ref() != worker.statsd.as_ref().map(|r| &r.config) {
            worker.statsd = statsd_for(&name, &spec);
        }
        worker.health_settings.send_if_modified(|settings| {
            let new = health_settings(&spec);
            std::mem::replace(settings, new) != new
        });
        worker.file_block = file_block(&spec, &origin);
        worker.spec = Arc::new(spec);
        worker.origin = origin;
        self.dirty = true;
        let enabled = worker.enabled;
        // Scale: new instances start, extra ones stop and are dropped once
        // stopped (`drop_retired_instances`); the others keep running.
        let current = worker.instances.len();
        for index in current..target {
            let instance = self.new_instance(&name, index);
            self.workers
                .get_mut(&name)
                .expect("present")
                .instances
                .push(instance);
            if enabled {
                self.step(&name, index, Event::Start);
            }
        }
        for index in target..current {
            self.step(&name, index, Event::Stop);
        }
        // Log files and prefixes (`#N` comes with a second instance) apply now.
        self.retarget(&name);
        if only_scaling || !restart {
            let _ = reply.send(Ok(None));
            return;
        }
        self.restart(&name);
        self.waiters.push(Waiter::Start {
            name,
            reply: remap(reply, Some),
        });
    }

    /// Hands the statsd reporters their instances' current processes.
    fn publish_stats(&self) {
        for worker in self.workers.values() {
            if let Some(reporter) = &worker.statsd {
                reporter.publish(
                    worker
                        .instances
                        .iter()
                        .map(|i| crate::statsd::InstanceSample {
                            pid: i.life.phase.pid(),
                            restarts: i.life.attempts.saturating_sub(1),
                        })
                        .collect(),
                );
            }
        }
    }

    /// Starts, replaces and ends file watches as workers' `watch` keys (and
    /// where they run) ask.
    fn reconcile_watches(&mut self) {
        let workers = &self.workers;
        self.watching
            .retain(|name, _| workers.get(name).is_some_and(|w| !w.spec.watch.is_empty()));
        for (name, worker) in workers {
            let known = self.watching.get(name);
            // Most messages change no spec: only a new one is looked at.
            if worker.spec.watch.is_empty()
                || known.is_some_and(|k| Arc::ptr_eq(&k.source, &worker.spec))
            {
                continue;
            }
            let Some(spec) = watch_spec(&self.home, worker) else {
                self.watching.remove(name);
                continue;
            };
            if let Some(known) = self.watching.get_mut(name)
                && known.spec == spec
            {
                known.source = worker.spec.clone();
                continue;
            }
            let (tx, worker_name) = (self.tx.clone(), name.clone());
            let changed = move |file| {
                let _ = tx.send(Msg::Changed {
                    name: worker_name.clone(),
                    file,
                });
            };
            let watch = crate::filewatch::start(name, &spec, changed)
                .inspect_err(|e| {
                    crate::log(format_args!(
                        "{name}: cannot watch {}: {e}; file changes do not restart it",
                        spec.root.display()
                    ));
                })
                .ok();
            let source = worker.spec.clone();
            self.watching.insert(
                name.clone(),
                Watching {
                    source,
                    spec,
                    watch,
                },
            );
        }
    }

    /// A health check's verdict on the process it checks (one that has
    /// ended since says nothing). An unhealthy one is restarted.
    fn health(&mut self, id: u64, pid: u32, verdict: crate::health::Verdict) {
        let Some((name, index)) = self.ids.get(&id).cloned() else {
            return;
        };
        let Some(instance) = self
            .workers
            .get_mut(&name)
            .and_then(|w| w.instances.get_mut(index))
        else {
            return;
        };
        if instance.life.phase.pid() != Some(pid) {
            return;
        }
        match verdict {
            crate::health::Verdict::Passed => instance.healthy = true,
            crate::health::Verdict::Unhealthy(why) => {
                crate::log(format_args!(
                    "{name}#{index}: unhealthy ({why}); restarting it"
                ));
                instance.healthy = false;
                instance.health = None;
                self.step(&name, index, Event::Restart);
            }
        }
    }

    /// A watched file changed: a worker meant to run restarts (a stopped
    /// one stays stopped).
    fn changed(&mut self, name: &str, file: &Path) {
        if self.workers.get(name).is_some_and(|w| w.enabled) {
            crate::log(format_args!(
                "{name}: {} changed, restarting",
                file.display()
            ));
            self.restart(name);
        }
    }

    /// Opens the listeners the workers' `server` lines ask for and closes
    /// the ones no worker asks for any more; a listener whose address and
    /// worker stay is kept, so its socket stays open across restarts.
    fn reconcile_listeners(&mut self) {
        let mut wanted: HashMap<String, (String, ServerUrl)> = HashMap::new();
        for (name, worker) in &self.workers {
            for server in &worker.spec.server {
                wanted.insert(
                    server.value.to_string(),
                    (name.clone(), server.value.clone()),
                );
            }
        }
        self.listeners
            .retain(|address, (worker, _)| wanted.get(address).is_some_and(|(w, _)| w == worker));
        for (address, (name, server)) in wanted {
            if self.listeners.contains_key(&address) {
                continue;
            }
            let worker = &self.workers[&name];
            match crate::proxy::listen(&server, name.clone(), worker.routes.subscribe()) {
                Ok(listener) => {
                    self.listeners.insert(address, (name, listener));
                }
                Err(error) => {
                    if !self.warned_listeners.contains(&address) {
                        crate::log(format_args!("{name}: {error}"));
                        self.warned_listeners.push(address);
                    }
                }
            }
        }
    }

    /// Tells the listeners which instances run now, and the proxy options.
    fn publish_backends(&mut self) {
        for worker in self.workers.values() {
            let spec = &worker.spec;
            let tracing = spec
                .trace_header
                .as_ref()
                .and_then(|h| hyper::header::HeaderName::from_bytes(h.value.as_bytes()).ok())
                .map(|header| crate::proxy::Tracing {
                    header,
                    log: self
                        .logs
                        .open(&log_paths(&self.home, spec).0, rotation(spec)),
                });
            let route = crate::proxy::Route {
                backends: worker
                    .instances
                    .iter()
                    .filter_map(Instance::backend)
                    .collect(),
                options: Arc::new(crate::proxy::Options {
                    proxies: crate::vanguard::TrustedProxies::new(spec),
                    tracing,
                    keep_alive: spec.keep_alive.as_duration(),
                    max_conns: spec.max_conns.value,
                    lowercase_headers: spec.lowercase_hdrs.value,
                    vanguard: worker.guard.clone(),
                    tls: worker.tls.clone(),
                    connector: spec.upstream.value == "connector",
                }),
            };
            worker.routes.send_if_modified(|current| {
                let changed = *current != route;
                *current = route.clone();
                changed
            });
        }
    }

    /// Where an instance's stdout and stderr lines go under `spec`.
    fn log_targets(&mut self, spec: &WorkerSpec, index: usize) -> (Target, Target) {
        let (out_path, err_path) = log_paths(&self.home, spec);
        let prefix = log_prefix(spec, index);
        let syslog = self
            .workers
            .get(&spec.name.value)
            .and_then(|w| w.syslog.clone());
        let out = Target {
            file: self.logs.open(&out_path, rotation(spec)),
            prefix: prefix.clone(),
            strip_ansi: spec.strip_ansi.value,
            syslog: syslog.clone(),
        };
        (
            out,
            Target {
                file: self.logs.open(&err_path, rotation(spec)),
                prefix,
                strip_ansi: spec.strip_ansi.value,
                syslog,
            },
        )
    }

    /// Points the running processes' output at the worker's current log
    /// files and prefix, after an update or a rename changed them.
    fn retarget(&mut self, name: &str) {
        let Some(spec) = self.workers.get(name).map(|w| w.spec.clone()) else {
            return;
        };
        let count = self.workers[name].instances.len();
        for index in 0..count {
            let (out, err) = self.log_targets(&spec, index);
            if let Some((out_tx, err_tx)) = &self.workers[name].instances[index].targets {
                out_tx.send_replace(out);
                err_tx.send_replace(err);
            }
        }
    }

    fn drop_retired_instances(&mut self) {
        for worker in self.workers.values_mut() {
            let target = worker.spec.instances.value as usize;
            while worker.instances.len() > target
                && !worker
                    .instances
                    .last()
                    .is_some_and(|i| i.life.phase.is_alive())
            {
                if let Some(instance) = worker.instances.pop() {
                    self.ids.remove(&instance.id);
                }
            }
        }
    }

    fn rename(&mut self, old: &str, new: &str, origin: Origin) -> Result<(), String> {
        self.exists(old)?;
        if self.workers.contains_key(new) {
            return Err(format!("a worker named `{new}` already exists"));
        }
        let mut worker = self.workers.remove(old).expect("checked");
        let mut spec = worker.spec.as_ref().clone();
        spec.name.value = new.to_owned();
        worker.file_block = file_block(&spec, &origin);
        // Its syslog messages and metrics carry its name (its syslog
        // messages unless `syslog_tag` names them).
        worker.syslog = syslog_for(new, &spec);
        worker.statsd = statsd_for(new, &spec);
        worker.spec = Arc::new(spec);
        worker.origin = origin;
        for instance in &worker.instances {
            self.ids
                .insert(instance.id, (new.to_owned(), instance.index));
        }
        self.workers.insert(new.to_owned(), worker);
        // Its running processes write under the new name from now on, as
        // `apm log new` expects; what they wrote before stays in the old files.
        self.retarget(new);
        self.dirty = true;
        Ok(())
    }

    fn signal(&self, name: &str, index: Option<usize>, signal: Signal) -> Result<Vec<u32>, String> {
        self.exists(name)?;
        let worker = &self.workers[name];
        if let Some(index) = index
            && index >= worker.instances.len()
        {
            return Err(format!(
                "`{name}` has {} instance(s); #{index} does not exist",
                worker.instances.len()
            ));
        }
        let pids: Vec<u32> = worker
            .instances
            .iter()
            .filter(|i| index.is_none_or(|n| n == i.index))
            .filter_map(|i| i.life.phase.pid())
            .collect();
        if pids.is_empty() {
            return Err(format!("`{name}` has no running process to signal"));
        }
        for pid in &pids {
            kill(Pid::from_raw(*pid as i32), signal)
                .map_err(|e| format!("cannot send {signal} to {pid}: {e}"))?;
        }
        Ok(pids)
    }

    fn start_ready_dependents(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, bool)> = self
            .workers
            .iter()
            .filter_map(|(name, w)| {
                let deadline = w.deps_deadline?;
                let ready = self.deps_running(w);
                (ready || now >= deadline).then(|| (name.clone(), !ready))
            })
            .collect();
        for (name, timed_out) in due {
            if let Some(worker) = self.workers.get_mut(&name) {
                worker.deps_deadline = None;
                worker.deps_timed_out = timed_out;
            }
            if timed_out {
                crate::log(format_args!(
                    "{name}: depends_on not running after depends_timeout; starting anyway"
                ));
            }
            self.send_all(&name, Event::Start);
        }
    }

    fn answer_waiters(&mut self) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            let pending = match waiter {
                Waiter::Start { name, reply } => match self.workers.get(&name) {
                    None => {
                        let _ = reply.send(Err(format!("worker `{name}` was removed")));
                        None
                    }
                    Some(worker)
                        if worker.deps_deadline.is_none()
                            && worker.rolling.is_none()
                            && worker.instances.iter().all(|i| settled(worker, i)) =>
                    {
                        let _ = reply.send(Ok(start_report(&name, worker)));
                        None
                    }
                    Some(_) => Some(Waiter::Start { name, reply }),
                },
                Waiter::Stop { name, reply } => match self.workers.get(&name) {
                    Some(worker) if worker.instances.iter().any(|i| i.life.phase.is_alive()) => {
                        Some(Waiter::Stop { name, reply })
                    }
                    _ => {
                        let _ = reply.send(Ok(()));
                        None
                    }
                },
                Waiter::Remove { name, reply } => match self.workers.get(&name) {
                    Some(worker) if worker.instances.iter().any(|i| i.life.phase.is_alive()) => {
                        Some(Waiter::Remove { name, reply })
                    }
                    Some(_) => {
                        if let Some(worker) = self.workers.remove(&name) {
                            for instance in worker.instances {
                                self.ids.remove(&instance.id);
                            }
                        }
                        self.dirty = true;
                        let _ = reply.send(Ok(()));
                        None
                    }
                    None => {
                        let _ = reply.send(Ok(()));
                        None
                    }
                },
                Waiter::Running {
                    name,
                    deadline,
                    reply,
                } => match self.workers.get(&name) {
                    None => {
                        let _ = reply.send(Err(format!("worker `{name}` was removed")));
                        None
                    }
                    Some(worker)
                        if worker
                            .instances
                            .iter()
                            .all(|i| matches!(i.life.phase, Phase::Running { .. })) =>
                    {
                        let _ = reply.send(Ok(()));
                        None
                    }
                    Some(_) if now >= deadline => {
                        let _ = reply.send(Err(format!("`{name}` is not running yet")));
                        None
                    }
                    Some(_) => Some(Waiter::Running {
                        name,
                        deadline,
                        reply,
                    }),
                },
                Waiter::Shutdown { reply } => {
                    if self
                        .workers
                        .values()
                        .flat_map(|w| &w.instances)
                        .any(|i| i.life.phase.is_alive())
                    {
                        Some(Waiter::Shutdown { reply })
                    } else {
                        // Empty now: the memory cgroups go with the daemon
                        // (the next one makes them again).
                        for instance in self.workers.values_mut().flat_map(|w| &mut w.instances) {
                            instance.cgroup = None;
                        }
                        let _ = reply.send(Ok(()));
                        None
                    }
                }
            };
            self.waiters.extend(pending);
        }
    }

    fn snapshot(&self) -> State {
        State {
            format: crate::state::FORMAT,
            workers: self
                .workers
                .iter()
                .map(|(name, w)| SavedWorker {
                    name: name.clone(),
                    origin: w.origin.clone(),
                    running: w.enabled,
                    processes: w
                        .instances
                        .iter()
                        .filter_map(|i| {
                            Some(SavedProcess {
                                pid: i.life.phase.pid()?,
                                start_ticks: i.start_ticks?,
                            })
                        })
                        .collect(),
                    config: w.file_block.clone(),
                })
                .collect(),
        }
    }

    fn status(&mut self, name: &str) -> WorkerStatus {
        let (out_log, err_log) = log_paths(&self.home, &self.workers[name].spec);
        let worker = self.workers.get_mut(name).expect("caller checked");
        let now = Instant::now();
        let tick = procfs::tick();
        let instances: Vec<InstanceStatus> = worker
            .instances
            .iter_mut()
            .map(|instance| {
                let pid = instance.life.phase.pid();
                let stat = pid.and_then(procfs::stat);
                let uptime = instance.started.filter(|_| pid.is_some()).map(|s| now - s);
                // CPU since the previous look, or since the start on the first one.
                let cpu_percent = match (stat, instance.cpu_sample, uptime) {
                    (Some(stat), Some((ticks, at)), _) if now > at => {
                        (stat.cpu_ticks.saturating_sub(ticks) as f64 * tick.as_secs_f64())
                            / (now - at).as_secs_f64()
                            * 100.0
                    }
                    (Some(stat), None, Some(up)) if !up.is_zero() => {
                        stat.cpu_ticks as f64 * tick.as_secs_f64() / up.as_secs_f64() * 100.0
                    }
                    _ => 0.0,
                };
                instance.cpu_sample = stat.map(|s| (s.cpu_ticks, now));
                InstanceStatus {
                    index: instance.index,
                    status: instance.life.phase.name().to_owned(),
                    pid,
                    uptime_ms: uptime.map(|u| u.as_millis() as u64),
                    restarts: instance.life.attempts.saturating_sub(1),
                    cpu_percent: (cpu_percent * 10.0).round() / 10.0,
                    memory_bytes: stat.map_or(0, |s| s.rss_bytes),
                    last_exit: instance.last_exit.map(|s| s.to_string()),
                    serving: (!worker.spec.server.is_empty()).then(|| instance.backend().is_some()),
                    healthy: worker
                        .spec
                        .health_check
                        .is_some()
                        .then_some(instance.healthy),
                }
            })
            .collect();
        let first = instances.first().map_or("stopped", |i| i.status.as_str());
        let status = if instances.iter().all(|i| i.status == first) {
            first
        } else {
            "partial"
        }
        .to_owned();
        WorkerStatus {
            name: name.to_owned(),
            status,
            enabled: worker.enabled,
            instances,
            origin: worker.origin.clone(),
            out_log,
            err_log,
            vanguard: worker.guard.as_ref().map(|g| g.0.stats()),
        }
    }
}

fn statsd_for(name: &str, spec: &WorkerSpec) -> Option<crate::statsd::Reporter> {
    let config = spec.statsd.as_ref()?;
    Some(crate::statsd::Reporter::start(name, config))
}

fn syslog_for(name: &str, spec: &WorkerSpec) -> Option<Arc<crate::syslog::Sink>> {
    let url = &spec.syslog.as_ref()?.value;
    let tag = spec.syslog_tag.as_ref().map_or(name, |t| t.value.as_str());
    crate::syslog::Sink::start(name, url, tag)
        .inspect_err(|e| crate::log(format_args!("{name}: syslog {url}: {e}")))
        .ok()
        .map(Arc::new)
}

fn tls_for(name: &str, spec: &WorkerSpec) -> crate::proxy::TlsSetting {
    use crate::proxy::TlsSetting;
    if !spec.tls.value {
        return TlsSetting::Off;
    }
    let (Some(cert), Some(key)) = (&spec.tls_cert, &spec.tls_key) else {
        return TlsSetting::Broken;
    };
    match crate::tls::acceptor(
        &cert.value,
        &key.value,
        spec.tls_ca.as_ref().map(|c| c.value.as_path()),
    ) {
        Ok(tls) => TlsSetting::On(tls),
        Err(error) => {
            crate::log(format_args!(
                "{name}: TLS is off for new connections: {error}"
            ));
            TlsSetting::Broken
        }
    }
}

fn guard_for(spec: &WorkerSpec) -> Option<crate::proxy::Guard> {
    spec.vanguard
        .as_ref()
        .map(|rules| crate::proxy::Guard(Arc::new(crate::vanguard::Vanguard::new(rules))))
}

/// Maps a reply channel of one type onto another.
fn remap<T: Send + 'static, U: Send + 'static>(reply: Reply<U>, f: fn(T) -> U) -> Reply<T> {
    let (tx, rx) = oneshot::channel::<Result<T, String>>();
    tokio::spawn(async move {
        if let Ok(result) = rx.await {
            let _ = reply.send(result.map(f));
        }
    });
    tx
}

/// Whether an instance is past its start: up, or failed, or not asked to run.
fn settled(worker: &Worker, instance: &Instance) -> bool {
    match instance.life.phase {
        Phase::Starting { .. } | Phase::Draining { .. } | Phase::Stopping { .. } => false,
        Phase::Stopped => !worker.enabled || instance.life.attempts > 0,
        _ => true,
    }
}

fn start_report(name: &str, worker: &Worker) -> StartReport {
    let now = Instant::now();
    let instances = worker
        .instances
        .iter()
        .map(|i| {
            // A clean exit inside the startup window is the program's choice,
            // not a failed start.
            let ok = match i.life.phase {
                Phase::Running { .. } => true,
                Phase::Exited { .. } | Phase::Waiting { .. } | Phase::Errored { .. } => {
                    i.last_exit.is_some_and(ExitStatus::is_clean)
                }
                _ => false,
            };
            let stderr = if ok {
                Vec::new()
            } else {
                i.stderr_head.lock().map(|h| h.clone()).unwrap_or_default()
            };
            let stderr = String::from_utf8_lossy(&stderr).into_owned();
            let project = worker.spec.path.as_ref().map(|p| p.value.as_path());
            let diagnosis = (!ok).then(|| crate::augur::diagnose(&stderr, project));
            InstanceStart {
                index: i.index,
                pid: i.life.phase.pid(),
                ok,
                exit: if ok {
                    None
                } else {
                    i.last_exit.map(|s| s.to_string())
                },
                uptime_ms: i.started.map_or(0, |s| (now - s).as_millis() as u64),
                stderr,
                error: i.spawn_error.clone(),
                diagnosis,
            }
        })
        .collect();
    StartReport {
        worker: name.to_owned(),
        instances,
        dependency_timeout: worker.deps_timed_out,
    }
}

fn spawn_failed(name: &str, instance: &mut Instance, error: String) -> Event {
    crate::log(format_args!("{name}#{}: {error}", instance.index));
    instance.spawn_error = Some(error);
    instance.started = Some(Instant::now());
    Event::Exited {
        status: ExitStatus::SpawnFailed,
    }
}

fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(signal)) => ExitStatus::Signal(signal),
        (None, None) => ExitStatus::Code(-1),
    }
}

fn file_block(spec: &WorkerSpec, origin: &Origin) -> Option<String> {
    matches!(origin, Origin::File { .. }).then(|| apm_compiler::print::worker(spec))
}

/// Where a worker's stdout and stderr go: `log` and `err_log`, else files
/// named after it under `$APM_HOME/logs`. With only `log`, both share it.
/// What a worker's `watch` keys ask for: its tree is the directory it runs
/// in (`path`), or, without one, its config file's.
fn watch_spec(home: &Path, worker: &Worker) -> Option<crate::filewatch::WatchSpec> {
    let spec = &worker.spec;
    if spec.watch.is_empty() {
        return None;
    }
    let root = match (&spec.path, &worker.origin) {
        (Some(path), _) => path.value.clone(),
        (None, Origin::File { path }) => path.parent()?.to_path_buf(),
        (None, Origin::Cli { .. }) => return None,
    };
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let (out, err) = log_paths(&home, spec);
    let values = |settings: &[apm_compiler::schema::Setting<String>]| {
        settings.iter().map(|s| s.value.clone()).collect()
    };
    Some(crate::filewatch::WatchSpec {
        root,
        patterns: values(&spec.watch),
        ignore: values(&spec.watch_ignore),
        delay: spec.watch_delay.as_duration(),
        skip: vec![home, out, err],
    })
}

/// The memory cgroup an instance's next process joins, made or renewed
/// with `limit`: its `cgroup.procs`, opened for the child to write.
fn memory_group(
    name: &str,
    home: &Path,
    instance: &mut Instance,
    limit: u64,
) -> Result<std::fs::File, String> {
    match &mut instance.cgroup {
        Some(group) => group.renew(limit)?,
        None => {
            // Named after the daemon's home too: two daemons may run a
            // worker of the same name.
            let home = home.as_os_str().as_encoded_bytes();
            let daemon = home.iter().fold(0x811c_9dc5_u32, |h, b| {
                (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
            });
            let group = format!("apm-{daemon:08x}-{name}-{}", instance.index);
            instance.cgroup = Some(crate::cgroup::Group::prepare(&group, limit)?);
        }
    }
    let group = instance.cgroup.as_ref().expect("set above");
    group
        .procs()
        .map_err(|e| format!("cannot open its cgroup.procs: {e}"))
}

/// How a process of `spec` is health-checked, with the `APM_HEALTH_URL`
/// it is given in push mode. With `upstream port`, a pull-mode URL's
/// request goes to the instance's own port (the URL's host stays its
/// `Host`), since each instance is checked on its own, once it listens.
fn health_mode(
    spec: &WorkerSpec,
    port: Option<u16>,
    listening: Option<Arc<std::sync::atomic::AtomicBool>>,
    check_ins: &mut Option<crate::health::Endpoint>,
) -> Result<Option<(crate::health::Mode, Option<String>)>, String> {
    use apm_compiler::values::HealthCheck;
    let Some(check) = &spec.health_check else {
        return Ok(None);
    };
    match &check.value {
        HealthCheck::Pull(url) => {
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| format!("health_check {url}: {e}"))?;
            let host = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| format!("health_check {url}: no host"))?;
            let uri = match port {
                Some(port) => {
                    let mut parts = uri.into_parts();
                    parts.authority = Some(
                        format!("127.0.0.1:{port}")
                            .parse()
                            .expect("an address is an authority"),
                    );
                    hyper::Uri::from_parts(parts).map_err(|e| e.to_string())?
                }
                None => uri,
            };
            let mode = crate::health::Mode::Pull {
                uri,
                host,
                listening,
            };
            Ok(Some((mode, None)))
        }
        HealthCheck::Push => {
            if check_ins.is_none() {
                *check_ins = Some(
                    crate::health::Endpoint::start()
                        .map_err(|e| format!("no health check-in endpoint: {e}"))?,
                );
            }
            let endpoint = check_ins.as_ref().expect("started above");
            let (check_in, url) = endpoint
                .check_in()
                .map_err(|e| format!("no health check-in token: {e}"))?;
            Ok(Some((crate::health::Mode::Push(check_in), Some(url))))
        }
    }
}

fn health_settings(spec: &WorkerSpec) -> crate::health::Settings {
    crate::health::Settings {
        first: spec.startup_grace.as_duration(),
        interval: spec.health_check_interval.as_duration(),
        timeout: spec.health_check_timeout.as_duration(),
        threshold: spec.health_check_threshold.value,
    }
}

pub fn log_paths(home: &Path, spec: &WorkerSpec) -> (PathBuf, PathBuf) {
    let name = &spec.name.value;
    let out = spec.log.as_ref().map_or_else(
        || home.join("logs").join(format!("{name}.out.log")),
        |l| l.value.clone(),
    );
    let err = match (&spec.err_log, &spec.log) {
        (Some(err), _) => err.value.clone(),
        (None, Some(log)) => log.value.clone(),
        (None, None) => home.join("logs").join(format!("{name}.err.log")),
    };
    (out, err)
}

fn rotation(spec: &WorkerSpec) -> logs::Rotation {
    logs::Rotation::new(
        spec.log_max_size.as_ref().map(|s| s.value.0),
        spec.log_max_files.value,
    )
}

fn log_prefix(spec: &WorkerSpec, index: usize) -> String {
    let base = spec
        .prefix
        .as_ref()
        .map_or(spec.name.value.as_str(), |p| p.value.as_str());
    if spec.instances.value > 1 {
        format!("{base}#{index}")
    } else {
        base.to_owned()
    }
}

/// `KEY=VALUE` lines; blank lines, `#` comments and `export ` are allowed,
/// and values may be quoted.
fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read env_file {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.strip_prefix("export ").unwrap_or(l).split_once('=')?;
            let value = value.trim();
            let unquoted = [('"', '"'), ('\'', '\'')]
                .iter()
                .find_map(|(a, b)| value.strip_prefix(*a).and_then(|v| v.strip_suffix(*b)))
                .unwrap_or(value);
            Some((key.trim().to_owned(), unquoted.to_owned()))
        })
        .collect())
}

fn build_command(
    spec: &WorkerSpec,
    index: usize,
    port: Option<u16>,
    cgroup: Option<std::fs::File>,
) -> Result<tokio::process::Command, String> {
    let mut command = tokio::process::Command::new(&spec.exec.value);
    command.args(spec.params.iter().map(|p| &p.value));
    if let Some(path) = &spec.path {
        command.current_dir(&path.value);
    }
    // env_file first, so `env` entries override it; read before any
    // privilege drop, as the daemon.
    let run_as = spec
        .user
        .as_ref()
        .map(|user| sys::RunAs::lookup(&user.value))
        .transpose()?;
    if let Some(user) = &run_as {
        // A login environment for the user, which env_file and env may override.
        command.envs(user.login_env());
    }
    if let Some(file) = &spec.env_file {
        command.envs(read_env_file(&file.value)?);
    }
    command.envs(spec.env.iter().map(|e| (&e.value.key, &e.value.value)));
    command.env("APM", "1");
    if let Some(port) = port {
        command.env(&spec.port_env.value, port.to_string());
    }
    if let Some(var) = &spec.env_index {
        command.env(&var.value, index.to_string());
    }
    // Joined while the child may still write the group's file.
    if let Some(procs) = cgroup {
        sys::join_cgroup(&mut command, procs);
    }
    if let Some(run_as) = run_as {
        let me = nix::unistd::geteuid();
        if run_as.uid != me {
            if !me.is_root() {
                return Err(format!(
                    "`user {}` needs the daemon to run as root; it runs as uid {me}",
                    run_as.name
                ));
            }
            sys::run_as(&mut command, run_as);
        }
    }
    sys::restore_open_files_limit(&mut command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    Ok(command)
}

/// The saved groups that still have live members. A group is the one apm
/// started while its leader is the same process (pid and start time); once
/// the leader is gone, while members started after it remain, since Linux
/// does not reuse a pid as long as a group of that id exists.
fn live_groups(saved: &[SavedProcess]) -> Vec<&SavedProcess> {
    let processes = procfs::processes();
    saved
        .iter()
        .filter(|group| {
            let leader = processes.iter().find(|(pid, _)| *pid == group.pid);
            if leader.is_some_and(|(_, s)| s.start_ticks != group.start_ticks) {
                return false; // the pid is another process's now: the group is gone
            }
            processes
                .iter()
                .any(|(_, s)| s.pgrp == group.pid && s.start_ticks >= group.start_ticks)
        })
        .collect()
}

/// Ends the process groups a previous daemon recorded that are still
/// alive: SIGTERM, then SIGKILL to what is left after `grace`.
pub async fn end_orphans(saved: &[SavedProcess], grace: Duration) -> usize {
    let groups = live_groups(saved);
    for group in &groups {
        let _ = killpg(Pid::from_raw(group.pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left = groups.clone();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = live_groups(saved);
    }
    for group in &left {
        let _ = killpg(Pid::from_raw(group.pid as i32), Signal::SIGKILL);
    }
    groups.len()
}
