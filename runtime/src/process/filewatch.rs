//! `watch`: a change of a watched file restarts the worker. The worker's
//! directory tree is watched with inotify, one directory at a time (inotify
//! is not recursive): the tree is walked at start and each directory that
//! appears later is walked when it does, on a blocking thread so that a big
//! tree never stalls the daemon's one runtime thread. Patterns match the
//! path relative to the watched directory; a directory that `watch_ignore`
//! matches is never entered. A burst of changes (a save, a build, a `git
//! checkout`) makes one restart, `watch_delay` after its last change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use globset::{GlobSet, GlobSetBuilder};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use nix::errno::Errno;
use tokio::sync::mpsc;

/// What a worker's `watch` keys ask for, resolved against where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchSpec {
    pub root: PathBuf,
    pub patterns: Vec<String>,
    pub ignore: Vec<String>,
    pub delay: Duration,
    /// Never looked at: `APM_HOME` (its state file changes with every
    /// restart, so watching it would restart the worker for ever) and the
    /// worker's own log files.
    pub skip: Vec<PathBuf>,
}

/// Which paths of the tree count.
struct Filter {
    root: PathBuf,
    watch: GlobSet,
    ignore: GlobSet,
    skip: Vec<PathBuf>,
}

impl Filter {
    fn new(spec: &WatchSpec) -> Result<Filter, String> {
        Ok(Filter {
            root: spec.root.clone(),
            watch: glob_set(&spec.patterns)?,
            ignore: glob_set(&spec.ignore)?,
            skip: spec.skip.clone(),
        })
    }

    fn relative<'p>(&self, path: &'p Path) -> Option<&'p str> {
        if self.skip.iter().any(|skip| skipped(path, skip)) {
            return None;
        }
        path.strip_prefix(&self.root).ok()?.to_str()
    }

    /// Whether to walk into a directory. `*dist/*` names a directory by
    /// what its files' paths contain, so the directory is also tried with
    /// a trailing `/`.
    fn enters(&self, dir: &Path) -> bool {
        match self.relative(dir) {
            Some("") => true,
            Some(rel) => !matches(&self.ignore, rel) && !self.ignore.is_match(format!("{rel}/")),
            None => false,
        }
    }

    /// Whether a change of this file restarts the worker.
    fn counts(&self, file: &Path) -> bool {
        self.relative(file)
            .is_some_and(|rel| matches(&self.watch, rel) && !matches(&self.ignore, rel))
    }
}

/// Whether the set matches the path or a directory it is in: `src` names
/// everything below it, as PM2's `watch: ['src']` does.
fn matches(set: &GlobSet, rel: &str) -> bool {
    Path::new(rel)
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty())
        .any(|p| set.is_match(p))
}

/// `skip` itself, what is below it, and its rotated copies (`out.log.1`).
fn skipped(path: &Path, skip: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.starts_with(skip)
        || path
            .as_os_str()
            .as_bytes()
            .strip_prefix(skip.as_os_str().as_bytes())
            .is_some_and(|rest| rest.starts_with(b"."))
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(globset::Glob::new(pattern).map_err(|e| format!("`{pattern}`: {}", e.kind()))?);
    }
    set.build().map_err(|e| e.to_string())
}

/// The inotify watches of one worker's tree, by descriptor.
struct Tree {
    watches: Watches,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Set once a watch could not be added, so that a tree larger than the
    /// kernel's limit is reported once, not once per directory.
    full: bool,
}

/// A worker's file watch; it ends when dropped.
pub struct FileWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const FILE_CHANGES: EventMask = EventMask::CLOSE_WRITE
    .union(EventMask::MOVED_TO)
    .union(EventMask::MOVED_FROM)
    .union(EventMask::DELETE);

/// Starts watching `spec.root` for `worker`; `changed` is called with the
/// first changed file of each burst.
pub fn start(
    worker: &str,
    spec: &WatchSpec,
    changed: impl Fn(PathBuf) + Send + 'static,
) -> Result<FileWatch, String> {
    let filter = Arc::new(Filter::new(spec)?);
    let inotify = Inotify::init().map_err(|e| format!("no inotify instance: {e}"))?;
    let tree = Arc::new(Mutex::new(Tree {
        watches: inotify.watches(),
        dirs: HashMap::new(),
        full: false,
    }));
    let events = inotify
        .into_event_stream([0u8; 4096])
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(watch(
        worker.to_owned(),
        filter,
        tree,
        events,
        spec.delay,
        changed,
    ));
    Ok(FileWatch { task })
}

async fn watch(
    worker: String,
    filter: Arc<Filter>,
    tree: Arc<Mutex<Tree>>,
    mut events: inotify::EventStream<[u8; 4096]>,
    delay: Duration,
    changed: impl Fn(PathBuf) + Send,
) {
    // Walks report the first counted file they find in a new directory:
    // it was written before the directory's watch existed.
    let (found_tx, mut found) = mpsc::unbounded_channel();
    let walk = |dir: PathBuf, report: bool| {
        let (worker, filter, tree, found_tx) = (
            worker.clone(),
            filter.clone(),
            tree.clone(),
            found_tx.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if let Some(file) = add_tree(&worker, &filter, &tree, dir, report) {
                let _ = found_tx.send(file);
            }
        });
    };
    walk(filter.root.clone(), false);
    let mut pending: Option<PathBuf> = None;
    let mut deadline = tokio::time::Instant::now();
    loop {
        let file = tokio::select! {
            event = events.next() => {
                let Some(Ok(event)) = event else { return };
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    // Events were lost: whatever changed, something did.
                    Some(filter.root.clone())
                } else if event.mask.contains(EventMask::IGNORED) {
                    crate::locked(&tree).dirs.remove(&event.wd);
                    None
                } else {
                    let dir = crate::locked(&tree).dirs.get(&event.wd).cloned();
                    let (Some(dir), Some(name)) = (dir, event.name) else { continue };
                    let path = dir.join(name);
                    if event.mask.contains(EventMask::ISDIR) {
                        if event.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) && filter.enters(&path) {
                            walk(path, true);
                        } else if event.mask.contains(EventMask::MOVED_FROM) {
                            forget(&tree, &path);
                        }
                        None
                    } else {
                        (event.mask.intersects(FILE_CHANGES) && filter.counts(&path)).then_some(path)
                    }
                }
            }
            Some(file) = found.recv() => Some(file),
            _ = tokio::time::sleep_until(deadline), if pending.is_some() => {
                changed(pending.take().expect("pending"));
                None
            }
        };
        if let Some(file) = file {
            pending.get_or_insert(file);
            deadline = tokio::time::Instant::now() + delay;
        }
    }
}

/// Watches `top` and every directory under it the filter enters (symbolic
/// links are not followed, so a link cannot make a cycle); returns, when
/// `report`, the first counted file found.
fn add_tree(
    worker: &str,
    filter: &Filter,
    tree: &Mutex<Tree>,
    top: PathBuf,
    report: bool,
) -> Option<PathBuf> {
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK;
    let mut found = None;
    let mut stack = vec![top];
    while let Some(dir) = stack.pop() {
        {
            // Added and recorded under one lock: an event of the new watch
            // must find its directory.
            let mut tree = crate::locked(tree);
            match tree.watches.add(&dir, mask) {
                Ok(wd) => {
                    tree.dirs.insert(wd, dir.clone());
                }
                // Gone already, or not a directory any more: nothing to watch.
                Err(e) if [Errno::ENOENT, Errno::ENOTDIR].contains(&errno(&e)) => continue,
                Err(e) => {
                    if !std::mem::replace(&mut tree.full, true) {
                        crate::log(format_args!(
                            "{worker}: cannot watch {}: {e}; changes there and below do not restart it{}",
                            dir.display(),
                            if errno(&e) == Errno::ENOSPC {
                                " (the kernel's fs.inotify.max_user_watches is reached: raise it, or add watch_ignore patterns)"
                            } else {
                                ""
                            }
                        ));
                    }
                    continue;
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                if filter.enters(&path) {
                    stack.push(path);
                }
            } else if report && found.is_none() && filter.counts(&path) {
                found = Some(path);
            }
        }
    }
    found
}

fn errno(error: &std::io::Error) -> Errno {
    Errno::from_raw(error.raw_os_error().unwrap_or(0))
}

/// A directory moved away: its watches and those below it go (a move
/// within the tree is walked again at its new place).
fn forget(tree: &Mutex<Tree>, dir: &Path) {
    let mut tree = crate::locked(tree);
    let gone: Vec<WatchDescriptor> = tree
        .dirs
        .iter()
        .filter(|(_, path)| path.starts_with(dir))
        .map(|(wd, _)| wd.clone())
        .collect();
    for wd in gone {
        tree.dirs.remove(&wd);
        let _ = tree.watches.remove(wd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(patterns: &[&str], ignore: &[&str]) -> Filter {
        Filter::new(&WatchSpec {
            root: PathBuf::from("/app"),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            ignore: ignore.iter().map(|p| p.to_string()).collect(),
            delay: Duration::ZERO,
            skip: vec![
                PathBuf::from("/app/.apm"),
                PathBuf::from("/app/web.out.log"),
            ],
        })
        .unwrap()
    }

    #[test]
    fn the_references_four_modes_match_the_path_below_the_root() {
        let f = filter(&["*.js", "src*", "*conf*", "server.py", "lib"], &[]);
        assert!(f.counts(Path::new("/app/index.js")));
        assert!(
            f.counts(Path::new("/app/lib/deep/util.js")),
            "* crosses directories"
        );
        assert!(f.counts(Path::new("/app/src/main.go")));
        assert!(f.counts(Path::new("/app/etc/app.conf.d/x")));
        assert!(f.counts(Path::new("/app/server.py")));
        assert!(
            !f.counts(Path::new("/app/pkg/server.py")),
            "an exact pattern is a whole path"
        );
        assert!(
            f.counts(Path::new("/app/lib/a/b.txt")),
            "a directory names what is below it"
        );
        assert!(!f.counts(Path::new("/app/README.md")));
        assert!(!f.counts(Path::new("/elsewhere/index.js")));
    }

    #[test]
    fn ignored_directories_are_not_entered_and_their_files_do_not_count() {
        let f = filter(&["*.js"], &["*node_modules*", "*dist/*", "logs"]);
        assert!(f.enters(Path::new("/app")));
        assert!(f.enters(Path::new("/app/src")));
        assert!(!f.enters(Path::new("/app/node_modules")));
        assert!(
            !f.enters(Path::new("/app/dist")),
            "`*dist/*` names the directory too"
        );
        assert!(!f.enters(Path::new("/app/pkg/dist")));
        assert!(!f.counts(Path::new("/app/dist/bundle.js")));
        assert!(f.counts(Path::new("/app/distant.js")));
        assert!(!f.enters(Path::new("/app/logs")));
        assert!(!f.counts(Path::new("/app/logs/x.js")));
    }

    #[test]
    fn apm_home_and_the_workers_logs_never_count() {
        let f = filter(&["*"], &[]);
        assert!(!f.enters(Path::new("/app/.apm")));
        assert!(!f.counts(Path::new("/app/.apm/state.json")));
        assert!(!f.counts(Path::new("/app/web.out.log")));
        assert!(!f.counts(Path::new("/app/web.out.log.1")), "rotated logs");
        assert!(f.counts(Path::new("/app/web.js")));
    }
}
