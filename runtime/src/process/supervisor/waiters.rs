//! Waiters: `start`, `stop`, `restart` and `wait` are answered once the
//! instances they concern have settled, with a report of how each start went;
//! dependents start once what they depend on runs.

use super::*;

impl Supervisor {
    pub(super) fn deps_running(&self, worker: &Worker) -> bool {
        worker.spec.depends_on.iter().all(|dep| {
            self.workers.get(&dep.value).is_some_and(|d| {
                d.instances.iter().all(|i| {
                    d.stopped.contains(&i.index) || matches!(i.life.phase, Phase::Running { .. })
                })
            })
        })
    }

    pub(super) fn start_ready_dependents(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, bool)> = self
            .workers
            .iter()
            .filter_map(|(name, w)| {
                let deadline = w.deps_deadline?;
                let ready = self.deps_running(w);
                (ready || now >= deadline).then(|| (name.clone(), !ready))
            })
            .collect();
        for (name, timed_out) in due {
            if let Some(worker) = self.workers.get_mut(&name) {
                worker.deps_deadline = None;
                worker.deps_timed_out = timed_out;
            }
            if timed_out {
                crate::log(format_args!(
                    "{name}: depends_on not running after depends_timeout; starting anyway"
                ));
            }
            self.send_all(&name, Event::Start);
        }
    }

    pub(super) fn answer_waiters(&mut self) {
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.waiters) {
            let pending = match waiter {
                Waiter::Start { name, index, reply } => match self.workers.get(&name) {
                    None => {
                        let _ = reply.send(Err(format!("worker `{name}` was removed")));
                        None
                    }
                    Some(worker)
                        if worker.deps_deadline.is_none()
                            && worker.rolling.is_none()
                            && worker.instances.iter().all(|i| settled(worker, i, now)) =>
                    {
                        let _ = reply.send(Ok(start_report(&name, worker, index)));
                        None
                    }
                    Some(_) => Some(Waiter::Start { name, index, reply }),
                },
                Waiter::Stop { name, index, reply } => match self.workers.get(&name) {
                    Some(worker)
                        if worker
                            .instances
                            .iter()
                            .filter(|i| index.is_none_or(|n| n == i.index))
                            .any(|i| i.life.phase.is_alive()) =>
                    {
                        Some(Waiter::Stop { name, index, reply })
                    }
                    _ => {
                        let _ = reply.send(Ok(()));
                        None
                    }
                },
                Waiter::Remove { name, reply } => match self.workers.get(&name) {
                    Some(worker) if worker.instances.iter().any(|i| i.life.phase.is_alive()) => {
                        Some(Waiter::Remove { name, reply })
                    }
                    Some(_) => {
                        if let Some(worker) = self.workers.remove(&name) {
                            for instance in worker.instances {
                                self.ids.remove(&instance.id);
                            }
                        }
                        self.dirty = true;
                        let _ = reply.send(Ok(()));
                        None
                    }
                    None => {
                        let _ = reply.send(Ok(()));
                        None
                    }
                },
                Waiter::Running {
                    name,
                    deadline,
                    reply,
                } => match self.workers.get(&name) {
                    None => {
                        let _ = reply.send(Err(format!("worker `{name}` was removed")));
                        None
                    }
                    Some(worker)
                        if worker.instances.iter().all(|i| {
                            worker.stopped.contains(&i.index)
                                || matches!(i.life.phase, Phase::Running { .. })
                        }) =>
                    {
                        let _ = reply.send(Ok(()));
                        None
                    }
                    Some(_) if now >= deadline => {
                        let _ = reply.send(Err(format!("`{name}` is not running yet")));
                        None
                    }
                    Some(_) => Some(Waiter::Running {
                        name,
                        deadline,
                        reply,
                    }),
                },
                Waiter::Shutdown { reply } => {
                    if self
                        .workers
                        .values()
                        .flat_map(|w| &w.instances)
                        .any(|i| i.life.phase.is_alive())
                    {
                        Some(Waiter::Shutdown { reply })
                    } else {
                        // Empty now: the memory cgroups go with the daemon
                        // (the next one makes them again).
                        for instance in self.workers.values_mut().flat_map(|w| &mut w.instances) {
                            instance.cgroup = None;
                        }
                        let _ = reply.send(Ok(()));
                        None
                    }
                }
            };
            self.waiters.extend(pending);
        }
    }
}

/// Whether an instance is past its start: up (and, with `server` lines,
/// taking traffic, or given up on), or failed, or not asked to run.
pub(super) fn settled(worker: &Worker, instance: &Instance, now: Instant) -> bool {
    match instance.life.phase {
        Phase::Starting { .. } | Phase::Draining { .. } | Phase::Stopping { .. } => false,
        Phase::Stopped => !worker.wanted(instance.index) || instance.life.attempts > 0,
        Phase::Running { since, .. } => {
            worker.spec.server.is_empty()
                || instance.backend().is_some()
                || now >= since + SERVE_PATIENCE
        }
        _ => true,
    }
}

/// How the worker's instances started (only instance `index`, with one),
/// leaving out those stopped one by one.
pub(super) fn start_report(name: &str, worker: &Worker, index: Option<usize>) -> StartReport {
    let now = Instant::now();
    let instances = worker
        .instances
        .iter()
        .filter(|i| index.map_or(!worker.stopped.contains(&i.index), |n| n == i.index))
        .map(|i| {
            // A clean exit inside the startup window is the program's choice,
            // not a failed start.
            let ok = match i.life.phase {
                Phase::Running { .. } => true,
                Phase::Exited { .. } | Phase::Waiting { .. } | Phase::Errored { .. } => {
                    i.last_exit.is_some_and(ExitStatus::is_clean)
                }
                _ => false,
            };
            let stderr = if ok {
                Vec::new()
            } else {
                i.stderr_head.lock().map(|h| h.clone()).unwrap_or_default()
            };
            let stderr = String::from_utf8_lossy(&stderr).into_owned();
            let project = run_dir(&worker.spec, &worker.origin);
            let diagnosis = (!ok).then(|| {
                crate::process::augur::diagnose(
                    &stderr,
                    &augur_view(&worker.spec, project.as_deref()),
                )
            });
            InstanceStart {
                index: i.index,
                pid: i.life.phase.pid(),
                ok,
                serving: (ok && !worker.spec.server.is_empty() && i.life.phase.is_alive())
                    .then(|| i.backend().is_some()),
                exit: if ok {
                    None
                } else {
                    i.last_exit.map(|s| s.to_string())
                },
                uptime_ms: i.started.map_or(0, |s| (now - s).as_millis() as u64),
                stderr,
                error: i.spawn_error.clone(),
                diagnosis,
            }
        })
        .collect();
    StartReport {
        worker: name.to_owned(),
        instances,
        dependency_timeout: worker.deps_timed_out,
        warnings: worker.memory_warning.iter().cloned().collect(),
    }
}
