//! What `keep_alive` watches of a client's connection (an answer in
//! progress, when the last one ended, a request body waited for, whether
//! hyper waits for the client with nothing left to write), the request
//! body type and the connection type that report to it. Its own module,
//! beside the HTTP plumbing, so that the backends (`session`, `upstream`)
//! take the client's body without using `proxy`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::traffic::held::Held;
use crate::traffic::http::Io;

/// What `keep_alive` looks at: whether a request is being answered, and
/// since when none has been; and whether its body is being waited for.
pub(super) struct Activity {
    pub(super) opened: std::time::Instant,
    pub(super) answering: AtomicUsize,
    /// When the last answer ended, in µs after `opened`.
    pub(super) answered_at: AtomicU64,
    /// Since when the request body has been asked for and the client has
    /// sent none of it, in µs after `opened`, plus one; 0 when not waiting.
    pub(super) body_wanted_since: AtomicU64,
    /// Reading the request body failed: it broke HTTP's framing (a chunk
    /// size that is no number) or the client left, its fault either way.
    pub(super) body_failed: AtomicBool,
    /// Request bodies not yet dropped: hyper may still read one.
    bodies: AtomicUsize,
    /// hyper's last read of the client found nothing to read.
    read_blocked: AtomicBool,
    /// hyper has written to the client since it last flushed all of it.
    unflushed: AtomicBool,
    /// The proxy is taking the connection back from hyper: hyper's
    /// shutdown must not reach the client.
    pub(super) parking: AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            opened: std::time::Instant::now(),
            answering: AtomicUsize::new(0),
            answered_at: AtomicU64::new(0),
            body_wanted_since: AtomicU64::new(0),
            body_failed: AtomicBool::new(false),
            bodies: AtomicUsize::new(0),
            read_blocked: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            parking: AtomicBool::new(false),
        }
    }

    /// Whether hyper, serving the connection since `served_from` (µs after
    /// `opened`), is between two requests: it answered one since then, is
    /// answering none, reads no body, has written everything and waits
    /// for the client. hyper is then idle, and its graceful shutdown
    /// closes nothing the client sees (with a request in progress, it
    /// would end the connection after it).
    pub(super) fn between_requests(&self, served_from: u64) -> bool {
        self.answered_at.load(Ordering::Acquire) > served_from
            && self.answering.load(Ordering::Acquire) == 0
            && self.bodies.load(Ordering::Acquire) == 0
            && self.read_blocked.load(Ordering::Acquire)
            && !self.unflushed.load(Ordering::Acquire)
    }

    pub(super) fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    pub(super) fn at(&self, micros: u64) -> std::time::Instant {
        self.opened + std::time::Duration::from_micros(micros)
    }

    /// Since when no request has been answered, if none is being answered.
    pub(super) fn idle_since(&self) -> Option<std::time::Instant> {
        (self.answering.load(Ordering::Acquire) == 0)
            .then(|| self.at(self.answered_at.load(Ordering::Acquire)))
    }

    /// Records whether the request body is being waited for: a read of it
    /// found nothing (`true`), or found something or stopped (`false`).
    pub(super) fn body_wanted(&self, waiting: bool) {
        if !waiting {
            self.body_wanted_since.store(0, Ordering::Release);
        } else if self.body_wanted_since.load(Ordering::Acquire) == 0 {
            self.body_wanted_since
                .store(self.now() + 1, Ordering::Release);
        }
    }

    /// Since when the body being read has made no progress, if it is waited for.
    pub(super) fn body_stalled_since(&self) -> Option<std::time::Instant> {
        match self.body_wanted_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(self.at(since - 1)),
        }
    }
}

/// A request's body as the proxy reads it from the client: each read
/// tells the connection's `keep_alive` timer whether the client is the one
/// keeping the request waiting. A client that sends a head and then a
/// body that stops is as slow as one whose head never ends: it would hold
/// a `max_conns` slot and its instance's request for ever.
pub(crate) struct ClientBody {
    body: Incoming,
    activity: Arc<Activity>,
    held: Arc<Held>,
}

impl ClientBody {
    pub(super) fn new(body: Incoming, activity: &Arc<Activity>, held: &Arc<Held>) -> ClientBody {
        activity.bodies.fetch_add(1, Ordering::AcqRel);
        ClientBody {
            body,
            activity: activity.clone(),
            held: held.clone(),
        }
    }

    /// What the proxy holds of the connection's reads, for a WebSocket
    /// or a splice that takes the connection over.
    pub(crate) fn held(&self) -> &Arc<Held> {
        &self.held
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let activity = &this.activity;
        activity.body_wanted(polled.is_pending());
        match &polled {
            std::task::Poll::Ready(Some(Err(_))) => {
                activity.body_failed.store(true, Ordering::Release);
            }
            std::task::Poll::Ready(Some(Ok(_))) => this.held.passed_on(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        self.activity.body_wanted(false);
        self.activity.bodies.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client's connection as hyper reads and writes it: first what was
/// read while no hyper connection served it, then the client itself. It
/// tells the connection's `Activity` whether hyper waits for the client
/// with everything written, and keeps hyper's shutdown from the client
/// while the proxy parks the connection.
pub(super) struct ClientIo {
    io: Box<dyn Io>,
    /// Read, not yet given to hyper.
    ahead: Bytes,
    activity: Arc<Activity>,
}

impl ClientIo {
    pub(super) fn new(io: Box<dyn Io>, activity: Arc<Activity>) -> ClientIo {
        ClientIo {
            io,
            ahead: Bytes::new(),
            activity,
        }
    }

    /// Gives hyper `read` first: what a parked hyper connection had read
    /// and not parsed (part of the next request). Copied, so that it does
    /// not keep hyper's whole read buffer.
    pub(super) fn read_ahead(&mut self, read: &[u8]) {
        self.ahead = Bytes::copy_from_slice(read);
    }

    /// The client's stream, under the layers it was given with.
    pub(super) fn get_ref(&self) -> &dyn Io {
        &*self.io
    }

    pub(super) fn into_inner(self) -> Box<dyn Io> {
        self.io
    }

    pub(super) fn has_read_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Whether the client sent something (true, kept for hyper) or closed
    /// (false), looked at without waiting. Pending, the socket keeps no
    /// waker of the task that looked: a connection that sleeps with no
    /// task must not keep its last task's memory alive through one.
    pub(super) fn poll_without_waiting(&mut self) -> Poll<bool> {
        if self.has_read_ahead() {
            return Poll::Ready(true);
        }
        let mut first = [0u8];
        let mut read = ReadBuf::new(&mut first);
        let mut nobody = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut self.io).poll_read(&mut nobody, &mut read) {
            Poll::Ready(Ok(())) if read.filled().len() == 1 => {
                self.ahead = Bytes::copy_from_slice(read.filled());
                Poll::Ready(true)
            }
            Poll::Ready(_) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits, with no buffer, until the client sends something (true) or
    /// closes (false). What it sent first is kept for hyper.
    pub(super) async fn wait_for_client(&mut self) -> bool {
        if !self.ahead.is_empty() {
            return true;
        }
        let mut first = [0u8];
        match self.io.read(&mut first).await {
            Ok(1) => {
                self.ahead = Bytes::copy_from_slice(&first);
                true
            }
            _ => false,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.activity
            .read_blocked
            .store(polled.is_pending(), Ordering::Release);
        polled
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Ordering::Release);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.activity.unflushed.store(true, Ordering::Release);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.activity.unflushed.store(false, Ordering::Release);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.activity.parking.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
