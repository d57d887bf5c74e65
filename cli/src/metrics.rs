//! `/metrics`: the daemon's figures in Prometheus' text format (version
//! 0.0.4), rendered from the same listing `apm list --json` prints, each
//! listener's traffic figures and the daemon's own process. Labels name
//! workers, instances, listeners, status classes and verdicts only, never
//! a path or a client, so a scrape's size follows the configuration, not
//! the traffic.

use std::fmt::Write;

use apm_runtime::observe::traffic_stats::{BUCKETS, Snapshot};
use serde_json::Value;

/// The daemon's own process, as `/proc` shows it.
pub struct Own {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// Since the epoch.
    pub start_time: f64,
    /// Each proxy thread's connections, in thread order.
    pub proxy_threads: Vec<apm_runtime::traffic::threads::Load>,
}

impl Own {
    pub fn now() -> Option<Own> {
        use apm_runtime::process::procfs;
        let stat = procfs::stat(std::process::id())?;
        let tick = procfs::tick().as_secs_f64();
        // /proc/stat sums every CPU's counters to say it: read it once.
        static BOOT: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
        let boot = (*BOOT.get_or_init(|| {
            std::fs::read_to_string("/proc/stat").ok().and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok())
            })
        }))?;
        Some(Own {
            cpu_seconds: stat.cpu_ticks as f64 * tick,
            memory_bytes: stat.rss_bytes,
            start_time: boot + stat.start_ticks as f64 * tick,
            proxy_threads: apm_runtime::traffic::threads::loads(),
        })
    }
}

/// The text of a scrape. `listing` is `Call::List`'s data; `now` is the
/// time since the epoch, in seconds, that instances' start times count back
/// from.
pub fn render(listing: &Value, listeners: &[Snapshot], own: Option<&Own>, now: f64) -> String {
    let mut out = Exposition::default();
    let workers = listing["workers"].as_array().map_or(&[][..], Vec::as_slice);
    let instances = || {
        workers.iter().flat_map(|worker| {
            let name = worker["name"].as_str().unwrap_or_default();
            let list = worker["instances"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            list.iter().map(move |instance| {
                let index = instance["index"].as_u64().unwrap_or_default().to_string();
                (name, index, instance)
            })
        })
    };
    let per_instance = |out: &mut Exposition,
                        name: &str,
                        kind: &str,
                        help: &str,
                        value: &dyn Fn(&Value) -> Option<f64>| {
        out.family(name, kind, help);
        for (worker, index, instance) in instances() {
            if let Some(v) = value(instance) {
                out.sample(name, &[("worker", worker), ("instance", &index)], v);
            }
        }
    };
    per_instance(
        &mut out,
        "apm_instance_up",
        "gauge",
        "Whether the instance's process is running (1) or not (0).",
        &|i| Some(f64::from(u8::from(i["status"] == "running"))),
    );
    per_instance(
        &mut out,
        "apm_instance_cpu_seconds_total",
        "counter",
        "CPU time (user and system) the instance's current process has used.",
        &|i| i["pid"].as_u64().and(i["cpu_seconds"].as_f64()),
    );
    per_instance(
        &mut out,
        "apm_instance_resident_memory_bytes",
        "gauge",
        "Resident memory of the instance's current process.",
        &|i| i["pid"].as_u64().and(i["memory_bytes"].as_f64()),
    );
    per_instance(
        &mut out,
        "apm_instance_restarts_total",
        "counter",
        "Times the instance was started again since the worker was started.",
        &|i| i["restarts"].as_f64(),
    );
    per_instance(
        &mut out,
        "apm_instance_start_time_seconds",
        "gauge",
        "When the instance's current process started, in seconds since the epoch.",
        &|i| i["uptime_ms"].as_f64().map(|up| now - up / 1000.0),
    );
    // Connector `metric()` values, one family per kind (a family has one type).
    for (kind, name, help, scale) in [
        (
            "counter",
            "apm_app_counter_total",
            "Counters the app reports with metric(name, n, 'counter').",
            1.0,
        ),
        (
            "gauge",
            "apm_app_gauge",
            "Gauges the app reports with metric(name, n, 'gauge').",
            1.0,
        ),
        (
            "timing",
            "apm_app_timing_seconds",
            "The last timing the app reported with metric(name, ms, 'timing').",
            1e-3,
        ),
    ] {
        let family_type = if kind == "counter" {
            "counter"
        } else {
            "gauge"
        };
        let mut declared = false;
        for (worker, index, instance) in instances() {
            let Some(metrics) = instance["metrics"].as_object() else {
                continue;
            };
            for (metric, entry) in metrics {
                let Some(value) = entry["value"].as_f64().filter(|_| entry["type"] == kind) else {
                    continue;
                };
                if !declared {
                    out.family(name, family_type, help);
                    declared = true;
                }
                let labels = [("worker", worker), ("instance", &index), ("name", metric)];
                out.sample(name, &labels, value * scale);
            }
        }
    }

    render_listeners(&mut out, listeners);

    let guarded = || {
        workers.iter().filter_map(|worker| {
            let stats = worker.get("vanguard").filter(|v| v.is_object())?;
            Some((worker["name"].as_str().unwrap_or_default(), stats))
        })
    };
    out.family(
        "apm_vanguard_decisions_total",
        "counter",
        "Vanguard's verdicts on connections and requests.",
    );
    for (worker, stats) in guarded() {
        for verdict in [
            "allowed",
            "rate_limited",
            "banned",
            "blocked_path",
            "blocked_ip",
        ] {
            let value = stats[verdict].as_f64().unwrap_or_default();
            let labels = [("worker", worker), ("verdict", verdict)];
            out.sample("apm_vanguard_decisions_total", &labels, value);
        }
    }
    out.family("apm_vanguard_active_bans", "gauge", "Clients banned now.");
    for (worker, stats) in guarded() {
        let value = stats["banned_now"].as_f64().unwrap_or_default();
        out.sample("apm_vanguard_active_bans", &[("worker", worker)], value);
    }
    out.family(
        "apm_vanguard_tracked_clients",
        "gauge",
        "Clients the rate limiter remembers.",
    );
    for (worker, stats) in guarded() {
        let value = stats["tracked"].as_f64().unwrap_or_default();
        out.sample("apm_vanguard_tracked_clients", &[("worker", worker)], value);
    }

    if let Some(own) = own {
        out.family(
            "process_cpu_seconds_total",
            "counter",
            "CPU time (user and system) the apm daemon has used.",
        );
        out.sample("process_cpu_seconds_total", &[], own.cpu_seconds);
        out.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the apm daemon.",
        );
        out.sample(
            "process_resident_memory_bytes",
            &[],
            own.memory_bytes as f64,
        );
        out.family(
            "process_start_time_seconds",
            "gauge",
            "When the apm daemon started, in seconds since the epoch.",
        );
        out.sample("process_start_time_seconds", &[], own.start_time);
        render_proxy_threads(&mut out, &own.proxy_threads);
    }
    out.text
}

/// How the proxy's threads share the connections (`proxy_threads`).
fn render_proxy_threads(out: &mut Exposition, threads: &[apm_runtime::traffic::threads::Load]) {
    type Figure = fn(&apm_runtime::traffic::threads::Load) -> u64;
    for (name, kind, help, value) in [
        (
            "apm_proxy_thread_open_connections",
            "gauge",
            "Client connections open on each proxy thread.",
            (|t| t.open) as Figure,
        ),
        (
            "apm_proxy_thread_connections_total",
            "counter",
            "Client connections handed to each proxy thread.",
            |t| t.accepted,
        ),
        (
            "apm_proxy_thread_asleep_connections",
            "gauge",
            "Idle client connections of each proxy thread that wait with no task.",
            |t| t.asleep,
        ),
    ] {
        out.family(name, kind, help);
        for (index, thread) in threads.iter().enumerate() {
            out.sample(
                name,
                &[("thread", &index.to_string())],
                value(thread) as f64,
            );
        }
    }
}

fn listener_labels(s: &Snapshot) -> [(&'static str, &str); 2] {
    [("worker", &s.worker), ("listener", &s.listener)]
}

fn render_listeners(out: &mut Exposition, listeners: &[Snapshot]) {
    out.family(
        "apm_listener_requests_total",
        "counter",
        "Requests the proxy answered, by the answer's status class.",
    );
    for s in listeners {
        for (class, count) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(s.requests) {
            let [worker, listener] = listener_labels(s);
            let labels = [worker, listener, ("code", class)];
            out.sample("apm_listener_requests_total", &labels, count as f64);
        }
    }
    let histogram = "apm_listener_request_duration_seconds";
    out.family(
        histogram,
        "histogram",
        "Time from a request's head to its answer's head.",
    );
    for s in listeners {
        let [worker, listener] = listener_labels(s);
        let mut cumulative = 0;
        for (i, count) in s.buckets.iter().enumerate() {
            cumulative += count;
            let bound = BUCKETS.get(i).map_or("+Inf".to_owned(), |b| number(*b));
            let labels = [worker, listener, ("le", &bound)];
            out.sample(&format!("{histogram}_bucket"), &labels, cumulative as f64);
        }
        out.sample(&format!("{histogram}_sum"), &listener_labels(s), s.seconds);
        out.sample(
            &format!("{histogram}_count"),
            &listener_labels(s),
            cumulative as f64,
        );
    }
    for (name, kind, help, value) in [
        (
            "apm_listener_open_connections",
            "gauge",
            "Client connections open now.",
            (|s| s.open) as fn(&Snapshot) -> u64,
        ),
        (
            "apm_listener_connections_total",
            "counter",
            "Client connections accepted.",
            |s| s.accepted,
        ),
        (
            "apm_listener_received_bytes_total",
            "counter",
            "Bytes read from clients.",
            |s| s.received,
        ),
        (
            "apm_listener_sent_bytes_total",
            "counter",
            "Bytes written to clients.",
            |s| s.sent,
        ),
    ] {
        out.family(name, kind, help);
        for s in listeners {
            out.sample(name, &listener_labels(s), value(s) as f64);
        }
    }
}

/// The exposition being written.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        for (i, (key, value)) in labels.iter().enumerate() {
            self.text.push(if i == 0 { '{' } else { ',' });
            self.text.push_str(key);
            self.text.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.text.push_str("\\\\"),
                    '"' => self.text.push_str("\\\""),
                    '\n' => self.text.push_str("\\n"),
                    c => self.text.push(c),
                }
            }
            self.text.push('"');
        }
        if !labels.is_empty() {
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(&number(value));
        self.text.push('\n');
    }
}

/// A sample value as Prometheus reads it (Rust's `inf` is its `+Inf`).
fn number(value: f64) -> String {
    match value {
        v if v.is_nan() => "NaN".to_owned(),
        v if v == f64::INFINITY => "+Inf".to_owned(),
        v if v == f64::NEG_INFINITY => "-Inf".to_owned(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_infinities_spelled_as_prometheus_reads_them() {
        let mut out = Exposition::default();
        out.sample("x", &[("worker", "a\"b\\c\nd")], f64::INFINITY);
        out.sample("y", &[], 0.005);
        assert_eq!(out.text, "x{worker=\"a\\\"b\\\\c\\nd\"} +Inf\ny 0.005\n");
    }

    #[test]
    fn each_proxy_threads_connections_are_samples() {
        use apm_runtime::traffic::threads::Load;
        let own = Own {
            cpu_seconds: 1.0,
            memory_bytes: 1,
            start_time: 1.0,
            proxy_threads: vec![
                Load {
                    open: 2,
                    accepted: 9,
                    asleep: 1,
                },
                Load {
                    open: 3,
                    accepted: 8,
                    asleep: 0,
                },
            ],
        };
        let text = render(&serde_json::json!({}), &[], Some(&own), 1000.0);
        for expected in [
            "apm_proxy_thread_open_connections{thread=\"0\"} 2\n",
            "apm_proxy_thread_open_connections{thread=\"1\"} 3\n",
            "apm_proxy_thread_connections_total{thread=\"1\"} 8\n",
            "apm_proxy_thread_asleep_connections{thread=\"0\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn instances_vanguard_and_app_metrics_become_samples() {
        let listing = serde_json::json!({"workers": [{
        "name": "web",
        "vanguard": {"allowed": 7, "rate_limited": 1, "banned": 2, "blocked_path": 0,
                     "blocked_ip": 0, "banned_now": 1, "tracked": 3},
        "instances": [
            {"index": 0, "status": "running", "pid": 10, "uptime_ms": 5000, "restarts": 2,
             "cpu_seconds": 1.5, "memory_bytes": 4096,
             "metrics": {"jobs": {"value": 4, "type": "counter"},
                         "lag": {"value": 250, "type": "timing"}}},
            {"index": 1, "status": "crashed", "pid": null, "uptime_ms": null, "restarts": 0,
             "cpu_seconds": 0.0, "memory_bytes": 0}
        ]}]});
        let text = render(&listing, &[], None, 1000.0);
        for expected in [
            "apm_instance_up{worker=\"web\",instance=\"0\"} 1\n",
            "apm_instance_up{worker=\"web\",instance=\"1\"} 0\n",
            "apm_instance_cpu_seconds_total{worker=\"web\",instance=\"0\"} 1.5\n",
            "apm_instance_restarts_total{worker=\"web\",instance=\"0\"} 2\n",
            "apm_instance_start_time_seconds{worker=\"web\",instance=\"0\"} 995\n",
            "apm_app_counter_total{worker=\"web\",instance=\"0\",name=\"jobs\"} 4\n",
            "apm_app_timing_seconds{worker=\"web\",instance=\"0\",name=\"lag\"} 0.25\n",
            "apm_vanguard_decisions_total{worker=\"web\",verdict=\"banned\"} 2\n",
            "apm_vanguard_active_bans{worker=\"web\"} 1\n",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        // A process that is not running has no CPU, memory or start time.
        assert!(
            !text.contains("apm_instance_resident_memory_bytes{worker=\"web\",instance=\"1\"}")
        );
        assert!(!text.contains("apm_instance_start_time_seconds{worker=\"web\",instance=\"1\"}"));
        assert!(!text.contains("apm_app_gauge"), "no family without samples");
    }
}
