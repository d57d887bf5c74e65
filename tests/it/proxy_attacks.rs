//! Hostile clients against the proxy: each test plays an attack a client
//! on the network can make (slow bodies, huge WebSocket frames, half-sent
//! heads) and checks that it gets a refusal or a close, and that the
//! daemon's slots and memory stay within their bounds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::daemon::HEADERS_APP;
use crate::harness::*;

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
/// `Content-Length` or chunked. Nothing may follow it.
fn read_kept_answer(stream: &mut impl Read) -> (String, Vec<u8>) {
    let mut answers = read_kept_answers(stream, 1);
    answers.pop().unwrap()
}

/// Reads `count` answers of a kept-alive connection in turn: pipelined
/// answers may arrive in one read, so what is read past one answer is the
/// start of the next. Bytes past the last one are a fault.
fn read_kept_answers(stream: &mut impl Read, count: usize) -> Vec<(String, Vec<u8>)> {
    let mut answers = Vec::new();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 16384];
    while answers.len() < count {
        if let Some((answer, used)) = kept_answer(&seen) {
            answers.push(answer);
            seen.drain(..used);
            continue;
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..n]);
    }
    assert!(
        seen.is_empty(),
        "more than {count} answers: {:?}",
        String::from_utf8_lossy(&seen)
    );
    answers
}

/// The first whole answer in `seen`, and how many bytes it took.
fn kept_answer(seen: &[u8]) -> Option<((String, Vec<u8>), usize)> {
    let end = seen.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    let body = &seen[end + 4..];
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    match length {
        Some(length) if body.len() >= length => {
            let body = body[..length].to_vec();
            Some(((head, body), end + 4 + length))
        }
        None => {
            assert!(lower.contains("transfer-encoding: chunked"), "{head}");
            let (body, used) = crate::connectors::dechunk_start(body)?;
            Some(((head, body), end + 4 + used))
        }
        _ => None,
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

/// A connector worker (the Python echo app) behind an `http://` listener
/// that also takes WebSockets, with proxy `settings`; returns its port.
fn load_connector_worker(d: &Daemon, settings: &str) -> u16 {
    let port = free_port();
    d.load(&format!(
        "worker {{ name conn; exec python3; params {}; startup_grace 200; \
         server http://127.0.0.1:{port}; {settings} }}\n",
        repo("tests/apps/connector_echo.py").display(),
    ));
    d.wait_running("conn");
    port
}

#[test]
fn an_idle_websocket_is_closed_after_keep_alive_whatever_pings_it_sends() {
    use tungstenite::Message;
    let d = Daemon::new("ws_idle");
    let port = load_connector_worker(&d, "keep_alive 1s;");
    let mut ws = crate::connectors::websocket(port, "/ws");
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    let last_message = Instant::now();
    // Pings every 300 ms: the daemon answers them itself, so they are no
    // sign of life from the app's point of view.
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let closed = loop {
        assert!(
            last_message.elapsed() < Duration::from_secs(15),
            "still open after {:?}",
            last_message.elapsed()
        );
        let _ = ws.send(Message::Ping(Vec::new().into()));
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    let waited = last_message.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    let frame = closed.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
}

/// Opens a WebSocket over a raw connection and starts a binary frame
/// that announces `length` bytes, of which it sends `sent`.
fn stall_inside_a_frame(port: u16, length: u64, sent: usize) -> TcpStream {
    let mut stream = websocket_upgrade(port);
    start_a_frame(&mut stream, length, sent).unwrap();
    stream
}

/// A WebSocket opening handshake, as a client writes it.
const WEBSOCKET_HANDSHAKE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A raw connection upgraded to a WebSocket.
fn websocket_upgrade(port: u16) -> TcpStream {
    let mut stream = connect(port);
    stream.write_all(WEBSOCKET_HANDSHAKE).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Starts a binary frame that announces `length` bytes; sends `sent` of them.
fn start_a_frame(stream: &mut TcpStream, length: u64, sent: usize) -> std::io::Result<()> {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]); // the mask
    frame.resize(frame.len() + sent, 0x55);
    stream.write_all(&frame)
}

#[test]
fn websocket_clients_stalling_inside_huge_frames_are_closed_and_bounded() {
    let d = Daemon::new("ws_huge_frame");
    let port = load_connector_worker(&d, "keep_alive 2s;");
    let pid = d.daemon_pid().unwrap();
    let before = status_kib(pid, "VmRSS:");
    // Each announces a frame of 16 MiB - 1 (within the message limit),
    // sends 2 MiB of it and stalls.
    let clients: Vec<TcpStream> = (0..8)
        .map(|_| stall_inside_a_frame(port, (16 << 20) - 1, 2 << 20))
        .collect();
    let during = status_kib(pid, "VmRSS:");
    // What they sent, and not the 16 MiB each announced.
    assert!(
        during < before + 8 * 3 * 1024 + 16 * 1024,
        "RSS {before} KiB → {during} KiB with 8 clients inside 16 MiB frames"
    );
    let started = Instant::now();
    for mut client in clients {
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a stalled frame held its connection for {:?}",
            started.elapsed()
        );
    }
    // A frame beyond the message limit is refused at its header.
    let mut beyond = stall_inside_a_frame(port, 64 << 20, 0);
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = beyond.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn request_heads_beyond_64_kib_are_refused_at_once() {
    let d = Daemon::new("big_heads");
    let (_, port) = load_both_modes(&d, "")[1];
    let pid = d.daemon_pid().unwrap();
    let before = status_kib(pid, "VmRSS:");
    // 200 clients each start a head of 100 KB and stop before its end.
    let header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}",
        "a".repeat(100_000)
    );
    let clients: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut client = connect(port);
            client
                .set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = client.write_all(header.as_bytes());
            client
        })
        .collect();
    let during = status_kib(pid, "VmRSS:");
    for mut client in clients {
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = Vec::new();
        let read = client.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 431") || (answer.is_empty() && read.is_ok()),
            "{read:?} {answer}"
        );
    }
    assert!(
        during < before + 200 * 64 + 16 * 1024,
        "RSS {before} KiB → {during} KiB with 200 unfinished heads"
    );
}

#[test]
fn a_request_body_with_a_broken_chunk_size_is_the_clients_error() {
    let d = Daemon::new("bad_chunk");
    for (mode, port) in load_both_modes(&d, "") {
        let answer = http_raw(
            port,
            "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "{mode}: {answer}");
        // The instance is not to blame: the next request is served.
        assert_eq!(http_get(port).map(|(s, _)| s), Some(200), "{mode}");
    }
}

#[test]
fn lowering_max_conns_live_counts_the_connections_already_open() {
    let d = Daemon::new("max_conns_lowered");
    let app = d.write("headers.py", HEADERS_APP);
    let port = free_port();
    let config = |max_conns: u32| {
        d.write(
            "apm.conf",
            &format!(
                "worker {{ name m; exec python3; params {}; upstream port; startup_grace 300; \
                 server http://127.0.0.1:{port}; max_conns {max_conns}; }}\n",
                app.display()
            ),
        )
    };
    d.ok(&["load", config(2).to_str().unwrap()]);
    d.wait_running("m");
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut client = connect(port);
            let (head, _) = exchange(&mut client, request);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            client
        })
        .collect();
    d.ok(&["reload", config(1).to_str().unwrap()]);
    // Two connections are open under a limit of one: a third waits while
    // either of them is open.
    let mut waiting = connect(port);
    waiting.write_all(request).unwrap();
    let held_back = |waiting: &mut TcpStream| {
        waiting
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut byte = [0u8; 1];
        waiting.peek(&mut byte).is_err()
    };
    assert!(
        held_back(&mut waiting),
        "let in beyond the lowered max_conns"
    );
    drop(open.pop());
    assert!(
        held_back(&mut waiting),
        "let in while the one allowed connection is open"
    );
    drop(open.pop());
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (head, _) = crate::harness::exchange(&mut waiting, b"");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Raised again, the limit lets a second one in at once.
    d.ok(&["reload", config(2).to_str().unwrap()]);
    let (head, _) = exchange(&mut connect(port), request);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn past_its_client_budget_the_daemon_refuses_new_work_instead_of_growing() {
    let d = Daemon::new("client_budget");
    let port = load_connector_worker(&d, "keep_alive 60s;");
    let pid = d.daemon_pid().unwrap();
    let before = status_kib(pid, "VmRSS:");
    let frame = (16u64 << 20) - 1;
    let sent = (16 << 20) - (64 << 10);
    // 15 clients each hold most of a 16 MiB message; two more are let in
    // while one message's room is left.
    let mut holding: Vec<TcpStream> = (0..15)
        .map(|_| stall_inside_a_frame(port, frame, sent))
        .collect();
    let (mut last, mut greedy) = (websocket_upgrade(port), websocket_upgrade(port));
    start_a_frame(&mut last, frame, sent).unwrap();
    holding.push(last);
    // The one whose message would take the daemon past its budget is cut
    // off, the others stay.
    let started = Instant::now();
    let _ = start_a_frame(&mut greedy, frame, sent);
    let mut rest = Vec::new();
    let _ = greedy.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a client past the budget was kept for {:?}",
        started.elapsed()
    );
    // With less than one message's room left, new work is refused.
    let answer = http_raw(
        port,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let mut refused = connect(port);
    refused.write_all(WEBSOCKET_HANDSHAKE).unwrap();
    let mut answer = String::new();
    let _ = refused.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let during = status_kib(pid, "VmRSS:");
    assert!(
        during < before + 256 * 1024 + 48 * 1024,
        "RSS {before} KiB → {during} KiB"
    );
    let holder = &mut holding[0];
    holder
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let still_open =
        matches!(holder.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    assert!(still_open, "a client within the budget was closed");
    // Once the holders leave, the daemon serves again.
    drop(holding);
    wait_until(PATIENCE, "the daemon to serve again", || {
        http_get(port).is_some_and(|(status, _)| status == 200)
    });
}

#[test]
fn idle_websockets_cost_little_and_their_memory_goes_back_when_they_close() {
    let d = Daemon::new("ws_memory");
    let port = load_connector_worker(&d, "");
    let pid = d.daemon_pid().unwrap();
    drop(websocket_upgrade(port));
    let before = status_kib(pid, "VmRSS:");
    let clients: Vec<TcpStream> = (0..1000).map(|_| websocket_upgrade(port)).collect();
    // Each has had its handshake answered; give the daemon a moment's
    // work on the last ones by asking for one more.
    drop(websocket_upgrade(port));
    let open = status_kib(pid, "VmRSS:");
    let each = (open.saturating_sub(before)) / 1000;
    assert!(
        each < 50,
        "{each} KiB per idle WebSocket ({before} → {open} KiB)"
    );
    drop(clients);
    wait_until(PATIENCE, "the daemon to give the memory back", || {
        status_kib(pid, "VmRSS:") < before + (open - before) / 4
    });
}

/// An instance that answers every request of a keep-alive connection with
/// `ok`, holding thousands of connections at little cost (asyncio).
const MANY_CLIENTS_APP: &str = r#"
import asyncio, os
async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(os.environ["PORT"]), backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"#;

fn load_many_clients_worker(d: &Daemon) -> u16 {
    let app = d.write("many.py", MANY_CLIENTS_APP);
    let port = free_port();
    d.load(&format!(
        "worker {{ name many; exec python3; params {}; upstream port; startup_grace 300; \
         server http://127.0.0.1:{port}; }}\n",
        app.display()
    ));
    d.wait_running("many");
    port
}

/// A keep-alive client that has had one answer.
fn answered_client(port: u16) -> TcpStream {
    let mut client = connect(port);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let (head, body) = read_kept_answer(&mut client);
    assert!(
        head.starts_with("HTTP/1.1 200") && body == b"ok\n",
        "{head}"
    );
    client
}

#[test]
fn idle_keep_alive_clients_hold_no_buffers_and_are_served_again() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const CLIENTS: u64 = 2000;
    // This test's clients, on top of what the tests running beside it hold.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < CLIENTS + 2000 {
        prerequisite_missing(&format!(
            "{CLIENTS} idle clients need more open files than RLIMIT_NOFILE's hard limit of {hard}"
        ));
        return;
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let d = Daemon::new("idle_clients");
    let port = load_many_clients_worker(&d);
    let pid = d.daemon_pid().unwrap();
    drop(answered_client(port));
    let before = status_kib(pid, "VmRSS:");
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| answered_client(port)).collect();
    // Between two requests a client needs none of hyper's two 8 KiB
    // buffers, and asleep no task and no registration with tokio's reactor
    // either: with any of them left, each would cost more than this (22
    // KiB each before they sleep, 0.5 KiB after, in a test build); the
    // bound leaves room for the allocator's rounding.
    let bound_bytes = 1536;
    wait_until(
        PATIENCE,
        &format!("idle clients to cost less than {bound_bytes} bytes each"),
        || status_kib(pid, "VmRSS:").saturating_sub(before) * 1024 < bound_bytes * CLIENTS,
    );
    // They are still kept alive, and served at once when they ask again.
    for mut client in [&clients[0], &clients[clients.len() - 1]] {
        client
            .write_all(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let (head, body) = read_kept_answer(&mut client);
        assert!(
            head.starts_with("HTTP/1.1 200") && body == b"ok\n",
            "{head}"
        );
    }
}

#[test]
fn requests_split_around_a_lull_or_pipelined_are_all_answered() {
    let d = Daemon::new("lull_split");
    let port = load_many_clients_worker(&d);
    let mut client = answered_client(port);
    // Half a head, then a lull as long as the one after which an idle
    // client is parked (a client with part of a request is not), then the
    // rest with a pipelined request.
    client.write_all(b"GET /half HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    client
        .write_all(b"st: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    // Both answers may come in one read.
    for (head, body) in read_kept_answers(&mut client, 2) {
        assert!(
            head.starts_with("HTTP/1.1 200") && body == b"ok\n",
            "{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
    }
    // And after a lull with nothing read, in which the proxy parks the
    // connection, the next request too.
    std::thread::sleep(Duration::from_millis(2500));
    client
        .write_all(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let (head, _) = read_kept_answer(&mut client);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
