//! `syslog`: a worker's output lines also go to a syslog server, as RFC
//! 5424 messages over UDP (`syslog://`, `udp://`) or over TCP with octet
//! counting (`tcp://`, RFC 6587), terminal escapes always left out.
//! Messages are queued and dropped when the server is behind or away: an
//! app never waits for its syslog server, and its log files get every line
//! whatever happens here.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::observe::logstyle::Stream;

/// Messages queued per worker before new ones are dropped.
const QUEUE: usize = 1024;
/// How long a TCP sink waits before it connects again.
const RECONNECT: Duration = Duration::from_secs(1);
/// RFC 5424's limit for APP-NAME.
const MAX_APP_NAME: usize = 48;

/// Facility `user` (1), as RFC 5424 numbers it.
const FACILITY_USER: u8 = 1;

pub struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    app_name: String,
    host: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Udp,
    Tcp,
}

impl Sink {
    /// A sink for `url` whose messages carry `tag` as their APP-NAME.
    pub fn start(worker: &str, url: &str, tag: &str) -> Result<Sink, String> {
        let (scheme, address) = url
            .split_once("://")
            .ok_or_else(|| format!("`{url}` is not a URL"))?;
        let transport = match scheme {
            "syslog" | "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            other => return Err(format!("`{other}://` is not a syslog transport")),
        };
        let address = address.trim_end_matches('/').to_owned();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(worker.to_owned(), address, transport, rx));
        Ok(Sink {
            tx,
            app_name: app_name(tag),
            host: hostname(),
        })
    }

    /// Sends one line of process `pid`, unless the queue is full.
    pub fn send(&self, which: Stream, pid: u32, text: &[u8]) {
        let severity = match which {
            Stream::Out => 6, // informational
            Stream::Err => 3, // error
        };
        let mut message = format!(
            "<{}>1 {} {} {} {pid} - - ",
            FACILITY_USER * 8 + severity,
            crate::timestamp(),
            self.host,
            self.app_name
        )
        .into_bytes();
        crate::observe::logstyle::strip_ansi(text, &mut message);
        let _ = self.tx.try_send(message);
    }
}

/// RFC 5424's APP-NAME: printable ASCII without spaces, at most 48.
fn app_name(tag: &str) -> String {
    let name: String = tag
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_APP_NAME)
        .collect();
    if name.is_empty() {
        "-".to_owned()
    } else {
        name
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| app_name(h.trim()))
        .unwrap_or_else(|_| "-".to_owned())
}

async fn deliver(
    worker: String,
    address: String,
    transport: Transport,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut reported = false;
    let mut report = |what: String| {
        if !std::mem::replace(&mut reported, true) {
            crate::log(format_args!(
                "{worker}: syslog {address}: {what}; its lines are dropped until it works"
            ));
        }
    };
    loop {
        let target = match crate::resolve(&address).await {
            Ok(target) => target,
            Err(e) => {
                report(e);
                if !wait_or_drain(&mut rx).await {
                    return;
                }
                continue;
            }
        };
        let delivered = match transport {
            Transport::Udp => send_udp(target, &mut rx).await,
            Transport::Tcp => send_tcp(target, &mut rx).await,
        };
        match delivered {
            // The worker is gone: nothing more will come.
            Ok(()) => return,
            Err(e) => {
                report(e);
                if !wait_or_drain(&mut rx).await {
                    return;
                }
            }
        }
    }
}

/// Drops what arrives for `RECONNECT`; false once the sink is gone.
async fn wait_or_drain(rx: &mut mpsc::Receiver<Vec<u8>>) -> bool {
    let pause = tokio::time::sleep(RECONNECT);
    tokio::pin!(pause);
    loop {
        tokio::select! {
            _ = &mut pause => return true,
            message = rx.recv() => if message.is_none() { return false },
        }
    }
}

async fn send_udp(target: SocketAddr, rx: &mut mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
    let socket = crate::udp_socket_for(target)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(message) = rx.recv().await {
        // A datagram lost (no one listening, a full buffer) is syslog over
        // UDP's contract; the next one is tried all the same.
        let _ = socket.send(&message).await;
    }
    Ok(())
}

async fn send_tcp(target: SocketAddr, rx: &mut mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    while let Some(message) = rx.recv().await {
        let mut frame = format!("{} ", message.len()).into_bytes();
        frame.extend_from_slice(&message);
        stream
            .write_all(&frame)
            .await
            .map_err(|e| format!("the connection failed: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_printable_ascii_without_spaces_and_at_most_48_long() {
        assert_eq!(app_name("my app"), "myapp");
        assert_eq!(app_name("wörker"), "wrker");
        assert_eq!(app_name(""), "-");
        assert_eq!(app_name(&"x".repeat(60)).len(), 48);
    }
}
