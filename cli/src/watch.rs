//! Reloads on change: `daemon { auto_reload true; }` in a loaded file
//! reloads that file when it or any file it includes changes on disk, and a
//! worker's `watch_conf true` reloads just that worker. The directories of
//! the files are watched with inotify (editors replace files by renaming,
//! which a watch on the file itself would miss); changes are debounced.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use apm_compiler::Compilation;
use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

/// Edits arrive in bursts (write, rename, chmod): one reload per burst.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// What a loaded file asks to be reloaded for.
#[derive(Debug, Default, PartialEq)]
struct Root {
    /// The file and every file it includes.
    files: HashSet<PathBuf>,
    /// `auto_reload` in its `daemon { }` block: reload everything.
    auto: bool,
    /// Its workers with `watch_conf`: reload those alone.
    workers: Vec<String>,
}

/// A reload the watcher asks for: the whole file, or some of its workers.
pub struct Due {
    pub root: PathBuf,
    pub only: Option<Vec<String>>,
}

pub struct Watcher {
    state: Mutex<State>,
}

struct State {
    watches: Option<Watches>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    roots: HashMap<PathBuf, Root>,
}

impl Watcher {
    /// Starts watching; reloads that are due arrive on the receiver. Without
    /// inotify (a limit reached), nothing reloads by itself and it is logged.
    pub fn start() -> (std::sync::Arc<Watcher>, mpsc::UnboundedReceiver<Due>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = std::sync::Arc::new(Watcher {
            state: Mutex::new(State {
                watches: None,
                dirs: HashMap::new(),
                roots: HashMap::new(),
            }),
        });
        match Inotify::init().and_then(|inotify| {
            let watches = inotify.watches();
            inotify
                .into_event_stream([0u8; 4096])
                .map(|stream| (watches, stream))
        }) {
            Ok((watches, stream)) => {
                watcher.lock().watches = Some(watches);
                tokio::spawn(watch_loop(watcher.clone(), stream, tx));
            }
            Err(e) => apm_runtime::log(format_args!(
                "cannot watch config files ({e}); auto_reload and watch_conf are off"
            )),
        }
        (watcher, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        apm_runtime::locked(&self.state)
    }

    /// Records what a freshly compiled file asks for, and watches its directories.
    pub fn track(&self, root: &Path, compilation: &Compilation) {
        let files: HashSet<PathBuf> = compilation
            .sources
            .files()
            .map(|(_, f)| absolute(&f.path))
            .collect();
        let root_entry = Root {
            auto: compilation.config.daemon.auto_reload.value,
            workers: compilation
                .config
                .workers
                .iter()
                .filter(|w| w.watch_conf.value)
                .map(|w| w.name.value.clone())
                .collect(),
            files,
        };
        let mut state = self.lock();
        if !root_entry.auto && root_entry.workers.is_empty() {
            state.roots.remove(root);
            return;
        }
        let dirs: HashSet<PathBuf> = root_entry
            .files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        for dir in dirs {
            if state.dirs.values().any(|d| *d == dir) {
                continue;
            }
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::CREATE
                | WatchMask::DELETE;
            if let Some(watches) = state.watches.as_mut() {
                match watches.add(&dir, mask) {
                    Ok(wd) => {
                        state.dirs.insert(wd, dir);
                    }
                    Err(e) => apm_runtime::log(format_args!("cannot watch {}: {e}", dir.display())),
                }
            }
        }
        state.roots.insert(root.to_path_buf(), root_entry);
    }

    pub fn forget(&self, root: &Path) {
        self.lock().roots.remove(root);
    }

    /// The reloads a change of `path` calls for.
    fn due(&self, path: &Path) -> Vec<Due> {
        let state = self.lock();
        // A new file in a watched directory may be one a glob now matches.
        let config_like = path.extension().is_some_and(|e| e == "conf" || e == "part");
        state
            .roots
            .iter()
            .filter(|(_, r)| {
                r.files.contains(path)
                    || (config_like && r.files.iter().any(|f| f.parent() == path.parent()))
            })
            .map(|(root, r)| Due {
                root: root.clone(),
                only: (!r.auto).then(|| r.workers.clone()),
            })
            .collect()
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

async fn watch_loop(
    watcher: std::sync::Arc<Watcher>,
    mut stream: inotify::EventStream<[u8; 4096]>,
    tx: mpsc::UnboundedSender<Due>,
) {
    let mut pending: HashMap<PathBuf, Option<Vec<String>>> = HashMap::new();
    let mut deadline = tokio::time::Instant::now();
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(Ok(event)) = event else { return };
                let dir = watcher.lock().dirs.get(&event.wd).cloned();
                let (Some(dir), Some(name)) = (dir, event.name) else { continue };
                for due in watcher.due(&dir.join(name)) {
                    pending.insert(due.root, due.only);
                    deadline = tokio::time::Instant::now() + DEBOUNCE;
                }
            }
            _ = tokio::time::sleep_until(deadline), if !pending.is_empty() => {
                for (root, only) in pending.drain() {
                    let _ = tx.send(Due { root, only });
                }
            }
        }
    }
}
