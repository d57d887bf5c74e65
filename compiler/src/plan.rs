//! Plans: what turning one set of workers into another takes, computed from
//! two IRs and keyed by worker name. Startup is the plan from nothing.

use std::fmt::Write as _;

use serde::Serialize;

use crate::ir::{DaemonConfig, StatsdConfig, VanguardRules, WorkerSpec};
use crate::schema::{KeyDef, Reload};
use crate::values::{Kind, quote};

/// One key whose value differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The key, `vanguard.KEY`/`statsd.KEY` for nested blocks, `env NAME` for one variable.
    pub key: String,
    pub old: String,
    pub new: String,
    pub reload: Reload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Step {
    Start {
        worker: String,
    },
    /// Changes that need new processes; `forced` when nothing changed but `--force` asked.
    Restart {
        worker: String,
        changes: Vec<Change>,
        forced: bool,
    },
    /// Changes the running worker takes as they are (scaling touches only
    /// the added or removed instances).
    Update {
        worker: String,
        changes: Vec<Change>,
    },
    /// The file no longer defines the worker: it is stopped and unloaded
    /// (docs/cli.md, the decision on dropped workers).
    Remove {
        worker: String,
    },
    Unchanged {
        worker: String,
    },
}

impl Step {
    pub fn worker(&self) -> &str {
        match self {
            Step::Start { worker }
            | Step::Restart { worker, .. }
            | Step::Update { worker, .. }
            | Step::Remove { worker }
            | Step::Unchanged { worker } => worker,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Changes of `daemon { }`, applied to the running daemon.
    pub daemon: Vec<Change>,
}

/// Values as the user would write them, so that empty values, spaces and
/// commas show.
fn joined(values: &[String]) -> String {
    if values.is_empty() {
        "(none)".to_owned()
    } else {
        values
            .iter()
            .map(|v| quote(v))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether the order of a many-value key's values means something: it does
/// for free text (`params`), not for lists of listeners, names or patterns.
fn ordered(def: &KeyDef) -> bool {
    def.kind == Kind::Text
}

fn block_changes(
    prefix: &str,
    old: Vec<(&'static KeyDef, Vec<String>)>,
    new: Vec<(&'static KeyDef, Vec<String>)>,
    out: &mut Vec<Change>,
) {
    for ((def, mut before), (_, mut after)) in old.into_iter().zip(new) {
        if def.many && !ordered(def) {
            before.sort();
            after.sort();
        }
        if before == after {
            continue;
        }
        if def.name == "env" {
            env_changes(&before, &after, def.reload, out);
            continue;
        }
        out.push(Change {
            key: format!("{prefix}{}", def.name),
            old: joined(&before),
            new: joined(&after),
            reload: def.reload,
        });
    }
}

/// `env` changes one variable at a time: `env NODE_ENV production → staging`.
fn env_changes(before: &[String], after: &[String], reload: Reload, out: &mut Vec<Change>) {
    let split = |entries: &[String]| -> Vec<(String, String)> {
        entries
            .iter()
            .map(|e| {
                e.split_once('=')
                    .map_or((e.clone(), String::new()), |(k, v)| {
                        (k.to_owned(), v.to_owned())
                    })
            })
            .collect()
    };
    let (before, after) = (split(before), split(after));
    let value = |entries: &[(String, String)], key: &str| {
        entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let keys: Vec<&String> = before.iter().chain(&after).map(|(k, _)| k).collect();
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        if !seen.insert(key) {
            continue;
        }
        let (old, new) = (value(&before, key), value(&after, key));
        if old != new {
            let show = |v: Option<String>| v.map_or_else(|| "(unset)".to_owned(), |v| quote(&v));
            out.push(Change {
                key: format!("env {key}"),
                old: show(old),
                new: show(new),
                reload,
            });
        }
    }
}

/// A nested block's values (defaults included) and its explicitly written keys.
type Blocks = (
    Vec<(&'static KeyDef, Vec<String>)>,
    Vec<(&'static KeyDef, Vec<String>)>,
);

fn written(
    keys: &'static [KeyDef],
    settings: Vec<(&'static str, Vec<String>)>,
) -> Vec<(&'static KeyDef, Vec<String>)> {
    settings
        .into_iter()
        .filter_map(|(name, values)| Some((keys.iter().find(|k| k.name == name)?, values)))
        .collect()
}

/// Every key whose value differs between two versions of a worker.
pub fn changes(old: &WorkerSpec, new: &WorkerSpec) -> Vec<Change> {
    let mut out = Vec::new();
    block_changes("", old.values(), new.values(), &mut out);
    // A block that is added or removed shows the rules written in it.
    let nested = |prefix: &str,
                  before: Option<Blocks>,
                  after: Option<Blocks>,
                  out: &mut Vec<Change>| match (before, after) {
        (Some((b, _)), Some((a, _))) => block_changes(prefix, b, a, out),
        (None, None) => {}
        (Some((_, written)), None) => out.extend(written.into_iter().map(|(def, v)| Change {
            key: format!("{prefix}{}", def.name),
            old: joined(&v),
            new: joined(&[]),
            reload: def.reload,
        })),
        (None, Some((_, written))) => out.extend(written.into_iter().map(|(def, v)| Change {
            key: format!("{prefix}{}", def.name),
            old: joined(&[]),
            new: joined(&v),
            reload: def.reload,
        })),
    };
    let vanguard = |spec: &WorkerSpec| {
        spec.vanguard
            .as_ref()
            .map(|v| (v.values(), written(VanguardRules::KEYS, v.settings())))
    };
    let statsd = |spec: &WorkerSpec| {
        spec.statsd
            .as_ref()
            .map(|s| (s.values(), written(StatsdConfig::KEYS, s.settings())))
    };
    nested("vanguard.", vanguard(old), vanguard(new), &mut out);
    nested("statsd.", statsd(old), statsd(new), &mut out);
    out
}

fn same_settings(a: &WorkerSpec, b: &WorkerSpec) -> bool {
    a.same_settings(b)
        && match (&a.vanguard, &b.vanguard) {
            (Some(x), Some(y)) => x.same_settings(y),
            (x, y) => x.is_none() && y.is_none(),
        }
        && match (&a.statsd, &b.statsd) {
            (Some(x), Some(y)) => x.same_settings(y),
            (x, y) => x.is_none() && y.is_none(),
        }
}

/// The plan that turns the workers `old` into `new`. With `force`,
/// unchanged workers restart too.
pub fn diff(old: &[&WorkerSpec], new: &[&WorkerSpec], force: bool) -> Plan {
    let by_name = |specs: &[&WorkerSpec]| -> std::collections::HashMap<String, usize> {
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.value.clone(), i))
            .collect()
    };
    let (old_index, new_index) = (by_name(old), by_name(new));
    let mut steps = Vec::new();
    for spec in new {
        let name = spec.name.value.clone();
        let Some(before) = old_index.get(&name).map(|&i| old[i]) else {
            steps.push(Step::Start { worker: name });
            continue;
        };
        // Most workers of a large config are unchanged: compare values first.
        let changes = if same_settings(before, spec) {
            Vec::new()
        } else {
            changes(before, spec)
        };
        let restart = changes.iter().any(|c| c.reload == Reload::Restart);
        steps.push(match (restart, changes.is_empty(), force) {
            (true, _, _) => Step::Restart {
                worker: name,
                changes,
                forced: false,
            },
            (false, true, false) => Step::Unchanged { worker: name },
            (false, true, true) => Step::Restart {
                worker: name,
                changes,
                forced: true,
            },
            (false, false, true) => Step::Restart {
                worker: name,
                changes,
                forced: false,
            },
            (false, false, false) => Step::Update {
                worker: name,
                changes,
            },
        });
    }
    for spec in old {
        if !new_index.contains_key(&spec.name.value) {
            steps.push(Step::Remove {
                worker: spec.name.value.clone(),
            });
        }
    }
    Plan {
        steps,
        daemon: Vec::new(),
    }
}

/// Every `daemon { }` key whose value differs between two versions of a
/// file. All of them are applied to the running daemon (their `reload`
/// says so), none needs a restart.
pub fn daemon_changes(old: &DaemonConfig, new: &DaemonConfig) -> Vec<Change> {
    let mut out = Vec::new();
    if !old.same_settings(new) {
        block_changes("", old.values(), new.values(), &mut out);
    }
    // Config text is the password itself: a plan only says it changed.
    let secret = |key: &str| {
        DaemonConfig::KEYS
            .iter()
            .any(|def| def.name == key && def.kind == Kind::Secret)
    };
    let hidden = |value: &mut String| {
        if value != "(none)" {
            *value = "********".to_owned();
        }
    };
    for change in out.iter_mut().filter(|c| secret(&c.key)) {
        hidden(&mut change.old);
        hidden(&mut change.new);
    }
    out
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.daemon.is_empty()
            && self
                .steps
                .iter()
                .all(|s| matches!(s, Step::Unchanged { .. }))
    }

    /// The plan for people: `+ start jobs`, `~ restart api: env NODE_ENV
    /// production → staging`, `↕ scale web 2 → 4`, `- stop old`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let describe = |changes: &[Change]| {
            changes
                .iter()
                .map(|c| format!("{} {} → {}", c.key, c.old, c.new))
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !self.daemon.is_empty() {
            let _ = writeln!(
                out,
                "~ daemon settings, applied live: {}",
                describe(&self.daemon)
            );
        }
        for step in &self.steps {
            let _ = match step {
                Step::Start { worker } => writeln!(out, "+ start {worker}"),
                Step::Restart {
                    worker,
                    forced: true,
                    ..
                } => writeln!(out, "~ restart {worker} (forced)"),
                Step::Restart {
                    worker, changes, ..
                } => writeln!(out, "~ restart {worker}: {}", describe(changes)),
                Step::Update { worker, changes } => {
                    let (scale, other): (Vec<&Change>, Vec<&Change>) =
                        changes.iter().partition(|c| c.key == "instances");
                    for c in scale {
                        let _ = writeln!(out, "↕ scale {worker} {} → {}", c.old, c.new);
                    }
                    if other.is_empty() {
                        Ok(())
                    } else {
                        let other: Vec<Change> = other.into_iter().cloned().collect();
                        writeln!(out, "~ update {worker} in place: {}", describe(&other))
                    }
                }
                Step::Remove { worker } => writeln!(
                    out,
                    "- remove {worker}: no longer in the file; stopped and unloaded"
                ),
                Step::Unchanged { .. } => Ok(()),
            };
        }
        let unchanged = self
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Unchanged { .. }))
            .count();
        if unchanged > 0 {
            let _ = writeln!(out, "= {unchanged} unchanged");
        }
        if self.steps.is_empty() && self.daemon.is_empty() {
            out.push_str("= nothing to do\n");
        }
        out
    }
}
