//! The export table: what every worker key becomes in each target, or why
//! it has no equivalent there. The emitters warn from it (a `Warn` row of a
//! key the user set is a `# WARN:` line and a stderr warning with the key's
//! file:line), and `docs/export.md` is generated from it.

/// What a key becomes in one target.
#[derive(Clone, Copy, Debug)]
pub enum To {
    /// Carried over, as described.
    Maps(&'static str),
    /// No equivalent: said in the output and on stderr when the key is set.
    Warn(&'static str),
    /// Only apm provides it: a worker with listeners that sets the key runs
    /// under `apm container` in its container (docs/cli.md, decision 121).
    Apm(&'static str),
}

impl To {
    pub fn text(self) -> &'static str {
        match self {
            To::Maps(text) | To::Warn(text) | To::Apm(text) => text,
        }
    }
}

pub struct Row {
    /// The key, as `vanguard.rate_limit` inside a sub-block.
    pub key: &'static str,
    pub kubernetes: To,
    pub nomad: To,
    pub compose: To,
    pub systemd: To,
}

use To::{Apm, Maps, Warn};

macro_rules! row {
    ($key:literal, $k:expr, $n:expr, $c:expr, $s:expr) => {
        Row {
            key: $key,
            kubernetes: $k,
            nomad: $n,
            compose: $c,
            systemd: $s,
        }
    };
}

const LOGS: To =
    Warn("the platform collects stdout and stderr; apm's log files are not carried over");
const PROXY: To = Warn("a setting of apm's proxy, which the export does not run");
const VANGUARD: To = Warn(
    "Vanguard is apm's proxy firewall; use the ingress controller's or load balancer's rules (ingress-nginx: limit-rps, whitelist-source-range)",
);
const STATSD: To =
    Warn("apm's metrics forwarding; scrape or push metrics with the platform's tools");
const WATCH: To =
    Warn("file watching restarts a process on a developer machine; deploy a new version instead");
const AUGUR: To = Warn("apm's start-failure diagnosis has no equivalent");
const IPC: To = Warn("apm's IPC between workers needs apm's daemon");
const SESSION: To = Warn(
    "session migration needs several instances behind one apm; the container runs one, the platform scales containers",
);
const APM_PROXY: To =
    Apm("kept: a setting of apm's proxy, which `apm container` runs in the container");
const APM_VANGUARD: To = Apm(
    "kept: `apm container` runs Vanguard in the container, with its limits and bans per container",
);
const APM_TLS: To = Apm(
    "kept: `apm container` terminates TLS in the container, the file bind-mounted read-only under `/etc/apm/tls/`",
);

pub const ROWS: &[Row] = &[
    row!(
        "name",
        Maps(
            "object names (lowercased, `_` and `.` become `-`) and the `app.kubernetes.io/name` label"
        ),
        Maps("a `group` and its `task`"),
        Maps("the service name"),
        Maps("the unit name `NAME.service`, or `NAME@.service` with `NAME.target`")
    ),
    row!(
        "exec",
        Maps("the container's `command` (its image must hold the program)"),
        Maps("`config.command` of an `exec` task"),
        Maps("the first word of `entrypoint`"),
        Maps("the first word of `ExecStart=`")
    ),
    row!(
        "params",
        Maps("`args`"),
        Maps("`config.args`"),
        Maps("the rest of `entrypoint`"),
        Maps("the rest of `ExecStart=`")
    ),
    row!(
        "path",
        Maps("`workingDir`"),
        Maps("`config.work_dir`"),
        Maps("`working_dir`"),
        Maps("`WorkingDirectory=`")
    ),
    row!(
        "instances",
        Maps("`replicas` (under `apm container`, one instance in each)"),
        Maps("the group's `count`"),
        Maps("`deploy.replicas` (under `apm container`, one instance in each)"),
        Maps("a template `NAME@.service` and `NAME.target` that wants `NAME@0` … `NAME@N-1`")
    ),
    row!(
        "user",
        Maps(
            "`securityContext.runAsUser`, the uid resolved on the exporting machine (a warning when it cannot be)"
        ),
        Maps("the task's `user`"),
        Maps(
            "`user`, the uid resolved on the exporting machine (the name, with a warning, when it cannot be)"
        ),
        Maps("`User=`")
    ),
    row!(
        "depends_on",
        Warn("Kubernetes starts pods in no order; use readiness probes or init containers"),
        Warn("Nomad orders tasks only inside one group (lifecycle hooks)"),
        Maps("`depends_on` (started, or healthy when the dependency has a health check)"),
        Maps("`After=` and `Wants=` of the dependency's unit or target")
    ),
    row!(
        "autostart",
        Maps("`replicas: 0` when false"),
        Maps("`count = 0` when false"),
        Maps("`deploy.replicas: 0` when false"),
        Maps("no `[Install]` section when false: the unit is not enabled")
    ),
    row!(
        "depends_timeout",
        Warn("no start ordering to time out"),
        Warn("no start ordering to time out"),
        Warn("Compose waits for dependencies without a deadline"),
        Warn("systemd waits for dependencies without this deadline")
    ),
    row!(
        "env",
        Maps(
            "a ConfigMap `NAME-env` in `envFrom`; variables whose name holds PASSWORD, SECRET, TOKEN, KEY or CREDENTIAL go to a Secret `NAME-secret` instead and are printed nowhere else"
        ),
        Maps("the task's `env`"),
        Maps("`environment`"),
        Maps("`Environment=`")
    ),
    row!(
        "env_file",
        Maps(
            "a Secret `NAME-env-file` in `envFrom`, created from the file with the `kubectl create secret generic` command written above it (its values are never printed)"
        ),
        Maps("a `template` with `env = true` reading the file on the client"),
        Maps("`env_file`"),
        Maps("`EnvironmentFile=`")
    ),
    row!(
        "env_index",
        Warn("pods of a Deployment have no index; a StatefulSet would give one in its hostname"),
        Maps("`${NOMAD_ALLOC_INDEX}` in the task's `env`"),
        Warn("replicas of a service have no index"),
        Maps("`Environment=VAR=%i` of the template")
    ),
    row!(
        "restart",
        Maps("Deployments always restart; a warning when neither restart nor restart_err is on"),
        Maps("`restart` (`mode = \"fail\"` after `attempts`)"),
        Maps("`restart: always`, `on-failure` or `no`; a warning where they differ"),
        Maps("`Restart=always`, `on-success`, `on-failure` or `no`")
    ),
    row!(
        "restart_delay",
        Warn("Kubernetes backs off on its own (10 s doubling to 5 min)"),
        Maps("`restart.delay`"),
        Maps("`deploy.restart_policy.delay`"),
        Maps("`RestartSec=`")
    ),
    row!(
        "max_restarts",
        Warn("Deployments restart without limit"),
        Maps("`restart.attempts` (unlimited: 1000000)"),
        Maps("`deploy.restart_policy.max_attempts`"),
        Maps("`StartLimitBurst=`")
    ),
    row!(
        "restart_err",
        Maps("as `restart`"),
        Maps("as `restart`"),
        Maps("as `restart`"),
        Maps("as `restart`")
    ),
    row!(
        "err_delay",
        Warn("Kubernetes backs off on its own (10 s doubling to 5 min)"),
        Maps("`restart.delay` (the larger of the two delays)"),
        Maps("`deploy.restart_policy.delay` (the larger of the two delays)"),
        Maps("`RestartSec=` (the larger of the two delays)")
    ),
    row!(
        "max_err_restarts",
        Warn("Deployments restart without limit"),
        Maps("`restart.attempts` (the larger of the two limits)"),
        Maps("`deploy.restart_policy.max_attempts` (the larger of the two limits)"),
        Maps("`StartLimitBurst=` (the larger of the two limits)")
    ),
    row!(
        "err_grace",
        Warn("no equivalent"),
        Maps("`restart.interval`"),
        Maps("`deploy.restart_policy.window`"),
        Maps("`StartLimitIntervalSec=`")
    ),
    row!(
        "startup_grace",
        Maps("`minReadySeconds` when rolling is off"),
        Maps("`update.min_healthy_time` when rolling is off"),
        Warn("no equivalent"),
        Warn("no equivalent")
    ),
    row!("augur_full_scan", AUGUR, AUGUR, AUGUR, AUGUR),
    row!(
        "restart_on_exit_codes",
        Warn("Deployments restart on every exit"),
        Warn("Nomad restarts on every exit"),
        Warn("Compose restarts on every exit or every failure"),
        Maps("`RestartForceExitStatus=` with `Restart=no`")
    ),
    row!(
        "kill_timeout",
        Maps("`terminationGracePeriodSeconds` (rounded up)"),
        Maps("the task's `kill_timeout`"),
        Maps("`stop_grace_period`"),
        Maps("`TimeoutStopSec=`")
    ),
    row!(
        "server",
        Maps(
            "`containerPort`s, a Service, and an Ingress for http(s):// and ws(s):// listeners (TLS from `tls_cert`/`tls_key` in a TLS Secret `NAME-tls`); unix sockets warn. Under `apm container`, apm listens on each listener's port in the container"
        ),
        Maps("static `port`s of the group's `network` and a `service`"),
        Maps("`ports`, published on the listener's address"),
        Warn(
            "systemd runs the program itself, without apm's proxy; with `upstream port` and one instance it gets the listener's port in port_env"
        )
    ),
    row!(
        "upstream",
        Maps(
            "`port`: the container listens on the listener's port, given in port_env; `connector`: the container runs `apm container`, whose proxy hands the connections to the program"
        ),
        Maps("`port` as Kubernetes; `connector`: a warning, the program needs apm's proxy"),
        Maps("as Kubernetes"),
        Maps("as Nomad, `port` with one instance only")
    ),
    row!(
        "port_env",
        Maps("the variable that carries the port"),
        Maps("the variable that carries the port"),
        Maps("the variable that carries the port"),
        Maps("the variable that carries the port")
    ),
    row!("trust_proxy", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("trusted_proxies", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("lowercase_hdrs", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("keep_alive", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("max_conns", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("trace_header", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!("session_persist", SESSION, SESSION, SESSION, SESSION),
    row!("session_wait", SESSION, SESSION, SESSION, SESSION),
    row!("watch", WATCH, WATCH, WATCH, WATCH),
    row!("watch_ignore", WATCH, WATCH, WATCH, WATCH),
    row!("watch_delay", WATCH, WATCH, WATCH, WATCH),
    row!("watch_conf", WATCH, WATCH, WATCH, WATCH),
    row!(
        "rolling",
        Maps("`strategy: RollingUpdate` with `maxUnavailable: 0`, `maxSurge: 1`"),
        Maps("`update` with `max_parallel = 1`"),
        Maps("`deploy.update_config` with `parallelism: 1`, `order: start-first`"),
        Warn("systemd restarts template instances only one by one by hand")
    ),
    row!(
        "rolling_delay",
        Maps("`minReadySeconds` (rounded up)"),
        Maps("`update.min_healthy_time`"),
        Maps("`deploy.update_config.delay`"),
        Warn("no rolling restarts")
    ),
    row!("stats_interval", STATSD, STATSD, STATSD, STATSD),
    row!(
        "log",
        LOGS,
        LOGS,
        LOGS,
        Maps("`StandardOutput=append:PATH`")
    ),
    row!(
        "err_log",
        LOGS,
        LOGS,
        LOGS,
        Maps("`StandardError=append:PATH`")
    ),
    row!("prefix", LOGS, LOGS, LOGS, Maps("`SyslogIdentifier=`")),
    row!(
        "log_time_format",
        LOGS,
        LOGS,
        LOGS,
        Warn("journald stamps lines itself")
    ),
    row!(
        "strip_ansi",
        LOGS,
        LOGS,
        LOGS,
        Warn("journald keeps lines as written")
    ),
    row!(
        "syslog",
        LOGS,
        LOGS,
        LOGS,
        Warn("journald forwards to syslog when configured to")
    ),
    row!("syslog_tag", LOGS, LOGS, LOGS, Maps("`SyslogIdentifier=`")),
    row!(
        "log_max_size",
        LOGS,
        LOGS,
        LOGS,
        Warn("journald rotates by its own settings")
    ),
    row!(
        "log_max_files",
        LOGS,
        LOGS,
        LOGS,
        Warn("journald rotates by its own settings")
    ),
    row!(
        "health_check",
        Maps(
            "a URL: `livenessProbe` and `readinessProbe` `httpGet` on its port and path; `on` (push): a warning, no probe"
        ),
        Maps("a URL: an `http` check of the group's service; `on`: a warning"),
        Maps(
            "a URL: a `healthcheck` running `curl -fsS URL` in the container (the image needs curl); `on`: a warning"
        ),
        Warn("systemd does not probe services (its watchdog needs sd_notify in the program)")
    ),
    row!(
        "health_check_interval",
        Maps("`periodSeconds` (rounded up)"),
        Maps("the check's `interval`"),
        Maps("`healthcheck.interval`"),
        Warn("no probes")
    ),
    row!(
        "health_check_timeout",
        Maps("`timeoutSeconds` (rounded up)"),
        Maps("the check's `timeout`"),
        Maps("`healthcheck.timeout`"),
        Warn("no probes")
    ),
    row!(
        "health_check_threshold",
        Maps("`failureThreshold`"),
        Maps("`check_restart.limit`"),
        Maps("`healthcheck.retries`"),
        Warn("no probes")
    ),
    row!("drain_timeout", APM_PROXY, PROXY, APM_PROXY, PROXY),
    row!(
        "memory_limit",
        Maps("`resources.limits.memory` (bytes)"),
        Maps("`resources.memory_max` in MiB, rounded up (and `memory` as the reservation)"),
        Maps("`mem_limit` (bytes)"),
        Maps("`MemoryMax=` (bytes)")
    ),
    row!(
        "tls",
        Maps(
            "TLS of the Ingress; under `apm container`, apm terminates it with the `NAME-tls` Secret mounted at `/etc/apm/tls`, and the worker gets no Ingress (it would need TLS passthrough)"
        ),
        Warn("terminate TLS in the load balancer in front of the service"),
        Apm("kept: `apm container` terminates TLS in the container"),
        Warn("terminate TLS in a proxy in front of the service")
    ),
    row!(
        "tls_cert",
        Maps(
            "the certificate of the TLS Secret `NAME-tls`, created with the `kubectl create secret tls` command written above it"
        ),
        Warn("terminate TLS in the load balancer in front of the service"),
        APM_TLS,
        Warn("terminate TLS in a proxy in front of the service")
    ),
    row!(
        "tls_key",
        Maps("the key of the TLS Secret `NAME-tls`, never printed"),
        Warn("terminate TLS in the load balancer in front of the service"),
        APM_TLS,
        Warn("terminate TLS in a proxy in front of the service")
    ),
    row!(
        "tls_ca",
        Warn(
            "client certificates must be checked by the ingress controller (ingress-nginx: `auth-tls-secret`)"
        ),
        Warn("client certificates must be checked by the load balancer in front"),
        APM_TLS,
        Warn("client certificates must be checked by a proxy in front")
    ),
    row!("listen", IPC, IPC, IPC, IPC),
    row!("ipc_timeout", IPC, IPC, IPC, IPC),
    row!(
        "vanguard.rate_limit",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        VANGUARD
    ),
    row!(
        "vanguard.rate_burst",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        VANGUARD
    ),
    row!(
        "vanguard.ban_ttl",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        VANGUARD
    ),
    row!(
        "vanguard.ban_path",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        VANGUARD
    ),
    row!(
        "vanguard.ban_response",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        VANGUARD
    ),
    row!(
        "vanguard.allow_ip",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        Maps("`IPAddressAllow=` with `IPAddressDeny=any`")
    ),
    row!(
        "vanguard.ban_ip",
        APM_VANGUARD,
        VANGUARD,
        APM_VANGUARD,
        Maps("`IPAddressDeny=`")
    ),
    row!("statsd.host", STATSD, STATSD, STATSD, STATSD),
    row!("statsd.prefix", STATSD, STATSD, STATSD, STATSD),
    row!("statsd.interval", STATSD, STATSD, STATSD, STATSD),
];

pub fn row(key: &str) -> &'static Row {
    ROWS.iter()
        .find(|row| row.key == key)
        .unwrap_or_else(|| panic!("the export table has no row for `{key}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use apm_compiler::schema::Scope;

    #[test]
    fn every_worker_key_has_exactly_one_row_and_no_row_is_stale() {
        let mut keys = Vec::new();
        for (scope, prefix) in [
            (Scope::Worker, ""),
            (Scope::Vanguard, "vanguard."),
            (Scope::Statsd, "statsd."),
        ] {
            keys.extend(scope.keys().iter().map(|k| format!("{prefix}{}", k.name)));
        }
        for key in &keys {
            assert_eq!(
                ROWS.iter().filter(|row| row.key == key).count(),
                1,
                "`{key}` needs exactly one row in export/src/mapping.rs"
            );
        }
        for row in ROWS {
            assert!(keys.iter().any(|k| k == row.key), "`{}` is no key", row.key);
        }
    }
}
