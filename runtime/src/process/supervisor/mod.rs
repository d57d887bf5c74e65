//! The supervisor: one task owns every worker. Commands from the control
//! socket and events from children and timers arrive on one channel; each
//! event goes through the instance's `Lifecycle`, and the effects it returns
//! are performed here. Nothing else touches processes.
//!
//! This file holds the task, its commands and its state; each concern of
//! the task has a file of its own: `spawning` (an instance's process, its
//! command, environment, logs and cgroup), `rolling` (restarts one instance
//! at a time), `waiters` (answers once instances settle, dependents),
//! `listeners` (the proxy's listeners and routes), `port` (an
//! `upstream port` instance's loopback port), `watches` (file watching,
//! health verdicts, StatsD) and `orphans` (a crashed daemon's processes).

mod draining;
mod listeners;
mod one;
mod orphans;
mod port;
mod rolling;
mod spawning;
mod waiters;
mod watches;

pub use orphans::{end_orphans, marked_groups};
pub use spawning::log_paths;

use listeners::{guard_for, tls_for};
use port::Port;
use spawning::{augur_view, health_settings, log_time_format, rotation, run_dir, sinks};
use watches::{statsd_for, syslog_for};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

use crate::observe::console::Console;
use crate::observe::logs::{self, LogFiles, Sinks, Target};
use crate::observe::logstyle::Stream;
use crate::process::lifecycle::{Effect, Event, ExitStatus, Lifecycle, Phase, Policy};
use crate::process::procfs;
use crate::process::state::{Environment, Origin, SavedProcess, SavedWorker, Saver, State};
use crate::process::usage::{Sampler, Usage};
use crate::sys;
use crate::traffic::proxy::Backend;

/// How many exits of each instance `InstanceStatus::exits` keeps.
pub const KEPT_EXITS: usize = 10;

/// A process of an instance that ended: when, after how long, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exit {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    pub ran_ms: Option<u64>,
    /// `exit 1`, `killed by SIGKILL`, `could not start`; and whether the
    /// kernel killed it for going over `memory_limit`.
    pub reason: String,
    #[serde(default)]
    pub over_memory_limit: bool,
}

/// A worker as `apm ls` shows it (the `table` call): its name, its status
/// and, per instance, the pid, uptime in ms, restarts, CPU in % and memory
/// in bytes, as arrays: a listing of 1,000 workers is a tenth of `list`'s.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub status: String,
    pub instances: Vec<RowInstance>,
}

/// pid, uptime (ms), restarts, CPU (%), memory (bytes).
pub type RowInstance = (Option<u32>, Option<u64>, u32, f64, u64);

/// One instance's state, as `list` and `info` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub index: usize,
    pub status: String,
    pub pid: Option<u32>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub cpu_percent: f64,
    /// The CPU time the process has used (user and system), for `/metrics`.
    #[serde(default)]
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub last_exit: Option<String>,
    /// Its last exits, oldest first (at most `KEPT_EXITS`), for the dashboard.
    #[serde(default)]
    pub exits: Vec<Exit>,
    /// For a worker with `server` lines: whether the proxy sends this
    /// instance traffic (it runs, and accepts on its port or said `ready`).
    #[serde(default)]
    pub serving: Option<bool>,
    /// For a worker with `health_check`: whether this process has passed
    /// a check.
    #[serde(default)]
    pub healthy: Option<bool>,
    /// The process's latest `setDashValue` values, by id:
    /// `{"value": …, "color": …}`.
    #[serde(default = "empty_object")]
    pub dash: serde_json::Value,
    /// The process's latest `metric` values, by name:
    /// `{"value": …, "type": …}`.
    #[serde(default = "empty_object")]
    pub metrics: serde_json::Value,
    /// IPC messages, offers and stream data dropped on their way to the
    /// process (it did not read), and values it sent that were refused.
    #[serde(default)]
    pub ipc_dropped: u64,
}

/// A worker's status from its instances': theirs when they agree (stopped
/// without any), else `partial`.
fn overall<'a>(mut statuses: impl Iterator<Item = &'a str>) -> &'a str {
    let first = statuses.next().unwrap_or("stopped");
    if statuses.all(|status| status == first) {
        first
    } else {
        "partial"
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
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
    pub vanguard: Option<crate::traffic::vanguard::Stats>,
    /// The environment of the `apm run` that made it, for the daemon to
    /// compare; never sent to the CLI.
    #[serde(skip)]
    pub environment: Arc<Environment>,
}

/// How the instances of a worker came through their start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartReport {
    pub worker: String,
    pub instances: Vec<InstanceStart>,
    /// Set when the start waited for `depends_on` and gave up waiting.
    pub dependency_timeout: bool,
    /// What the worker asks for that this start could not give it.
    #[serde(default)]
    pub warnings: Vec<String>,
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
    pub diagnosis: Option<crate::process::augur::Diagnosis>,
    /// For a worker with `server` lines, whether the proxy sends it traffic
    /// (the start waits `SERVE_PATIENCE` for it).
    #[serde(default)]
    pub serving: Option<bool>,
}

impl StartReport {
    pub fn ok(&self) -> bool {
        self.instances.iter().all(|i| i.ok)
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, String>>;

/// The most messages the supervisor handles between two `settle`s, so that
/// a burst cannot hold back the waiters and the state file for long.
const BATCH: usize = 64;

/// What registering a worker does about running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// Registered stopped, until `Start`.
    Stopped,
    /// Registered as meant to run (and saved so), started by a `Start` that
    /// follows: a restore registers every worker before it starts any, and
    /// a crash in between must not lose what was meant to run.
    Enabled,
    /// Started at once; the reply waits for the start.
    Started,
}

pub enum Command {
    Register {
        name: String,
        spec: Box<WorkerSpec>,
        origin: Origin,
        /// The environment of the `apm run` that made it (empty otherwise).
        environment: Environment,
        begin: Begin,
        reply: Reply<Option<StartReport>>,
    },
    /// With `index`, that instance alone (`apm start NAME#I`); the same
    /// for `Stop` and `Restart`.
    Start {
        name: String,
        index: Option<usize>,
        reply: Reply<StartReport>,
    },
    Stop {
        name: String,
        index: Option<usize>,
        reply: Reply<()>,
    },
    Restart {
        name: String,
        index: Option<usize>,
        /// All instances at once, whatever `rolling` says (`--force`).
        force: bool,
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
        /// A new caller environment (`apm run` again), or None to keep it.
        environment: Option<Environment>,
        restart: bool,
        reply: Reply<Option<StartReport>>,
    },
    Rename {
        old: String,
        new: String,
        origin: Origin,
        reply: Reply<Vec<String>>,
    },
    Signal {
        name: String,
        index: Option<usize>,
        signal: Signal,
        reply: Reply<Vec<u32>>,
    },
    /// Answered once every message before it is handled and its changes
    /// are handed to the state thread (`Handle::saved`).
    Handed {
        reply: Reply<()>,
    },
    List {
        reply: Reply<Vec<WorkerStatus>>,
    },
    Table {
        reply: Reply<Vec<Row>>,
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
    /// The daemon has registered every worker of the state file it started
    /// with: changes are saved from now on.
    Restored {
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
        verdict: crate::process::health::Verdict,
    },
}

#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    saved: Arc<crate::process::state::Progress>,
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
        // Messages are handled in order and `Handed` is answered only after
        // the `settle` that follows it has handed the state over: once it
        // is answered, every change answered before it has been handed over.
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
    exits: VecDeque<Exit>,
    /// The last look at its process's CPU and memory.
    usage: Option<Usage>,
    /// Where the current process's stdout and stderr lines go.
    targets: Option<(watch::Sender<Target>, watch::Sender<Target>)>,
    /// The loopback port of the current process, with `upstream port`.
    port: Option<Port>,
    /// Its processes in a row that ended before they bound their port,
    /// which another listener had taken (bounded by `port::RETAKES`).
    retaken: u8,
    /// The current process's connector channel, with `upstream connector`.
    link: Option<Arc<crate::traffic::connector::Link>>,
    /// The current process's health check, with `health_check`.
    health: Option<crate::process::health::Check>,
    /// Its memory cgroup, with `memory_limit`.
    cgroup: Option<crate::process::cgroup::Group>,
    /// Whether the current process has passed a health check.
    healthy: bool,
}

impl Instance {
    /// `PortTaken`, for a process that ended before it ever served on its
    /// port while something else listens there, a few times in a row
    /// (`port::RETAKES`); said in the daemon log.
    fn port_taken(&mut self, name: &str, status: ExitStatus) -> Option<Event> {
        let port = self.port.as_ref()?;
        if port.accepting() {
            self.retaken = 0;
            return None;
        }
        if !matches!(
            self.life.phase,
            Phase::Starting { .. } | Phase::Running { .. }
        ) || self.retaken >= port::RETAKES
            || !port.listened()
        {
            return None;
        }
        self.retaken += 1;
        crate::log(format_args!(
            "{name}#{}: port {} was taken by another listener before the instance bound it; \
             started again at once on another port",
            self.index,
            port.address.port()
        ));
        Some(Event::PortTaken { status })
    }

    /// The process's CPU use and memory, as the sampler last saw them (CPU
    /// over its last round, or since the start for a process it did not
    /// follow yet). With `stats_interval`, the figures change at most once
    /// per interval and looks in between get the last ones.
    fn look(
        &mut self,
        sampler: &Sampler,
        pid: u32,
        now: Instant,
        uptime: Option<Duration>,
        interval: Option<Duration>,
    ) -> Option<Usage> {
        if let (Some(last), Some(interval)) = (self.usage, interval)
            && now.duration_since(last.at) < interval
        {
            return Some(last);
        }
        let usage = sampler.look(pid, self.start_ticks, self.usage, uptime)?;
        self.usage = Some(usage);
        Some(usage)
    }

    /// Its process's pid, uptime and figures, as a listing shows them.
    fn figures(
        &mut self,
        sampler: &Sampler,
        now: Instant,
        interval: Option<Duration>,
    ) -> (Option<u32>, Option<Duration>, Option<Usage>) {
        let pid = self.life.phase.pid();
        let uptime = self.started.filter(|_| pid.is_some()).map(|s| now - s);
        let usage = pid.and_then(|pid| self.look(sampler, pid, now, uptime, interval));
        (pid, uptime, usage)
    }

    /// How the proxy reaches this instance, while it may get traffic.
    fn backend(&self) -> Option<Backend> {
        if !matches!(self.life.phase, Phase::Running { .. }) {
            return None;
        }
        // With `upstream port`, a link is there for IPC only.
        match (&self.port, &self.link) {
            (Some(port), _) => port
                .accepting()
                .then(|| Backend::Port(port.address, port.in_flight.clone())),
            (None, Some(link)) => link.is_ready().then(|| Backend::Connector(link.clone())),
            (None, None) => None,
        }
    }

    /// What the proxy has in flight on the current process.
    fn in_flight(&self) -> Option<Arc<crate::traffic::inflight::InFlight>> {
        match (&self.port, &self.link) {
            (Some(port), _) => Some(port.in_flight.clone()),
            (None, Some(link)) => Some(link.in_flight().clone()),
            (None, None) => None,
        }
    }
}

struct Worker {
    spec: Arc<WorkerSpec>,
    /// For a worker from a file, `spec` as a `worker { }` block, which the
    /// state file keeps to restore it from (a CLI worker's origin is one).
    file_block: Option<String>,
    /// The environment of the `apm run` that made it: its processes get it
    /// in place of the daemon's base environment.
    environment: Arc<Environment>,
    policy: Policy,
    origin: Origin,
    /// The desired state.
    enabled: bool,
    /// Instances of a running worker stopped one by one (`apm stop
    /// NAME#I`): they stay stopped until started again, alone or with the
    /// whole worker. Not saved: a new daemon runs every instance of a
    /// running worker (decisions: the CLI, 93).
    stopped: BTreeSet<usize>,
    instances: Vec<Instance>,
    /// While set, the worker waits for its `depends_on` until this instant.
    deps_deadline: Option<Instant>,
    /// The running instances' addresses, for the proxy's listeners.
    routes: watch::Sender<crate::traffic::proxy::Route>,
    /// Its Vanguard, kept (with its rate state and bans) while the rules stay.
    guard: Option<crate::traffic::proxy::Guard>,
    /// Its TLS setup, rebuilt when its TLS keys change (new connections use it).
    tls: crate::traffic::proxy::TlsSetting,
    deps_timed_out: bool,
    /// A rolling restart under way (`rolling`).
    rolling: Option<Rolling>,
    /// Its health check settings, which its processes' checks follow.
    health_settings: watch::Sender<crate::process::health::Settings>,
    /// Where its lines go too, with `syslog`.
    syslog: Option<Arc<crate::observe::syslog::Sink>>,
    /// Its metrics reporter, with `statsd { }`.
    statsd: Option<crate::observe::statsd::Reporter>,
    /// Why its `memory_limit` is not enforced, once a start found out: the
    /// daemon log says it once, every start report again.
    memory_warning: Option<String>,
    /// Whether the daemon log said that its connector cannot hand sessions
    /// off, which `session_persist` asks for.
    migrate_warned: bool,
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
    /// With `index`, for that instance alone (and the report is its own).
    Start {
        name: String,
        index: Option<usize>,
        reply: Reply<StartReport>,
    },
    Stop {
        name: String,
        index: Option<usize>,
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
    /// `apm container`'s stdout and stderr, where workers' lines go.
    console: Option<Arc<Console>>,
    saver: Saver,
    /// CPU and memory of the running processes, read off the supervisor's thread.
    sampler: Sampler,
    waiters: Vec<Waiter>,
    dirty: bool,
    /// The proxy's listeners by address, each with the worker it serves.
    listeners: HashMap<String, (String, crate::traffic::proxy::Listener)>,
    /// Listener addresses already reported as unusable, to say it once.
    warned_listeners: Vec<String>,
    /// The file watches of the workers with `watch` patterns, by worker.
    watching: HashMap<String, Watching>,
    /// The endpoint push-mode health checks call, once one is needed.
    check_ins: Option<crate::process::health::Endpoint>,
    /// What every process gets before its worker's own variables; its last
    /// entry marks it as this daemon's (`Supervisor::spawn`).
    base_env: Arc<Vec<(String, String)>>,
    marker: (String, String),
    /// Until `Restored`, nothing is saved: a state file written halfway
    /// through a restore, and a daemon killed then, would forget the
    /// workers not registered yet.
    restoring: bool,
    /// `Handed` commands, answered once `settle` has handed the state over.
    handed: Vec<Reply<()>>,
}

/// A worker's file watch and what it was made from.
struct Watching {
    /// The spec it was made for; another one is looked at again.
    source: Arc<WorkerSpec>,
    spec: crate::process::filewatch::WatchSpec,
    /// None when it could not start (said once, in the daemon log).
    #[expect(dead_code, reason = "held: the watch ends when it is dropped")]
    watch: Option<crate::process::filewatch::FileWatch>,
}

impl Supervisor {
    /// Starts the supervisor task; `home` is `APM_HOME`. Every process gets
    /// `base_env` (workers of `apm run`, their caller's environment in its
    /// place) and then `marker`, last, so that nothing in a worker's
    /// config hides it: a later daemon finds the processes by it, whenever
    /// this one stopped (`marked_groups`). With a `console`, workers'
    /// lines go there, and to log files only when their config names them.
    pub fn spawn(
        home: &Path,
        base_env: Vec<(String, String)>,
        marker: (String, String),
        console: Option<Arc<Console>>,
    ) -> Handle {
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
            console,
            saver,
            sampler: Sampler::spawn(),
            waiters: Vec::new(),
            dirty: false,
            listeners: HashMap::new(),
            warned_listeners: Vec::new(),
            watching: HashMap::new(),
            check_ins: None,
            base_env: Arc::new(base_env),
            marker,
            restoring: true,
            handed: Vec::new(),
        };
        tokio::spawn(supervisor.run(rx));
        Handle { tx, saved }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
            // The messages already queued are handled before `settle`, whose
            // passes go over every worker: a burst (a load's registrations
            // and starts, the exits of many processes) costs one pass, not
            // one per message.
            for _ in 1..BATCH {
                let Ok(msg) = rx.try_recv() else { break };
                self.handle(msg);
            }
            self.settle();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Command(command) => self.command(command),
            Msg::Event { id, event } => self.event(id, event),
            Msg::Recheck => {}
            Msg::Changed { name, file } => self.changed(&name, &file),
            Msg::Health { id, pid, verdict } => self.health(id, pid, verdict),
        }
    }

    /// After every batch of messages: dependency waits, shrinking workers,
    /// waiters, state file.
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
        if !self.restoring && std::mem::take(&mut self.dirty) {
            self.saver.save(self.snapshot());
        }
        for reply in self.handed.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Register {
                name,
                spec,
                origin,
                environment,
                begin,
                reply,
            } => {
                if self.workers.contains_key(&name) {
                    let _ = reply.send(Err(format!("a worker named `{name}` already exists")));
                    return;
                }
                let enabled = begin == Begin::Enabled;
                self.insert(name.clone(), *spec, origin, environment, enabled);
                if begin == Begin::Started {
                    self.start(&name);
                    self.waiters.push(Waiter::Start {
                        name,
                        index: None,
                        reply: remap(reply, Some),
                    });
                } else {
                    let _ = reply.send(Ok(None));
                }
            }
            Command::Start { name, index, reply } => {
                let Some(reply) = self.checked(&name, index, reply) else {
                    return;
                };
                match index {
                    Some(index) => self.run_one(&name, index, Event::Start),
                    None => self.start(&name),
                }
                self.waiters.push(Waiter::Start { name, index, reply });
            }
            Command::Stop { name, index, reply } => {
                let Some(reply) = self.checked(&name, index, reply) else {
                    return;
                };
                match index {
                    Some(index) => self.stop_one(&name, index),
                    None => self.stop(&name, true),
                }
                self.waiters.push(Waiter::Stop { name, index, reply });
            }
            Command::Restart {
                name,
                index,
                force,
                reply,
            } => {
                let Some(reply) = self.checked(&name, index, reply) else {
                    return;
                };
                match index {
                    Some(index) => self.run_one(&name, index, Event::Restart),
                    None => {
                        // The whole worker: the instances stopped one by one too.
                        if let Some(worker) = self.workers.get_mut(&name) {
                            worker.stopped.clear();
                        }
                        self.restart(&name, force);
                    }
                }
                self.waiters.push(Waiter::Start { name, index, reply });
            }
            Command::Remove { name, reply } => {
                let Some(reply) = self.checked(&name, None, reply) else {
                    return;
                };
                self.stop(&name, true);
                self.waiters.push(Waiter::Remove { name, reply });
            }
            Command::Update {
                name,
                spec,
                origin,
                environment,
                restart,
                reply,
            } => self.update(name, *spec, origin, environment, restart, reply),
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
            Command::Handed { reply } => self.handed.push(reply),
            Command::Restored { reply } => {
                self.restoring = false;
                let _ = reply.send(Ok(()));
            }
            Command::List { reply } => {
                let names: Vec<String> = self.workers.keys().cloned().collect();
                let _ = reply.send(Ok(names.iter().map(|n| self.status(n)).collect()));
            }
            Command::Table { reply } => {
                let _ = reply.send(Ok(self.rows()));
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
                let Some(reply) = self.checked(&name, None, reply) else {
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

    /// The reply back when the worker (and its instance `index`) exists;
    /// otherwise it is answered with the error here.
    fn checked<T>(&self, name: &str, index: Option<usize>, reply: Reply<T>) -> Option<Reply<T>> {
        match self.instance_exists(name, index) {
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
            exits: VecDeque::new(),
            usage: None,
            targets: None,
            port: None,
            retaken: 0,
            link: None,
            health: None,
            healthy: false,
            cgroup: None,
        }
    }

    /// Adds a worker; with `enabled` it is marked to run but not started.
    fn insert(
        &mut self,
        name: String,
        spec: WorkerSpec,
        origin: Origin,
        environment: Environment,
        enabled: bool,
    ) {
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
            environment: Arc::new(environment),
            spec: Arc::new(spec),
            origin,
            enabled,
            stopped: BTreeSet::new(),
            instances,
            deps_deadline: None,
            deps_timed_out: false,
            rolling: None,
            memory_warning: None,
            migrate_warned: false,
            routes: watch::channel(crate::traffic::proxy::Route::default()).0,
        };
        self.workers.insert(name, worker);
        self.dirty = true;
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
        worker.stopped.clear();
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
                worker.stopped.clear();
                self.dirty = true;
            }
        }
        self.send_all(name, Event::Stop);
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
            // Looked at before the group is ended below, which frees
            // whatever its processes held.
            let event = match event {
                Event::Exited { status } => instance.port_taken(name, status).unwrap_or(event),
                event => event,
            };
            if let Event::Exited { status } | Event::PortTaken { status } = event {
                // The leader is gone; end whatever it left in its group.
                if let Some(pid) = instance.life.phase.pid() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let over_memory_limit = instance
                    .cgroup
                    .as_ref()
                    .is_some_and(|g| g.killed_for_memory());
                if over_memory_limit {
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
                if instance.exits.len() == KEPT_EXITS {
                    instance.exits.pop_front();
                }
                instance.exits.push_back(Exit {
                    at_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    ran_ms: instance.started.map(|s| s.elapsed().as_millis() as u64),
                    reason: status.to_string(),
                    over_memory_limit,
                });
                instance.start_ticks = None;
                self.dirty = true;
            }
            let id = instance.id;
            let was_running = matches!(instance.life.phase, Phase::Running { .. });
            let effects = instance.life.step(event, Instant::now(), &worker.policy);
            // A start waits for it to take traffic, until SERVE_PATIENCE.
            if let Phase::Running { since, .. } = instance.life.phase
                && !was_running
                && !worker.spec.server.is_empty()
            {
                self.wake_at(since + SERVE_PATIENCE);
            }
            for effect in effects {
                match effect {
                    Effect::Spawn => queue.push_back(self.spawn_process(name, index)),
                    Effect::Terminate(pid) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    }
                    Effect::Kill(pid) => {
                        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                    Effect::Drain(pid) => self.drain(name, index, pid),
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

    fn update(
        &mut self,
        name: String,
        spec: WorkerSpec,
        origin: Origin,
        environment: Option<Environment>,
        restart: bool,
        reply: Reply<Option<StartReport>>,
    ) {
        let Some(worker) = self.workers.get_mut(&name) else {
            let _ = reply.send(Err(format!("no worker named `{name}`")));
            return;
        };
        let mut same_but_count = spec.clone();
        same_but_count.instances = worker.spec.instances.clone();
        let only_scaling = same_but_count == *worker.spec
            && environment
                .as_ref()
                .is_none_or(|e| e == worker.environment.as_ref());
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
        if let Some(environment) = environment {
            worker.environment = Arc::new(environment);
        }
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
        self.restart(&name, false);
        self.waiters.push(Waiter::Start {
            name,
            index: None,
            reply: remap(reply, Some),
        });
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
            let count = worker.instances.len();
            worker.stopped.retain(|&index| index < count);
        }
    }

    /// Renames a worker; the answer holds notes about its logs.
    fn rename(&mut self, old: &str, new: &str, origin: Origin) -> Result<Vec<String>, String> {
        self.exists(old)?;
        if self.workers.contains_key(new) {
            return Err(format!("a worker named `{new}` already exists"));
        }
        let mut worker = self.workers.remove(old).expect("checked");
        let mut spec = worker.spec.as_ref().clone();
        spec.name.value = new.to_owned();
        let notes = self.move_logs(&worker.spec, &spec);
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
        // `apm log new` expects.
        self.retarget(new);
        self.dirty = true;
        Ok(notes)
    }

    /// Moves a renamed worker's log files to its new name's (decision 108),
    /// unless a path is set in its config or another worker writes there
    /// too; notes for the user about what did not move. The worker is out
    /// of `self.workers` while this runs.
    fn move_logs(&mut self, before: &WorkerSpec, after: &WorkerSpec) -> Vec<String> {
        let (old_out, old_err) = log_paths(&self.home, before);
        let (new_out, new_err) = log_paths(&self.home, after);
        let mut streams = vec![(old_out, new_out, "log")];
        if old_err != streams[0].0 {
            streams.push((old_err, new_err, "err_log"));
        }
        let mut notes = Vec::new();
        for (from, to, key) in streams {
            if from == to {
                notes.push(format!(
                    "its output still goes to {}, which `{key}` names",
                    from.display()
                ));
                continue;
            }
            let shared = self.workers.values().any(|w| {
                let (out, err) = log_paths(&self.home, &w.spec);
                [&from, &to].iter().any(|p| **p == out || **p == err)
            });
            let kept = if shared {
                Some("another worker logs there too".to_owned())
            } else if to.exists() {
                Some(format!("{} exists already", to.display()))
            } else if !self.logs.rename(&from, &to, rotation(after)) {
                Some("its writer is too far behind".to_owned())
            } else {
                None
            };
            if let Some(why) = kept {
                notes.push(format!(
                    "its earlier output stays in {} ({why}); from now on it goes to {}",
                    from.display(),
                    to.display()
                ));
            }
        }
        notes
    }

    fn signal(&self, name: &str, index: Option<usize>, signal: Signal) -> Result<Vec<u32>, String> {
        self.instance_exists(name, index)?;
        let worker = &self.workers[name];
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

    fn snapshot(&self) -> State {
        State {
            format: crate::process::state::FORMAT,
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
                    environment: w.environment.as_ref().clone(),
                })
                .collect(),
        }
    }

    /// Every worker's row of `apm ls`, in name order as `list`.
    fn rows(&mut self) -> Vec<Row> {
        let now = Instant::now();
        let sampler = &self.sampler;
        self.workers
            .iter_mut()
            .map(|(name, worker)| {
                let interval = worker.stats_interval();
                let instances: Vec<RowInstance> = worker
                    .instances
                    .iter_mut()
                    .map(|instance| {
                        let (pid, uptime, usage) = instance.figures(sampler, now, interval);
                        (
                            pid,
                            uptime.map(|u| u.as_millis() as u64),
                            instance.life.attempts.saturating_sub(1),
                            usage.map_or(0.0, Usage::cpu_shown),
                            usage.map_or(0, |u| u.rss_bytes),
                        )
                    })
                    .collect();
                let status = overall(worker.instances.iter().map(|i| i.life.phase.name()));
                Row {
                    name: name.clone(),
                    status: status.to_owned(),
                    instances,
                }
            })
            .collect()
    }

    fn status(&mut self, name: &str) -> WorkerStatus {
        let (out_log, err_log) = log_paths(&self.home, &self.workers[name].spec);
        let worker = self.workers.get_mut(name).expect("caller checked");
        let now = Instant::now();
        let interval = worker.stats_interval();
        let instances: Vec<InstanceStatus> = worker
            .instances
            .iter_mut()
            .map(|instance| {
                let (pid, uptime, usage) = instance.figures(&self.sampler, now, interval);
                let board = instance.link.as_ref().map(|l| l.board());
                InstanceStatus {
                    index: instance.index,
                    status: instance.life.phase.name().to_owned(),
                    pid,
                    uptime_ms: uptime.map(|u| u.as_millis() as u64),
                    restarts: instance.life.attempts.saturating_sub(1),
                    cpu_percent: usage.map_or(0.0, Usage::cpu_shown),
                    cpu_seconds: usage
                        .map_or(0.0, |u| u.cpu_ticks as f64 * procfs::tick().as_secs_f64()),
                    memory_bytes: usage.map_or(0, |u| u.rss_bytes),
                    last_exit: instance.last_exit.map(|s| s.to_string()),
                    exits: instance.exits.iter().cloned().collect(),
                    serving: (!worker.spec.server.is_empty()).then(|| instance.backend().is_some()),
                    healthy: worker
                        .spec
                        .health_check
                        .is_some()
                        .then_some(instance.healthy),
                    dash: board.map_or_else(empty_object, |b| b.dash_json()),
                    metrics: board.map_or_else(empty_object, |b| b.metrics_json()),
                    ipc_dropped: board.map_or(0, |b| b.dropped()),
                }
            })
            .collect();
        let status = overall(instances.iter().map(|i| i.status.as_str())).to_owned();
        WorkerStatus {
            name: name.to_owned(),
            status,
            enabled: worker.enabled,
            instances,
            origin: worker.origin.clone(),
            out_log,
            err_log,
            vanguard: worker.guard.as_ref().map(|g| g.0.stats()),
            environment: worker.environment.clone(),
        }
    }
}

/// Maps a reply channel of one type onto another.
impl Worker {
    /// How long its figures are kept (`stats_interval`), if set.
    fn stats_interval(&self) -> Option<Duration> {
        self.spec
            .stats_interval
            .as_ref()
            .map(|i| i.value.as_duration())
    }
}

fn remap<T: Send + 'static, U: Send + 'static>(reply: Reply<U>, f: fn(T) -> U) -> Reply<T> {
    let (tx, rx) = oneshot::channel::<Result<T, String>>();
    tokio::spawn(async move {
        if let Ok(result) = rx.await {
            let _ = reply.send(result.map(f));
        }
    });
    tx
}

/// How long a start waits, once an instance of a worker with `server`
/// lines runs, for it to take traffic (accept on its port, or say `ready`
/// on its connector) before it answers that it does not.
const SERVE_PATIENCE: Duration = Duration::from_secs(10);

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

#[cfg(test)]
mod tests {
    use super::overall;

    #[test]
    fn a_worker_has_its_instances_status_when_they_agree() {
        assert_eq!(overall(["running", "running"].into_iter()), "running");
        assert_eq!(overall(["running", "crashed"].into_iter()), "partial");
        assert_eq!(overall(std::iter::empty()), "stopped", "no instances");
    }
}
