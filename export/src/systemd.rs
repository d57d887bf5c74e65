//! systemd: a unit per worker, or a template `NAME@.service` with a
//! `NAME.target` that wants each instance.

use std::fmt::Write as _;

use crate::quote::systemd as word;
use crate::{Worker, duration};

pub fn export(mut workers: Vec<Worker>) -> (Vec<(String, String)>, Vec<Worker>) {
    let templates: Vec<(String, bool)> = workers
        .iter()
        .map(|w| (w.name().to_owned(), w.spec.instances.value > 1))
        .collect();
    let mut files = Vec::new();
    for worker in &mut workers {
        let name = worker.name().to_owned();
        let several = worker.spec.instances.value > 1;
        let body = unit(worker, &templates);
        let mut text = worker.comments();
        text.push_str(&body);
        if several {
            files.push((format!("{name}@.service"), text));
            files.push((format!("{name}.target"), target(worker)));
        } else {
            files.push((format!("{name}.service"), text));
        }
    }
    (files, workers)
}

/// The unit that stands for a dependency on `name`.
fn unit_of(name: &str, templates: &[(String, bool)]) -> String {
    let several = templates.iter().any(|(n, many)| n == name && *many);
    if several {
        format!("{name}.target")
    } else {
        format!("{name}.service")
    }
}

fn target(worker: &Worker) -> String {
    let name = worker.name();
    let instances: Vec<String> = (0..worker.spec.instances.value)
        .map(|i| format!("{name}@{i}.service"))
        .collect();
    let mut out = format!(
        "[Unit]\nDescription=apm worker {name}, every instance\nWants={}\nAfter={}\n",
        instances.join(" "),
        instances.join(" ")
    );
    if worker.spec.autostart.value {
        out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    }
    out
}

/// A path or name for a setting that takes it unquoted, or `None` (warned)
/// when it holds what a unit file cannot say.
fn path(
    worker: &mut Worker,
    key: &str,
    span: Option<apm_compiler::source::Span>,
    text: &str,
) -> Option<String> {
    if text.chars().any(char::is_control) {
        worker.warn_at(
            key,
            span,
            "the value holds a control character, which a unit file cannot hold; it is left out",
        );
        return None;
    }
    Some(text.replace('%', "%%"))
}

/// `exec` as systemd takes it: a name looked up in PATH or an absolute
/// path. apm runs `./app` from the worker's `path`, which systemd does not.
fn program(worker: &mut Worker) -> String {
    let exec = &worker.spec.exec;
    if exec.value.chars().any(char::is_control) {
        let span = exec.span;
        worker.warn_at(
            "exec",
            span,
            "the program's name holds a control character: systemd refuses to run it",
        );
    }
    if !exec.value.contains('/') || exec.value.starts_with('/') {
        return exec.value.clone();
    }
    match &worker.spec.path {
        Some(dir) => dir.value.join(&exec.value).to_string_lossy().into_owned(),
        None => {
            let span = exec.span;
            worker.warn_at(
                "exec",
                span,
                "a relative program without `path` runs from the daemon's directory, which a unit does not know; \
                 it is made absolute from the config file's directory",
            );
            let dir = span
                .map(|s| {
                    worker
                        .sources
                        .path(s.file)
                        .parent()
                        .unwrap_or(std::path::Path::new("/"))
                        .to_path_buf()
                })
                .unwrap_or_else(|| "/".into());
            let joined = dir.join(&exec.value);
            let absolute = if joined.is_absolute() {
                joined
            } else {
                std::path::Path::new("/").join(joined)
            };
            absolute.to_string_lossy().into_owned()
        }
    }
}

fn unit(worker: &mut Worker, templates: &[(String, bool)]) -> String {
    let spec = worker.spec;
    let name = worker.name().to_owned();
    worker.warn_if_proxy_needed();
    let several = spec.instances.value > 1;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "[Unit]\nDescription=apm worker {name}{}",
        if several { ", instance %i" } else { "" }
    );
    for dependency in &spec.depends_on {
        let unit = unit_of(&dependency.value, templates);
        let _ = writeln!(out, "Wants={unit}\nAfter={unit}");
    }
    if several {
        let _ = writeln!(out, "PartOf={name}.target");
    }
    let limit = worker.restart_limit();
    if limit > 0 {
        let interval = spec
            .err_grace
            .as_ref()
            .map_or(0, |g| g.value.0.div_ceil(1000));
        let _ = writeln!(
            out,
            "StartLimitBurst={limit}\nStartLimitIntervalSec={}",
            if interval > 0 {
                interval.to_string()
            } else {
                "infinity".to_owned()
            }
        );
    }
    out.push_str("\n[Service]\nType=exec\n");
    let mut command = vec![word(&program(worker), true)];
    command.extend(spec.params.iter().map(|p| word(&p.value, true)));
    let _ = writeln!(out, "ExecStart={}", command.join(" "));
    if let Some(dir) = &spec.path {
        let span = dir.span;
        if let Some(dir) = path(worker, "path", span, &dir.value.to_string_lossy()) {
            let _ = writeln!(out, "WorkingDirectory={dir}");
        }
    }
    if let Some(user) = &spec.user {
        let span = user.span;
        if let Some(user) = path(worker, "user", span, &user.value) {
            let _ = writeln!(out, "User={user}");
        }
    }
    for env in &spec.env {
        let _ = writeln!(
            out,
            "Environment={}",
            word(&format!("{}={}", env.value.key, env.value.value), false)
        );
    }
    if let Some(index) = &spec.env_index {
        let value = if several { "%i" } else { "0" };
        let _ = writeln!(out, "Environment={}={value}", index.value);
    }
    if let Some(port) = worker.program_port() {
        if several {
            let span = spec.instances.span;
            worker.warn_at(
                "instances",
                span,
                "instances of a template unit cannot share one port; each gets none",
            );
        } else {
            let _ = writeln!(out, "Environment={}={port}", spec.port_env.value);
        }
    }
    if let Some(env_file) = &spec.env_file {
        let span = env_file.span;
        if let Some(file) = path(worker, "env_file", span, &env_file.value.to_string_lossy()) {
            let _ = writeln!(out, "EnvironmentFile={file}");
        }
    }
    if let Some(limit) = &spec.memory_limit {
        let _ = writeln!(out, "MemoryMax={}", limit.value.0);
    }
    let _ = writeln!(out, "TimeoutStopSec={}", duration(spec.kill_timeout.value));
    let (clean, err) = worker.restarts();
    let restart = if !spec.restart_on_exit_codes.is_empty() {
        let codes: Vec<String> = spec
            .restart_on_exit_codes
            .iter()
            .map(|c| c.value.to_string())
            .collect();
        let _ = writeln!(out, "RestartForceExitStatus={}", codes.join(" "));
        "no"
    } else {
        match (clean, err) {
            (true, true) => "always",
            (true, false) => "on-success",
            (false, true) => "on-failure",
            (false, false) => "no",
        }
    };
    let _ = writeln!(
        out,
        "Restart={restart}\nRestartSec={}",
        duration(worker.restart_delay())
    );
    for (key, setting) in [("log", &spec.log), ("err_log", &spec.err_log)] {
        if let Some(file) = setting {
            let span = file.span;
            if let Some(file) = path(worker, key, span, &file.value.to_string_lossy()) {
                let stream = if key == "log" {
                    "StandardOutput"
                } else {
                    "StandardError"
                };
                let _ = writeln!(out, "{stream}=append:{file}");
            }
        }
    }
    if let Some(tag) = spec.syslog_tag.as_ref().or(spec.prefix.as_ref()) {
        // An identifier is one word: anything else becomes `_`.
        let tag: String = tag
            .value
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '%' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let _ = writeln!(out, "SyslogIdentifier={tag}");
    }
    if let Some(vanguard) = &spec.vanguard {
        if !vanguard.allow_ip.is_empty() {
            let nets: Vec<String> = vanguard
                .allow_ip
                .iter()
                .map(|n| n.value.to_string())
                .collect();
            let _ = writeln!(out, "IPAddressAllow={}\nIPAddressDeny=any", nets.join(" "));
        }
        if !vanguard.ban_ip.is_empty() {
            let nets: Vec<String> = vanguard
                .ban_ip
                .iter()
                .map(|n| n.value.to_string())
                .collect();
            let _ = writeln!(out, "IPAddressDeny={}", nets.join(" "));
        }
    }
    if spec.autostart.value && !several {
        out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    }
    out
}
