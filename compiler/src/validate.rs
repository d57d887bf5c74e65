//! Validation passes over the IR. Each pass checks one concern, runs in the
//! order of `PASSES`, and adds to the diagnostics instead of stopping.

use std::collections::HashSet;

use rustc_hash::FxHashMap;

use crate::codes;
use crate::diag::{Diagnostic, Diagnostics};
use crate::ir::{Config, WorkerSpec};
use crate::loader::SourceLoader;
use crate::source::Span;
use crate::values::{ListenAddr, Scheme};

pub struct PassCx<'a> {
    pub loader: &'a dyn SourceLoader,
    pub diags: &'a mut Diagnostics,
}

type Pass = fn(&Config, &mut PassCx);

/// The passes, by name, in the order they run.
pub const PASSES: &[(&str, Pass)] = &[
    ("workers", workers),
    ("listeners", listeners),
    ("tls", tls),
    ("users", users),
    ("dependencies", dependencies),
    ("exposure", exposure),
];

pub fn run(config: &Config, cx: &mut PassCx) {
    for (_, pass) in PASSES {
        pass(config, cx);
    }
}

/// Every worker has an exec and a name of its own.
fn workers(config: &Config, cx: &mut PassCx) {
    let mut seen: FxHashMap<&str, Option<Span>> = FxHashMap::default();
    for spec in &config.workers {
        let Some(at) = spec.span else { continue };
        if !spec.exec.is_explicit() {
            let which = if spec.name.is_explicit() {
                format!("worker `{}`", spec.name.value)
            } else {
                "this worker".to_owned()
            };
            cx.diags.push(
                Diagnostic::new(&codes::MISSING_EXEC, at, format!("{which} has no `exec`"))
                    .label("worker without a program to run")
                    .help(
                        "add the program to run, for example `exec node;` with `params server.js;`",
                    ),
            );
            continue;
        }
        let name = spec.name.value.as_str();
        if name.is_empty() {
            continue;
        }
        match seen.get(name) {
            Some(first) => {
                let mut diagnostic = Diagnostic::new(
                    &codes::DUPLICATE_WORKER,
                    spec.name.span.unwrap_or(at),
                    format!("a worker named `{name}` is already defined"),
                )
                .label(if spec.name.is_explicit() {
                    "duplicate name"
                } else {
                    "named after its exec"
                })
                .help("give each worker a unique `name`");
                if let Some(first) = first {
                    diagnostic = diagnostic.secondary(*first, "first defined here");
                }
                cx.diags.push(diagnostic);
            }
            None => {
                seen.insert(name, Some(spec.name.span.unwrap_or(at)));
            }
        }
    }
}

/// No two listeners bind the same address, and schemes agree with `tls`.
fn listeners(config: &Config, cx: &mut PassCx) {
    // Listeners seen so far, as (worker index, span), by port and by socket path.
    let mut by_port: FxHashMap<u16, Vec<(&ListenAddr, usize, Span)>> = FxHashMap::default();
    let mut by_socket: FxHashMap<&[u8], (usize, Span)> = FxHashMap::default();
    for (index, spec) in config.workers.iter().enumerate() {
        for server in &spec.server {
            let Some(span) = server.span else { continue };
            let clash = match &server.addr {
                ListenAddr::Tcp { port, .. } => {
                    let bucket = by_port.entry(*port).or_default();
                    let clash = bucket
                        .iter()
                        .find(|(addr, ..)| addr.overlaps(&server.addr))
                        .map(|&(_, i, s)| (i, s));
                    bucket.push((&server.addr, index, span));
                    clash
                }
                ListenAddr::Unix { unix } => {
                    by_socket.insert(unix.as_os_str().as_encoded_bytes(), (index, span))
                }
            };
            if let Some((owner, first)) = clash {
                cx.diags.push(
                    Diagnostic::new(
                        &codes::DUPLICATE_ADDRESS,
                        span,
                        format!(
                            "`{}` is already bound by {}",
                            server.addr,
                            config.workers[owner].label()
                        ),
                    )
                    .label("second listener on this address")
                    .secondary(first, "first bound here")
                    .help("give each listener its own port or socket path"),
                );
            }
            tls_scheme(spec, server.scheme, span, cx);
        }
    }
}

fn tls_scheme(spec: &WorkerSpec, scheme: Scheme, span: Span, cx: &mut PassCx) {
    let tls = spec.tls.value;
    if tls && matches!(scheme, Scheme::Http | Scheme::Ws) {
        let secure = if scheme == Scheme::Http {
            "https"
        } else {
            "wss"
        };
        let mut diagnostic = Diagnostic::new(
            &codes::TLS_ON_PLAIN_SCHEME,
            span,
            format!(
                "`tls` is on, so this `{}://` listener serves {}",
                scheme.as_str(),
                secure.to_uppercase()
            ),
        )
        .label(format!("serves {secure}://"))
        .help(format!(
            "write `{secure}://` to say so, or turn `tls` off to serve plain text"
        ));
        if let Some(tls_span) = spec.tls.span {
            diagnostic = diagnostic.secondary(tls_span, "tls turned on here");
        }
        cx.diags.push(diagnostic);
    } else if !tls && scheme.is_tls() {
        cx.diags.push(
            Diagnostic::new(
                &codes::TLS_SCHEME_WITHOUT_TLS,
                span,
                format!(
                    "`{}://` needs `tls true;` with `tls_cert` and `tls_key`",
                    scheme.as_str()
                ),
            )
            .label("TLS scheme without TLS")
            .help("add `tls true;`, `tls_cert` and `tls_key` to the worker"),
        );
    }
}

/// `tls` comes with a certificate and key that can be read.
fn tls(config: &Config, cx: &mut PassCx) {
    for spec in config.workers.iter().filter(|s| s.tls.value) {
        let Some(tls_span) = spec.tls.span else {
            continue;
        };
        for (key, file) in [
            ("tls_cert", &spec.tls_cert),
            ("tls_key", &spec.tls_key),
            ("tls_ca", &spec.tls_ca),
        ] {
            match file {
                None if key == "tls_ca" || spec.rejected.contains(&key) => {}
                None => cx.diags.push(
                    Diagnostic::new(
                        &codes::TLS_UNUSABLE,
                        tls_span,
                        format!("`tls` is on but `{key}` is not set"),
                    )
                    .label("TLS turned on here")
                    .help(format!("add `{key} /path/to/file.pem;`")),
                ),
                Some(file) => {
                    if let (Err(error), Some(span)) = (cx.loader.read(&file.value), file.span) {
                        cx.diags.push(
                            Diagnostic::new(
                                &codes::TLS_UNUSABLE,
                                span,
                                format!("cannot read `{}`: {error}", file.value.display()),
                            )
                            .label(format!("{key} named here"))
                            .help("point it at a readable PEM file"),
                        );
                    }
                }
            }
        }
    }
}

/// `user` names an account that exists.
fn users(config: &Config, cx: &mut PassCx) {
    for spec in &config.workers {
        let Some(user) = &spec.user else { continue };
        if let (Some(false), Some(span)) = (cx.loader.user_exists(&user.value), user.span) {
            cx.diags.push(
                Diagnostic::new(
                    &codes::UNKNOWN_USER,
                    span,
                    format!("user `{}` does not exist", user.value),
                )
                .label("unknown user")
                .help("create the account, or fix the name"),
            );
        }
    }
}

/// `depends_on` names known workers and forms no cycle.
fn dependencies(config: &Config, cx: &mut PassCx) {
    let index: FxHashMap<&str, usize> = config
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| (w.name.value.as_str(), i))
        .collect();
    for spec in &config.workers {
        for dep in &spec.depends_on {
            if let (false, Some(span)) = (index.contains_key(dep.value.as_str()), dep.span) {
                cx.diags.push(
                    Diagnostic::new(&codes::UNKNOWN_DEPENDENCY, span, format!("{} depends on `{}`, which this config does not define", spec.label(), dep.value))
                        .label("unknown worker")
                        .help("define it, load it from another file, or expect a wait of depends_timeout before the start"),
                );
            }
        }
    }

    // Depth-first search; a back edge closes a cycle, reported once per set of workers.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; config.workers.len()];
    let mut reported: HashSet<Vec<usize>> = HashSet::new();
    for start in 0..config.workers.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // (worker, index of the next dependency to visit)
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            let deps = &config.workers[node].depends_on;
            if *next >= deps.len() {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            }
            let dep = &deps[*next];
            *next += 1;
            let Some(&target) = index.get(dep.value.as_str()) else {
                continue;
            };
            match marks[target] {
                Mark::New => {
                    marks[target] = Mark::OnPath;
                    path.push((target, 0));
                }
                Mark::OnPath => {
                    let from = path.iter().position(|&(n, _)| n == target).unwrap_or(0);
                    let members: Vec<usize> = path[from..].iter().map(|&(n, _)| n).collect();
                    let mut key = members.clone();
                    key.sort_unstable();
                    if reported.insert(key)
                        && let Some(span) = dep.span
                    {
                        let chain: Vec<&str> = members
                            .iter()
                            .chain([&target])
                            .map(|&n| config.workers[n].name.value.as_str())
                            .collect();
                        cx.diags.push(
                            Diagnostic::new(
                                &codes::DEPENDENCY_CYCLE,
                                span,
                                format!("dependency cycle: {}", chain.join(" → ")),
                            )
                            .label("this dependency closes the cycle")
                            .help("remove one `depends_on` in the cycle"),
                        );
                    }
                }
                Mark::Done => {}
            }
        }
    }
}

/// Warnings about things that are legal but unsafe on a public address.
fn exposure(config: &Config, cx: &mut PassCx) {
    let daemon = &config.daemon;
    if daemon.gui_port.value != 0
        && !daemon.gui_bind.value.0.is_loopback()
        && daemon.gui_password.is_none()
    {
        let at = daemon.gui_bind.span.or(daemon.gui_port.span);
        if let Some(span) = at {
            cx.diags.push(
                Diagnostic::new(
                    &codes::GUI_EXPOSED,
                    span,
                    format!(
                        "the GUI would listen on {} without a password, so it will refuse to start",
                        daemon.gui_bind.value
                    ),
                )
                .label(if daemon.gui_bind.is_explicit() {
                    "public address"
                } else {
                    "GUI enabled; gui_bind defaults to 0.0.0.0"
                })
                .help("set `gui_password`, or `gui_bind 127.0.0.1;`"),
            );
        }
    }
}
