//! The daemon's own log, its stderr. Much of what it records is caused by
//! others (a local user's refused connections, a failing disk, a client
//! guessing a password), so it must stay bounded whatever they do: lines
//! of the same shape (the same text but for numbers) are written at most
//! `BURST` times a minute, the rest counted and summarised; and when
//! stderr is `$APM_HOME/apm.log` the file is rotated by size, as worker
//! logs are (`logs::starts_new_file`, `logs::rotate`).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Lines of one shape written in full per window.
const BURST: u32 = 10;
/// How long one shape's count runs before it is summarised.
const WINDOW: Duration = Duration::from_secs(60);
/// Shapes counted at once; past it, new shapes are written uncounted.
const SHAPES: usize = 256;
/// How much of a summarised line its summary quotes.
const QUOTED: usize = 160;
/// The daemon log's rotation: worker logs' rule, with these bounds.
pub const MAX_SIZE: u64 = 10 * 1024 * 1024;
pub const KEEP: u32 = 5;

/// Counts of lines per shape, pure: the caller says what time it is.
#[derive(Default)]
pub struct Repeats {
    shapes: HashMap<String, Shape>,
}

struct Shape {
    since: Instant,
    written: u32,
    held_back: u64,
    first: String,
}

impl Shape {
    fn summary(&self, now: Instant) -> Option<String> {
        (self.held_back > 0).then(|| {
            let mut quoted: String = self.first.lines().next().unwrap_or("").to_owned();
            if quoted.len() > QUOTED {
                let mut end = QUOTED;
                while !quoted.is_char_boundary(end) {
                    end -= 1;
                }
                quoted.truncate(end);
                quoted.push('…');
            }
            format!(
                "… {} more like “{quoted}” in the last {} s",
                self.held_back,
                now.duration_since(self.since).as_secs().max(1)
            )
        })
    }
}

/// The text with every run of digits as `#`: "refused a client of uid 1000"
/// and "… uid 65534" are one shape.
fn shape(text: &str) -> String {
    let mut shape = String::with_capacity(text.len());
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                shape.push('#');
            }
            in_number = true;
        } else {
            shape.push(c);
            in_number = false;
        }
    }
    shape
}

impl Repeats {
    /// The lines to write for `text` at `now`: summaries of windows that
    /// ended, then `text` itself unless its shape is past its burst.
    pub fn admit(&mut self, text: &str, now: Instant) -> Vec<String> {
        let key = shape(text);
        let mut lines = Vec::new();
        if self.shapes.len() >= SHAPES && !self.shapes.contains_key(&key) {
            lines.extend(self.ended(now));
        }
        if self.shapes.len() >= SHAPES && !self.shapes.contains_key(&key) {
            lines.push(text.to_owned());
            return lines;
        }
        let fresh = || Shape {
            since: now,
            written: 0,
            held_back: 0,
            first: text.to_owned(),
        };
        let shape = self.shapes.entry(key).or_insert_with(fresh);
        if now.duration_since(shape.since) >= WINDOW {
            lines.extend(shape.summary(now));
            *shape = fresh();
        }
        if shape.written < BURST {
            shape.written += 1;
            lines.push(text.to_owned());
        } else {
            shape.held_back += 1;
        }
        lines
    }

    /// The summaries of windows that ended by `now`; their shapes start
    /// again from nothing.
    pub fn ended(&mut self, now: Instant) -> Vec<String> {
        let mut summaries = Vec::new();
        self.shapes.retain(|_, shape| {
            if now.duration_since(shape.since) < WINDOW {
                return true;
            }
            summaries.extend(shape.summary(now));
            false
        });
        summaries
    }
}

/// The file stderr writes to, rotated when a line would take it past
/// `MAX_SIZE`.
struct Rotated {
    path: PathBuf,
    size: u64,
}

#[derive(Default)]
struct DaemonLog {
    repeats: Repeats,
    file: Option<Rotated>,
    /// `apm container`'s stderr, whose one writer the lines go through.
    console: Option<std::sync::Arc<crate::observe::logs::LogFile>>,
}

static LOG: std::sync::Mutex<Option<DaemonLog>> = std::sync::Mutex::new(None);

impl DaemonLog {
    fn write(&mut self, line: &str) {
        let line = format!("{} {line}\n", crate::timestamp());
        if let Some(console) = &self.console {
            // Dropped when workers keep the console full: the daemon's
            // thread never waits for a reader.
            console.append(line.into_bytes());
            return;
        }
        if let Some(file) = &mut self.file
            && crate::observe::logs::starts_new_file(file.size, line.len() as u64, MAX_SIZE)
        {
            // The new file is readable by whom the old one was: a service's
            // log is root:apm 0640 (docs/cli.md, decision 94).
            let (mode, group) = std::fs::metadata(&file.path).map_or((0o600, None), |old| {
                use std::os::unix::fs::MetadataExt;
                (old.mode() & 0o640, Some(old.gid()))
            });
            crate::observe::logs::rotate(&file.path, KEEP);
            // A file that cannot be opened leaves stderr on the rotated
            // one; the next line tries again.
            if let Ok(new) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(mode)
                .open(&file.path)
                && nix::unistd::dup2_stderr(&new).is_ok()
            {
                let _ = std::os::unix::fs::fchown(&new, None, group);
                let _ = nix::unistd::dup2_stdout(&new);
                file.size = 0;
            }
        }
        // A full disk loses the line, not the daemon: `eprintln!` would panic.
        if std::io::stderr().write_all(line.as_bytes()).is_ok()
            && let Some(file) = &mut self.file
        {
            file.size += line.len() as u64;
        }
    }
}

/// Writes a line of the daemon log, or counts it (see the module's doc).
pub fn write(text: &str) {
    let mut log = crate::locked(&LOG);
    let log = log.get_or_insert_with(DaemonLog::default);
    for line in log.repeats.admit(text, Instant::now()) {
        log.write(&line);
    }
}

/// Writes the summaries of counts whose minute is over; the daemon calls
/// it every few seconds, so a burst that stopped is summarised too.
pub fn flush() {
    let mut log = crate::locked(&LOG);
    let log = log.get_or_insert_with(DaemonLog::default);
    for line in log.repeats.ended(Instant::now()) {
        log.write(&line);
    }
}

/// Sends the log's lines to `console` from now on (`apm container`'s
/// stderr) rather than writing them to stderr itself.
pub fn to_console(console: std::sync::Arc<crate::observe::logs::LogFile>) {
    crate::locked(&LOG)
        .get_or_insert_with(DaemonLog::default)
        .console = Some(console);
}

/// Rotates the log at `path` from now on, when it is where stderr goes
/// (an auto-started daemon's); a service manager's log is its own.
pub fn rotate_at(path: &Path) {
    let Ok(target) = std::fs::metadata(path) else {
        return;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    if (target.dev(), target.ino()) != (stderr.dev(), stderr.ino()) {
        return;
    }
    let mut log = crate::locked(&LOG);
    log.get_or_insert_with(DaemonLog::default).file = Some(Rotated {
        path: path.to_path_buf(),
        size: target.len(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_shape_is_written_ten_times_then_summarised_once_a_minute() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        let mut written = Vec::new();
        for i in 0..50_000u32 {
            let at = start + Duration::from_millis(u64::from(i));
            written.extend(repeats.admit(&format!("refused a client of uid {i}"), at));
        }
        assert_eq!(written.len(), 10, "{written:?}");
        assert_eq!(written[9], "refused a client of uid 9");
        // 50 s in: nothing to summarise yet.
        assert!(repeats.ended(start + Duration::from_secs(50)).is_empty());
        let summary = repeats.ended(start + Duration::from_secs(61));
        assert_eq!(
            summary,
            ["… 49990 more like “refused a client of uid 0” in the last 61 s"]
        );
        // The shape starts again.
        assert_eq!(
            repeats.admit("refused a client of uid 7", start + Duration::from_secs(62)),
            ["refused a client of uid 7"]
        );
    }

    #[test]
    fn a_window_that_ends_is_summarised_before_the_next_line_of_its_shape() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        for _ in 0..12 {
            repeats.admit("disk full", start);
        }
        let lines = repeats.admit("disk full", start + WINDOW);
        assert_eq!(
            lines,
            ["… 2 more like “disk full” in the last 60 s", "disk full"]
        );
        // Another shape is not held back by this one.
        assert_eq!(repeats.admit("other", start + WINDOW), ["other"]);
    }

    #[test]
    fn the_table_of_shapes_is_bounded_and_long_lines_are_quoted_short() {
        let mut repeats = Repeats::default();
        let now = Instant::now();
        for i in 0..SHAPES * 4 {
            let text = format!("shape {}", "x".repeat(i));
            assert_eq!(repeats.admit(&text, now), std::slice::from_ref(&text));
        }
        assert_eq!(repeats.shapes.len(), SHAPES);
        let long = "é".repeat(200);
        for _ in 0..=BURST {
            repeats.admit(&long, now + WINDOW);
        }
        let summary = repeats.ended(now + WINDOW * 2);
        let quoted = summary.iter().find(|s| s.contains('é')).unwrap();
        assert!(quoted.chars().count() < QUOTED, "{quoted}");
    }
}
