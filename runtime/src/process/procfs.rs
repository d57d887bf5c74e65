//! What /proc tells about a process: its start time (to recognise it after
//! a daemon crash, never confusing it with a reused pid), CPU time and
//! memory; which process listens on a TCP port; a process's descendants
//! and whether one holds a socket.

use std::time::Duration;

/// The fields of `/proc/<pid>/stat` that apm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The process group.
    pub pgrp: u32,
    /// Ended but not yet reaped: it holds its pid and does nothing.
    pub zombie: bool,
    /// Clock ticks since boot at which the process started.
    pub start_ticks: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
}

pub fn stat(pid: u32) -> Option<ProcStat> {
    use std::io::Read;
    // One read into a buffer larger than the file can be (52 numbers and a
    // name of at most 16 bytes): `read_to_string` also asked for its size
    // and read again to see the end, and a listing of 1,000 instances spent
    // half its time in those calls.
    let mut buffer = [0u8; 2048];
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let length = file.read(&mut buffer).ok()?;
    let stat = std::str::from_utf8(buffer.get(..length)?).ok()?;
    // The command name is in parentheses and may contain spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field numbers from proc(5), shifted by the 2 fields before `state`.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (pgrp, utime, stime, start_ticks, rss_pages) =
        (field(5)?, field(14)?, field(15)?, field(22)?, field(24)?);
    Some(ProcStat {
        pgrp: pgrp as u32,
        zombie: fields.first() == Some(&"Z"),
        start_ticks,
        cpu_ticks: utime + stime,
        rss_bytes: rss_pages * page_size(),
    })
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |n| n as u64)
    })
}

/// The bytes a process has made the kernel read from and write to storage
/// (`read_bytes`, `write_bytes` of `/proc/<pid>/io`), for the dashboard's
/// `ior` and `iow` panels.
pub fn io(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    };
    Some((field("read_bytes")?, field("write_bytes")?))
}

/// The length of a clock tick.
pub fn tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100);
        Duration::from_secs(1) / hz.max(1) as u32
    })
}

/// Whether `pid` is still the process that started at `start_ticks`, and
/// has not ended.
pub fn is_same_process(pid: u32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && !s.zombie)
}

/// Every process that has not ended, by pid.
pub fn processes() -> Vec<(u32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| !s.zombie)
        .collect()
}

/// Whether the environment `/proc/<pid>/environ` shows holds the entry
/// `entry` (`KEY=VALUE`). A process of another user reads as not holding it,
/// unless the caller is root.
pub fn has_env_entry(pid: u32, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry))
}

/// The process that listens on a TCP port, as far as this process can see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// The owner of the listening socket.
    pub uid: u32,
    /// The lowest pid holding the socket, and its command line; `None` when
    /// no visible process holds it (another user's, seen without root).
    pub process: Option<(u32, String)>,
}

/// Who listens on `port` (IPv4 or IPv6, any address), if anyone does.
pub fn tcp_listener(port: u16) -> Option<Listener> {
    let sockets = tcp_listening_sockets(port);
    let &(_, uid) = sockets.first()?;
    let links: Vec<String> = sockets
        .iter()
        .map(|&(inode, _)| socket_link(inode))
        .collect();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    pids.sort_unstable();
    // Another user's descriptors are unreadable without root: skipped.
    let process = pids
        .into_iter()
        .find(|&pid| holds(pid, &links))
        .map(|pid| (pid, command_line(pid)));
    Some(Listener { uid, process })
}

/// How `/proc/<pid>/fd` names the socket `inode`.
fn socket_link(inode: u64) -> String {
    format!("socket:[{inode}]")
}

/// Whether `pid` holds one of the descriptors `links` name.
fn holds(pid: u32, links: &[String]) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| links.iter().any(|l| target.as_os_str() == l.as_str()))
        })
    })
}

/// `pid` and its descendants, from each thread's `children` list (at most
/// `MAX_TREE` processes): what the instance started, however many other
/// processes the machine runs.
pub fn tree(pid: u32) -> Vec<u32> {
    const MAX_TREE: usize = 4096;
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() && tree.len() < MAX_TREE {
        let parent = tree[next];
        next += 1;
        let Ok(threads) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for thread in threads.filter_map(Result::ok) {
            let children =
                std::fs::read_to_string(thread.path().join("children")).unwrap_or_default();
            tree.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    tree.truncate(MAX_TREE);
    tree
}

/// Whether `pid` holds the socket `inode`.
pub fn holds_socket(pid: u32, inode: u64) -> bool {
    holds(pid, &[socket_link(inode)])
}

/// The (inode, uid) of each socket listening on TCP `port` (IPv4 or IPv6,
/// any address).
pub fn tcp_listening_sockets(port: u16) -> Vec<(u64, u32)> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| listening_sockets(&table, port))
        .collect()
}

/// The (inode, uid) of each socket of a `/proc/net/tcp{,6}` table that
/// listens on `port`.
fn listening_sockets(table: &str, port: u16) -> Vec<(u64, u32)> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let listening =
                u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == LISTEN;
            listening.then_some(())?;
            Some((fields.get(9)?.parse().ok()?, fields.get(7)?.parse().ok()?))
        })
        .filter(|&(inode, _)| inode != 0)
        .collect()
}

/// A process's command line as one line fit for a terminal (see
/// `printable_command`).
pub fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if raw.is_empty() {
        // A kernel thread, or a process that ended meanwhile.
        let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap_or_default();
        return format!("[{}]", printable_command(comm.trim_ascii_end()));
    }
    printable_command(&raw)
}

/// NUL-separated arguments joined by spaces, control characters (which
/// another user's process chooses freely) replaced, at most 200 characters.
fn printable_command(raw: &[u8]) -> String {
    const LONGEST: usize = 200;
    let mut line: String = String::from_utf8_lossy(raw)
        .trim_end_matches('\0')
        .chars()
        .map(|c| match c {
            '\0' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    if let Some((cut, _)) = line.char_indices().nth(LONGEST) {
        line.truncate(cut);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let stat = stat(me).unwrap();
        assert!(stat.rss_bytes > 0);
        assert!(is_same_process(me, stat.start_ticks));
        assert!(!is_same_process(me, stat.start_ticks + 1));
        assert!(!stat.zombie);
        assert!(
            processes()
                .iter()
                .any(|(pid, s)| *pid == me && s.pgrp == stat.pgrp)
        );
        assert!(tick() > Duration::ZERO);
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(has_env_entry(me, format!("PATH={path}").as_bytes()));
        assert!(!has_env_entry(me, b"PATH=/no/such/path/anywhere"));
    }

    #[test]
    fn a_tree_holds_a_process_and_its_descendants_and_no_other() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sh -c 'sleep 30' & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let pid = shell.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // The shell, its two children and the inner shell's sleep.
        while tree(pid).len() < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = tree(pid);
        for &process in found.iter().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(process as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        shell.wait().unwrap();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(found[0], pid);
        assert!(!found.contains(&std::process::id()));
        // This process holds its own listener; the shell does not.
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let inode = std::os::linux::fs::MetadataExt::st_ino(
            &std::fs::metadata(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&listener)
            ))
            .unwrap(),
        );
        assert!(holds_socket(std::process::id(), inode));
        assert!(!holds_socket(std::process::id(), inode + 1));
    }

    #[test]
    fn finds_the_process_that_listens_on_a_port() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let listener = tcp_listener(port).expect("a listener");
        assert_eq!(listener.uid, nix::unistd::geteuid().as_raw());
        let (pid, command) = listener.process.expect("visible to itself");
        assert_eq!(pid, std::process::id());
        assert!(command.contains("apm_runtime"), "{command}");

        let v6 = std::net::TcpListener::bind("[::]:0").unwrap();
        let port6 = v6.local_addr().unwrap().port();
        assert_eq!(
            tcp_listener(port6).and_then(|l| l.process).map(|p| p.0),
            Some(std::process::id())
        );
        drop((v4, v6));
        assert_eq!(tcp_listener(port), None, "nothing listens any more");
        // A connected socket on the port is not a listener.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert_eq!(tcp_listener(client_port), None);
    }

    #[test]
    fn a_command_line_cannot_paint_the_terminal() {
        assert_eq!(
            printable_command(b"sleep\x001031\x00\x1b[31mred\nline\x00"),
            "sleep 1031 ?[31mred?line"
        );
        let long = printable_command(&[b'x'; 300]);
        assert_eq!(long.chars().count(), 201);
        assert!(long.ends_with('…'));
        assert!(command_line(std::process::id()).contains("apm_runtime"));
    }
}
