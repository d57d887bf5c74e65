//! `apm export`: a compiled config as Kubernetes manifests, a Nomad job,
//! a Compose file or systemd units. `mapping` is the one table of what
//! every worker key becomes in each target; the emitters (one module per
//! target) warn from it and `docs/export.md` is generated from it.
//! Every value from the config reaches the output through `quote`.

pub mod compose;
pub mod kubernetes;
pub mod mapping;
pub mod nomad;
pub mod quote;
pub mod systemd;
mod yaml;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use apm_compiler::Compilation;
use apm_compiler::ir::WorkerSpec;
use apm_compiler::schema::Setting;
use apm_compiler::source::{SourceMap, Span};
use apm_compiler::values::{HealthCheck, ListenAddr, Millis, Scheme};

use mapping::To;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Kubernetes,
    Nomad,
    Compose,
    Systemd,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Kubernetes,
        Target::Nomad,
        Target::Compose,
        Target::Systemd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Kubernetes => "kubernetes",
            Target::Nomad => "nomad",
            Target::Compose => "compose",
            Target::Systemd => "systemd",
        }
    }

    fn column(self, row: &mapping::Row) -> To {
        match self {
            Target::Kubernetes => row.kubernetes,
            Target::Nomad => row.nomad,
            Target::Compose => row.compose,
            Target::Systemd => row.systemd,
        }
    }
}

pub struct Options {
    /// The container image of every worker (Kubernetes, Compose).
    pub image: String,
}

/// A difference between apm and the target, with where the key was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    pub worker: String,
    pub key: String,
    /// The file and 1-based line of the key, when it was written.
    pub at: Option<(PathBuf, usize)>,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((path, line)) = &self.at {
            write!(f, "{}:{line}: ", path.display())?;
        }
        write!(
            f,
            "worker `{}`: `{}`: {}",
            self.worker,
            self.key,
            quote::comment(&self.message)
        )
    }
}

/// Files to write (name, text) and the warnings, in worker order.
#[derive(Debug, Default)]
pub struct Output {
    pub files: Vec<(String, String)>,
    pub warnings: Vec<Warning>,
}

/// Exports a config that compiled without errors.
pub fn export(compilation: &Compilation, target: Target, options: &Options) -> Output {
    let workers: Vec<Worker> = compilation
        .config
        .workers
        .iter()
        .map(|spec| Worker::new(spec, &compilation.sources, target))
        .collect();
    let (files, workers) = match target {
        Target::Kubernetes => kubernetes::export(workers, options),
        Target::Nomad => nomad::export(workers),
        Target::Compose => compose::export(workers, options),
        Target::Systemd => systemd::export(workers),
    };
    Output {
        files,
        warnings: workers.into_iter().flat_map(|w| w.warnings).collect(),
    }
}

/// One worker being exported, with the warnings it collects.
pub struct Worker<'a> {
    pub spec: &'a WorkerSpec,
    sources: &'a SourceMap,
    target: Target,
    pub warnings: Vec<Warning>,
    /// Its container runs `apm container` with the worker's own config
    /// (`fragment`) rather than the program itself: it takes traffic that
    /// only apm's proxy can hand it (decision 121).
    pub under_apm: bool,
}

/// Where the container of a worker under apm finds its config.
pub const APM_CONF_DIR: &str = "/etc/apm";
pub const APM_CONF: &str = "/etc/apm/apm.conf";
/// `APM_HOME` in such a container: writable whatever user runs it.
pub const APM_HOME: &str = "/tmp/apm";
/// The command such a container runs (its image must hold `apm`).
pub const APM_COMMAND: [&str; 3] = ["apm", "container", APM_CONF];

/// Keys a worker's fragment leaves to the platform: the platform scales,
/// starts, limits and sets the environment of the container (apm passes its
/// environment on to the worker there), and collects its output.
const PLATFORM_KEYS: &[&str] = &[
    "instances",
    "autostart",
    "user",
    "depends_on",
    "depends_timeout",
    "env",
    "env_file",
    "env_index",
    "memory_limit",
    "watch",
    "watch_ignore",
    "watch_delay",
    "watch_conf",
    "log",
    "err_log",
    "log_max_size",
    "log_max_files",
];

impl<'a> Worker<'a> {
    fn new(spec: &'a WorkerSpec, sources: &'a SourceMap, target: Target) -> Worker<'a> {
        let mut worker = Worker {
            spec,
            sources,
            target,
            warnings: Vec::new(),
            under_apm: false,
        };
        worker.warn_from_table();
        worker
    }

    fn name(&self) -> &str {
        &self.spec.name.value
    }

    /// A `Warn` row of the target for every key the user wrote.
    fn warn_from_table(&mut self) {
        let mut written: Vec<(String, Span)> = Vec::new();
        let mut collect = |prefix: &str, spans: Vec<(&'static str, Vec<Span>)>| {
            for (key, spans) in spans {
                if let Some(span) = spans.first() {
                    written.push((format!("{prefix}{key}"), *span));
                }
            }
        };
        collect("", self.spec.spans());
        if let Some(vanguard) = &self.spec.vanguard {
            collect("vanguard.", vanguard.spans());
        }
        if let Some(statsd) = &self.spec.statsd {
            collect("statsd.", statsd.spans());
        }
        let listens = !self.spec.server.is_empty();
        // Only containers can run apm for a worker: Nomad and systemd warn.
        let in_container = matches!(self.target, Target::Kubernetes | Target::Compose);
        let mut needs_apm = listens && in_container && self.spec.upstream.value == "connector";
        for (key, span) in written {
            match self.target.column(mapping::row(&key)) {
                To::Maps(_) => {}
                To::Warn(text) => self.push(key, Some(span), text.to_owned()),
                To::Apm(_) if listens => needs_apm = true,
                To::Apm(_) => self.push(
                    key,
                    Some(span),
                    "a setting of apm's proxy, which runs only for a worker with `server` listeners"
                        .to_owned(),
                ),
            }
        }
        self.under_apm = needs_apm;
    }

    /// The worker's own `apm.conf` for `apm container` in its container:
    /// its keys but those the platform carries (`PLATFORM_KEYS`), with
    /// `tls_*` files at `tls_files` (key, path in the container), or no TLS
    /// at all when the platform terminates it (`None`).
    fn fragment(&mut self, tls_files: Option<&[(&str, String)]>) -> String {
        let mut settings: Vec<(&str, Vec<String>)> = (self.spec.settings().into_iter())
            .filter(|(key, _)| !PLATFORM_KEYS.contains(key))
            .filter_map(|(key, values)| match (key.strip_prefix("tls"), tls_files) {
                (Some(_), None) => None,
                (Some(_), Some(files)) if key != "tls" => files
                    .iter()
                    .find(|(file_key, _)| *file_key == key)
                    .map(|(_, path)| (key, vec![path.clone()])),
                _ => Some((key, values)),
            })
            .collect();
        for server in &self.spec.server {
            if let ListenAddr::Tcp { host, .. } = &server.value.addr
                && (host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback()))
            {
                self.warn(
                    "server",
                    server,
                    "apm listens on loopback in the container, where the platform cannot reach it; listen on 0.0.0.0",
                );
            }
        }
        if self.spec.path.is_none() {
            // apm would run it in the directory of /etc/apm/apm.conf.
            let file = self.spec.span.map(|span| self.sources.path(span.file));
            let dir = file.and_then(Path::parent).unwrap_or(Path::new("/"));
            let dir = match dir.as_os_str().is_empty() {
                true => std::env::current_dir().unwrap_or_else(|_| "/".into()),
                false => std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            };
            let dir = dir.to_string_lossy().into_owned();
            self.warn_at(
                "path",
                self.spec.span,
                format!(
                    "not set: under `apm container` the program runs in {dir}, the config file's directory here, \
                     which the image must hold (set `path` to where the image has the app)"
                ),
            );
            settings.push(("path", vec![dir]));
        }
        apm_compiler::print::worker_with(&settings, self.spec)
    }

    fn push(&mut self, key: String, span: Option<Span>, message: String) {
        let at = span.map(|span| {
            (
                self.sources.path(span.file).to_path_buf(),
                self.sources.start(span).line,
            )
        });
        self.warnings.push(Warning {
            worker: self.name().to_owned(),
            key,
            at,
            message,
        });
    }

    /// A warning about a key whose value (not the key itself) has no
    /// equivalent in the target.
    fn warn<T>(&mut self, key: &str, setting: &Setting<T>, message: impl Into<String>) {
        self.push(key.to_owned(), setting.span, message.into());
    }

    fn warn_at(&mut self, key: &str, span: Option<Span>, message: impl Into<String>) {
        self.push(key.to_owned(), span, message.into());
    }

    /// `# WARN:` lines for the output, one per warning so far.
    fn comments(&self) -> String {
        let mut out = String::new();
        for warning in &self.warnings {
            let _ = writeln!(
                out,
                "# WARN: `{}`: {}",
                quote::comment(&warning.key),
                quote::comment(&warning.message)
            );
        }
        out
    }

    /// TCP listeners (scheme, port); unix sockets are warned about.
    fn tcp_listeners(&mut self) -> Vec<(Scheme, u16, Option<Span>)> {
        let mut out = Vec::new();
        for server in &self.spec.server {
            match &server.value.addr {
                ListenAddr::Tcp { port, .. } => out.push((server.value.scheme, *port, server.span)),
                ListenAddr::Unix { .. } => self.warn(
                    "server",
                    server,
                    "a unix socket listener has no equivalent; it is left out",
                ),
            }
        }
        out
    }

    /// Whether the program needs apm's proxy in front to get traffic, said
    /// once as a warning.
    fn warn_if_proxy_needed(&mut self) {
        if !self.spec.server.is_empty() && self.spec.upstream.value == "connector" {
            let span = self.spec.upstream.span.or(self.spec.server[0].span);
            self.warn_at(
                "upstream",
                span,
                "the program takes traffic through apm's connector protocol, which needs apm's proxy; \
                 the export runs the program directly and it will get no connections (use `upstream port`)",
            );
        }
    }

    /// The port the program itself listens on (`upstream port`): the first
    /// TCP listener's, given in port_env.
    fn program_port(&self) -> Option<u16> {
        if self.spec.upstream.value != "port" {
            return None;
        }
        self.spec.server.iter().find_map(|s| match s.value.addr {
            ListenAddr::Tcp { port, .. } => Some(port),
            ListenAddr::Unix { .. } => None,
        })
    }

    /// The pull health check as (scheme, port, path), warning for push mode.
    fn probe(&mut self) -> Option<Probe> {
        let setting = self.spec.health_check.as_ref()?;
        match &setting.value {
            HealthCheck::Push => {
                let message = if self.under_apm {
                    "push mode: apm checks the program in the container; the platform gets no probe"
                } else {
                    "push mode (the program checks in with apm) has no equivalent; no probe is set"
                };
                self.warn_at("health_check", setting.span, message);
                None
            }
            HealthCheck::Pull(url) if self.under_apm => {
                // apm probes the program on a port of its own choosing; the
                // platform reaches the program only through apm's listener.
                let listener = self.spec.server.iter().find_map(|s| match s.value.addr {
                    ListenAddr::Tcp { port, .. } if s.value.scheme != Scheme::Tcp => Some(port),
                    _ => None,
                });
                let Some(port) = listener else {
                    self.warn_at(
                        "health_check",
                        setting.span,
                        "apm checks the program in the container; the platform gets no probe (no HTTP listener to probe through)",
                    );
                    return None;
                };
                let path = Probe::parse(url).path;
                let scheme = if self.spec.tls.value { "https" } else { "http" };
                Some(Probe::parse(&format!("{scheme}://127.0.0.1:{port}{path}")))
            }
            HealthCheck::Pull(url) => Some(Probe::parse(url)),
        }
    }

    /// The numeric uid of `user` on this machine, warning when unknown.
    fn uid(&mut self) -> Option<u32> {
        let setting = self.spec.user.as_ref()?;
        match nix::unistd::User::from_name(&setting.value) {
            Ok(Some(user)) => Some(user.uid.as_raw()),
            _ => {
                let span = setting.span;
                self.warn_at(
                    "user",
                    span,
                    format!(
                        "user `{}` does not exist on the exporting machine, so its uid is unknown; set the uid by hand",
                        setting.value
                    ),
                );
                None
            }
        }
    }

    /// Restart on clean exits, on errors.
    fn restarts(&self) -> (bool, bool) {
        if !self.spec.restart_on_exit_codes.is_empty() {
            return (false, true);
        }
        (self.spec.restart.value, self.spec.restart_err.value)
    }

    fn restart_delay(&self) -> Millis {
        Millis(
            self.spec
                .restart_delay
                .value
                .0
                .max(self.spec.err_delay.value.0),
        )
    }

    /// The larger limit of the restarts that are on; 0 when one of them
    /// is unlimited.
    fn restart_limit(&self) -> u32 {
        let (clean, err) = self.restarts();
        let on = [
            (clean, self.spec.max_restarts.value),
            (err, self.spec.max_err_restarts.value),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, limit)| limit);
        if on.clone().any(|limit| limit == 0) {
            0
        } else {
            on.max().unwrap_or(0)
        }
    }
}

/// A pull health check's target in the program.
pub struct Probe {
    pub https: bool,
    pub port: u16,
    pub path: String,
    pub url: String,
}

impl Probe {
    fn parse(url: &str) -> Probe {
        let https = url.starts_with("https://");
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(if https { 443 } else { 80 });
        Probe {
            https,
            port,
            path: path.to_owned(),
            url: url.to_owned(),
        }
    }
}

/// Whole seconds, rounded up, at least `min`.
fn seconds(millis: Millis, min: u64) -> u64 {
    millis.0.div_ceil(1000).max(min)
}

/// A duration the way Go, systemd and Compose all read it.
fn duration(millis: Millis) -> String {
    if millis.0.is_multiple_of(1000) {
        format!("{}s", millis.0 / 1000)
    } else {
        format!("{}ms", millis.0)
    }
}

/// Whether an env variable's name says it holds a secret.
fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL"]
        .iter()
        .any(|word| upper.contains(word))
}

/// `docs/export.md`, from the table.
pub fn reference() -> String {
    let mut out = String::from(
        "# `apm export`: Kubernetes, Nomad, Compose and systemd\n\n\
         <!-- Generated from export/src/mapping.rs; `BLESS=1 cargo test --test it docs` regenerates it. -->\n\n\
         `apm export TARGET FILE [-o DIR]` compiles FILE (no daemon needed; a config with errors is refused) and writes \
         Kubernetes manifests (one `NAME.yaml` per worker), a Nomad job (`apm.nomad.hcl`), a Compose file (`compose.yaml`) \
         or systemd units (`NAME.service`, or `NAME@.service` and `NAME.target` for several instances), to DIR or to stdout. \
         Every key a target has no equivalent for becomes a `# WARN:` line at the top of the worker's output and a warning \
         on stderr with the key's file and line; **(warns)** below marks those. A worker with listeners that takes its \
         traffic through apm's connector protocol, or sets a key marked **(apm)**, gets a container that runs `apm container` \
         (the image must hold `apm`, as `examples/Dockerfile`'s does) with the worker's own config at `/etc/apm/apm.conf` \
         (Kubernetes: a ConfigMap `NAME-apm`; Compose: a `configs` entry), one instance per container, the platform's \
         environment passed on to the program; other workers run their program directly. Every value from the config is quoted and \
         escaped for its format (and `$` doubled where Kubernetes, Compose, Nomad or systemd would expand it), so a value \
         cannot add keys, directives or documents. Secrets: `env_file` and the TLS key are never read; the output holds the \
         `kubectl create secret` commands that load them.\n\n\
         | key | Kubernetes | Nomad | Compose | systemd |\n|---|---|---|---|---|\n",
    );
    for row in mapping::ROWS {
        let cell = |to: To| {
            let text = to.text().replace('|', "\\|");
            match to {
                To::Maps(_) => text,
                To::Warn(_) => format!("**(warns)** {text}"),
                To::Apm(_) => format!("**(apm)** {text}"),
            }
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            row.key,
            cell(row.kubernetes),
            cell(row.nomad),
            cell(row.compose),
            cell(row.systemd)
        );
    }
    out
}
