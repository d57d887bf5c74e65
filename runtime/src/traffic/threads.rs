//! The proxy's threads (`daemon { proxy_threads N; }`): each runs a
//! single-threaded tokio runtime of its own, off the supervisor's, so that
//! traffic never starves the control socket, spawning or health checks.
//! A connection lives its whole life on the thread it was handed to: its
//! TLS, its HTTP, its connections to instances and every task it spawns.
//!
//! Each listener has one socket and one accept loop, on one of the threads;
//! it hands each accepted connection to the thread with the fewest open
//! connections. One socket rather than one per thread (`SO_REUSEPORT`):
//! `max_conns` is then one count taken before `accept`, with no thread
//! holding a slot while its own queue is empty and another's is not, and
//! no queued connection is reset when the thread count changes, since the
//! kernel drops the queue of a `SO_REUSEPORT` socket that closes.
//!
//! What threads share stays exact because it is one object behind atomics
//! or a lock: Vanguard's buckets and bans, a listener's slots and
//! round-robin counter, each instance's in-flight count and each
//! connector's `Link`. The traffic figures are counted per thread and
//! summed when read; the held-bytes budget holds to within 64 KiB per
//! thread (`held`).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// One proxy thread: where to spawn on it, and what it serves.
pub(crate) struct ProxyThread {
    index: usize,
    runtime: tokio::runtime::Handle,
    open: AtomicU64,
    accepted: AtomicU64,
    asleep: AtomicU64,
}

/// A thread's load, as `apm version --json` and the metrics show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    /// Client connections open on the thread now.
    pub open: u64,
    /// Client connections handed to it since it started.
    pub accepted: u64,
    /// Of those open, the idle ones asleep with no task (`parked`).
    #[serde(default)]
    pub asleep: u64,
}

struct Pool {
    /// Leaked: a thread runs until the process exits.
    threads: Mutex<Vec<&'static ProxyThread>>,
    /// How many of `threads`, from the first, get new connections.
    serving: AtomicUsize,
    /// Where the next search for the least loaded thread starts, so that
    /// equally loaded threads take turns.
    turn: AtomicUsize,
    /// Run on each thread now and then (the daemon gives freed memory back
    /// from the thread's own heap).
    maintenance: fn(),
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// How often `maintenance` runs on each thread.
const MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// The proxy thread this is, if it is one.
    static HOME: Cell<Option<&'static ProxyThread>> = const { Cell::new(None) };
}

/// The cores the daemon may use: `available_parallelism` reads the
/// process's CPU affinity mask and its cgroup's CPU quota (v1 and v2,
/// rounded down, at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// What `proxy_threads` asks for: 0 is one per core.
pub fn wanted(proxy_threads: u32) -> usize {
    match proxy_threads {
        0 => cores(),
        n => n as usize,
    }
}

/// Makes `count` threads (at least 1) serve new connections, starting
/// threads that do not run yet. Threads beyond a lowered count keep serving
/// the connections and listeners they have, and get no new connections.
/// The first call sets the pool up; before it, the proxy runs on the
/// caller's runtime (unit tests).
pub fn serve_on(count: usize, maintenance: fn()) -> std::io::Result<()> {
    let pool = POOL.get_or_init(|| Pool {
        threads: Mutex::default(),
        serving: AtomicUsize::new(0),
        turn: AtomicUsize::new(0),
        maintenance,
    });
    let count = count.max(1);
    let mut threads = crate::locked(&pool.threads);
    while threads.len() < count {
        let thread = start(threads.len(), pool.maintenance)?;
        threads.push(thread);
    }
    pool.serving.store(count, Ordering::Release);
    Ok(())
}

fn start(index: usize, maintenance: fn()) -> std::io::Result<&'static ProxyThread> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread: &'static ProxyThread = Box::leak(Box::new(ProxyThread {
        index,
        runtime: runtime.handle().clone(),
        open: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        asleep: AtomicU64::new(0),
    }));
    std::thread::Builder::new()
        .name(format!("apm-proxy-{index}"))
        .spawn(move || {
            HOME.set(Some(thread));
            // Runs until the process exits: its connections and listeners
            // end with the daemon.
            runtime.block_on(async {
                let mut ticks = tokio::time::interval(MAINTENANCE_EVERY);
                loop {
                    ticks.tick().await;
                    maintenance();
                }
            });
        })?;
    Ok(thread)
}

/// Each thread's load, in thread order (empty before the pool is set up).
pub fn loads() -> Vec<Load> {
    POOL.get().map_or_else(Vec::new, |pool| {
        crate::locked(&pool.threads)
            .iter()
            .map(|thread| Load {
                open: thread.open.load(Ordering::Relaxed),
                accepted: thread.accepted.load(Ordering::Relaxed),
                asleep: thread.asleep.load(Ordering::Relaxed),
            })
            .collect()
    })
}

/// The serving thread with the fewest open connections (ties take turns),
/// or none before the pool is set up.
fn least_loaded() -> Option<&'static ProxyThread> {
    let pool = POOL.get()?;
    let threads = crate::locked(&pool.threads);
    let serving = pool.serving.load(Ordering::Acquire).min(threads.len());
    let first = pool.turn.fetch_add(1, Ordering::Relaxed);
    (0..serving)
        .map(|i| &threads[(first + i) % serving])
        .min_by_key(|thread| thread.open.load(Ordering::Relaxed))
        .copied()
}

/// Makes the least loaded proxy thread's runtime the one sockets register
/// with and `tokio::spawn` spawns on, until the guard is dropped (nothing
/// changes before the pool is set up). A listener's accept loop and a
/// connector's link are placed so.
pub(crate) fn enter() -> Option<tokio::runtime::EnterGuard<'static>> {
    least_loaded().map(|thread| thread.runtime.enter())
}

/// A connection that can be moved to another thread: a socket is tied to
/// the runtime that registered it, so it travels as its std form.
pub(crate) trait Movable: Sized {
    type Moving: Send + 'static;
    fn unregister(self) -> std::io::Result<Self::Moving>;
    /// On the receiving thread's runtime.
    fn register(moving: Self::Moving) -> std::io::Result<Self>;
}

/// Serves an accepted connection on the least loaded thread: here if that
/// is this thread, else moved there. `serve` is given the connection's
/// place in the thread's count of open connections.
pub(crate) fn hand_over<C, S, F>(connection: C, serve: S)
where
    C: Movable + Send + 'static,
    S: FnOnce(C, Open) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let Some(thread) = least_loaded() else {
        tokio::spawn(serve(connection, Open::default()));
        return;
    };
    thread.accepted.fetch_add(1, Ordering::Relaxed);
    thread.open.fetch_add(1, Ordering::Relaxed);
    let counted = Open(Some(thread));
    if HOME.get().is_some_and(|home| home.index == thread.index) {
        tokio::spawn(serve(connection, counted));
        return;
    }
    let Ok(moving) = connection.unregister() else {
        return;
    };
    thread.runtime.spawn(async move {
        if let Ok(connection) = C::register(moving) {
            serve(connection, counted).await;
        }
    });
}

/// A connection open on a thread (none before the pool is set up), until
/// dropped: `serve` keeps it for as long as the connection lives, with a
/// task or asleep without one.
#[derive(Default)]
pub(crate) struct Open(Option<&'static ProxyThread>);

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(thread) = self.0 {
            thread.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Counts a connection of this thread that fell asleep (`parked`).
pub(crate) fn fell_asleep() {
    if let Some(thread) = HOME.get() {
        thread.asleep.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a connection of this thread that woke up, or was closed asleep.
pub(crate) fn woke_up() {
    if let Some(thread) = HOME.get() {
        thread.asleep.fetch_sub(1, Ordering::Relaxed);
    }
}
