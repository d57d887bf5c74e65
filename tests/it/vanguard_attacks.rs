//! A hostile client against Vanguard, through a real daemon and listener:
//! forged forwarding headers and disguised paths. The trusted proxy in
//! front is a connection from 127.0.0.1; a client that connects directly
//! comes from 127.0.0.2 (bound before connecting), which the workers here do
//! not trust.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::daemon::HEADERS_APP;
use crate::harness::*;

/// Where a request comes from: the trusted proxy, or a client that
/// connects directly.
#[derive(Clone, Copy)]
enum From {
    Proxy,
    Direct,
}

/// A connection to a local port from `from`'s address.
fn connect_from(from: From, port: u16) -> TcpStream {
    let source = match from {
        From::Proxy => Ipv4Addr::LOCALHOST,
        From::Direct => Ipv4Addr::new(127, 0, 0, 2),
    };
    // std cannot bind a client socket before connecting; tokio can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            let stream = socket
                .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                .await?;
            stream.into_std()
        })
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// The whole answer to `GET target` with these extra header lines.
fn get(from: From, port: u16, target: &str, headers: &str) -> String {
    let mut stream = connect_from(from, port);
    let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The status code of `get`'s answer.
fn status(from: From, port: u16, target: &str, headers: &str) -> u16 {
    let answer = get(from, port, target, headers);
    answer
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

/// Loads one headers app per `(name, settings)` on a port of its own.
fn load_workers(d: &Daemon, workers: &[(&str, &str)]) -> Vec<u16> {
    let app = d.write("headers.py", HEADERS_APP);
    let ports: Vec<u16> = workers.iter().map(|_| free_port()).collect();
    let config: String = workers
        .iter()
        .zip(&ports)
        .map(|((name, settings), port)| {
            format!(
                "worker {{ name {name}; exec python3; params {}; upstream port; startup_grace 300; server http://127.0.0.1:{port}; {settings} }}\n",
                app.display()
            )
        })
        .collect();
    d.load(&config);
    for (name, _) in workers {
        d.wait_running(name);
    }
    ports
}

#[test]
fn a_direct_client_cannot_steer_vanguard_with_forwarding_headers() {
    let d = Daemon::new("vanguard_forged_xff");
    let trusted = "trusted_proxies 127.0.0.1;";
    let ports = load_workers(
        &d,
        &[
            (
                "allowed",
                &format!("{trusted} vanguard {{ allow_ip 10.0.0.0/8; }}"),
            ),
            (
                "limited",
                &format!("{trusted} vanguard {{ rate_limit 1; rate_burst 1; ban_ttl 1h; }}"),
            ),
        ],
    );
    let (allowed, limited) = (ports[0], ports[1]);

    // `allow_ip`: a forged address from inside the range gets nowhere...
    for forged in [
        "X-Forwarded-For: 10.0.0.1\r\n",
        "X-Real-IP: 10.0.0.1\r\n",
        "X-Forwarded-For: 10.0.0.1, 10.0.0.2\r\n",
    ] {
        assert_eq!(status(From::Direct, allowed, "/", forged), 403, "{forged}");
    }
    // ...while the trusted proxy's word is taken, read from the right: the
    // first hop that is not itself the trusted proxy is the client.
    let through = |chain: &str| format!("X-Forwarded-For: {chain}\r\n");
    assert_eq!(status(From::Proxy, allowed, "/", &through("10.0.0.1")), 200);
    assert_eq!(
        status(From::Proxy, allowed, "/", &through("6.6.6.6, 10.0.0.1")),
        200
    );
    assert_eq!(
        status(From::Proxy, allowed, "/", &through("10.0.0.1, 6.6.6.6")),
        403
    );
    assert_eq!(
        status(From::Proxy, allowed, "/", &through("10.0.0.1, 127.0.0.2")),
        403,
        "127.0.0.2 is no trusted proxy here"
    );
    assert_eq!(
        status(From::Proxy, allowed, "/", &through("10.0.0.1, 127.0.0.1")),
        200,
        "a trusted hop is skipped"
    );

    // The rate limit: a new forged address each time is still one client,
    // banned at its breach; the address it forged is not.
    let victim = "203.0.113.50";
    let refused = (0..10).any(|i| {
        let forged = format!("X-Forwarded-For: 203.0.113.{}\r\n", 50 + i);
        status(From::Direct, limited, "/", &forged) == 403
    });
    assert!(refused, "rotating X-Forwarded-For evaded the rate limit");
    assert_eq!(
        status(From::Direct, limited, "/", &through("198.51.100.1")),
        403,
        "the client that breached stays banned"
    );
    assert_eq!(
        status(From::Proxy, limited, "/", &through(victim)),
        200,
        "the address the attacker forged was banned"
    );
    let info = stdout(&d.ok(&["info", "limited"]));
    assert!(
        info.contains("banned: 127.0.0.2 ") && !info.contains(&format!("banned: {victim}")),
        "{info}"
    );
}

#[test]
fn the_instance_hears_the_client_vanguard_judged_and_no_forged_hop() {
    let d = Daemon::new("vanguard_forwarded_headers");
    let ports = load_workers(
        &d,
        &[("plain", "trusted_proxies 127.0.0.1;"), ("loopback", "")],
    );
    let (plain, loopback) = (ports[0], ports[1]);
    let heard = |from: From, port: u16, headers: &str| -> (Option<String>, Option<String>) {
        let answer = get(from, port, "/headers", headers);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Names as they reach the instance: a client's keep its spelling,
        // apm's own are lowercase.
        let field = |name: &str| {
            answer.lines().find_map(|line| {
                let (key, value) = line.split_once(": ")?;
                key.eq_ignore_ascii_case(name).then(|| value.to_owned())
            })
        };
        (field("X-Forwarded-For"), field("X-Real-IP"))
    };
    let forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n";
    assert_eq!(
        heard(From::Direct, plain, forged),
        (Some("127.0.0.2".to_owned()), None),
        "a direct client's own claims are dropped"
    );
    // Through the trusted proxy: the hops from the client on, then the
    // proxy; what the client wrote in front of itself is gone.
    assert_eq!(
        heard(
            From::Proxy,
            plain,
            "X-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n"
        ),
        (
            Some("192.0.2.7, 127.0.0.1".to_owned()),
            Some("192.0.2.7".to_owned())
        )
    );
    assert_eq!(
        heard(From::Proxy, plain, "X-Real-IP: 192.0.2.8\r\n"),
        (
            Some("192.0.2.8, 127.0.0.1".to_owned()),
            Some("192.0.2.8".to_owned())
        )
    );
    assert_eq!(
        heard(From::Proxy, plain, ""),
        (Some("127.0.0.1".to_owned()), None)
    );
    // By default, any loopback address is a trusted proxy.
    assert_eq!(
        heard(From::Direct, loopback, "X-Forwarded-For: 192.0.2.9\r\n"),
        (
            Some("192.0.2.9, 127.0.0.2".to_owned()),
            Some("192.0.2.9".to_owned())
        )
    );
}

#[test]
fn ban_path_evasions_are_refused_through_the_proxy() {
    let d = Daemon::new("vanguard_ban_path_evasions");
    let ports = load_workers(
        &d,
        &[("paths", "vanguard { ban_path /admin, *.php, /.git*; }")],
    );
    let port = ports[0];
    for target in [
        "/Admin",
        "/admin/",
        "/admin;jsessionid=0123",
        "/x/..;/admin",
        "/index.php/extra",
        "/admin.",
        "/admin%20",
        "/%2561dmin",
        "/x%5c..%5cadmin",
        "/x\\..\\admin",
        "//admin",
        "/.GIT/config",
        "/%25252e%25252e/.env.php",
    ] {
        assert_eq!(status(From::Proxy, port, target, ""), 403, "{target}");
    }
    for target in ["/administrator", "/php/index.html", "/git"] {
        assert_eq!(status(From::Proxy, port, target, ""), 200, "{target}");
    }
    let info = stdout(&d.ok(&["info", "paths"]));
    assert!(info.contains("13 blocked by path"), "{info}");
}

#[test]
fn check_says_whose_forwarding_headers_each_guarded_worker_believes() {
    let d = Daemon::new("check_trusted_proxies");
    d.write(
        "apm.conf",
        "worker { name edge; exec node; trusted_proxies 173.245.48.0/20, ::1; vanguard { rate_limit 5; } }\n\
         worker { name local; exec node; vanguard { ban_path *.php; } }\n\
         worker { name direct; exec node; trust_proxy off; vanguard { ban_ip 192.0.2.0/24; } }\n\
         worker { name open; exec node; vanguard { } }\n",
    );
    let output = d.ok(&["check", "apm.conf"]);
    assert_eq!(
        note_lines(&output),
        [
            "note: worker `edge`: Vanguard believes X-Forwarded-For / X-Real-IP only on connections from \
             173.245.48.0/20, ::1/128 and unix sockets (`trusted_proxies`); any other client is judged by the address it connects from",
            "note: worker `local`: Vanguard believes X-Forwarded-For / X-Real-IP only on connections from \
             127.0.0.0/8, ::1/128 and unix sockets (loopback, the default; `trusted_proxies` names others); \
             any other client is judged by the address it connects from",
            "note: worker `direct`: Vanguard judges every client by the address it connects from (`trust_proxy false`)",
        ]
    );
}
