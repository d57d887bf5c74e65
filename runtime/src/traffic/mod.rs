//! Traffic: the listeners, the firewall, TLS, and the two ways a request
//! reaches an instance (its own port, or a session over its connector channel).

pub(crate) mod activity;
pub mod connector;
pub(crate) mod held;
pub(crate) mod http;
pub mod inflight;
mod parked;
pub mod proxy;
pub(crate) mod session;
pub mod threads;
pub mod tls;
pub(crate) mod upstream;
pub mod vanguard;
