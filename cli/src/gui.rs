//! The web dashboard's server (`daemon { gui_port; gui_bind; gui_password;
//! }`, `apm gui`): the listener and who may use it. What it answers (the
//! page, the HTTP API, `/metrics`) is `api.rs`'s route table; the page
//! polls the API and follows a worker's log as Server-Sent Events. It refuses a
//! non-loopback address without a password (decision 4). Every request
//! needs a secret, on loopback too, where every local user is a client: the
//! password (HTTP Basic), or without one the token kept in
//! `$APM_HOME/gui.token`, which the URL `apm gui` prints carries and the
//! page sends back in the `X-Apm-Token` header. Both are compared in
//! constant time, and a client that keeps failing is refused for a while
//! (`Strikes`). A change also needs the `X-Apm-Gui` header, which a page
//! of another site cannot send, so a browser logged in cannot be made to
//! click for someone else. Without a password it answers only requests
//! that name it by address or `localhost` (against DNS rebinding).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use super::Daemon;
use super::api::{Body, Unmatched, refused};

pub const PAGE: &str = include_str!("gui.html");

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
    /// Its address, for the daemon log.
    pub url: String,
    /// The address with the token, when it has one: what `apm gui` prints.
    pub link: String,
    task: tokio::task::JoinHandle<()>,
}

/// What every request must carry.
enum Secret {
    /// `gui_password`, as HTTP Basic with any user name.
    Password(String),
    /// The token of `$APM_HOME/gui.token`, in `X-Apm-Token` or `?token=`.
    Token(String),
}

/// The GUI's token, kept in `$APM_HOME/gui.token` so that a URL printed
/// once works until the file is deleted. Created readable by the daemon's
/// user only from the start (never made so after); a file that another
/// user owns or may read is replaced.
fn token(home: &Path) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = home.join("gui.token");
    let fail =
        |e: std::io::Error| format!("cannot keep the GUI's token in {}: {e}", path.display());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                let token = apm_runtime::random_token().map_err(fail)?;
                file.write_all(token.as_bytes()).map_err(fail)?;
                return Ok(token);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file = std::fs::File::open(&path).map_err(fail)?;
                let meta = file.metadata().map_err(fail)?;
                let mut token = String::new();
                file.take(64).read_to_string(&mut token).map_err(fail)?;
                let private =
                    meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0;
                if private && token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(token);
                }
                apm_runtime::log(format_args!(
                    "{} was not a private token of this daemon's user: replaced",
                    path.display()
                ));
                std::fs::remove_file(&path).map_err(fail)?;
            }
            Err(e) => return Err(fail(e)),
        }
    }
    Err(format!("cannot create {}", path.display()))
}

/// Failures a client may have before it is refused for a while.
const FREE_FAILURES: u32 = 5;
/// The longest a client is refused; the time doubles with each failure.
const LONGEST_LOCKOUT: Duration = Duration::from_secs(60);
/// A client without a failure for this long starts again from nothing.
const FORGIVEN_AFTER: Duration = Duration::from_secs(600);
/// Clients whose failures are tracked; past it, new ones share one count.
const TRACKED: usize = 1024;

/// Failed attempts per client (an IPv4 address, or an IPv6 /64, which one
/// client usually has whole), and the lockouts they earned: from the
/// fifth failure in a row, the client is refused without its secret being
/// looked at for 1 s, then 2, 4 … up to a minute. Pure: callers say when.
#[derive(Default)]
struct Strikes {
    clients: HashMap<Option<IpAddr>, Record>,
}

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
    locked_until: Option<Instant>,
    /// Requests refused while locked out, since the last lockout began.
    refused: u64,
}

/// A lockout that began, for the daemon log.
#[derive(Debug, PartialEq)]
struct Lockout {
    failures: u32,
    lasts: Duration,
    refused_before: u64,
}

impl Strikes {
    fn key(&self, client: IpAddr) -> Option<IpAddr> {
        let client = match client {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
            },
            v4 => v4,
        };
        (self.clients.len() < TRACKED || self.clients.contains_key(&Some(client))).then_some(client)
    }

    /// How much longer `client` is refused, if it is (and it is counted).
    fn locked(&mut self, client: IpAddr, now: Instant) -> Option<Duration> {
        let key = self.key(client);
        let record = self.clients.get_mut(&key)?;
        let left = record
            .locked_until?
            .checked_duration_since(now)
            .filter(|left| !left.is_zero())?;
        record.refused += 1;
        Some(left)
    }

    /// Counts a failure; the lockout it starts, if it starts one.
    fn failed(&mut self, client: IpAddr, now: Instant) -> Option<Lockout> {
        if self.clients.len() >= TRACKED {
            self.clients
                .retain(|_, r| now.duration_since(r.last) < FORGIVEN_AFTER);
        }
        let key = self.key(client);
        let record = self.clients.entry(key).or_insert(Record {
            failures: 0,
            last: now,
            locked_until: None,
            refused: 0,
        });
        if now.duration_since(record.last) >= FORGIVEN_AFTER {
            record.failures = 0;
        }
        record.failures += 1;
        record.last = now;
        let beyond = record.failures.checked_sub(FREE_FAILURES)?;
        let lasts = Duration::from_secs(1u64 << beyond.min(6)).min(LONGEST_LOCKOUT);
        record.locked_until = Some(now + lasts);
        Some(Lockout {
            failures: record.failures,
            lasts,
            refused_before: std::mem::take(&mut record.refused),
        })
    }

    fn succeeded(&mut self, client: IpAddr) {
        let key = self.key(client);
        if key.is_some() {
            self.clients.remove(&key);
        }
    }
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
    let secret = match &settings.password {
        Some(password) => Secret::Password(password.clone()),
        None => Secret::Token(token(&daemon.place.home)?),
    };
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
    let link = match &secret {
        Secret::Token(token) => format!("{url}?token={token}"),
        Secret::Password(_) => url.clone(),
    };
    let guard = Arc::new(Guard {
        secret,
        strikes: Mutex::default(),
    });
    let task = tokio::spawn(serve(daemon, listener, guard));
    Ok(Gui {
        settings,
        url,
        link,
        task,
    })
}

/// The secret and who failed to give it.
struct Guard {
    secret: Secret,
    strikes: Mutex<Strikes>,
}

async fn serve(daemon: Arc<Daemon>, listener: tokio::net::TcpListener, guard: Arc<Guard>) {
    let mut errors = apm_runtime::AcceptErrors::default();
    // The connections end with the GUI: one kept alive would otherwise go on
    // being served with the secret of before, after a password was set.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = errors.next(&listener, "the GUI").await;
        while connections.try_join_next().is_some() {}
        let Ok(client) = stream.peer_addr().map(|a| a.ip()) else {
            continue;
        };
        let (daemon, guard) = (daemon.clone(), guard.clone());
        let service = hyper::service::service_fn(move |request| {
            let (daemon, guard) = (daemon.clone(), guard.clone());
            async move { Ok::<_, Infallible>(answer(&daemon, &guard, client, request).await) }
        });
        // A connection that sends no head for a while (an idle keep-alive,
        // a client that never finishes) is closed.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30));
        connections.spawn(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
    }
}

/// Whether the request carries the secret: the password (any user name),
/// or the token in its header or its query.
fn authorized(secret: &Secret, request: &Request<hyper::body::Incoming>) -> bool {
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    match secret {
        Secret::Password(password) => header(hyper::header::AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|encoded| data_encoding::BASE64.decode(encoded.trim().as_bytes()).ok())
            .and_then(|decoded| {
                let colon = decoded.iter().position(|b| *b == b':')?;
                Some(bool::from(decoded[colon + 1..].ct_eq(password.as_bytes())))
            })
            .unwrap_or(false),
        Secret::Token(token) => header(hyper::header::HeaderName::from_static("x-apm-token"))
            .or_else(|| query_field(request.uri().query().unwrap_or(""), "token"))
            .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes()))),
    }
}

/// A `key=value` field of a query string, as it is (not decoded).
fn query_field<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The refusal of a request from a client locked out, or without the
/// secret; none when it may go on. Failures are counted, and a lockout is logged when it
/// begins, with the requests refused during the one before: a burst of
/// guesses makes a few lines, not one per guess.
fn refusal_of(
    guard: &Guard,
    client: IpAddr,
    request: &Request<hyper::body::Incoming>,
) -> Option<Response<Body>> {
    let now = Instant::now();
    let what = match guard.secret {
        Secret::Password(_) => "password",
        Secret::Token(_) => "token",
    };
    if let Some(left) = apm_runtime::locked(&guard.strikes).locked(client, now) {
        let mut response = refused(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many wrong {what}s from {client}: try again later"),
        );
        response.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(left.as_secs().max(1)),
        );
        return Some(response);
    }
    if authorized(&guard.secret, request) {
        apm_runtime::locked(&guard.strikes).succeeded(client);
        return None;
    }
    let lockout = apm_runtime::locked(&guard.strikes).failed(client, now);
    if let Some(lockout) = lockout {
        apm_runtime::log(format_args!(
            "GUI: {} wrong {what}s in a row from {client}; refusing it for {} s ({} requests were refused \
             while it was locked out before)",
            lockout.failures,
            lockout.lasts.as_secs(),
            lockout.refused_before
        ));
    }
    let mut response = match guard.secret {
        Secret::Password(_) => refused(StatusCode::UNAUTHORIZED, "the apm GUI needs its password"),
        Secret::Token(_) => refused(
            StatusCode::UNAUTHORIZED,
            "the apm GUI needs its token: open the address `apm gui` prints",
        ),
    };
    if let Secret::Password(_) = guard.secret {
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"apm\", charset=\"UTF-8\""),
        );
    }
    Some(response)
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
    guard: &Guard,
    client: IpAddr,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    if matches!(guard.secret, Secret::Token(_)) && !named_by_address(&request) {
        return refused(
            StatusCode::FORBIDDEN,
            "open the apm GUI by its address (127.0.0.1 or localhost), or set gui_password",
        );
    }
    if let Some(refusal) = refusal_of(guard, client, &request) {
        return refusal;
    }
    let (route, name) = match super::api::route(request.method(), request.uri().path()) {
        Ok(found) => found,
        Err(Unmatched::NotFound) => {
            return refused(
                StatusCode::NOT_FOUND,
                "no such route: /api/openapi.json lists them",
            );
        }
        Err(Unmatched::Method(allowed)) => {
            let mut response = refused(StatusCode::METHOD_NOT_ALLOWED, "not with this method");
            let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            if let Ok(value) = hyper::header::HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(hyper::header::ALLOW, value);
            }
            return response;
        }
    };
    if route.changes() && !request.headers().contains_key("x-apm-gui") {
        return refused(StatusCode::FORBIDDEN, "a change needs the X-Apm-Gui header");
    }
    let query = request.uri().query().unwrap_or("");
    super::api::answer(daemon, route, name, query).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_keeps_failing_is_locked_out_for_twice_as_long_each_time() {
        let mut strikes = Strikes::default();
        let client: IpAddr = [127, 0, 0, 1].into();
        let t = Instant::now();
        for _ in 1..FREE_FAILURES {
            assert_eq!(strikes.failed(client, t), None);
            assert_eq!(strikes.locked(client, t), None);
        }
        let first = strikes.failed(client, t).unwrap();
        assert_eq!(first.lasts, Duration::from_secs(1));
        for _ in 0..1000 {
            assert!(
                strikes
                    .locked(client, t + Duration::from_millis(500))
                    .is_some()
            );
        }
        // Another client is not held back by this one.
        assert_eq!(strikes.locked([127, 0, 0, 2].into(), t), None);
        let at = t + Duration::from_secs(1);
        assert_eq!(strikes.locked(client, at), None);
        let second = strikes.failed(client, at).unwrap();
        assert_eq!(
            (second.lasts, second.refused_before),
            (Duration::from_secs(2), 1000)
        );
        let mut now = at;
        for _ in 0..20 {
            now += Duration::from_secs(61);
            assert!(strikes.failed(client, now).unwrap().lasts <= LONGEST_LOCKOUT);
        }
        // The right secret clears the record.
        strikes.succeeded(client);
        assert_eq!(strikes.failed(client, now), None);
    }

    #[test]
    fn ipv6_clients_count_per_64_and_the_table_is_bounded() {
        let mut strikes = Strikes::default();
        let t = Instant::now();
        let in_one_64 = |n: u16| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, n]);
        for n in 0..FREE_FAILURES as u16 - 1 {
            strikes.failed(in_one_64(n), t);
        }
        assert!(strikes.failed(in_one_64(999), t).is_some(), "one client");
        for n in 0..(TRACKED as u32 * 3) {
            strikes.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)), t);
        }
        assert!(strikes.clients.len() <= TRACKED + 1);
        // Past the bound, new clients share one count, and are locked out together.
        assert!(strikes.locked(IpAddr::from([192, 0, 2, 1]), t).is_some());
    }
}
