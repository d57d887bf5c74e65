//! Requests to an instance's own port (`upstream port`): each client
//! connection keeps one connection to its instance for its requests (its
//! "pinned" connection), and connections of clients that left wait in a
//! small idle pool for the next clients, as nginx's upstream keepalive.

use std::net::SocketAddr;
use std::sync::Mutex;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::{Body, BoxError, text};

/// Sends a request to an instance's own port, over the client's pinned
/// connection to it, an idle one, or a new one.
pub(crate) async fn to_port(
    mut request: Request<Incoming>,
    pinned: &Mutex<Pinned>,
    worker: &str,
    backend: SocketAddr,
) -> Response<Body> {
    let held = pinned.lock().expect("upstream").take(backend);
    let mut reused = held.or_else(|| idle().take(backend));
    if let Some(sender) = &mut reused
        && sender.ready().await.is_err()
    {
        reused = None; // the instance closed it meanwhile
    }
    let mut sender = match reused {
        Some(sender) => sender,
        None => match connect(backend).await {
            Ok(sender) => sender,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{worker} failed to answer: {e}\n"),
                );
            }
        },
    };
    // Origin form: the instance sees the path, and the client's Host header.
    let target = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = target.into();
    // A WebSocket (or any upgrade): once the instance agrees, both sides are
    // spliced byte for byte.
    let client_upgrade = request
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let response = sender.send_request(request).await;
    if !matches!(&response, Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS) {
        // The next request waits in `ready` until this response's body is through.
        pinned.lock().expect("upstream").0 = Some((backend, sender));
    }
    match response {
        Ok(mut response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let Some(client_upgrade) = client_upgrade else {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{worker} switched protocols unasked\n"),
                );
            };
            let server_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(server)) = tokio::join!(client_upgrade, server_upgrade) {
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
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            format!("{worker} failed to answer: {e}\n"),
        ),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

async fn connect(backend: SocketAddr) -> Result<Sender, BoxError> {
    let stream = TcpStream::connect(backend).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(connection.with_upgrades());
    Ok(sender)
}

/// A client connection's connection to its instance; parked for other
/// clients when the client leaves.
#[derive(Default)]
pub(crate) struct Pinned(Option<(SocketAddr, Sender)>);

impl Pinned {
    pub(crate) fn backend(&self) -> Option<SocketAddr> {
        self.0.as_ref().map(|(backend, _)| *backend)
    }

    /// The connection, if it goes to `backend`; one to another is parked.
    fn take(&mut self, backend: SocketAddr) -> Option<Sender> {
        match self.0.take() {
            Some((address, sender)) if address == backend => Some(sender),
            Some((address, sender)) => {
                idle().park(address, sender);
                None
            }
            None => None,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some((address, sender)) = self.0.take() {
            idle().park(address, sender);
        }
    }
}

/// Idle connections to the instances, kept alive for the next clients as
/// nginx's upstream keepalive does. Requests of one client connection do
/// not come here: they stay on the connection pinned to it.
#[derive(Default)]
struct Idle(std::sync::Mutex<std::collections::HashMap<SocketAddr, Vec<Sender>>>);

/// Idle connections kept per instance; more are closed.
const IDLE_PER_INSTANCE: usize = 64;

fn idle() -> &'static Idle {
    static IDLE: std::sync::OnceLock<Idle> = std::sync::OnceLock::new();
    IDLE.get_or_init(Idle::default)
}

impl Idle {
    fn park(&self, backend: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.0.lock().expect("idle");
        // Connections to instances that are gone close; forget them.
        idle.retain(|_, senders| {
            senders.retain(|s| !s.is_closed());
            !senders.is_empty()
        });
        let senders = idle.entry(backend).or_default();
        if senders.len() < IDLE_PER_INSTANCE {
            senders.push(sender);
        }
    }

    fn take(&self, backend: SocketAddr) -> Option<Sender> {
        let mut idle = self.0.lock().expect("idle");
        let senders = idle.get_mut(&backend)?;
        std::iter::from_fn(|| senders.pop()).find(|s| !s.is_closed())
    }
}

fn boxed(response: Response<Incoming>) -> Response<Body> {
    response.map(|body| body.map_err(Into::into).boxed())
}
