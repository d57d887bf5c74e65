//! The built-in proxy, `upstream port` mode: each instance listens on a
//! loopback port of its own (given in `port_env`), and every `server`
//! listener spreads connections over the running instances, round-robin.
//! `http://` is proxied request by request (with `X-Forwarded-*` headers);
//! `ws://` and `tcp://` are spliced byte for byte.
//!
//! The listening sockets belong to the daemon, so they stay open while
//! instances restart. Instances that are starting, stopping or ended get no
//! new traffic; with none running, HTTP answers 503 and TCP closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use apm_compiler::values::{ListenAddr, Scheme, ServerUrl};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The instances a listener may send traffic to, as the supervisor sees them.
pub type Backends = watch::Receiver<Vec<SocketAddr>>;

/// A free loopback port for an instance. The port is released before the
/// child binds it; another process taking it in between makes the instance
/// fail its start, which the restart policy handles.
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()
        .map(|a| a.port())
}

/// A running listener; dropping it closes the socket.
pub struct Listener {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds a `server` address and serves it until the `Listener` is dropped.
pub fn listen(server: &ServerUrl, worker: String, backends: Backends) -> Result<Listener, String> {
    let ListenAddr::Tcp { host, port } = &server.addr else {
        return Err(format!(
            "{server}: unix socket listeners are not supported yet"
        ));
    };
    if server.scheme.is_tls() {
        return Err(format!("{server}: TLS listeners are not supported yet"));
    }
    let listener = std::net::TcpListener::bind((host.as_str(), *port))
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .map_err(|e| format!("cannot listen on {server}: {e}"))?;
    let scheme = server.scheme;
    let next = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, client)) = listener.accept().await else {
                continue;
            };
            let (backends, next, worker) = (backends.clone(), next.clone(), worker.clone());
            tokio::spawn(async move {
                let pick = move || {
                    let list = backends.borrow();
                    (!list.is_empty())
                        .then(|| list[next.fetch_add(1, Ordering::Relaxed) % list.len()])
                };
                match scheme {
                    Scheme::Http => serve_http(stream, client, worker, pick).await,
                    _ => splice(stream, pick()).await,
                }
            });
        }
    });
    Ok(Listener { task })
}

async fn splice(mut client: TcpStream, backend: Option<SocketAddr>) {
    let Some(backend) = backend else { return };
    if let Ok(mut upstream) = TcpStream::connect(backend).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(message))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn serve_http(
    stream: TcpStream,
    client: SocketAddr,
    worker: String,
    pick: impl Fn() -> Option<SocketAddr> + Clone + Send + Sync + 'static,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (pick, worker) = (pick.clone(), worker.clone());
        async move { Ok::<_, std::convert::Infallible>(forward(request, client, &worker, pick()).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

async fn forward(
    mut request: Request<Incoming>,
    client: SocketAddr,
    worker: &str,
    backend: Option<SocketAddr>,
) -> Response<Body> {
    let Some(backend) = backend else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no instance of {worker} is running\n"),
        );
    };
    let headers = request.headers_mut();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(chain) => format!("{chain}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    let host = headers.get(hyper::header::HOST).cloned();
    for (name, value) in [
        ("x-forwarded-for", Some(forwarded_for)),
        ("x-forwarded-proto", Some("http".to_owned())),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    if let Some(host) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    let upstream = match TcpStream::connect(backend).await {
        Ok(stream) => stream,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("{worker} did not accept the connection: {e}\n"),
            );
        }
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{worker}: {e}\n")),
        };
    tokio::spawn(connection.with_upgrades());
    match sender.send_request(request).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            format!("{worker} failed to answer: {e}\n"),
        ),
    }
}
