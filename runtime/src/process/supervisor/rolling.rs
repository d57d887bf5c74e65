//! Rolling restarts: a worker's instances restart one at a time, each once the
//! one before serves again (`rolling`, `rolling_delay`).

use super::*;

impl Supervisor {
    pub(super) fn restart(&mut self, name: &str, force: bool) {
        let Some(worker) = self.workers.get_mut(name) else {
            return;
        };
        worker.enabled = true;
        self.dirty = true;
        // Rolling keeps some instances serving; with none running there is
        // nothing to keep, and they all start at once.
        let serving = worker
            .instances
            .iter()
            .any(|i| matches!(i.life.phase, Phase::Running { .. }));
        // Instances stopped one by one stay stopped.
        let first = worker.next_wanted(0);
        if let Some(first) = first
            && worker.spec.rolling.value
            && !force
            && worker.instances.len() > 1
            && serving
        {
            worker.rolling = Some(Rolling::at(first, Instant::now()));
            self.step(name, first, Event::Restart);
        } else {
            worker.rolling = None;
            // Instances an update is retiring stay stopped.
            let kept = worker
                .instances
                .len()
                .min(worker.spec.instances.value as usize);
            for index in (0..kept).filter(|&i| worker.wanted(i)).collect::<Vec<_>>() {
                self.step(name, index, Event::Restart);
            }
        }
    }

    /// Moves rolling restarts on: the next instance restarts once the one
    /// restarted before it serves and `rolling_delay` has passed. One that
    /// does not come back stops the rolling restart, so the instances not
    /// yet restarted keep serving with their previous process.
    pub(super) fn advance_rolling(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.rolling.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let worker = self.workers.get_mut(&name).expect("listed above");
            let after = worker
                .rolling
                .as_ref()
                .and_then(|r| worker.next_wanted(r.current + 1));
            let rolling = worker.rolling.as_mut().expect("listed above");
            let Some(instance) = worker.instances.get(rolling.current) else {
                worker.rolling = None;
                continue;
            };
            let spec = &worker.spec;
            let serves = (spec.server.is_empty() || instance.backend().is_some())
                && (spec.health_check.is_none() || instance.healthy);
            // Its drain (bounded by the longer of the two), then its stop.
            let deadline = rolling.since
                + spec
                    .drain_timeout
                    .as_duration()
                    .max(spec.kill_timeout.as_duration())
                + spec.kill_timeout.as_duration()
                + spec.startup_grace.as_duration()
                + ROLLING_PATIENCE;
            let mut next = None;
            let mut wake = None;
            match instance.life.phase {
                Phase::Running { .. } if serves => match rolling.next_at {
                    None => {
                        let at = now + spec.rolling_delay.as_duration();
                        rolling.next_at = Some(at);
                        wake = Some(at);
                    }
                    // Past the last one meant to run, it is over.
                    Some(at) if now >= at => {
                        *rolling = Rolling::at(after.unwrap_or(worker.instances.len()), now);
                        next = Some(rolling.current);
                    }
                    Some(_) => {}
                },
                Phase::Starting { .. }
                | Phase::Running { .. }
                | Phase::Stopping { .. }
                | Phase::Draining { .. }
                    if now < deadline =>
                {
                    if !std::mem::replace(&mut rolling.deadline_set, true) {
                        wake = Some(deadline);
                    }
                }
                ref phase => {
                    let why = match phase {
                        Phase::Starting { .. }
                        | Phase::Running { .. }
                        | Phase::Stopping { .. }
                        | Phase::Draining { .. } => format!(
                            "is not serving {} s after its restart",
                            (deadline - rolling.since).as_secs()
                        ),
                        other => format!("did not come back ({})", other.name()),
                    };
                    crate::log(format_args!(
                        "{name}: rolling restart stopped: instance {} {why}; the instances after it keep their processes",
                        rolling.current
                    ));
                    worker.rolling = None;
                }
            }
            if let Some(index) = next {
                if index < worker.instances.len() {
                    self.step(&name, index, Event::Restart);
                } else {
                    worker.rolling = None;
                }
            }
            if let Some(at) = wake {
                self.wake_at(at);
            }
        }
    }
}
