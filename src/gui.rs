//! The web dashboard (`daemon { gui_port; gui_bind; gui_password; }`, `apm
//! gui`): one page that polls a small JSON API of the daemon — the
//! instances with their CPU and memory (graphed in the page from what it
//! polled), a worker's last log lines, and start, stop and restart, which
//! go through the same dispatch as the CLI's calls. It refuses a
//! non-loopback address without a password (decision 4); with one, every
//! request needs it (HTTP Basic, compared in constant time), and a change
//! also needs the `X-Apm-Gui` header, which a page of another site cannot
//! send, so a browser logged in cannot be made to click for someone else.
//! Without a password it answers only requests that name it by address
//! or `localhost` (against DNS rebinding).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use super::Daemon;
use crate::protocol::Call;

const PAGE: &str = include_str!("gui.html");
/// Log lines a worker's panel shows.
const LOG_LINES: usize = 200;

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub port: u16,
    pub bind: IpAddr,
    pub password: Option<String>,
}

impl Settings {
    pub fn of(config: &apm_compiler::ir::DaemonConfig) -> Settings {
        Settings {
            port: config.gui_port.value,
            bind: config.gui_bind.value.0,
            password: config
                .gui_password
                .as_ref()
                .map(|p| p.value.expose().to_owned()),
        }
    }
}

/// A running dashboard; it stops when dropped.
pub struct Gui {
    pub settings: Settings,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gui {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gui {
    /// Stops it, its port closed once this returns (a task only aborted
    /// keeps its listener until the runtime drops it).
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// Why the GUI may not start with these settings, if it may not.
pub fn refusal(settings: &Settings) -> Option<String> {
    if settings.port == 0 {
        return Some("gui_port is 0 or unset: set it in a `daemon { }` block".to_owned());
    }
    (!settings.bind.is_loopback() && settings.password.is_none()).then(|| {
        format!(
            "the GUI would listen on {} without a password: set `gui_password`, or `gui_bind 127.0.0.1;`, in the `daemon {{ }}` block",
            settings.bind
        )
    })
}

pub fn start(daemon: Arc<Daemon>, settings: Settings) -> Result<Gui, String> {
    if let Some(refused) = refusal(&settings) {
        return Err(refused);
    }
    let address = SocketAddr::new(settings.bind, settings.port);
    let listener = std::net::TcpListener::bind(address)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    // On every interface, it is also on this machine's loopback.
    let shown = match settings.bind {
        IpAddr::V4(any) if any.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(any) if any.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        bind => bind,
    };
    let url = format!("http://{}/", SocketAddr::new(shown, settings.port));
    let password = settings.password.clone().map(Arc::<str>::from);
    let task = tokio::spawn(serve(daemon, listener, password));
    Ok(Gui {
        settings,
        url,
        task,
    })
}

async fn serve(daemon: Arc<Daemon>, listener: tokio::net::TcpListener, password: Option<Arc<str>>) {
    let mut errors = apm_runtime::AcceptErrors::default();
    loop {
        let stream = errors.next(&listener, "the GUI").await;
        let (daemon, password) = (daemon.clone(), password.clone());
        let service = hyper::service::service_fn(move |request| {
            let (daemon, password) = (daemon.clone(), password.clone());
            async move { Ok::<_, Infallible>(answer(&daemon, password.as_deref(), request).await) }
        });
        // A connection that sends no head for a while (an idle keep-alive,
        // a client that never finishes) is closed.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30));
        tokio::spawn(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_str(kind).expect("a content type"),
    );
    response
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

fn refused(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", format!("{why}\n"))
}

/// Whether the request carries the password (any user name).
fn authorized(password: Option<&str>, request: &Request<hyper::body::Incoming>) -> bool {
    let Some(password) = password else {
        return true;
    };
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|encoded| data_encoding::BASE64.decode(encoded.trim().as_bytes()).ok())
        .and_then(|decoded| {
            let colon = decoded.iter().position(|b| *b == b':')?;
            Some(bool::from(decoded[colon + 1..].ct_eq(password.as_bytes())))
        })
        .unwrap_or(false)
}

/// Whether the request names the GUI by an address or `localhost`. A
/// GUI without a password listens on loopback only, and a web page whose
/// own host name is made to resolve to 127.0.0.1 (DNS rebinding) would
/// otherwise be of the GUI's origin: it could read logs and press buttons.
fn named_by_address(request: &Request<hyper::body::Incoming>) -> bool {
    let Some(host) = request
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

async fn answer(
    daemon: &Daemon,
    password: Option<&str>,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if password.is_none() && !named_by_address(&request) {
        return refused(
            StatusCode::FORBIDDEN,
            "open the apm GUI by its address (127.0.0.1 or localhost), or set gui_password",
        );
    }
    if !authorized(password, &request) {
        let mut response = refused(StatusCode::UNAUTHORIZED, "the apm GUI needs its password");
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"apm\", charset=\"UTF-8\""),
        );
        return response;
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    match (request.method(), path.as_str()) {
        (&Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (&Method::GET, "/api/workers") => {
            let response = super::dispatch(daemon, Call::List).await;
            json(&response.data)
        }
        (&Method::GET, "/api/log") => log(daemon, &query).await,
        (&Method::POST, action) if action.starts_with("/api/workers/") => {
            if !request.headers().contains_key("x-apm-gui") {
                return refused(StatusCode::FORBIDDEN, "a change needs the X-Apm-Gui header");
            }
            let rest = &action["/api/workers/".len()..];
            let Some((name, verb)) = rest.rsplit_once('/') else {
                return refused(StatusCode::NOT_FOUND, "no such action");
            };
            let name = name.to_owned();
            let call = match verb {
                "start" => Call::Start { name },
                "stop" => Call::Stop { name },
                "restart" => Call::Restart { name, force: false },
                _ => return refused(StatusCode::NOT_FOUND, "no such action"),
            };
            let response = super::dispatch(daemon, call).await;
            let status = if response.ok {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let mut answer = json(&response);
            *answer.status_mut() = status;
            answer
        }
        _ => refused(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `GET /api/log?worker=NAME[&err=1]`: the worker's last log lines.
async fn log(daemon: &Daemon, query: &str) -> Response<Full<Bytes>> {
    let field = |key: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let Some(name) = field("worker") else {
        return refused(StatusCode::BAD_REQUEST, "name the worker: ?worker=NAME");
    };
    let err = field("err").is_some_and(|v| v == "1");
    let response = super::dispatch(daemon, Call::Info { name }).await;
    if !response.ok {
        return refused(StatusCode::NOT_FOUND, &response.error.unwrap_or_default());
    }
    let Ok(status) = serde_json::from_value::<apm_runtime::supervisor::WorkerStatus>(
        response.data["status"].clone(),
    ) else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unreadable worker status",
        );
    };
    let (path, marker) = if err {
        (status.err_log, "!")
    } else {
        (status.out_log, "|")
    };
    let lines = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path)
            .map(|file| crate::commands::last_log_lines(&file, Some(marker), LOG_LINES).0)
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    json(&lines)
}
