//! Capture of children's stdout and stderr: lines are timestamped, prefixed
//! with the instance's name and written to its log files by one writer task
//! per file. A child that writes faster than the disk only fills its own
//! pipe; the rest of the daemon goes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

/// A line longer than this is cut into several.
const MAX_LINE: u64 = 64 * 1024;
/// Bytes of stderr kept per attempt for startup-failure reports.
pub const STDERR_HEAD: usize = 8 * 1024;
/// Lines queued per file before readers wait for the disk.
const QUEUE: usize = 1024;

/// Which stream a line came from; shown in the line so a shared file can
/// still be read one stream at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

impl Stream {
    pub fn marker(self) -> &'static str {
        match self {
            Stream::Out => "|",
            Stream::Err => "!",
        }
    }
}

/// Where a stream's lines go: a reload may change it while the process runs.
#[derive(Clone)]
pub struct Target {
    pub file: Arc<LogFile>,
    pub prefix: String,
}

/// An open log file; lines sent to it are appended in order.
pub struct LogFile {
    tx: mpsc::Sender<Vec<u8>>,
}

/// The log files in use, shared by every instance that writes to one path.
#[derive(Default)]
pub struct LogFiles {
    open: HashMap<PathBuf, Weak<LogFile>>,
}

impl LogFiles {
    pub fn open(&mut self, path: &Path) -> Arc<LogFile> {
        if let Some(file) = self.open.get(path).and_then(Weak::upgrade) {
            return file;
        }
        self.open.retain(|_, file| file.strong_count() > 0);
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(path.to_path_buf(), rx));
        let file = Arc::new(LogFile { tx });
        self.open.insert(path.to_path_buf(), Arc::downgrade(&file));
        file
    }
}

async fn write_lines(path: PathBuf, mut rx: mpsc::Receiver<Vec<u8>>) {
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let mut file = None;
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = first;
        while let Ok(more) = rx.try_recv() {
            batch.extend_from_slice(&more);
        }
        if file.is_none() {
            file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .ok();
        }
        let written = match file.as_mut() {
            Some(f) => f.write_all(&batch).await.is_ok(),
            None => false,
        };
        // Report a failing disk once, not once per line; reopen next time.
        if !written {
            if !failing {
                crate::log(format_args!(
                    "cannot write log {}; lines are dropped until it works again",
                    path.display()
                ));
            }
            file = None;
        }
        failing = !written;
    }
}

/// Copies one stream of a child to its log, line by line, until it closes.
/// With `head`, the first bytes are also kept for a startup-failure report.
pub async fn pump(
    stream: impl AsyncRead + Unpin,
    which: Stream,
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
            let mut head = head.lock().unwrap_or_else(|e| e.into_inner());
            let room = STDERR_HEAD.saturating_sub(head.len());
            head.extend_from_slice(&line[..room.min(line.len())]);
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let (log, mut entry) = {
            let target = target.borrow();
            (
                target.file.clone(),
                format!(
                    "{} {} {} ",
                    crate::timestamp(),
                    target.prefix,
                    which.marker()
                )
                .into_bytes(),
            )
        };
        entry.extend_from_slice(text);
        entry.push(b'\n');
        if log.tx.send(entry).await.is_err() {
            return;
        }
    }
}
