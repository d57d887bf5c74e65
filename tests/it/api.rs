//! The dashboard's HTTP API through a real daemon: every route its OpenAPI
//! document lists answers, nothing else does, the document validates, and
//! a script can drive workers with it as the CLI does.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::gui_request;
use crate::harness::*;
use crate::metrics::{PASSWORD, body, dashboard_and_app};

/// The dashboard's venv (selenium, openapi-spec-validator), made by `.ci/run`.
pub(crate) fn dashboard_python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-venv/bin/python");
    python.exists().then_some(python)
}

fn get_json(port: u16, path: &str) -> Value {
    serde_json::from_str(body(&gui_request(port, "GET", path, PASSWORD))).unwrap()
}

/// `METHOD PATH` with the password and the header a change needs.
fn change(port: u16, method: &str, path: &str) -> String {
    gui_request(port, method, path, &format!("X-Apm-Gui: 1\r\n{PASSWORD}"))
}

/// A connection that asked for a live log, its head read.
fn live(port: u16, path: &str) -> std::net::TcpStream {
    let mut stream = connect(port);
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{PASSWORD}\r\n").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed in the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("content-type: text/event-stream"),
        "{head}"
    );
    stream
}

/// Reads a live log until `text` arrives; how long that took.
fn until_event(stream: &mut std::net::TcpStream, text: &str) -> Duration {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0; 4096];
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let arrived = |seen: &[u8]| {
        String::from_utf8_lossy(seen)
            .lines()
            .any(|line| line.starts_with("data: ") && line.contains(text))
    };
    while !arrived(&seen) {
        assert!(
            started.elapsed() < PATIENCE,
            "no event {text}: {}",
            String::from_utf8_lossy(&seen)
        );
        if let Ok(n) = stream.read(&mut buffer) {
            seen.extend_from_slice(&buffer[..n]);
        }
    }
    started.elapsed()
}

#[test]
fn every_documented_route_answers_nothing_else_does_and_the_document_validates() {
    let d = Daemon::new("api_routes");
    let (gui, _) = dashboard_and_app(&d, "");
    let document = get_json(gui, "/api/openapi.json");
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    let mut answered = 0;
    // Removing the worker goes last: the other routes need it.
    let mut operations: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_uppercase(), path.replace("{name}", "web")))
        })
        .collect();
    operations.sort_by_key(|(method, _)| method == "DELETE");
    for (method, path) in operations {
        if path.ends_with("/logs/live") {
            live(gui, &path);
        } else {
            let target = match path.as_str() {
                "/api/workers/web/signal" => format!("{path}?signal=SIGCONT"),
                p if p.ends_with("reload") => format!("{path}?dry_run=1"),
                _ => path.clone(),
            };
            let answer = change(gui, &method, &target);
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{method} {target}: {answer}"
            );
        }
        answered += 1;
    }
    assert!(answered >= 15, "{answered} routes");
    // What the document does not list is not there: another path, or a
    // listed path with another method.
    for (method, path) in [
        ("GET", "/api/nothing"),
        ("GET", "/api/workers/web/logs/old"),
        ("GET", "/api/log"),
    ] {
        let answer = change(gui, method, path);
        assert!(
            answer.starts_with("HTTP/1.1 404") && answer.contains("no such route"),
            "{answer}"
        );
    }
    let wrong = change(gui, "PUT", "/api/workers/web");
    assert!(
        wrong.starts_with("HTTP/1.1 405") && wrong.to_lowercase().contains("allow: get, delete"),
        "{wrong}"
    );

    let Some(python) = dashboard_python() else {
        return prerequisite_missing(
            "target/dashboard-venv with openapi-spec-validator (.ci/run makes it)",
        );
    };
    let file = d.write("openapi.json", &document.to_string());
    let validated = run({
        let mut validator = Command::new(python);
        validator
            .args(["-c", "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
            .arg(&file);
        validator
    });
    assert!(
        validated.status.success() && stdout(&validated).trim() == "valid",
        "{}",
        describe(&validated)
    );
}

#[test]
fn a_script_drives_workers_through_the_api() {
    let d = Daemon::new("api_drive");
    let (gui, _) = dashboard_and_app(&d, "");
    d.run_sh(
        "signalled",
        "trap 'echo got-usr1' USR1; echo first-line; while :; do sleep 0.1; done",
        &["-startup_grace", "100"],
    );
    let first = pids(&d.wait_running("signalled"))[0];

    // Refused: without the password, and a change without the header a
    // form of another site cannot send.
    let asked = gui_request(
        gui,
        "POST",
        "/api/workers/signalled/restart",
        "X-Apm-Gui: 1\r\n",
    );
    assert!(asked.starts_with("HTTP/1.1 401"), "{asked}");
    let form = gui_request(
        gui,
        "POST",
        "/api/workers/signalled/stop",
        &format!(
            "Content-Type: application/x-www-form-urlencoded\r\nOrigin: http://evil.example\r\n{PASSWORD}"
        ),
    );
    assert!(form.starts_with("HTTP/1.1 403"), "{form}");
    assert_eq!(pids(&d.wait_running("signalled"))[0], first);

    let info = get_json(gui, "/api/workers/signalled");
    assert_eq!(info["status"]["instances"][0]["pid"], first);
    assert!(
        info["text"].as_str().unwrap().contains(" signalled;"),
        "{info}"
    );
    let missing = gui_request(gui, "GET", "/api/workers/nobody", PASSWORD);
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    // A line the worker prints after the stream opened arrives within 2 s.
    wait_until(PATIENCE, "the first line in the log", || {
        get_json(gui, "/api/workers/signalled/logs?lines=5")
            .as_array()
            .unwrap()
            .iter()
            .any(|line| line.as_str().unwrap().contains("first-line"))
    });
    let mut stream = live(gui, "/api/workers/signalled/logs/live");
    let signalled = change(gui, "POST", "/api/workers/signalled/signal?signal=SIGUSR1");
    assert!(signalled.starts_with("HTTP/1.1 200"), "{signalled}");
    let took = until_event(&mut stream, "got-usr1");
    assert!(took < Duration::from_secs(2), "the line took {took:?}");
    let bad = change(gui, "POST", "/api/workers/signalled/signal");
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

    let restarted = change(gui, "POST", "/api/workers/signalled/restart");
    assert!(restarted.starts_with("HTTP/1.1 200"), "{restarted}");
    assert_ne!(pids(&d.wait_running("signalled"))[0], first);
    // The instance keeps its exits, with their reasons, for the dashboard.
    let info = get_json(gui, "/api/workers/signalled");
    let exits = info["status"]["instances"][0]["exits"].as_array().unwrap();
    assert_eq!(exits.len(), 1, "{info}");
    assert!(
        exits[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("killed by SIG"),
        "{info}"
    );
    assert!(exits[0]["ran_ms"].as_u64().unwrap() > 0, "{info}");
    let stopped = change(gui, "POST", "/api/workers/signalled/stop");
    assert!(stopped.starts_with("HTTP/1.1 200"), "{stopped}");
    let listing = get_json(gui, "/api/workers");
    let worker = listing["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "signalled")
        .unwrap();
    assert_eq!(worker["status"], "stopped", "{worker}");
    // A worker from the command line has no file to reload: the daemon says so.
    let reload = change(gui, "POST", "/api/workers/signalled/reload");
    assert!(
        reload.starts_with("HTTP/1.1 422") && reload.contains("not a file"),
        "{reload}"
    );
    let removed = change(gui, "DELETE", "/api/workers/signalled");
    assert!(removed.starts_with("HTTP/1.1 200"), "{removed}");
    assert!(
        !get_json(gui, "/api/workers")
            .to_string()
            .contains("signalled")
    );
}

/// A connection kept alive from before a password was set is not served
/// with the secret of before: it used to go on answering the old token.
#[test]
fn a_password_set_later_ends_the_connections_of_before() {
    let d = Daemon::new("api_kept_alive");
    let gui = free_port();
    d.load(&format!(
        "daemon {{ gui_port {gui}; gui_bind 127.0.0.1; }}\n"
    ));
    wait_until(PATIENCE, "the GUI to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", gui)).is_ok()
    });
    let token = std::fs::read_to_string(d.home.join("gui.token")).unwrap();
    let request =
        format!("GET /api/workers HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Apm-Token: {token}\r\n\r\n");
    let mut kept = connect(gui);
    let (head, _) = exchange(&mut kept, request.as_bytes());
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    d.load(&format!(
        "daemon {{ gui_port {gui}; gui_bind 127.0.0.1; gui_password s3cret; }}\n"
    ));
    // The old connection is closed: the write or the read finds it so.
    let _ = kept.write_all(request.as_bytes());
    let mut answer = String::new();
    let _ = kept.read_to_string(&mut answer);
    assert!(!answer.contains("200 OK"), "{answer}");
}
