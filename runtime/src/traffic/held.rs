//! The daemon-wide budget of bytes read from clients and not yet passed
//! on: request heads being parsed, WebSocket messages still arriving.
//! Each connection is bounded on its own (a 64 KiB head, a 16 MiB
//! message, `keep_alive`); this bounds them together, so that many
//! clients each sending most of a large message cannot make the daemon
//! grow until the kernel kills it. The read that would take the total past
//! `BUDGET` ends its connection, and while less than one message's room
//! is left, new requests and WebSockets are answered 503.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most the daemon holds for all its clients together.
pub const BUDGET: usize = 256 << 20;

static HELD: AtomicUsize = AtomicUsize::new(0);

/// Whether less than one WebSocket message's room is left in the budget.
pub(crate) fn nearly_spent() -> bool {
    HELD.load(Ordering::Relaxed) + crate::traffic::connector::MAX_MESSAGE > BUDGET
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
        let total = HELD.fetch_add(n, Ordering::Relaxed) + n;
        if total > BUDGET { Err(()) } else { Ok(()) }
    }

    /// What was read so far has been passed on (a whole head, a body
    /// chunk, a WebSocket message).
    pub(crate) fn passed_on(&self) {
        let bytes = self.bytes.swap(0, Ordering::Relaxed);
        HELD.fetch_sub(bytes, Ordering::Relaxed);
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

    #[test]
    fn what_a_connection_holds_counts_until_passed_on_or_dropped() {
        let start = HELD.load(Ordering::Relaxed);
        let held = Held::new();
        held.read(1000).unwrap();
        assert_eq!(HELD.load(Ordering::Relaxed), start + 1000);
        held.passed_on();
        assert_eq!(HELD.load(Ordering::Relaxed), start);
        held.read(500).unwrap();
        drop(held);
        assert_eq!(HELD.load(Ordering::Relaxed), start);
        let greedy = Held::new();
        assert!(greedy.read(BUDGET + 1).is_err(), "past the budget");
        drop(greedy);
        assert_eq!(HELD.load(Ordering::Relaxed), start);
        let spliced = Held::new();
        spliced.stop_counting();
        spliced.read(BUDGET * 2).unwrap();
        assert_eq!(HELD.load(Ordering::Relaxed), start);
    }
}
