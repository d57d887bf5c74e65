//! The proxy on several threads (`daemon { proxy_threads 2; }`, issue 22):
//! connections really spread over the threads, and what must hold per
//! client, per listener or per instance holds across them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// Each proxy thread's figures, from `apm version --json`.
fn proxy_threads(d: &Daemon) -> Vec<Value> {
    let json: Value = serde_json::from_str(&stdout(&d.ok(&["version", "--json"]))).unwrap();
    json["daemon"]["proxy_threads"]
        .as_array()
        .expect("the daemon reports its proxy threads")
        .clone()
}

/// Each proxy thread's (open, accepted) connections.
fn loads(d: &Daemon) -> Vec<(u64, u64)> {
    proxy_threads(d)
        .iter()
        .map(|t| (t["open"].as_u64().unwrap(), t["accepted"].as_u64().unwrap()))
        .collect()
}

/// Loads the headers app (`upstream port`) behind a listener, with the
/// proxy on two threads; its port.
fn load_on_two_threads(d: &Daemon, settings: &str) -> u16 {
    let app = d.write("headers.py", crate::daemon::HEADERS_APP);
    let port = free_port();
    d.load(&format!(
        "daemon {{ proxy_threads 2; }}\n\
         worker {{ name t; exec python3; params {}; upstream port; startup_grace 300;\n\
         server http://127.0.0.1:{port}; {settings} }}\n",
        app.display()
    ));
    d.wait_running("t");
    wait_until(PATIENCE, "two proxy threads", || loads(d).len() >= 2);
    port
}

/// Opens `count` connections at once, each kept open; how many each
/// thread took.
fn open(d: &Daemon, port: u16, count: usize) -> (Vec<TcpStream>, Vec<u64>) {
    let before = loads(d);
    let connections: Vec<TcpStream> = (0..count).map(|_| connect(port)).collect();
    let handed = || -> Vec<u64> {
        let now = loads(d);
        now.iter()
            .enumerate()
            .map(|(i, n)| n.1 - before.get(i).map_or(0, |b| b.1))
            .collect()
    };
    wait_until(PATIENCE, "every connection handed to a thread", || {
        handed().iter().sum::<u64>() >= count as u64
    });
    (connections, handed())
}

/// Opens `count` connections at once, each kept open, and checks that they
/// are spread over both threads (the least loaded thread takes each new one).
fn spread(d: &Daemon, port: u16, count: usize) -> Vec<TcpStream> {
    let (connections, handed) = open(d, port, count);
    for thread in 0..2 {
        assert!(
            handed[thread] >= (count / 2) as u64,
            "thread {thread} got {} of {count} connections: {handed:?}",
            handed[thread]
        );
    }
    connections
}

/// One request on a kept connection; the status, once its answer is whole
/// (`Content-Length` or chunked).
pub(crate) fn ask(stream: &mut TcpStream, target: &str) -> u16 {
    stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            let whole = match length {
                Some(length) => body.len() >= length,
                None => body.ends_with("0\r\n\r\n"),
            };
            if whole {
                return head[9..12].parse().unwrap();
            }
        }
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "closed before a whole answer: {text:?}");
        seen.extend_from_slice(&buffer[..n]);
    }
}

#[test]
fn a_client_spread_over_both_threads_meets_one_rate_limit() {
    let d = Daemon::new("threads_rate");
    let burst = 4;
    let port = load_on_two_threads(
        &d,
        &format!("vanguard {{ rate_limit 1; rate_burst {burst}; }}"),
    );
    let mut connections = spread(&d, port, 2 * burst);
    let started = Instant::now();
    // Alternating connections alternate threads: with a limiter per thread,
    // twice the burst would pass.
    let statuses: Vec<u16> = connections.iter_mut().map(|c| ask(c, "/")).collect();
    let passed = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(passed + refused, statuses.len(), "{statuses:?}");
    // A token comes back each second the requests took.
    let refilled = started.elapsed().as_secs() as usize;
    assert!(
        passed >= burst && passed <= burst + refilled,
        "{passed} passed with a burst of {burst} in {:?}: {statuses:?}",
        started.elapsed()
    );
    assert_eq!(statuses[..burst], vec![200; burst][..], "{statuses:?}");
    if refilled == 0 {
        assert_eq!(statuses[burst], 429, "burst + 1 is refused: {statuses:?}");
    }
}

#[test]
fn a_ban_made_on_one_thread_refuses_the_client_on_the_other() {
    let d = Daemon::new("threads_ban");
    let port = load_on_two_threads(&d, "vanguard { rate_limit 1; rate_burst 1; ban_ttl 1h; }");
    let mut connections = spread(&d, port, 2);
    let (first, second) = connections.split_at_mut(1);
    assert_eq!(ask(&mut first[0], "/"), 200);
    // Requests on the first thread until the client breaches and is banned.
    let mut banned = false;
    for _ in 0..5 {
        if ask(&mut first[0], "/") == 403 {
            banned = true;
            break;
        }
    }
    assert!(banned, "the client is banned after breaching the limit");
    // The other connection is on the other thread (`spread`).
    assert_eq!(ask(&mut second[0], "/"), 403);
    assert_eq!(http_get(port).map(|(s, _)| s), Some(403));
}

#[test]
fn max_conns_holds_across_threads() {
    let d = Daemon::new("threads_conns");
    let port = load_on_two_threads(&d, "max_conns 2;");
    let mut held = spread(&d, port, 2);
    for connection in &mut held {
        assert_eq!(ask(connection, "/"), 200);
    }
    // Asleep with no task, each still holds its slot.
    wait_until(PATIENCE, "both clients asleep", || asleep(&d) == 2);
    // A third connection waits in the backlog while both slots are held,
    // whichever thread would serve it; a client that leaves while asleep
    // gives its slot back.
    let mut third = connect(port);
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buffer = [0u8; 64];
    assert!(
        third.read(&mut buffer).is_err(),
        "answered beyond max_conns"
    );
    drop(held.pop());
    third.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    third.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Asks for `/` on a new connection and closes it; the thread that served
/// it and the port of the connection to the instance that the request went
/// out on (the headers app answers `peer=PORT`).
fn ask_once(d: &Daemon, port: u16) -> (usize, u16) {
    let before = loads(d);
    let mut client = connect(port);
    let (head, body) = exchange(&mut client, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let upstream = body
        .trim_end()
        .rsplit_once("peer=")
        .expect(&body)
        .1
        .parse()
        .unwrap();
    let thread = loads(d)
        .iter()
        .zip(&before)
        .position(|(now, then)| now.1 > then.1)
        .expect("a thread took the connection");
    drop(client);
    // Gone from its thread, its connection to the instance parked there.
    wait_until(PATIENCE, "the client's connection to end", || {
        loads(d).iter().all(|&(open, _)| open == 0)
    });
    (thread, upstream)
}

/// Idle connections to an instance are kept per proxy thread (a
/// connection's task runs where it was opened): a client that comes after
/// another left takes the connection that one used if it lands on the
/// same thread, and opens its own on the other.
#[test]
fn a_client_after_another_left_reuses_its_connection_to_the_instance_on_its_own_thread() {
    let d = Daemon::new("threads_pool");
    let port = load_on_two_threads(&d, "");
    let mut parked: [Option<u16>; 2] = [None, None];
    let (mut reused, mut opened) = (0, 0);
    // Equally loaded threads take turns: both threads serve clients.
    for _ in 0..4 {
        let (thread, upstream) = ask_once(&d, port);
        match parked[thread] {
            Some(kept) => {
                assert_eq!(
                    upstream, kept,
                    "thread {thread} reuses its parked connection"
                );
                reused += 1;
            }
            None => {
                assert!(
                    !parked.contains(&Some(upstream)),
                    "thread {thread} took another thread's connection"
                );
                opened += 1;
            }
        }
        parked[thread] = Some(upstream);
    }
    assert_eq!(
        (opened, reused),
        (2, 2),
        "each thread opened one and reused it"
    );
}

#[test]
fn connector_sessions_are_served_from_both_threads_and_across_restarts() {
    let d = Daemon::new("threads_connector");
    let port = free_port();
    d.load(&format!(
        "daemon {{ proxy_threads 2; }}\n\
         worker {{ name c; exec python3; params {}; instances 2; startup_grace 200; server http://127.0.0.1:{port}; }}\n",
        repo("tests/apps/connector_echo.py").display()
    ));
    d.wait_running("c");
    wait_until(PATIENCE, "the connectors ready", || {
        http_get(port).is_some_and(|(s, _)| s == 200)
    });
    for round in 0..2 {
        let mut connections = spread(&d, port, 4);
        for connection in &mut connections {
            assert_eq!(ask(connection, "/"), 200, "round {round}");
        }
        drop(connections);
        // The listener and the links of the new processes serve every thread.
        d.ok(&["restart", "c"]);
        d.wait_running("c");
        wait_until(PATIENCE, "the restarted connectors ready", || {
            http_get(port).is_some_and(|(s, _)| s == 200)
        });
    }
}

#[test]
fn the_control_socket_answers_while_wrk_saturates_the_proxy() {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        prerequisite_missing("wrk is not installed: the proxy is not saturated");
        return;
    }
    let d = Daemon::new("threads_wrk");
    let port = load_on_two_threads(&d, "");
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c64", "-d4s", &format!("http://127.0.0.1:{port}/")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(PATIENCE, "wrk's connections on both threads", || {
        loads(&d).iter().take(2).all(|&(open, _)| open > 0)
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        d.ok(&["ls"]);
        slowest = slowest.max(started.elapsed());
    }
    let output = run_child(wrk, PATIENCE).expect("wrk ends");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("Requests/sec"), "{report}");
    // Generous: `apm ls` is one process start and one call; a starved
    // supervisor would take as long as the load lasts.
    assert!(
        slowest < Duration::from_secs(1),
        "apm ls took {slowest:?} under load"
    );
}

#[test]
fn a_reload_changes_the_threads_new_connections_go_to() {
    let d = Daemon::new("threads_reload");
    let app = d.write("headers.py", crate::daemon::HEADERS_APP);
    let port = free_port();
    let config = |threads: u32| {
        format!(
            "daemon {{ proxy_threads {threads}; }}\n\
             worker {{ name t; exec python3; params {}; upstream port; startup_grace 300; server http://127.0.0.1:{port}; }}\n",
            app.display()
        )
    };
    let path = d.load(&config(1));
    d.wait_running("t");
    let (mut first, handed) = open(&d, port, 4);
    assert_eq!(
        handed.iter().skip(1).sum::<u64>(),
        0,
        "one thread serves: {handed:?}"
    );
    std::fs::write(&path, config(2)).unwrap();
    let plan = stdout(&d.ok(&["reload", path.to_str().unwrap()]));
    assert!(plan.contains("proxy_threads 1 → 2"), "{plan}");
    // The connections already open stay where they are and are served.
    for connection in &mut first {
        assert_eq!(ask(connection, "/"), 200);
    }
    // The new thread is the least loaded: it takes the next ones.
    let (mut second, handed) = open(&d, port, 4);
    assert_eq!(handed[..2], [0, 4], "{handed:?}");
    for connection in &mut second {
        assert_eq!(ask(connection, "/"), 200);
    }
}

/// The proxy threads' connections asleep (idle with no task).
fn asleep(d: &Daemon) -> u64 {
    proxy_threads(d)
        .iter()
        .map(|t| t["asleep"].as_u64().unwrap())
        .sum()
}

#[test]
fn idle_clients_sleep_with_no_task_wake_for_their_next_request_and_close_at_keep_alive() {
    let d = Daemon::new("threads_asleep");
    // Long enough for the client asked again to fall asleep (within two
    // seconds of its answer) before the others' time is up.
    let port = load_on_two_threads(&d, "keep_alive 8s;");
    let mut answered = spread(&d, port, 8);
    for client in &mut answered {
        assert_eq!(ask(client, "/"), 200);
    }
    // Two that connect and say nothing sleep too.
    let silent: Vec<TcpStream> = (0..2).map(|_| connect(port)).collect();
    wait_until(PATIENCE, "ten idle clients asleep", || asleep(&d) == 10);
    // A sleeping client is served at once, again and again.
    for _ in 0..2 {
        assert_eq!(ask(&mut answered[3], "/again"), 200);
    }
    let last_answer = Instant::now();
    wait_until(PATIENCE, "the client asleep again", || asleep(&d) == 10);
    // keep_alive counts from each one's last answer, asleep or not: every
    // connection is closed by the proxy, none by the client, and the one
    // asked last not before its 8 s.
    for (index, mut client) in answered.into_iter().chain(silent).enumerate() {
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
        if index == 3 {
            let idle = last_answer.elapsed();
            assert!(idle >= Duration::from_millis(7600), "closed after {idle:?}");
        }
    }
    wait_until(PATIENCE, "no connection open or asleep", || {
        asleep(&d) == 0 && loads(&d).iter().all(|(open, _)| *open == 0)
    });
}

#[test]
fn tls_and_unix_socket_clients_sleep_and_are_served_again_on_the_same_connection() {
    use std::io::BufRead;
    let d = Daemon::new("threads_asleep_tls_unix");
    if !crate::certs::make_certificates(d.dir()) {
        prerequisite_missing("openssl could not make test certificates");
        return;
    }
    let app = d.write("headers.py", crate::daemon::HEADERS_APP);
    let (port, socket) = (free_port(), d.path("u.sock"));
    d.load(&format!(
        "daemon {{ proxy_threads 2; }}\n\
         worker {{ name s; exec python3; params {app}; upstream port; startup_grace 300;\n\
         server https://127.0.0.1:{port}; tls on; tls_cert site.pem; tls_key site.key; }}\n\
         worker {{ name u; exec python3; params {app}; upstream port; startup_grace 300;\n\
         server http://unix:{socket}; }}\n",
        app = app.display(),
        socket = socket,
    ));
    d.wait_running("s");
    d.wait_running("u");
    // One client of each asks, idles until told, and asks again on the
    // same connection (http.client does not reconnect by itself).
    let script = format!(
        "import http.client, socket, ssl, sys\n\
         class Unix(http.client.HTTPConnection):\n\
         \x20   def connect(self):\n\
         \x20       self.sock = socket.socket(socket.AF_UNIX)\n\
         \x20       self.sock.connect({socket:?})\n\
         tls = http.client.HTTPSConnection('127.0.0.1', {port}, timeout=20,\n\
         \x20   context=ssl.create_default_context(cafile={ca:?}))\n\
         clients = [tls, Unix('a', timeout=20)]\n\
         def ask(path):\n\
         \x20   for c in clients:\n\
         \x20       c.request('GET', path)\n\
         \x20       r = c.getresponse()\n\
         \x20       r.read()\n\
         \x20       print(r.status, flush=True)\n\
         ask('/')\n\
         sockets = [c.sock for c in clients]\n\
         print('idle', flush=True)\n\
         sys.stdin.readline()\n\
         ask('/again')\n\
         print('same', all(c.sock is s for c, s in zip(clients, sockets)), flush=True)\n",
        socket = socket,
        ca = d.path("ca.pem"),
    );
    let mut python = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(python.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    while said.last().map(String::as_str) != Some("idle") {
        said.push(lines.next().expect("a line").unwrap());
    }
    wait_until(PATIENCE, "both clients asleep", || asleep(&d) == 2);
    python.stdin.take().unwrap().write_all(b"go\n").unwrap();
    said.extend(lines.map(Result::unwrap));
    assert!(python.wait().unwrap().success(), "{said:?}");
    assert_eq!(said, ["200", "200", "idle", "200", "200", "same True"]);
}
