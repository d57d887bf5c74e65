//! Docker Compose: one service per worker in one `compose.yaml`.

use crate::quote::compose_dollars;
use crate::yaml::{Y, document, map};
use crate::{Options, Worker, duration};

/// A string for Compose, which interpolates `$` in every value.
fn cs(text: impl AsRef<str>) -> Y {
    Y::Str(compose_dollars(text.as_ref()))
}

pub fn export<'a>(
    mut workers: Vec<Worker<'a>>,
    options: &Options,
) -> (Vec<(String, String)>, Vec<Worker<'a>>) {
    let mut services = Vec::new();
    for worker in &mut workers {
        let service = service(worker, options);
        services.push((worker.name().to_owned(), service));
    }
    let mut text = String::new();
    for worker in &workers {
        for line in worker.comments().lines() {
            text.push_str(&line.replacen(
                "# WARN: ",
                &format!("# WARN: {}: ", crate::quote::comment(worker.name())),
                1,
            ));
            text.push('\n');
        }
    }
    text.push_str(&document(&Y::Map(vec![(
        "services".to_owned(),
        Y::Map(services),
    )])));
    (vec![("compose.yaml".to_owned(), text)], workers)
}

fn service(worker: &mut Worker, options: &Options) -> Y {
    let spec = worker.spec;
    worker.warn_if_proxy_needed();
    let mut entries = vec![("image", cs(&options.image))];
    let mut entrypoint = vec![cs(&spec.exec.value)];
    entrypoint.extend(spec.params.iter().map(|p| cs(&p.value)));
    entries.push(("entrypoint", Y::List(entrypoint)));
    if let Some(path) = &spec.path {
        entries.push(("working_dir", cs(path.value.to_string_lossy())));
    }
    let program_port = worker.program_port();
    let mut environment: Vec<(String, Y)> = spec
        .env
        .iter()
        .map(|e| (e.value.key.clone(), cs(&e.value.value)))
        .collect();
    if let Some(port) = program_port {
        environment.push((spec.port_env.value.clone(), cs(port.to_string())));
    }
    if !environment.is_empty() {
        entries.push(("environment", Y::Map(environment)));
    }
    if let Some(env_file) = &spec.env_file {
        entries.push((
            "env_file",
            Y::List(vec![cs(env_file.value.to_string_lossy())]),
        ));
    }
    if let Some(user) = &spec.user {
        let name = user.value.clone();
        match worker.uid() {
            Some(uid) => entries.push(("user", cs(uid.to_string()))),
            None => entries.push(("user", cs(name))),
        }
    }
    let listeners = worker.tcp_listeners();
    if let Some(target) = program_port {
        let ports = spec
            .server
            .iter()
            .filter_map(|server| match &server.value.addr {
                apm_compiler::values::ListenAddr::Tcp { host, port } => Some(map(vec![
                    ("target", Y::Num(target.into())),
                    ("host_ip", cs(host)),
                    ("published", cs(port.to_string())),
                    ("protocol", cs("tcp")),
                ])),
                apm_compiler::values::ListenAddr::Unix { .. } => None,
            })
            .collect();
        if !listeners.is_empty() {
            entries.push(("ports", Y::List(ports)));
        }
    }
    if let Some(limit) = &spec.memory_limit {
        entries.push(("mem_limit", Y::Num(limit.value.0)));
    }
    entries.push(("stop_grace_period", cs(duration(spec.kill_timeout.value))));
    if let Some(probe) = worker.probe() {
        entries.push((
            "healthcheck",
            map(vec![
                (
                    "test",
                    Y::List(vec![cs("CMD"), cs("curl"), cs("-fsS"), cs(&probe.url)]),
                ),
                ("interval", cs(duration(spec.health_check_interval.value))),
                ("timeout", cs(duration(spec.health_check_timeout.value))),
                ("retries", Y::Num(spec.health_check_threshold.value.into())),
            ]),
        ));
    }
    if !spec.depends_on.is_empty() {
        entries.push((
            "depends_on",
            Y::List(spec.depends_on.iter().map(|d| cs(&d.value)).collect()),
        ));
    }
    let (clean, err) = worker.restarts();
    let restart = match (clean, err) {
        (true, true) => "always",
        (false, true) => "on-failure",
        (false, false) => "no",
        (true, false) => {
            let span = spec.restart.span;
            worker.warn_at("restart", span, "Compose cannot restart only after clean exits; `always` also restarts after errors");
            "always"
        }
    };
    entries.push(("restart", cs(restart)));
    let mut deploy = vec![(
        "replicas",
        Y::Num(if spec.autostart.value {
            spec.instances.value.into()
        } else {
            0
        }),
    )];
    if restart != "no" {
        let condition = if restart == "always" {
            "any"
        } else {
            "on-failure"
        };
        let mut policy = vec![
            ("condition", cs(condition)),
            ("delay", cs(duration(worker.restart_delay()))),
        ];
        let limit = worker.restart_limit();
        if limit > 0 {
            policy.push(("max_attempts", Y::Num(limit.into())));
        }
        if let Some(grace) = &spec.err_grace {
            policy.push(("window", cs(duration(grace.value))));
        }
        deploy.push(("restart_policy", map(policy)));
    }
    if spec.rolling.value {
        deploy.push((
            "update_config",
            map(vec![
                ("parallelism", Y::Num(1)),
                ("delay", cs(duration(spec.rolling_delay.value))),
                ("order", cs("start-first")),
            ]),
        ));
    }
    entries.push(("deploy", map(deploy)));
    map(entries)
}
