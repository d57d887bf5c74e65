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

/// An instance that answers HTTP/1.0: Python's `http.server` handler as
/// it comes, with `/close-delimited` answered without a length (its end
/// is the closed connection).
const HTTP10_APP: &str = r#"
import http.server, os
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/close-delimited":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"no length here\n" * 1000)
            return
        super().do_GET()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Reads one answer of a kept-alive connection: its head, and its body by
/// `Content-Length` or chunked.
fn read_kept_answer(stream: &mut impl Read) -> (String, Vec<u8>) {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 16384];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).into_owned();
            let body = &seen[end + 4..];
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap());
            match length {
                Some(length) if body.len() >= length => return (head, body[..length].to_vec()),
                None if body.ends_with(b"\r\n0\r\n\r\n") || body == b"0\r\n\r\n" => {
                    assert!(lower.contains("transfer-encoding: chunked"), "{head}");
                    return (head, dechunk(body));
                }
                _ => {}
            }
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..n]);
    }
}

fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = chunked.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = std::str::from_utf8(&chunked[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        chunked = &chunked[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunked[..size]);
        chunked = &chunked[size + 2..];
    }
}

#[test]
fn an_instance_answering_http_1_0_keeps_a_keep_alive_client_on_http_1_1() {
    let d = Daemon::new("http10_upstream");
    let app = d.write("http10.py", HTTP10_APP);
    d.write("file.txt", "a file\n");
    let (stdlib, custom) = (free_port(), free_port());
    d.load(&format!(
        "worker {{ name stdlib; exec sh; params -c 'exec python3 -m http.server --bind 127.0.0.1 $PORT'; \
         path {dir}; upstream port; startup_grace 300; server http://127.0.0.1:{stdlib}; }}\n\
         worker {{ name custom; exec python3; params {app}; path {dir}; upstream port; startup_grace 300; \
         server http://127.0.0.1:{custom}; }}\n",
        dir = d.dir().display(),
        app = app.display(),
    ));
    d.wait_running("stdlib");
    d.wait_running("custom");
    for (port, target, expected) in [
        (stdlib, "/file.txt", b"a file\n".to_vec()),
        (custom, "/close-delimited", b"no length here\n".repeat(1000)),
    ] {
        let mut client = connect(port);
        for round in 0..2 {
            client
                .write_all(format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
                .unwrap();
            let (head, body) = read_kept_answer(&mut client);
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "{target} #{round}: {head}"
            );
            assert!(
                !head.to_ascii_lowercase().contains("connection: close"),
                "{target} #{round}: {head}"
            );
            assert_eq!(body, expected, "{target} #{round}");
        }
    }
    // An HTTP/1.0 client cannot read chunks: its answer ends with the connection.
    let answer = http_raw(custom, "GET /close-delimited HTTP/1.0\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    assert_eq!(body, "no length here\n".repeat(1000), "{head}");
}
