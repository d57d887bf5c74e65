//! The CLI commands that talk to the daemon, and how their answers are shown.

use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use apm_compiler::loader::{FsLoader, Overlay};
use apm_compiler::{compile, print, render};
use apm_runtime::process::supervisor::{Row, StartReport, WorkerStatus};
use serde::Deserialize;

use crate::client::{self, Failure, Place};
use crate::exit;
use crate::flags::{self, Flags};
use crate::protocol::{Call, Pong, ReloadTarget, Response};

/// Runs one call; prints the failure and returns its exit code on error.
pub fn request(place: &Place, call: Call) -> Result<serde_json::Value, u8> {
    match client::call(place, call, true) {
        Ok(Response { ok: true, data, .. }) => Ok(data),
        Ok(Response {
            error, exit: code, ..
        }) => {
            eprintln!(
                "apm: {}",
                error
                    .unwrap_or_else(|| "the daemon refused the request".to_owned())
                    .trim_end()
            );
            Err(code.unwrap_or(exit::FAILED))
        }
        Err(Failure {
            exit: code,
            message,
        }) => {
            eprintln!("apm: {message}");
            Err(code)
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(value: serde_json::Value) -> Result<T, u8> {
    serde_json::from_value(value).map_err(|e| {
        eprintln!("apm: unexpected answer from the daemon: {e}");
        exit::FAILED
    })
}

fn color() -> bool {
    // Asked once: a table of 1,000 rows paints 2,000 cells.
    static COLOR: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *COLOR.get_or_init(|| std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
}

fn paint(text: &str, code: &str) -> String {
    if color() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Prints how a start went, like the reference's progress lines; false when
/// an instance failed.
pub fn show_start(report: &StartReport) -> bool {
    println!("● Starting {}", report.worker);
    if report.dependency_timeout {
        println!("  ! its depends_on did not come up within depends_timeout; started anyway");
    }
    for warning in &report.warnings {
        println!("  ! {warning}");
    }
    for instance in &report.instances {
        let name = if report.instances.len() > 1 {
            format!("{}#{}", report.worker, instance.index)
        } else {
            report.worker.clone()
        };
        if instance.ok && instance.serving == Some(false) {
            println!(
                "{} {name} running (pid {}), but not taking traffic: it did not accept on its port (upstream \
                 port) or say ready (connector) within 10 s of running; the proxy answers 503 until it does",
                paint("!", "33"),
                instance.pid.unwrap_or_default()
            );
            continue;
        }
        if instance.ok {
            println!(
                "{} {name} running (pid {})",
                paint("✓", "32"),
                instance.pid.unwrap_or_default()
            );
            continue;
        }
        let how = instance
            .error
            .clone()
            .or_else(|| instance.exit.clone())
            .unwrap_or_else(|| "not running".to_owned());
        println!(
            "{} {name} failed during startup ({how}, {} ms)",
            paint("✗", "31"),
            instance.uptime_ms
        );
        if !instance.stderr.is_empty() {
            println!("── child stderr {}", "─".repeat(46));
            print!("{}", instance.stderr);
            if !instance.stderr.ends_with('\n') {
                println!();
            }
            println!("{}", "─".repeat(62));
        }
        if let Some(diagnosis) = &instance.diagnosis {
            for hint in &diagnosis.hints {
                println!("  → {hint}");
            }
            if let Some(missing) = &diagnosis.missing {
                println!(
                    "  → augur — also missing ({}): {}   → {}",
                    missing.names.len(),
                    missing.names.join(" "),
                    missing.install
                );
            }
        }
    }
    let ok = report.ok();
    if !ok {
        println!(
            "{} Worker {} failed to start — check `apm log {} --err`",
            paint("✗", "31"),
            report.worker,
            report.worker
        );
    }
    ok
}

fn started(data: serde_json::Value) -> u8 {
    match decode::<Option<StartReport>>(data) {
        Ok(Some(report)) if !show_start(&report) => exit::FAILED,
        Ok(_) => exit::OK,
        Err(code) => code,
    }
}

pub fn run(place: &Place, args: &[String]) -> u8 {
    let flags = match Flags::parse(args, false) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("apm: {e}");
            return exit::USAGE;
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let settings = match flags::run_settings(&flags, &cwd) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("apm: {e}");
            return exit::USAGE;
        }
    };
    let loader = Overlay {
        path: cwd.join("(command line)"),
        contents: flags::worker_block(&settings),
        inner: &FsLoader,
    };
    let compilation = match compile(&loader.path, &loader) {
        Ok(compilation) => compilation,
        Err(e) => {
            eprintln!("apm: {e}");
            return exit::USAGE;
        }
    };
    if !compilation.diagnostics.is_empty() {
        let text = render::human(&compilation, color());
        // The summary line speaks of the generated file; keep the snippets only.
        let snippets = text
            .lines()
            .filter(|l| !l.starts_with('✓') && !l.starts_with('✗'))
            .collect::<Vec<_>>()
            .join("\n");
        eprintln!("{snippets}");
    }
    if compilation.has_errors() {
        return exit::USAGE;
    }
    let Some(spec) = compilation.config.workers.first() else {
        return exit::USAGE;
    };
    match request(
        place,
        Call::Run {
            config: print::worker(spec),
            start: true,
            environment: apm_runtime::process::state::Environment::of_this_process(),
            named: flags.settings.iter().any(|(key, _)| *key == "name"),
        },
    ) {
        Ok(data) => started(data),
        Err(code) => code,
    }
}

pub fn update(place: &Place, name: &str, args: &[String]) -> u8 {
    let flags = match Flags::parse(args, true) {
        Ok(flags) if flags.words.is_empty() => flags,
        Ok(flags) => {
            eprintln!(
                "apm: unexpected `{}`; update takes flags only",
                flags.words[0]
            );
            return exit::USAGE;
        }
        Err(e) => {
            eprintln!("apm: {e}");
            return exit::USAGE;
        }
    };
    let settings = flags
        .settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    match request(
        place,
        Call::Update {
            name: name.to_owned(),
            settings,
            restart: !flags.no_restart,
        },
    ) {
        Ok(data) => started(data),
        Err(code) => code,
    }
}

/// A call whose answer is a start report.
pub fn start_like(place: &Place, call: Call) -> u8 {
    match request(place, call) {
        Ok(data) => match decode::<StartReport>(data) {
            Ok(report) if show_start(&report) => exit::OK,
            Ok(_) => exit::FAILED,
            Err(code) => code,
        },
        Err(code) => code,
    }
}

pub fn simple(place: &Place, call: Call, done: &str) -> u8 {
    match request(place, call) {
        Ok(_) => {
            println!("{done}");
            exit::OK
        }
        Err(code) => code,
    }
}

pub fn restart_all(place: &Place) -> u8 {
    match request(place, Call::RestartAll).and_then(decode::<Vec<StartReport>>) {
        Ok(reports) => {
            // Every report is shown, even after a failed one.
            let shown: Vec<bool> = reports.iter().map(show_start).collect();
            if shown.iter().all(|&ok| ok) {
                exit::OK
            } else {
                exit::FAILED
            }
        }
        Err(code) => code,
    }
}

pub fn load(place: &Place, file: &Path) -> u8 {
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    match compile(&path, &FsLoader) {
        Err(e) => {
            eprintln!("apm: cannot read `{}`: {e}", file.display());
            return exit::USAGE;
        }
        Ok(compilation) if compilation.has_errors() => {
            print!("{}", render::human(&compilation, color()));
            return exit::FAILED;
        }
        Ok(_) => {}
    }
    #[derive(Deserialize)]
    struct Outcome {
        worker: String,
        report: Option<StartReport>,
        /// Why it was not started, when not because it runs.
        #[serde(default)]
        why: Option<String>,
    }
    match request(place, Call::Load { path }).and_then(decode::<Vec<Outcome>>) {
        Ok(outcomes) => {
            let mut ok = true;
            for outcome in outcomes {
                match outcome.report {
                    Some(report) => ok &= show_start(&report),
                    None => println!(
                        "• {} {}",
                        outcome.worker,
                        outcome.why.as_deref().unwrap_or("is already running")
                    ),
                }
            }
            if ok { exit::OK } else { exit::FAILED }
        }
        Err(code) => code,
    }
}

pub fn unload(place: &Place, file: &Path) -> u8 {
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    match request(place, Call::Unload { path }).and_then(decode::<Vec<String>>) {
        Ok(removed) => {
            for name in &removed {
                println!("- removed {name}");
            }
            if removed.is_empty() {
                println!("no running worker came from {}", file.display());
            }
            exit::OK
        }
        Err(code) => code,
    }
}

/// A worker, or one of its instances as `NAME#I` (signals, start, stop,
/// restart); a bad index is said on stderr and is the exit code.
pub fn instance_target(target: &str) -> Result<(String, Option<usize>), u8> {
    match target.split_once('#') {
        Some((name, index)) => match index.parse::<usize>() {
            Ok(index) => Ok((name.to_owned(), Some(index))),
            Err(_) => {
                eprintln!("apm: `{target}`: the instance after `#` is a number, as in api#2");
                Err(exit::USAGE)
            }
        },
        None => Ok((target.to_owned(), None)),
    }
}

pub fn signal(place: &Place, signal: &str, target: &str) -> u8 {
    let (name, index) = match instance_target(target) {
        Ok(target) => target,
        Err(code) => return code,
    };
    match request(
        place,
        Call::Signal {
            name,
            index,
            signal: signal.to_owned(),
        },
    )
    .and_then(decode::<Vec<u32>>)
    {
        Ok(pids) => {
            println!(
                "sent {signal} to {}",
                pids.iter()
                    .map(|p| format!("pid {p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            exit::OK
        }
        Err(code) => code,
    }
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.0} KB", b as f64 / 1024.0),
    }
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[derive(Deserialize)]
struct Listing {
    workers: Vec<WorkerStatus>,
    daemon: Pong,
}

fn status_color(status: &str) -> &'static str {
    match status {
        "running" => "32",
        "crashed" | "errored" => "31",
        _ => "33",
    }
}

/// What `table` answers.
#[derive(Deserialize)]
struct Table {
    workers: Vec<Row>,
    daemon: Pong,
}

pub fn list(place: &Place, json: bool) -> u8 {
    if json {
        return match request(place, Call::List) {
            Ok(data) => {
                println!("{data:#}");
                exit::OK
            }
            Err(code) => code,
        };
    }
    let listing = match request(place, Call::Table).and_then(decode::<Table>) {
        Ok(listing) => listing,
        Err(code) => return code,
    };
    let mut rows = vec![
        [
            "name", "status", "pid", "inst", "uptime", "restarts", "cpu", "memory",
        ]
        .map(String::from),
    ];
    for w in &listing.workers {
        let running = w.instances.iter().filter(|(pid, ..)| pid.is_some()).count();
        let pids: Vec<String> = w
            .instances
            .iter()
            .filter_map(|(pid, ..)| pid.map(|p| p.to_string()))
            .collect();
        let uptime = w
            .instances
            .iter()
            .filter_map(|&(_, uptime_ms, ..)| uptime_ms)
            .min()
            .map_or("-".to_owned(), human_duration);
        let restarts: u32 = w
            .instances
            .iter()
            .map(|&(_, _, restarts, ..)| restarts)
            .sum();
        let cpu: f64 = w.instances.iter().map(|&(.., cpu, _)| cpu).sum();
        let memory: u64 = w.instances.iter().map(|&(.., memory)| memory).sum();
        rows.push([
            w.name.clone(),
            w.status.clone(),
            if pids.is_empty() {
                "-".to_owned()
            } else {
                pids.join(",")
            },
            format!("{running}/{}", w.instances.len()),
            uptime,
            restarts.to_string(),
            format!("{cpu:.1}%"),
            if memory == 0 {
                "-".to_owned()
            } else {
                human_bytes(memory)
            },
        ]);
    }
    let mut out = table(&rows);
    if listing.workers.is_empty() {
        out.push_str("no workers; start one with `apm run <program>` or `apm load <file>`\n");
    }
    out.push_str(&format!(
        "daemon: pid {}, apm {}, memory {}\n",
        listing.daemon.pid,
        listing.daemon.version,
        human_bytes(listing.daemon.memory_bytes)
    ));
    let _ = std::io::stdout().write_all(out.as_bytes());
    if let Some(notice) = &listing.daemon.notice {
        eprintln!(
            "warning: {notice} (see {})",
            place.home.join("apm.log").display()
        );
    }
    exit::OK
}

/// Rows as aligned columns, the first row (the header) in bold and the
/// second column (a status) in its colour.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let padded = format!("{cell:<w$}  ", w = widths[c]);
            line.push_str(&match (i, c) {
                (0, _) => paint(&padded, "1"),
                (_, 1) => paint(&padded, status_color(cell)),
                _ => padded,
            });
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `apm gui [stop]`.
pub fn gui(place: &Place, stop: bool) -> u8 {
    let data = match request(place, Call::Gui { stop }) {
        Ok(data) => data,
        Err(code) => return code,
    };
    match (data["url"].as_str(), data["stopped"].as_str()) {
        (Some(url), _) => println!("apm GUI: {url}"),
        (None, Some(url)) => println!("the GUI on {url} is stopped"),
        (None, None) => println!("no GUI was running"),
    }
    exit::OK
}

/// `apm monitor`: the instances of every worker, redrawn every
/// `interval` (on a terminal; elsewhere one frame after another), `count`
/// times or until interrupted. Each frame's CPU is the use over the
/// daemon's last sampling round (about a second; docs/cli.md, decision 110).
pub fn monitor(place: &Place, interval: Duration, count: Option<u64>) -> u8 {
    let terminal = std::io::stdout().is_terminal();
    if terminal && count.is_none() {
        return crate::monitor::interactive(place, interval);
    }
    let mut shown = 0;
    loop {
        let listing = match request(place, Call::List).and_then(decode::<Listing>) {
            Ok(listing) => listing,
            Err(code) => return code,
        };
        let mut frame = String::new();
        if terminal {
            // Home and clear, so each frame replaces the last.
            frame.push_str("\x1b[H\x1b[2J");
        } else if shown > 0 {
            frame.push('\n');
        }
        frame.push_str(&format!(
            "apm monitor — {} worker(s), daemon pid {} using {}, every {} (Ctrl-C quits)\n",
            listing.workers.len(),
            listing.daemon.pid,
            human_bytes(listing.daemon.memory_bytes),
            human_duration(interval.as_millis() as u64),
        ));
        let mut rows = vec![
            [
                "instance", "status", "pid", "cpu", "memory", "restarts", "uptime",
            ]
            .map(String::from),
        ];
        for worker in &listing.workers {
            for i in &worker.instances {
                rows.push([
                    format!("{}#{}", worker.name, i.index),
                    i.status.clone(),
                    i.pid.map_or("-".to_owned(), |p| p.to_string()),
                    format!("{:.1}%", i.cpu_percent),
                    if i.memory_bytes == 0 {
                        "-".to_owned()
                    } else {
                        human_bytes(i.memory_bytes)
                    },
                    i.restarts.to_string(),
                    i.uptime_ms.map_or("-".to_owned(), human_duration),
                ]);
            }
        }
        frame.push_str(&table(&rows));
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(frame.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader is gone (`apm monitor | head`).
            return exit::OK;
        }
        drop(stdout);
        shown += 1;
        if count.is_some_and(|count| shown >= count) {
            return exit::OK;
        }
        std::thread::sleep(interval);
    }
}

#[derive(Deserialize)]
struct Info {
    status: WorkerStatus,
    config: serde_json::Value,
    text: String,
}

fn info_of(place: &Place, name: &str) -> Result<(serde_json::Value, Info), u8> {
    let data = request(
        place,
        Call::Info {
            name: name.to_owned(),
        },
    )?;
    let info = decode::<Info>(data.clone())?;
    Ok((data, info))
}

pub fn info(place: &Place, name: &str, json: bool) -> u8 {
    let (data, info) = match info_of(place, name) {
        Ok(found) => found,
        Err(code) => return code,
    };
    if json {
        println!("{data:#}");
        return exit::OK;
    }
    let s = &info.status;
    println!(
        "{} — {} ({} instance(s))",
        s.name,
        paint(&s.status, status_color(&s.status)),
        s.instances.len()
    );
    for i in &s.instances {
        let pid = i.pid.map_or("-".to_owned(), |p| p.to_string());
        let last = i
            .last_exit
            .as_deref()
            .map(|e| format!(", last exit: {e}"))
            .unwrap_or_default();
        let serving = match i.serving {
            Some(true) => ", serving",
            Some(false) => ", gets no traffic",
            None => "",
        };
        let healthy = match i.healthy {
            Some(true) => ", healthy",
            Some(false) => ", not healthy yet",
            None => "",
        };
        println!(
            "  #{:<3} {:<9} pid {pid:<8} restarts {}{serving}{healthy}{last}",
            i.index, i.status, i.restarts
        );
        show_ipc(i);
    }
    println!(
        "logs: {} (stdout), {} (stderr)",
        s.out_log.display(),
        s.err_log.display()
    );
    if let Some(v) = &s.vanguard {
        println!(
            "vanguard: {} allowed, {} rate-limited, {} refused while banned, {} blocked by path, {} blocked by IP",
            v.allowed, v.rate_limited, v.banned, v.blocked_path, v.blocked_ip
        );
        if v.tracked > 0 {
            println!("  rate limiter tracks {} clients", v.tracked);
        }
        for (ip, left) in &v.bans {
            println!("  banned: {ip} for {} more", human_duration(*left));
        }
        if v.banned_now > v.bans.len() {
            println!("  and {} more banned clients", v.banned_now - v.bans.len());
        }
    }
    match &s.origin {
        apm_runtime::process::state::Origin::File { path } => println!("from: {}", path.display()),
        apm_runtime::process::state::Origin::Cli { .. } => println!("from: the command line"),
    }
    println!("\n{}", info.text.trim_end());
    let _ = info.config;
    exit::OK
}

pub fn env(place: &Place, name: &str, json: bool) -> u8 {
    let (_, info) = match info_of(place, name) {
        Ok(found) => found,
        Err(code) => return code,
    };
    // The running process's real environment when there is one.
    let live = info
        .status
        .instances
        .iter()
        .find_map(|i| i.pid)
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok());
    let vars: Vec<(String, String)> = match live {
        Some(bytes) => bytes
            .split(|&b| b == 0)
            .filter(|v| !v.is_empty())
            .filter_map(|v| {
                String::from_utf8_lossy(v)
                    .split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
        None => {
            let mut vars: Vec<(String, String)> = info.config["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some((
                        e["key"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            vars.push(("APM".to_owned(), "1".to_owned()));
            vars
        }
    };
    if json {
        let map: serde_json::Map<String, serde_json::Value> =
            vars.into_iter().map(|(k, v)| (k, v.into())).collect();
        println!("{:#}", serde_json::Value::Object(map));
    } else {
        for (key, value) in vars {
            println!("{key}={value}");
        }
    }
    exit::OK
}

/// Streams a log file's complete lines from offset `from` to `each`, one at
/// a time: a log of gigabytes costs its reading, not its size in memory.
/// Returns the offset just after the last complete line, where following
/// goes on: a line still being written is read whole next time, and a line
/// written meanwhile is neither lost nor printed twice.
fn each_log_line(path: &Path, from: u64, each: impl FnMut(&str)) -> u64 {
    match std::fs::File::open(path) {
        Ok(file) => each_line_of(&file, from, each),
        Err(_) => from,
    }
}

/// `each_log_line` on a file already open: the one being followed, which
/// may have been renamed away by a rotation meanwhile.
fn each_line_of(mut file: &std::fs::File, from: u64, mut each: impl FnMut(&str)) -> u64 {
    use std::io::BufRead;
    if from > 0 && file.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut reader = std::io::BufReader::new(file);
    let (mut line, mut end) = (Vec::new(), from);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return end,
            Ok(_) => {}
        }
        let Some(text) = line.strip_suffix(b"\n") else {
            return end; // a line still being written
        };
        end += line.len() as u64;
        each(&String::from_utf8_lossy(text));
    }
}

/// Whether a log line is of the stream whose marker is `only` (any, without
/// one): both streams may share a file.
fn in_stream(line: &str, only: Option<&str>) -> bool {
    only.is_none_or(|marker| apm_runtime::observe::logs::marker_of(line) == Some(marker))
}

/// The last `count` lines of a log (of one stream when `only` names its
/// marker), and where following goes on: the end of its last complete line.
/// Read backwards from the end, so a log of gigabytes costs the lines shown.
pub(crate) fn last_log_lines(
    file: &std::fs::File,
    only: Option<&str>,
    count: usize,
) -> (Vec<String>, u64) {
    last_lines_in_blocks(file, only, count, 64 * 1024)
}

fn last_lines_in_blocks(
    mut file: &std::fs::File,
    only: Option<&str>,
    count: usize,
    block: usize,
) -> (Vec<String>, u64) {
    use std::io::Read;
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return (Vec::new(), 0);
    };
    // `tail` holds the bytes from `start` up to the end of the last line
    // not yet taken; `end` is where the newest complete line ends.
    let (mut start, mut tail) = (len, Vec::<u8>::new());
    let mut end = None;
    let mut found = std::collections::VecDeque::new();
    while start > 0 && (end.is_none() || found.len() < count) {
        let size = block.min(start as usize);
        start -= size as u64;
        let mut chunk = vec![0; size];
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_exact(&mut chunk).is_err() {
            break;
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
        if end.is_none() {
            // A line still being written is not shown: following starts there.
            match tail.iter().rposition(|&b| b == b'\n') {
                Some(newline) => {
                    end = Some(start + newline as u64 + 1);
                    tail.truncate(newline + 1);
                }
                None => continue,
            }
        }
        // Take the complete lines at the back; the front may be part of one.
        while found.len() < count {
            let body = &tail[..tail.len() - 1];
            let Some(newline) = body.iter().rposition(|&b| b == b'\n') else {
                break;
            };
            let line = String::from_utf8_lossy(&body[newline + 1..]).into_owned();
            tail.truncate(newline + 1);
            if in_stream(&line, only) {
                found.push_front(line);
            }
        }
    }
    // At the start of the file, what is left is its first line.
    if start == 0 && end.is_some() && found.len() < count && !tail.is_empty() {
        let line = String::from_utf8_lossy(&tail[..tail.len() - 1]).into_owned();
        if in_stream(&line, only) {
            found.push_front(line);
        }
    }
    (found.into(), end.unwrap_or(0))
}

/// The file that holds a worker's stdout (or, with `err`, stderr) lines,
/// and the marker that picks them out when both streams share it.
pub(crate) fn log_source(
    status: &apm_runtime::process::supervisor::WorkerStatus,
    err: bool,
) -> (PathBuf, Option<&'static str>) {
    let shared = status.out_log == status.err_log;
    match (err, shared) {
        (false, false) => (status.out_log.clone(), None),
        (true, false) => (status.err_log.clone(), None),
        (false, true) => (status.out_log.clone(), Some("|")),
        (true, true) => (status.err_log.clone(), Some("!")),
    }
}

/// A log file followed through rotations and truncations: each look
/// hands on the lines completed since the one before (of the stream
/// `only` marks, when it marks one).
pub(crate) struct Followed {
    path: PathBuf,
    only: Option<&'static str>,
    file: Option<std::fs::File>,
    /// Where the next unread line of `file` starts.
    position: u64,
}

impl Followed {
    /// Opens the log at `path`; its last `lines` lines (of the stream
    /// `only` marks) are returned, and following goes on after them.
    pub(crate) fn open(
        path: PathBuf,
        only: Option<&'static str>,
        lines: usize,
    ) -> (Followed, Vec<String>) {
        let file = std::fs::File::open(&path).ok();
        let (last, position) = file
            .as_ref()
            .map_or((Vec::new(), 0), |file| last_log_lines(file, only, lines));
        (
            Followed {
                path,
                only,
                file,
                position,
            },
            last,
        )
    }

    /// The lines completed since the last look, to `each`.
    pub(crate) fn read_new(&mut self, mut each: impl FnMut(&str)) {
        let only = self.only;
        let mut each = |line: &str| {
            if in_stream(line, only) {
                each(line);
            }
        };
        let inode = |file: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            file.metadata().ok().map(|m| (m.dev(), m.ino()))
        };
        // Looked at before the followed file is read: once a rotation has
        // put a new file under the name, nothing more goes to the old one,
        // so reading the old one to its end first loses no line.
        let current = std::fs::File::open(&self.path).ok();
        if let Some(file) = &self.file {
            if file.metadata().is_ok_and(|m| m.len() < self.position) {
                self.position = 0; // truncated where it is
            }
            self.position = each_line_of(file, self.position, &mut each);
        }
        let renewed = current.as_ref().is_some_and(|new| {
            self.file
                .as_ref()
                .is_none_or(|old| inode(old) != inode(new))
        });
        if renewed {
            self.file = current;
            self.position = self
                .file
                .as_ref()
                .map_or(0, |file| each_line_of(file, 0, &mut each));
        }
    }
}

pub fn log(place: &Place, name: &str, err: bool, follow: bool, lines: usize) -> u8 {
    let (_, info) = match info_of(place, name) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let (path, only) = log_source(&info.status, err);
    // Followed from the end of its last lines, through rotations.
    let (mut followed, last) = Followed::open(path, only, lines);
    for line in last {
        println!("{line}");
    }
    if !follow {
        return exit::OK;
    }
    let mut reader_gone = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        followed.read_new(|line| {
            if !reader_gone {
                reader_gone = writeln!(std::io::stdout(), "{line}").is_err();
            }
        });
        if reader_gone {
            return exit::OK;
        }
    }
}

pub fn grep(place: &Place, pattern: &str, worker: Option<&str>) -> u8 {
    let statuses = match request(place, Call::List).and_then(decode::<Listing>) {
        Ok(listing) => listing.workers,
        Err(code) => return code,
    };
    let mut found = false;
    for status in statuses
        .iter()
        .filter(|s| worker.is_none_or(|w| w == s.name))
    {
        let mut paths = vec![&status.out_log];
        if status.err_log != status.out_log {
            paths.push(&status.err_log);
        }
        for path in paths {
            each_log_line(path, 0, |line| {
                if line.contains(pattern) {
                    found = true;
                    println!("{}: {line}", status.name);
                }
            });
        }
    }
    if worker.is_some_and(|w| !statuses.iter().any(|s| s.name == w)) {
        eprintln!("apm: no worker named `{}`", worker.unwrap_or_default());
        return exit::USAGE;
    }
    if found { exit::OK } else { exit::FAILED }
}

pub fn version(place: &Place, json: bool) -> u8 {
    let daemon = client::call(place, Call::Ping, false)
        .ok()
        .and_then(|r| serde_json::from_value::<Pong>(r.data).ok());
    if json {
        println!(
            "{:#}",
            serde_json::json!({ "cli": crate::protocol::VERSION, "daemon": daemon })
        );
    } else {
        println!("apm {}", crate::protocol::VERSION);
        match daemon {
            Some(d) => println!(
                "daemon {} (pid {}, protocol {})",
                d.version, d.pid, d.protocol
            ),
            None => println!("daemon not running"),
        }
    }
    exit::OK
}

pub fn exit_daemon(place: &Place) -> u8 {
    match client::call(place, Call::Exit, false) {
        Ok(Response { ok: true, data, .. }) => {
            // The daemon answers before its process ends: a command run right
            // after must not reach it, nor a file it still writes be changed
            // under it, so the answer waits for the process to be gone.
            let stopped: Vec<String> = data
                .get("stopped")
                .cloned()
                .and_then(|s| serde_json::from_value(s).ok())
                .unwrap_or_default();
            let pid = serde_json::from_value::<Pong>(data).map_or(0, |p| p.pid);
            if gone(pid, Duration::from_secs(10)) {
                println!("daemon stopped");
            } else {
                println!("daemon stopped its workers; pid {pid} has not ended yet");
            }
            // What the next daemon does with them (docs/cli.md, decision 49).
            if !stopped.is_empty() {
                println!(
                    "■ {} worker(s) stopped and kept stopped: {}. The next apm command starts a daemon that lists them \
                     without starting them: `apm start NAME` brings one back, `apm remove NAME` forgets it",
                    stopped.len(),
                    stopped.join(", ")
                );
            }
            exit::OK
        }
        Ok(Response {
            error, exit: code, ..
        }) => {
            eprintln!("apm: {}", error.unwrap_or_default());
            code.unwrap_or(exit::FAILED)
        }
        Err(_) => {
            println!("no daemon is running on @{}", place.socket);
            exit::OK
        }
    }
}

/// Whether process `pid` ends (or is a zombie) within `patience`.
fn gone(pid: u32, patience: Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if apm_runtime::process::procfs::stat(pid).is_none_or(|stat| stat.zombie) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `30s`, `500ms` or `500`: the config language's durations.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    use apm_compiler::values::{FromValue, Kind, Millis, ValueCx};
    let cx = ValueCx {
        loader: &FsLoader,
        base_dir: Path::new("/"),
        span: None,
    };
    Millis::from_value(text, &Kind::Duration, &cx)
        .map(Millis::as_duration)
        .map_err(|p| p.message)
}

/// A call whose answer may carry a start report.
pub fn start_like_optional(place: &Place, call: Call) -> u8 {
    match request(place, call) {
        Ok(data) => started(data),
        Err(code) => code,
    }
}

/// `apm daemon` without `--foreground`: make sure one runs in the background.
pub fn start_daemon_background(place: &Place) -> u8 {
    match request(place, Call::Ping).and_then(decode::<Pong>) {
        Ok(pong) => {
            println!("apm daemon running (pid {}) on @{}", pong.pid, place.socket);
            exit::OK
        }
        Err(code) => code,
    }
}

/// `apm reload`: prints each file's plan, then what applying it did.
pub fn reload(
    place: &Place,
    target: Option<String>,
    all: bool,
    force: bool,
    dry_run: bool,
    json: bool,
) -> u8 {
    let target = match (target, all) {
        (_, true) => ReloadTarget::All,
        (Some(name), false) => {
            let path = std::path::absolute(&name).unwrap_or_else(|_| PathBuf::from(&name));
            ReloadTarget::Named { name, path }
        }
        (None, false) => {
            eprintln!("apm: name a config file or a worker to reload, or use --all");
            return exit::USAGE;
        }
    };
    let data = match request(
        place,
        Call::Reload {
            target,
            force,
            dry_run,
        },
    ) {
        Ok(data) => data,
        Err(code) => return code,
    };
    if json {
        println!("{data:#}");
    }
    #[derive(Deserialize)]
    struct Applied {
        worker: String,
        action: String,
        error: Option<String>,
        report: Option<StartReport>,
    }
    #[derive(Deserialize)]
    struct FileReload {
        file: PathBuf,
        text: String,
        applied: Vec<Applied>,
    }
    let Ok(reloads) = decode::<Vec<FileReload>>(data) else {
        return exit::FAILED;
    };
    let mut ok = true;
    for reload in reloads {
        ok &= reload.applied.iter().all(|a| a.error.is_none());
        if json {
            continue;
        }
        let what = if dry_run { "would apply" } else { "applies" };
        println!("reload of {} {what}:", reload.file.display());
        print!("{}", reload.text);
        for applied in &reload.applied {
            match (&applied.error, &applied.report) {
                (None, _) => {}
                (Some(_), Some(report)) => {
                    show_start(report);
                }
                (Some(error), None) => println!(
                    "{} {} {}: {error}",
                    paint("✗", "31"),
                    applied.action,
                    applied.worker
                ),
            }
        }
    }
    if ok { exit::OK } else { exit::FAILED }
}

/// The plan a reload of `path` would apply, when a daemon runs; it starts none.
pub fn plan_of(place: &Place, path: &Path) -> Option<serde_json::Value> {
    let path = std::path::absolute(path).ok()?;
    match client::call(place, Call::Plan { path, force: false }, false) {
        Ok(Response { ok: true, data, .. }) => Some(data),
        _ => None,
    }
}

/// `apm saveconf [worker] [file]`.
pub fn saveconf(place: &Place, worker: Option<&str>, file: Option<&Path>) -> u8 {
    let listing = match request(place, Call::List).and_then(decode::<Listing>) {
        Ok(listing) => listing,
        Err(code) => return code,
    };
    if let Some(name) = worker
        && !listing.workers.iter().any(|w| w.name == name)
    {
        eprintln!("apm: no worker named `{name}`");
        return exit::USAGE;
    }
    // Live specs, grouped by the file each goes to.
    let mut targets: Vec<(PathBuf, Vec<apm_compiler::ir::WorkerSpec>)> = Vec::new();
    // Workers saved into a file they do not come from, which become its.
    let mut moving: Vec<(String, PathBuf)> = Vec::new();
    for status in listing
        .workers
        .iter()
        .filter(|w| worker.is_none_or(|n| n == w.name))
    {
        let target = match (file, &status.origin) {
            (Some(file), _) => std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf()),
            (None, apm_runtime::process::state::Origin::File { path }) => path.clone(),
            (None, apm_runtime::process::state::Origin::Cli { .. }) => {
                println!(
                    "• {} was started from the command line; save it with `apm saveconf {} FILE`",
                    status.name, status.name
                );
                continue;
            }
        };
        let info = match info_of(place, &status.name) {
            Ok((_, info)) => info,
            Err(code) => return code,
        };
        if status.origin
            != (apm_runtime::process::state::Origin::File {
                path: target.clone(),
            })
        {
            moving.push((status.name.clone(), target.clone()));
        }
        let loader = Overlay {
            path: PathBuf::from("/apm/live.conf"),
            contents: info.text,
            inner: &FsLoader,
        };
        let Some(spec) = compile(&loader.path, &loader)
            .ok()
            .and_then(|c| c.config.workers.into_iter().next())
        else {
            eprintln!("apm: cannot read the live config of `{}`", status.name);
            return exit::FAILED;
        };
        match targets.iter_mut().find(|(path, _)| *path == target) {
            Some((_, specs)) => specs.push(spec),
            None => targets.push((target, vec![spec])),
        }
    }
    // Saving everything back to where it came from also drops workers that
    // are gone from the daemon; saving one worker touches only it.
    let remove_missing = worker.is_none() && file.is_none();
    for (target, specs) in targets {
        let live: Vec<&apm_compiler::ir::WorkerSpec> = specs.iter().collect();
        let files = if target.exists() {
            match compile(&target, &FsLoader) {
                Ok(compilation) if compilation.has_errors() => {
                    eprintln!(
                        "apm: {} has errors; fix them before saving into it",
                        target.display()
                    );
                    return exit::FAILED;
                }
                Ok(compilation) => apm_compiler::save::save(&compilation, &live, remove_missing),
                Err(e) => {
                    eprintln!("apm: cannot read `{}`: {e}", target.display());
                    return exit::USAGE;
                }
            }
        } else {
            vec![(
                target.clone(),
                specs
                    .iter()
                    .map(print::worker)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )]
        };
        for (path, text) in &files {
            if let Err(e) = crate::files::write_atomically(path, text) {
                eprintln!("apm: cannot write `{}`: {e}", path.display());
                return exit::FAILED;
            }
        }
        let names: Vec<&str> = specs.iter().map(|s| s.name.value.as_str()).collect();
        let verb = if files.is_empty() {
            "already up to date in"
        } else {
            "saved to"
        };
        println!("✓ {} {verb} {}", names.join(", "), target.display());
    }
    // The reference's recipe: "persist a CLI-built worker, then manage it
    // from the file" (docs/cli.md, decision 54).
    for (name, path) in moving {
        let call = Call::Attach {
            name: name.clone(),
            path: path.clone(),
        };
        if let Err(code) = request(place, call) {
            return code;
        }
        println!(
            "• {name} now comes from {}: `apm reload {}` applies its changes; its next start gets the daemon's \
             base environment and the file's `env`, not the environment of the shell that ran it",
            path.display(),
            path.display()
        );
    }
    exit::OK
}

/// A JSON argument of `apm send` or `apm request`.
fn json_argument(data: &str) -> Result<serde_json::Value, u8> {
    serde_json::from_str(data).map_err(|e| {
        eprintln!(
            "apm: the message is not JSON ({e}): give a JSON value, such as '{{\"cmd\":\"status\"}}' or '\"text\"' with its quotes"
        );
        exit::USAGE
    })
}

pub fn send(place: &Place, channel: String, data: &str, json: bool) -> u8 {
    let result = json_argument(data).and_then(|data| request(place, Call::Send { channel, data }));
    match result {
        Ok(answer) if json => {
            println!("{answer}");
            exit::OK
        }
        Ok(answer) => {
            println!("sent to {} process(es)", answer["delivered"]);
            exit::OK
        }
        Err(code) => code,
    }
}

/// Prints the first reply; exit 1 when none came.
pub fn ipc_request(
    place: &Place,
    channel: String,
    data: &str,
    timeout: std::time::Duration,
    json: bool,
) -> u8 {
    let result = json_argument(data).and_then(|data| {
        request(
            place,
            Call::Request {
                channel,
                data,
                timeout_ms: Some(timeout.as_millis() as u64),
            },
        )
    });
    let answer = match result {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    // A reply of null is null too: scripts test the exit status only.
    let replied = answer["status"] == "reply" && !answer["data"].is_null();
    if json {
        println!("{answer}");
    } else if replied {
        println!("{}", answer["data"]);
    } else if answer["status"] == "reply" {
        println!("null");
    } else {
        let why = match answer["status"].as_str() {
            Some("no_listener") => "no process listens on that channel",
            Some("timeout") => "no reply before the timeout",
            _ => "every process it reached ended without replying",
        };
        eprintln!("apm: null: {why}");
    }
    if replied { exit::OK } else { exit::FAILED }
}

/// An instance's dashboard values, metrics and IPC drops, under its line.
/// Ids and values are printed as JSON: a worker's strings reach the
/// operator's terminal with their control characters escaped.
fn show_ipc(instance: &apm_runtime::process::supervisor::InstanceStatus) {
    for (id, entry) in instance.dash.as_object().into_iter().flatten() {
        let color = entry["color"]
            .as_str()
            .map(|c| format!(" ({})", serde_json::Value::from(c)))
            .unwrap_or_default();
        println!(
            "       dash {}: {}{color}",
            serde_json::Value::from(id.as_str()),
            entry["value"]
        );
    }
    for (name, entry) in instance.metrics.as_object().into_iter().flatten() {
        println!(
            "       metric {}: {} ({})",
            serde_json::Value::from(name.as_str()),
            entry["value"],
            entry["type"].as_str().unwrap_or("?")
        );
    }
    if instance.ipc_dropped > 0 {
        println!(
            "       IPC: {} dropped (messages it did not read in time, or values beyond its bounds)",
            instance.ipc_dropped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_are_read_backwards_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut text = String::new();
        for i in 0..50 {
            let marker = if i % 3 == 0 { "!" } else { "|" };
            text.push_str(&format!("t w {marker} line {i} {}\n", "x".repeat(i % 7)));
        }
        let complete = text.len() as u64;
        text.push_str("t w | still being writ");
        std::fs::write(&path, &text).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let forward = |only: Option<&str>, count: usize| -> Vec<String> {
            let all: Vec<String> = text
                .lines()
                .take(50)
                .filter(|l| in_stream(l, only))
                .map(str::to_owned)
                .collect();
            all[all.len().saturating_sub(count)..].to_vec()
        };
        for block in [1, 2, 7, 16, 64, 4096] {
            for only in [None, Some("|"), Some("!")] {
                for count in [0, 1, 3, 17, 49, 50, 80] {
                    let (lines, end) = last_lines_in_blocks(&file, only, count, block);
                    assert_eq!(
                        lines,
                        forward(only, count),
                        "block {block} {only:?} {count}"
                    );
                    assert_eq!(end, complete, "block {block}");
                }
            }
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "").unwrap();
        let file = std::fs::File::open(&empty).unwrap();
        assert_eq!(last_lines_in_blocks(&file, None, 5, 8), (Vec::new(), 0));
        std::fs::write(&empty, "partial").unwrap();
        let file = std::fs::File::open(&empty).unwrap();
        assert_eq!(last_lines_in_blocks(&file, None, 5, 8), (Vec::new(), 0));
    }
}
