//! `apm container`'s console: workers' lines on apm's own stdout and
//! stderr, where container platforms collect a container's output
//! (`docker logs`, `kubectl logs`).
//!
//! Each stream is a `LogFile` queue (bounded in lines and bytes, its room
//! handed out first come, first served, so a worker that floods waits its
//! turn behind the others' lines instead of shutting them out) drained by
//! a thread of its own that writes whole lines, many at a time. It is the
//! only writer of its descriptor in the daemon (the daemon's own lines
//! come through it too), so lines never mix. A stream nobody reads fills
//! its queue; then workers wait in their own writes, as they would writing
//! to that pipe themselves, while the daemon's thread never waits.

use std::io::Write;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::observe::logs::{LogFile, Queued, Rotation};
use crate::observe::logstyle::Stream;

/// Bytes written in one `write`, at most (and one line more).
const BATCH: usize = 64 * 1024;

/// apm's stdout and stderr as sinks of lines.
pub struct Console {
    pub out: Arc<LogFile>,
    pub err: Arc<LogFile>,
}

impl Console {
    /// Starts a writer thread for each of apm's stdout and stderr.
    pub fn open() -> std::io::Result<Console> {
        Ok(Console {
            out: stream(std::io::stdout().as_fd(), Stream::Out)?,
            err: stream(std::io::stderr().as_fd(), Stream::Err)?,
        })
    }

    /// Waits until what is queued is out, at most `bound` per stream.
    pub async fn flushed(&self, bound: std::time::Duration) {
        self.out.flushed(bound).await;
        self.err.flushed(bound).await;
    }
}

fn stream(fd: std::os::fd::BorrowedFd, which: Stream) -> std::io::Result<Arc<LogFile>> {
    let output = std::fs::File::from(fd.try_clone_to_owned()?);
    let (file, lines) = LogFile::unwritten(Rotation::new(None, 1));
    let name = match which {
        Stream::Out => "apm-stdout",
        Stream::Err => "apm-stderr",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || write_lines(output, lines))?;
    Ok(Arc::new(file))
}

/// Writes the queued lines until every sender is gone. A failed write
/// (no reader left) loses its lines, never the thread.
fn write_lines(mut output: std::fs::File, mut lines: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(BATCH);
    // Their room is given back once the batch is out.
    let mut rooms = Vec::new();
    // The console is never renamed: only lines come through its queue.
    while let Some(Queued::Line(line, room)) = lines.blocking_recv() {
        batch.extend_from_slice(&line);
        rooms.push(room);
        while batch.len() < BATCH
            && let Ok(Queued::Line(line, room)) = lines.try_recv()
        {
            batch.extend_from_slice(&line);
            rooms.push(room);
        }
        let _ = output.write_all(&batch);
        batch.clear();
        rooms.clear();
    }
}
