//! What each listener's traffic amounts to, for `/metrics` and the
//! dashboard: requests by status class, a histogram of the time to an
//! answer's head, open connections and bytes each way. Relaxed atomics
//! only, a few per request and one per read or write: no label is a path
//! or a client, so the set of series stays as small as the set of
//! listeners. A listener's figures live as long as its socket; a listener
//! bound again (another address, a reload that moved it) starts from zero,
//! which Prometheus reads as a counter reset.
//!
//! The per-request counters are sharded by thread (`Shard`): every proxy
//! thread adds to its own cache line, and a snapshot sums the shards, so
//! no line moves between cores on each request (it did, five times a
//! request, with every thread writing one set of counters).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The histogram's upper bounds, in seconds: Prometheus' default buckets,
/// which span a cache hit to a slow report.
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One listener's counters.
pub struct ListenerStats {
    pub worker: String,
    /// The `server` address as written (`http://0.0.0.0:8080`).
    pub listener: String,
    /// What each request and each read or write adds to; a power of two.
    shards: Box<[Shard]>,
    /// Per connection, not per request: not sharded.
    open: AtomicU64,
    accepted: AtomicU64,
}

/// The counters one thread (or a few, past `MOST_SHARDS` threads) adds to,
/// on cache lines of their own.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    /// Answers by status class, 1xx to 5xx.
    classes: [AtomicU64; 5],
    /// Answers per bucket (not cumulative), the last past every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// The sum of the durations, in microseconds.
    micros: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

/// At most this many shards a listener (256 bytes each): past that, threads
/// share them, so a listener on a 64-core server takes 4 KB, not 16.
const MOST_SHARDS: usize = 16;

/// How many shards a listener gets: one per core the daemon may use, up to
/// `MOST_SHARDS`, rounded up to a power of two for the thread's pick.
fn shard_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MOST_SHARDS)
        .next_power_of_two()
}

thread_local! {
    /// This thread's number, in the order threads first counted; it picks
    /// the thread's shard.
    static THREAD_NUMBER: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

/// Every listener's counters, held weakly: a closed listener's go with it.
static LISTENERS: Mutex<Vec<Weak<ListenerStats>>> = Mutex::new(Vec::new());

/// The counters of a new listener, listed until the returned `Arc`s are dropped.
pub fn register(worker: String, listener: String) -> Arc<ListenerStats> {
    let stats = Arc::new(ListenerStats {
        worker,
        listener,
        shards: (0..shard_count()).map(|_| Shard::default()).collect(),
        open: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
    });
    let mut all = crate::locked(&LISTENERS);
    all.retain(|weak| weak.strong_count() > 0);
    all.push(Arc::downgrade(&stats));
    stats
}

/// The figures of every open listener, by worker and address.
pub fn snapshot() -> Vec<Snapshot> {
    let mut all: Vec<Snapshot> = crate::locked(&LISTENERS)
        .iter()
        .filter_map(Weak::upgrade)
        .map(|stats| stats.snapshot())
        .collect();
    all.sort_by(|a, b| (&a.worker, &a.listener).cmp(&(&b.worker, &b.listener)));
    all
}

impl ListenerStats {
    /// Counts an answer whose head was ready `took` after its request's.
    pub fn answered(&self, status: u16, took: Duration) {
        let shard = self.shard();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        shard.classes[class].fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard
            .micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The calling thread's shard.
    fn shard(&self) -> &Shard {
        let number = THREAD_NUMBER.with(|number| *number);
        &self.shards[number & (self.shards.len() - 1)]
    }

    /// A client connection, counted open until the returned stream is dropped.
    pub fn connection<T>(self: &Arc<Self>, stream: T) -> Counted<T> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        Counted {
            inner: stream,
            open: OpenConnection(self.clone()),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let sum = |counter: &dyn Fn(&Shard) -> &AtomicU64| -> u64 {
            self.shards.iter().map(|shard| read(counter(shard))).sum()
        };
        Snapshot {
            worker: self.worker.clone(),
            listener: self.listener.clone(),
            requests: std::array::from_fn(|i| sum(&|shard| &shard.classes[i])),
            buckets: std::array::from_fn(|i| sum(&|shard| &shard.buckets[i])),
            seconds: sum(&|shard| &shard.micros) as f64 / 1e6,
            open: read(&self.open),
            accepted: read(&self.accepted),
            received: sum(&|shard| &shard.received),
            sent: sum(&|shard| &shard.sent),
        }
    }
}

/// One listener's figures at one instant.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub worker: String,
    pub listener: String,
    /// Answers with status 1xx, 2xx, 3xx, 4xx, 5xx.
    pub requests: [u64; 5],
    /// Answers per bucket of `BUCKETS` (not cumulative), the last one for
    /// those slower than every bound.
    pub buckets: [u64; BUCKETS.len() + 1],
    /// The durations' sum.
    pub seconds: f64,
    pub open: u64,
    /// Connections accepted since the listener opened.
    pub accepted: u64,
    /// Bytes read from clients and written to them (after TLS: what the
    /// wire carried).
    pub received: u64,
    pub sent: u64,
}

impl Snapshot {
    /// Answers counted.
    pub fn answers(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The bound under which a `q` share of the answers came (the
    /// upper bound of the bucket that holds that rank, as Prometheus'
    /// `histogram_quantile` reads it without interpolating), or `None`
    /// without answers; past the last bound, infinity.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.answers();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        Some(f64::INFINITY)
    }
}

/// A client connection whose bytes count towards its listener's figures,
/// and which is an open connection until dropped (an upgraded one too,
/// which outlives its HTTP exchange).
pub struct Counted<T> {
    inner: T,
    open: OpenConnection,
}

impl<T> Counted<T> {
    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The stream, and its place among the listener's open connections
    /// (a connection asleep keeps it, decision 123).
    pub(crate) fn into_parts(self) -> (T, OpenConnection) {
        (self.inner, self.open)
    }
}

/// A connection counted open in its listener's figures, until dropped.
pub(crate) struct OpenConnection(Arc<ListenerStats>);

impl OpenConnection {
    pub(crate) fn stats(&self) -> &Arc<ListenerStats> {
        &self.0
    }

    /// The connection's stream again, counted as before.
    pub(crate) fn resume<T>(self, stream: T) -> Counted<T> {
        Counted {
            inner: stream,
            open: self,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = (buf.filled().len() - before) as u64;
        this.open
            .0
            .shard()
            .received
            .fetch_add(read, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.open
            .0
            .shard()
            .sent
            .fetch_add(written as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.open
            .0
            .shard()
            .sent
            .fetch_add(written as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn answers_count_by_class_and_bucket_and_give_their_quantiles() {
        let stats = register("web".into(), "http://127.0.0.1:1".into());
        for _ in 0..98 {
            stats.answered(200, Duration::from_millis(3));
        }
        stats.answered(404, Duration::from_millis(30));
        stats.answered(503, Duration::from_secs(20));
        stats.answered(101, Duration::ZERO);
        let figures = stats.snapshot();
        assert_eq!(figures.requests, [1, 98, 0, 1, 1]);
        assert_eq!(figures.answers(), 101);
        assert_eq!(figures.buckets[0], 99, "3 ms and 0 are within 5 ms");
        assert_eq!(figures.buckets[3], 1, "30 ms is within 50 ms");
        assert_eq!(
            figures.buckets[BUCKETS.len()],
            1,
            "20 s is past every bound"
        );
        assert!((figures.seconds - (98.0 * 0.003 + 0.03 + 20.0)).abs() < 1e-6);
        assert_eq!(figures.quantile(0.5), Some(0.005));
        assert_eq!(figures.quantile(0.99), Some(0.05));
        assert_eq!(figures.quantile(1.0), Some(f64::INFINITY));
        let idle = register("idle".into(), "tcp://127.0.0.1:2".into());
        assert_eq!(idle.snapshot().quantile(0.99), None);
    }

    #[test]
    fn what_many_threads_count_all_reaches_the_snapshot() {
        let stats = register("web".into(), "http://127.0.0.1:4".into());
        // More threads than shards: some share one, and every count stays.
        let threads = MOST_SHARDS * 2 + 1;
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let stats = &stats;
                scope.spawn(move || {
                    for _ in 0..100 {
                        stats.answered(200 + 100 * (thread as u16 % 2), Duration::from_millis(1));
                    }
                    let (near, mut far) = tokio::io::duplex(8);
                    let mut counted = stats.connection(near);
                    let io = tokio::runtime::Builder::new_current_thread().build();
                    io.expect("runtime").block_on(async {
                        counted.write_all(b"abc").await.unwrap();
                        far.write_all(b"d").await.unwrap();
                        counted.read_exact(&mut [0]).await.unwrap();
                    });
                });
            }
        });
        let figures = stats.snapshot();
        let (even, odd) = (threads.div_ceil(2) as u64, (threads / 2) as u64);
        assert_eq!(figures.requests, [0, 100 * even, 100 * odd, 0, 0]);
        assert_eq!(figures.buckets[0], 100 * threads as u64);
        assert!((figures.seconds - 0.1 * threads as f64).abs() < 1e-6);
        let threads = threads as u64;
        assert_eq!(
            (
                figures.sent,
                figures.received,
                figures.accepted,
                figures.open
            ),
            (3 * threads, threads, threads, 0)
        );
        // A shard per core the test may use, up to the most.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let shards = stats.shards.len();
        assert!(shards.is_power_of_two() && shards <= MOST_SHARDS);
        assert!(
            shards >= cores.min(MOST_SHARDS),
            "{shards} shards, {cores} cores"
        );
    }

    #[tokio::test]
    async fn a_counted_stream_counts_bytes_and_is_open_until_dropped() {
        let stats = register("web".into(), "http://127.0.0.1:3".into());
        let (near, mut far) = tokio::io::duplex(64);
        let mut counted = stats.connection(near);
        assert_eq!((stats.snapshot().open, stats.snapshot().accepted), (1, 1));
        counted.write_all(b"hello").await.unwrap();
        far.write_all(b"a longer answer").await.unwrap();
        let mut got = [0; 15];
        counted.read_exact(&mut got).await.unwrap();
        let figures = stats.snapshot();
        assert_eq!((figures.sent, figures.received), (5, 15));
        drop(counted);
        assert_eq!(stats.snapshot().open, 0);
        assert!(
            snapshot()
                .iter()
                .any(|s| s.listener == "http://127.0.0.1:3")
        );
        drop(stats);
        assert!(
            !snapshot()
                .iter()
                .any(|s| s.listener == "http://127.0.0.1:3")
        );
    }
}
