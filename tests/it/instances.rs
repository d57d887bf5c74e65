//! One instance of a worker at a time: `apm restart|stop|start NAME#I` and
//! the API's `instance` parameter act on that instance alone, while the
//! others keep their processes and keep serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::daemon::gui_request;
use crate::harness::*;
use crate::metrics::{PASSWORD, body, dashboard_and_app};

/// The pid of each instance, by index (None for one without a process).
fn instance_pids(d: &Daemon, name: &str) -> Vec<Option<u32>> {
    d.worker(name).unwrap()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect()
}

#[test]
fn one_instance_restarts_stops_and_starts_alone_while_the_other_serves() {
    let d = Daemon::new("instances-cli");
    let (_, port) = dashboard_and_app(&d, "instances 2;");
    d.wait_serving("web");
    let before = instance_pids(&d, "web");

    d.ok(&["restart", "web#1"]);
    let restarted = instance_pids(&d, "web");
    assert_eq!(restarted[0], before[0], "instance 0 kept its process");
    assert!(
        restarted[1].is_some() && restarted[1] != before[1],
        "{before:?} -> {restarted:?}"
    );

    // Requests through the proxy all along the stop: none fails.
    let done = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (done, served, failed) = (done.clone(), served.clone(), failed.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match http_get(port) {
                    Some((200, _)) => served.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    wait_until(PATIENCE, "requests to go through", || {
        served.load(Ordering::Relaxed) >= 20
    });
    d.ok(&["stop", "web#0"]);
    let worker = d.worker("web").unwrap();
    assert_eq!(worker["instances"][0]["status"], "stopped", "{worker}");
    assert_eq!(
        instance_pids(&d, "web"),
        vec![None, restarted[1]],
        "only instance 0 stopped"
    );
    assert!(before[0].is_some_and(|pid| !alive(pid)));
    let at_stop = served.load(Ordering::Relaxed);
    wait_until(PATIENCE, "requests to go through instance 1", || {
        served.load(Ordering::Relaxed) >= at_stop + 50
    });
    done.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed around the stop of web#0"
    );
    // The wanted state says so: a restart of the others leaves it stopped.
    d.ok(&["restart", "web#1"]);
    assert_eq!(instance_pids(&d, "web")[0], None);

    d.ok(&["start", "web#0"]);
    d.wait_serving("web");
    let started = instance_pids(&d, "web");
    assert!(
        started[0].is_some() && started[0] != before[0],
        "{started:?}"
    );

    let out_of_range = d.apm(&["stop", "web#5"]);
    assert!(!out_of_range.status.success());
    assert!(
        stderr(&out_of_range)
            .contains("`web` has 2 instance(s) (web#0 to web#1); #5 does not exist"),
        "{}",
        describe(&out_of_range)
    );
    let not_a_number = d.apm(&["restart", "web#one"]);
    assert_eq!(
        not_a_number.status.code(),
        Some(2),
        "{}",
        describe(&not_a_number)
    );
    assert_eq!(instance_pids(&d, "web"), started, "nothing changed");
}

#[test]
fn the_api_restarts_stops_and_starts_one_instance() {
    let d = Daemon::new("instances-api");
    let (gui, _) = dashboard_and_app(&d, "instances 2;");
    d.wait_serving("web");
    let post = |path: &str| gui_request(gui, "POST", path, &format!("X-Apm-Gui: 1\r\n{PASSWORD}"));
    let before = instance_pids(&d, "web");

    let report: serde_json::Value =
        serde_json::from_str(body(&post("/api/workers/web/restart?instance=0"))).unwrap();
    let after = instance_pids(&d, "web");
    assert!(
        after[0].is_some() && after[0] != before[0],
        "{before:?} -> {after:?}"
    );
    assert_eq!(after[1], before[1]);
    // The report is that instance's own.
    let instances = report["data"]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{report}");
    assert_eq!(instances[0]["index"], 0, "{report}");

    body(&post("/api/workers/web/stop?instance=1"));
    assert_eq!(instance_pids(&d, "web"), vec![after[0], None]);
    body(&post("/api/workers/web/start?instance=1"));
    let started = instance_pids(&d, "web");
    assert!(
        started[1].is_some() && started[1] != before[1],
        "{started:?}"
    );

    let refused = post("/api/workers/web/stop?instance=2");
    assert!(refused.starts_with("HTTP/1.1 422"), "{refused}");
    assert!(refused.contains("has 2 instance(s)"), "{refused}");
    let refused = post("/api/workers/web/restart?instance=first");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    assert_eq!(instance_pids(&d, "web"), started, "nothing changed");
}
