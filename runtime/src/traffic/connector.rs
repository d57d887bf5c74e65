//! The daemon's side of the connector protocol (`docs/connector-protocol.md`):
//! a `Link` per process over the socket pair it inherited as fd 3, and the
//! sessions the proxy opens on it for HTTP requests, WebSockets and TCP
//! connections.
//!
//! The daemon never buffers more than the protocol's window per session and
//! direction: a session sends to the child only within the credit the child
//! gave, and the link refuses (and ends the child) when the child sends
//! more than the credit the daemon gave.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::traffic::inflight::Entered;

pub const PROTOCOL: u64 = 1;
/// The largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes in flight per session and direction before the peer gives credit.
pub const WINDOW: u32 = 256 * 1024;
/// The largest WebSocket message, in either direction.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Beyond this many bytes waiting for a child that does not read, its link
/// takes no new sessions: each session is bounded by its window, and this
/// bounds how many a stuck child can hold.
pub const MAX_QUEUED: usize = 16 << 20;
/// A frame's length prefix counts the kind and session fields too.
const HEADER: usize = 5;
// ---- session hand-off (feature "migrate", kinds 48–55) ----
/// The most a session's saved `session_data` may take, as JSON.
pub const SESSION_DATA_MAX: usize = 64 * 1024;
/// How often a session between instances looks for one to take it.
const SUCCESSOR_POLL: std::time::Duration = std::time::Duration::from_millis(10);
// ---- end of session hand-off ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Hello = 1,
    Ready = 2,
    Open = 16,
    Data = 17,
    Text = 18,
    More = 19,
    End = 20,
    Head = 21,
    Raw = 22,
    Close = 23,
    Credit = 24,
    // Session hand-off (feature "migrate").
    Save = 48,
    Migrate = 49,
    Handed = 50,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Ready,
            16 => Kind::Open,
            17 => Kind::Data,
            18 => Kind::Text,
            19 => Kind::More,
            20 => Kind::End,
            21 => Kind::Head,
            22 => Kind::Raw,
            23 => Kind::Close,
            24 => Kind::Credit,
            48 => Kind::Save,
            49 => Kind::Migrate,
            50 => Kind::Handed,
            _ => return None,
        })
    }

    /// Whether the payload counts against the session's window.
    fn is_flow_controlled(self) -> bool {
        matches!(self, Kind::Data | Kind::Text | Kind::More | Kind::Raw)
    }
}

fn frame(kind: Kind, session: u32, payload: &[u8]) -> Bytes {
    frame_of(kind as u8, session, payload)
}

fn frame_of(kind: u8, session: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + HEADER + payload.len());
    out.put_u32((HEADER + payload.len()) as u32);
    out.put_u8(kind);
    out.put_u32(session);
    out.put_slice(payload);
    out.freeze()
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// A child's `head`: the response's status (`x-status`) and headers, read
/// straight from its JSON: every response has one, and going through a
/// JSON map first cost an allocation per name and per value.
#[derive(Debug, Default)]
pub(crate) struct ResponseHead {
    pub status: hyper::StatusCode,
    pub headers: hyper::HeaderMap,
}

impl<'de> serde::Deserialize<'de> for ResponseHead {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(HeadVisitor)
    }
}

struct HeadVisitor;

impl<'de> serde::de::Visitor<'de> for HeadVisitor {
    type Value = ResponseHead;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of response headers")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<ResponseHead, M::Error> {
        let mut head = ResponseHead::default();
        while let Some(key) = map.next_key::<HeadKey>()? {
            match key {
                HeadKey::Status => {
                    // A string or a number; anything else is not a status.
                    let status = match map.next_value::<Value>()? {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    };
                    head.status = hyper::StatusCode::from_bytes(status.trim().as_bytes())
                        .unwrap_or(hyper::StatusCode::BAD_GATEWAY);
                }
                HeadKey::Header(name) => map.next_value_seed(AppendValues {
                    headers: &mut head.headers,
                    name,
                    nested: false,
                })?,
                // A name HTTP cannot carry is dropped, not the response.
                HeadKey::Invalid => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

enum HeadKey {
    Status,
    Header(hyper::header::HeaderName),
    Invalid,
}

impl<'de> serde::Deserialize<'de> for HeadKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = HeadKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a header name")
            }
            fn visit_str<E>(self, name: &str) -> Result<HeadKey, E> {
                Ok(if name.eq_ignore_ascii_case("x-status") {
                    HeadKey::Status
                } else {
                    hyper::header::HeaderName::from_bytes(name.as_bytes())
                        .map_or(HeadKey::Invalid, HeadKey::Header)
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Appends a header's value (a string, or an array of them for several
/// `set-cookie`) to the response's headers. A number or a boolean is taken
/// as its text; a value HTTP cannot carry is dropped.
struct AppendValues<'a> {
    headers: &'a mut hyper::HeaderMap,
    name: hyper::header::HeaderName,
    /// Inside an array, where a further array is not a header value.
    nested: bool,
}

impl AppendValues<'_> {
    fn append(&mut self, text: &str) {
        if let Ok(value) = hyper::header::HeaderValue::from_str(text) {
            self.headers.append(self.name.clone(), value);
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for AppendValues<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AppendValues<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a header value: a string or an array of strings")
    }

    fn visit_str<E>(mut self, value: &str) -> Result<(), E> {
        self.append(value);
        Ok(())
    }

    fn visit_u64<E>(mut self, value: u64) -> Result<(), E> {
        self.append(&value.to_string());
        Ok(())
    }

    fn visit_i64<E>(mut self, value: i64) -> Result<(), E> {
        self.append(&value.to_string());
        Ok(())
    }

    fn visit_f64<E>(mut self, value: f64) -> Result<(), E> {
        self.append(&value.to_string());
        Ok(())
    }

    fn visit_bool<E>(mut self, value: bool) -> Result<(), E> {
        self.append(if value { "true" } else { "false" });
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<S: serde::de::SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        if self.nested {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        while seq
            .next_element_seed(AppendValues {
                headers: &mut *self.headers,
                name: self.name.clone(),
                nested: true,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(())
    }
}

/// What the child sent on a session.
#[derive(Debug)]
enum Inbound {
    Head(ResponseHead),
    Message {
        kind: Kind,
        bytes: Bytes,
    },
    Close {
        code: u16,
        reason: String,
    },
    Credit(u32),
    /// The session's `session_data`, as JSON (`save`).
    Save(Bytes),
    /// The child let go of the session after `migrate`.
    Handed,
}

/// A frame for a session, and whether the link already holds the
/// session's next frame: sessions run on other threads than their link's,
/// and a response whose frames arrived in one read still goes out whole
/// (`ClientSide::deliver`'s `more`).
type Routed = (Inbound, bool);

struct Entry {
    tx: mpsc::UnboundedSender<Routed>,
    /// Bytes the child may still send on this session.
    allowance: u32,
    /// The daemon sent `migrate`, so the child may answer `handed`.
    migrating: bool,
}

/// The daemon's end of one process's connector channel.
pub struct Link {
    label: String,
    out: mpsc::UnboundedSender<Bytes>,
    sessions: Mutex<HashMap<u32, Entry>>,
    next_session: AtomicU32,
    ready: AtomicBool,
    /// The connector said in `ready` that it takes `end` on TCP sessions
    /// (the client's half-close); older ones get the session closed.
    half_close: AtomicBool,
    /// Bytes handed to the writer and not yet written to the child.
    queued: Arc<AtomicUsize>,
    /// The work the proxy has on this process, which a stop waits for.
    in_flight: Arc<crate::traffic::inflight::InFlight>,
    /// The connector listed "migrate" in `ready`'s features.
    migrates: AtomicBool,
    /// Set when the instance leaves rotation: its sessions that may move
    /// are handed to another instance.
    retiring: tokio::sync::watch::Sender<bool>,
    /// When the process started: sessions move to the youngest instance.
    born: std::time::Instant,
    // IPC (feature "ipc"): begin
    ipc: Ipc,
    // IPC: end
}

// IPC (feature "ipc"): begin
/// What a link takes part in of inter-worker IPC (`crate::ipc`).
pub struct IpcSettings {
    /// The worker's `listen` channels.
    pub channels: Vec<String>,
    /// The worker's `ipc_timeout`.
    pub timeout: std::time::Duration,
}

struct Ipc {
    settings: IpcSettings,
    /// Its endpoint in the router, once its `ready` listed "ipc".
    endpoint: Mutex<Option<crate::ipc::EndpointId>>,
    board: Arc<crate::ipc::Board>,
}

impl crate::ipc::Outbox for Link {
    fn deliver(&self, kind: u8, id: u32, payload: &[u8], droppable: bool) -> bool {
        if droppable && self.queued.load(Ordering::Relaxed) > crate::ipc::bounds::QUEUED {
            self.ipc.board.count_drop();
            return false;
        }
        let frame = frame_of(kind, id, payload);
        self.queued.fetch_add(frame.len(), Ordering::Relaxed);
        let _ = self.out.send(frame);
        true
    }
}

impl Link {
    /// The process's dashboard values, metrics and IPC drops.
    pub fn board(&self) -> &Arc<crate::ipc::Board> {
        &self.ipc.board
    }

    /// Joins the router when the connector's `ready` lists "ipc"; says once
    /// when the worker listens on channels its connector cannot take.
    fn ready_for_ipc(self: &Arc<Link>, features: &[&str]) {
        let settings = &self.ipc.settings;
        if features.contains(&"ipc") {
            let endpoint = crate::ipc::router().join(
                self.clone(),
                settings.channels.clone(),
                settings.timeout,
            );
            *crate::locked(&self.ipc.endpoint) = Some(endpoint);
        } else if !settings.channels.is_empty() {
            crate::log(format_args!(
                "{}: it sets `listen` but its connector lacks the \"ipc\" feature, so it gets no \
                 IPC messages; update its apm_module",
                self.label
            ));
        }
    }

    /// One IPC frame from the child.
    fn ipc_frame(&self, kind: u8, id: u32, payload: &[u8]) -> Result<(), String> {
        let Some(endpoint) = *crate::locked(&self.ipc.endpoint) else {
            return Err(format!(
                "IPC frame kind {kind} from a connector whose `ready` did not list \"ipc\""
            ));
        };
        match kind {
            crate::ipc::kind::DASH => self.ipc.board.dash(payload),
            crate::ipc::kind::METRIC => {
                self.ipc.board.metric(payload);
            }
            _ => crate::ipc::router().frame(endpoint, kind, id, payload)?,
        }
        Ok(())
    }

    /// The link ended: the router forgets it, and the other sides hear.
    fn leave_ipc(&self) {
        if let Some(endpoint) = crate::locked(&self.ipc.endpoint).take() {
            crate::ipc::router().leave(endpoint);
        }
    }
}
// IPC: end

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("label", &self.label).finish()
    }
}

impl Link {
    /// Greets the child on `channel` and serves the link until the child
    /// closes it. `label` names the instance in the daemon log; `changed`
    /// is called when the link becomes ready and when it ends. A child that
    /// breaks the protocol has its process group `pgid` killed.
    pub fn start(
        channel: std::os::unix::net::UnixStream,
        label: String,
        instance_id: usize,
        pgid: u32,
        ipc: IpcSettings,
        changed: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Arc<Link>> {
        // Served where its sessions are, off the supervisor's thread.
        let _on_a_proxy_thread = crate::traffic::threads::enter();
        channel.set_nonblocking(true)?;
        let (reader, writer) = tokio::net::UnixStream::from_std(channel)?.into_split();
        let (out, queue) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            label: label.clone(),
            out,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU32::new(1),
            ready: AtomicBool::new(false),
            half_close: AtomicBool::new(false),
            queued: Arc::default(),
            in_flight: Arc::default(),
            migrates: AtomicBool::new(false),
            retiring: tokio::sync::watch::Sender::new(false),
            born: std::time::Instant::now(),
            ipc: Ipc {
                settings: ipc,
                endpoint: Mutex::default(),
                board: Arc::default(),
            },
        });
        let hello = json!({
            "protocol": PROTOCOL,
            "worker": label.split('#').next().unwrap_or(&label),
            "instance_id": instance_id,
            "max_frame": MAX_FRAME,
            "window": WINDOW,
            "session_data_max": SESSION_DATA_MAX,
        });
        link.send(Kind::Hello, 0, hello.to_string().as_bytes());
        tokio::spawn(write_frames(writer, queue, link.queued.clone()));
        let reading = link.clone();
        let hint = tokio::spawn(hint_if_never_ready(link.clone()));
        tokio::spawn(async move {
            let read = reading.read_frames(reader, &changed).await;
            hint.abort();
            if let Err(why) = read {
                crate::log(format_args!(
                    "{}: connector protocol error: {why}; restarting it",
                    reading.label
                ));
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            reading.ready.store(false, Ordering::Release);
            reading.leave_ipc();
            // Every open session learns that its child is gone.
            reading.sessions.lock().expect("sessions").clear();
            changed();
        });
        Ok(link)
    }

    /// The child said `ready` and its channel is still open.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether a TCP client's half-close reaches the child as `end`.
    pub(crate) fn takes_half_close(&self) -> bool {
        self.half_close.load(Ordering::Acquire)
    }

    /// The proxy's work on this process.
    pub fn in_flight(&self) -> &Arc<crate::traffic::inflight::InFlight> {
        &self.in_flight
    }

    /// Whether the connector takes part in session hand-off ("migrate").
    pub fn migrates(&self) -> bool {
        self.migrates.load(Ordering::Acquire)
    }

    /// The instance leaves rotation: its sessions that may move go to
    /// another instance.
    pub fn retire(&self) {
        self.retiring.send_replace(true);
    }

    fn is_retiring(&self) -> bool {
        *self.retiring.borrow()
    }

    fn send(&self, kind: Kind, session: u32, payload: &[u8]) {
        let frame = frame(kind, session, payload);
        self.queued.fetch_add(frame.len(), Ordering::Relaxed);
        let _ = self.out.send(frame);
    }

    async fn read_frames(
        self: &Arc<Self>,
        mut reader: tokio::net::unix::OwnedReadHalf,
        changed: &(impl Fn() + Send + Sync),
    ) -> Result<(), String> {
        // Frames are cut out of one buffer, each read taking what is there.
        let mut buffer = BytesMut::with_capacity(64 * 1024);
        let mut fill = async |buffer: &mut BytesMut, wanted: usize| -> Result<bool, String> {
            while buffer.len() < wanted {
                buffer.reserve((wanted - buffer.len()).max(64 * 1024));
                match reader.read_buf(buffer).await {
                    Ok(0) if buffer.is_empty() => return Ok(false),
                    Ok(0) => return Err("the channel ended inside a frame".to_owned()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("cannot read the channel: {e}")),
                }
            }
            Ok(true)
        };
        // A session's frame is sent on once the next frame is known, so it
        // can say whether that one is the same session's.
        let mut held: Option<Held> = None;
        loop {
            if !holds_a_frame(&buffer) {
                send_held(&mut held, None);
            }
            if !fill(&mut buffer, 4).await? {
                return Ok(());
            }
            let length = u32::from_be_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
            if !(HEADER..=HEADER + MAX_FRAME).contains(&length) {
                return Err(format!(
                    "a frame of {length} bytes (the limit is {})",
                    HEADER + MAX_FRAME
                ));
            }
            fill(&mut buffer, 4 + length).await?;
            let mut body = buffer.split_to(4 + length).freeze();
            let body = body.split_off(4);
            let session = u32::from_be_bytes(body[1..5].try_into().expect("4 bytes"));
            let payload = body.slice(HEADER..);
            let for_a_session = !crate::ipc::kind::is_ipc(body[0]) && session != 0;
            send_held(&mut held, for_a_session.then_some(session));
            // IPC (feature "ipc"): begin
            if crate::ipc::kind::is_ipc(body[0]) {
                self.ipc_frame(body[0], session, &payload)?;
                continue;
            }
            // IPC: end
            let kind = Kind::from_u8(body[0]).ok_or_else(|| format!("unknown kind {}", body[0]))?;
            if kind == Kind::Ready {
                let ready: Value = serde_json::from_slice(&payload)
                    .map_err(|e| format!("`ready` is not JSON: {e}"))?;
                let version = ready.get("protocol").and_then(Value::as_u64);
                if version != Some(PROTOCOL) {
                    return Err(format!(
                        "the connector speaks protocol {}, apm speaks {PROTOCOL}",
                        version.map_or_else(|| "?".to_owned(), |v| v.to_string())
                    ));
                }
                let half_close = ready.get("half_close").and_then(Value::as_bool);
                self.half_close
                    .store(half_close == Some(true), Ordering::Release);
                let features: Vec<&str> = ready
                    .get("features")
                    .and_then(Value::as_array)
                    .map(|f| f.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                self.migrates
                    .store(features.contains(&"migrate"), Ordering::Release);
                self.ready_for_ipc(&features);
                self.ready.store(true, Ordering::Release);
                changed();
                continue;
            }
            if session == 0 {
                return Err(format!("{kind:?} on the channel instead of a session"));
            }
            let size = payload.len();
            let inbound = match kind {
                Kind::Head => Inbound::Head(
                    serde_json::from_slice(&payload)
                        .map_err(|e| format!("`head` is not a JSON object: {e}"))?,
                ),
                Kind::Data | Kind::Text | Kind::More | Kind::Raw => Inbound::Message {
                    kind,
                    bytes: payload,
                },
                Kind::Close => {
                    let (code, reason) = match payload.len() {
                        0 => (0, String::new()),
                        1 => return Err("a `close` of one byte".to_owned()),
                        _ => (
                            u16::from_be_bytes([payload[0], payload[1]]),
                            String::from_utf8_lossy(&payload[2..]).into_owned(),
                        ),
                    };
                    Inbound::Close { code, reason }
                }
                Kind::Credit => Inbound::Credit(u32::from_be_bytes(
                    payload[..]
                        .try_into()
                        .map_err(|_| "a `credit` that is not 4 bytes".to_owned())?,
                )),
                Kind::Save => {
                    if payload.len() > SESSION_DATA_MAX {
                        return Err(format!(
                            "session {session}: a `save` of {} bytes (the limit is {SESSION_DATA_MAX})",
                            payload.len()
                        ));
                    }
                    serde_json::from_slice::<serde::de::IgnoredAny>(&payload)
                        .map_err(|e| format!("session {session}: `save` is not JSON: {e}"))?;
                    Inbound::Save(payload)
                }
                Kind::Handed => Inbound::Handed,
                Kind::Hello | Kind::Ready | Kind::Open | Kind::End | Kind::Migrate => {
                    return Err(format!("{kind:?} is not for the child to send"));
                }
            };
            let mut sessions = self.sessions.lock().expect("sessions");
            // Frames for a session that ended may cross our `close`.
            let Some(entry) = sessions.get_mut(&session) else {
                continue;
            };
            if kind.is_flow_controlled() {
                entry.allowance = entry
                    .allowance
                    .checked_sub(size as u32)
                    .ok_or_else(|| format!("session {session}: data beyond the window"))?;
            }
            if kind == Kind::Handed && !entry.migrating {
                return Err(format!("session {session}: `handed` without `migrate`"));
            }
            let closing = matches!(inbound, Inbound::Close { .. } | Inbound::Handed);
            held = Some((session, entry.tx.clone(), inbound));
            if closing {
                sessions.remove(&session);
            }
        }
    }

    /// Opens a session with the given head, unless the child is too far
    /// behind to take one.
    fn open(self: &Arc<Link>, head: &[u8]) -> Option<Session> {
        if self.queued.load(Ordering::Relaxed) > MAX_QUEUED {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sessions = self.sessions.lock().expect("sessions");
        let id = loop {
            let id = self.next_session.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !sessions.contains_key(&id) {
                break id;
            }
        };
        sessions.insert(
            id,
            Entry {
                tx,
                allowance: WINDOW,
                migrating: false,
            },
        );
        drop(sessions);
        self.send(Kind::Open, id, head);
        Some(Session {
            id,
            link: self.clone(),
            rx,
            credit: WINDOW,
            open: true,
        })
    }
}

/// A session's frame the link read, not yet sent on: the session, where
/// to, the frame.
type Held = (u32, mpsc::UnboundedSender<Routed>, Inbound);

/// Sends the held frame on, saying whether the `next` frame read is for the
/// same session.
fn send_held(held: &mut Option<Held>, next: Option<u32>) {
    if let Some((id, tx, inbound)) = held.take() {
        let _ = tx.send((inbound, next == Some(id)));
    }
}

/// Whether `buffer` starts with a whole frame, so that reading it needs no
/// wait on the channel.
fn holds_a_frame(buffer: &[u8]) -> bool {
    buffer.len() >= 4
        && buffer.len() - 4 >= u32::from_be_bytes(buffer[..4].try_into().expect("4 bytes")) as usize
}

/// How long a process may run without its connector saying `ready` before
/// the daemon log suggests why.
const READY_HINT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// An app that listens on a port itself (the usual mistake after moving from
/// PM2) runs fine but never says `ready`, so it gets no traffic: say so once.
async fn hint_if_never_ready(link: Arc<Link>) {
    tokio::time::sleep(READY_HINT_AFTER).await;
    if !link.is_ready() {
        crate::log(format_args!(
            "{}: its connector has not said `ready` after {} s, so it gets no traffic; \
             an app that listens on a port itself needs `upstream port;`",
            link.label,
            READY_HINT_AFTER.as_secs()
        ));
    }
}

async fn write_frames(
    writer: tokio::net::unix::OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    let mut writer = tokio::io::BufWriter::with_capacity(64 * 1024, writer);
    while let Some(frame) = queue.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
        queued.fetch_sub(frame.len(), Ordering::Relaxed);
        // Frames queued meanwhile go out in the same write.
        if queue.is_empty() && writer.flush().await.is_err() {
            return;
        }
    }
}

/// One session on a link; dropping it ends the session.
struct Session {
    id: u32,
    link: Arc<Link>,
    rx: mpsc::UnboundedReceiver<Routed>,
    /// Bytes the daemon may still send to the child on this session.
    credit: u32,
    open: bool,
}

impl Session {
    fn send(&self, kind: Kind, payload: &[u8]) {
        self.link.send(kind, self.id, payload);
    }

    /// Lets the child send `bytes` more, after they left the daemon.
    fn consumed(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut sessions = self.link.sessions.lock().expect("sessions");
        if let Some(entry) = sessions.get_mut(&self.id) {
            entry.allowance = entry.allowance.saturating_add(bytes as u32);
            drop(sessions);
            self.send(Kind::Credit, &(bytes as u32).to_be_bytes());
        }
    }

    fn close(&mut self, code: u16, reason: &str) {
        if std::mem::take(&mut self.open) {
            self.send(Kind::Close, &close_payload(code, reason));
        }
    }

    /// Asks the child to let go of the session (`migrate`).
    fn migrate(&self) {
        if let Some(entry) = self
            .link
            .sessions
            .lock()
            .expect("sessions")
            .get_mut(&self.id)
        {
            entry.migrating = true;
        }
        self.send(Kind::Migrate, &[]);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close(0, "");
        self.link
            .sessions
            .lock()
            .expect("sessions")
            .remove(&self.id);
    }
}

/// What the client side of a session produced.
pub(crate) enum FromClient {
    Message {
        text: bool,
        bytes: Bytes,
    },
    /// The HTTP request body is complete, or a TCP client finished
    /// sending (half-close) and waits for the rest of the answer.
    End,
    Closed {
        code: u16,
        reason: String,
    },
}

/// What the child sent, for the client side to deliver.
pub(crate) enum ToClient {
    Head(ResponseHead),
    Message {
        text: bool,
        bytes: Bytes,
    },
    Raw(Bytes),
    Close {
        code: u16,
        reason: String,
    },
    /// The child's channel closed (it exited or broke the protocol).
    Gone,
    /// The child is too far behind reading its channel to take a session.
    Busy,
}

/// The client's end of a session: an HTTP exchange, a WebSocket or a TCP
/// connection. `next` must be cancel-safe.
pub(crate) trait ClientSide {
    async fn next(&mut self) -> FromClient;
    /// Delivers what the child sent; an error means the client is gone.
    /// `more` says that further frames of the child are already queued, so
    /// a client side may gather them into one write.
    async fn deliver(&mut self, message: ToClient, more: bool) -> Result<(), ()>;
}

// ---- session hand-off (feature "migrate") ----
/// Where a session's instance finds the instances that could take it.
pub(crate) trait Successors: Send + Sync {
    /// The worker's instances that get traffic now.
    fn candidates(&self) -> Vec<Arc<Link>>;
}

/// What a WebSocket or TCP session of a `session_persist` worker needs to
/// move when its instance leaves rotation.
pub(crate) struct Handoff {
    pub successors: Arc<dyn Successors>,
    /// `session_wait`: the most a session spends between instances.
    pub wait: std::time::Duration,
    /// For the daemon log.
    pub worker: String,
    pub protocol: &'static str,
}

impl Handoff {
    /// The youngest instance that takes hand-offs, other than `leaving`,
    /// with the session counted in flight on it. Seen not to be retiring
    /// once more after it is counted: the supervisor retires an instance
    /// before it waits for its count to fall to zero, so either the count
    /// holds it or the session does not go there.
    fn successor(&self, leaving: &Arc<Link>) -> Option<(Arc<Link>, Entered)> {
        let link = self
            .successors
            .candidates()
            .into_iter()
            .filter(|link| {
                !Arc::ptr_eq(link, leaving)
                    && link.is_ready()
                    && link.migrates()
                    && !link.is_retiring()
            })
            .max_by_key(|link| link.born)?;
        let in_flight = link.in_flight.enter();
        (!link.is_retiring()).then_some((link, in_flight))
    }

    /// Opens the session on another instance, with its saved data, once
    /// one takes it before `deadline`.
    async fn take_over(
        &self,
        leaving: &Arc<Link>,
        head: &[u8],
        saved: Option<&Bytes>,
        deadline: tokio::time::Instant,
    ) -> Option<(Arc<Link>, Session, Entered)> {
        let head = migrated_head(head, saved);
        loop {
            if let Some((link, in_flight)) = self.successor(leaving)
                && let Some(session) = link.open(&head)
            {
                return Some((link, session, in_flight));
            }
            if tokio::time::Instant::now() + SUCCESSOR_POLL > deadline {
                return None;
            }
            tokio::time::sleep(SUCCESSOR_POLL).await;
        }
    }
}

/// A session's head as the instance that takes it over sees it: marked
/// migrated, with the `session_data` it last saved.
fn migrated_head(head: &[u8], saved: Option<&Bytes>) -> Vec<u8> {
    let mut fields: serde_json::Map<String, Value> =
        serde_json::from_slice(head).expect("the daemon's own head is a JSON object");
    fields.insert("migrated".to_owned(), Value::Bool(true));
    if let Some(saved) = saved {
        // Checked to be JSON when it arrived.
        let data = serde_json::from_slice(saved).unwrap_or(Value::Null);
        fields.insert("session_data".to_owned(), data);
    }
    serde_json::to_vec(&fields).expect("a JSON map serializes")
}

/// `apm check`'s notes on `session_persist`: it moves connector sessions
/// only, so a worker that sets it with `upstream port` has its spliced
/// WebSockets and TCP connections drained instead.
pub fn persist_notes(config: &apm_compiler::ir::Config) -> Vec<String> {
    config
        .workers
        .iter()
        .filter(|spec| spec.session_persist.value && spec.upstream.value == "port")
        .map(|spec| {
            format!(
                "{} sets `session_persist` with `upstream port`: sessions move between instances \
                 only through a connector (`upstream connector`); its spliced WebSockets and TCP \
                 connections are drained instead (waited for, up to `kill_timeout`, before an \
                 instance is stopped)",
                spec.label()
            )
        })
        .collect()
}

/// A time that never comes, for a select branch that is off.
fn never() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}
// ---- end of session hand-off ----

/// Carries a session both ways until either side closes it. `in_flight`
/// counts the session on its instance, which is not signalled while it
/// runs (bounded); with `handoff`, the session moves to another instance
/// when its own leaves rotation, and takes the count along.
pub(crate) async fn pump(
    link: &Arc<Link>,
    head: &[u8],
    mut client: impl ClientSide,
    mut in_flight: Option<Entered>,
    handoff: Option<Handoff>,
) {
    let mut link = link.clone();
    let Some(mut session) = link.open(head) else {
        let _ = client.deliver(ToClient::Busy, false).await;
        return;
    };
    let fragment = MAX_FRAME.min(WINDOW as usize);
    // Frames waiting for credit; the client is not read while any wait.
    let mut pending: VecDeque<(Kind, Bytes)> = VecDeque::new();
    // A child's message arriving in `more` fragments.
    let mut partial = BytesMut::new();
    // The session's `session_data`, as the child last saved it.
    let mut saved: Option<Bytes> = None;
    let mut retiring = link.retiring.subscribe();
    // While the session leaves its instance: until when it may take.
    let mut leaving: Option<tokio::time::Instant> = None;
    let mut migrate_sent = false;
    loop {
        while let Some((kind, bytes)) = pending.front() {
            if bytes.len() > session.credit as usize {
                break;
            }
            session.credit -= bytes.len() as u32;
            session.send(*kind, bytes);
            pending.pop_front();
        }
        // Everything read from the client has gone to the child: it may let go.
        if leaving.is_some() && !migrate_sent && pending.is_empty() {
            session.migrate();
            migrate_sent = true;
        }
        let may_leave = leaving.is_none() && handoff.is_some() && link.migrates();
        let moving = tokio::select! {
            inbound = session.rx.recv() => {
                let (inbound, follows) = match inbound {
                    Some(routed) => routed,
                    // A child that dies while letting go: the session moves
                    // with what it last saved.
                    None if leaving.is_some() => (Inbound::Handed, false),
                    None => {
                        session.open = false;
                        let _ = client.deliver(ToClient::Gone, false).await;
                        return;
                    }
                };
                let more = follows || !session.rx.is_empty();
                let delivery = match inbound {
                    Inbound::Credit(bytes) => {
                        session.credit = session.credit.saturating_add(bytes);
                        continue;
                    }
                    Inbound::Save(data) => {
                        saved = Some(data);
                        continue;
                    }
                    Inbound::Handed => {
                        session.open = false;
                        Ok(true)
                    }
                    Inbound::Head(head) => {
                        client.deliver(ToClient::Head(head), more).await.map(|()| false)
                    }
                    Inbound::Message { kind: Kind::More, bytes } => {
                        if partial.len() + bytes.len() > MAX_MESSAGE {
                            session.close(1009, "message too big");
                            let _ = client.deliver(ToClient::Close { code: 1009, reason: String::new() }, false).await;
                            return;
                        }
                        partial.extend_from_slice(&bytes);
                        session.consumed(bytes.len());
                        continue;
                    }
                    Inbound::Message { kind, bytes } => {
                        let size = bytes.len();
                        let message = if partial.is_empty() {
                            bytes
                        } else {
                            partial.extend_from_slice(&bytes);
                            partial.split().freeze()
                        };
                        let delivered = client.deliver(match kind {
                            Kind::Raw => ToClient::Raw(message),
                            _ => ToClient::Message { text: kind == Kind::Text, bytes: message },
                        }, more).await;
                        session.consumed(size);
                        delivered.map(|()| false)
                    }
                    Inbound::Close { code, reason } => {
                        session.open = false;
                        let _ = client.deliver(ToClient::Close { code, reason }, false).await;
                        return;
                    }
                };
                match delivery {
                    Ok(moving) => moving,
                    Err(()) => {
                        session.close(1006, "");
                        return;
                    }
                }
            }
            from_client = client.next(), if pending.is_empty() && leaving.is_none() => {
                match from_client {
                    FromClient::Message { text, bytes } => {
                        let last = if text { Kind::Text } else { Kind::Data };
                        let mut rest = bytes;
                        while rest.len() > fragment {
                            pending.push_back((Kind::More, rest.split_to(fragment)));
                        }
                        pending.push_back((last, rest));
                    }
                    FromClient::End => session.send(Kind::End, &[]),
                    FromClient::Closed { code, reason } => {
                        session.close(code, &reason);
                        return;
                    }
                }
                false
            }
            Ok(()) = async { retiring.wait_for(|retiring| *retiring).await.map(drop) }, if may_leave => {
                let wait = handoff.as_ref().map_or_else(Default::default, |h| h.wait);
                leaving = Some(tokio::time::Instant::now() + wait);
                false
            }
            () = tokio::time::sleep_until(leaving.unwrap_or_else(never)), if leaving.is_some() => {
                let handoff = handoff.as_ref().expect("only a session with a handoff leaves");
                expired(handoff, &link, "its instance to let go of it");
                session.close(1012, "service restart");
                let _ = client.deliver(ToClient::Close { code: 1012, reason: "service restart".to_owned() }, false).await;
                return;
            }
        };
        if !moving {
            continue;
        }
        // Only a leaving session (with a handoff) moves.
        let (Some(handoff), Some(deadline)) = (&handoff, leaving) else {
            let _ = client.deliver(ToClient::Gone, false).await;
            return;
        };
        match handoff
            .take_over(&link, head, saved.as_ref(), deadline)
            .await
        {
            Some((successor, moved, counted)) => {
                // The old instance's count goes with the old session.
                in_flight = in_flight.map(|_| counted);
                retiring = successor.retiring.subscribe();
                session = moved;
                link = successor;
                partial.clear();
                leaving = None;
                migrate_sent = false;
            }
            None => {
                expired(handoff, &link, "another instance to take it");
                let _ = client
                    .deliver(
                        ToClient::Close {
                            code: 1012,
                            reason: "service restart".to_owned(),
                        },
                        false,
                    )
                    .await;
                return;
            }
        }
    }
}

/// The daemon log's line for a session that `session_wait` ran out on.
fn expired(handoff: &Handoff, link: &Link, waited_for: &str) {
    let kind = if handoff.protocol == "ws" {
        "a WebSocket"
    } else {
        "a TCP connection"
    };
    let closed = if handoff.protocol == "ws" {
        "closed it with 1012"
    } else {
        "closed it"
    };
    crate::log(format_args!(
        "{}: {kind} of {} waited session_wait ({} ms) for {waited_for}; {closed}",
        handoff.worker,
        link.label,
        handoff.wait.as_millis()
    ));
}

/// The session head of `docs/connector-protocol.md`.
pub(crate) struct Head<'a> {
    pub protocol: &'static str,
    pub request: Option<&'a hyper::http::request::Parts>,
    pub remote_ip: Option<std::net::IpAddr>,
    pub tls: bool,
    pub client_subject: Option<&'a hyper::header::HeaderValue>,
}

impl Head<'_> {
    /// The head as the JSON payload of `open`, written straight from the
    /// request: every request makes one.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Json<'a> {
            protocol: &'a str,
            method: &'a str,
            path: &'a str,
            query: &'a str,
            headers: Headers<'a>,
            remote_ip: Option<std::net::IpAddr>,
            tls: bool,
            client_subject: Option<std::borrow::Cow<'a, str>>,
        }
        let json = Json {
            protocol: self.protocol,
            method: self.request.map_or("", |r| r.method.as_str()),
            path: self.request.map_or("", |r| r.uri.path()),
            query: self.request.and_then(|r| r.uri.query()).unwrap_or(""),
            headers: Headers(self.request.map(|r| &r.headers)),
            remote_ip: self.remote_ip,
            tls: self.tls,
            client_subject: self
                .client_subject
                .map(|s| String::from_utf8_lossy(s.as_bytes())),
        };
        // Room for a typical head, which would otherwise grow the buffer
        // several times over.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, &json).expect("a head always serializes");
        out
    }
}

/// Request headers as one JSON object: names lowercased (as hyper keeps
/// them), repeated headers joined.
struct Headers<'a>(Option<&'a hyper::HeaderMap>);

impl serde::Serialize for Headers<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(headers) = self.0 else {
            return serializer.serialize_map(Some(0))?.end();
        };
        let mut map = serializer.serialize_map(Some(headers.keys_len()))?;
        for name in headers.keys() {
            let mut values = headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()));
            let first = values.next().unwrap_or_default();
            let joined = values.fold(first, |mut joined, value| {
                let separator = if name == hyper::header::COOKIE {
                    "; "
                } else {
                    ", "
                };
                joined.to_mut().push_str(separator);
                joined.to_mut().push_str(&value);
                joined
            });
            map.serialize_entry(name.as_str(), &joined)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child played by the test: the other end of the socket pair.
    async fn child() -> (
        Arc<Link>,
        tokio::net::UnixStream,
        mpsc::UnboundedReceiver<()>,
    ) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (changed_tx, changed) = mpsc::unbounded_channel();
        // pgid 0 would signal the test's own group; an impossible pid is safe.
        let ipc = IpcSettings {
            channels: Vec::new(),
            timeout: std::time::Duration::from_millis(500),
        };
        let link = Link::start(ours, "t#0".into(), 0, i32::MAX as u32, ipc, move || {
            let _ = changed_tx.send(());
        })
        .unwrap();
        theirs.set_nonblocking(true).unwrap();
        (
            link,
            tokio::net::UnixStream::from_std(theirs).unwrap(),
            changed,
        )
    }

    async fn read_frame(stream: &mut tokio::net::UnixStream) -> (u8, u32, Vec<u8>) {
        let length = stream.read_u32().await.unwrap() as usize;
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.unwrap();
        let session = u32::from_be_bytes(body[1..5].try_into().unwrap());
        (body[0], session, body[5..].to_vec())
    }

    #[test]
    fn a_response_head_is_read_into_status_and_headers() {
        let head: ResponseHead = serde_json::from_slice(
            br#"{"X-Status":" 404","content-type":"text/plain","set-cookie":["a=1","b=2"],
                "content-length":3,"x-ok":true,"bad name":"x","x-nested":["c",["d"]],
                "x-null":null,"x-object":{"a":1},"x-crlf":"a\r\nb","x-escaped":"\u00e9"}"#,
        )
        .unwrap();
        assert_eq!(head.status, hyper::StatusCode::NOT_FOUND);
        let values = |name: &str| -> Vec<&str> {
            head.headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or("<opaque>"))
                .collect()
        };
        assert_eq!(values("content-type"), ["text/plain"]);
        assert_eq!(values("set-cookie"), ["a=1", "b=2"]);
        assert_eq!(values("content-length"), ["3"]);
        assert_eq!(values("x-ok"), ["true"]);
        assert_eq!(values("x-nested"), ["c"]);
        assert_eq!(values("x-escaped"), ["<opaque>"]);
        assert_eq!(head.headers.len(), 7, "{:?}", head.headers);

        let status = |json: &str| serde_json::from_str::<ResponseHead>(json).unwrap().status;
        assert_eq!(status("{}"), hyper::StatusCode::OK);
        assert_eq!(status(r#"{"x-status":201}"#), hyper::StatusCode::CREATED);
        assert_eq!(
            status(r#"{"x-status":"2000"}"#),
            hyper::StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            status(r#"{"x-status":null}"#),
            hyper::StatusCode::BAD_GATEWAY
        );
        assert!(serde_json::from_str::<ResponseHead>("[]").is_err());
        assert!(serde_json::from_str::<ResponseHead>(r#"{"a":"b""#).is_err());
    }

    #[test]
    fn check_notes_session_persist_with_upstream_port_and_not_with_a_connector() {
        let compile = |text: &str| {
            let loader = apm_compiler::loader::MemLoader::new().file("/apm.conf", text);
            apm_compiler::compile(std::path::Path::new("/apm.conf"), &loader)
                .expect("in memory")
                .config
        };
        let port = compile(
            "worker { name a; exec node; server http://127.0.0.1:8080; upstream port; session_persist true; }",
        );
        let noted = persist_notes(&port);
        assert_eq!(noted.len(), 1, "{noted:?}");
        assert!(noted[0].contains("only through a connector"), "{noted:?}");
        let connector = compile(
            "worker { name a; exec node; server http://127.0.0.1:8080; session_persist true; }",
        );
        assert_eq!(persist_notes(&connector), Vec::<String>::new());
    }

    #[tokio::test]
    async fn handshake_then_ready() {
        let (link, mut theirs, mut changed) = child().await;
        let (kind, session, payload) = read_frame(&mut theirs).await;
        assert_eq!((kind, session), (Kind::Hello as u8, 0));
        let hello: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(hello["protocol"], 1);
        assert_eq!(hello["window"], WINDOW);
        assert!(!link.is_ready());
        theirs
            .write_all(&frame(Kind::Ready, 0, br#"{"protocol":1}"#))
            .await
            .unwrap();
        changed.recv().await.unwrap();
        assert!(link.is_ready());
    }

    #[tokio::test]
    async fn an_oversized_length_ends_the_link() {
        let (link, mut theirs, mut changed) = child().await;
        theirs
            .write_all(&[0xff, 0xff, 0xff, 0xff, 0])
            .await
            .unwrap();
        changed.recv().await.unwrap();
        assert!(!link.is_ready());
    }

    /// A ready child and a session opened on it.
    async fn session_on_a_ready_child() -> (
        Arc<Link>,
        tokio::net::UnixStream,
        mpsc::UnboundedReceiver<()>,
        Session,
    ) {
        let (link, mut theirs, mut changed) = child().await;
        theirs
            .write_all(&frame(
                Kind::Ready,
                0,
                br#"{"protocol":1,"features":["migrate"]}"#,
            ))
            .await
            .unwrap();
        changed.recv().await.unwrap();
        assert!(link.migrates());
        let session = link.open(b"{}").unwrap();
        (link, theirs, changed, session)
    }

    #[tokio::test]
    async fn a_frame_says_whether_its_sessions_next_frame_was_read_with_it() {
        let (link, mut theirs, _changed, mut session) = session_on_a_ready_child().await;
        let other = link.open(b"{}").unwrap();
        let mut frames = frame(Kind::Head, session.id, br#"{"status":200}"#).to_vec();
        frames.extend_from_slice(&frame(Kind::Data, session.id, b"body"));
        frames.extend_from_slice(&frame(Kind::Data, other.id, b"another session's"));
        frames.extend_from_slice(&frame(Kind::Close, session.id, b""));
        theirs.write_all(&frames).await.unwrap();
        let mut follows = Vec::new();
        for _ in 0..3 {
            follows.push(session.rx.recv().await.unwrap().1);
        }
        // The close came after another session's frame, and is the last.
        assert_eq!(follows, [true, false, false]);
    }

    #[tokio::test]
    async fn a_child_that_hands_back_a_session_it_was_not_asked_for_is_cut_off() {
        let (link, mut theirs, mut changed, mut session) = session_on_a_ready_child().await;
        theirs
            .write_all(&frame(Kind::Handed, session.id, b""))
            .await
            .unwrap();
        changed.recv().await.unwrap();
        assert!(!link.is_ready());
        assert!(session.rx.recv().await.is_none(), "the session ends");
    }

    #[tokio::test]
    async fn a_save_is_kept_and_one_over_the_limit_or_not_json_cuts_the_child_off() {
        let (_link, mut theirs, _changed, mut session) = session_on_a_ready_child().await;
        let saved = format!("\"{}\"", "x".repeat(SESSION_DATA_MAX - 2));
        theirs
            .write_all(&frame(Kind::Save, session.id, saved.as_bytes()))
            .await
            .unwrap();
        assert!(
            matches!(session.rx.recv().await, Some((Inbound::Save(data), _)) if data.len() == SESSION_DATA_MAX)
        );
        for bad in [
            format!("\"{}\"", "x".repeat(SESSION_DATA_MAX)),
            "{".to_owned(),
        ] {
            let (link, mut theirs, mut changed, mut session) = session_on_a_ready_child().await;
            theirs
                .write_all(&frame(Kind::Save, session.id, bad.as_bytes()))
                .await
                .unwrap();
            changed.recv().await.unwrap();
            assert!(!link.is_ready(), "a save of {} bytes", bad.len());
            assert!(session.rx.recv().await.is_none());
        }
    }

    /// A client that sends nothing and reports what reaches it.
    struct Recorder(mpsc::UnboundedSender<Option<u16>>);

    impl ClientSide for Recorder {
        async fn next(&mut self) -> FromClient {
            std::future::pending().await
        }

        async fn deliver(&mut self, message: ToClient, _more: bool) -> Result<(), ()> {
            let close = match message {
                ToClient::Close { code, .. } => Some(code),
                _ => None,
            };
            let _ = self.0.send(close);
            close.map_or(Ok(()), |_| Err(()))
        }
    }

    struct Listed(Vec<Arc<Link>>);

    impl Successors for Listed {
        fn candidates(&self) -> Vec<Arc<Link>> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn a_moving_session_goes_to_the_youngest_instance_not_retiring_counted_on_it() {
        // Their children's ends are kept: a child gone is no longer ready.
        let mut links = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let (link, theirs, changed, session) = session_on_a_ready_child().await;
            links.push(link);
            children.push((theirs, changed, session));
            // Each younger than the one before, as `born` tells.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let [leaving, older, younger]: [Arc<Link>; 3] = links.try_into().ok().unwrap();
        let handoff = Handoff {
            successors: Arc::new(Listed(vec![
                older.clone(),
                leaving.clone(),
                younger.clone(),
            ])),
            wait: std::time::Duration::ZERO,
            worker: "t".into(),
            protocol: "ws",
        };
        let (chosen, counted) = handoff.successor(&leaving).expect("a successor");
        assert!(Arc::ptr_eq(&chosen, &younger));
        assert_eq!(younger.in_flight().count(), 1, "counted on it");
        drop(counted);
        younger.retire();
        let (chosen, _counted) = handoff.successor(&leaving).expect("the older one");
        assert!(Arc::ptr_eq(&chosen, &older));
        older.retire();
        assert!(
            handoff.successor(&leaving).is_none(),
            "the leaving one is none"
        );
        assert_eq!(
            (older.in_flight().count(), younger.in_flight().count()),
            (1, 0),
            "nothing counted where the session does not go"
        );
    }

    struct NoSuccessor;

    impl Successors for NoSuccessor {
        fn candidates(&self) -> Vec<Arc<Link>> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn a_child_that_never_lets_go_of_a_session_has_it_closed_with_1012_after_session_wait() {
        let (link, mut theirs, _changed) = child().await;
        assert_eq!(read_frame(&mut theirs).await.0, Kind::Hello as u8);
        theirs
            .write_all(&frame(
                Kind::Ready,
                0,
                br#"{"protocol":1,"features":["migrate"]}"#,
            ))
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !link.migrates() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let (tx, mut delivered) = mpsc::unbounded_channel();
        let handoff = Handoff {
            successors: Arc::new(NoSuccessor),
            wait: std::time::Duration::from_millis(200),
            worker: "t".to_owned(),
            protocol: "ws",
        };
        let pumping = tokio::spawn({
            let link = link.clone();
            async move { pump(&link, b"{}", Recorder(tx), None, Some(handoff)).await }
        });
        let (kind, id, _) = read_frame(&mut theirs).await;
        assert_eq!(kind, Kind::Open as u8);
        let retired = std::time::Instant::now();
        link.retire();
        assert_eq!(
            read_frame(&mut theirs).await,
            (Kind::Migrate as u8, id, vec![])
        );
        // The child says nothing more.
        assert_eq!(delivered.recv().await, Some(Some(1012)));
        assert!(retired.elapsed() >= std::time::Duration::from_millis(200));
        let (kind, closed, payload) = read_frame(&mut theirs).await;
        assert_eq!((kind, closed), (Kind::Close as u8, id));
        assert_eq!(payload[..2], 1012u16.to_be_bytes());
        pumping.await.unwrap();
    }

    #[tokio::test]
    async fn a_child_sending_beyond_its_window_is_cut_off() {
        let (link, mut theirs, mut changed) = child().await;
        theirs
            .write_all(&frame(Kind::Ready, 0, br#"{"protocol":1}"#))
            .await
            .unwrap();
        changed.recv().await.unwrap();
        let mut session = link.open(b"{}").unwrap();
        let chunk = vec![0; MAX_FRAME.min(WINDOW as usize)];
        theirs
            .write_all(&frame(Kind::Data, session.id, &chunk))
            .await
            .unwrap();
        assert!(matches!(
            session.rx.recv().await,
            Some((Inbound::Message { .. }, _))
        ));
        theirs
            .write_all(&frame(Kind::Data, session.id, b"x"))
            .await
            .unwrap();
        changed.recv().await.unwrap();
        assert!(
            session.rx.recv().await.is_none(),
            "the session ends with the link"
        );
    }
}
