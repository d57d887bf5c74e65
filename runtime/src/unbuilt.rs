//! Keys the config language accepts for features this version does not run
//! yet. Configs that set them stay valid (they will work as the features
//! land), and `apm check`, `run`, `load` and `reload` say which of them a
//! config sets: nobody should rely on a session migration or an IPC
//! channel that is not there.

use apm_compiler::ir::{Config, WorkerSpec};

/// Each such key, with the feature it belongs to.
const NOT_ENFORCED: &[(&str, &str)] = &[];

/// One line per block that sets such keys, for people; none when the
/// config relies on nothing missing.
pub fn notes(config: &Config) -> Vec<String> {
    let daemon = note("daemon { }", &unenforced(config.daemon.settings()));
    daemon
        .into_iter()
        .chain(config.workers.iter().filter_map(worker_note))
        .collect()
}

/// The line for one worker, when it sets such keys.
pub fn worker_note(spec: &WorkerSpec) -> Option<String> {
    note(&spec.label(), &unenforced(spec.settings()))
}

fn unenforced(settings: Vec<(&'static str, Vec<String>)>) -> Vec<(&'static str, &'static str)> {
    settings
        .into_iter()
        .filter_map(|(key, _)| not_built(key).map(|feature| (key, feature)))
        .collect()
}

/// The feature a key belongs to when this version does not run it yet.
pub fn not_built(key: &str) -> Option<&'static str> {
    NOT_ENFORCED
        .iter()
        .find(|(k, _)| *k == key)
        .map(|&(_, feature)| feature)
}

fn note(block: &str, keys: &[(&str, &str)]) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    let listed: Vec<String> = keys
        .iter()
        .map(|(key, feature)| format!("`{key}` ({feature})"))
        .collect();
    Some(format!(
        "{block} sets keys this version of apm accepts but does not enforce yet: {}",
        listed.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_key_exists_in_the_schema() {
        for (key, _) in NOT_ENFORCED {
            assert!(
                apm_compiler::schema::all_keys().any(|def| def.name == *key),
                "{key}"
            );
        }
    }
}
