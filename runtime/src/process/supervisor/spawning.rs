//! Spawning an instance's process: its command (exec, params, environment,
//! `user`, working directory), its memory cgroup, its log targets, its
//! connector channel or port, and its health check.

use super::*;

impl Supervisor {
    /// Starts a process for an instance; returns the event that tells how it went.
    pub(super) fn spawn_process(&mut self, name: &str, index: usize) -> Event {
        let worker = &self.workers[name];
        let spec = worker.spec.clone();
        let directory = run_dir(&spec, &worker.origin);
        let inherited = if worker.environment.is_empty() {
            self.base_env.clone()
        } else {
            Arc::new(worker.environment.0.clone())
        };
        let (out_target, err_target) = self.log_targets(&spec, index);
        let worker = self.workers.get_mut(name).expect("present");
        let instance = &mut worker.instances[index];
        instance.stderr_head = Arc::default();
        instance.spawn_error = None;
        instance.port = None;
        instance.link = None;
        instance.health = None;
        instance.healthy = false;
        let port = if spec.upstream.value == "port" {
            match port::free_port() {
                Ok(port) => Some(port),
                Err(error) => {
                    return spawn_failed(name, instance, format!("no free loopback port: {error}"));
                }
            }
        } else {
            None
        };
        instance.port = port.map(Port::new);
        if spec.augur_full_scan.value
            && let Some(problem) =
                crate::process::augur::preflight(&augur_view(&spec, directory.as_deref()))
        {
            return spawn_failed(name, instance, problem);
        }
        let cgroup = match &spec.memory_limit {
            Some(limit) => match memory_group(name, &self.home, instance, limit.value.0) {
                Ok(procs) => Some(procs),
                Err(error) => {
                    let warning = format!(
                        "memory_limit is not enforced: {error} (it needs a root daemon and a memory cgroup controller)"
                    );
                    if worker.memory_warning.is_none() {
                        crate::log(format_args!("{name}: {warning}"));
                    }
                    worker.memory_warning = Some(warning);
                    None
                }
            },
            None => {
                instance.cgroup = None;
                None
            }
        };
        let (mut command, uid) =
            match build_command(&spec, directory.as_deref(), &inherited, index, port, cgroup) {
                Ok(built) => built,
                Err(error) => return spawn_failed(name, instance, error),
            };
        let listening = instance.port.as_ref().map(|p| p.accepting.clone());
        let health = match health_mode(&spec, port, listening, &mut self.check_ins) {
            Ok(Some((mode, url))) => {
                if let Some(url) = url {
                    command.env("APM_HEALTH_URL", url);
                }
                Some(mode)
            }
            Ok(None) => None,
            Err(error) => return spawn_failed(name, instance, error),
        };
        // Only a worker that receives traffic, or takes part in IPC, gets a
        // connector channel.
        let takes_ipc = !spec.listen.is_empty() || spec.ipc_timeout.is_explicit();
        let channel = if (spec.upstream.value == "connector" && !spec.server.is_empty())
            || takes_ipc
        {
            match std::os::unix::net::UnixStream::pair() {
                Ok((ours, theirs)) => {
                    sys::pass_channel(&mut command, theirs.into());
                    command.env("APM_FD", sys::CONNECTOR_FD.to_string());
                    Some(ours)
                }
                Err(error) => {
                    return spawn_failed(name, instance, format!("no connector channel: {error}"));
                }
            }
        } else {
            None
        };
        command.env(&self.marker.0, &self.marker.1);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                return spawn_failed(
                    name,
                    instance,
                    format!("cannot start `{}`: {error}", spec.exec.value),
                );
            }
        };
        let Some(pid) = child.id() else {
            return spawn_failed(
                name,
                instance,
                "the process ended before it could be watched".to_owned(),
            );
        };
        // The child has its end of the channel; ours must be the only other.
        drop(command);
        if let Some(port) = &instance.port {
            port.probe(
                self.tx.clone(),
                format!("{name}#{index}"),
                uid.as_raw(),
                pid,
            );
        }
        if let Some(channel) = channel {
            let tx = self.tx.clone();
            let label = format!("{name}#{index}");
            let ipc = crate::traffic::connector::IpcSettings {
                channels: spec.listen.iter().map(|c| c.value.clone()).collect(),
                timeout: spec.ipc_timeout.value.as_duration(),
            };
            match crate::traffic::connector::Link::start(
                channel,
                label,
                index,
                pid,
                ipc,
                move || {
                    let _ = tx.send(Msg::Recheck);
                },
            ) {
                Ok(link) => instance.link = Some(link),
                Err(error) => crate::log(format_args!(
                    "{name}#{index}: no connector channel: {error}"
                )),
            }
        }
        if let Some(mode) = health {
            let (tx, id) = (self.tx.clone(), instance.id);
            let report = move |verdict| {
                let _ = tx.send(Msg::Health { id, pid, verdict });
            };
            let settings = worker.health_settings.subscribe();
            instance.health = Some(crate::process::health::start(mode, settings, report));
        }
        instance.start_ticks = procfs::stat(pid).map(|s| s.start_ticks);
        instance.started = Some(Instant::now());
        instance.usage = None;
        self.dirty = true;
        let (out_tx, out_rx) = watch::channel(out_target);
        let (err_tx, err_rx) = watch::channel(err_target);
        instance.targets = Some((out_tx, err_tx));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(logs::pump(stdout, Stream::Out, pid, out_rx, None));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(logs::pump(
                stderr,
                Stream::Err,
                pid,
                err_rx,
                Some(instance.stderr_head.clone()),
            ));
        }
        let (tx, id) = (self.tx.clone(), instance.id);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => exit_status(status),
                Err(_) => ExitStatus::Signal(Signal::SIGKILL as i32),
            };
            let _ = tx.send(Msg::Event {
                id,
                event: Event::Exited { status },
            });
        });
        Event::Spawned { pid }
    }

    /// Where an instance's stdout and stderr lines go under `spec`.
    pub(super) fn log_targets(&mut self, spec: &WorkerSpec, index: usize) -> (Target, Target) {
        let (out, err) = sinks(&mut self.logs, &self.home, self.console.as_deref(), spec);
        let colour = !spec.strip_ansi.value;
        let prefix = crate::observe::logstyle::colours(&log_prefix(spec, index), colour);
        let time_format = log_time_format(spec);
        let syslog = self
            .workers
            .get(&spec.name.value)
            .and_then(|w| w.syslog.clone());
        let target = |sinks| Target {
            sinks,
            prefix: prefix.clone(),
            time_format: time_format.clone(),
            strip_ansi: spec.strip_ansi.value,
            syslog: syslog.clone(),
        };
        (target(out), target(err))
    }

    /// Points the running processes' output at the worker's current log
    /// files and prefix, after an update or a rename changed them.
    pub(super) fn retarget(&mut self, name: &str) {
        let Some(spec) = self.workers.get(name).map(|w| w.spec.clone()) else {
            return;
        };
        let count = self.workers[name].instances.len();
        for index in 0..count {
            let (out, err) = self.log_targets(&spec, index);
            if let Some((out_tx, err_tx)) = &self.workers[name].instances[index].targets {
                out_tx.send_replace(out);
                err_tx.send_replace(err);
            }
        }
    }
}

pub(super) fn spawn_failed(name: &str, instance: &mut Instance, error: String) -> Event {
    crate::log(format_args!("{name}#{}: {error}", instance.index));
    instance.spawn_error = Some(error);
    instance.started = Some(Instant::now());
    Event::Exited {
        status: ExitStatus::SpawnFailed,
    }
}

/// The memory cgroup an instance's next process joins, made or renewed
/// with `limit`: its `cgroup.procs`, opened for the child to write.
pub(super) fn memory_group(
    name: &str,
    home: &Path,
    instance: &mut Instance,
    limit: u64,
) -> Result<std::fs::File, String> {
    match &mut instance.cgroup {
        Some(group) => group.renew(limit)?,
        None => {
            // Named after the daemon's home too: two daemons may run a
            // worker of the same name.
            let home = home.as_os_str().as_encoded_bytes();
            let daemon = home.iter().fold(0x811c_9dc5_u32, |h, b| {
                (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
            });
            let group = format!("apm-{daemon:08x}-{name}-{}", instance.index);
            instance.cgroup = Some(crate::process::cgroup::Group::prepare(&group, limit)?);
        }
    }
    let group = instance.cgroup.as_ref().expect("set above");
    group
        .procs()
        .map_err(|e| format!("cannot open its cgroup.procs: {e}"))
}

/// How a process of `spec` is health-checked, with the `APM_HEALTH_URL`
/// it is given in push mode. With `upstream port`, a pull-mode URL's
/// request goes to the instance's own port (the URL's host stays its
/// `Host`), since each instance is checked on its own, once it listens.
pub(super) fn health_mode(
    spec: &WorkerSpec,
    port: Option<u16>,
    listening: Option<Arc<std::sync::atomic::AtomicBool>>,
    check_ins: &mut Option<crate::process::health::Endpoint>,
) -> Result<Option<(crate::process::health::Mode, Option<String>)>, String> {
    use apm_compiler::values::HealthCheck;
    let Some(check) = &spec.health_check else {
        return Ok(None);
    };
    match &check.value {
        HealthCheck::Pull(url) => {
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| format!("health_check {url}: {e}"))?;
            let host = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| format!("health_check {url}: no host"))?;
            let uri = match port {
                Some(port) => {
                    let mut parts = uri.into_parts();
                    parts.authority = Some(
                        format!("127.0.0.1:{port}")
                            .parse()
                            .expect("an address is an authority"),
                    );
                    hyper::Uri::from_parts(parts).map_err(|e| e.to_string())?
                }
                None => uri,
            };
            let mode = crate::process::health::Mode::Pull {
                uri,
                host,
                listening,
            };
            Ok(Some((mode, None)))
        }
        HealthCheck::Push => {
            if check_ins.is_none() {
                *check_ins = Some(
                    crate::process::health::Endpoint::start()
                        .map_err(|e| format!("no health check-in endpoint: {e}"))?,
                );
            }
            let endpoint = check_ins.as_ref().expect("started above");
            let (check_in, url) = endpoint
                .check_in()
                .map_err(|e| format!("no health check-in token: {e}"))?;
            Ok(Some((
                crate::process::health::Mode::Push(check_in),
                Some(url),
            )))
        }
    }
}

pub(super) fn health_settings(spec: &WorkerSpec) -> crate::process::health::Settings {
    crate::process::health::Settings {
        first: spec.startup_grace.as_duration(),
        interval: spec.health_check_interval.as_duration(),
        timeout: spec.health_check_timeout.as_duration(),
        threshold: spec.health_check_threshold.value,
    }
}

pub fn log_paths(home: &Path, spec: &WorkerSpec) -> (PathBuf, PathBuf) {
    let name = &spec.name.value;
    let out = spec.log.as_ref().map_or_else(
        || home.join("logs").join(format!("{name}.out.log")),
        |l| l.value.clone(),
    );
    let err = match (&spec.err_log, &spec.log) {
        (Some(err), _) => err.value.clone(),
        (None, Some(log)) => log.value.clone(),
        (None, None) => home.join("logs").join(format!("{name}.err.log")),
    };
    (out, err)
}

/// Where a worker's stdout and stderr lines go: its log files, or in a
/// container apm's own stdout and stderr, and the log files only when the
/// config names them (docs/cli.md, decision 120).
pub(super) fn sinks(
    logs: &mut LogFiles,
    home: &Path,
    console: Option<&Console>,
    spec: &WorkerSpec,
) -> (Sinks, Sinks) {
    let (out_path, err_path) = log_paths(home, spec);
    let (out_file, err_file) = match console {
        None => (true, true),
        Some(_) => (
            spec.log.is_some(),
            spec.log.is_some() || spec.err_log.is_some(),
        ),
    };
    let mut file = |wanted: bool, path: &Path| wanted.then(|| logs.open(path, rotation(spec)));
    let out = Sinks {
        file: file(out_file, &out_path),
        console: console.map(|c| c.out.clone()),
    };
    let err = Sinks {
        file: file(err_file, &err_path),
        console: console.map(|c| c.err.clone()),
    };
    (out, err)
}

pub(super) fn rotation(spec: &WorkerSpec) -> logs::Rotation {
    logs::Rotation::new(
        spec.log_max_size.as_ref().map(|s| s.value.0),
        spec.log_max_files.value,
    )
}

/// `log_time_format` with its colours, as the worker's log lines use it.
pub(super) fn log_time_format(spec: &WorkerSpec) -> Option<String> {
    let format = &spec.log_time_format.as_ref()?.value;
    Some(crate::observe::logstyle::colours(
        format,
        !spec.strip_ansi.value,
    ))
}

pub(super) fn log_prefix(spec: &WorkerSpec, index: usize) -> String {
    let base = spec
        .prefix
        .as_ref()
        .map_or(spec.name.value.as_str(), |p| p.value.as_str());
    if spec.instances.value > 1 {
        format!("{base}#{index}")
    } else {
        base.to_owned()
    }
}

/// `KEY=VALUE` lines; blank lines, `#` comments and `export ` are allowed,
/// and values may be quoted.
pub(super) fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read env_file {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.strip_prefix("export ").unwrap_or(l).split_once('=')?;
            let value = value.trim();
            let unquoted = [('"', '"'), ('\'', '\'')]
                .iter()
                .find_map(|(a, b)| value.strip_prefix(*a).and_then(|v| v.strip_suffix(*b)))
                .unwrap_or(value);
            Some((key.trim().to_owned(), unquoted.to_owned()))
        })
        .collect())
}

/// The command that starts an instance's process, and the uid it runs as.
pub(super) fn build_command(
    spec: &WorkerSpec,
    directory: Option<&Path>,
    inherited: &[(String, String)],
    index: usize,
    port: Option<u16>,
    cgroup: Option<std::fs::File>,
) -> Result<(tokio::process::Command, nix::unistd::Uid), String> {
    let mut command = tokio::process::Command::new(&spec.exec.value);
    command.args(spec.params.iter().map(|p| &p.value));
    if let Some(directory) = directory {
        command.current_dir(directory);
    }
    // Nothing of the daemon's own environment, which is that of whichever
    // command started it (docs/cli.md, decision 47).
    command.env_clear();
    command.envs(inherited.iter().map(|(k, v)| (k, v)));
    // env_file first, so `env` entries override it; read before any
    // privilege drop, as the daemon.
    let run_as = spec
        .user
        .as_ref()
        .map(|user| sys::RunAs::lookup(&user.value))
        .transpose()?;
    if let Some(user) = &run_as {
        // A login environment for the user, which env_file and env may override.
        command.envs(user.login_env());
    }
    if let Some(file) = &spec.env_file {
        command.envs(read_env_file(&file.value)?);
    }
    command.envs(spec.env.iter().map(|e| (&e.value.key, &e.value.value)));
    command.env("APM", "1");
    if let Some(port) = port {
        command.env(&spec.port_env.value, port.to_string());
    }
    if let Some(var) = &spec.env_index {
        command.env(&var.value, index.to_string());
    }
    // Joined while the child may still write the group's file.
    if let Some(procs) = cgroup {
        sys::join_cgroup(&mut command, procs);
    }
    let me = nix::unistd::geteuid();
    let uid = run_as.as_ref().map_or(me, |user| user.uid);
    if let Some(run_as) = run_as
        && run_as.uid != me
    {
        if !me.is_root() {
            return Err(format!(
                "`user {}` needs the daemon to run as root; it runs as uid {me}",
                run_as.name
            ));
        }
        sys::run_as(&mut command, run_as);
    }
    sys::restore_open_files_limit(&mut command);
    // Before the connector's channel is passed: it is registered later.
    sys::only_standard_descriptors(&mut command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    Ok((command, uid))
}

/// The directory a worker's processes run in: `path`, or without one the
/// directory of the config file that defines it (`apm run` always sets
/// `path`). None for a command-line worker without one, which runs in the
/// daemon's directory, `/`.
pub(super) fn run_dir(spec: &WorkerSpec, origin: &Origin) -> Option<PathBuf> {
    match (&spec.path, origin) {
        (Some(path), _) => Some(path.value.clone()),
        (None, Origin::File { path }) => path.parent().map(Path::to_path_buf),
        (None, Origin::Cli { .. }) => None,
    }
}

/// The spec augur reads a worker's project from: with `path` set to the
/// directory it runs in, when that comes from its config file's.
pub(super) fn augur_view<'a>(
    spec: &'a WorkerSpec,
    directory: Option<&Path>,
) -> std::borrow::Cow<'a, WorkerSpec> {
    match directory {
        Some(directory) if spec.path.is_none() => {
            let mut view = spec.clone();
            view.path = Some(apm_compiler::schema::Setting::new(
                directory.to_path_buf(),
                None,
            ));
            std::borrow::Cow::Owned(view)
        }
        _ => std::borrow::Cow::Borrowed(spec),
    }
}
