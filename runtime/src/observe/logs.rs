//! Capture of children's stdout and stderr: lines are timestamped, prefixed
//! with the instance's name and written to its log files by one writer task
//! per file. A child that writes faster than the disk only fills its own
//! pipe; the rest of the daemon goes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::observe::logstyle::{Stream, strip_ansi};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

/// A line longer than this is cut into several.
const MAX_LINE: u64 = 64 * 1024;
/// Bytes of stderr kept per attempt for startup-failure reports.
pub const STDERR_HEAD: usize = 8 * 1024;
/// Lines queued per file before readers wait for the disk.
const QUEUE: usize = 1024;
/// Bytes queued per file before readers wait for the disk: without it, 1,024
/// lines of 64 KiB each could wait per file (a worker printing long lines on
/// several streams took the daemon to 455 MB).
const QUEUED_BYTES: usize = 1024 * 1024;

/// Where a stream's lines go: a reload may change it while the process runs.
#[derive(Clone)]
pub struct Target {
    pub sinks: Sinks,
    /// The prefix, its `çN-` colours rendered (or left out with `strip_ansi`).
    pub prefix: String,
    /// `log_time_format`, its colours rendered likewise; `None` is RFC 3339.
    pub time_format: Option<String>,
    /// `strip_ansi`: colours and other terminal escapes are left out.
    pub strip_ansi: bool,
    /// `syslog`: where the lines go too.
    pub syslog: Option<Arc<crate::observe::syslog::Sink>>,
}

/// An open log file; lines sent to it are appended in order.
#[derive(Debug)]
pub struct LogFile {
    tx: mpsc::Sender<Queued>,
    /// `QUEUED_BYTES` permits; a queued line holds as many as it has bytes
    /// until it is written.
    room: Arc<Semaphore>,
    rotation: Arc<Rotation>,
}

/// What a file's writer is sent, in order.
#[derive(Debug)]
pub(crate) enum Queued {
    /// A line on its way to the disk, with the room it takes in the queue.
    Line(Vec<u8>, OwnedSemaphorePermit),
    /// The file is renamed (its worker was): the lines before this went to
    /// the old name, the lines after it go to the new one.
    Move(PathBuf),
}

/// Where one stream of a worker's lines goes: its log file, and in `apm
/// container` apm's own stdout or stderr (`console::Console`); each line
/// is written whole to each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sinks {
    pub file: Option<Arc<LogFile>>,
    pub console: Option<Arc<LogFile>>,
}

impl Sinks {
    /// Appends a line apm writes itself, without waiting (`LogFile::append`).
    pub fn append(&self, prefix: &str, time_format: Option<&str>, which: Stream, body: &[u8]) {
        for (sink, line) in self.lines(prefix, time_format, which, body) {
            sink.append(line);
        }
    }

    /// `body` (one line with its newline) as each sink writes it, with how
    /// a line starts there.
    fn lines(
        &self,
        prefix: &str,
        time_format: Option<&str>,
        which: Stream,
        body: &[u8],
    ) -> Vec<(Arc<LogFile>, Vec<u8>)> {
        let file = (self.file.iter()).map(|file| (file, line_start(prefix, time_format, which)));
        let console = (self.console.iter())
            .map(|console| (console, console_line_start(prefix, time_format, which)));
        file.chain(console)
            .map(|(sink, mut line)| {
                line.extend_from_slice(body);
                (sink.clone(), line)
            })
            .collect()
    }
}

/// `log_max_size` and `log_max_files` of the workers writing a file; a
/// hot update changes them while it is open.
#[derive(Debug)]
pub struct Rotation {
    /// Bytes after which the file is rotated; 0 never rotates it.
    max_size: AtomicU64,
    /// Rotated files kept: `NAME.1` (the newest) to `NAME.<keep>`.
    keep: AtomicU32,
}

/// The same file: two handles to one open log are equal.
impl PartialEq for LogFile {
    fn eq(&self, other: &LogFile) -> bool {
        std::ptr::eq(self, other)
    }
}

impl LogFile {
    /// A file with nothing to write its lines yet: they arrive on the
    /// receiver, for a writer of the caller's.
    pub(crate) fn unwritten(rotation: Rotation) -> (LogFile, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let file = LogFile {
            tx,
            room: Arc::new(Semaphore::new(QUEUED_BYTES)),
            rotation: Arc::new(rotation),
        };
        (file, rx)
    }

    /// Waits until every line queued so far is written, or `bound` passed
    /// (a reader that takes nothing must not hold an exit forever).
    pub async fn flushed(&self, bound: std::time::Duration) {
        let whole = self.room.acquire_many(QUEUED_BYTES as u32);
        let _ = tokio::time::timeout(bound, whole).await;
    }

    /// Appends a line the daemon writes itself, unless the writer is that
    /// far behind (a stalled disk): then the line is dropped, so the caller
    /// (a request being answered) never waits for the disk.
    pub fn append(&self, line: Vec<u8>) {
        if let Ok(room) = self.room.clone().try_acquire_many_owned(cost(&line)) {
            let _ = self.tx.try_send(Queued::Line(line, room));
        }
    }

    /// Queues a line of a child's output, waiting while the queue is full;
    /// false once the file's writer is gone.
    async fn send(&self, line: Vec<u8>) -> bool {
        let Ok(room) = self.room.clone().acquire_many_owned(cost(&line)).await else {
            return false;
        };
        self.tx.send(Queued::Line(line, room)).await.is_ok()
    }
}

/// The queue room a line takes: its length, and never more than the whole
/// queue (a line longer than that waits for an empty queue, then goes).
fn cost(line: &[u8]) -> u32 {
    line.len().clamp(1, QUEUED_BYTES) as u32
}

impl Rotation {
    pub fn new(max_size: Option<u64>, keep: u32) -> Rotation {
        Rotation {
            max_size: AtomicU64::new(max_size.unwrap_or(0)),
            keep: AtomicU32::new(keep.max(1)),
        }
    }

    fn set(&self, other: &Rotation) {
        let (max_size, keep) = other.get();
        self.max_size.store(max_size, Ordering::Relaxed);
        self.keep.store(keep, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u32) {
        (
            self.max_size.load(Ordering::Relaxed),
            self.keep.load(Ordering::Relaxed),
        )
    }
}

/// The log files in use, shared by every instance that writes to one path.
#[derive(Default)]
pub struct LogFiles {
    open: HashMap<PathBuf, Weak<LogFile>>,
}

impl LogFiles {
    /// The file at `path`, opened if no one writes to it yet; its rotation
    /// becomes `rotation` either way (the settings of its latest opener).
    pub fn open(&mut self, path: &Path, rotation: Rotation) -> Arc<LogFile> {
        if let Some(file) = self.open.get(path).and_then(Weak::upgrade) {
            file.rotation.set(&rotation);
            return file;
        }
        self.open.retain(|_, file| file.strong_count() > 0);
        let (file, rx) = LogFile::unwritten(rotation);
        tokio::spawn(write_lines(path.to_path_buf(), rx, file.rotation.clone()));
        let file = Arc::new(file);
        self.open.insert(path.to_path_buf(), Arc::downgrade(&file));
        file
    }

    /// Moves the log at `from` to `to`, in line with its queue: the lines
    /// queued before go to `from`, the ones after to `to`, and its files
    /// (rotated ones too) are renamed there unless `to` exists already, in
    /// which case they stay and later lines are appended to `to`. False
    /// when it cannot be moved (another file is open at `to`, or the queue
    /// is full): `from` is then left to its writer.
    pub fn rename(&mut self, from: &Path, to: &Path, rotation: Rotation) -> bool {
        if self.open.get(to).is_some_and(|f| f.strong_count() > 0) {
            return false;
        }
        let file = self.open(from, rotation);
        if file.tx.try_send(Queued::Move(to.to_path_buf())).is_err() {
            return false;
        }
        self.open.remove(from);
        self.open.insert(to.to_path_buf(), Arc::downgrade(&file));
        true
    }
}

async fn write_lines(mut path: PathBuf, mut rx: mpsc::Receiver<Queued>, rotation: Arc<Rotation>) {
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut failing = false;
    let mut lines = Vec::new();
    while rx.recv_many(&mut lines, QUEUE).await > 0 {
        let (max_size, keep) = rotation.get();
        let mut failure = None;
        // The lines for the current file, written together.
        let mut batch = Vec::new();
        // Their room in the queue is given back once they are written.
        let mut written = Vec::with_capacity(lines.len());
        for queued in lines.drain(..) {
            let (line, room) = match queued {
                Queued::Line(line, room) => (line, room),
                Queued::Move(to) => {
                    if let Some((f, size)) = file.as_mut()
                        && noted(f.write_all(&batch).await, &mut failure).is_some()
                    {
                        *size += batch.len() as u64;
                    }
                    batch.clear();
                    let from = std::mem::replace(&mut path, to.clone());
                    let moved = tokio::task::spawn_blocking(move || move_log(&from, &to, keep))
                        .await
                        .unwrap_or(false);
                    // Not moved: the next line opens the file at the new name.
                    if !moved {
                        file = None;
                    }
                    continue;
                }
            };
            written.push(room);
            if file.is_none() {
                file = noted(open_for_append(&path).await, &mut failure);
            }
            let Some((f, size)) = file.as_mut() else {
                break;
            };
            if starts_new_file(*size + batch.len() as u64, line.len() as u64, max_size) {
                noted(f.write_all(&batch).await, &mut failure);
                batch.clear();
                drop(file.take());
                let renamed = path.clone();
                let _ = tokio::task::spawn_blocking(move || rotate(&renamed, keep)).await;
                file = noted(open_for_append(&path).await, &mut failure);
            }
            batch.extend_from_slice(&line);
        }
        if let Some((f, size)) = file.as_mut()
            && !batch.is_empty()
            && noted(f.write_all(&batch).await, &mut failure).is_some()
        {
            *size += batch.len() as u64;
        }
        // Report a failing disk once, not once per line; reopen next time.
        if let Some(error) = &failure {
            if !failing {
                crate::log(format_args!(
                    "cannot write log {}: {error}; lines are dropped until it works again",
                    path.display()
                ));
            }
            file = None;
        }
        failing = failure.is_some();
    }
}

/// The value of an IO step that worked; the error of one that failed is
/// kept for the report.
fn noted<T>(result: std::io::Result<T>, failure: &mut Option<std::io::Error>) -> Option<T> {
    result.map_err(|error| *failure = Some(error)).ok()
}

/// The file opened for appending, with its size. Opened without waiting:
/// a FIFO with no reader fails (ENXIO, and its lines are dropped until one
/// comes) instead of holding a thread of the daemon forever; writes then
/// wait as usual, so a slow reader slows the worker rather than losing lines.
async fn open_for_append(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .await?;
    fcntl(&file, FcntlArg::F_SETFL(OFlag::O_APPEND)).map_err(std::io::Error::from)?;
    let size = file.metadata().await.map_or(0, |m| m.len());
    Ok((file, size))
}

/// Whether a line of `line` bytes goes to a new file: it would take a
/// non-empty file of `size` bytes past `max_size` (0: never). A longer
/// line still goes somewhere: to a file of its own.
pub(crate) fn starts_new_file(size: u64, line: u64, max_size: u64) -> bool {
    max_size > 0 && size > 0 && size + line > max_size
}

/// The rotated file `NAME.n` of the log `NAME`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `NAME` becomes `NAME.1`, `NAME.1` becomes `NAME.2` and so on; the one
/// beyond `keep` is overwritten.
pub(crate) fn rotate(path: &Path, keep: u32) {
    for n in (1..keep).rev() {
        let _ = std::fs::rename(numbered(path, n), numbered(path, n + 1));
    }
    let _ = std::fs::rename(path, numbered(path, 1));
}

/// Renames the log `from` and its rotated files to `to`, never over a file
/// (a link then an unlink: `rename` would replace one); whether `from`
/// itself moved. An open descriptor of it keeps writing to the moved file.
fn move_log(from: &Path, to: &Path, keep: u32) -> bool {
    let moved = |from: &Path, to: &Path| {
        std::fs::hard_link(from, to).is_ok() && std::fs::remove_file(from).is_ok()
    };
    if !moved(from, to) {
        return false;
    }
    for n in 1..=keep {
        moved(&numbered(from, n), &numbered(to, n));
    }
    true
}

/// Copies one stream of a child to its log, line by line, until it closes.
/// With `head`, the first bytes are also kept for a startup-failure report.
pub async fn pump(
    stream: impl AsyncRead + Unpin,
    which: Stream,
    pid: u32,
    target: watch::Receiver<Target>,
    head: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(head) = &head {
            let mut head = crate::locked(head);
            let room = STDERR_HEAD.saturating_sub(head.len());
            head.extend_from_slice(&line[..room.min(line.len())]);
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let lines = {
            let target = target.borrow();
            if let Some(syslog) = &target.syslog {
                syslog.send(which, pid, text);
            }
            let mut body = Vec::with_capacity(text.len() + 1);
            if target.strip_ansi {
                strip_ansi(text, &mut body);
            } else {
                body.extend_from_slice(text);
            }
            body.push(b'\n');
            let time_format = target.time_format.as_deref();
            target
                .sinks
                .lines(&target.prefix, time_format, which, &body)
        };
        for (sink, line) in lines {
            if !sink.send(line).await {
                return;
            }
        }
    }
}

/// How every log line starts: `TIMESTAMP PREFIX MARKER ` (`apm log` finds a
/// line's stream by its marker, the first ` | ` or ` ! `), the timestamp in
/// the worker's `log_time_format` when it has one.
pub fn line_start(prefix: &str, time_format: Option<&str>, which: Stream) -> Vec<u8> {
    let stamp = time_format.map_or_else(crate::timestamp, |format| {
        crate::observe::logstyle::strftime(format, std::time::SystemTime::now())
    });
    format!("{stamp} {prefix} {} ", which.marker()).into_bytes()
}

/// How a line starts on apm's own stdout or stderr (`apm container`):
/// `PREFIX MARKER `, since container platforms stamp each line they
/// collect; stamped as in a log file only when the worker sets
/// `log_time_format`.
fn console_line_start(prefix: &str, time_format: Option<&str>, which: Stream) -> Vec<u8> {
    match time_format {
        Some(_) => line_start(prefix, time_format, which),
        None => format!("{prefix} {} ", which.marker()).into_bytes(),
    }
}

/// The stream marker of a line `line_start` began: the first ` | ` or
/// ` ! ` in it, since a timestamp format or a prefix may hold spaces.
pub fn marker_of(line: &str) -> Option<&'static str> {
    // One pass and no allocation: `apm log --err` asks this of every line
    // it reads back.
    line.as_bytes().windows(3).find_map(|w| {
        [Stream::Out, Stream::Err]
            .into_iter()
            .map(Stream::marker)
            .find(|marker| w[0] == b' ' && w[2] == b' ' && w[1..2] == *marker.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::{marker_of, move_log, numbered};

    #[test]
    fn a_log_moves_with_its_rotated_files_but_never_over_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            dir.path().join("old.out.log"),
            dir.path().join("new.out.log"),
        );
        for (path, text) in [
            (&old, "now"),
            (&numbered(&old, 1), "one"),
            (&numbered(&old, 3), "three"),
        ] {
            std::fs::write(path, text).unwrap();
        }
        assert!(move_log(&old, &new, 5));
        let read = |path| std::fs::read_to_string(path).ok();
        assert_eq!(read(new.clone()).as_deref(), Some("now"));
        assert_eq!(read(numbered(&new, 1)).as_deref(), Some("one"));
        assert_eq!(read(numbered(&new, 3)).as_deref(), Some("three"));
        assert!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .all(|e| { !e.unwrap().file_name().to_string_lossy().starts_with("old") })
        );
        // Back onto a name that has a file: nothing moves, nothing is lost.
        std::fs::write(&old, "other").unwrap();
        assert!(!move_log(&new, &old, 5));
        assert_eq!(read(old.clone()).as_deref(), Some("other"));
        assert_eq!(read(new.clone()).as_deref(), Some("now"));
        // Nothing to move.
        assert!(!move_log(
            &dir.path().join("none.log"),
            &dir.path().join("x.log"),
            5
        ));
    }

    #[test]
    fn the_marker_is_found_after_a_timestamp_or_prefix_with_spaces() {
        assert_eq!(
            marker_of("2024-01-01T00:00:00.000Z api | hello ! x"),
            Some("|")
        );
        assert_eq!(
            marker_of("2024/01/01 00:00:00 my api#1 ! boom | y"),
            Some("!")
        );
        assert_eq!(marker_of("no marker here"), None);
    }
}
