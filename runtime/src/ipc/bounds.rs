//! How much one process can make the IPC router hold
//! (`docs/connector-protocol.md`, "Bounds").

use std::time::Duration;

/// IPC bytes queued for a process that does not read its channel, beyond
/// which messages, offers and stream data to it are dropped and counted.
pub const QUEUED: usize = 4 << 20;
/// Requests one process may have waiting for a result.
pub const PENDING_REQUESTS: usize = 1024;
/// Streams one process may mediate, and streams it may be offered or a
/// peer of.
pub const STREAMS: usize = 256;
/// Dashboard ids per process.
pub const DASH_IDS: usize = 64;
/// Metric names per process.
pub const METRIC_NAMES: usize = 256;
/// A dashboard id or a metric name, in bytes.
pub const NAME_BYTES: usize = 128;
/// A dashboard value, serialised.
pub const DASH_VALUE_BYTES: usize = 4096;
/// A dashboard color.
pub const COLOR_BYTES: usize = 32;
/// A request's or stream's timeout when neither the call nor the worker's
/// `ipc_timeout` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest timeout a call may ask for: a pending request holds memory.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
