//! The loopback port of an `upstream port` instance: chosen for it before
//! it starts, and probed until the instance accepts on it. The port is free
//! when chosen and the child binds it later, so another process may take it
//! in between: an outgoing connection (which is why it is chosen where the
//! kernel gives none of those), or another local user listening there on
//! purpose, who would then receive the worker's clients (which is why the
//! proxy sends nothing to a port until its listener is known to be the
//! instance's; decisions: the CLI, 124).

use super::*;

/// How many ports above the ephemeral range `free_port` tries before it
/// lets the kernel choose.
const TRIES: u32 = 64;

/// A free loopback port for an instance: above the kernel's ephemeral range
/// (`ip_local_port_range`), where no outgoing connection takes it (binding
/// port 0 picks from inside that range), taken in turn from where the last
/// choice ended so that a port just given to an instance that has not bound
/// it yet is not given again. Without a free port up there, one the kernel
/// picks.
pub(super) fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::AtomicU32;
    // Daemons of one machine start at places of their own above the range:
    // started together, their pids are near each other, and so would be
    // the ports their instances are given, the one's choice racing the
    // other's bind. `RandomState`'s keys are random per process.
    static NEXT: std::sync::LazyLock<AtomicU32> = std::sync::LazyLock::new(|| {
        use std::hash::BuildHasher;
        AtomicU32::new(std::collections::hash_map::RandomState::new().hash_one(0u8) as u32)
    });
    let above = ephemeral_range().and_then(|(_, last)| last.checked_add(1));
    if let Some(port) = above.and_then(|first| in_turn(first, &NEXT, is_free)) {
        return Ok(port);
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()
        .map(|a| a.port())
}

/// The next port from `first` up to 65535 (round again) that `is_free`,
/// after the one `next` counts to; none after `TRIES` taken ones.
fn in_turn(
    first: u16,
    next: &std::sync::atomic::AtomicU32,
    is_free: impl Fn(u16) -> bool,
) -> Option<u16> {
    let span = u32::from(u16::MAX - first) + 1;
    (0..span.min(TRIES))
        .map(|_| {
            let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
            first + u16::try_from(offset).expect("within the span")
        })
        .find(|&port| is_free(port))
}

/// The kernel's range of ports for outgoing connections.
fn ephemeral_range() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_whitespace().map(|b| b.parse().ok());
    Some((bounds.next()??, bounds.next()??))
}

/// Whether an instance may listen on `port`: nothing is bound to it, on
/// the loopback address or on every address (an app may bind either).
fn is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Who listens on an instance's port.
#[derive(Debug, PartialEq, Eq)]
enum Listening {
    /// The instance, and no one else.
    Owner,
    /// Someone else too: the uid of a stranger's socket.
    Stranger(u32),
    /// No one (any more).
    Nobody,
}

/// Who listens on `port`, for an instance whose process is `pid` and runs
/// as `owner`. A socket is the instance's if `owner` has it, or if a
/// process of the instance holds it: its command may switch to another
/// user itself (`gosu`, `setpriv`, `sudo -u` in `exec`). Only the
/// instance's own processes are looked through, and only then: a stranger
/// squatting many ports makes the daemon read no other process's
/// descriptors.
fn listening(port: u16, owner: u32, pid: u32) -> Listening {
    use crate::process::sock_diag::Listening as Socket;
    let sockets = listeners(port);
    // Walked once, for the first socket of another uid.
    let tree = std::cell::OnceCell::new();
    let instances = |socket: &Socket| {
        socket.uid == owner
            || tree
                .get_or_init(|| procfs::tree(pid))
                .iter()
                .any(|&process| procfs::holds_socket(process, socket.inode))
    };
    match sockets.iter().find(|socket| !instances(socket)) {
        Some(stranger) => Listening::Stranger(stranger.uid),
        None if sockets.is_empty() => Listening::Nobody,
        None => Listening::Owner,
    }
}

/// The sockets listening on `port`: from the kernel's socket diagnostics,
/// or /proc/net/tcp where those are not to be had.
fn listeners(port: u16) -> Vec<crate::process::sock_diag::Listening> {
    use crate::process::sock_diag::{self, Listening as Socket};
    sock_diag::listeners(port).unwrap_or_else(|_| {
        let sockets = procfs::tcp_listening_sockets(port);
        let socket = |(inode, uid)| Socket { uid, inode };
        sockets.into_iter().map(socket).collect()
    })
}

/// How many times in a row an instance is started again at once because
/// its port was taken before it bound it; past that, its exits count as
/// any other's (`max_err_restarts`, `err_delay`).
pub(super) const RETAKES: u8 = 3;

/// An instance's loopback port with `upstream port`. It gets traffic once
/// the process accepts connections on it.
pub(super) struct Port {
    pub(super) address: std::net::SocketAddr,
    pub(super) accepting: Arc<std::sync::atomic::AtomicBool>,
    pub(super) in_flight: Arc<crate::traffic::inflight::InFlight>,
}

impl Port {
    pub(super) fn new(number: u16) -> Port {
        Port {
            address: std::net::SocketAddr::from(([127, 0, 0, 1], number)),
            accepting: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    pub(super) fn accepting(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether something listens on the port. Asked once the instance's
    /// process has ended without ever serving on it: another process then
    /// took it between its choice and the instance's bind (another user's,
    /// or another daemon's instance), and the bind most likely failed.
    pub(super) fn listened(&self) -> bool {
        !listeners(self.address.port()).is_empty()
    }

    /// Tries to connect until the process accepts and the port's listener
    /// is the instance's (see `listening`: `owner` is the uid it runs as,
    /// `pid` its process), then has the listeners updated. A stranger's
    /// listener is reported once and gets nothing;
    /// the probe goes on, slower, in case it leaves and the instance binds
    /// the port after all (else the instance's own failure to bind it ends
    /// its process, and the restart gets another port). Ends when the
    /// instance moves on to another process.
    pub(super) fn probe(
        &self,
        tx: mpsc::UnboundedSender<Msg>,
        instance: String,
        owner: u32,
        pid: u32,
    ) {
        let (address, accepting) = (self.address, self.accepting.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(5);
            let mut reported = false;
            while Arc::strong_count(&accepting) > 1 {
                if tokio::net::TcpStream::connect(address).await.is_ok() {
                    // A system call or, without sock_diag, /proc/net/tcp:
                    // off the supervisor's thread.
                    let port = address.port();
                    let found = tokio::task::spawn_blocking(move || listening(port, owner, pid))
                        .await
                        .unwrap_or(Listening::Nobody);
                    match found {
                        Listening::Owner => {
                            accepting.store(true, std::sync::atomic::Ordering::Release);
                            let _ = tx.send(Msg::Recheck);
                            return;
                        }
                        Listening::Stranger(uid) if !reported => {
                            reported = true;
                            crate::log(format_args!(
                                "{instance}: port {port} is listened on by uid {uid}, neither the instance's user (uid {owner}) nor one of its processes: it gets no traffic"
                            ));
                            pause = STRANGER_PAUSE;
                        }
                        Listening::Stranger(_) | Listening::Nobody => {}
                    }
                }
                tokio::time::sleep(pause).await;
                if !reported {
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        });
    }
}

/// How often a port a stranger listens on is looked at again.
const STRANGER_PAUSE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_taken_in_turn_above_the_range_skipping_taken_ones() {
        let next = std::sync::atomic::AtomicU32::new(0);
        let free = |port| port != 65_532;
        let chosen: Vec<_> = (0..6).map(|_| in_turn(65_530, &next, free)).collect();
        let expected = [65_530, 65_531, 65_533, 65_534, 65_535, 65_530];
        assert_eq!(chosen, expected.map(Some));
        assert_eq!(in_turn(65_000, &next, |_| false), None, "all taken");
        // Past the last try, it is the next caller's turn.
        assert_eq!(
            in_turn(65_000, &next, |_| true),
            Some(65_000 + 7 + TRIES as u16)
        );
    }

    #[test]
    fn free_ports_are_above_the_ephemeral_range_and_not_given_twice() {
        let (_, last) = ephemeral_range().expect("/proc/sys/net/ipv4/ip_local_port_range");
        let ports = [free_port().unwrap(), free_port().unwrap()];
        assert_ne!(ports[0], ports[1]);
        if last < u16::MAX - u16::try_from(TRIES).unwrap() {
            assert!(ports.iter().all(|&p| p > last), "{ports:?} above {last}");
        }
        let held = std::net::TcpListener::bind(("127.0.0.1", ports[0])).unwrap();
        assert!(!is_free(ports[0]), "a port bound on the loopback address");
        drop(held);
    }

    #[test]
    fn a_listener_is_the_instances_if_its_user_has_it_or_its_process_holds_it() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = nix::unistd::geteuid().as_raw();
        let (this, parent) = (std::process::id(), nix::unistd::getppid().as_raw() as u32);
        assert_eq!(listening(port, me, this), Listening::Owner);
        // Held by a process of the instance: its own, whatever its uid.
        assert_eq!(listening(port, me + 1, this), Listening::Owner);
        assert_eq!(listening(port, me + 1, parent), Listening::Owner);
        // Held by no process of the instance, and another user's.
        let mut stranger = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let found = listening(port, me + 1, stranger.id());
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        assert_eq!(found, Listening::Stranger(me));
        drop(listener);
        assert_eq!(listening(port, me, this), Listening::Nobody);
    }
}
