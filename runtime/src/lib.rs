//! apm's runtime: applies worker specs (IR, never syntax) to real
//! processes. `lifecycle` is the pure state machine of one instance;
//! `supervisor` performs its effects; `logs`, `state` and `procfs` are
//! what it needs around that. `unsafe` is allowed in `sys` only.
#![deny(unsafe_code)]

pub mod ipc;
pub mod observe;
pub mod process;
pub mod sys;
pub mod traffic;
pub mod unbuilt;

/// The daemon log is its stderr: one timestamped line per event, repeated
/// ones summarised (`daemon_log`).
pub fn log(message: std::fmt::Arguments) {
    observe::daemon_log::write(&message.to_string());
}

/// What an accept loop makes of `accept`'s errors. One connection's own
/// (reset or aborted before it was taken) pass at once. The others (out of
/// descriptors or memory) last until something is freed, and retrying at
/// once would spin a thread (a proxy thread, or the control socket's):
/// they are retried every 100 ms, and logged at most every 10 s (a flood
/// that keeps the daemon at its limit would otherwise fill the log).
#[derive(Default)]
pub struct AcceptErrors {
    logged: Option<std::time::Instant>,
}

impl AcceptErrors {
    /// The next connection on a TCP listener, through whatever errors
    /// come first.
    pub async fn next(
        &mut self,
        listener: &tokio::net::TcpListener,
        on: &str,
    ) -> tokio::net::TcpStream {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return stream,
                Err(e) => self.failed(e, on).await,
            }
        }
    }

    pub async fn failed(&mut self, error: std::io::Error, on: impl std::fmt::Display) {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
        if matches!(
            error.kind(),
            ConnectionAborted | ConnectionReset | Interrupted
        ) {
            return;
        }
        let quiet_for = self.logged.map(|at| at.elapsed());
        if quiet_for.is_none_or(|quiet| quiet >= std::time::Duration::from_secs(10)) {
            self.logged = Some(std::time::Instant::now());
            log(format_args!(
                "cannot accept connections on {on}: {error}; retrying every 100 ms"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Now, in RFC 3339 with milliseconds, UTC.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// 128 random bits in hex: a secret for a URL or a header.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A mutex's guard even after a thread panicked holding it: what these
/// mutexes guard (tables, buffers) stays whole between statements, and a
/// daemon that panicked on every later use would lose far more.
pub fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first address `host:port` resolves to (syslog and StatsD servers).
pub(crate) async fn resolve(address: &str) -> Result<std::net::SocketAddr, String> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve it: {e}"))?
        .next()
        .ok_or_else(|| "it resolves to no address".to_owned())
}

/// A UDP socket connected to `target` from an ephemeral port: the kernel
/// drops whatever anyone else sends to that port.
pub(crate) async fn udp_socket_for(
    target: std::net::SocketAddr,
) -> std::io::Result<tokio::net::UdpSocket> {
    let local: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    Ok(socket)
}
