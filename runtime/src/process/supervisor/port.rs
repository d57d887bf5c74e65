//! The loopback port of an `upstream port` instance: chosen for it before
//! it starts, and probed until the instance accepts on it.

use super::*;

/// A free loopback port for an instance. The port is released before the
/// child binds it; another process taking it in between makes the instance
/// fail its start, which the restart policy handles.
pub(super) fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()
        .map(|a| a.port())
}

pub(super) struct Port {
    pub(super) address: std::net::SocketAddr,
    pub(super) accepting: Arc<std::sync::atomic::AtomicBool>,
    pub(super) in_flight: Arc<crate::traffic::inflight::InFlight>,
}

impl Port {
    pub(super) fn new(number: u16) -> Port {
        Port {
            address: std::net::SocketAddr::from(([127, 0, 0, 1], number)),
            accepting: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    pub(super) fn accepting(&self) -> bool {
        self.accepting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Tries to connect until the process accepts, then has the listeners
    /// updated. Ends when the instance moves on to another process.
    pub(super) fn probe(&self, tx: mpsc::UnboundedSender<Msg>) {
        let (address, accepting) = (self.address, self.accepting.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(5);
            while Arc::strong_count(&accepting) > 1 {
                if tokio::net::TcpStream::connect(address).await.is_ok() {
                    accepting.store(true, std::sync::atomic::Ordering::Release);
                    let _ = tx.send(Msg::Recheck);
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        });
    }
}

