//! The CLI's side of the control socket: connect (starting the daemon when
//! it is not running), send one request, read one response.

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::exit;
use crate::protocol::{Call, PROTOCOL, Request, Response, VERSION};

/// Where the daemon lives: `APM_HOME` and `APM_SOCKET` (decisions: the daemon, rule 1).
#[derive(Clone, Debug)]
pub struct Place {
    pub home: PathBuf,
    pub socket: String,
}

impl Place {
    pub fn from_env() -> Place {
        let home = std::env::var_os("APM_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let user_home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/root"));
                user_home.join(".apm")
            });
        let socket = std::env::var("APM_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "apm".to_owned());
        Place { home, socket }
    }

    pub fn address(&self) -> std::io::Result<SocketAddr> {
        SocketAddr::from_abstract_name(self.socket.as_bytes())
    }

    pub fn log_file(&self) -> PathBuf {
        self.home.join("apm.log")
    }
}

/// A failure to talk to the daemon, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub exit: u8,
    pub message: String,
}

impl Failure {
    fn unreachable(place: &Place, message: impl std::fmt::Display) -> Failure {
        Failure {
            exit: exit::UNREACHABLE,
            message: format!(
                "cannot reach the apm daemon on @{}: {message}",
                place.socket
            ),
        }
    }
}

fn connect(place: &Place) -> std::io::Result<UnixStream> {
    UnixStream::connect_addr(&place.address()?)
}

/// The process at the other end of a unix socket, from its credentials.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: i32,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred =
            nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(Peer {
            uid: cred.uid(),
            pid: cred.pid(),
        })
    }

    /// `uid 65534 (nobody), pid 1234`.
    pub fn describe(&self) -> String {
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map_or(String::new(), |user| format!(" ({})", user.name));
        format!("uid {}{name}, pid {}", self.uid, self.pid)
    }
}

/// Whether the process answering on the socket name may receive this
/// caller's requests, which can carry secrets (decisions: the daemon, rule
/// 7): root, the caller's own uid, or, for a caller who is not root and set
/// `APM_HOME`, the owner of that directory (how a member of a non-root
/// daemon's `allow_group` names the daemon it means to use). Anyone else
/// bound the name first: nothing is sent to it.
fn check_answerer(place: &Place, stream: &UnixStream) -> Result<(), Failure> {
    let peer = Peer::of(stream).map_err(|e| {
        Failure::unreachable(
            place,
            format!("cannot learn who answers on the socket: {e}"),
        )
    })?;
    let me = nix::unistd::geteuid();
    if peer.uid == 0 || peer.uid == me.as_raw() {
        return Ok(());
    }
    let named_home = std::env::var_os("APM_HOME").is_some_and(|h| !h.is_empty());
    let home_owner = std::fs::metadata(&place.home).ok().map(|m| m.uid());
    if !me.is_root() && named_home && home_owner == Some(peer.uid) {
        return Ok(());
    }
    let trusted = if me.is_root() {
        "root".to_owned()
    } else {
        format!("root, you (uid {me}), or the owner of APM_HOME when you set it")
    };
    Err(Failure {
        exit: exit::UNREACHABLE,
        message: format!(
            "refusing the process that answers on @{}: it runs as {}, and apm only talks to a daemon of {trusted}. \
             It may be another user's program holding the daemon's socket name to read what you send; nothing was \
             sent to it. Have root stop it (`kill {}`), or use another socket name with APM_SOCKET",
            place.socket,
            peer.describe(),
            peer.pid
        ),
    })
}

/// Who holds the socket name, for a daemon that cannot bind it: the
/// process answering on it, or, when it only bound the name without
/// listening, the process whose descriptor is that socket (found through
/// `/proc`, which shows other users' descriptors only to root).
pub fn holder_of(place: &Place) -> Option<Peer> {
    if let Ok(stream) = connect(place) {
        return Peer::of(&stream).ok();
    }
    let wanted = format!("@{}", place.socket);
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(7) == Some(&wanted.as_str())).then(|| fields[6].to_owned())
    })?;
    let link = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let holds = std::fs::read_dir(entry.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.as_os_str() == link.as_str())
                });
            let uid = holds.then(|| std::fs::metadata(entry.path()).ok().map(|m| m.uid()))??;
            Some(Peer { uid, pid })
        })
}

/// Starts a daemon in the background, detached from this terminal, with
/// its output in `$APM_HOME/apm.log`; returns it and where its output
/// starts in that file.
fn start_daemon(place: &Place) -> Result<(Child, u64), Failure> {
    std::fs::create_dir_all(&place.home).map_err(|e| {
        Failure::unreachable(
            place,
            format!("cannot create {}: {e}", place.home.display()),
        )
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(place.log_file())
        .map_err(|e| {
            Failure::unreachable(
                place,
                format!("cannot open {}: {e}", place.log_file().display()),
            )
        })?;
    let start = log.metadata().map_or(0, |m| m.len());
    let exe = std::env::current_exe().map_err(|e| Failure::unreachable(place, e))?;
    let child = Command::new(exe)
        .args(["daemon", "--foreground", "--detach"])
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Failure::unreachable(place, e))?,
        )
        .stderr(log)
        .spawn()
        .map_err(|e| Failure::unreachable(place, format!("cannot start the daemon: {e}")))?;
    Ok((child, start))
}

/// A daemon this CLI started that ended before it listened: what it said.
fn daemon_failed(place: &Place, status: std::process::ExitStatus, start: u64) -> Failure {
    let said = std::fs::File::open(place.log_file())
        .and_then(|mut file| {
            use std::io::{Read, Seek};
            file.seek(std::io::SeekFrom::Start(start))?;
            let mut text = String::new();
            file.take(64 * 1024).read_to_string(&mut text)?;
            Ok(text)
        })
        .unwrap_or_default();
    let said: Vec<&str> = said
        .lines()
        .map(|line| line.split_once(' ').map_or(line, |(_, text)| text))
        .collect();
    Failure::unreachable(
        place,
        format!(
            "the daemon it started ended ({status}) before it listened:\n{}",
            said.join("\n")
        ),
    )
}

/// Sends one call and returns the response; starts the daemon first when
/// `autostart` and none answers. A daemon that dies mid-call (it was being
/// killed) is replaced once.
pub fn call(place: &Place, call: Call, autostart: bool) -> Result<Response, Failure> {
    let request = Request {
        protocol: PROTOCOL,
        version: VERSION.to_owned(),
        call,
    };
    let mut line = serde_json::to_vec(&request).expect("requests serialise");
    line.push(b'\n');
    let response = match exchange(place, &line, autostart) {
        Err(Exchange::Lost(_)) if autostart => {
            std::thread::sleep(Duration::from_millis(50));
            exchange(place, &line, true).map_err(|e| e.into_failure(place))
        }
        result => result.map_err(|e| e.into_failure(place)),
    }?;
    for notice in &response.notices {
        eprintln!("apm: {notice}");
    }
    Ok(response)
}

enum Exchange {
    Failed(Failure),
    /// The connection broke after it was made.
    Lost(std::io::Error),
}

impl Exchange {
    fn into_failure(self, place: &Place) -> Failure {
        match self {
            Exchange::Failed(failure) => failure,
            Exchange::Lost(e) => Failure::unreachable(place, e),
        }
    }
}

fn exchange(place: &Place, line: &[u8], autostart: bool) -> Result<Response, Exchange> {
    let mut stream = match connect(place) {
        Ok(stream) => stream,
        Err(_) if autostart => {
            let (mut daemon, start) = start_daemon(place).map_err(Exchange::Failed)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match connect(place) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Exchange::Failed(Failure::unreachable(
                            place,
                            format!("{e} (see {})", place.log_file().display()),
                        )));
                    }
                    Err(_) => {
                        if let Ok(Some(status)) = daemon.try_wait() {
                            return Err(Exchange::Failed(daemon_failed(place, status, start)));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        Err(e) => return Err(Exchange::Failed(Failure::unreachable(place, e))),
    };
    check_answerer(place, &stream).map_err(Exchange::Failed)?;
    // A daemon that refuses this user answers before it reads the request,
    // and may have closed the connection before the request is written:
    // its answer is read all the same.
    let sent = stream.write_all(line);
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        sent.map_err(Exchange::Lost)?;
        read.map_err(Exchange::Lost)?;
        return Err(Exchange::Lost(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the daemon closed the connection without answering",
        )));
    }
    serde_json::from_str(&answer).map_err(|_| Exchange::Failed(Failure {
        exit: exit::UNREACHABLE,
        message: format!(
            "the daemon on @{} answered in a format this apm {VERSION} does not understand; it is probably another \
             version: stop it with that version's `apm exit daemon`, then run this command again",
            place.socket
        ),
    }))
}
