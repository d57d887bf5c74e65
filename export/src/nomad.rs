//! Nomad: one job `apm` with a group per worker, each running one `exec`
//! task, in `apm.nomad.hcl`.

use std::fmt::Write as _;

use crate::quote::hcl;
use crate::{Worker, duration};

/// Restart attempts that stand for apm's unlimited (0) restarts.
const UNLIMITED: u32 = 1_000_000;

pub fn export(mut workers: Vec<Worker>) -> (Vec<(String, String)>, Vec<Worker>) {
    let mut groups = String::new();
    for worker in &mut workers {
        let group = group(worker);
        for line in worker.comments().lines() {
            let _ = writeln!(
                groups,
                "  {}",
                line.replacen(
                    "# WARN: ",
                    &format!("# WARN: {}: ", crate::quote::comment(worker.name())),
                    1
                )
            );
        }
        groups.push_str(&group);
    }
    let text =
        format!("job \"apm\" {{\n  type = \"service\"\n  datacenters = [\"*\"]\n\n{groups}}}\n");
    (vec![("apm.nomad.hcl".to_owned(), text)], workers)
}

fn group(worker: &mut Worker) -> String {
    let spec = worker.spec;
    worker.warn_if_proxy_needed();
    let name = hcl(worker.name());
    let mut out = String::new();
    let count = if spec.autostart.value {
        spec.instances.value
    } else {
        0
    };
    let _ = writeln!(out, "  group {name} {{\n    count = {count}");
    let listeners = worker.tcp_listeners();
    let program_port = worker.program_port();
    if program_port.is_some() && !listeners.is_empty() {
        out.push_str("    network {\n");
        for (i, (_, port, _)) in listeners.iter().enumerate() {
            let _ = writeln!(
                out,
                "      port \"l{i}\" {{\n        static = {port}\n      }}"
            );
        }
        out.push_str("    }\n");
    }
    if spec.rolling.value {
        let _ = writeln!(
            out,
            "    update {{\n      max_parallel = 1\n      min_healthy_time = {}\n    }}",
            hcl(&duration(spec.rolling_delay.value))
        );
    } else {
        let _ = writeln!(
            out,
            "    update {{\n      min_healthy_time = {}\n    }}",
            hcl(&duration(spec.startup_grace.value))
        );
    }
    let (clean, err) = worker.restarts();
    if !(clean && err) {
        let span = spec.restart.span.or(spec.restart_err.span);
        worker.warn_at("restart", span, "Nomad's service jobs restart after every exit; apm would not restart this worker after some");
    }
    let limit = worker.restart_limit();
    let mode = if limit > 0 { "fail" } else { "delay" };
    let _ = writeln!(
        out,
        "    restart {{\n      attempts = {}\n      delay = {}\n      mode = {}",
        // Nomad counts attempts per `interval`: "unlimited" is a count no
        // interval reaches.
        if limit > 0 { limit } else { UNLIMITED },
        hcl(&duration(worker.restart_delay())),
        hcl(mode)
    );
    if let Some(grace) = &spec.err_grace {
        let _ = writeln!(out, "      interval = {}", hcl(&duration(grace.value)));
    }
    out.push_str("    }\n");
    let probe = worker.probe();
    if let (Some(_), false) = (program_port, listeners.is_empty()) {
        let _ = writeln!(
            out,
            "    service {{\n      name = {}\n      port = \"l0\"",
            hcl(&crate::quote::dns_label(worker.name()))
        );
        if let Some(probe) = &probe {
            let _ = writeln!(
                out,
                "      check {{\n        type = \"http\"\n        protocol = {}\n        path = {}\n        interval = {}\n        timeout = {}\n        check_restart {{\n          limit = {}\n        }}\n      }}",
                hcl(if probe.https { "https" } else { "http" }),
                hcl(&probe.path),
                hcl(&duration(spec.health_check_interval.value)),
                hcl(&duration(spec.health_check_timeout.value)),
                spec.health_check_threshold.value
            );
        }
        out.push_str("    }\n");
    } else if probe.is_some() {
        let span = spec.health_check.as_ref().and_then(|h| h.span);
        worker.warn_at("health_check", span, "a Nomad check belongs to a service, and this worker has no `upstream port` listener to make one");
    }
    let _ = writeln!(
        out,
        "    task {name} {{\n      driver = \"exec\"\n      kill_timeout = {}",
        hcl(&duration(spec.kill_timeout.value))
    );
    if let Some(user) = &spec.user {
        let _ = writeln!(out, "      user = {}", hcl(&user.value));
    }
    let _ = writeln!(
        out,
        "      config {{\n        command = {}",
        hcl(&spec.exec.value)
    );
    if !spec.params.is_empty() {
        let args: Vec<String> = spec.params.iter().map(|p| hcl(&p.value)).collect();
        let _ = writeln!(out, "        args = [{}]", args.join(", "));
    }
    if let Some(path) = &spec.path {
        let _ = writeln!(
            out,
            "        work_dir = {}",
            hcl(&path.value.to_string_lossy())
        );
    }
    out.push_str("      }\n");
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|e| (e.value.key.clone(), hcl(&e.value.value)))
        .collect();
    if let Some(index) = &spec.env_index {
        // Nomad's own interpolation: written raw, not through `hcl`.
        env.push((index.value.clone(), "\"${NOMAD_ALLOC_INDEX}\"".to_owned()));
    }
    if let Some(port) = program_port {
        env.push((spec.port_env.value.clone(), hcl(&port.to_string())));
    }
    if !env.is_empty() {
        out.push_str("      env = {\n");
        for (key, value) in env {
            let _ = writeln!(out, "        {} = {value}", hcl(&key));
        }
        out.push_str("      }\n");
    }
    if let Some(env_file) = &spec.env_file {
        let _ = writeln!(
            out,
            "      template {{\n        source = {}\n        destination = \"secrets/env_file\"\n        env = true\n      }}",
            hcl(&env_file.value.to_string_lossy())
        );
    }
    if let Some(limit) = &spec.memory_limit {
        let mib = limit.value.0.div_ceil(1024 * 1024).max(1);
        let _ = writeln!(
            out,
            "      resources {{\n        memory = {mib}\n        memory_max = {mib}\n      }}"
        );
    }
    out.push_str("    }\n  }\n\n");
    out
}
