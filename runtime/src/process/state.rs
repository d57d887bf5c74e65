//! The daemon's state file: every worker with where it came from, whether
//! it should run, and which processes it had, so a daemon that was killed
//! can end its orphans and bring everything back.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the
//! directory) and done on a thread of their own, so a slow or full disk
//! never stalls supervision; a burst of changes is written once. A command
//! that changed something is answered once the file holds the change
//! (`Progress`), so a daemon killed right after the answer does not forget it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bumped when the format changes incompatibly.
pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub workers: Vec<SavedWorker>,
}

/// Where a worker's spec comes from, so it can be rebuilt after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// Registered from the CLI; `config` is its `worker { }` block.
    Cli { config: String },
    /// Loaded from a config file, which is read again.
    File { path: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedWorker {
    pub name: String,
    pub origin: Origin,
    /// The desired state: whether it should be running.
    pub running: bool,
    pub processes: Vec<SavedProcess>,
    /// For a worker loaded from a file, the `worker { }` block it runs
    /// with: it is restored from that block when the file no longer
    /// compiles (edited while the daemon was down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// For a worker of `apm run`, the environment of the shell that ran
    /// it, which its processes get (decisions: the CLI, 52).
    #[serde(default, skip_serializing_if = "Environment::is_empty")]
    pub environment: Environment,
}

/// The environment of the CLI call that ran a worker. It may hold secrets:
/// it is kept in the state file (mode 0600) and never printed, not even by
/// `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Environment(pub Vec<(String, String)>);

impl Environment {
    /// The calling process's own environment (variables that are not
    /// UTF-8 are left out: the control protocol is JSON).
    pub fn of_this_process() -> Environment {
        Environment(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Environment({} variables)", self.0.len())
    }
}

/// A process apm started, identified by pid and start time together, so a
/// reused pid is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProcess {
    pub pid: u32,
    pub start_ticks: u64,
}

pub fn load(path: &Path) -> std::io::Result<Option<State>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = path.with_extension("tmp");
    {
        // Owner-only from the first byte: the file holds the `worker { }`
        // blocks of CLI workers, their environments (and secrets) included.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
    }
    std::fs::rename(&temp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Saves states on a thread of its own; the newest state wins.
pub struct Saver {
    tx: mpsc::Sender<(u64, State)>,
    progress: Arc<Progress>,
}

impl Saver {
    pub fn spawn(path: PathBuf) -> Saver {
        let (tx, rx) = mpsc::channel::<(u64, State)>();
        let progress = Arc::new(Progress {
            requested: AtomicU64::new(0),
            written: tokio::sync::watch::Sender::new(Written::default()),
        });
        let writer = progress.clone();
        std::thread::Builder::new()
            .name("apm-state".into())
            .spawn(move || {
                while let Ok(mut newest) = rx.recv() {
                    // Only the newest of a burst matters.
                    while let Ok(newer) = rx.try_recv() {
                        newest = newer;
                    }
                    let (generation, state) = newest;
                    let error = save(&path, &state).err().map(|e| {
                        crate::log(format_args!("cannot save state to {}: {e}", path.display()));
                        format!("cannot write {}: {e}", path.display())
                    });
                    writer.written.send_replace(Written { generation, error });
                }
            })
            .expect("spawning the state thread");
        Saver { tx, progress }
    }

    pub fn save(&self, state: State) {
        let generation = self.progress.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.tx.send((generation, state));
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

/// How far the state file has caught up with the states handed to the saver.
pub struct Progress {
    /// The generation of the newest state handed over.
    requested: AtomicU64,
    written: tokio::sync::watch::Sender<Written>,
}

/// The newest state written (or tried).
#[derive(Clone, Debug, Default)]
struct Written {
    generation: u64,
    error: Option<String>,
}

/// Beyond this, a command is answered without waiting for the state file
/// (a disk that hangs must not hang the CLI); the answer says so.
const PATIENCE: Duration = Duration::from_secs(5);

impl Progress {
    /// Waits until every state handed over so far is on disk; an error says
    /// why it is not.
    pub async fn caught_up(&self) -> Result<(), String> {
        let target = self.requested.load(Ordering::SeqCst);
        let mut written = self.written.subscribe();
        match tokio::time::timeout(PATIENCE, written.wait_for(|w| w.generation >= target)).await {
            Ok(Ok(written)) => written.error.clone().map_or(Ok(()), Err),
            Ok(Err(_)) => Err("the state thread has stopped".to_owned()),
            Err(_) => Err(format!(
                "the state file was not written within {} s",
                PATIENCE.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).unwrap(), None);
        let state = State {
            format: FORMAT,
            workers: vec![SavedWorker {
                name: "api".into(),
                origin: Origin::Cli {
                    config: "worker { exec node; }".into(),
                },
                running: true,
                processes: vec![SavedProcess {
                    pid: 42,
                    start_ticks: 7,
                }],
                config: None,
                environment: Environment(vec![("TOKEN".into(), "s3cret".into())]),
            }],
        };
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state.clone()));
        assert!(
            !format!("{state:?}").contains("s3cret"),
            "Debug hides environments"
        );
        assert!(!path.with_extension("tmp").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads the state file");
    }

    #[test]
    fn a_state_file_that_cannot_be_read_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails, and that
        // must not look like "no state yet" (which would forget every worker).
        assert!(load(dir.path()).is_err());
        std::fs::write(dir.path().join("state.json"), "{ not json").unwrap();
        let error = load(&dir.path().join("state.json")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn caught_up_waits_for_the_newest_state_and_reports_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let saver = Saver::spawn(path.clone());
        let progress = saver.progress();
        progress.caught_up().await.unwrap();
        for n in 1..=20 {
            let state = State {
                format: n,
                workers: Vec::new(),
            };
            saver.save(state.clone());
            progress.caught_up().await.unwrap();
            assert_eq!(
                load(&path).unwrap(),
                Some(state),
                "written before caught_up returns"
            );
        }

        let unwritable = Saver::spawn(dir.path().join("missing").join("state.json"));
        unwritable.save(State::default());
        let error = unwritable.progress().caught_up().await.unwrap_err();
        assert!(error.starts_with("cannot write"), "{error}");
    }
}
