//! The typed IR: what a config means, with every value's span. This file is
//! also the schema table: each line declares a key, its kind, its default,
//! the release it came in and its one-line doc.

use std::path::PathBuf;

use ipnet::IpNet;

use crate::schema::{Setting, schema_block};
use crate::source::Span;
use crate::values::{
    ByteSize, EnvVar, HealthCheck, Ip, Kind, Millis, PathPattern, Secret, ServerUrl,
};

const MS: Kind = Kind::Duration;
const BOOL: Kind = Kind::Bool;
const TEXT: Kind = Kind::Text;
const PATH: Kind = Kind::Path;
const COUNT: Kind = Kind::Int {
    min: 0,
    max: u32::MAX as u64,
};

schema_block! {
    /// A whole compiled config: the top-level keys and the blocks.
    pub struct Config in Top {
        telemetry: Setting<bool> = BOOL, default Some("true"), since "2.0", reload Hot, "Accepted for compatibility; apm never sends telemetry, whatever its value.";
    }
    extra {
        daemon: DaemonConfig,
        workers: Vec<WorkerSpec>,
    }
}

schema_block! {
    /// Settings of the daemon itself, from `daemon { }`.
    pub struct DaemonConfig in Daemon {
        gui_port: Setting<u16> = Kind::Int { min: 0, max: 65535 }, default Some("0"), since "2.0", reload Hot, "Web GUI port; 0 disables the GUI.";
        gui_bind: Setting<Ip> = Kind::IpAddr, default Some("0.0.0.0"), since "2.0", reload Hot, "Address the web GUI listens on; it refuses a non-loopback address without gui_password.";
        gui_password: Option<Setting<Secret>> = Kind::Secret, default None, since "2.0", reload Hot, "Password of the web GUI; never printed.";
        auto_reload: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Reload config files when they change on disk.";
        proxy_threads: Setting<u32> = Kind::Int { min: 0, max: 1024 }, default Some("0"), since "2.2", reload Hot, "Threads the built-in proxy serves connections on, each with its own event loop; 0 means one per core the daemon may use (its CPU affinity and cgroup quota). A change applies to new connections (docs/cli.md, proxy_threads decision).";
        allow_group: Option<Setting<String>> = Kind::Group, default None, since "2.2", reload Hot, "Members of this OS group may use the control socket, besides root and the daemon's owner: under a root daemon only to control existing workers (docs/cli.md, allow_group decision).";
    }
}

schema_block! {
    /// One worker: a program apm runs, its instances, and how traffic reaches them.
    pub struct WorkerSpec in Worker {
        // Identity & process
        name: Setting<String> = Kind::WorkerName, default None, since "2.0", reload Restart, "Worker name used on the CLI and in log prefixes; defaults to the exec name.";
        exec: Setting<String> = TEXT, default None, since "2.0", reload Restart, "Executable to run, looked up in PATH. Required.";
        params: Vec<Setting<String>> = TEXT, default None, since "2.0", reload Restart, "Arguments to the executable.";
        path: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Restart, "Working directory; defaults to the daemon's working directory.";
        instances: Setting<u32> = Kind::Int { min: 1, max: 4096 }, default Some("1"), since "2.0", reload Hot, "Number of parallel child processes; the proxy round-robins across them.";
        user: Option<Setting<String>> = Kind::User, default None, since "2.0", reload Restart, "Run children as this OS user (the daemon must run as root).";
        depends_on: Vec<Setting<String>> = Kind::WorkerName, default None, since "2.0", reload Hot, "Workers that must be running before this one starts.";
        autostart: Setting<bool> = BOOL, default Some("true"), since "2.2", reload Hot, "Start the worker when its file is loaded; false registers it stopped, for `apm start` later.";
        depends_timeout: Setting<Millis> = MS, default Some("30000"), since "2.0", reload Hot, "How long to wait for depends_on before starting anyway.";
        // Environment
        env: Vec<Setting<EnvVar>> = Kind::EnvPair, default None, since "2.0", reload Restart, "Environment variables for the children, KEY=value.";
        env_file: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Restart, "File of KEY=VALUE lines, read before dropping privileges.";
        env_index: Option<Setting<String>> = Kind::EnvName, default None, since "2.0", reload Restart, "Inject the 0-based instance index as this environment variable.";
        // Restart policy
        restart: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Restart after a clean exit (code 0).";
        restart_delay: Setting<Millis> = MS, default Some("250"), since "2.0", reload Hot, "Delay before a clean-exit restart.";
        max_restarts: Setting<u32> = COUNT, default Some("0"), since "2.0", reload Hot, "Maximum clean-exit restarts; 0 means unlimited.";
        restart_err: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Restart after an error exit (non-zero code or signal).";
        err_delay: Setting<Millis> = MS, default Some("500"), since "2.0", reload Hot, "Delay before an error-exit restart.";
        max_err_restarts: Setting<u32> = COUNT, default Some("0"), since "2.0", reload Hot, "Maximum error-exit restarts; 0 means unlimited.";
        err_grace: Option<Setting<Millis>> = MS, default None, since "2.0", reload Hot, "Uptime after which a restart no longer counts against the limit.";
        startup_grace: Setting<Millis> = MS, default Some("2000"), since "2.0.10", reload Hot, "How long start/restart wait for a fast-exit failure to surface.";
        augur_full_scan: Setting<bool> = BOOL, default Some("false"), since "2.1", reload Hot, "Scan declared dependencies before every start and refuse to start when some are missing.";
        restart_on_exit_codes: Vec<Setting<u8>> = Kind::Int { min: 0, max: 255 }, default None, since "2.0", reload Hot, "Restart only on these exit codes; overrides restart and restart_err.";
        kill_timeout: Setting<Millis> = MS, default Some("2000"), since "2.0", reload Hot, "Time between SIGTERM and SIGKILL when stopping.";
        // Proxy / HTTP
        server: Vec<Setting<ServerUrl>> = Kind::Server, default None, since "2.0", reload Restart, "Listener addresses of the built-in proxy.";
        upstream: Setting<String> = Kind::Enum(&["connector", "port"]), default Some("connector"), since "2.2", reload Restart, "How instances receive traffic: framed sessions through a connector, or a loopback port each (in port_env).";
        port_env: Setting<String> = Kind::EnvName, default Some("PORT"), since "2.2", reload Restart, "Environment variable that carries each instance's port with `upstream port`.";
        trust_proxy: Setting<bool> = BOOL, default Some("true"), since "2.0", reload Hot, "Take the client IP from X-Forwarded-For / X-Real-IP when the connection comes from a trusted proxy (trusted_proxies).";
        trusted_proxies: Vec<Setting<IpNet>> = Kind::Cidr, default None, since "2.2", reload Hot, "Proxies whose X-Forwarded-For / X-Real-IP are believed (addresses or ranges); unset, loopback only (127.0.0.0/8, ::1, unix sockets).";
        lowercase_hdrs: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Lowercase HTTP header names before forwarding.";
        keep_alive: Setting<Millis> = MS, default Some("120000"), since "2.0", reload Hot, "Idle timeout of HTTP keep-alive client connections.";
        max_conns: Setting<u32> = COUNT, default Some("0"), since "2.0", reload Hot, "Maximum concurrent connections per listener; 0 means unlimited.";
        trace_header: Option<Setting<String>> = Kind::HeaderName, default None, since "2.0", reload Hot, "Header that carries a unique id per forwarded request (e.g. x-request-id); each such request gets a line with its id in the worker's stdout log.";
        session_persist: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Move open WebSocket and TCP connector sessions to another instance when theirs leaves rotation.";
        session_wait: Setting<Millis> = MS, default Some("5000"), since "2.0", reload Hot, "The most a moving session spends between instances before it is closed (WebSocket 1012).";
        // File watcher / rolling restart / stats
        watch: Vec<Setting<String>> = Kind::Glob, default None, since "2.0", reload Hot, "Glob patterns of files whose change restarts the worker.";
        watch_ignore: Vec<Setting<String>> = Kind::Glob, default None, since "2.0", reload Hot, "Glob patterns excluded from watching.";
        watch_delay: Setting<Millis> = MS, default Some("200"), since "2.0", reload Hot, "Debounce delay before a watch-triggered restart.";
        watch_conf: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Reload this worker when its config file changes.";
        rolling: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Restart one instance at a time.";
        rolling_delay: Setting<Millis> = MS, default Some("1000"), since "2.0", reload Hot, "Delay between instance restarts of a rolling restart.";
        stats_interval: Option<Setting<Millis>> = MS, default None, since "2.0", reload Hot, "Interval between stats collections.";
        // Logging
        log: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Hot, "Stdout log file; defaults to $APM_HOME/logs/NAME.out.log.";
        err_log: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Hot, "Stderr log file; defaults to the log file when log is set, else $APM_HOME/logs/NAME.err.log.";
        prefix: Option<Setting<String>> = TEXT, default None, since "2.0", reload Hot, "Prefix of every log line (çN- colour escapes allowed); defaults to the name.";
        log_time_format: Option<Setting<String>> = TEXT, default None, since "2.0", reload Hot, "strftime format (UTC) of each log line's stamp, çN- colours allowed; defaults to RFC 3339 with milliseconds.";
        strip_ansi: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Hot, "Strip ANSI escapes before writing logs.";
        syslog: Option<Setting<String>> = Kind::Url { schemes: &["syslog", "udp", "tcp"] }, default None, since "2.0", reload Hot, "Syslog destination, e.g. syslog://localhost:514.";
        syslog_tag: Option<Setting<String>> = TEXT, default None, since "2.0", reload Hot, "Tag of syslog messages.";
        log_max_size: Option<Setting<ByteSize>> = Kind::Size, default None, since "2.0", reload Hot, "Rotate a log file when it grows beyond this size.";
        log_max_files: Setting<u32> = Kind::Int { min: 1, max: 1000 }, default Some("5"), since "2.0", reload Hot, "Rotated log files to keep.";
        // Health, drain & memory
        health_check: Option<Setting<HealthCheck>> = Kind::HealthCheck, default None, since "2.0", reload Restart, "`on` (the child checks in) or a URL apm polls.";
        health_check_interval: Setting<Millis> = MS, default Some("5000"), since "2.0", reload Hot, "Interval between health probes.";
        health_check_timeout: Setting<Millis> = MS, default Some("3000"), since "2.0", reload Hot, "Timeout of one pull-mode probe.";
        health_check_threshold: Setting<u32> = Kind::Int { min: 1, max: 1000 }, default Some("3"), since "2.0", reload Hot, "Consecutive failures before an instance is unhealthy.";
        drain_timeout: Setting<Millis> = MS, default Some("0"), since "2.0", reload Hot, "With kill_timeout, the most a stop waits for in-flight work; it stops as soon as none is left.";
        memory_limit: Option<Setting<ByteSize>> = Kind::Size, default None, since "2.0", reload Restart, "Per-instance memory cap through a memory cgroup (needs a root daemon).";
        // TLS & IPC
        tls: Setting<bool> = BOOL, default Some("false"), since "2.0", reload Restart, "Terminate TLS on this worker's listeners.";
        tls_cert: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Restart, "PEM certificate chain.";
        tls_key: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Restart, "PEM private key.";
        tls_ca: Option<Setting<PathBuf>> = PATH, default None, since "2.0", reload Restart, "CA certificate; when set, clients must present a certificate it signed, and HTTP workers get its subject in X-Client-Cert-Subject.";
        listen: Vec<Setting<String>> = TEXT, default None, since "2.0", reload Restart, "IPC channels this worker answers on.";
        ipc_timeout: Setting<Millis> = MS, default Some("500"), since "2.0", reload Hot, "Default timeout of this worker's IPC requests.";
    }
    extra {
        vanguard: Option<VanguardRules>,
        statsd: Option<StatsdConfig>,
        /// The `worker` keyword that opened the block.
        #[serde(skip)]
        span: Option<Span>,
        /// Keys that were written with values that were rejected (reported
        /// already), so that passes do not also call them missing.
        #[serde(skip)]
        rejected: Vec<&'static str>,
    }
}

schema_block! {
    /// The request firewall of one worker, from `vanguard { }`.
    pub struct VanguardRules in Vanguard {
        rate_limit: Option<Setting<u32>> = Kind::Int { min: 1, max: u32::MAX as u64 }, default None, since "2.0", reload Hot, "Requests per second allowed per client IP.";
        rate_burst: Option<Setting<u32>> = Kind::Int { min: 1, max: u32::MAX as u64 }, default None, since "2.0", reload Hot, "Burst capacity; defaults to rate_limit.";
        ban_ttl: Setting<Millis> = MS, default Some("0"), since "2.0", reload Hot, "Ban a client that breaches the rate limit for this long; 0 only refuses the excess.";
        ban_path: Vec<Setting<PathPattern>> = Kind::PathPattern, default None, since "2.0", reload Hot, "Request paths refused with 403 (*.ext, prefix*, *word*, exact).";
        ban_response: Setting<String> = TEXT, default Some("Forbidden"), since "2.0", reload Hot, "Body of a refused HTTP request.";
        allow_ip: Vec<Setting<IpNet>> = Kind::Cidr, default None, since "2.0", reload Hot, "When set, only these addresses or ranges may connect.";
        ban_ip: Vec<Setting<IpNet>> = Kind::Cidr, default None, since "2.0", reload Hot, "Addresses or ranges that are refused.";
    }
}

impl VanguardRules {
    /// Whether any rule is set, as opposed to an empty `vanguard { }`.
    pub fn has_rules(&self) -> bool {
        self.rate_limit.is_some()
            || !self.ban_path.is_empty()
            || !self.allow_ip.is_empty()
            || !self.ban_ip.is_empty()
    }
}

schema_block! {
    /// Metrics forwarding of one worker, from `statsd { }`.
    pub struct StatsdConfig in Statsd {
        host: Setting<String> = Kind::HostPort, default Some("127.0.0.1:8125"), since "2.0", reload Hot, "StatsD server, host:port (UDP).";
        prefix: Setting<String> = TEXT, default Some("apm"), since "2.0", reload Hot, "Prefix of every metric name.";
        interval: Setting<Millis> = MS, default Some("10000"), since "2.0", reload Hot, "Interval between metric flushes.";
    }
}

impl WorkerSpec {
    /// The executable's file name, which is the default worker name.
    pub fn exec_name(&self) -> &str {
        self.exec.value.rsplit('/').next().unwrap_or_default()
    }

    /// "worker `api`", or "a worker without a name" when it has none.
    pub fn label(&self) -> String {
        if self.name.value.is_empty() {
            "a worker without a name".to_owned()
        } else {
            format!("worker `{}`", self.name.value)
        }
    }
}
