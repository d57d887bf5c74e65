//! Inter-worker IPC through the daemon (`docs/connector-protocol.md`, "IPC
//! between workers"): the router that carries channel messages, requests
//! and streams between processes' connector links, and each process's
//! board of dashboard values and metrics.
//!
//! The router owns no socket: an endpoint is anything that takes frames
//! (`Outbox`), a process's link or an operator's `apm request`. Everything
//! an endpoint can make the router hold is bounded (`bounds`).

mod board;
pub mod bounds;
mod router;

pub use board::{Board, Metric, MetricType};
pub use router::{EndpointId, Router, router};

/// The IPC frame kinds (32–47 are IPC's).
pub mod kind {
    pub const SEND: u8 = 32;
    pub const REQUEST: u8 = 33;
    pub const MESSAGE: u8 = 34;
    pub const REPLY: u8 = 35;
    pub const RESULT: u8 = 36;
    pub const STREAM_OPEN: u8 = 37;
    pub const STREAM_OFFER: u8 = 38;
    pub const STREAM_ACCEPT: u8 = 39;
    pub const STREAM_JOIN: u8 = 40;
    pub const STREAM_DATA: u8 = 41;
    pub const STREAM_CLOSE: u8 = 42;
    pub const DASH: u8 = 43;
    pub const METRIC: u8 = 44;

    /// Whether a frame of this kind is IPC's.
    pub fn is_ipc(kind: u8) -> bool {
        (32..=47).contains(&kind)
    }
}

/// Where the router delivers an endpoint's frames.
pub trait Outbox: Send + Sync {
    /// Queues one frame. A `droppable` frame (a message, an offer, stream
    /// data) is refused when the endpoint is already `bounds::QUEUED` bytes
    /// behind: then this answers false and the endpoint's drop count grows.
    fn deliver(&self, kind: u8, id: u32, payload: &[u8], droppable: bool) -> bool;
}
