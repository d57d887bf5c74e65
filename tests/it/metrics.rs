//! `/metrics` on the dashboard's listener: behind the same secret, its
//! figures match the traffic a test sent, and Prometheus' own checker
//! accepts the exposition.

use std::process::{Command, Stdio};

use crate::daemon::{HEADERS_APP, gui_request};
use crate::harness::*;

/// The value of the sample whose name and labels are `series` exactly.
pub(crate) fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{exposition}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// The body of a successful answer.
pub(crate) fn body(answer: &str) -> &str {
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer.split_once("\r\n\r\n").unwrap().1
}

/// A daemon with a dashboard behind `s3cret` and the headers app, with
/// Vanguard banning `/admin`, behind a listener; the dashboard's port and
/// the listener's.
pub(crate) fn dashboard_and_app(d: &Daemon, settings: &str) -> (u16, u16) {
    let (gui, port) = (free_port(), free_port());
    let app = d.write("headers.py", HEADERS_APP);
    d.load(&format!(
        "daemon {{ gui_port {gui}; gui_bind 127.0.0.1; gui_password s3cret; }}\n\
         worker {{ name web; exec python3; params {}; upstream port; startup_grace 300; \
         server http://127.0.0.1:{port}; vanguard {{ ban_path /admin; }} {settings} }}\n",
        app.display()
    ));
    d.wait_running("web");
    wait_until(PATIENCE, "the GUI to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", gui)).is_ok()
    });
    (gui, port)
}

/// HTTP Basic for the password of `dashboard_and_app`.
pub(crate) const PASSWORD: &str = "Authorization: Basic OnMzY3JldA==\r\n";

#[test]
fn metrics_count_known_traffic_and_pass_promtool() {
    let d = Daemon::new("metrics");
    let (gui, port) = dashboard_and_app(&d, "");
    for _ in 0..100 {
        assert_eq!(http_get(port).map(|(status, _)| status), Some(200));
    }
    for _ in 0..3 {
        let refused = http_raw(
            port,
            "GET /admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    }

    // The secret of every other page is asked for here too.
    let asked = gui_request(gui, "GET", "/metrics", "");
    assert!(asked.starts_with("HTTP/1.1 401"), "{asked}");
    let answer = gui_request(gui, "GET", "/metrics", PASSWORD);
    assert!(
        answer
            .to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{answer}"
    );
    let text = body(&answer);
    let listener = format!("worker=\"web\",listener=\"http://127.0.0.1:{port}\"");
    let of = |name: &str, more: &str| sample(text, &format!("{name}{{{listener}{more}}}"));
    assert_eq!(of("apm_listener_requests_total", ",code=\"2xx\""), 100.0);
    assert_eq!(of("apm_listener_requests_total", ",code=\"4xx\""), 3.0);
    assert_eq!(of("apm_listener_requests_total", ",code=\"5xx\""), 0.0);
    assert_eq!(of("apm_listener_request_duration_seconds_count", ""), 103.0);
    assert_eq!(
        of(
            "apm_listener_request_duration_seconds_bucket",
            ",le=\"+Inf\""
        ),
        103.0
    );
    assert!(of("apm_listener_request_duration_seconds_sum", "") > 0.0);
    assert_eq!(of("apm_listener_connections_total", ""), 103.0);
    // Each request's line went in and an answer with its head came out.
    let request_bytes = "GET / HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n".len();
    assert!(of("apm_listener_received_bytes_total", "") >= (100 * request_bytes) as f64);
    assert!(of("apm_listener_sent_bytes_total", "") > 103.0 * "HTTP/1.1 200 OK\r\n".len() as f64);
    wait_until(PATIENCE, "the connections to close", || {
        let text = gui_request(gui, "GET", "/metrics", PASSWORD);
        sample(
            body(&text),
            &format!("apm_listener_open_connections{{{listener}}}"),
        ) == 0.0
    });

    let worker = |verdict: &str| {
        sample(
            text,
            &format!("apm_vanguard_decisions_total{{worker=\"web\",verdict=\"{verdict}\"}}"),
        )
    };
    assert_eq!((worker("allowed"), worker("blocked_path")), (100.0, 3.0));
    assert_eq!(
        sample(text, "apm_vanguard_active_bans{worker=\"web\"}"),
        0.0
    );

    let instance = "{worker=\"web\",instance=\"0\"}";
    assert_eq!(sample(text, &format!("apm_instance_up{instance}")), 1.0);
    assert_eq!(
        sample(text, &format!("apm_instance_restarts_total{instance}")),
        0.0
    );
    assert!(
        sample(
            text,
            &format!("apm_instance_resident_memory_bytes{instance}")
        ) > 1e6
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample(text, &format!("apm_instance_start_time_seconds{instance}"));
    assert!(
        now - started < 120.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
    assert!(sample(text, "process_resident_memory_bytes") > 1e6);
    assert!(sample(text, "process_cpu_seconds_total") > 0.0);

    promtool_accepts(text);
}

/// `promtool check metrics` (Debian's `prometheus`) finds nothing to say.
fn promtool_accepts(exposition: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return prerequisite_missing("promtool (Debian's prometheus package) is not installed");
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = run_child(child, CLI_TIMEOUT).expect("promtool ends");
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "{}\n{exposition}",
        describe(&checked)
    );
}

#[test]
fn a_client_that_sleeps_and_wakes_is_one_open_connection_counted_once() {
    let d = Daemon::new("metrics_asleep");
    let (gui, port) = dashboard_and_app(&d, "");
    let figures = || {
        let text = gui_request(gui, "GET", "/metrics", PASSWORD);
        let text = body(&text);
        let listener = format!("{{worker=\"web\",listener=\"http://127.0.0.1:{port}\"}}");
        let asleep: f64 = text
            .lines()
            .filter_map(|line| line.strip_prefix("apm_proxy_thread_asleep_connections{"))
            .filter_map(|rest| rest.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        (
            sample(text, &format!("apm_listener_open_connections{listener}")),
            sample(text, &format!("apm_listener_connections_total{listener}")),
            asleep,
        )
    };
    let mut client = connect(port);
    assert_eq!(crate::threads::ask(&mut client, "/"), 200);
    wait_until(PATIENCE, "the client asleep", || {
        figures() == (1.0, 1.0, 1.0)
    });
    // Woken, its connection is made again but it is not a new one.
    assert_eq!(crate::threads::ask(&mut client, "/again"), 200);
    wait_until(PATIENCE, "the client asleep again", || {
        figures() == (1.0, 1.0, 1.0)
    });
    drop(client);
    wait_until(PATIENCE, "no connection open", || {
        figures() == (0.0, 1.0, 0.0)
    });
}
