//! The control protocol between the CLI and the daemon: one JSON request
//! line from the CLI, one JSON response line back, over the abstract unix
//! socket. `Response` keeps the same shape in every version, so a CLI and a
//! daemon of different versions can at least tell each other so.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of `Call` or of the data answered.
pub const PROTOCOL: u32 = 1;
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    pub version: String,
    pub call: Call,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    Ping,
    /// Register a worker from its `worker { }` block (built by the CLI from
    /// flags), or, when one of that name came from `apm run` before, change
    /// it to this block (the same block changes nothing, so a call replayed
    /// after a daemon crash answers as the first would have).
    Run {
        config: String,
        start: bool,
        /// The caller's environment, which the worker's processes get.
        #[serde(default)]
        environment: apm_runtime::process::state::Environment,
        /// Whether the caller gave `-name`: only then does a different
        /// block change the worker of that name.
        #[serde(default)]
        named: bool,
    },
    Load {
        path: PathBuf,
    },
    Unload {
        path: PathBuf,
    },
    /// With `index`, that one instance (`apm start NAME#I`); absent from
    /// older callers, which mean the whole worker. The same for `Stop` and
    /// `Restart`.
    Start {
        name: String,
        #[serde(default)]
        index: Option<usize>,
    },
    Stop {
        name: String,
        #[serde(default)]
        index: Option<usize>,
    },
    Restart {
        name: String,
        #[serde(default)]
        index: Option<usize>,
        /// Every instance at once, whatever `rolling` says.
        #[serde(default)]
        force: bool,
    },
    RestartAll,
    Remove {
        name: String,
    },
    StopAll,
    Update {
        name: String,
        settings: Vec<(String, Vec<String>)>,
        restart: bool,
    },
    Rename {
        name: String,
        new: String,
    },
    Copy {
        name: String,
        new: String,
        /// The caller's environment, which the copy's processes get, as
        /// with `Run`.
        #[serde(default)]
        environment: apm_runtime::process::state::Environment,
    },
    /// `apm send`: a message to every process listening on `channel`.
    Send {
        channel: String,
        data: serde_json::Value,
    },
    /// `apm request`: the first reply of a process listening on
    /// `channel`, or null.
    Request {
        channel: String,
        data: serde_json::Value,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Signal {
        name: String,
        index: Option<usize>,
        signal: String,
    },
    List,
    Info {
        name: String,
    },
    Wait {
        name: String,
        timeout_ms: u64,
    },
    /// The plan a reload of the file would apply; nothing is applied.
    Plan {
        path: PathBuf,
        force: bool,
    },
    Reload {
        target: ReloadTarget,
        force: bool,
        dry_run: bool,
    },
    /// `apm gui [stop]`.
    Gui {
        stop: bool,
    },
    Exit,
    /// After `apm saveconf W FILE`: W comes from FILE from now on.
    Attach {
        name: String,
        path: PathBuf,
    },
    /// `list` cut to the columns of `apm ls` (`supervisor::Row`): a tenth
    /// of its bytes, so a thousand workers list in a few milliseconds.
    Table,
}

impl Response {
    /// The response with `note:` lines: keys its config sets that this
    /// version does not enforce (`apm_runtime::unbuilt`), workers a load
    /// left out.
    pub fn noting(mut self, notes: impl IntoIterator<Item = String>) -> Response {
        self.notices
            .extend(notes.into_iter().map(|line| format!("note: {line}")));
        self
    }
}

impl Call {
    /// Whether the call may change the registered workers or whether they
    /// should run: what the state file records.
    pub fn changes_workers(&self) -> bool {
        match self {
            Call::Run { .. }
            | Call::Load { .. }
            | Call::Unload { .. }
            | Call::Start { .. }
            | Call::Stop { .. }
            | Call::Restart { .. }
            | Call::RestartAll
            | Call::Remove { .. }
            | Call::StopAll
            | Call::Update { .. }
            | Call::Rename { .. }
            | Call::Copy { .. }
            | Call::Attach { .. } => true,
            Call::Reload { dry_run, .. } => !dry_run,
            Call::Ping
            | Call::Send { .. }
            | Call::Request { .. }
            | Call::Signal { .. }
            | Call::List
            | Call::Table
            | Call::Info { .. }
            | Call::Wait { .. }
            | Call::Plan { .. }
            | Call::Gui { .. }
            | Call::Exit => false,
        }
    }
}

impl Call {
    /// Whether a member of `allow_group` may make the call to a root
    /// daemon: it works on the workers as they are (reads them, starts,
    /// stops, signals them), rather than choosing what runs, or reading
    /// files as root (`plan` compiles a file the caller names).
    pub fn open_to_members(&self) -> bool {
        match self {
            Call::Ping
            | Call::List
            | Call::Table
            | Call::Info { .. }
            | Call::Wait { .. }
            | Call::Start { .. }
            | Call::Stop { .. }
            | Call::Restart { .. }
            | Call::RestartAll
            | Call::StopAll
            | Call::Signal { .. }
            | Call::Send { .. }
            | Call::Request { .. } => true,
            Call::Run { .. }
            | Call::Load { .. }
            | Call::Unload { .. }
            | Call::Remove { .. }
            | Call::Update { .. }
            | Call::Rename { .. }
            | Call::Copy { .. }
            | Call::Plan { .. }
            | Call::Reload { .. }
            | Call::Gui { .. }
            | Call::Attach { .. }
            | Call::Exit => false,
        }
    }
}

/// What members of `allow_group` may do (docs/cli.md, decision 33): said
/// by `apm check` and in the daemon's refusals.
pub fn allow_group_rule(group: &str) -> String {
    format!(
        "members of group `{group}` (allow_group) may use a root daemon to list and inspect its workers (their \
         environment included) and to start, stop, restart, signal and wait for them, but not to run, load, reload, \
         update, copy, rename or remove workers, open the GUI or stop the daemon, which would let them run any \
         command as root; a daemon of another user lets them do all it may do"
    )
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ReloadTarget {
    /// A loaded worker of that name, else the file at `path`.
    Named { name: String, path: PathBuf },
    /// Every file a loaded worker came from.
    All,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// The message for people when `ok` is false.
    #[serde(default)]
    pub error: Option<String>,
    /// The exit code the CLI should end with when `ok` is false.
    #[serde(default)]
    pub exit: Option<u8>,
    #[serde(default)]
    pub data: serde_json::Value,
    /// Lines for stderr, whether or not the call succeeded, each starting
    /// with `warning:` or `note:`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

impl Response {
    pub fn data(data: impl Serialize) -> Response {
        Response {
            ok: true,
            error: None,
            exit: None,
            data: serde_json::to_value(data).unwrap_or_default(),
            notices: Vec::new(),
        }
    }

    pub fn error(exit: u8, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            exit: Some(exit),
            data: serde_json::Value::Null,
            notices: Vec::new(),
        }
    }
}

/// What `ping` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pong {
    pub pid: u32,
    pub version: String,
    pub protocol: u32,
    pub memory_bytes: u64,
    /// What went wrong as the daemon started that its user should know:
    /// workers of the state file it could not restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Each proxy thread's connections (older daemons send none).
    #[serde(default)]
    pub proxy_threads: Vec<apm_runtime::traffic::threads::Load>,
}
