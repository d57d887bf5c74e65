//! Client connections that wait for their client with no task. A keep-alive
//! client idle between two requests is most of a busy proxy's connections;
//! each one's task (its future, tokio's header and a 128-byte-aligned
//! cell) was the largest thing it held. Here it is a socket in an epoll set
//! of its runtime's, with what serves it next boxed beside it, and one task
//! per runtime watches them all: when the client sends something or
//! closes, its connection gets a task again; when it has been idle for its
//! `keep_alive`, it is closed (decision 123).
//!
//! The socket stays registered with tokio's own reactor meanwhile (which
//! records, edge-triggered, that it became readable, for the read that
//! follows); the epoll set here is level-triggered, so a client that sent
//! before its socket was added is seen at once.

use std::cell::RefCell;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::sys::EpollSet;
use crate::traffic::threads;

/// A connection waiting for its client: what serves it once the client
/// sends something or closes.
pub(super) trait Sleeper: Send {
    /// The client's socket, which the sleeper owns (none: it cannot sleep
    /// here, as a test's in-memory pipe).
    fn socket(&self) -> Option<BorrowedFd<'_>>;

    /// The client sent something or closed: serve it, on a task of the
    /// current runtime.
    fn wake(self: Box<Self>);
}

/// How often expired sleepers are looked for: `keep_alive` is kept to
/// this (a served connection's own idle timer ticks once a second too).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Events taken from the epoll set at once.
const EVENTS_AT_ONCE: usize = 256;

struct Sleeping {
    /// When it is closed if its client sends nothing (never: `None`).
    until: Option<Instant>,
    sleeper: Box<dyn Sleeper>,
}

/// One runtime's sleeping connections.
struct Lot {
    runtime: tokio::runtime::Id,
    epoll: AsyncFd<EpollSet>,
    /// Keyed by the epoll event's data. Locked by `park` and the watching
    /// task, both on the runtime's thread on a proxy thread.
    sleeping: Mutex<Slab<Sleeping>>,
}

thread_local! {
    /// The lot of the runtime this thread last parked on; its watching task
    /// owns it, so it is gone with that runtime.
    static LOT: RefCell<Weak<Lot>> = const { RefCell::new(Weak::new()) };
}

/// Puts `sleeper` to sleep until its client sends something or closes
/// (it is woken) or `until` passes (it is dropped, closing the client's
/// connection). Gives it back if it cannot sleep here (no epoll set could
/// be made, no tokio runtime is current, or it has no socket): its caller
/// then waits with its task.
pub(super) fn park<S: Sleeper + 'static>(
    sleeper: Box<S>,
    until: Option<Instant>,
) -> Result<(), Box<S>> {
    let Some(lot) = lot().filter(|_| sleeper.socket().is_some()) else {
        return Err(sleeper);
    };
    let mut sleeping = crate::locked(&lot.sleeping);
    let entry = sleeping.vacant_entry();
    let key = entry.key() as u64;
    // EPOLLRDHUP: a client that half-closes wakes its connection too, so
    // that it is answered as a served one would be.
    let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key);
    let added = sleeper
        .socket()
        .is_some_and(|socket| lot.epoll.get_ref().epoll().add(socket, event).is_ok());
    if !added {
        return Err(sleeper);
    }
    entry.insert(Sleeping {
        until,
        sleeper: sleeper as Box<dyn Sleeper>,
    });
    threads::fell_asleep();
    Ok(())
}

/// The current runtime's lot, made (with its watching task) if need be.
fn lot() -> Option<Arc<Lot>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?.id();
    LOT.with_borrow_mut(|lot| {
        if let Some(lot) = lot.upgrade().filter(|lot| lot.runtime == runtime) {
            return Some(lot);
        }
        let made = Arc::new(Lot {
            runtime,
            epoll: EpollSet::watched().ok()?,
            sleeping: Mutex::default(),
        });
        tokio::spawn(watch(made.clone()));
        *lot = Arc::downgrade(&made);
        Some(made)
    })
}

/// Wakes the sleepers whose clients sent something or closed, and drops
/// those that expired, for as long as the runtime runs.
async fn watch(lot: Arc<Lot>) {
    let mut sweeps = tokio::time::interval(SWEEP_EVERY);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = vec![EpollEvent::empty(); EVENTS_AT_ONCE];
    loop {
        tokio::select! {
            ready = lot.epoll.readable() => {
                let Ok(mut ready) = ready else { return };
                let Ok(count) = lot.epoll.get_ref().epoll().wait(&mut events, EpollTimeout::ZERO) else {
                    continue;
                };
                if count < events.len() {
                    ready.clear_ready();
                }
                for event in &events[..count] {
                    if let Some(woken) = lot.take(event.data()) {
                        woken.wake();
                    }
                }
            }
            _ = sweeps.tick() => lot.drop_expired(Instant::now()),
        }
    }
}

impl Lot {
    /// The sleeper of `key`, out of the epoll set.
    fn take(&self, key: u64) -> Option<Box<dyn Sleeper>> {
        let key = usize::try_from(key).ok()?;
        let Sleeping { sleeper, .. } = crate::locked(&self.sleeping).try_remove(key)?;
        self.forget(&*sleeper);
        Some(sleeper)
    }

    fn drop_expired(&self, now: Instant) {
        let expired: Vec<Sleeping> = {
            let mut sleeping = crate::locked(&self.sleeping);
            let keys: Vec<usize> = sleeping
                .iter()
                .filter(|(_, s)| s.until.is_some_and(|until| until <= now))
                .map(|(key, _)| key)
                .collect();
            keys.into_iter().map(|key| sleeping.remove(key)).collect()
        };
        // Dropped outside the lock: each closes its client's socket.
        for gone in expired {
            self.forget(&*gone.sleeper);
        }
    }

    fn forget(&self, sleeper: &dyn Sleeper) {
        threads::woke_up();
        if let Some(socket) = sleeper.socket() {
            let _ = self.epoll.get_ref().epoll().delete(socket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A sleeper that reports its waking (its index) and gives its socket
    /// back with it.
    struct Probe {
        index: usize,
        socket: Option<TcpStream>,
        woken: mpsc::UnboundedSender<(usize, TcpStream)>,
    }

    impl Sleeper for Probe {
        fn socket(&self) -> Option<BorrowedFd<'_>> {
            self.socket.as_ref().map(AsFd::as_fd)
        }

        fn wake(mut self: Box<Self>) {
            let socket = self.socket.take().expect("a socket");
            let _ = self.woken.send((self.index, socket));
        }
    }

    /// `count` connected pairs: (the proxy's side, the client's).
    async fn pairs(count: usize) -> Vec<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut made = Vec::new();
        for _ in 0..count {
            let client = TcpStream::connect(address).await.unwrap();
            let (served, _) = listener.accept().await.unwrap();
            made.push((served, client));
        }
        made
    }

    fn probe(
        index: usize,
        socket: TcpStream,
        woken: &mpsc::UnboundedSender<(usize, TcpStream)>,
    ) -> Box<Probe> {
        Box::new(Probe {
            index,
            socket: Some(socket),
            woken: woken.clone(),
        })
    }

    async fn next_woken(
        woken: &mut mpsc::UnboundedReceiver<(usize, TcpStream)>,
    ) -> (usize, TcpStream) {
        tokio::time::timeout(PATIENCE, woken.recv())
            .await
            .expect("woken in time")
            .expect("a sender")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sleeper_wakes_when_its_client_sends_or_closes_and_not_before() {
        let (tx, mut woken) = mpsc::unbounded_channel();
        let mut pairs = pairs(2).await;
        let (closing_served, closing) = pairs.pop().unwrap();
        let (served, mut client) = pairs.pop().unwrap();
        assert!(park(probe(0, served, &tx), None).is_ok());
        assert!(park(probe(1, closing_served, &tx), None).is_ok());
        // Quiet clients: no one wakes (a second and a half, past a sweep).
        assert!(
            tokio::time::timeout(Duration::from_millis(1500), woken.recv())
                .await
                .is_err()
        );
        client.write_all(b"G").await.unwrap();
        let (index, mut served) = next_woken(&mut woken).await;
        assert_eq!(index, 0);
        // What it sent is there for the task that serves it.
        let mut first = [0u8];
        served.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"G");
        drop(closing);
        assert_eq!(next_woken(&mut woken).await.0, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_woken_connection_sleeps_again_and_wakes_again() {
        let (tx, mut woken) = mpsc::unbounded_channel();
        let (mut served, mut client) = pairs(1).await.pop().unwrap();
        for round in 0..3 {
            assert!(
                park(probe(round, served, &tx), None).is_ok(),
                "round {round}"
            );
            client.write_all(b"x").await.unwrap();
            let (index, mut again) = next_woken(&mut woken).await;
            assert_eq!(index, round);
            let mut byte = [0u8];
            again.read_exact(&mut byte).await.unwrap();
            served = again;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_that_sent_before_its_connection_slept_wakes_it_at_once() {
        let (tx, mut woken) = mpsc::unbounded_channel();
        let (served, mut client) = pairs(1).await.pop().unwrap();
        client.write_all(b"GET").await.unwrap();
        // The bytes are in the socket before it joins the epoll set.
        served.readable().await.unwrap();
        assert!(park(probe(7, served, &tx), None).is_ok());
        assert_eq!(next_woken(&mut woken).await.0, 7);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_expired_sleeper_is_closed_and_never_woken() {
        let (tx, mut woken) = mpsc::unbounded_channel();
        let mut pairs = pairs(2).await;
        let (kept, kept_client) = pairs.pop().unwrap();
        let (expiring, mut client) = pairs.pop().unwrap();
        let soon = Instant::now() + Duration::from_millis(1200);
        assert!(park(probe(0, expiring, &tx), Some(soon)).is_ok());
        assert!(park(probe(1, kept, &tx), Some(Instant::now() + PATIENCE * 6)).is_ok());
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, client.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed: {read:?}");
        // Not before its time, and the one whose time has not come is open.
        assert!(Instant::now() >= soon);
        let mut byte = [0u8];
        let still_open = kept_client.try_read(&mut byte);
        assert!(
            matches!(&still_open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{still_open:?}"
        );
        assert!(woken.try_recv().is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn more_clients_than_one_look_takes_all_wake() {
        let count = EVENTS_AT_ONCE * 2 + 3;
        let (tx, mut woken) = mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for (index, (served, client)) in pairs(count).await.into_iter().enumerate() {
            assert!(park(probe(index, served, &tx), None).is_ok());
            clients.push(client);
        }
        for client in &mut clients {
            client.write_all(b"x").await.unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < count {
            let (index, _) = next_woken(&mut woken).await;
            assert!(seen.insert(index), "woken twice: {index}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sleeper_without_a_socket_is_given_back() {
        let (tx, _woken) = mpsc::unbounded_channel();
        let socketless = Box::new(Probe {
            index: 0,
            socket: None,
            woken: tx,
        });
        assert!(park(socketless, None).is_err());
    }

    #[test]
    fn each_runtime_on_a_thread_watches_its_own_sleepers() {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for runtime in [&first, &second, &first] {
            runtime.block_on(async {
                let (tx, mut woken) = mpsc::unbounded_channel();
                let (served, mut client) = pairs(1).await.pop().unwrap();
                assert!(park(probe(3, served, &tx), None).is_ok());
                client.write_all(b"x").await.unwrap();
                assert_eq!(next_woken(&mut woken).await.0, 3);
            });
        }
    }
}
