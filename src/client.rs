//! The CLI's side of the control socket: connect (starting the daemon when
//! it is not running), send one request, read one response.

use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
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

/// Starts a daemon in the background, detached from this terminal, with
/// its output in `$APM_HOME/apm.log`.
fn start_daemon(place: &Place) -> Result<(), Failure> {
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
    let exe = std::env::current_exe().map_err(|e| Failure::unreachable(place, e))?;
    Command::new(exe)
        .args(["daemon", "--foreground", "--detach"])
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Failure::unreachable(place, e))?,
        )
        .stderr(log)
        .spawn()
        .map_err(|e| Failure::unreachable(place, format!("cannot start the daemon: {e}")))?;
    Ok(())
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
            start_daemon(place).map_err(Exchange::Failed)?;
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
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
        Err(e) => return Err(Exchange::Failed(Failure::unreachable(place, e))),
    };
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
