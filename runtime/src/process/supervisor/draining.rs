//! Taking an instance out of rotation: its sessions that may move go to
//! another instance (`session_persist`), and it is signalled once nothing
//! the proxy sent it is in flight (bounded by the lifecycle's deadline).

use super::*;

impl Supervisor {
    /// Performs `Effect::Drain` for the process `pid` of an instance.
    pub(super) fn drain(&mut self, name: &str, index: usize, pid: u32) {
        let Some(worker) = self.workers.get_mut(name) else {
            return;
        };
        let Some(instance) = worker.instances.get(index) else {
            return;
        };
        if let Some(link) = &instance.link {
            if worker.spec.session_persist.value
                && link.is_ready()
                && !link.migrates()
                && !std::mem::replace(&mut worker.migrate_warned, true)
            {
                crate::log(format_args!(
                    "{name}: session_persist needs a connector that takes session hand-off \
                     (\"migrate\" in its ready features); this one does not, so its sessions \
                     stay on their instance until it stops: update apm_module"
                ));
            }
            link.retire();
        }
        let (tx, id) = (self.tx.clone(), instance.id);
        let in_flight = instance.in_flight();
        // Out of the route before its count is looked at: the proxy counts
        // a request on an instance while it reads the route that lists it,
        // so a request either is counted here or does not come here.
        // (`settle` publishes the routes before the task below first runs
        // on the supervisor's one thread; this does not rest on that.)
        if let Some(in_flight) = &in_flight {
            worker.routes.send_if_modified(|route| {
                let listed = route.backends.len();
                route
                    .backends
                    .retain(|backend| !Arc::ptr_eq(backend.in_flight(), in_flight));
                route.backends.len() != listed
            });
        }
        tokio::spawn(async move {
            if let Some(in_flight) = in_flight {
                in_flight.idle().await;
            }
            let _ = tx.send(Msg::Event {
                id,
                event: Event::Drained { pid },
            });
        });
    }
}
