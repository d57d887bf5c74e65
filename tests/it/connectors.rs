//! Connector mode end to end: the connectors against the protocol harness,
//! and the same test app in Python and Node (CommonJS and ESM) behind apm's
//! HTTP, WebSocket, TCP and unix-socket listeners, hit by real clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::certs;
use crate::harness::*;

/// A connector test app: (worker name, exec, app file, the `lang` it reports).
pub(crate) type App = (&'static str, &'static str, PathBuf, &'static str);

/// The test app in each connector flavour this machine can run.
fn apps() -> Vec<App> {
    let mut apps = vec![(
        "py",
        "python3",
        repo("tests/apps/connector_echo.py"),
        "python",
    )];
    if have_node() {
        apps.push((
            "cjs",
            "node",
            repo("tests/apps/connector_echo.js"),
            "node-cjs",
        ));
        apps.push((
            "esm",
            "node",
            repo("tests/apps/connector_echo.mjs"),
            "node-esm",
        ));
    } else {
        prerequisite_missing("node is not installed: the Node connectors are not tested");
    }
    apps
}

#[test]
fn every_connector_passes_the_protocol_harness() {
    pass_the_protocol_harness(apps());
}

/// tests/connectors/conformance.py against each app.
pub(crate) fn pass_the_protocol_harness(apps: Vec<App>) {
    for (_, exec, app, lang) in apps {
        let output = Command::new("python3")
            .arg(repo("tests/connectors/conformance.py"))
            .arg(exec)
            .arg(&app)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{lang}:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_esm_connector_is_generated_from_the_commonjs_one() {
    if !have_node() {
        prerequisite_missing("node is not installed");
        return;
    }
    let output = Command::new("node")
        .arg(repo("connectors/gen-esm.js"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "run `node connectors/gen-esm.js`:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An HTTP/1.1 response read from a stream until the server closes it.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn read_answer(stream: &mut impl Read) -> Answer {
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer { status, head, body }
}

pub(crate) fn dechunk(chunked: &[u8]) -> Vec<u8> {
    let (body, _) = dechunk_start(chunked).expect("a whole chunked body");
    body
}

/// The chunked body at the start of `chunked` and how many bytes it
/// takes (to its last, empty chunk; no trailers), once all of it is there.
pub(crate) fn dechunk_start(chunked: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = chunked.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&chunked[at..at + line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        at += line_end + 2;
        if size == 0 {
            return (chunked.len() >= at + 2).then_some((body, at + 2));
        }
        body.extend_from_slice(chunked.get(at..at + size)?);
        at += size + 2;
    }
}

fn request(port: u16, text: &str) -> Answer {
    let mut stream = connect(port);
    stream.write_all(text.as_bytes()).unwrap();
    read_answer(&mut stream)
}

fn get_json(port: u16, target: &str) -> Value {
    let answer = request(
        port,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: test.local\r\nCookie: a=1; b=two\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(
        answer.status,
        200,
        "{}\n{}",
        answer.head,
        String::from_utf8_lossy(&answer.body)
    );
    serde_json::from_slice(&answer.body).unwrap()
}

pub(crate) fn websocket(port: u16, path: &str) -> tungstenite::WebSocket<TcpStream> {
    let url = format!("ws://127.0.0.1:{port}{path}");
    tungstenite::client(url, connect(port)).unwrap().0
}

/// The next data or close message, skipping pongs.
fn receive(ws: &mut tungstenite::WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read().unwrap() {
            Message::Pong(_) | Message::Ping(_) => {}
            message => return message,
        }
    }
}

#[test]
fn connector_apps_serve_http_websocket_and_tcp_through_apm() {
    serve_http_websocket_and_tcp_through_apm("connectors", apps());
}

/// Each app, two instances behind http://, ws://, tcp:// and unix-socket
/// listeners of one daemon, hit by real clients: round robin, the session's
/// fields, status and headers, a 10 MB echo, WebSocket messages and close
/// codes, a TCP echo.
pub(crate) fn serve_http_websocket_and_tcp_through_apm(test: &str, apps: Vec<App>) {
    let d = Daemon::new(test);
    let mut config = String::new();
    let mut workers = Vec::new();
    for (name, exec, app, lang) in apps {
        let ports = [free_port(), free_port(), free_port()];
        let socket = d.path(&format!("{name}.sock"));
        config.push_str(&format!(
            "worker {{ name {name}; exec {exec}; params {}; instances 2; env_index APM_INDEX; startup_grace 200; \
             server http://127.0.0.1:{}, ws://127.0.0.1:{}, tcp://127.0.0.1:{}, http://unix:{socket}; }}\n",
            app.display(),
            ports[0],
            ports[1],
            ports[2]
        ));
        workers.push((name, lang, ports, socket));
    }
    d.load(&config);
    for (name, lang, [http, ws, tcp], socket) in workers {
        d.wait_running(name);
        // Round robin over both instances, each session described by the connector.
        let seen: Vec<Value> = (0..4)
            .map(|_| get_json(http, "/a/b%20c?x=1&y=two"))
            .collect();
        let instances: Vec<u64> = seen
            .iter()
            .map(|s| s["instance_id"].as_u64().unwrap())
            .collect();
        assert!(
            instances[0] != instances[1] && instances[0..2] == instances[2..4],
            "{name}: {instances:?}"
        );
        let session = &seen[0];
        assert_eq!(session["lang"], lang);
        assert_eq!(session["method"], "GET");
        assert_eq!(session["path"], "/a/b%20c", "{session}");
        assert_eq!(session["query"], "x=1&y=two");
        assert_eq!(session["query_object"]["y"], "two", "{session}");
        assert_eq!(session["cookies"]["b"], "two", "{session}");
        assert_eq!(session["remote_ip"], "127.0.0.1");
        assert_eq!(session["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(session["headers"]["host"], "test.local");
        assert_eq!(session["client_subject"], Value::Null);
        assert_eq!(session["env_index"], session["instance_id"].to_string());

        // Status, several Set-Cookie headers.
        let missing = request(
            http,
            "GET /status/404 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            (missing.status, missing.body.as_slice()),
            (404, &b"status 404"[..])
        );
        let cookies = request(
            http,
            "GET /cookies HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        let lower = cookies.head.to_ascii_lowercase();
        assert!(
            lower.contains("set-cookie: a=1") && lower.contains("set-cookie: b=2"),
            "{name}: {}",
            cookies.head
        );

        // 10 MB streamed through the child and back, while it is still being sent.
        let body: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sent = body.clone();
        let sender = std::thread::spawn(move || {
            writer
                .write_all(
                    format!(
                        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        sent.len()
                    )
                    .as_bytes(),
                )
                .unwrap();
            writer.write_all(&sent).unwrap();
        });
        let echoed = read_answer(&mut stream);
        sender.join().unwrap();
        assert_eq!(echoed.status, 200, "{name}: {}", echoed.head);
        assert!(
            echoed.body == body,
            "{name}: {} bytes came back",
            echoed.body.len()
        );

        // WebSocket on the ws:// listener: text, binary, ping, close code.
        let mut client = websocket(ws, "/chat");
        client.send(Message::text("héllo")).unwrap();
        assert_eq!(receive(&mut client), Message::text("héllo"), "{name}");
        let blob: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        client.send(Message::binary(blob.clone())).unwrap();
        assert_eq!(receive(&mut client), Message::binary(blob), "{name}");
        client.send(Message::Ping(b"p".to_vec().into())).unwrap();
        let pong = loop {
            if let Message::Pong(payload) = client.read().unwrap() {
                break payload;
            }
        };
        assert_eq!(&pong[..], b"p");
        client.send(Message::text("close")).unwrap();
        match receive(&mut client) {
            Message::Close(Some(frame)) => {
                assert_eq!(
                    (frame.code, frame.reason.as_str()),
                    (CloseCode::from(4000), "bye")
                );
            }
            other => panic!("{name}: expected a close, got {other:?}"),
        }
        // And as an upgrade of a request on the http:// listener.
        let mut upgraded = websocket(http, "/up");
        upgraded.send(Message::text("again")).unwrap();
        assert_eq!(receive(&mut upgraded), Message::text("again"), "{name}");
        // Only a GET opens a WebSocket; a POST with the same headers is a request.
        let posted = request(
            http,
            "POST /up HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(posted.status, 200, "{name}: {}", posted.head);
        let session: Value = serde_json::from_slice(&posted.body).unwrap();
        assert_eq!(session["method"], "POST", "{name}");

        // Raw TCP: bytes echoed; the child closes after `quit`.
        let mut raw = connect(tcp);
        raw.write_all(b"ping\n").unwrap();
        let mut echo = [0u8; 5];
        raw.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping\n");
        raw.write_all(b"quit\n").unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"quit\n", "{name}: the echo, then the close");

        // A unix-socket listener serves the same sessions, without a client address.
        let mut unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        unix.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        unix.write_all(b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let answer = read_answer(&mut unix);
        let session: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            (session["path"].as_str(), &session["remote_ip"]),
            (Some("/u"), &Value::Null),
            "{name}"
        );
    }
}

#[test]
fn a_child_that_corrupts_its_channel_is_restarted_and_the_others_keep_serving() {
    let d = Daemon::new("connector_corrupt");
    let port = free_port();
    let app = repo("tests/apps/connector_echo.py");
    d.load(&format!(
            "worker {{ name c; exec python3; params {}; instances 2; startup_grace 200; restart_err true; err_delay 100; server http://127.0.0.1:{port}; }}\n",
            app.display()
        ));
    d.wait_running("c");
    let before = d.worker("c").unwrap();
    let corrupt = request(
        port,
        "GET /corrupt HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(corrupt.status, 502, "{}", corrupt.head);
    // The other instance answers meanwhile; the broken one comes back.
    assert_eq!(http_get(port).map(|(s, _)| s), Some(200));
    d.wait_daemon_log("connector protocol error: a frame of 4294967295 bytes");
    wait_until(PATIENCE, "the broken instance to be restarted", || {
        d.worker("c")
            .is_some_and(|w| restarts(&w) > restarts(&before) && pids(&w) != pids(&before))
    });
    d.wait_running("c");
}

#[test]
fn the_session_carries_the_verified_client_certificate_subject() {
    let d = Daemon::new("connector_mtls");
    if !certs::make_certificates(d.dir())
        || !certs::signed_by_ca(
            d.dir(),
            "client",
            "/CN=alice/O=Example",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
    {
        prerequisite_missing("openssl could not make test certificates");
        return;
    }
    let port = free_port();
    d.load(&format!(
            "worker {{ name s; exec python3; params {}; startup_grace 200; server https://127.0.0.1:{port}; \
             tls on; tls_cert site.pem; tls_key site.key; tls_ca ca.pem; }}\n",
            repo("tests/apps/connector_echo.py").display()
        ));
    d.wait_running("s");
    let client = format!(
        "import ssl, urllib.request\nctx = ssl.create_default_context(cafile={ca:?})\nctx.load_cert_chain({cert:?}, {key:?})\n\
         print(urllib.request.urlopen('https://127.0.0.1:{port}/who', context=ctx, timeout=10).read().decode(), end='')\n",
        ca = d.path("ca.pem"),
        cert = d.path("client.pem"),
        key = d.path("client.key"),
    );
    let session = wait_for("an answer over mutual TLS", || {
        let output = Command::new("python3")
            .args(["-c", &client])
            .output()
            .ok()?;
        serde_json::from_slice::<Value>(&output.stdout).ok()
    });
    assert_eq!(session["tls"], true);
    assert_eq!(
        session["client_subject"], "CN=alice, O=Example",
        "{session}"
    );
    assert_eq!(session["headers"]["x-forwarded-proto"], "https");
}

#[test]
fn a_listener_stays_open_across_restarts_and_moves_with_its_address() {
    let d = Daemon::new("listener_moves");
    let (first, second) = (free_port(), free_port());
    let conf = |port: u16| {
        format!(
            "worker {{ name m; exec python3; params {}; startup_grace 200; server http://127.0.0.1:{port}; }}\n",
            repo("tests/apps/connector_echo.py").display()
        )
    };
    let config = d.load(&conf(first));
    d.wait_running("m");
    // While the only instance restarts, the socket keeps accepting: clients
    // wait in the backlog or get a 503, never a refused connection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut connections = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                TcpStream::connect(("127.0.0.1", first)).expect("the listener stays open");
                connections += 1;
            }
            connections
        })
    };
    d.ok(&["restart", "m"]);
    d.wait_running("m");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(prober.join().unwrap() > 0);
    // A reload that moves the worker closes the old address.
    std::fs::write(&config, conf(second)).unwrap();
    d.ok(&["reload", config.to_str().unwrap()]);
    d.wait_running("m");
    assert_eq!(http_get(second).map(|(status, _)| status), Some(200));
    assert!(TcpStream::connect(("127.0.0.1", first)).is_err());
}

/// The Autobahn fuzzing-client cases (`tests/autobahn.py --quick`): the same
/// verdicts through a `ws://` listener in `upstream port` mode as directly,
/// and every case passing against apm's own WebSocket in connector mode.
#[test]
fn the_websocket_proxy_passes_the_autobahn_cases() {
    let output = Command::new("python3")
        .arg(repo("tests/autobahn.py"))
        .args(["--quick", "--apm", env!("CARGO_BIN_EXE_apm")])
        .output()
        .unwrap();
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("autobahn, connector mode: 301 passed, 0 failed"),
        "{report}"
    );
}

#[test]
fn an_app_without_a_connector_gets_no_traffic_and_the_log_says_why() {
    let d = Daemon::new("connector_missing");
    let port = free_port();
    // A process that never speaks the protocol, as an app that listens on
    // a port of its own would (without `upstream port`).
    d.load(&format!(
        "worker {{ name plain; exec sleep; params 600; startup_grace 100; server http://127.0.0.1:{port}; }}\n"
    ));
    d.wait_status("plain", "running");
    assert_eq!(d.worker("plain").unwrap()["instances"][0]["serving"], false);
    assert_eq!(http_get(port).map(|(status, _)| status), Some(503));
    d.wait_daemon_log("plain#0: its connector has not said `ready` after 5 s, so it gets no traffic; an app that listens on a port itself needs `upstream port;`");
}

#[test]
fn a_child_that_stops_reading_takes_no_more_sessions_once_its_backlog_is_full() {
    let d = Daemon::new("connector_stuck");
    let port = free_port();
    d.load(&format!(
        "worker {{ name s; exec python3; params {}; startup_grace 200; server http://127.0.0.1:{port}; }}\n",
        repo("tests/apps/connector_echo.py").display()
    ));
    d.wait_running("s");
    let send = |request: &[u8]| {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(request).unwrap();
        stream
    };
    let _stuck = send(b"GET /stuck HTTP/1.1\r\nHost: a\r\n\r\n");
    // Each request's body (less than a window) goes to the daemon's backlog
    // for the child, which reads nothing now: about 80 of them fill it,
    // after which a new request is refused at once.
    let body = vec![b'x'; 200 * 1024];
    let mut request = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut held = Vec::new();
    let refused = wait_for("a request refused with 503", || {
        // A few at a time; the last of each batch is asked for an answer.
        held.extend((0..7).map(|_| send(&request)));
        let mut stream = send(&request);
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut first = [0u8; 12];
        match stream.read_exact(&mut first) {
            Ok(()) => {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                Some([&first[..], &rest].concat())
            }
            Err(_) => {
                held.push(stream);
                None
            }
        }
    });
    let text = String::from_utf8_lossy(&refused);
    assert!(
        text.starts_with("HTTP/1.1 503")
            && text.ends_with("the instance is not reading its sessions; try again later\n"),
        "{text}"
    );
    assert!(
        held.len() >= 60,
        "refused after only {} sessions",
        held.len()
    );
}

#[test]
fn a_tcp_client_that_half_closes_gets_its_answer_through_every_connector() {
    let d = Daemon::new("connector_half_close");
    let mut config = String::new();
    let mut workers = Vec::new();
    // examples/web.conf's app sets no end callback: the connector closes
    // the session once the echo is out.
    let example = ("example", "python3", repo("examples/hello.py"), "ping\n");
    let apps = apps()
        .into_iter()
        .map(|(name, exec, app, _)| (name, exec, app, "ping\nbye\n"));
    for (name, exec, app, expected) in apps.chain([example]) {
        let port = free_port();
        config.push_str(&format!(
            "worker {{ name {name}; exec {exec}; params {}; startup_grace 200; server tcp://127.0.0.1:{port}; }}\n",
            app.display()
        ));
        workers.push((name, port, expected));
    }
    d.load(&config);
    for (name, port, expected) in workers {
        d.wait_running(name);
        // `printf 'ping\n' | nc -q1 HOST PORT`: send, shut the write side, read.
        let mut client = connect(port);
        client.write_all(b"ping\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!(String::from_utf8_lossy(&answer), expected, "{name}");
    }
}
