//! The daemon-wide budget of bytes read from clients and not yet passed
//! on: request heads being parsed, WebSocket messages still arriving.
//! Each connection is bounded on its own (a 64 KiB head, a 16 MiB
//! message, `keep_alive`); this bounds them together, so that many
//! clients each sending most of a large message cannot make the daemon
//! grow until the kernel kills it. The read that would take the total past
//! `BUDGET` ends its connection, and while less than one message's room
//! is left, new requests and WebSockets are answered 503.
//!
//! Each thread adds what its connections read and pass on to a count of
//! its own, and to the daemon's total once its count is `SLACK` away from
//! what it last added: every request changes the total twice, and one
//! atomic written by every proxy thread cost each request two contended
//! adds (1.2 % of the daemon's CPU per request on 2 threads, measured with
//! `bench/scale.py`'s setup; `bench/README.md`). The budget so holds to
//! within `SLACK` per thread: 1 MiB of its 256 with 16 threads.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most the daemon holds for all its clients together.
pub const BUDGET: usize = 256 << 20;

/// How far a thread's own count runs before it is added to the total: a
/// request's head comes and goes many times within it; a WebSocket
/// message still arriving, read 8 KiB at a time, passes it within eight
/// reads.
const SLACK: isize = 64 << 10;

/// What all threads have added so far. Signed: bytes read on one thread
/// may be passed on from another, whose count then runs below zero.
static HELD: AtomicIsize = AtomicIsize::new(0);

/// A thread's count not yet added to `HELD`; added as the thread ends.
struct Unreported(Cell<isize>);

impl Drop for Unreported {
    fn drop(&mut self) {
        HELD.fetch_add(self.0.get(), Ordering::Relaxed);
    }
}

thread_local! {
    static UNREPORTED: Unreported = const { Unreported(Cell::new(0)) };
}

/// Changes what the daemon holds by `delta` bytes; the total as this
/// thread knows it (off by at most `SLACK` per other thread).
fn change(delta: isize) -> isize {
    let (added, kept) = UNREPORTED
        .try_with(|unreported| {
            let count = unreported.0.get() + delta;
            let kept = if count.abs() < SLACK { count } else { 0 };
            unreported.0.set(kept);
            (count - kept, kept)
        })
        // A thread that is ending adds its bytes at once.
        .unwrap_or((delta, 0));
    let reported = if added == 0 {
        HELD.load(Ordering::Relaxed)
    } else {
        HELD.fetch_add(added, Ordering::Relaxed) + added
    };
    reported + kept
}

/// What the daemon holds for its clients, as this thread knows it.
fn total() -> isize {
    change(0)
}

/// Whether less than one WebSocket message's room is left in the budget.
pub(crate) fn nearly_spent() -> bool {
    total() + signed(crate::traffic::connector::MAX_MESSAGE) > signed(BUDGET)
}

fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

/// What one client connection holds: the bytes read from it since the
/// proxy last passed something on.
pub(crate) struct Held {
    bytes: AtomicUsize,
    /// Off once the connection is spliced byte for byte, where nothing
    /// read is held.
    counting: AtomicBool,
}

impl Held {
    pub(crate) fn new() -> Arc<Held> {
        Arc::new(Held {
            bytes: AtomicUsize::new(0),
            counting: AtomicBool::new(true),
        })
    }

    /// Counts `n` bytes read; an error when they take the total past the budget.
    fn read(&self, n: usize) -> Result<(), ()> {
        if n == 0 || !self.counting.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if change(signed(n)) > signed(BUDGET) {
            Err(())
        } else {
            Ok(())
        }
    }

    /// What was read so far has been passed on (a whole head, a body
    /// chunk, a WebSocket message).
    pub(crate) fn passed_on(&self) {
        change(-signed(self.bytes.swap(0, Ordering::Relaxed)));
    }

    /// Whether everything read so far has been passed on.
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) == 0
    }

    /// From now on the connection is spliced: nothing it reads is held.
    pub(crate) fn stop_counting(&self) {
        self.counting.store(false, Ordering::Relaxed);
        self.passed_on();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.passed_on();
    }
}

/// A client connection whose reads are counted against the budget.
pub(crate) struct Metered<T> {
    inner: T,
    held: Arc<Held>,
}

impl<T> Metered<T> {
    pub(crate) fn new(inner: T, held: Arc<Held>) -> Metered<T> {
        Metered { inner, held }
    }

    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }

    pub(crate) fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        match this.held.read(buf.filled().len() - before) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(()) => Poll::Ready(Err(std::io::Error::other(
                "the daemon holds as much as its budget allows for its clients",
            ))),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

    /// The total is the process's: each test sees the other's changes.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A test's turn at the total; its thread's count is added in before
    /// the next test's turn, not whenever the thread ends.
    struct Alone {
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    fn alone() -> Alone {
        Alone {
            _turn: ONE_AT_A_TIME
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }
    }

    impl Drop for Alone {
        fn drop(&mut self) {
            let count = UNREPORTED.with(|unreported| unreported.0.replace(0));
            HELD.fetch_add(count, Ordering::Relaxed);
        }
    }

    #[test]
    fn what_a_connection_holds_counts_until_passed_on_or_dropped() {
        let _alone = alone();
        let start = total();
        let held = Held::new();
        assert!(held.is_empty());
        held.read(1000).unwrap();
        assert!(!held.is_empty());
        assert_eq!(total(), start + 1000);
        held.passed_on();
        assert!(held.is_empty());
        assert_eq!(total(), start);
        held.read(500).unwrap();
        drop(held);
        assert_eq!(total(), start);
        let greedy = Held::new();
        let room = usize::try_from(signed(BUDGET) - start).unwrap();
        let message = crate::traffic::connector::MAX_MESSAGE;
        greedy.read(room - message).unwrap();
        assert!(!nearly_spent(), "one message's room is left");
        greedy.read(1).unwrap();
        assert!(nearly_spent(), "less than one message's room is left");
        greedy.read(message - 1).unwrap();
        assert_eq!(total(), signed(BUDGET), "the whole budget may be held");
        assert!(greedy.read(1).is_err(), "past the budget");
        let slack = usize::try_from(SLACK).unwrap();
        assert!(
            greedy.read(slack).is_err(),
            "past the budget, added at once"
        );
        drop(greedy);
        assert_eq!(total(), start);
        assert!(!nearly_spent());
        let spliced = Held::new();
        spliced.stop_counting();
        spliced.read(BUDGET * 2).unwrap();
        assert_eq!(total(), start);
    }

    #[test]
    fn what_other_threads_hold_reaches_the_total_within_the_slack_and_whole_as_they_end() {
        let _alone = alone();
        let start = total();
        let (counted, ended) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let holder = std::thread::spawn(move || {
            let held = Held::new();
            // Less than the slack: the thread's own.
            held.read(1000).unwrap();
            counted.0.send(()).unwrap();
            ended.1.recv().unwrap();
            held
        });
        counted.1.recv().unwrap();
        assert_eq!(total(), start, "within the slack, the thread's own");
        // A slack's worth: added to the total at once.
        let large = Held::new();
        large.read(usize::try_from(SLACK).unwrap()).unwrap();
        large.read(1000).unwrap();
        assert_eq!(HELD.load(Ordering::Relaxed) - start, SLACK);
        assert_eq!(total() - start, SLACK + 1000);
        drop(large);
        ended.0.send(()).unwrap();
        let held = holder.join().unwrap();
        assert_eq!(total(), start + 1000, "added as the thread ended");
        // Passed on from another thread than the one that read it.
        drop(held);
        assert_eq!(total(), start);
    }

    #[tokio::test]
    async fn a_metered_stream_counts_what_it_reads_and_passes_writes_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _alone = alone();
        let start = total();
        let (near, mut far) = tokio::net::UnixStream::pair().unwrap();
        let held = Held::new();
        let mut metered = Metered::new(near, held.clone());
        far.write_all(b"hello").await.unwrap();
        // Into a buffer that holds something already: only the read counts.
        let mut storage = [0u8; 16];
        let mut buf = ReadBuf::new(&mut storage);
        buf.put_slice(b"ab");
        std::future::poll_fn(|cx| Pin::new(&mut metered).poll_read(cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(buf.filled(), b"abhello");
        assert_eq!(total(), start + 5);
        metered.write_all(b"abc").await.unwrap();
        let slices = [std::io::IoSlice::new(b"de"), std::io::IoSlice::new(b"f")];
        let written = metered.write_vectored(&slices).await.unwrap();
        assert!(metered.is_write_vectored(), "as a socket is");
        metered.flush().await.unwrap();
        metered.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        far.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(echoed, &b"abcdef"[..3 + written]);
        held.passed_on();
        assert_eq!(total(), start);
    }
}
