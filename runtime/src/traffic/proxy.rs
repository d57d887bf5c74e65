//! The built-in proxy: every `server` listener spreads connections over a
//! worker's running instances, round-robin. An instance is reached in one
//! of two ways. With `upstream port`, it listens on a loopback port of its
//! own (given in `port_env`): `http://` is proxied request by request (with
//! `X-Forwarded-*` headers, `upstream`), `ws://` and `tcp://` are spliced
//! byte for byte.
//! With `upstream connector`, each request, WebSocket or TCP connection is a
//! session on the instance's connector channel (`connector`, `session`).
//!
//! The listening sockets belong to the daemon, so they stay open while
//! instances restart. Instances that are starting, stopping or ended get no
//! new traffic; with none running, HTTP answers 503 and TCP closes.

use std::any::Any;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use apm_compiler::values::{ListenAddr, Scheme, ServerUrl};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderMap, HeaderName, HeaderValue, TE, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::observe::traffic_stats::{self, Counted, ListenerStats, OpenConnection};
use crate::traffic::activity::{Activity, ClientBody, ClientIo};
use crate::traffic::connector::{Handoff, Head, Link, Successors};
use crate::traffic::held::{Held, Metered};
use crate::traffic::http::{Body, BoxError, Io, lists_token, text};
use crate::traffic::inflight::{Entered, InFlight};
use crate::traffic::tls::Tls;
use crate::traffic::vanguard::{Origin, Permit, Refusal, TrustedProxies, Vanguard};
use crate::traffic::{parked, upstream};

/// Where a listener sends traffic and how, as the supervisor sees it now:
/// the running instances and the worker's proxy options.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Route {
    pub backends: Vec<Backend>,
    /// Shared: every request takes the options of the moment, and a
    /// clone is then a count, not a copy of the trace header's name.
    pub options: Arc<Options>,
}

/// A running instance, as the proxy reaches it: its port (with what the
/// proxy has in flight on it) or its connector channel.
#[derive(Clone, Debug)]
pub enum Backend {
    Port(SocketAddr, Arc<InFlight>),
    Connector(Arc<Link>),
}

impl Backend {
    /// What the proxy has in flight on the instance, which is not
    /// signalled before it is all through (bounded by `kill_timeout`).
    pub fn in_flight(&self) -> &Arc<InFlight> {
        match self {
            Backend::Port(_, in_flight) => in_flight,
            Backend::Connector(link) => link.in_flight(),
        }
    }
}

/// An instance chosen for a request or connection, already counted in
/// flight on it: counted while the route that lists it is read, so that
/// the supervisor, which takes it out of the route before it waits for
/// its count to fall to zero, either sees the count or is not chosen at
/// all (counted after, a request could reach an instance already signalled).
type Chosen = Option<(Backend, Entered)>;

/// The instance that `kept` names while the route still lists it, or the
/// next one in turn; counted in flight before the route is let go.
fn choose(route: &Route, kept: Option<SocketAddr>, next: &AtomicUsize) -> Chosen {
    let list = &route.backends;
    let backend = kept
        .and_then(|kept| {
            list.iter()
                .find(|b| matches!(b, Backend::Port(a, _) if *a == kept))
        })
        .or_else(|| {
            (!list.is_empty()).then(|| &list[next.fetch_add(1, Ordering::Relaxed) % list.len()])
        })?;
    Some((backend.clone(), backend.in_flight().enter()))
}

impl PartialEq for Backend {
    fn eq(&self, other: &Backend) -> bool {
        match (self, other) {
            // A new process may get the port of the one before: its count
            // is its own.
            (Backend::Port(a, a_flight), Backend::Port(b, b_flight)) => {
                a == b && Arc::ptr_eq(a_flight, b_flight)
            }
            (Backend::Connector(a), Backend::Connector(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The header that carries each forwarded request's id, and the log that
/// gets a line per request: the worker's stdout log (decision 20).
#[derive(Clone, Debug, PartialEq)]
pub struct Tracing {
    pub header: HeaderName,
    pub log: crate::observe::logs::Sinks,
    /// The worker's `log_time_format`, so its trace lines read like its own.
    pub time_format: Option<Arc<str>>,
}

/// The worker's proxy options (Proxy / HTTP in the reference).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Whose `X-Forwarded-For` / `X-Real-IP` name the client.
    pub proxies: TrustedProxies,
    /// `trace_header`: each forwarded request carries a unique id.
    pub tracing: Option<Tracing>,
    /// Idle timeout of client keep-alive connections.
    pub keep_alive: std::time::Duration,
    /// Concurrent connections per listener; 0 is unlimited.
    pub max_conns: u32,
    /// Forward header names lowercased instead of as the client wrote them.
    pub lowercase_headers: bool,
    /// The worker's firewall, when it has `vanguard { }` rules.
    pub vanguard: Option<Guard>,
    pub tls: TlsSetting,
    /// `upstream connector`: the daemon speaks HTTP and WebSocket itself
    /// and hands sessions to the instances.
    pub connector: bool,
    /// `session_persist` (with a connector): WebSocket and TCP sessions
    /// move to another instance when theirs leaves rotation, each within
    /// `session_wait`.
    pub session_persist: Option<std::time::Duration>,
}

/// A worker's instances as candidates to take over a session.
struct RouteSuccessors(Routes);

impl Successors for RouteSuccessors {
    fn candidates(&self) -> Vec<Arc<Link>> {
        self.0
            .borrow()
            .backends
            .iter()
            .filter_map(|backend| match backend {
                Backend::Connector(link) => Some(link.clone()),
                Backend::Port(..) => None,
            })
            .collect()
    }
}

/// What a session of this worker needs to move, with `session_persist`.
fn handoff(
    routes: &Routes,
    options: &Options,
    worker: &str,
    protocol: &'static str,
) -> Option<Handoff> {
    options.session_persist.map(|wait| Handoff {
        successors: Arc::new(RouteSuccessors(routes.clone())),
        wait,
        worker: worker.to_owned(),
        protocol,
    })
}

/// Whether a worker's listeners terminate TLS.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum TlsSetting {
    #[default]
    Off,
    On(Tls),
    /// `tls` is on but the certificate or key could not be loaded (logged).
    Broken,
}

/// A worker's Vanguard, shared by its listeners; equal when it is the same one.
#[derive(Clone, Debug)]
pub struct Guard(pub Arc<Vanguard>);

impl PartialEq for Guard {
    fn eq(&self, other: &Guard) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

pub type Routes = watch::Receiver<Route>;

/// A running listener; dropping it closes the socket (and removes a unix
/// socket's file).
pub struct Listener {
    task: tokio::task::JoinHandle<()>,
    path: Option<std::path::PathBuf>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a `server` address and serves it until the `Listener` is dropped.
/// The socket and its accept loop go to a proxy thread (`threads`), and
/// each connection to the least loaded one.
pub fn listen(server: &ServerUrl, worker: String, routes: Routes) -> Result<Listener, String> {
    let _on_a_proxy_thread = crate::traffic::threads::enter();
    let cannot = |e: std::io::Error| format!("cannot listen on {server}: {e}");
    let (listener, path) = match &server.addr {
        ListenAddr::Tcp { host, port } => {
            let listener = std::net::TcpListener::bind((host.as_str(), *port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
                .map_err(cannot)?;
            (Socket::Tcp(listener), None)
        }
        ListenAddr::Unix { unix } => {
            // A socket file left by a daemon that died is in the way; any
            // other file is not ours to remove.
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(unix).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(unix);
            }
            (
                Socket::Unix(tokio::net::UnixListener::bind(unix).map_err(cannot)?),
                Some(unix.clone()),
            )
        }
    };
    let scheme = server.scheme;
    let shown = server.to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let stats = traffic_stats::register(worker.clone(), shown.clone());
    let task = tokio::spawn(async move {
        // `max_conns`: beyond it, new connections wait in the kernel's backlog.
        let mut slots = Slots::default();
        let mut errors = crate::AcceptErrors::default();
        // A limit changed while the listener waits for a slot applies at once.
        let mut changes = routes.clone();
        loop {
            let permit = loop {
                let max = routes.borrow().options.max_conns;
                tokio::select! {
                    permit = slots.take(max) => break permit,
                    Ok(()) = changes.changed() => {}
                }
            };
            let accepted = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    errors.failed(e, &shown).await;
                    continue;
                }
            };
            let (routes, next, worker) = (routes.clone(), next.clone(), worker.clone());
            let (successors, stats) = (routes.clone(), stats.clone());
            crate::traffic::threads::hand_over(accepted, move |accepted, open| async move {
                let options = routes.borrow().options.clone();
                let socket = accepted.socket();
                // A raw connection is judged by Vanguard before anything else;
                // a refused TCP client gets a reset, not a word. Through a
                // connector, WebSockets are served (and judged) as requests.
                let raw = match scheme {
                    Scheme::Http | Scheme::Https => false,
                    Scheme::Ws | Scheme::Wss => !options.connector,
                    Scheme::Tcp => true,
                };
                let (stream, client, raw_permit) = match accepted {
                    Accepted::Tcp(stream, ip) if raw => {
                        match admit_connection(&options, Some(ip)) {
                            Ok(permit) => (Box::new(stream) as Box<dyn Io>, Some(ip), Some(permit)),
                            Err(_) => {
                                let _ = stream.set_zero_linger();
                                return;
                            }
                        }
                    }
                    Accepted::Tcp(stream, ip) => (Box::new(stream) as Box<dyn Io>, Some(ip), None),
                    Accepted::Unix(stream) => (
                        Box::new(stream) as Box<dyn Io>,
                        None,
                        raw.then(Permit::unguarded),
                    ),
                };
                let stream = Box::new(stats.connection(stream)) as Box<dyn Io>;
                // What HTTP and WebSocket clients send is held until passed
                // on, and counted against the daemon's budget.
                let held = Held::new();
                let stream = if raw {
                    stream
                } else {
                    Box::new(Metered::new(stream, held.clone())) as Box<dyn Io>
                };
                let (stream, tls) = match (&options.tls, scheme.is_tls()) {
                    (TlsSetting::On(tls), _) => {
                        match handshake(tls, stream, options.keep_alive).await {
                            Some(stream) => {
                                let peer = Secure {
                                    client_subject: crate::traffic::tls::client_subject(
                                        stream.get_ref().1,
                                    ),
                                };
                                (Box::new(stream) as Box<dyn Io>, Some(peer))
                            }
                            None => return, // a failed handshake: nothing to forward
                        }
                    }
                    // A TLS listener whose certificate could not be loaded
                    // refuses rather than serve plain text.
                    (TlsSetting::Broken, _) | (TlsSetting::Off, true) => return,
                    (TlsSetting::Off, false) => (stream, None),
                };
                // A keep-alive client keeps the instance it was given while
                // that instance gets traffic; others take the next in turn.
                let pick = move |kept: Option<SocketAddr>| {
                    let route = routes.borrow();
                    (choose(&route, kept, &next), route.options.clone())
                };
                match raw_permit {
                    None => {
                        // Shared from here: the future of `serve_http`,
                        // alive as long as the client, holds a pointer
                        // rather than the connection's state.
                        let connection = Connection::new(client, tls, stats, held, successors);
                        let client = Client::new(
                            stream,
                            connection,
                            options,
                            pick,
                            Some(socket),
                            (permit, open),
                        );
                        serve_http(client).await;
                    }
                    Some(raw_permit) => {
                        let head = Secure::head("tcp", client, tls.as_ref());
                        let handoff = handoff(&successors, &options, &worker, "tcp");
                        splice(stream, pick(None).0, head, raw_permit, handoff).await;
                        drop((permit, open));
                    }
                }
            });
        }
    });
    Ok(Listener { task, path })
}

/// A listener's connection slots (`max_conns`): every connection holds a
/// permit of one semaphore, with or without a limit, so that a limit
/// lowered live counts the connections already open. Permits a lower
/// limit takes away while connections hold them are owed, and taken out
/// as those connections end, before any new one is let in.
struct Slots {
    semaphore: Arc<tokio::sync::Semaphore>,
    /// The limit the semaphore's permits stand for.
    limit: usize,
    owed: usize,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            semaphore: Arc::new(tokio::sync::Semaphore::new(0)),
            limit: 0,
            owed: 0,
        }
    }
}

impl Slots {
    /// A slot under `max_conns` (0: no limit), once one is free.
    /// Cancel-safe: the count is kept right at every await.
    async fn take(&mut self, max_conns: u32) -> tokio::sync::OwnedSemaphorePermit {
        let max = match max_conns {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n as usize,
        };
        if max > self.limit {
            let more = max - self.limit;
            let repaid = more.min(self.owed);
            self.owed -= repaid;
            self.semaphore.add_permits(more - repaid);
        } else {
            let fewer = self.limit - max;
            self.owed += fewer - self.semaphore.forget_permits(fewer);
        }
        self.limit = max;
        while self.owed > 0 {
            let permit = self.semaphore.acquire().await.expect("never closed");
            permit.forget();
            self.owed -= 1;
        }
        self.semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("never closed")
    }
}

/// A TLS handshake, which must end within `keep_alive` (if not 0): a
/// client that starts one and never finishes it is a slow client like one
/// that never finishes a request's head, and must not keep a `max_conns`
/// slot.
async fn handshake(
    tls: &Tls,
    stream: Box<dyn Io>,
    keep_alive: std::time::Duration,
) -> Option<tokio_rustls::server::TlsStream<Box<dyn Io>>> {
    // Boxed: inline, rustls' handshake state (kilobytes) would make every
    // connection's task as large, for as long as it lives.
    let accepting = Box::pin(tls.0.accept(stream));
    let accepted = if keep_alive.is_zero() {
        accepting.await
    } else {
        tokio::time::timeout(keep_alive, accepting).await.ok()?
    };
    accepted.ok()
}

/// What a TLS handshake established about the client.
#[derive(Clone)]
struct Secure {
    /// The verified certificate's subject, with `tls_ca`.
    client_subject: Option<HeaderValue>,
}

impl Secure {
    /// A connector session's head for a client over this connection (or
    /// over plain text, without one).
    fn head<'a>(
        protocol: &'static str,
        client: Option<IpAddr>,
        tls: Option<&'a Secure>,
    ) -> Head<'a> {
        Head {
            protocol,
            request: None,
            remote_ip: client,
            tls: tls.is_some(),
            client_subject: tls.and_then(|t| t.client_subject.as_ref()),
        }
    }
}

enum Socket {
    Tcp(TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Socket {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Socket::Tcp(listener) => {
                let (stream, address) = listener.accept().await?;
                // Small writes (a WebSocket frame's header, then its payload)
                // must not wait for the peer's delayed ACK.
                stream.set_nodelay(true)?;
                Ok(Accepted::Tcp(stream, address.ip()))
            }
            Socket::Unix(listener) => listener.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// A new connection, with the client's address when it has one.
enum Accepted {
    Tcp(TcpStream, IpAddr),
    Unix(tokio::net::UnixStream),
}

impl Accepted {
    fn socket(&self) -> RawFd {
        match self {
            Accepted::Tcp(stream, _) => stream.as_raw_fd(),
            Accepted::Unix(stream) => stream.as_raw_fd(),
        }
    }
}

/// An accepted connection on its way to another proxy thread.
enum Moving {
    Tcp(std::net::TcpStream, IpAddr),
    Unix(std::os::unix::net::UnixStream),
}

impl crate::traffic::threads::Movable for Accepted {
    type Moving = Moving;

    fn unregister(self) -> std::io::Result<Moving> {
        Ok(match self {
            Accepted::Tcp(stream, ip) => Moving::Tcp(stream.into_std()?, ip),
            Accepted::Unix(stream) => Moving::Unix(stream.into_std()?),
        })
    }

    fn register(moving: Moving) -> std::io::Result<Accepted> {
        Ok(match moving {
            Moving::Tcp(stream, ip) => Accepted::Tcp(TcpStream::from_std(stream)?, ip),
            Moving::Unix(stream) => Accepted::Unix(tokio::net::UnixStream::from_std(stream)?),
        })
    }
}

fn admit_connection(options: &Options, client: Option<IpAddr>) -> Result<Permit, Refusal> {
    match (&options.vanguard, client) {
        (Some(guard), Some(ip)) => guard.0.admit_connection(ip),
        // Without rules there is nothing to check; a unix socket client has no address.
        _ => Ok(Permit::unguarded()),
    }
}

/// Carries a raw connection Vanguard let through to an instance, which is
/// not signalled while it lasts (bounded); with `handoff`, a connector
/// session moves instead.
async fn splice(
    mut client: Box<dyn Io>,
    chosen: Chosen,
    head: Head<'_>,
    _permit: Permit,
    handoff: Option<Handoff>,
) {
    let Some((backend, in_flight)) = chosen else {
        return;
    };
    // Both ways boxed: inline, a connection's or a session's future would
    // make the task of every client connection as large, HTTP ones included.
    match backend {
        Backend::Port(backend, _) => {
            Box::pin(async move {
                if let Ok(mut upstream) = TcpStream::connect(backend).await {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            })
            .await;
        }
        Backend::Connector(link) => {
            Box::pin(crate::traffic::session::tcp(
                client, link, head, in_flight, handoff,
            ))
            .await;
        }
    }
}

/// One client connection, as its requests see it.
struct Connection {
    client: Option<IpAddr>,
    /// The client's address as `X-Forwarded-For` carries it, made once.
    client_value: Option<HeaderValue>,
    tls: Option<Secure>,
    /// Its listener's figures, which name the worker.
    stats: Arc<ListenerStats>,
    /// The connection to an instance that this client's requests reuse.
    upstream: std::sync::Mutex<upstream::Pinned>,
    activity: Arc<Activity>,
    /// What the proxy has read from the client and not yet passed on.
    held: Arc<Held>,
    /// The worker's route, for a WebSocket to find its next instance.
    routes: Routes,
}

impl Connection {
    fn new(
        client: Option<IpAddr>,
        tls: Option<Secure>,
        stats: Arc<ListenerStats>,
        held: Arc<Held>,
        routes: Routes,
    ) -> Connection {
        Connection {
            client,
            client_value: client.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()),
            tls,
            stats,
            upstream: std::sync::Mutex::default(),
            activity: Arc::new(Activity::new()),
            held,
            routes,
        }
    }

    /// Whether the connection has been idle for `keep_alive` (never, for
    /// 0): no request answered in that time, whatever the client sent
    /// meanwhile (a client that never finishes a request's head included).
    /// Meanwhile, a connection to an instance that an idle client will not
    /// use again is closed; with `served_from` (when hyper began serving
    /// the client), the lull after a request is reported once it has
    /// lasted as long, so that hyper's buffers can be let go. Looked at on
    /// each tick of the connection's `IdleTicks`.
    fn lapse(&self, keep_alive: std::time::Duration, served_from: Option<u64>) -> Option<Lapse> {
        let closes = !keep_alive.is_zero();
        if closes
            && self
                .activity
                .body_stalled_since()
                .is_some_and(|since| since.elapsed() >= keep_alive)
        {
            return Some(Lapse::Expired);
        }
        let idle_since = self.activity.idle_since()?;
        if closes && idle_since.elapsed() >= keep_alive {
            return Some(Lapse::Expired);
        }
        self.upstream.lock().expect("upstream").close_if_stale();
        // A client that sent part of a request (a slow one) keeps
        // hyper, which holds that part.
        (idle_since.elapsed() >= upstream::IDLE_LIMIT
            && self.held.is_empty()
            && served_from.is_some_and(|from| self.activity.between_requests(from)))
        .then_some(Lapse::Lull)
    }

    /// When the idle connection is closed, if its client sends nothing.
    fn expires(&self, keep_alive: std::time::Duration) -> Option<std::time::Instant> {
        let idle_since = self.activity.idle_since();
        idle_since
            .filter(|_| !keep_alive.is_zero())
            .map(|since| since + keep_alive)
    }

    /// Waits for the client's next request holding no buffer, for at most
    /// `quiet_after` (for ever: `None`).
    async fn waited(
        &self,
        io: &mut ClientIo,
        keep_alive: std::time::Duration,
        quiet_after: Option<std::time::Duration>,
    ) -> Waited {
        if io.has_read_ahead() {
            return Waited::Sent;
        }
        let quiet_at = quiet_after.map(|after| std::time::Instant::now() + after);
        let (until, then) = match (self.expires(keep_alive), quiet_at) {
            (Some(expires), Some(quiet_at)) if quiet_at < expires => (quiet_at, Waited::Quiet),
            (Some(expires), _) => (expires, Waited::Gone),
            (None, Some(quiet_at)) => (quiet_at, Waited::Quiet),
            (None, None) => {
                return if io.wait_for_client().await {
                    Waited::Sent
                } else {
                    Waited::Gone
                };
            }
        };
        match tokio::time::timeout_at(until.into(), io.wait_for_client()).await {
            Ok(true) => Waited::Sent,
            Ok(false) => Waited::Gone,
            Err(_) => then,
        }
    }
}

/// What a client did while its connection waited for its next request.
enum Waited {
    /// It sent something, kept for hyper.
    Sent,
    /// It closed, or stayed idle for `keep_alive`.
    Gone,
    /// Nothing yet: the connection can sleep.
    Quiet,
}

/// Why a served connection's `lapse` ends its serving.
enum Lapse {
    /// The connection has been idle for `keep_alive`: it closes.
    Expired,
    /// hyper is between two requests and has been for a while.
    Lull,
}

/// A request being answered, until its response's body is through (or
/// dropped with the connection), its count on the instance answering it,
/// and since when.
struct Answering(Arc<Connection>, Option<Entered>, std::time::Instant);

impl Answering {
    fn start(connection: Arc<Connection>) -> Answering {
        connection.activity.answering.fetch_add(1, Ordering::AcqRel);
        Answering(connection, None, std::time::Instant::now())
    }

    /// The answer, counted in the listener's figures as its head is ready.
    fn with(self, response: Response<Body>) -> Response<Answer> {
        self.0
            .stats
            .answered(response.status().as_u16(), self.2.elapsed());
        response.map(|body| Answer {
            body,
            _answering: self,
        })
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let activity = &self.0.activity;
        activity
            .answered_at
            .store(activity.now(), Ordering::Release);
        activity.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response's body, holding its request's `Answering` while it streams.
struct Answer {
    body: Body,
    _answering: Answering,
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// How a client connection's requests find their instance (and the
/// options of the moment), given the one its last request went to.
trait Pick:
    Fn(Option<SocketAddr>) -> (Chosen, Arc<Options>) + Clone + Send + Sync + Unpin + 'static
{
}
impl<F> Pick for F where
    F: Fn(Option<SocketAddr>) -> (Chosen, Arc<Options>) + Clone + Send + Sync + Unpin + 'static
{
}

/// A client connection between two requests: what serves its next ones.
struct Client<P> {
    io: ClientIo,
    connection: Arc<Connection>,
    /// Its listener's options as the connection began.
    options: Arc<Options>,
    pick: P,
    /// The client's socket, which `io` owns under its layers (none for a
    /// test's in-memory pipe).
    socket: Option<RawFd>,
    _holds: Holds,
}

/// A client connection's `max_conns` slot and its place in its thread's
/// count, for as long as it lives, with a task or asleep.
type Holds = (
    tokio::sync::OwnedSemaphorePermit,
    crate::traffic::threads::Open,
);

impl<P: Pick> Client<P> {
    fn new(
        stream: Box<dyn Io>,
        connection: Connection,
        options: Arc<Options>,
        pick: P,
        socket: Option<RawFd>,
        holds: Holds,
    ) -> Client<P> {
        let connection = Arc::new(connection);
        Client {
            io: ClientIo::new(stream, connection.activity.clone()),
            connection,
            options,
            pick,
            socket,
            _holds: holds,
        }
    }

    /// Whether its connection can sleep taken apart (`Dozing`): a plain
    /// one, with nothing read that hyper has not had.
    fn can_doze(&self) -> bool {
        self.connection.tls.is_none() && !self.io.has_read_ahead() && is_plain(self.io.get_ref())
    }
}

impl<P: Pick> parked::Sleeper for Client<P> {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        self.socket
            .map(|socket| crate::sys::socket_of(&self.io, socket))
    }

    fn wake(self: Box<Self>) {
        tokio::spawn(serve_http(*self));
    }
}

/// A plain client connection asleep, in as little as serves it again
/// (decision 123): its socket, out of tokio's reactor, and what its
/// connection's state is made from once its client sends again. A TLS
/// connection sleeps whole (`Client`): its session cannot be made again.
struct Dozing<P> {
    socket: PlainSocket,
    client: Option<IpAddr>,
    open: OpenConnection,
    routes: Routes,
    options: Arc<Options>,
    pick: P,
    holds: Holds,
}

enum PlainSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// A layer of a client's connection.
type Layer = Box<dyn Io>;

/// Whether `io` is a plain connection's layers, as `listen` makes them:
/// what the client sends held against the budget (`Metered`), over the
/// listener's figures (`Counted`), over the socket.
fn is_plain(io: &dyn Io) -> bool {
    let metered = (io as &dyn Any).downcast_ref::<Metered<Layer>>();
    let counted =
        metered.and_then(|m| (&**m.get_ref() as &dyn Any).downcast_ref::<Counted<Layer>>());
    counted.is_some_and(|counted| {
        let socket = &**counted.get_ref() as &dyn Any;
        socket.is::<TcpStream>() || socket.is::<tokio::net::UnixStream>()
    })
}

impl<P: Pick> Dozing<P> {
    /// A client whose connection `can_doze`, taken apart; none if its
    /// socket could not leave tokio's reactor (then closed: it was idle).
    fn of(client: Client<P>) -> Option<Dozing<P>> {
        let Client {
            io,
            connection,
            options,
            pick,
            _holds: holds,
            ..
        } = client;
        let metered = (io.into_inner() as Box<dyn Any>)
            .downcast::<Metered<Layer>>()
            .ok()?;
        let (socket, open) = (metered.into_inner() as Box<dyn Any>)
            .downcast::<Counted<Layer>>()
            .ok()?
            .into_parts();
        let socket = match (socket as Box<dyn Any>).downcast::<TcpStream>() {
            Ok(tcp) => PlainSocket::Tcp(tcp.into_std().ok()?),
            Err(other) => PlainSocket::Unix(
                other
                    .downcast::<tokio::net::UnixStream>()
                    .ok()?
                    .into_std()
                    .ok()?,
            ),
        };
        Some(Dozing {
            socket,
            client: connection.client,
            open,
            routes: connection.routes.clone(),
            options,
            pick,
            holds,
        })
    }

    /// The connection made again as `listen` makes a plain one (it is
    /// not counted as accepted again), its socket back in tokio's reactor.
    fn into_client(self) -> std::io::Result<Client<P>> {
        let (stream, socket): (Layer, RawFd) = match self.socket {
            PlainSocket::Tcp(tcp) => {
                let tcp = TcpStream::from_std(tcp)?;
                let socket = tcp.as_raw_fd();
                (Box::new(tcp), socket)
            }
            PlainSocket::Unix(unix) => {
                let unix = tokio::net::UnixStream::from_std(unix)?;
                let socket = unix.as_raw_fd();
                (Box::new(unix), socket)
            }
        };
        let stats = self.open.stats().clone();
        let held = Held::new();
        let counted: Layer = Box::new(self.open.resume(stream));
        let metered = Box::new(Metered::new(counted, held.clone()));
        let connection = Connection::new(self.client, None, stats, held, self.routes);
        Ok(Client::new(
            metered,
            connection,
            self.options,
            self.pick,
            Some(socket),
            self.holds,
        ))
    }
}

impl<P: Pick> parked::Sleeper for Dozing<P> {
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        Some(match &self.socket {
            PlainSocket::Tcp(tcp) => tcp.as_fd(),
            PlainSocket::Unix(unix) => unix.as_fd(),
        })
    }

    fn wake(self: Box<Self>) {
        // A socket that cannot join the reactor again is closed.
        if let Ok(client) = self.into_client() {
            tokio::spawn(serve_http(client));
        }
    }
}

/// Puts an idle client's connection to sleep with no task (`parked`), or
/// gives it back to wait with its own if it cannot sleep so.
fn sleep<P: Pick>(mut client: Client<P>) -> Option<Client<P>> {
    match client.io.poll_without_waiting() {
        // It sent something meanwhile, or left.
        std::task::Poll::Ready(true) => return Some(client),
        std::task::Poll::Ready(false) => return None,
        std::task::Poll::Pending => {}
    }
    let expires = client.connection.expires(client.options.keep_alive);
    if client.can_doze() {
        let dozing = Dozing::of(client)?;
        parked::park(Box::new(dozing), expires)
            .err()
            .and_then(|dozing| dozing.into_client().ok())
    } else {
        parked::park(Box::new(client), expires)
            .err()
            .map(|client| *client)
    }
}

/// Serves a client's requests. Between two requests, once the client has
/// been idle for a while, the connection is taken back from hyper, which
/// holds a read and a write buffer of 8 KiB each, and sleeps with no task
/// (`parked`) until the client sends its next bytes; a new hyper
/// connection serves what comes (pipelined bytes hyper had read go to it
/// first). A new connection is idle until its first bytes come.
async fn serve_http(mut client: Client<impl Pick>) {
    let activity = client.connection.activity.clone();
    // How long the connection waits with its task before it sleeps: as
    // long as hyper would before it is taken back, none once it was.
    let mut quiet_after = Some(upstream::IDLE_LIMIT);
    loop {
        let keep_alive = client.options.keep_alive;
        match client
            .connection
            .waited(&mut client.io, keep_alive, quiet_after)
            .await
        {
            Waited::Sent => {}
            Waited::Gone => return,
            Waited::Quiet => match sleep(client) {
                Some(awake) => {
                    // It cannot sleep without its task: it waits with it.
                    client = awake;
                    quiet_after = None;
                    continue;
                }
                None => return,
            },
        }
        let served_from = activity.now();
        // Boxed: inline, hyper's connection would make the future of every
        // client's task as large.
        let mut serving = Box::new(
            http1(&client.options)
                .serve_connection(
                    TokioIo::new(client.io),
                    service(client.connection.clone(), client.pick.clone()),
                )
                .with_upgrades(),
        );
        let mut lull = Some(served_from);
        let mut ticks = IdleTicks::new(keep_alive);
        let served = loop {
            let served = std::future::poll_fn(|cx| {
                if let Poll::Ready(served) = std::pin::Pin::new(&mut *serving).poll(cx) {
                    return Poll::Ready(Some(served));
                }
                ticks.poll_tick(cx).map(|()| None)
            })
            .await;
            if let Some(served) = served {
                break served;
            }
            match client.connection.lapse(keep_alive, lull) {
                None => {}
                Some(Lapse::Expired) => return,
                Some(Lapse::Lull) => {
                    activity.parking.store(true, Ordering::Release);
                    std::pin::Pin::new(&mut *serving).graceful_shutdown();
                    lull = None;
                }
            }
        };
        // Else hyper is done: the client closed, broke HTTP, asked to close,
        // or was upgraded (a WebSocket lives on in its own task).
        if !activity.parking.swap(false, Ordering::AcqRel) || served.is_err() {
            return;
        }
        let Some(parts) = serving.into_parts() else {
            return;
        };
        client.io = parts.io.into_inner();
        client.io.read_ahead(&parts.read_buf);
        quiet_after = Some(std::time::Duration::ZERO);
    }
}

/// When a served connection's `lapse` is looked at: once a second (or each
/// `keep_alive`, if shorter), one timer per connection (hyper's own head
/// timeout armed one per request, and woke the runtime's driver through a
/// syscall for some of them).
struct IdleTicks {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    every: std::time::Duration,
    /// The timer holds the task's waker for its deadline.
    armed: bool,
}

impl IdleTicks {
    fn new(keep_alive: std::time::Duration) -> IdleTicks {
        let every = if keep_alive.is_zero() {
            upstream::IDLE_LIMIT
        } else {
            upstream::IDLE_LIMIT.min(keep_alive)
        };
        IdleTicks {
            sleep: Box::pin(tokio::time::sleep(every)),
            every,
            armed: false,
        }
    }

    /// Ready once a tick, the next one counted from then. The connection's
    /// task wakes for each of its client's and its instance's reads; the
    /// timer is polled only once it has fired, since each poll registers
    /// the task's waker with it anew (a few per request), and a task's
    /// waker stays the same.
    fn poll_tick(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.armed && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Pending => {
                self.armed = true;
                Poll::Pending
            }
            Poll::Ready(()) => {
                // Fired, the timer let go of the waker: polled again next time.
                self.armed = false;
                let next = tokio::time::Instant::now() + self.every;
                self.sleep.as_mut().reset(next);
                Poll::Ready(())
            }
        }
    }
}

/// The service of a client's connection: each request is `forward`ed.
fn service(
    connection: Arc<Connection>,
    pick: impl Pick,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Answer>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Answer>, std::convert::Infallible>> + Send,
> + Send
+ Unpin
+ 'static {
    // The request's future is `forward`'s own: each async layer around it
    // would keep its own copy of the request, and hyper moves the whole
    // future as it takes it (measured: 2.7 KB copied twice per request).
    hyper::service::service_fn(move |request: Request<Incoming>| {
        forward(request, connection.clone(), pick.clone())
    })
}

/// hyper's HTTP/1 server, set up for the proxy.
fn http1(options: &Options) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Head and body copied into one buffer and written with one write()
    // cost less than a writev() of the pieces: measured ~4 % of the
    // daemon's CPU per proxied request.
    builder.writev(false);
    // hyper lowercases header names; it keeps the client's spelling (which
    // the upstream connection then writes) only when asked to. A connector
    // gets them lowercased whatever the client wrote. Responses go out with
    // Title-Case names, whatever the instance wrote (decision 16).
    builder.preserve_header_case(!options.lowercase_headers && !options.connector);
    builder.title_case_headers(true);
    // A head larger than this is answered 431 as soon as it is: hyper's
    // default (~400 KB) let each unfinished head hold that much.
    builder.max_buf_size(MAX_HEAD);
    builder
}

/// The most a client's request head (its line and headers) may take;
/// nginx's default `large_client_header_buffers` allow 4 × 8 KiB per line.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// A request id unique within this daemon's life.
fn trace_id() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        started,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where a request comes from: its connection's peer, or the client a
/// trusted proxy in front names (`TrustedProxies::origin`).
fn origin(request: &Request<Incoming>, peer: Option<IpAddr>, options: &Options) -> Origin {
    let headers = request.headers();
    options.proxies.origin(
        peer,
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(HeaderValue::as_bytes),
        // The last one: a proxy that adds its own leaves a client's before it.
        headers
            .get_all(&X_REAL_IP)
            .iter()
            .next_back()
            .map(HeaderValue::as_bytes),
    )
}

/// Vanguard's verdict on a request: a permit, or the refusal with the
/// `ban_response` to send.
fn gate(
    request: &Request<Incoming>,
    client: Option<IpAddr>,
    options: &Options,
) -> Result<Permit, (Refusal, String)> {
    let (Some(guard), Some(ip)) = (&options.vanguard, client) else {
        return Ok(Permit::unguarded());
    };
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    guard
        .0
        .admit_request(ip, target)
        .map_err(|refusal| (refusal, guard.0.rules.ban_response.value.clone()))
}

fn refused(refusal: Refusal, ban_response: String) -> Response<Body> {
    match refusal {
        Refusal::Forbidden => text(StatusCode::FORBIDDEN, ban_response),
        Refusal::TooMany { retry_after } => {
            let mut response = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests\n".to_owned(),
            );
            if let Ok(seconds) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                response
                    .headers_mut()
                    .insert(hyper::header::RETRY_AFTER, seconds);
            }
            response
        }
    }
}

/// The header that carries a verified client certificate's subject (RFC 4514).
const CLIENT_SUBJECT: HeaderName = HeaderName::from_static("x-client-cert-subject");
// Names made once: a name given as a string is parsed again on every use.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Serves one request: Vanguard's verdict, the instance, the forwarded
/// headers, and the instance's answer, which keeps the connection from
/// being idle until its body is through.
async fn forward(
    mut request: Request<Incoming>,
    connection: Arc<Connection>,
    pick: impl Fn(Option<SocketAddr>) -> (Chosen, Arc<Options>),
) -> Result<Response<Answer>, std::convert::Infallible> {
    let mut answering = Answering::start(connection);
    let connection = answering.0.clone();
    let connection = &*connection;
    // The head is parsed: hyper holds it no more.
    connection.held.passed_on();
    if crate::traffic::held::nearly_spent() {
        let mut busy = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy holds as much for its clients as it may; try again later\n".to_owned(),
        );
        busy.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(answering.with(busy));
    }
    let kept = connection.upstream.lock().expect("upstream").backend();
    let (chosen, options) = pick(kept);
    let origin = origin(&request, connection.client, &options);
    let _permit = match gate(&request, origin.client, &options) {
        Ok(permit) => permit,
        Err((refusal, ban_response)) => return Ok(answering.with(refused(refusal, ban_response))),
    };
    let (client, tls, worker) = (
        origin.client,
        connection.tls.as_ref(),
        connection.stats.worker.as_str(),
    );
    // A tunnel to wherever the client names is a forward proxy's job, not
    // an app's; a `tcp://` listener carries raw connections to instances.
    // The connection closes with the refusal: a client may already be
    // sending the tunnel's bytes, which are no requests.
    if request.method() == hyper::Method::CONNECT {
        let mut refusal = text(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not forwarded: apm is a reverse proxy\n".to_owned(),
        );
        refusal
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(answering.with(refusal));
    }
    if let Some(fault) = host_fault(&request) {
        let refusal = text(StatusCode::BAD_REQUEST, format!("{fault}\n"));
        return Ok(answering.with(refusal));
    }
    let Some((backend, in_flight)) = chosen else {
        let unavailable = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no instance of {worker} is running\n"),
        );
        return Ok(answering.with(unavailable));
    };
    // Held until the answer is through: the instance is not signalled before.
    let in_flight = answering.1.insert(in_flight);
    let traced = prepare(&mut request, connection, &origin, &options);
    let request = request.map(|body| ClientBody::new(body, &connection.activity, &connection.held));
    let mut response = match backend {
        Backend::Port(backend, _) => {
            upstream::to_port(request, &connection.upstream, worker, backend, in_flight).await
        }
        // Boxed: inline, a session's future (kilobytes) would be part of
        // every request's future, which hyper moves as it takes it.
        Backend::Connector(link) => {
            Box::pin(crate::traffic::session::http(
                request,
                link,
                Secure::head("http", client, tls),
                options.keep_alive,
                in_flight,
                |protocol| handoff(&connection.routes, &options, worker, protocol),
            ))
            .await
        }
    };
    // The instance (or the connector session) failed because the client's
    // body did: the answer is the client's error, and the connection,
    // whose framing is lost, closes.
    if connection
        .activity
        .body_failed
        .swap(false, Ordering::AcqRel)
    {
        response = text(
            StatusCode::BAD_REQUEST,
            "the request body is malformed (its chunked framing is broken)\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(trace) = traced {
        trace.log(worker, client, response.status());
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    Ok(answering.with(response))
}

/// Hop-by-hop fields (RFC 9110, 7.6.1) speak of one connection, the
/// client's to apm or apm's to the instance, so neither side's reach the
/// other: `Connection` and the fields it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE` (but for `trailers`) and `Upgrade`. A client's
/// `Connection: close` thus ends its own connection, not the pooled one to
/// the instance, and an instance's ends its own, not the client's. An
/// upgrade keeps `Upgrade` and `Connection: upgrade`, which the other side
/// needs to switch. `Host` stays whatever `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let hop_by_hop = [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, UPGRADE];
    if !headers.keys().any(|name| hop_by_hop.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| *name != hyper::header::HOST)
        .collect();
    let trailers = lists_token(headers, TE, "trailers");
    let upgrade = upgrading.then(|| headers.get(UPGRADE).cloned()).flatten();
    for name in named.iter().chain(&hop_by_hop) {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(UPGRADE, protocol);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// What makes a request's host ambiguous, if anything (RFC 9112, 3.2): an
/// HTTP/1.1 request carries exactly one `Host`, naming a host and maybe a
/// port; a proxy and an app that each picked a different host of one
/// request would route, log or cache it apart. A target in absolute form
/// names the host itself, without user information (RFC 9110, 4.2.4).
fn host_fault(request: &Request<Incoming>) -> Option<&'static str> {
    if request
        .uri()
        .authority()
        .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Some("the request target carries user information (user@host)");
    }
    let mut hosts = request.headers().get_all(hyper::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if request.version() >= hyper::Version::HTTP_11 => {
            Some("an HTTP/1.1 request needs a Host header")
        }
        (Some(_), Some(_)) => Some("more than one Host header"),
        (Some(host), None) if !names_a_host(host.as_bytes()) => {
            Some("the Host header is not a host with an optional port")
        }
        _ => None,
    }
}

/// `uri-host [ ":" port ]` (RFC 9110, 7.2), or empty, as a client sends
/// for a target without a host.
fn names_a_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    if value.contains(&b'@') || hyper::http::uri::Authority::try_from(value).is_err() {
        return false;
    }
    // After an IPv6 literal's `]`, or else from the one colon on.
    let after_host = match value.iter().rposition(|&b| b == b']') {
        Some(end) => &value[end + 1..],
        None => value
            .iter()
            .position(|&b| b == b':')
            .map_or(&[][..], |colon| &value[colon..]),
    };
    match after_host.split_first() {
        None => true,
        Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// Drops a request's hop-by-hop fields and sets the forwarded ones; with
/// `trace_header`, also what the worker's log will say of it.
fn prepare(
    request: &mut Request<Incoming>,
    connection: &Connection,
    origin: &Origin,
    options: &Options,
) -> Option<Trace> {
    let tls = connection.tls.as_ref();
    let tracing = options.tracing.as_ref();
    let mut traced = tracing.map(|tracing| Trace {
        log: tracing.log.clone(),
        time_format: tracing.time_format.clone(),
        id: String::new(),
        method: request.method().clone(),
        path: request.uri().path().to_owned(),
        started: std::time::Instant::now(),
    });
    let request_authority = request
        .uri()
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
    // Before apm adds its own fields: a client naming them in `Connection`
    // cannot take them away.
    let upgrading = request.headers().contains_key(UPGRADE)
        && lists_token(request.headers(), CONNECTION, "upgrade");
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, upgrading);
    // The instance hears what Vanguard judged: the hops a trusted proxy
    // vouched for, from the client on, then the peer; a client's own claims
    // are never passed on.
    let forwarded_for = match origin.hops.as_slice() {
        // A unix socket client has no address to report.
        [] => connection.client_value.clone(),
        hops => {
            let chain: Vec<String> = hops
                .iter()
                .chain(&connection.client)
                .map(IpAddr::to_string)
                .collect();
            HeaderValue::from_str(&chain.join(", ")).ok()
        }
    };
    match forwarded_for {
        Some(value) => headers.insert(X_FORWARDED_FOR, value),
        None => headers.remove(X_FORWARDED_FOR),
    };
    let real_ip = origin.hops.first().map(|client| client.to_string());
    match real_ip.and_then(|client| HeaderValue::from_str(&client).ok()) {
        Some(value) => headers.insert(X_REAL_IP, value),
        None => headers.remove(X_REAL_IP),
    };
    // Only the handshake may say who the client is, never the client itself.
    match tls.and_then(|tls| tls.client_subject.clone()) {
        Some(subject) => headers.insert(CLIENT_SUBJECT, subject),
        None => headers.remove(CLIENT_SUBJECT),
    };
    // With `trace_header`, each request keeps the id it came with or gets
    // one, and the worker's log gets a line that carries it.
    if let (Some(tracing), Some(trace)) = (tracing, traced.as_mut()) {
        let name = &tracing.header;
        if !headers.contains_key(name)
            && let Ok(id) = HeaderValue::from_str(&trace_id())
        {
            headers.insert(name.clone(), id);
        }
        if let Some(id) = headers.get(name) {
            trace.id = String::from_utf8_lossy(id.as_bytes()).into_owned();
        }
    }
    // A request target in absolute form names the host itself, and it wins
    // over the Host header (RFC 9112, 3.2.2): the instance sees that host.
    if let Some(host) = request_authority {
        headers.insert(hyper::header::HOST, host);
    }
    let proto = if tls.is_some() { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = headers.get(hyper::header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST, host);
    }
    traced
}

/// What the worker's log says about a traced request. The query string is
/// left out: it often carries tokens.
struct Trace {
    log: crate::observe::logs::Sinks,
    time_format: Option<Arc<str>>,
    id: String,
    method: hyper::Method,
    path: String,
    started: std::time::Instant,
}

impl Trace {
    /// Appends a line in the format of the instances' lines, from `apm`
    /// (on stdout's stream, so `apm log` shows it with the app's).
    fn log(self, worker: &str, client: Option<IpAddr>, status: StatusCode) {
        let client = client.map_or_else(|| "unix".to_owned(), |ip| ip.to_string());
        let line = format!(
            "{worker} {} {client} {} {} -> {} in {:.1} ms\n",
            self.id,
            self.method,
            self.path,
            status.as_u16(),
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        self.log.append(
            "apm",
            self.time_format.as_deref(),
            crate::observe::logstyle::Stream::Out,
            line.as_bytes(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_counted_in_flight_as_it_is_chosen_its_client_keeping_it_while_listed() {
        let instance = |port| {
            let in_flight = Arc::new(InFlight::default());
            (
                Backend::Port(([127, 0, 0, 1], port).into(), in_flight.clone()),
                in_flight,
            )
        };
        let ((first, first_count), (second, second_count)) = (instance(1), instance(2));
        let route = Route {
            backends: vec![first.clone(), second.clone()],
            options: Arc::default(),
        };
        let next = AtomicUsize::new(0);
        let port = |chosen: &Chosen| match chosen {
            Some((Backend::Port(address, _), _)) => address.port(),
            other => panic!("{other:?}"),
        };
        let a = choose(&route, None, &next);
        let b = choose(&route, None, &next);
        assert_eq!((port(&a), port(&b)), (1, 2), "in turn");
        assert_eq!((first_count.count(), second_count.count()), (1, 1));
        let kept = choose(&route, Some(([127, 0, 0, 1], 2).into()), &next);
        assert_eq!(port(&kept), 2, "a keep-alive client keeps its instance");
        assert_eq!(second_count.count(), 2);
        let gone = choose(&route, Some(([127, 0, 0, 1], 3).into()), &next);
        assert_eq!(port(&gone), 1, "one no longer listed: the next in turn");
        drop((a, b, kept, gone));
        assert_eq!((first_count.count(), second_count.count()), (0, 0));
        assert!(choose(&Route::default(), None, &next).is_none());
    }

    #[test]
    fn a_client_connections_future_holds_no_hyper_connection() {
        let (near, _far) = tokio::io::duplex(1);
        let (_, routes) = watch::channel(Route::default());
        let stats = traffic_stats::register("w".into(), "http://127.0.0.1:1".into());
        let connection = Connection::new(None, None, stats, Held::new(), routes.clone());
        let pick = move |_: Option<SocketAddr>| (None, routes.borrow().options.clone());
        let slot = Arc::new(tokio::sync::Semaphore::new(1));
        let holds = (slot.try_acquire_owned().expect("free"), Default::default());
        let client = Client::new(
            Box::new(near),
            connection,
            Arc::default(),
            pick,
            None,
            holds,
        );
        let serving = serve_http(client);
        // hyper's connection alone is larger, and so is the connection's
        // state: each parked client's task would hold them (352 bytes in
        // a test build when written; 568 with the state inline).
        let size = std::mem::size_of_val(&serving);
        assert!(size < 512, "{size} bytes");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_a_plain_connections_layers_are_taken_apart_to_sleep() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let stats = traffic_stats::register("w".into(), "http://127.0.0.1:1".into());
        let layers = |io: Layer| -> Layer {
            let counted: Layer = Box::new(stats.connection(io));
            Box::new(Metered::new(counted, Held::new()))
        };
        let (pipe, _far) = tokio::io::duplex(1);
        let counted_only: Layer = Box::new(stats.connection(Box::new(pipe) as Layer));
        let (pipe, _far) = tokio::io::duplex(1);
        assert!(is_plain(&*layers(Box::new(socket))));
        assert!(!is_plain(&*layers(Box::new(pipe))));
        assert!(!is_plain(&*counted_only));
    }

    #[test]
    fn a_host_header_names_a_host_and_maybe_a_port() {
        for good in [
            "",
            "example.com",
            "example.com:8080",
            "example.com:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
        ] {
            assert!(names_a_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "a b",
            "a/b",
            "user@example.com",
            "example.com:80:81",
            "example.com:http",
            "[::1]x",
            "[::1",
            "example.com?x",
        ] {
            assert!(!names_a_host(bad.as_bytes()), "{bad}");
        }
    }
}
