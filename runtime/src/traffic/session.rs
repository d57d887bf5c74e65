//! The client ends of connector sessions: an HTTP exchange served through
//! hyper, a WebSocket the daemon terminates with tungstenite, a raw TCP
//! connection. Each adapts its client to `connector::pump`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::traffic::activity::ClientBody;
use crate::traffic::connector::{
    ClientSide, FromClient, Handoff, Head, Link, MAX_MESSAGE, ResponseHead, ToClient, pump,
};
use crate::traffic::http::{Body, BoxError, Io, text};
use crate::traffic::inflight::Entered;

/// Serves one HTTP request, or a WebSocket handshake, as a session. A
/// WebSocket counts as `in_flight` on its instance while it runs there,
/// and moves with `handoff` (`session_persist`), which it makes when the
/// request is a handshake.
pub(crate) async fn http(
    request: Request<ClientBody>,
    link: Arc<Link>,
    head: Head<'_>,
    keep_alive: Duration,
    in_flight: &Entered,
    handoff: impl FnOnce(&'static str) -> Option<Handoff>,
) -> Response<Body> {
    if is_websocket(&request) {
        let stay = (in_flight.clone(), handoff("ws"));
        return websocket(request, link, head, keep_alive, stay);
    }
    let (parts, body) = request.into_parts();
    let head = Head {
        request: Some(&parts),
        ..head
    }
    .to_json();
    let (respond, response) = oneshot::channel();
    let exchange = Exchange {
        body: Some(body),
        respond: Some(respond),
        body_tx: None,
        gathered: None,
    };
    // The session runs here until the response is ready, which for most
    // responses is when it ends; only a response still streaming goes on
    // in a task of its own. A client gone before that drops the session.
    // The request's own `in_flight` is held until its response is through.
    let mut session = Box::pin(async move { pump(&link, &head, exchange, None, None).await });
    let mut response = response;
    let response = tokio::select! {
        response = &mut response => {
            tokio::spawn(session);
            response
        }
        () = &mut session => response.await,
    };
    response.unwrap_or_else(|_| gone())
}

fn gone() -> Response<Body> {
    text(
        StatusCode::BAD_GATEWAY,
        "the instance ended before it answered\n".to_owned(),
    )
}

/// A request and the response being built from what the child sends.
struct Exchange {
    /// The request body, until it is read to its end.
    body: Option<ClientBody>,
    /// Until the response head is sent.
    respond: Option<oneshot::Sender<Response<Body>>>,
    /// The response body, once the head is sent.
    body_tx: Option<mpsc::Sender<Result<Frame<Bytes>, BoxError>>>,
    /// The head and body so far, while the child's next frames are already
    /// queued: a response that is complete by then goes out whole, in one
    /// write and without a body channel.
    gathered: Option<(ResponseHead, BytesMut)>,
}

/// The most a response gathers before it is streamed.
const GATHER: usize = 64 * 1024;

impl Exchange {
    /// Sends the response head; the body follows through `body_tx`.
    fn stream(&mut self, head: ResponseHead) {
        // One chunk in the channel: credit goes back to the child only once
        // hyper has taken the previous chunk for the client.
        let (body_tx, body_rx) = mpsc::channel(1);
        self.body_tx = Some(body_tx);
        self.respond(
            head,
            BodyExt::boxed(StreamBody::new(tokio_stream_from(body_rx))),
        );
    }

    /// Passes a chunk of a streamed response on; an error means the client
    /// is gone.
    async fn send_body(&self, bytes: Bytes) -> Result<(), ()> {
        let body_tx = self.body_tx.as_ref().ok_or(())?;
        body_tx.send(Ok(Frame::data(bytes))).await.map_err(|_| ())
    }

    fn respond(&mut self, head: ResponseHead, body: Body) {
        let Some(respond) = self.respond.take() else {
            return;
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        let _ = respond.send(response);
    }
}

/// A receiver as a stream of body frames.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl ClientSide for Exchange {
    async fn next(&mut self) -> FromClient {
        if let Some(body) = &mut self.body {
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(bytes) = frame.into_data() {
                            return FromClient::Message { text: false, bytes };
                        } // trailers are not forwarded
                    }
                    Some(Err(_)) => {
                        return FromClient::Closed {
                            code: 0,
                            reason: String::new(),
                        };
                    }
                    None => {
                        self.body = None;
                        return FromClient::End;
                    }
                }
            }
        }
        // The body is in: the client can only go away now.
        match (&mut self.respond, &self.body_tx) {
            (Some(respond), _) => respond.closed().await,
            (None, Some(body_tx)) => body_tx.closed().await,
            (None, None) => std::future::pending().await,
        }
        FromClient::Closed {
            code: 0,
            reason: String::new(),
        }
    }

    async fn deliver(&mut self, message: ToClient, more: bool) -> Result<(), ()> {
        match message {
            ToClient::Head(head) => {
                if self.respond.is_some() {
                    self.gathered = Some((head, BytesMut::new()));
                }
            }
            ToClient::Message { bytes, .. } | ToClient::Raw(bytes) => match &mut self.gathered {
                Some((_, gathered)) => gathered.extend_from_slice(&bytes),
                None if self.respond.is_some() => {
                    self.gathered = Some((ResponseHead::default(), BytesMut::from(bytes)));
                }
                None => self.send_body(bytes).await?,
            },
            ToClient::Close { .. } => {
                let (head, body) = self.gathered.take().unwrap_or_default();
                self.respond(
                    head,
                    Full::new(body.freeze())
                        .map_err(|never| match never {})
                        .boxed(),
                );
                self.body_tx = None;
                return Ok(());
            }
            ToClient::Gone => {
                self.gathered = None;
                if let Some(respond) = self.respond.take() {
                    let _ = respond.send(gone());
                } else if let Some(body_tx) = self.body_tx.take() {
                    // A response cut short must not look complete to the client.
                    let _ = body_tx
                        .send(Err("the instance ended during the response".into()))
                        .await;
                }
                return Ok(());
            }
            ToClient::Busy => {
                if let Some(respond) = self.respond.take() {
                    let _ = respond.send(text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the instance is not reading its sessions; try again later\n".to_owned(),
                    ));
                }
                return Ok(());
            }
        }
        // Nothing more queued (or enough gathered): what is gathered streams.
        let enough = |(_, body): &(_, BytesMut)| body.len() >= GATHER;
        if (!more || self.gathered.as_ref().is_some_and(enough))
            && let Some((head, body)) = self.gathered.take()
        {
            self.stream(head);
            if !body.is_empty() {
                self.send_body(body.freeze()).await?;
            }
        }
        Ok(())
    }
}

fn is_websocket(request: &Request<ClientBody>) -> bool {
    let headers = request.headers();
    // RFC 6455 4.1: the opening handshake is a GET; any other method is a
    // plain request, whatever its headers say.
    request.method() == hyper::Method::GET
        && crate::traffic::http::lists_token(headers, hyper::header::UPGRADE, "websocket")
        && crate::traffic::http::lists_token(headers, hyper::header::CONNECTION, "upgrade")
}

/// Answers the handshake and runs the WebSocket as a session once the
/// connection is upgraded.
fn websocket(
    mut request: Request<ClientBody>,
    link: Arc<Link>,
    head: Head<'_>,
    keep_alive: Duration,
    (in_flight, handoff): (Entered, Option<Handoff>),
) -> Response<Body> {
    let headers = request.headers();
    let Some(key) = headers.get(hyper::header::SEC_WEBSOCKET_KEY) else {
        return text(
            StatusCode::BAD_REQUEST,
            "a WebSocket handshake needs Sec-WebSocket-Key\n".to_owned(),
        );
    };
    if headers
        .get(hyper::header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is supported\n".to_owned(),
        );
        response.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let held = request.body().held().clone();
    let upgrade = hyper::upgrade::on(&mut request);
    let (parts, _) = request.into_parts();
    let head = Head {
        protocol: "ws",
        request: Some(&parts),
        ..head
    }
    .to_json();
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        // tungstenite reads in chunks of `read_buffer_size`, which each
        // connection keeps allocated while idle (its default, 128 KiB, was
        // most of what an idle WebSocket cost); a message reaching the
        // child goes out at once rather than gathering in a write buffer.
        let config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let idle = Idle::new(keep_alive);
        let client = WebSocket { ws, idle, held };
        pump(&link, &head, client, Some(in_flight), handoff).await;
    });
    let mut response = Response::new(http_body_util::Empty::new().map_err(Into::into).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    headers.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// What a WebSocket reads at a time, and keeps allocated while idle.
const WS_READ_BUFFER: usize = 8 * 1024;

struct WebSocket {
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    idle: Idle,
    /// What tungstenite holds of the client's reads, until a whole
    /// message (or a ping) comes out of it.
    held: Arc<crate::traffic::held::Held>,
}

/// `keep_alive` on a WebSocket: the time since the last message either
/// way. Pings and pongs, which the daemon answers itself, are no message
/// of the app's; nor is a message still arriving, so a client that sends
/// most of a large one and stalls is closed too.
struct Idle {
    keep_alive: Duration,
    until: Option<tokio::time::Instant>,
}

impl Idle {
    fn new(keep_alive: Duration) -> Idle {
        let mut idle = Idle {
            keep_alive,
            until: None,
        };
        idle.active();
        idle
    }

    fn active(&mut self) {
        self.until =
            (!self.keep_alive.is_zero()).then(|| tokio::time::Instant::now() + self.keep_alive);
    }

    async fn expired(&self) {
        match self.until {
            Some(until) => tokio::time::sleep_until(until).await,
            None => std::future::pending().await,
        }
    }
}

/// The close code for a WebSocket closed for being idle ("going away").
const IDLE_CLOSE: u16 = 1001;

impl ClientSide for WebSocket {
    async fn next(&mut self) -> FromClient {
        loop {
            let next = tokio::select! {
                next = self.ws.next() => next,
                () = self.idle.expired() => {
                    let reason = "idle for longer than keep_alive";
                    // A client that does not read must not hold the session open.
                    let _ = tokio::time::timeout(
                        CLOSE_PATIENCE,
                        self.ws.close(Some(CloseFrame { code: IDLE_CLOSE.into(), reason: reason.into() })),
                    )
                    .await;
                    return FromClient::Closed { code: IDLE_CLOSE, reason: reason.to_owned() };
                }
            };
            let message = match next {
                Some(Ok(message)) => {
                    self.held.passed_on();
                    message
                }
                _ => {
                    return FromClient::Closed {
                        code: 1006,
                        reason: String::new(),
                    };
                }
            };
            match message {
                Message::Text(text) => {
                    self.idle.active();
                    return FromClient::Message {
                        text: true,
                        bytes: text.into(),
                    };
                }
                Message::Binary(bytes) => {
                    self.idle.active();
                    return FromClient::Message { text: false, bytes };
                }
                Message::Close(frame) => {
                    // tungstenite queued the reply to the close; send it.
                    let _ = self.ws.flush().await;
                    let (code, reason) = frame.map_or((1005, String::new()), |f| {
                        (f.code.into(), f.reason.as_str().to_owned())
                    });
                    return FromClient::Closed { code, reason };
                }
                // Pings are answered by tungstenite itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    async fn deliver(&mut self, message: ToClient, _more: bool) -> Result<(), ()> {
        if matches!(message, ToClient::Message { .. } | ToClient::Raw(_)) {
            self.idle.active();
        }
        match message {
            ToClient::Head(_) => Ok(()),
            ToClient::Message { text: true, bytes } => {
                let text = Utf8Bytes::try_from(bytes).map_err(|_| ())?;
                self.ws.send(Message::Text(text)).await.map_err(|_| ())
            }
            ToClient::Message { text: false, bytes } => {
                self.ws.send(Message::Binary(bytes)).await.map_err(|_| ())
            }
            ToClient::Raw(bytes) => {
                // Whole frames only: tungstenite's buffer is flushed first.
                self.ws.flush().await.map_err(|_| ())?;
                self.ws.get_mut().write_all(&bytes).await.map_err(|_| ())
            }
            ToClient::Close { code, reason } => {
                self.close(code, reason).await;
                Err(())
            }
            ToClient::Gone => {
                self.close(1011, "the instance ended".to_owned()).await;
                Err(())
            }
            ToClient::Busy => {
                self.close(1013, "try again later".to_owned()).await;
                Err(())
            }
        }
    }
}

/// How long a closing WebSocket waits for the client's side of the close.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

impl WebSocket {
    async fn close(&mut self, code: u16, reason: String) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        if self.ws.close(Some(frame)).await.is_ok() {
            // Let the client answer the close before the connection drops.
            let _ = tokio::time::timeout(CLOSE_PATIENCE, async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
    }
}

/// Runs a raw TCP connection as a session, counted as `in_flight` on its
/// instance and moved with `handoff` (`session_persist`).
pub(crate) async fn tcp(
    stream: Box<dyn Io>,
    link: Arc<Link>,
    head: Head<'_>,
    in_flight: Entered,
    handoff: Option<Handoff>,
) {
    let head = Head {
        protocol: "tcp",
        ..head
    }
    .to_json();
    let (read, write) = tokio::io::split(stream);
    let half_close = link.takes_half_close();
    pump(
        &link,
        &head,
        Tcp {
            read: Some(read),
            write,
            buffer: BytesMut::new(),
            half_close,
        },
        Some(in_flight),
        handoff,
    )
    .await;
}

struct Tcp {
    /// Until the client has finished sending.
    read: Option<tokio::io::ReadHalf<Box<dyn Io>>>,
    write: tokio::io::WriteHalf<Box<dyn Io>>,
    buffer: BytesMut,
    /// The child takes the client's half-close as `end`.
    half_close: bool,
}

impl ClientSide for Tcp {
    async fn next(&mut self) -> FromClient {
        // Half-closed: the client waits for the answer, which the child
        // ends with its `close`; a client gone meanwhile shows as a
        // failed write.
        let Some(read) = &mut self.read else {
            return std::future::pending().await;
        };
        self.buffer.reserve(64 * 1024);
        match read.read_buf(&mut self.buffer).await {
            Ok(n) if n > 0 => FromClient::Message {
                text: false,
                bytes: self.buffer.split().freeze(),
            },
            Ok(_) if self.half_close => {
                self.read = None;
                self.buffer = BytesMut::new();
                FromClient::End
            }
            _ => FromClient::Closed {
                code: 0,
                reason: String::new(),
            },
        }
    }

    async fn deliver(&mut self, message: ToClient, _more: bool) -> Result<(), ()> {
        match message {
            ToClient::Head(_) => Ok(()),
            ToClient::Message { bytes, .. } | ToClient::Raw(bytes) => {
                self.write.write_all(&bytes).await.map_err(|_| ())
            }
            ToClient::Close { .. } | ToClient::Gone | ToClient::Busy => {
                let _ = self.write.shutdown().await;
                Err(())
            }
        }
    }
}
