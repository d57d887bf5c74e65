//! The proxy's side of supervision: the listeners a worker's `server` keys
//! open (kept while address and worker stay) and the route each worker
//! publishes: the instances that get traffic, its options, Vanguard and TLS.

use super::*;

impl Supervisor {
    /// Opens the listeners the workers' `server` lines ask for and closes
    /// the ones no worker asks for any more; a listener whose address and
    /// worker stay is kept, so its socket stays open across restarts.
    pub(super) fn reconcile_listeners(&mut self) {
        let mut wanted: HashMap<String, (String, ServerUrl)> = HashMap::new();
        for (name, worker) in &self.workers {
            for server in &worker.spec.server {
                wanted.insert(
                    server.value.to_string(),
                    (name.clone(), server.value.clone()),
                );
            }
        }
        self.listeners
            .retain(|address, (worker, _)| wanted.get(address).is_some_and(|(w, _)| w == worker));
        for (address, (name, server)) in wanted {
            if self.listeners.contains_key(&address) {
                continue;
            }
            let worker = &self.workers[&name];
            match crate::traffic::proxy::listen(&server, name.clone(), worker.routes.subscribe()) {
                Ok(listener) => {
                    self.listeners.insert(address, (name, listener));
                }
                Err(error) => {
                    if !self.warned_listeners.contains(&address) {
                        crate::log(format_args!("{name}: {error}"));
                        self.warned_listeners.push(address);
                    }
                }
            }
        }
    }

    /// Tells the listeners which instances run now, and the proxy options.
    pub(super) fn publish_backends(&mut self) {
        for worker in self.workers.values() {
            let spec = &worker.spec;
            let tracing = spec
                .trace_header
                .as_ref()
                .and_then(|h| hyper::header::HeaderName::from_bytes(h.value.as_bytes()).ok())
                .map(|header| crate::traffic::proxy::Tracing {
                    header,
                    log: sinks(&mut self.logs, &self.home, self.console.as_deref(), spec).0,
                    time_format: log_time_format(spec).map(Arc::from),
                });
            let route = crate::traffic::proxy::Route {
                backends: worker
                    .instances
                    .iter()
                    .filter_map(Instance::backend)
                    .collect(),
                options: Arc::new(crate::traffic::proxy::Options {
                    proxies: crate::traffic::vanguard::TrustedProxies::new(spec),
                    tracing,
                    keep_alive: spec.keep_alive.as_duration(),
                    max_conns: spec.max_conns.value,
                    lowercase_headers: spec.lowercase_hdrs.value,
                    vanguard: worker.guard.clone(),
                    tls: worker.tls.clone(),
                    connector: spec.upstream.value == "connector",
                    session_persist: (spec.upstream.value == "connector"
                        && spec.session_persist.value)
                        .then(|| spec.session_wait.as_duration()),
                }),
            };
            worker.routes.send_if_modified(|current| {
                let changed = *current != route;
                *current = route.clone();
                changed
            });
        }
    }
}

pub(super) fn tls_for(name: &str, spec: &WorkerSpec) -> crate::traffic::proxy::TlsSetting {
    use crate::traffic::proxy::TlsSetting;
    if !spec.tls.value {
        return TlsSetting::Off;
    }
    let (Some(cert), Some(key)) = (&spec.tls_cert, &spec.tls_key) else {
        return TlsSetting::Broken;
    };
    match crate::traffic::tls::acceptor(
        &cert.value,
        &key.value,
        spec.tls_ca.as_ref().map(|c| c.value.as_path()),
    ) {
        Ok(tls) => TlsSetting::On(tls),
        Err(error) => {
            crate::log(format_args!(
                "{name}: TLS is off for new connections: {error}"
            ));
            TlsSetting::Broken
        }
    }
}

pub(super) fn guard_for(spec: &WorkerSpec) -> Option<crate::traffic::proxy::Guard> {
    spec.vanguard.as_ref().map(|rules| {
        crate::traffic::proxy::Guard(Arc::new(crate::traffic::vanguard::Vanguard::new(rules)))
    })
}
