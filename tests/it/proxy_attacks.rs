//! Hostile clients against the proxy: each test plays an attack a client
//! on the network can make (slow bodies, huge WebSocket frames, half-sent
//! heads) and checks that it gets a refusal or a close, and that the
//! daemon's slots and memory stay within their bounds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::daemon::HEADERS_APP;
use crate::harness::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Loads two workers with the same proxy `settings`: `port` (upstream
/// port, the headers app) and `conn` (upstream connector, the Python
/// echo app); returns their listeners' ports.
fn load_both_modes(d: &Daemon, settings: &str) -> [(&'static str, u16); 2] {
    let app = d.write("headers.py", HEADERS_APP);
    let (port_mode, connector_mode) = (free_port(), free_port());
    d.load(&format!(
        "worker {{ name port; exec python3; params {}; upstream port; startup_grace 300; \
         server http://127.0.0.1:{port_mode}; {settings} }}\n\
         worker {{ name conn; exec python3; params {}; startup_grace 200; \
         server http://127.0.0.1:{connector_mode}; {settings} }}\n",
        app.display(),
        repo("tests/apps/connector_echo.py").display(),
    ));
    d.wait_running("port");
    d.wait_running("conn");
    [("port", port_mode), ("conn", connector_mode)]
}

/// A client that sends a request's head and 3 bytes of its declared
/// 100-byte body, then nothing.
fn stalled_body(port: u16) -> TcpStream {
    let mut stream = connect(port);
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    stream
}

#[test]
fn a_request_body_that_stalls_is_closed_after_keep_alive_and_frees_its_slot() {
    let d = Daemon::new("stalled_body");
    let keep_alive = Duration::from_secs(1);
    let workers = load_both_modes(&d, "keep_alive 1s; max_conns 3;");
    for (mode, port) in workers {
        // From before the connection: keep_alive counts from the last
        // byte the daemon read, which a loaded machine may delay.
        let started = Instant::now();
        let mut stalled = stalled_body(port);
        let mut answer = Vec::new();
        let _ = stalled.read_to_end(&mut answer);
        let waited = started.elapsed();
        assert!(
            waited >= keep_alive.mul_f32(0.9) && waited < keep_alive + Duration::from_secs(10),
            "{mode}: a stalled body was closed after {waited:?}"
        );
        // max_conns stalled clients hold every slot, but only for keep_alive.
        let _stalled: Vec<TcpStream> = (0..3).map(|_| stalled_body(port)).collect();
        let started = Instant::now();
        let answer = http_raw(
            port,
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 200"), "{mode}: {answer}");
        assert!(
            waited < keep_alive + Duration::from_secs(10),
            "{mode}: a new client waited {waited:?} behind stalled ones"
        );
    }
    // A body that keeps coming, however slowly, is not stalled.
    for (mode, port) in workers {
        let mut slow = connect(port);
        slow.write_all(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        for byte in b"abcd" {
            std::thread::sleep(Duration::from_millis(600));
            slow.write_all(&[*byte]).unwrap();
        }
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{mode}: {answer}");
        assert!(answer.contains("abcd"), "{mode}: {answer}");
    }
}
