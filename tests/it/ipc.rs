//! Inter-worker IPC end to end: Node and Python agents
//! (tests/apps/ipc_agent.*) in one daemon, each driven through its control
//! channel with `apm request`, so every step also goes through the
//! operator's path.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

fn app(lang: &str) -> (&'static str, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (exec, file) = match lang {
        "node" => ("node", "ipc_agent.js"),
        "php" => ("php", "ipc_agent.php"),
        "perl" => ("perl", "ipc_agent.pl"),
        "lua" => ("lua5.4", "ipc_agent.lua"),
        _ => ("python3", "ipc_agent.py"),
    };
    (
        exec,
        root.join("tests/apps").join(file).display().to_string(),
    )
}

/// A worker block for an agent: `lang` is node or python, `listen` its
/// channels besides its control channel, `extra` more keys.
fn agent_block(name: &str, lang: &str, listen: &[&str], extra: &str) -> String {
    let (exec, params) = app(lang);
    let mut channels = vec![format!("ctl.{name}")];
    channels.extend(listen.iter().map(|c| c.to_string()));
    format!(
        "worker {{ name {name}; exec {exec}; params {params}; listen {}; env AGENT={name}; startup_grace 100; {extra} }}\n",
        channels.join(", ")
    )
}

/// Starts the agents and waits until each answers on its control channel.
fn start(d: &Daemon, blocks: &[String]) {
    d.load(&blocks.concat());
    for block in blocks {
        let name = block
            .split("name ")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        wait_until(PATIENCE, &format!("agent {name} to answer"), || {
            ctl_output(d, name, &json!({"do": "inbox"}), "2s")
                .status
                .success()
        });
        ctl(d, name, json!({"do": "inbox"}));
    }
}

fn ctl_output(d: &Daemon, name: &str, command: &Value, timeout: &str) -> std::process::Output {
    d.apm(&[
        "request",
        &format!("ctl.{name}"),
        &command.to_string(),
        "--timeout",
        timeout,
    ])
}

/// One command to an agent; its reply.
fn ctl(d: &Daemon, name: &str, command: Value) -> Value {
    let output = ctl_output(d, name, &command, "20s");
    assert!(
        output.status.success(),
        "{name} {command}: {}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The agent's events until `until` holds for all of them so far.
fn events_until(d: &Daemon, name: &str, until: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut events = Vec::new();
    wait_until(PATIENCE, &format!("events at {name}"), || {
        events.extend(
            ctl(d, name, json!({"do": "inbox"}))
                .as_array()
                .unwrap()
                .clone(),
        );
        until(&events)
    });
    events
}

fn count(events: &[Value], ev: &str) -> usize {
    events.iter().filter(|e| e["ev"] == ev).count()
}

fn pid_of(d: &Daemon, name: &str) -> u32 {
    pids(&d.worker(name).unwrap())[0]
}

fn needs_node() -> bool {
    if have_node() {
        return true;
    }
    prerequisite_missing("node is not installed: IPC between Node and Python is not tested");
    false
}

#[test]
fn a_send_reaches_every_listener_but_the_sender() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-send");
    start(
        &d,
        &[
            agent_block("n1", "node", &["news"], ""),
            agent_block("p1", "python", &["news"], ""),
            agent_block("p2", "python", &["news"], ""),
        ],
    );
    ctl(
        &d,
        "n1",
        json!({"do": "send", "channel": "news", "data": {"n": 1}}),
    );
    for listener in ["p1", "p2"] {
        let events = events_until(&d, listener, |e| !e.is_empty());
        assert_eq!(
            events,
            [json!({"ev": "msg", "channel": "news", "data": {"n": 1}})]
        );
    }
    ctl(
        &d,
        "p1",
        json!({"do": "send", "channel": "news", "data": "two"}),
    );
    events_until(&d, "n1", |e| count(e, "msg") == 1);
    events_until(&d, "p2", |e| count(e, "msg") == 1);
    // The senders never got their own: each inbox holds only the other's.
    assert_eq!(ctl(&d, "n1", json!({"do": "inbox"})), json!([]));
    assert_eq!(ctl(&d, "p1", json!({"do": "inbox"})), json!([]));
    // The operator's send reaches every listener, and says how many.
    let sent = d.ok(&["send", "news", "[1,2]", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&sent.stdout).unwrap(),
        json!({"delivered": 3})
    );
}

#[test]
fn the_first_reply_wins_and_the_three_timeouts_apply_in_order() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-request");
    start(
        &d,
        &[
            agent_block("asker", "node", &[], "ipc_timeout 300ms;"),
            agent_block("plain", "python", &[], ""),
            agent_block("fast", "node", &["q"], "env REPLY_DELAY_MS=20;"),
            agent_block("slow", "python", &["q"], "env REPLY_DELAY_MS=400;"),
            agent_block("mute", "python", &["silent"], ""),
        ],
    );
    let answer = ctl(
        &d,
        "asker",
        json!({"do": "request", "channel": "q", "data": 1, "timeout": 2000}),
    );
    assert_eq!(answer["data"], json!({"from": "fast"}), "{answer}");
    // The slow reply comes later and is dropped; the asker got exactly one.
    events_until(&d, "slow", |e| count(e, "msg") == 1);

    let no_listener = ctl(&d, "plain", json!({"do": "request", "channel": "nobody"}));
    assert_eq!(no_listener["data"], Value::Null);
    let ms = no_listener["ms"].as_f64().unwrap();
    println!("no listener: null after {ms:.2} ms");
    assert!(ms < 5.0, "{no_listener}");

    let measured = |name: &str, timeout: Option<u64>| {
        let mut command = json!({"do": "request", "channel": "silent"});
        if let Some(t) = timeout {
            command["timeout"] = json!(t);
        }
        let answer = ctl(&d, name, command);
        assert_eq!(answer["data"], Value::Null, "{answer}");
        answer["ms"].as_f64().unwrap()
    };
    let per_call = measured("asker", Some(150));
    let worker = measured("asker", None);
    let default = measured("plain", None);
    println!(
        "timeouts: per call {per_call:.0} ms, ipc_timeout {worker:.0} ms, default {default:.0} ms"
    );
    assert!((150.0..290.0).contains(&per_call), "per call: {per_call}");
    assert!((300.0..440.0).contains(&worker), "ipc_timeout: {worker}");
    assert!((500.0..640.0).contains(&default), "default: {default}");
}

#[test]
fn a_stream_fans_out_tags_its_peers_and_ends_with_its_mediator_or_last_peer() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-stream");
    let peers = ["s1", "s2", "s3"];
    start(
        &d,
        &[
            agent_block("med", "node", &[], ""),
            agent_block("s1", "node", &["room"], "env ACCEPT_STREAMS=1;"),
            agent_block("s2", "python", &["room"], "env ACCEPT_STREAMS=1;"),
            agent_block("s3", "python", &["room"], "env ACCEPT_STREAMS=1;"),
        ],
    );
    let open = |head: &str| {
        let opened = ctl(
            &d,
            "med",
            json!({"do": "open", "channel": "room", "head": head, "timeout": 5000}),
        );
        assert_eq!(opened, json!({"ok": true}));
        events_until(&d, "med", |e| count(e, "join") == 3);
        // Each peer's id, as its offer named it.
        peers
            .iter()
            .map(|p| {
                let offer = events_until(&d, p, |e| count(e, "offer") == 1);
                assert_eq!(offer[0]["head"], head);
                offer[0]["peer"].as_u64().unwrap()
            })
            .collect::<Vec<_>>()
    };

    // Fan-out, and tagging by peer id.
    let ids = open("first");
    assert_eq!(
        ctl(&d, "med", json!({"do": "write", "data": "to all"})),
        json!(true)
    );
    for p in peers {
        let got = events_until(&d, p, |e| count(e, "data") == 1);
        assert_eq!(got[0]["data"], "to all");
    }
    for p in peers {
        ctl(&d, p, json!({"do": "write", "data": format!("from {p}")}));
    }
    let got = events_until(&d, "med", |e| count(e, "data") == 3);
    for (p, id) in peers.iter().zip(&ids) {
        assert!(
            got.iter()
                .any(|e| e["data"] == format!("from {p}") && e["peer"].as_u64() == Some(*id)),
            "{p} ({id}): {got:?}"
        );
    }
    // The mediator's close ends it for every peer; writes after it are dropped.
    ctl(&d, "med", json!({"do": "close"}));
    for p in peers {
        events_until(&d, p, |e| count(e, "close") == 1);
        assert_eq!(
            ctl(&d, p, json!({"do": "write", "data": "late"})),
            json!(false)
        );
    }

    // Peers leave one by one; the last one's leaving closes the stream.
    let ids = open("second");
    for p in peers {
        ctl(&d, p, json!({"do": "close"}));
    }
    let events = events_until(&d, "med", |e| count(e, "close") == 1);
    let left: Vec<u64> = events
        .iter()
        .filter(|e| e["ev"] == "leave")
        .map(|e| e["peer"].as_u64().unwrap())
        .collect();
    assert_eq!(left, ids);
    assert_eq!(events.last().unwrap()["ev"], "close");
    assert_eq!(
        ctl(&d, "med", json!({"do": "write", "data": "late"})),
        json!(false)
    );

    // A peer killed mid-stream is seen leaving at once.
    let ids = open("third");
    let killed = pid_of(&d, "s3");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let events = events_until(&d, "med", |e| count(e, "leave") == 1);
    let leave = events.iter().find(|e| e["ev"] == "leave").unwrap();
    assert_eq!(leave["peer"].as_u64(), Some(ids[2]));
    assert_eq!(count(&events, "close"), 0, "two peers remain: {events:?}");
}

#[test]
fn a_request_whose_only_responder_is_killed_is_null_at_once() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-killed");
    start(
        &d,
        &[
            agent_block("asker", "node", &[], ""),
            agent_block("doomed", "python", &["q"], "env REPLY_DELAY_MS=60000;"),
        ],
    );
    let mut asking = d.command(&[
        "request",
        "ctl.asker",
        &json!({"do": "request", "channel": "q", "timeout": 30000}).to_string(),
        "--timeout",
        "60s",
    ]);
    let asking = asking.stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_until(PATIENCE, "the responder to hold the request", || {
        d.log("doomed", false).contains("answering in")
    });
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid_of(&d, "doomed") as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let output = run_child(asking, PATIENCE).expect("apm request to end");
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["data"], Value::Null, "{answer}");
    println!("null {:?} after the responder was killed", killed.elapsed());
    assert!(answer["ms"].as_f64().unwrap() < 10_000.0, "{answer}");
}

#[test]
fn a_listener_that_never_reads_costs_the_daemon_a_bounded_amount_of_memory() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-flood");
    // Says `ready` with the "ipc" feature, then never reads its channel.
    let sink = "import os, json, struct, time\n\
        ready = json.dumps({'protocol': 1, 'connector': 'sink', 'features': ['ipc']}).encode()\n\
        os.write(3, struct.pack('>IBI', 5 + len(ready), 2, 0) + ready)\n\
        time.sleep(3600)\n";
    let sink_path = d.write("sink.py", sink);
    let blocks = [
        agent_block("flooder", "node", &[], ""),
        format!(
            "worker {{ name sink; exec python3; params {}; listen flood; startup_grace 100; }}\n",
            sink_path.display()
        ),
    ];
    start(&d, &blocks[..1]);
    let sink_conf = d.write("sink.conf", &blocks[1]);
    d.ok(&["load", sink_conf.to_str().unwrap()]);
    d.wait_running("sink");
    let daemon = d.daemon_pid().unwrap();
    let before = status_kib(daemon, "VmRSS:");
    // 200 MiB at a listener that takes none of it.
    ctl(
        &d,
        "flooder",
        json!({"do": "flood", "channel": "flood", "count": 100_000, "size": 2048}),
    );
    let info: Value = serde_json::from_slice(&d.ok(&["info", "sink", "--json"]).stdout).unwrap();
    let dropped = info["status"]["instances"][0]["ipc_dropped"]
        .as_u64()
        .unwrap();
    let after = status_kib(daemon, "VmRSS:");
    println!(
        "flood: 100,000 messages of 2 KiB at a listener that never reads: daemon RSS {before} KiB -> {after} KiB, {dropped} dropped"
    );
    assert!(dropped > 90_000, "{info}");
    assert!(after < before + 32 * 1024, "{before} KiB -> {after} KiB");
    let text = stdout(&d.ok(&["info", "sink"]));
    assert!(text.contains(&format!("IPC: {dropped} dropped")), "{text}");
}

#[test]
fn dashboard_values_and_metrics_show_in_info() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-dash");
    start(&d, &[agent_block("panel", "node", &[], "")]);
    ctl(
        &d,
        "panel",
        json!({"do": "dash", "id": 1, "value": 42.5, "color": "#4f8cff", "metric": "myapp.requests", "amount": 1, "type": "counter"}),
    );
    ctl(
        &d,
        "panel",
        json!({"do": "dash", "id": "state", "value": "ok\u{1b}[31m", "color": null, "metric": "myapp.requests", "amount": 2, "type": "counter"}),
    );
    let info: Value = serde_json::from_slice(&d.ok(&["info", "panel", "--json"]).stdout).unwrap();
    let instance = &info["status"]["instances"][0];
    assert_eq!(
        instance["dash"],
        json!({"1": {"value": 42.5, "color": "#4f8cff"}, "state": {"value": "ok\u{1b}[31m", "color": null}})
    );
    assert_eq!(
        instance["metrics"],
        json!({"myapp.requests": {"value": 3.0, "type": "counter"}})
    );
    // The list the GUI's /api/workers serves carries them too.
    let listed = d.worker("panel").unwrap();
    assert_eq!(listed["instances"][0]["dash"], instance["dash"]);
    assert_eq!(listed["instances"][0]["metrics"], instance["metrics"]);
    let text = stdout(&d.ok(&["info", "panel"]));
    assert!(text.contains(r##"dash "1": 42.5 ("#4f8cff")"##), "{text}");
    assert!(
        text.contains(r#"metric "myapp.requests": 3.0 (counter)"#),
        "{text}"
    );
    // A worker's string reaches the terminal with its escapes escaped.
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

#[test]
fn apm_send_and_request_from_the_shell() {
    let d = Daemon::new("ipc-shell");
    start(
        &d,
        &[agent_block(
            "responder",
            "python",
            &["ops"],
            "env REPLY_DELAY_MS=0;",
        )],
    );
    let answered = d.ok(&["request", "ops", r#"{"cmd":"status"}"#]);
    assert_eq!(stdout(&answered).trim(), r#"{"from":"responder"}"#);
    let json = d.ok(&["request", "ops", "1", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&json.stdout).unwrap(),
        json!({"data": {"from": "responder"}, "status": "reply"})
    );
    let started = Instant::now();
    let nobody = d.apm(&["request", "nobody", "1", "--timeout", "10s"]);
    assert_eq!(nobody.status.code(), Some(1), "{}", describe(&nobody));
    assert!(stderr(&nobody).contains("no process listens on that channel"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let bad = d.apm(&["send", "ops", "not json"]);
    assert_eq!(bad.status.code(), Some(2), "{}", describe(&bad));
    assert!(stderr(&bad).contains("is not JSON"), "{}", describe(&bad));
    d.ok(&["send", "ops", r#""hello""#]);
    let events = events_until(&d, "responder", |e| count(e, "msg") == 3);
    assert_eq!(
        events[2],
        json!({"ev": "msg", "channel": "ops", "data": "hello"})
    );
}

#[test]
fn a_stranger_cannot_send_or_request_through_the_daemon() {
    if !nix::unistd::geteuid().is_root() {
        prerequisite_missing("not root: the test needs setpriv to become uid 65534");
        return;
    }
    let d = Daemon::new("ipc-stranger");
    start(
        &d,
        &[agent_block(
            "guarded",
            "python",
            &["ops"],
            "env REPLY_DELAY_MS=0;",
        )],
    );
    for args in [vec!["send", "ops", "1"], vec!["request", "ops", "1"]] {
        let mut command = d.command(&args);
        command.current_dir("/").uid(65534).gid(65534);
        let output = run(command);
        assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
        assert!(
            stderr(&output).contains("permission denied"),
            "{}",
            describe(&output)
        );
    }
    assert_eq!(ctl(&d, "guarded", json!({"do": "inbox"})), json!([]));
}

#[test]
fn the_references_node_example_pushes_its_dashboard_value() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-reference");
    let app = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/ipc_reference.js");
    let port = free_port();
    d.load(&format!(
        "worker {{ name example; exec node; params {}; server http://127.0.0.1:{port}; startup_grace 100; }}\n",
        app.display()
    ));
    d.wait_running("example");
    wait_until(PATIENCE, "the example to serve", || {
        http_get(port).is_some_and(|(status, body)| status == 200 && body == "Hello World")
    });
    let info: Value = serde_json::from_slice(&d.ok(&["info", "example", "--json"]).stdout).unwrap();
    let instance = &info["status"]["instances"][0];
    assert_eq!(
        instance["dash"],
        json!({"1": {"value": 42.5, "color": "#4f8cff"}}),
        "{info}"
    );
    assert_eq!(
        instance["metrics"],
        json!({"myapp.requests": {"value": 1.0, "type": "counter"}})
    );
    assert_eq!(instance["ipc_dropped"], 0);
}

#[test]
fn a_workers_statsd_block_forwards_its_metrics() {
    if !needs_node() {
        return;
    }
    let d = Daemon::new("ipc-statsd");
    let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(PATIENCE)).unwrap();
    let address = server.local_addr().unwrap();
    start(
        &d,
        &[agent_block(
            "metered",
            "node",
            &[],
            &format!("statsd {{ host {address}; prefix apps; interval 100; }}"),
        )],
    );
    for amount in [2, 3] {
        ctl(
            &d,
            "metered",
            json!({"do": "dash", "id": "x", "value": 1, "metric": "jobs.done", "amount": amount, "type": "counter"}),
        );
    }
    // Counters are sums since the previous report: the two calls may fall
    // in one report or two.
    let mut counted = 0;
    let deadline = Instant::now() + PATIENCE;
    let mut buffer = [0u8; 2048];
    while counted < 5 && Instant::now() < deadline {
        let size = server.recv(&mut buffer).unwrap();
        for line in String::from_utf8_lossy(&buffer[..size]).lines() {
            if let Some(count) = line.strip_prefix("apps.metered.0.jobs.done:") {
                counted += count.strip_suffix("|c").unwrap().parse::<u64>().unwrap();
            }
        }
    }
    assert_eq!(counted, 5);
}

#[test]
fn a_listener_whose_connector_lacks_ipc_is_named_once_in_the_daemon_log() {
    let d = Daemon::new("ipc-old-connector");
    // A connector of before IPC: its `ready` lists no features.
    let old = "import os, json, struct, time\n\
        ready = json.dumps({'protocol': 1, 'connector': 'old'}).encode()\n\
        os.write(3, struct.pack('>IBI', 5 + len(ready), 2, 0) + ready)\n\
        time.sleep(3600)\n";
    let path = d.write("old.py", old);
    d.load(&format!(
        "worker {{ name old; exec python3; params {}; listen jobs; startup_grace 100; }}\n",
        path.display()
    ));
    d.wait_daemon_log("old#0: it sets `listen` but its connector lacks the \"ipc\" feature");
    let nobody = d.apm(&["request", "jobs", "1", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&nobody.stdout).unwrap(),
        json!({"data": null, "status": "no_listener"})
    );
    assert_eq!(
        d.daemon_log().matches("lacks the \"ipc\" feature").count(),
        1
    );
}

#[test]
fn five_languages_talk_through_the_daemon() {
    if !needs_node() {
        return;
    }
    let probes: [(&str, &[&str]); 3] = [
        ("php", &["-r", "json_encode(1);"]),
        ("perl", &["-MJSON::PP", "-e", "1"]),
        ("lua5.4", &["-e", "require('cjson') require('luv')"]),
    ];
    for (exec, probe) in probes {
        if !Command::new(exec)
            .args(probe)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            prerequisite_missing(&format!("{exec} cannot run its connector"));
            return;
        }
    }
    let d = Daemon::new("ipc-five");
    let others = [
        ("py", "python"),
        ("php", "php"),
        ("pl", "perl"),
        ("lua", "lua"),
    ];
    let mut blocks = vec![agent_block("js", "node", &["ask"], "env REPLY_DELAY_MS=0;")];
    blocks.extend(
        others
            .iter()
            .map(|(name, lang)| agent_block(name, lang, &["all"], "")),
    );
    start(&d, &blocks);
    ctl(
        &d,
        "js",
        json!({"do": "send", "channel": "all", "data": {"n": 1}}),
    );
    for (name, _) in others {
        let events = events_until(&d, name, |e| !e.is_empty());
        assert_eq!(
            events,
            [json!({"ev": "msg", "channel": "all", "data": {"n": 1}})],
            "{name}"
        );
        let answer = ctl(
            &d,
            name,
            json!({"do": "request", "channel": "ask", "data": name}),
        );
        assert_eq!(answer["data"], json!({"from": "js"}), "{name}: {answer}");
    }
}
