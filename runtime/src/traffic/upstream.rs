//! Requests to an instance's own port (`upstream port`): each client
//! connection keeps one connection to its instance for its requests (its
//! "pinned" connection), and connections of clients that left wait in a
//! small idle pool for the next clients, as nginx's upstream keepalive.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::traffic::activity::ClientBody;
use crate::traffic::http::{Body, BoxError, text};

/// Sends a request to an instance's own port, over the client's pinned
/// connection to it, an idle one, or a new one.
pub(crate) async fn to_port(
    mut request: Request<ClientBody>,
    pinned: &Mutex<Pinned>,
    worker: &str,
    backend: SocketAddr,
    in_flight: &crate::traffic::inflight::Entered,
) -> Response<Body> {
    let failed = |e: &dyn std::fmt::Display| {
        text(
            StatusCode::BAD_GATEWAY,
            format!("{worker} failed to answer: {e}\n"),
        )
    };
    let held = pinned.lock().expect("upstream").take(backend);
    let mut reused = held.or_else(|| IDLE.with(|idle| idle.take(backend)));
    if let Some(sender) = &mut reused
        && sender.ready().await.is_err()
    {
        reused = None; // the instance closed it meanwhile
    }
    let mut sender = match reused {
        Some(sender) => sender,
        // Boxed: a new connection is the rare case, and its future, inline,
        // would make every request's future larger to move.
        None => match Box::pin(connect(backend)).await {
            Ok(sender) => sender,
            Err(e) => return failed(&e),
        },
    };
    // Origin form: the instance sees the path, and the host in the Host
    // header (`prepare` put an absolute-form target's host there).
    let target = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = target.into();
    // A WebSocket (or any upgrade): once the instance agrees, both sides are
    // spliced byte for byte.
    // With what the proxy holds of the client's reads, which a splice
    // stops counting.
    let client_upgrade = request
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| {
            (
                hyper::upgrade::on(&mut request),
                request.body().held().clone(),
            )
        });
    // Err: the request, given back unsent. Taken out of hyper's error here,
    // before the resend's await: held across it, that error would make
    // every request's future larger (measured: 1.7 → 2.5 KB).
    let sent: Result<Answered, _> = match sender.try_send_request(request).await {
        Ok(response) => Ok(Ok(response)),
        Err(mut unsent) => match unsent.take_message() {
            Some(request) => Err(request),
            None => Ok(Err(unsent.into_error())),
        },
    };
    let response = match sent {
        Ok(answered) => answered,
        // The instance closed the connection (an idle keep-alive one it
        // timed out) before the request went out on it: nothing was sent,
        // so any request may go again, on a new connection.
        Err(request) => match Box::pin(resend(backend, request)).await {
            Ok((fresh, answered)) => {
                sender = fresh;
                answered
            }
            Err(e) => return failed(&e),
        },
    };
    if !matches!(&response, Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS) {
        // The next request waits in `ready` until this response's body is through.
        let kept = Kept {
            sender,
            since: Instant::now(),
        };
        pinned.lock().expect("upstream").0 = Some((backend, kept));
    }
    match response {
        Ok(mut response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let Some((client_upgrade, held)) = client_upgrade else {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{worker} switched protocols unasked\n"),
                );
            };
            let server_upgrade = hyper::upgrade::on(&mut response);
            // A spliced connection cannot move: its instance waits for it
            // (bounded) before it is signalled.
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let _in_flight = in_flight;
                if let (Ok(client), Ok(server)) = tokio::join!(client_upgrade, server_upgrade) {
                    held.stop_counting();
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(server),
                    )
                    .await;
                }
            });
            boxed(response)
        }
        Ok(response) => boxed(response),
        Err(e) => failed(&e),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<ClientBody>;

/// Sends a request on a new connection.
async fn resend(
    backend: SocketAddr,
    request: Request<ClientBody>,
) -> Result<(Sender, Answered), BoxError> {
    let mut sender = connect(backend).await?;
    let response = sender.send_request(request).await;
    Ok((sender, response))
}

type Answered = Result<Response<Incoming>, hyper::Error>;

async fn connect(backend: SocketAddr) -> Result<Sender, BoxError> {
    let stream = TcpStream::connect(backend).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        // Response header names are not kept as the instance spelled them
        // (decision 16): recording each response's spelling cost ~1 µs of
        // the daemon's CPU per request, a tenth of the throughput.
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(connection.with_upgrades());
    Ok(sender)
}

/// An upstream connection idle for longer is closed rather than reused.
/// Instances close idle keep-alive connections themselves (Node after 5 s,
/// gunicorn after 2 s), and a request sent on one just as the instance
/// closes it would fail with a 502; a new loopback connection costs far
/// less than that, and under load no connection sits idle this long.
pub(crate) const IDLE_LIMIT: Duration = Duration::from_secs(1);

/// A connection to an instance, between two requests.
struct Kept {
    sender: Sender,
    /// When its last response arrived.
    since: Instant,
}

impl Kept {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() < IDLE_LIMIT
    }
}

/// A client connection's connection to its instance; parked for other
/// clients when the client leaves.
#[derive(Default)]
pub(crate) struct Pinned(Option<(SocketAddr, Kept)>);

impl Pinned {
    pub(crate) fn backend(&self) -> Option<SocketAddr> {
        self.0.as_ref().map(|(backend, _)| *backend)
    }

    /// Closes the connection if it will not be used again: an idle client
    /// would otherwise keep it open, with its buffers and the instance's
    /// side of it, until it leaves.
    pub(crate) fn close_if_stale(&mut self) {
        if self.0.as_ref().is_some_and(|(_, kept)| !kept.usable()) {
            self.0 = None;
        }
    }

    /// The connection, if it goes to `backend`; one to another is parked.
    fn take(&mut self, backend: SocketAddr) -> Option<Sender> {
        match self.0.take() {
            Some((address, kept)) if address == backend => kept.usable().then_some(kept.sender),
            Some((address, kept)) => {
                IDLE.with(|idle| idle.park(address, kept));
                None
            }
            None => None,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some((address, kept)) = self.0.take() {
            // While the thread's runtime shuts down, the pool may be gone:
            // the connection then just closes.
            let _ = IDLE.try_with(|idle| idle.park(address, kept));
        }
    }
}

/// Idle connections to the instances, kept alive for the next clients as
/// nginx's upstream keepalive does. Requests of one client connection do
/// not come here: they stay on the connection pinned to it.
#[derive(Default)]
struct Idle(std::cell::RefCell<std::collections::HashMap<SocketAddr, Vec<Kept>>>);

/// Idle connections kept per instance and proxy thread; more are closed.
const IDLE_PER_INSTANCE: usize = 64;

thread_local! {
    /// One pool per proxy thread: a connection's task runs on the thread
    /// that opened it, so a client takes only connections of its own
    /// thread, and no request or lock crosses threads (ARCHITECTURE.md,
    /// "Traffic never runs on the supervisor's thread").
    static IDLE: Idle = Idle::default();
}

impl Idle {
    fn park(&self, backend: SocketAddr, kept: Kept) {
        if !kept.usable() {
            return;
        }
        let mut idle = self.0.borrow_mut();
        // Connections to instances that are gone close, others grow old;
        // forget them.
        idle.retain(|_, kept| {
            kept.retain(Kept::usable);
            !kept.is_empty()
        });
        let kept_here = idle.entry(backend).or_default();
        if kept_here.len() < IDLE_PER_INSTANCE {
            kept_here.push(kept);
        }
    }

    fn take(&self, backend: SocketAddr) -> Option<Sender> {
        let mut idle = self.0.borrow_mut();
        let kept = idle.get_mut(&backend)?;
        std::iter::from_fn(|| kept.pop())
            .find(Kept::usable)
            .map(|kept| kept.sender)
    }
}

/// The instance's answer, as the proxy's own: in the proxy's HTTP
/// version (RFC 9110, 6.2), so that an instance answering HTTP/1.0 (as
/// Python's `http.server` does) does not close a keep-alive client's
/// connection; a body the instance ended by closing its connection then
/// goes to an HTTP/1.1 client chunked.
fn boxed(mut response: Response<Incoming>) -> Response<Body> {
    *response.version_mut() = hyper::Version::HTTP_11;
    response.map(|body| body.map_err(Into::into).boxed())
}
