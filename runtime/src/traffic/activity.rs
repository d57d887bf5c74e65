//! What `keep_alive` watches of a client's connection (an answer in
//! progress, when the last one ended, a request body waited for) and the
//! request body type that reports to it. Its own module, beside the HTTP
//! plumbing, so that the backends (`session`, `upstream`) take the client's
//! body without using `proxy`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use hyper::body::Incoming;

use crate::traffic::held::Held;

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
    pub(super) body_failed: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            opened: std::time::Instant::now(),
            answering: AtomicUsize::new(0),
            answered_at: AtomicU64::new(0),
            body_wanted_since: AtomicU64::new(0),
            body_failed: std::sync::atomic::AtomicBool::new(false),
        }
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
    }
}
