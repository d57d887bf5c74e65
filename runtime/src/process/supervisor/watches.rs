//! What watches a worker from outside: file watching (`watch`), health
//! verdicts and StatsD reporters.

use super::*;

impl Supervisor {
    /// Hands the statsd reporters their instances' current processes.
    pub(super) fn publish_stats(&self) {
        for worker in self.workers.values() {
            if let Some(reporter) = &worker.statsd {
                reporter.publish(
                    worker
                        .instances
                        .iter()
                        .map(|i| crate::observe::statsd::InstanceSample {
                            pid: i.life.phase.pid(),
                            restarts: i.life.attempts.saturating_sub(1),
                            board: i
                                .link
                                .as_ref()
                                .map(|l| crate::observe::statsd::BoardOf(l.board().clone())),
                        })
                        .collect(),
                );
            }
        }
    }

    /// Starts, replaces and ends file watches as workers' `watch` keys (and
    /// where they run) ask.
    pub(super) fn reconcile_watches(&mut self) {
        let workers = &self.workers;
        self.watching
            .retain(|name, _| workers.get(name).is_some_and(|w| !w.spec.watch.is_empty()));
        for (name, worker) in workers {
            let known = self.watching.get(name);
            // Most messages change no spec: only a new one is looked at.
            if worker.spec.watch.is_empty()
                || known.is_some_and(|k| Arc::ptr_eq(&k.source, &worker.spec))
            {
                continue;
            }
            let Some(spec) = watch_spec(&self.home, worker) else {
                self.watching.remove(name);
                continue;
            };
            if let Some(known) = self.watching.get_mut(name)
                && known.spec == spec
            {
                known.source = worker.spec.clone();
                continue;
            }
            let (tx, worker_name) = (self.tx.clone(), name.clone());
            let changed = move |file| {
                let _ = tx.send(Msg::Changed {
                    name: worker_name.clone(),
                    file,
                });
            };
            let watch = crate::process::filewatch::start(name, &spec, changed)
                .inspect_err(|e| {
                    crate::log(format_args!(
                        "{name}: cannot watch {}: {e}; file changes do not restart it",
                        spec.root.display()
                    ));
                })
                .ok();
            let source = worker.spec.clone();
            self.watching.insert(
                name.clone(),
                Watching {
                    source,
                    spec,
                    watch,
                },
            );
        }
    }

    /// A health check's verdict on the process it checks (one that has
    /// ended since says nothing). An unhealthy one is restarted.
    pub(super) fn health(&mut self, id: u64, pid: u32, verdict: crate::process::health::Verdict) {
        let Some((name, index)) = self.ids.get(&id).cloned() else {
            return;
        };
        let Some(instance) = self
            .workers
            .get_mut(&name)
            .and_then(|w| w.instances.get_mut(index))
        else {
            return;
        };
        if instance.life.phase.pid() != Some(pid) {
            return;
        }
        match verdict {
            crate::process::health::Verdict::Passed => instance.healthy = true,
            crate::process::health::Verdict::Unhealthy(why) => {
                crate::log(format_args!(
                    "{name}#{index}: unhealthy ({why}); restarting it"
                ));
                instance.healthy = false;
                instance.health = None;
                self.step(&name, index, Event::Restart);
            }
        }
    }

    /// A watched file changed: a worker meant to run restarts (a stopped
    /// one stays stopped).
    pub(super) fn changed(&mut self, name: &str, file: &Path) {
        if self.workers.get(name).is_some_and(|w| w.enabled) {
            crate::log(format_args!(
                "{name}: {} changed, restarting",
                file.display()
            ));
            self.restart(name, false);
        }
    }
}

pub(super) fn statsd_for(
    name: &str,
    spec: &WorkerSpec,
) -> Option<crate::observe::statsd::Reporter> {
    let config = spec.statsd.as_ref()?;
    Some(crate::observe::statsd::Reporter::start(name, config))
}

pub(super) fn syslog_for(
    name: &str,
    spec: &WorkerSpec,
) -> Option<Arc<crate::observe::syslog::Sink>> {
    let url = &spec.syslog.as_ref()?.value;
    let tag = spec.syslog_tag.as_ref().map_or(name, |t| t.value.as_str());
    crate::observe::syslog::Sink::start(name, url, tag)
        .inspect_err(|e| crate::log(format_args!("{name}: syslog {url}: {e}")))
        .ok()
        .map(Arc::new)
}

/// Where a worker's stdout and stderr go: `log` and `err_log`, else files
/// named after it under `$APM_HOME/logs`. With only `log`, both share it.
/// What a worker's `watch` keys ask for: its tree is the directory it runs
/// in (`path`), or, without one, its config file's.
pub(super) fn watch_spec(
    home: &Path,
    worker: &Worker,
) -> Option<crate::process::filewatch::WatchSpec> {
    let spec = &worker.spec;
    if spec.watch.is_empty() {
        return None;
    }
    let root = run_dir(spec, &worker.origin)?;
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let (out, err) = log_paths(&home, spec);
    let values = |settings: &[apm_compiler::schema::Setting<String>]| {
        settings.iter().map(|s| s.value.clone()).collect()
    };
    Some(crate::process::filewatch::WatchSpec {
        root,
        patterns: values(&spec.watch),
        ignore: values(&spec.watch_ignore),
        delay: spec.watch_delay.as_duration(),
        skip: vec![home, out, err],
    })
}
