//! One instance at a time: `apm restart|stop|start NAME#I` step a single
//! instance's lifecycle, as the whole-worker commands step each of them (a
//! proxied one drains first the same way). An instance stopped so stays
//! stopped while the worker runs (restarts, reloads, rolling restarts pass
//! it by) until it is started again, alone or with its whole worker.

use super::*;

impl Supervisor {
    /// The error for an instance the worker does not have.
    pub(super) fn instance_exists(&self, name: &str, index: Option<usize>) -> Result<(), String> {
        self.exists(name)?;
        let count = self.workers[name].instances.len();
        match index {
            Some(index) if index >= count => Err(format!(
                "`{name}` has {count} instance(s) ({}); #{index} does not exist",
                match count {
                    0 => "none".to_owned(),
                    1 => format!("{name}#0"),
                    _ => format!("{name}#0 to {name}#{}", count - 1),
                }
            )),
            _ => Ok(()),
        }
    }

    /// Starts (`Event::Start`) or restarts (`Event::Restart`) one instance.
    /// On a stopped worker only that instance is meant to run: the others
    /// are marked stopped one by one.
    pub(super) fn run_one(&mut self, name: &str, index: usize, event: Event) {
        let Some(worker) = self.workers.get_mut(name) else {
            return;
        };
        if !worker.enabled {
            worker.enabled = true;
            worker.stopped = (0..worker.instances.len()).collect();
        }
        worker.stopped.remove(&index);
        self.dirty = true;
        self.step(name, index, event);
    }

    pub(super) fn stop_one(&mut self, name: &str, index: usize) {
        let Some(worker) = self.workers.get_mut(name) else {
            return;
        };
        if worker.enabled {
            worker.stopped.insert(index);
            // Every instance stopped is the worker stopped.
            if worker.stopped.len() >= worker.instances.len() {
                worker.enabled = false;
                worker.stopped.clear();
                worker.rolling = None;
            }
            self.dirty = true;
        }
        self.step(name, index, Event::Stop);
    }
}

impl Worker {
    /// Whether instance `index` is meant to run.
    pub(super) fn wanted(&self, index: usize) -> bool {
        self.enabled && !self.stopped.contains(&index)
    }

    /// The first instance from `from` on that is meant to run.
    pub(super) fn next_wanted(&self, from: usize) -> Option<usize> {
        (from..self.instances.len()).find(|&i| self.wanted(i))
    }
}
