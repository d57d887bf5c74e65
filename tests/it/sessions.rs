//! Zero-downtime restarts (issue 18): what an instance has in flight is
//! answered before it is signalled, and with `session_persist` its
//! WebSocket and TCP sessions move to another instance without the client
//! noticing. The apps are tests/apps/session_counter.{js,py}.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::harness::*;

fn app(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/apps")
        .join(file)
}

/// The counter app in each connector language this machine can run:
/// (worker name, exec, app).
fn counter_apps() -> Vec<(&'static str, &'static str, PathBuf)> {
    let mut apps = vec![("py", "python3", app("session_counter.py"))];
    if have_node() {
        apps.push(("node", "node", app("session_counter.js")));
    } else {
        prerequisite_missing("node is not installed: the Node connector's hand-off is not tested");
    }
    for (name, exec, ext, _) in crate::polyglot::runnable() {
        apps.push((name, exec, app(&format!("session_counter.{ext}"))));
    }
    apps
}

/// One counter session, over a WebSocket or a TCP connection: each
/// `send` is the next counter, and its answer must carry the running
/// total, whichever instance gives it.
enum Counter {
    Ws(Box<tungstenite::WebSocket<TcpStream>>),
    Tcp(BufReader<TcpStream>),
}

impl Counter {
    fn ws(port: u16) -> Counter {
        Counter::Ws(Box::new(crate::connectors::websocket(port, "/count")))
    }

    fn tcp(port: u16) -> Counter {
        Counter::Tcp(BufReader::new(connect(port)))
    }

    fn ask(&mut self, word: &str) -> Result<String, String> {
        match self {
            Counter::Ws(ws) => {
                ws.send(Message::text(word)).map_err(|e| e.to_string())?;
                loop {
                    match ws.read().map_err(|e| e.to_string())? {
                        Message::Text(text) => return Ok(text.as_str().to_owned()),
                        Message::Close(frame) => return Err(format!("closed: {frame:?}")),
                        _ => {}
                    }
                }
            }
            Counter::Tcp(reader) => {
                reader
                    .get_mut()
                    .write_all(format!("{word}\n").as_bytes())
                    .map_err(|e| e.to_string())?;
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => Err("closed".to_owned()),
                    Ok(_) => Ok(line.trim_end().to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// Sends counters every 20 ms until `stop`; checks every answer and
    /// returns how many went through and the processes that answered.
    fn run(mut self, what: String, stop: Arc<AtomicBool>) -> (u64, Vec<u32>) {
        let mut pids = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let answer = self
                .ask(&n.to_string())
                .unwrap_or_else(|e| panic!("{what}: counter {n}: {e}"));
            let fields: Vec<&str> = answer.split(' ').collect();
            assert_eq!(
                fields[..2],
                [n.to_string(), (n * (n + 1) / 2).to_string()],
                "{what}: counter {n} got {answer:?}"
            );
            let pid: u32 = fields[2].parse().unwrap();
            if pids.last() != Some(&pid) {
                pids.push(pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (n, pids)
    }
}

#[test]
fn websocket_and_tcp_sessions_stay_connected_through_five_rolling_restarts() {
    let d = Daemon::new("sessions-rolling");
    let mut config = String::new();
    let mut workers = Vec::new();
    for (name, exec, app) in counter_apps() {
        let (ws, tcp) = (free_port(), free_port());
        config.push_str(&format!(
            "worker {{ name {name}; exec {exec}; params {}; instances 2; rolling true; \
             rolling_delay 100; startup_grace 100; session_persist true; \
             server ws://127.0.0.1:{ws}, tcp://127.0.0.1:{tcp}; }}\n",
            app.display()
        ));
        workers.push((name, ws, tcp));
    }
    d.load(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for &(name, ws, tcp) in &workers {
        d.wait_running(name);
        d.wait_serving(name);
        for (what, counter) in [("ws", Counter::ws(ws)), ("tcp", Counter::tcp(tcp))] {
            let (what, stop) = (format!("{name} {what}"), stop.clone());
            clients.push(std::thread::spawn(move || counter.run(what, stop)));
        }
    }
    for round in 0..5 {
        for &(name, ..) in &workers {
            let before = pids(&d.worker(name).unwrap());
            d.ok(&["restart", name]);
            let after = pids(&d.worker(name).unwrap());
            assert!(
                after.iter().all(|p| !before.contains(p)),
                "{name}, restart {round}: {before:?} then {after:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let (sent, answered_by) = client.join().unwrap();
        // Each restart moved the session at least once (its instance was
        // replaced), so it was answered by more than five processes.
        assert!(
            sent > 20 && answered_by.len() > 5,
            "{sent} counters, answered by {answered_by:?}"
        );
    }
}

#[test]
fn past_session_wait_a_session_without_a_new_instance_is_closed_with_1012_and_others_go_on() {
    let d = Daemon::new("sessions-wait");
    let never = d.path("never-ready");
    let app = app("session_counter.py");
    let (lonely_ws, lonely_tcp, steady_ws) = (free_port(), free_port(), free_port());
    d.load(&format!(
        "worker {{ name lonely; exec python3; params {app}; startup_grace 100; \
         session_persist true; session_wait 1500; env NEVER_READY={never}; \
         server ws://127.0.0.1:{lonely_ws}, tcp://127.0.0.1:{lonely_tcp}; }}\n\
         worker {{ name steady; exec python3; params {app}; instances 2; rolling true; \
         startup_grace 100; session_persist true; server ws://127.0.0.1:{steady_ws}; }}\n",
        app = app.display()
    ));
    for name in ["lonely", "steady"] {
        d.wait_running(name);
        d.wait_serving(name);
    }
    let mut ws = Counter::ws(lonely_ws);
    let mut tcp = Counter::tcp(lonely_tcp);
    let mut steady = Counter::ws(steady_ws);
    for counter in [&mut ws, &mut tcp, &mut steady] {
        assert!(counter.ask("1").unwrap().starts_with("1 1 "));
    }
    // Its replacement will never say ready.
    std::fs::write(&never, "").unwrap();
    let restarted = Instant::now();
    let restart = {
        let mut command = d.command(&["restart", "lonely"]);
        std::thread::spawn(move || command.output().unwrap())
    };
    let Counter::Ws(mut socket) = ws else {
        unreachable!()
    };
    let close = loop {
        match socket.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("the WebSocket ended without a close: {e}"),
        }
    };
    let waited = restarted.elapsed();
    let frame = close.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1012, "{frame:?}");
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "closed after {waited:?}, session_wait is 1500 ms"
    );
    let Counter::Tcp(mut reader) = tcp else {
        unreachable!()
    };
    let mut rest = Vec::new();
    assert!(
        reader.read_to_end(&mut rest).is_ok_and(|_| rest.is_empty()),
        "the TCP connection closes: {rest:?}"
    );
    d.wait_daemon_log("waited session_wait (1500 ms) for another instance to take it");
    // The other worker's session went on, and still does.
    assert!(steady.ask("2").unwrap().starts_with("2 3 "));
    drop(restart);
}

#[test]
fn an_oversized_save_is_a_clear_error_in_the_app_and_the_sessions_go_on() {
    for (name, exec, app) in counter_apps() {
        let d = Daemon::new("sessions-big");
        let ws = free_port();
        d.ok(&[
            "run",
            exec,
            app.to_str().unwrap(),
            "-name",
            name,
            "-instances",
            "2",
            "-rolling",
            "-startup_grace",
            "100",
            "-session_persist",
            "-server",
            &format!("ws://127.0.0.1:{ws}"),
        ]);
        d.wait_serving(name);
        let mut first = Counter::ws(ws);
        let mut second = Counter::ws(ws);
        for counter in [&mut first, &mut second] {
            assert!(counter.ask("1").unwrap().starts_with("1 1 "));
        }
        let refused = first.ask("big").unwrap();
        assert!(
            refused.contains("apm keeps at most 65536 per session"),
            "{name}: {refused}"
        );
        // Nothing was lost: both sessions, their instances and what they
        // saved before go on, through a restart too.
        assert!(first.ask("2").unwrap().starts_with("2 3 "));
        assert!(second.ask("2").unwrap().starts_with("2 3 "));
        d.ok(&["restart", name]);
        assert!(first.ask("3").unwrap().starts_with("3 6 "), "{name}");
        assert!(second.ask("3").unwrap().starts_with("3 6 "), "{name}");
        assert!(
            !d.daemon_log().contains("protocol error"),
            "{}",
            d.daemon_log()
        );
    }
}

/// The daemon tests' app on its own port, answering with keep-alive, on
/// a thread per connection.
fn keep_alive_port_app() -> String {
    crate::daemon::PORT_APP
        .replace(
            "(http.server.BaseHTTPRequestHandler):",
            "(http.server.BaseHTTPRequestHandler):\n    protocol_version = \"HTTP/1.1\"\n    \
             # Head and body are two writes: without this, the body waits for the\n    \
             # client's delayed ACK.\n    disable_nagle_algorithm = True",
        )
        .replace(
            "http.server.HTTPServer(",
            "http.server.ThreadingHTTPServer(",
        )
}

/// One GET on a kept-alive connection (opened again when the proxy
/// closed it): whether it was answered 200.
fn get_kept_alive(stream: &mut Option<BufReader<TcpStream>>, port: u16) -> Result<(), String> {
    let reader = match stream {
        Some(reader) => reader,
        None => stream.insert(BufReader::new(
            TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?,
        )),
    };
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)));
    let answer = (|| -> Result<(), String> {
        reader
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut status = String::new();
        reader.read_line(&mut status).map_err(|e| e.to_string())?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().map_err(|_| line.clone())?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| e.to_string())?;
        if status.split(' ').nth(1) == Some("200") {
            Ok(())
        } else {
            Err(format!(
                "{} {}",
                status.trim(),
                String::from_utf8_lossy(&body)
            ))
        }
    })();
    if answer.is_err() {
        *stream = None;
    }
    answer
}

#[test]
fn ten_thousand_requests_through_three_rolling_restarts_with_default_settings_all_succeed() {
    // No drain_timeout, no kill_timeout: the defaults; only the restarts
    // are made quicker.
    let d = Daemon::new("sessions-http");
    let port_app = d.write("port_app.py", &keep_alive_port_app());
    let (port_http, connector_http) = (free_port(), free_port());
    d.load(&format!(
        "worker {{ name byport; exec python3; params {}; instances 2; rolling true; \
         startup_grace 100; rolling_delay 100; upstream port; \
         server http://127.0.0.1:{port_http}; }}\n\
         worker {{ name byconnector; exec python3; params {}; instances 2; rolling true; \
         startup_grace 100; rolling_delay 100; server http://127.0.0.1:{connector_http}; }}\n",
        port_app.display(),
        app("session_counter.py").display()
    ));
    for (name, port) in [("byport", port_http), ("byconnector", connector_http)] {
        d.wait_serving(name);
        let done = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (done, sent) = (done.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut stream = None;
                    while !done.load(Ordering::Relaxed) || sent.load(Ordering::Relaxed) < 10_000 {
                        if let Err(e) = get_kept_alive(&mut stream, port) {
                            errors.push(e);
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    errors
                })
            })
            .collect();
        for _ in 0..3 {
            d.ok(&["restart", name]);
        }
        done.store(true, Ordering::Relaxed);
        let errors: Vec<String> = clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        let total = sent.load(Ordering::Relaxed);
        assert!(
            errors.is_empty() && total >= 10_000,
            "{name}: {} of {total} requests failed: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }
}

#[test]
fn an_idle_worker_with_a_long_drain_timeout_stops_at_once() {
    let d = Daemon::new("sessions-idle-stop");
    let port_app = d.write("port_app.py", &keep_alive_port_app());
    let port = free_port();
    d.run_port_app(
        "idle",
        &port_app,
        &format!("http://127.0.0.1:{port}"),
        &["-drain_timeout", "3000", "-startup_grace", "100"],
    );
    d.wait_serving("idle");
    assert!(http_get(port).is_some_and(|(status, _)| status == 200));
    let stopping = Instant::now();
    d.ok(&["stop", "idle"]);
    let took = stopping.elapsed();
    // drain_timeout would have made it 3 s.
    assert!(took < Duration::from_secs(1), "the stop took {took:?}");
}

#[test]
fn a_spliced_tcp_connection_keeps_its_old_instance_until_it_ends() {
    let d = Daemon::new("sessions-splice");
    let app = d.write(
        "echo.py",
        "import os, socketserver\nclass E(socketserver.BaseRequestHandler):\n    def handle(self):\n        \
         while True:\n            data = self.request.recv(1024)\n            if not data:\n                return\n            \
         self.request.sendall(b'%d ' % os.getpid() + data)\n\
         socketserver.ThreadingTCPServer(('127.0.0.1', int(os.environ['PORT'])), E).serve_forever()\n",
    );
    let port = free_port();
    d.run_port_app(
        "spliced",
        &app,
        &format!("tcp://127.0.0.1:{port}"),
        &["-startup_grace", "100", "-kill_timeout", "20000"],
    );
    d.wait_serving("spliced");
    let mut client = BufReader::new(connect(port));
    let mut echo = |word: &str| {
        client
            .get_mut()
            .write_all(format!("{word}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        client.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    };
    let old = echo("a");
    assert!(old.ends_with(" a"), "{old:?}");
    let old_pid = old.split(' ').next().unwrap().to_owned();
    let restarting = Instant::now();
    let restart = {
        let mut command = d.command(&["restart", "spliced"]);
        std::thread::spawn(move || command.output().unwrap())
    };
    wait_until(PATIENCE, "the instance to drain", || {
        d.worker("spliced")
            .is_some_and(|w| w["instances"][0]["status"] == "draining")
    });
    // Out of rotation, the old process still carries the open connection.
    assert_eq!(echo("b"), format!("{old_pid} b"));
    drop(client);
    let output = restart.join().unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    // It was stopped once the connection ended, not at kill_timeout.
    assert!(
        restarting.elapsed() < Duration::from_secs(15),
        "{:?}",
        restarting.elapsed()
    );
    let mut fresh = BufReader::new(connect(port));
    fresh.get_mut().write_all(b"c\n").unwrap();
    let mut line = String::new();
    fresh.read_line(&mut line).unwrap();
    assert!(
        line.ends_with(" c\n") && !line.starts_with(&old_pid),
        "{line:?}"
    );
}
