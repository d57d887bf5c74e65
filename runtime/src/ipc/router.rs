//! The router: which endpoints listen on which channel, the requests
//! waiting for a first reply, and the streams with their peers. One per
//! daemon (`router()`); every change happens under its one lock, and
//! frames leave through the endpoints' outboxes, which never block.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::AbortHandle;

use super::{Outbox, bounds, kind};
use crate::locked;

pub type EndpointId = u64;

/// Ids the daemon picks have the high bit set; the child's never do.
const DAEMON_ID: u32 = 0x8000_0000;

/// The daemon's router.
pub fn router() -> &'static Router {
    static ROUTER: LazyLock<Router> = LazyLock::new(Router::default);
    &ROUTER
}

#[derive(Default)]
pub struct Router {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u32,
    next_endpoint: EndpointId,
    endpoints: HashMap<EndpointId, Endpoint>,
    listeners: HashMap<String, Vec<EndpointId>>,
    /// By the message id the listeners answer.
    requests: HashMap<u32, Pending>,
    /// By mediator and the mediator's stream id.
    streams: HashMap<(EndpointId, u32), Stream>,
    /// By peer id: offered or joined.
    peers: HashMap<u32, Peer>,
}

struct Endpoint {
    outbox: Arc<dyn Outbox>,
    channels: Vec<String>,
    timeout: Duration,
    requests: usize,
    mediating: usize,
    peering: usize,
}

struct Pending {
    from: EndpointId,
    id: u32,
    /// The listeners that took the message and may still reply.
    waiting_on: Vec<EndpointId>,
    timer: AbortHandle,
}

#[derive(Default)]
struct Stream {
    offered: Vec<u32>,
    joined: Vec<u32>,
    timer: Option<AbortHandle>,
}

struct Peer {
    stream: (EndpointId, u32),
    endpoint: EndpointId,
    joined: bool,
}

#[derive(Deserialize)]
struct Addressed {
    channel: String,
    #[serde(default)]
    timeout_ms: Option<f64>,
}

#[derive(Deserialize)]
struct Opening {
    channel: String,
    #[serde(default)]
    head: Value,
    #[serde(default)]
    timeout_ms: Option<f64>,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    data: Value,
}

/// The result an operator's request got.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub data: Value,
    pub status: String,
}

impl State {
    fn fresh_id(&mut self) -> u32 {
        loop {
            self.next_id = (self.next_id + 1) & !DAEMON_ID;
            let id = self.next_id | DAEMON_ID;
            if !self.requests.contains_key(&id) && !self.peers.contains_key(&id) {
                return id;
            }
        }
    }

    fn deliver(&self, to: EndpointId, kind: u8, id: u32, payload: &[u8], droppable: bool) -> bool {
        self.endpoints
            .get(&to)
            .is_some_and(|e| e.outbox.deliver(kind, id, payload, droppable))
    }

    /// The listeners of `channel` but `from`.
    fn listeners_but(&self, channel: &str, from: EndpointId) -> Vec<EndpointId> {
        self.listeners
            .get(channel)
            .map(|l| l.iter().copied().filter(|&e| e != from).collect())
            .unwrap_or_default()
    }

    fn timeout(&self, from: EndpointId, asked_ms: Option<f64>) -> Duration {
        match asked_ms {
            Some(ms) if ms.is_finite() => {
                Duration::from_secs_f64((ms / 1000.0).clamp(0.0, bounds::MAX_TIMEOUT.as_secs_f64()))
            }
            _ => self
                .endpoints
                .get(&from)
                .map_or(bounds::DEFAULT_TIMEOUT, |e| e.timeout),
        }
    }

    fn result(&self, to: EndpointId, id: u32, data: &Value, status: &str) {
        let payload = json!({"data": data, "status": status}).to_string();
        self.deliver(to, kind::RESULT, id, payload.as_bytes(), false);
    }

    fn finish(&mut self, message: u32, data: &Value, status: &str) {
        let Some(pending) = self.requests.remove(&message) else {
            return;
        };
        pending.timer.abort();
        if let Some(from) = self.endpoints.get_mut(&pending.from) {
            from.requests -= 1;
        }
        self.result(pending.from, pending.id, data, status);
    }

    /// Ends a stream: its peers, offered or joined, are told, and so is the
    /// mediator when `tell_mediator`.
    fn teardown(&mut self, key: (EndpointId, u32), tell_mediator: bool) {
        let Some(stream) = self.streams.remove(&key) else {
            return;
        };
        if let Some(timer) = stream.timer {
            timer.abort();
        }
        for peer in stream.offered.into_iter().chain(stream.joined) {
            if let Some(p) = self.peers.remove(&peer) {
                self.deliver(p.endpoint, kind::STREAM_CLOSE, peer, &[0; 4], false);
                if let Some(e) = self.endpoints.get_mut(&p.endpoint) {
                    e.peering -= 1;
                }
            }
        }
        if let Some(mediator) = self.endpoints.get_mut(&key.0) {
            mediator.mediating -= 1;
        }
        if tell_mediator {
            self.deliver(key.0, kind::STREAM_CLOSE, key.1, &[0; 4], false);
        }
    }

    /// A peer leaves (closed, declined or ended); the mediator hears of a
    /// joined one, and the stream ends with its last peer.
    fn drop_peer(&mut self, peer: u32) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        if let Some(e) = self.endpoints.get_mut(&p.endpoint) {
            e.peering -= 1;
        }
        let Some(stream) = self.streams.get_mut(&p.stream) else {
            return;
        };
        stream.offered.retain(|&o| o != peer);
        stream.joined.retain(|&j| j != peer);
        let over = stream.joined.is_empty() && (p.joined || stream.offered.is_empty());
        if p.joined {
            self.deliver(
                p.stream.0,
                kind::STREAM_CLOSE,
                p.stream.1,
                &peer.to_be_bytes(),
                false,
            );
        }
        if over {
            self.teardown(p.stream, true);
        }
    }
}

impl Router {
    /// A new endpoint answering on `channels`, whose requests wait
    /// `timeout` unless a call says otherwise.
    pub fn join(
        &self,
        outbox: Arc<dyn Outbox>,
        channels: Vec<String>,
        timeout: Duration,
    ) -> EndpointId {
        let mut state = locked(&self.state);
        state.next_endpoint += 1;
        let id = state.next_endpoint;
        for channel in &channels {
            state.listeners.entry(channel.clone()).or_default().push(id);
        }
        state.endpoints.insert(
            id,
            Endpoint {
                outbox,
                channels,
                timeout,
                requests: 0,
                mediating: 0,
                peering: 0,
            },
        );
        id
    }

    /// The endpoint is gone: everything it held ends at once, and the other
    /// sides are told (a request waiting only on it gets `null`, the
    /// mediator of a stream it was a peer of sees it leave, the peers of a
    /// stream it mediated see the stream close).
    pub fn leave(&self, endpoint: EndpointId) {
        let mut state = locked(&self.state);
        let Some(gone) = state.endpoints.get(&endpoint) else {
            return;
        };
        for channel in gone.channels.clone() {
            if let Some(listeners) = state.listeners.get_mut(&channel) {
                listeners.retain(|&l| l != endpoint);
                if listeners.is_empty() {
                    state.listeners.remove(&channel);
                }
            }
        }
        let mut unanswerable = Vec::new();
        state.requests.retain(|&message, pending| {
            if pending.from == endpoint {
                pending.timer.abort();
                return false;
            }
            pending.waiting_on.retain(|&w| w != endpoint);
            if pending.waiting_on.is_empty() {
                unanswerable.push(message);
            }
            true
        });
        for message in unanswerable {
            state.finish(message, &Value::Null, "gone");
        }
        let mediated: Vec<_> = state
            .streams
            .keys()
            .filter(|k| k.0 == endpoint)
            .copied()
            .collect();
        for key in mediated {
            state.teardown(key, false);
        }
        let peers: Vec<u32> = state
            .peers
            .iter()
            .filter(|(_, p)| p.endpoint == endpoint)
            .map(|(&id, _)| id)
            .collect();
        for peer in peers {
            state.drop_peer(peer);
        }
        state.endpoints.remove(&endpoint);
    }

    /// One IPC frame from an endpoint's child. An error is a protocol
    /// error of the child's.
    pub fn frame(
        &'static self,
        from: EndpointId,
        kind: u8,
        id: u32,
        payload: &[u8],
    ) -> Result<(), String> {
        let json = |what: &str| format!("`{what}` is not the JSON object it should be");
        match kind {
            kind::SEND => {
                let to: Addressed = serde_json::from_slice(payload).map_err(|_| json("send"))?;
                self.send(from, &to.channel, payload);
            }
            kind::REQUEST => {
                let to: Addressed = serde_json::from_slice(payload).map_err(|_| json("request"))?;
                if id == 0 || id & DAEMON_ID != 0 {
                    return Err(format!("a request id of {id:#x}"));
                }
                self.request(from, id, &to, payload);
            }
            kind::REPLY => {
                let reply: Reply = serde_json::from_slice(payload).map_err(|_| json("reply"))?;
                let mut state = locked(&self.state);
                let answers = state
                    .requests
                    .get(&id)
                    .is_some_and(|p| p.waiting_on.contains(&from));
                if answers {
                    state.finish(id, &reply.data, "reply");
                }
            }
            kind::STREAM_OPEN => {
                let opening: Opening =
                    serde_json::from_slice(payload).map_err(|_| json("stream_open"))?;
                if id == 0 || id & DAEMON_ID != 0 {
                    return Err(format!("a stream id of {id:#x}"));
                }
                self.open_stream(from, id, opening);
            }
            kind::STREAM_ACCEPT => self.accept(from, id),
            kind::STREAM_DATA => {
                if payload.len() < 5 {
                    return Err("a `stream_data` shorter than its peer id and type".to_owned());
                }
                self.stream_data(from, id, payload);
            }
            kind::STREAM_CLOSE => {
                let mut state = locked(&self.state);
                if state.streams.contains_key(&(from, id)) {
                    state.teardown((from, id), false);
                } else if state.peers.get(&id).is_some_and(|p| p.endpoint == from) {
                    state.drop_peer(id);
                }
            }
            other => return Err(format!("IPC kind {other} is not for the child to send")),
        }
        Ok(())
    }

    /// Delivers `message` (a `send`'s payload, as it came) to every
    /// listener of `channel` but `from`; how many took it.
    fn send(&self, from: EndpointId, channel: &str, message: &[u8]) -> usize {
        let state = locked(&self.state);
        state
            .listeners_but(channel, from)
            .into_iter()
            .filter(|&l| state.deliver(l, kind::MESSAGE, 0, message, true))
            .count()
    }

    fn request(&'static self, from: EndpointId, id: u32, to: &Addressed, message: &[u8]) {
        let mut state = locked(&self.state);
        if state
            .endpoints
            .get(&from)
            .is_none_or(|e| e.requests >= bounds::PENDING_REQUESTS)
        {
            return state.result(from, id, &Value::Null, "limit");
        }
        let number = state.fresh_id();
        let waiting_on: Vec<_> = state
            .listeners_but(&to.channel, from)
            .into_iter()
            .filter(|&l| state.deliver(l, kind::MESSAGE, number, message, true))
            .collect();
        if waiting_on.is_empty() {
            return state.result(from, id, &Value::Null, "no_listener");
        }
        let timeout = state.timeout(from, to.timeout_ms);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            locked(&self.state).finish(number, &Value::Null, "timeout");
        })
        .abort_handle();
        if let Some(e) = state.endpoints.get_mut(&from) {
            e.requests += 1;
        }
        state.requests.insert(
            number,
            Pending {
                from,
                id,
                waiting_on,
                timer,
            },
        );
    }

    fn open_stream(&'static self, from: EndpointId, id: u32, opening: Opening) {
        let mut state = locked(&self.state);
        let key = (from, id);
        let refuse = |state: &State| {
            state.deliver(from, kind::STREAM_CLOSE, id, &[0; 4], false);
        };
        let Some(mediating) = state.endpoints.get(&from).map(|e| e.mediating) else {
            return;
        };
        if mediating >= bounds::STREAMS || state.streams.contains_key(&key) {
            return refuse(&state);
        }
        if let Some(mediator) = state.endpoints.get_mut(&from) {
            mediator.mediating += 1;
        }
        state.streams.insert(key, Stream::default());
        for listener in state.listeners_but(&opening.channel, from) {
            if state
                .endpoints
                .get(&listener)
                .is_none_or(|e| e.peering >= bounds::STREAMS)
            {
                continue;
            }
            let peer = state.fresh_id();
            let offer = json!({"channel": opening.channel, "head": opening.head, "peer": peer});
            if !state.deliver(
                listener,
                kind::STREAM_OFFER,
                peer,
                offer.to_string().as_bytes(),
                true,
            ) {
                continue;
            }
            state.peers.insert(
                peer,
                Peer {
                    stream: key,
                    endpoint: listener,
                    joined: false,
                },
            );
            if let Some(e) = state.endpoints.get_mut(&listener) {
                e.peering += 1;
            }
            state
                .streams
                .get_mut(&key)
                .expect("inserted")
                .offered
                .push(peer);
        }
        if state.streams[&key].offered.is_empty() {
            return state.teardown(key, true);
        }
        let timeout = state.timeout(from, opening.timeout_ms);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let mut state = locked(&self.state);
            if state.streams.get(&key).is_some_and(|s| s.joined.is_empty()) {
                state.teardown(key, true);
            }
        })
        .abort_handle();
        state.streams.get_mut(&key).expect("inserted").timer = Some(timer);
    }

    fn accept(&self, from: EndpointId, peer: u32) {
        let mut state = locked(&self.state);
        let Some(p) = state.peers.get_mut(&peer) else {
            return;
        };
        if p.endpoint != from || p.joined {
            return;
        }
        p.joined = true;
        let key = p.stream;
        let Some(stream) = state.streams.get_mut(&key) else {
            return;
        };
        stream.offered.retain(|&o| o != peer);
        stream.joined.push(peer);
        if let Some(timer) = stream.timer.take() {
            timer.abort();
        }
        state.deliver(key.0, kind::STREAM_JOIN, key.1, &peer.to_be_bytes(), false);
    }

    fn stream_data(&self, from: EndpointId, id: u32, payload: &[u8]) {
        let state = locked(&self.state);
        let tagged = |peer: u32| {
            let mut out = Vec::with_capacity(payload.len());
            out.extend_from_slice(&peer.to_be_bytes());
            out.extend_from_slice(&payload[4..]);
            out
        };
        if let Some(stream) = state.streams.get(&(from, id)) {
            let to = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
            for &peer in stream.joined.iter().filter(|&&p| to == 0 || p == to) {
                let endpoint = state.peers[&peer].endpoint;
                state.deliver(endpoint, kind::STREAM_DATA, peer, &tagged(peer), true);
            }
        } else if let Some(p) = state.peers.get(&id)
            && p.endpoint == from
            && p.joined
        {
            state.deliver(p.stream.0, kind::STREAM_DATA, p.stream.1, &tagged(id), true);
        }
    }

    /// `apm send`: the operator's message reaches every listener; how many
    /// took it.
    pub fn operator_send(&self, channel: &str, data: &Value) -> usize {
        let message = json!({"channel": channel, "data": data}).to_string();
        self.send(0, channel, message.as_bytes())
    }

    /// `apm request`: the first reply, or null and why.
    pub async fn operator_request(
        &'static self,
        channel: &str,
        data: &Value,
        timeout: Option<Duration>,
    ) -> Outcome {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let endpoint = self.join(
            Arc::new(Operator(Mutex::new(Some(tx)))),
            Vec::new(),
            bounds::DEFAULT_TIMEOUT,
        );
        let message = json!({
            "channel": channel,
            "data": data,
            "timeout_ms": timeout.map(|t| t.as_secs_f64() * 1000.0),
        });
        let to = Addressed {
            channel: channel.to_owned(),
            timeout_ms: timeout.map(|t| t.as_secs_f64() * 1000.0),
        };
        self.request(endpoint, 1, &to, message.to_string().as_bytes());
        let outcome = rx.await.ok().and_then(|payload| {
            let mut result: Value = serde_json::from_slice(&payload).ok()?;
            Some(Outcome {
                data: result["data"].take(),
                status: result["status"].as_str()?.to_owned(),
            })
        });
        self.leave(endpoint);
        outcome.unwrap_or(Outcome {
            data: Value::Null,
            status: "gone".to_owned(),
        })
    }
}

/// An operator's request: the one result it waits for.
struct Operator(Mutex<Option<tokio::sync::oneshot::Sender<Vec<u8>>>>);

impl Outbox for Operator {
    fn deliver(&self, kind: u8, _id: u32, payload: &[u8], _droppable: bool) -> bool {
        if kind == kind::RESULT
            && let Some(tx) = locked(&self.0).take()
        {
            let _ = tx.send(payload.to_vec());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox that keeps what it got, and takes at most `room` frames
    /// that may be dropped.
    #[derive(Default)]
    struct Inbox {
        frames: Mutex<Vec<(u8, u32, Vec<u8>)>>,
        room: Option<usize>,
    }

    impl Outbox for Inbox {
        fn deliver(&self, kind: u8, id: u32, payload: &[u8], droppable: bool) -> bool {
            let mut frames = locked(&self.frames);
            if droppable && self.room.is_some_and(|room| frames.len() >= room) {
                return false;
            }
            frames.push((kind, id, payload.to_vec()));
            true
        }
    }

    impl Inbox {
        fn take(&self) -> Vec<(u8, u32, Vec<u8>)> {
            std::mem::take(&mut *locked(&self.frames))
        }
    }

    fn router_for_test() -> &'static Router {
        Box::leak(Box::default())
    }

    fn endpoint(router: &Router, channels: &[&str]) -> (EndpointId, Arc<Inbox>) {
        let inbox = Arc::new(Inbox::default());
        let id = router.join(
            inbox.clone(),
            channels.iter().map(|c| c.to_string()).collect(),
            Duration::from_secs(5),
        );
        (id, inbox)
    }

    fn result_of(frames: &[(u8, u32, Vec<u8>)]) -> Value {
        let results: Vec<_> = frames.iter().filter(|f| f.0 == kind::RESULT).collect();
        assert_eq!(results.len(), 1, "{frames:?}");
        serde_json::from_slice(&results[0].2).unwrap()
    }

    #[tokio::test]
    async fn a_send_reaches_every_listener_but_the_sender() {
        let router = router_for_test();
        let (a, a_in) = endpoint(router, &["news"]);
        let (_, b_in) = endpoint(router, &["news"]);
        let (_, c_in) = endpoint(router, &["other"]);
        router
            .frame(a, kind::SEND, 0, br#"{"channel":"news","data":1}"#)
            .unwrap();
        assert!(a_in.take().is_empty());
        assert_eq!(b_in.take().len(), 1);
        assert!(c_in.take().is_empty());
    }

    #[tokio::test]
    async fn the_first_reply_wins_and_a_dead_only_responder_answers_null_at_once() {
        let router = router_for_test();
        let (a, a_in) = endpoint(router, &[]);
        let (b, b_in) = endpoint(router, &["q"]);
        let (c, c_in) = endpoint(router, &["q"]);
        router
            .frame(a, kind::REQUEST, 7, br#"{"channel":"q","data":1}"#)
            .unwrap();
        let message = b_in.take()[0].1;
        assert_eq!(c_in.take()[0].1, message);
        router
            .frame(c, kind::REPLY, message, br#"{"data":"c"}"#)
            .unwrap();
        router
            .frame(b, kind::REPLY, message, br#"{"data":"b"}"#)
            .unwrap();
        let frames = a_in.take();
        assert_eq!(frames[0].1, 7);
        assert_eq!(result_of(&frames), json!({"data": "c", "status": "reply"}));

        router
            .frame(a, kind::REQUEST, 8, br#"{"channel":"q","data":2}"#)
            .unwrap();
        router.leave(b);
        assert!(a_in.take().is_empty(), "c may still answer");
        router.leave(c);
        assert_eq!(
            result_of(&a_in.take()),
            json!({"data": null, "status": "gone"})
        );
    }

    #[tokio::test]
    async fn no_listener_answers_at_once_and_a_reply_from_a_stranger_is_ignored() {
        let router = router_for_test();
        let (a, a_in) = endpoint(router, &["q"]);
        let (stranger, _) = endpoint(router, &[]);
        router
            .frame(a, kind::REQUEST, 1, br#"{"channel":"q","data":1}"#)
            .unwrap();
        assert_eq!(
            result_of(&a_in.take()),
            json!({"data": null, "status": "no_listener"})
        );
        let (_, b_in) = endpoint(router, &["q"]);
        router
            .frame(a, kind::REQUEST, 2, br#"{"channel":"q","data":1}"#)
            .unwrap();
        let message = b_in.take()[0].1;
        router
            .frame(stranger, kind::REPLY, message, br#"{"data":"forged"}"#)
            .unwrap();
        assert!(a_in.take().is_empty());
    }

    #[tokio::test]
    async fn pending_requests_are_bounded_per_process() {
        let router = router_for_test();
        let (a, a_in) = endpoint(router, &[]);
        let (_, _b) = endpoint(router, &["q"]);
        for id in 1..=bounds::PENDING_REQUESTS as u32 + 1 {
            router
                .frame(a, kind::REQUEST, id, br#"{"channel":"q"}"#)
                .unwrap();
        }
        assert_eq!(
            result_of(&a_in.take()),
            json!({"data": null, "status": "limit"})
        );
    }

    #[tokio::test]
    async fn a_stream_fans_out_tags_and_closes_with_its_last_peer() {
        let router = router_for_test();
        let (m, m_in) = endpoint(router, &[]);
        let peers: Vec<_> = (0..2).map(|_| endpoint(router, &["s"])).collect();
        router
            .frame(m, kind::STREAM_OPEN, 3, br#"{"channel":"s","head":null}"#)
            .unwrap();
        let ids: Vec<u32> = peers
            .iter()
            .map(|(e, inbox)| {
                let offer = inbox.take()[0].1;
                router.frame(*e, kind::STREAM_ACCEPT, offer, b"").unwrap();
                offer
            })
            .collect();
        let joins: Vec<_> = m_in.take().into_iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            joins,
            ids.iter()
                .map(|p| (kind::STREAM_JOIN, 3, p.to_be_bytes().to_vec()))
                .collect::<Vec<_>>()
        );
        router
            .frame(m, kind::STREAM_DATA, 3, b"\0\0\0\0\x01hi")
            .unwrap();
        for ((_, inbox), id) in peers.iter().zip(&ids) {
            let mut expected = id.to_be_bytes().to_vec();
            expected.extend_from_slice(b"\x01hi");
            assert_eq!(inbox.take(), vec![(kind::STREAM_DATA, *id, expected)]);
        }
        router
            .frame(peers[0].0, kind::STREAM_DATA, ids[0], b"\0\0\0\0\0up")
            .unwrap();
        let mut tagged = ids[0].to_be_bytes().to_vec();
        tagged.extend_from_slice(b"\0up");
        assert_eq!(m_in.take(), vec![(kind::STREAM_DATA, 3, tagged)]);
        router
            .frame(peers[0].0, kind::STREAM_CLOSE, ids[0], &[0; 4])
            .unwrap();
        router.leave(peers[1].0);
        assert_eq!(
            m_in.take(),
            vec![
                (kind::STREAM_CLOSE, 3, ids[0].to_be_bytes().to_vec()),
                (kind::STREAM_CLOSE, 3, ids[1].to_be_bytes().to_vec()),
                (kind::STREAM_CLOSE, 3, vec![0; 4]),
            ]
        );
        router
            .frame(m, kind::STREAM_DATA, 3, b"\0\0\0\0\x01late")
            .unwrap();
        assert!(peers[0].1.take().is_empty());
    }

    #[tokio::test]
    async fn a_listener_that_does_not_read_has_its_messages_dropped() {
        let router = router_for_test();
        let (a, _) = endpoint(router, &[]);
        let full = Arc::new(Inbox {
            room: Some(2),
            ..Default::default()
        });
        router.join(full.clone(), vec!["q".to_owned()], Duration::from_secs(1));
        for _ in 0..5 {
            router
                .frame(a, kind::SEND, 0, br#"{"channel":"q","data":1}"#)
                .unwrap();
        }
        assert_eq!(full.take().len(), 2);
    }

    #[tokio::test]
    async fn ids_the_child_may_not_pick_are_protocol_errors() {
        let router = router_for_test();
        let (a, _) = endpoint(router, &[]);
        assert!(
            router
                .frame(a, kind::REQUEST, 0x8000_0001, br#"{"channel":"q"}"#)
                .is_err()
        );
        assert!(router.frame(a, kind::SEND, 0, b"[1]").is_err());
        assert!(router.frame(a, kind::RESULT, 1, b"{}").is_err());
    }
}
