//! Docker Compose: one service per worker in one `compose.yaml`.

use crate::quote::compose_dollars;
use crate::yaml::{Y, document, map};
use crate::{APM_COMMAND, APM_CONF, APM_HOME, Options, Worker, duration};

/// A string for Compose, which interpolates `$` in every value.
fn cs(text: impl AsRef<str>) -> Y {
    Y::Str(compose_dollars(text.as_ref()))
}

pub fn export<'a>(
    mut workers: Vec<Worker<'a>>,
    options: &Options,
) -> (Vec<(String, String)>, Vec<Worker<'a>>) {
    let mut services = Vec::new();
    let mut configs = Vec::new();
    for worker in &mut workers {
        let (service, fragment) = service(worker, options);
        services.push((worker.name().to_owned(), service));
        if let Some(fragment) = fragment {
            configs.push((config_name(worker), map(vec![("content", cs(fragment))])));
        }
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
    let mut top = vec![("services".to_owned(), Y::Map(services))];
    if !configs.is_empty() {
        top.push(("configs".to_owned(), Y::Map(configs)));
    }
    text.push_str(&document(&Y::Map(top)));
    (vec![("compose.yaml".to_owned(), text)], workers)
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The `configs` entry that holds a worker's own apm.conf.
fn config_name(worker: &Worker) -> String {
    format!("{}-apm", worker.name())
}

/// The service, and the worker's own apm.conf when it runs under apm.
fn service(worker: &mut Worker, options: &Options) -> (Y, Option<String>) {
    let spec = worker.spec;
    let under_apm = worker.under_apm;
    let mut entries = vec![("image", cs(&options.image))];
    let mut fragment = None;
    let mut environment: Vec<(String, Y)> = spec
        .env
        .iter()
        .map(|e| (e.value.key.clone(), cs(&e.value.value)))
        .collect();
    // The port apm listens on, or the program's: what each listener reaches.
    let program_port = worker.program_port();
    let target_port = |listener: u16| {
        if under_apm {
            Some(listener)
        } else {
            program_port
        }
    };
    if under_apm {
        let mut files = Vec::new();
        let mut volumes = Vec::new();
        // apm terminates TLS with the files bind-mounted where it reads them.
        let tls = [
            ("tls_cert", &spec.tls_cert, "/etc/apm/tls/cert.pem"),
            ("tls_key", &spec.tls_key, "/etc/apm/tls/key.pem"),
            ("tls_ca", &spec.tls_ca, "/etc/apm/tls/ca.pem"),
        ];
        for (key, setting, target) in tls {
            if let (true, Some(setting)) = (spec.tls.value, setting) {
                files.push((key, target.to_owned()));
                volumes.push(map(vec![
                    ("type", cs("bind")),
                    // Compose reads a relative one from the compose file's directory.
                    ("source", cs(absolute(&setting.value).to_string_lossy())),
                    ("target", cs(target)),
                    ("read_only", Y::Bool(true)),
                ]));
            }
        }
        fragment = Some(worker.fragment(Some(&files)));
        entries.push(("entrypoint", Y::List(APM_COMMAND.map(cs).into())));
        environment.push(("APM_HOME".to_owned(), cs(APM_HOME)));
        entries.push((
            "configs",
            Y::List(vec![map(vec![
                ("source", cs(config_name(worker))),
                ("target", cs(APM_CONF)),
            ])]),
        ));
        if !volumes.is_empty() {
            entries.push(("volumes", Y::List(volumes)));
        }
    } else {
        let mut entrypoint = vec![cs(&spec.exec.value)];
        entrypoint.extend(spec.params.iter().map(|p| cs(&p.value)));
        entries.push(("entrypoint", Y::List(entrypoint)));
        if let Some(path) = &spec.path {
            entries.push(("working_dir", cs(path.value.to_string_lossy())));
        }
        if let Some(port) = program_port {
            environment.push((spec.port_env.value.clone(), cs(port.to_string())));
        }
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
    let ports: Vec<Y> = spec
        .server
        .iter()
        .filter_map(|server| match &server.value.addr {
            apm_compiler::values::ListenAddr::Tcp { host, port } => Some(map(vec![
                ("target", Y::Num(target_port(*port)?.into())),
                ("host_ip", cs(host)),
                ("published", cs(port.to_string())),
                ("protocol", cs("tcp")),
            ])),
            apm_compiler::values::ListenAddr::Unix { .. } => None,
        })
        .collect();
    if !listeners.is_empty() && !ports.is_empty() {
        entries.push(("ports", Y::List(ports)));
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
                    // Through apm's TLS listener, whose certificate may be
                    // for another name or self-signed.
                    Y::List(vec![
                        cs("CMD"),
                        cs("curl"),
                        cs(if under_apm && probe.https {
                            "-fsSk"
                        } else {
                            "-fsS"
                        }),
                        cs(&probe.url),
                    ]),
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
        // apm applies the worker's policy, and ends only when it cannot run.
        _ if under_apm => "on-failure",
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
    if restart != "no" && !under_apm {
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
    (map(entries), fragment)
}
