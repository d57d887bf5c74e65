//! Kubernetes: per worker a Deployment, a ConfigMap and a Secret for its
//! env, a Service for its TCP listeners and an Ingress for HTTP ones.

use std::fmt::Write as _;

use apm_compiler::values::Scheme;

use crate::quote::{self, dns_label, kube_dollars};
use crate::yaml::{Y, document, map, s};
use crate::{APM_COMMAND, APM_CONF_DIR, APM_HOME, Options, Worker, looks_secret, seconds};

pub fn export<'a>(
    mut workers: Vec<Worker<'a>>,
    options: &Options,
) -> (Vec<(String, String)>, Vec<Worker<'a>>) {
    let mut files = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for worker in &mut workers {
        let mut label = dns_label(worker.name());
        if used.contains(&label) {
            // Two worker names that differ only in case or `_`/`.`.
            label = format!("{label}-{}", used.len());
            let span = worker.spec.name.span;
            worker.warn_at(
                "name",
                span,
                format!("renamed `{label}`: another worker has the same Kubernetes name"),
            );
        }
        used.push(label.clone());
        let body = objects(worker, &label, options);
        let mut text = worker.comments();
        text.push_str(&body);
        files.push((format!("{label}.yaml"), text));
    }
    (files, workers)
}

fn metadata(label: &str, suffix: &str) -> Y {
    map(vec![
        ("name", s(format!("{label}{suffix}"))),
        (
            "labels",
            map(vec![
                ("app.kubernetes.io/name", s(label)),
                ("app.kubernetes.io/managed-by", s("apm-export")),
            ]),
        ),
    ])
}

/// Where a worker under apm finds the `NAME-tls` Secret's files.
const TLS_DIR: &str = "/etc/apm/tls";

fn objects(worker: &mut Worker, label: &str, options: &Options) -> String {
    let spec = worker.spec;
    let under_apm = worker.under_apm;
    let mut docs: Vec<Y> = Vec::new();
    let mut env_from = Vec::new();
    let (secret, plain): (Vec<_>, Vec<_>) =
        spec.env.iter().partition(|e| looks_secret(&e.value.key));
    for (vars, kind, suffix, field, reference) in [
        (plain, "ConfigMap", "-env", "data", "configMapRef"),
        (secret, "Secret", "-secret", "stringData", "secretRef"),
    ] {
        if vars.is_empty() {
            continue;
        }
        let data = vars
            .iter()
            .map(|e| (e.value.key.clone(), s(&e.value.value)))
            .collect();
        let mut object = vec![
            ("apiVersion", s("v1")),
            ("kind", s(kind)),
            ("metadata", metadata(label, suffix)),
        ];
        if kind == "Secret" {
            object.push(("type", s("Opaque")));
        }
        object.push((field, Y::Map(data)));
        docs.push(map(object));
        env_from.push(map(vec![(
            reference,
            map(vec![("name", s(format!("{label}{suffix}")))]),
        )]));
    }
    let mut preamble = String::new();
    if let Some(env_file) = &spec.env_file {
        let _ = writeln!(
            preamble,
            "# Create the env_file's Secret (its values are not printed here):\n#   kubectl create secret generic {label}-env-file --from-env-file={}",
            quote::comment(&shell_word(&env_file.value.to_string_lossy()))
        );
        env_from.push(map(vec![(
            "secretRef",
            map(vec![("name", s(format!("{label}-env-file")))]),
        )]));
    }

    if spec.tls.value {
        let file = |setting: &Option<apm_compiler::schema::Setting<std::path::PathBuf>>| {
            let path = setting
                .as_ref()
                .map(|c| c.value.to_string_lossy().into_owned());
            quote::comment(&shell_word(&path.unwrap_or_default()))
        };
        let _ = writeln!(
            preamble,
            "# Create the TLS Secret from tls_cert and tls_key:\n#   kubectl create secret tls {label}-tls --cert={} --key={}",
            file(&spec.tls_cert),
            file(&spec.tls_key)
        );
    }
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut container = vec![("name", s(label)), ("image", s(&options.image))];
    let mut env = Vec::new();
    let program_port = worker.program_port();
    let listeners = worker.tcp_listeners();
    // (the Service's port, the container's port) of each listener.
    let mut exposed: Vec<(u16, u16)> = Vec::new();
    if under_apm {
        // apm terminates TLS itself, from the Secret an Ingress would use.
        let tls_files = [
            ("tls_cert", format!("{TLS_DIR}/tls.crt")),
            ("tls_key", format!("{TLS_DIR}/tls.key")),
        ];
        let fragment = worker.fragment(spec.tls.value.then_some(&tls_files[..]));
        docs.push(map(vec![
            ("apiVersion", s("v1")),
            ("kind", s("ConfigMap")),
            ("metadata", metadata(label, "-apm")),
            ("data", map(vec![("apm.conf", s(fragment))])),
        ]));
        container.push(("command", Y::List(APM_COMMAND.map(s).into())));
        env.push(("APM_HOME", APM_HOME.to_owned()));
        let mut mount = |name: &str, path: &str, kind: &'static str, source: Y| {
            mounts.push(map(vec![
                ("name", s(name)),
                ("mountPath", s(path)),
                ("readOnly", Y::Bool(true)),
            ]));
            volumes.push(map(vec![("name", s(name)), (kind, source)]));
        };
        mount(
            "apm-conf",
            APM_CONF_DIR,
            "configMap",
            map(vec![("name", s(format!("{label}-apm")))]),
        );
        if spec.tls.value {
            let secret = map(vec![("secretName", s(format!("{label}-tls")))]);
            mount("apm-tls", TLS_DIR, "secret", secret);
        }
        exposed = listeners
            .iter()
            .map(|(_, port, _)| (*port, *port))
            .collect();
    } else {
        container.push(("command", Y::List(vec![s(kube_dollars(&spec.exec.value))])));
        if !spec.params.is_empty() {
            container.push((
                "args",
                Y::List(
                    spec.params
                        .iter()
                        .map(|p| s(kube_dollars(&p.value)))
                        .collect(),
                ),
            ));
        }
        if let Some(path) = &spec.path {
            container.push(("workingDir", s(path.value.to_string_lossy())));
        }
        if let Some(port) = program_port {
            env.push((spec.port_env.value.as_str(), port.to_string()));
            exposed = listeners
                .iter()
                .map(|(_, listener, _)| (*listener, port))
                .collect();
        }
    }
    if !env.is_empty() {
        let vars = env
            .into_iter()
            .map(|(name, value)| map(vec![("name", s(name)), ("value", s(value))]));
        container.push(("env", Y::List(vars.collect())));
    }
    if !env_from.is_empty() {
        container.push(("envFrom", Y::List(env_from)));
    }
    let mut container_ports: Vec<u16> = exposed.iter().map(|(_, port)| *port).collect();
    container_ports.dedup();
    if !container_ports.is_empty() {
        let ports = container_ports.iter().map(|port| {
            map(vec![
                ("containerPort", Y::Num((*port).into())),
                ("protocol", s("TCP")),
            ])
        });
        container.push(("ports", Y::List(ports.collect())));
    }
    if let Some(limit) = &spec.memory_limit {
        container.push((
            "resources",
            map(vec![(
                "limits",
                map(vec![("memory", s(limit.value.0.to_string()))]),
            )]),
        ));
    }
    if let Some(probe) = worker.probe() {
        let make = || {
            map(vec![
                (
                    "httpGet",
                    map(vec![
                        ("path", s(&probe.path)),
                        ("port", Y::Num(probe.port.into())),
                        ("scheme", s(if probe.https { "HTTPS" } else { "HTTP" })),
                    ]),
                ),
                (
                    "periodSeconds",
                    Y::Num(seconds(spec.health_check_interval.value, 1)),
                ),
                (
                    "timeoutSeconds",
                    Y::Num(seconds(spec.health_check_timeout.value, 1)),
                ),
                (
                    "failureThreshold",
                    Y::Num(spec.health_check_threshold.value.into()),
                ),
            ])
        };
        container.push(("livenessProbe", make()));
        container.push(("readinessProbe", make()));
    }
    if let Some(uid) = worker.uid() {
        container.push((
            "securityContext",
            map(vec![("runAsUser", Y::Num(uid.into()))]),
        ));
    }
    if !mounts.is_empty() {
        container.push(("volumeMounts", Y::List(mounts)));
    }
    // Under apm, apm applies the worker's own restart policy.
    let (clean, err) = worker.restarts();
    if under_apm {
    } else if !clean && !err {
        let span = spec.restart.span.or(spec.restart_err.span);
        worker.warn_at(
            "restart",
            span,
            "Deployments always restart their pods; apm would not restart this worker",
        );
    } else if !clean || !err {
        let span = spec.restart.span.or(spec.restart_err.span);
        worker.warn_at(
            "restart",
            span,
            "Deployments restart after every exit; apm restarts this worker only after some",
        );
    }

    let replicas = if spec.autostart.value {
        spec.instances.value
    } else {
        0
    };
    let mut deployment_spec = vec![
        ("replicas", Y::Num(replicas.into())),
        (
            "selector",
            map(vec![(
                "matchLabels",
                map(vec![("app.kubernetes.io/name", s(label))]),
            )]),
        ),
    ];
    if spec.rolling.value {
        deployment_spec.push((
            "strategy",
            map(vec![
                ("type", s("RollingUpdate")),
                (
                    "rollingUpdate",
                    map(vec![("maxUnavailable", Y::Num(0)), ("maxSurge", Y::Num(1))]),
                ),
            ]),
        ));
        deployment_spec.push((
            "minReadySeconds",
            Y::Num(seconds(spec.rolling_delay.value, 0)),
        ));
    } else {
        deployment_spec.push((
            "minReadySeconds",
            Y::Num(seconds(spec.startup_grace.value, 0)),
        ));
    }
    let mut pod_spec = vec![
        (
            "terminationGracePeriodSeconds",
            Y::Num(seconds(spec.kill_timeout.value, 0)),
        ),
        ("containers", Y::List(vec![map(container)])),
    ];
    if !volumes.is_empty() {
        pod_spec.push(("volumes", Y::List(volumes)));
    }
    deployment_spec.push((
        "template",
        map(vec![
            (
                "metadata",
                map(vec![(
                    "labels",
                    map(vec![("app.kubernetes.io/name", s(label))]),
                )]),
            ),
            ("spec", map(pod_spec)),
        ]),
    ));
    docs.push(map(vec![
        ("apiVersion", s("apps/v1")),
        ("kind", s("Deployment")),
        ("metadata", metadata(label, "")),
        ("spec", map(deployment_spec)),
    ]));

    if !exposed.is_empty() {
        let ports = exposed
            .iter()
            .enumerate()
            .map(|(i, (port, target))| {
                map(vec![
                    ("name", s(format!("l{i}"))),
                    ("port", Y::Num((*port).into())),
                    ("targetPort", Y::Num((*target).into())),
                    ("protocol", s("TCP")),
                ])
            })
            .collect();
        docs.push(map(vec![
            ("apiVersion", s("v1")),
            ("kind", s("Service")),
            ("metadata", metadata(label, "")),
            (
                "spec",
                map(vec![
                    ("selector", map(vec![("app.kubernetes.io/name", s(label))])),
                    ("ports", Y::List(ports)),
                ]),
            ),
        ]));
        // apm terminating TLS itself takes no Ingress, which would need
        // TLS passthrough.
        let http = listeners
            .iter()
            .find(|(scheme, _, _)| *scheme != Scheme::Tcp);
        if let Some((_, port, _)) = http.filter(|_| !(under_apm && spec.tls.value)) {
            let mut ingress = vec![(
                "rules",
                Y::List(vec![map(vec![(
                    "http",
                    map(vec![(
                        "paths",
                        Y::List(vec![map(vec![
                            ("path", s("/")),
                            ("pathType", s("Prefix")),
                            (
                                "backend",
                                map(vec![(
                                    "service",
                                    map(vec![
                                        ("name", s(label)),
                                        ("port", map(vec![("number", Y::Num((*port).into()))])),
                                    ]),
                                )]),
                            ),
                        ])]),
                    )]),
                )])]),
            )];
            if spec.tls.value {
                ingress.insert(
                    0,
                    (
                        "tls",
                        Y::List(vec![map(vec![("secretName", s(format!("{label}-tls")))])]),
                    ),
                );
            }
            docs.push(map(vec![
                ("apiVersion", s("networking.k8s.io/v1")),
                ("kind", s("Ingress")),
                ("metadata", metadata(label, "")),
                ("spec", map(ingress)),
            ]));
        }
    }
    let mut text = preamble;
    for doc in docs {
        text.push_str("---\n");
        text.push_str(&document(&doc));
    }
    text
}

/// A word for a shell command line in a comment: single-quoted.
fn shell_word(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
