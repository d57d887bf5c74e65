//! A crashed daemon's processes: found again by pid and start time (never a
//! reused pid) and ended, group by group.

use super::*;

/// The saved groups that still have live members. A group is the one apm
/// started while its leader is the same process (pid and start time); once
/// the leader is gone, while members started after it remain, since Linux
/// does not reuse a pid as long as a group of that id exists.
pub(super) fn live_groups(saved: &[SavedProcess]) -> Vec<&SavedProcess> {
    let processes = procfs::processes();
    saved
        .iter()
        .filter(|group| {
            let leader = processes.iter().find(|(pid, _)| *pid == group.pid);
            if leader.is_some_and(|(_, s)| s.start_ticks != group.start_ticks) {
                return false; // the pid is another process's now: the group is gone
            }
            processes
                .iter()
                .any(|(_, s)| s.pgrp == group.pid && s.start_ticks >= group.start_ticks)
        })
        .collect()
}

/// The process groups of processes that carry `marker` in their
/// environment (every process a daemon of this `APM_HOME` and socket
/// started, and what they started), but for this process's own group:
/// what a killed daemon left, including what it started after its last
/// state was written. Each group is named by its leader's pid and the
/// earliest start among its marked members, so `end_orphans` passes over a
/// group whose leader is another, unmarked process.
pub fn marked_groups(marker: &(String, String)) -> Vec<SavedProcess> {
    let entry = format!("{}={}", marker.0, marker.1).into_bytes();
    let me = std::process::id();
    let own_group = procfs::stat(me).map(|s| s.pgrp);
    let mut groups: BTreeMap<u32, u64> = BTreeMap::new();
    for (pid, stat) in procfs::processes() {
        if pid == me || Some(stat.pgrp) == own_group || !procfs::has_env_entry(pid, &entry) {
            continue;
        }
        let earliest = groups.entry(stat.pgrp).or_insert(stat.start_ticks);
        *earliest = (*earliest).min(stat.start_ticks);
    }
    groups
        .into_iter()
        .map(|(pid, start_ticks)| SavedProcess { pid, start_ticks })
        .collect()
}

/// Ends the process groups a previous daemon recorded that are still
/// alive: SIGTERM, then SIGKILL to what is left after `grace`.
pub async fn end_orphans(saved: &[SavedProcess], grace: Duration) -> usize {
    let groups = live_groups(saved);
    for group in &groups {
        let _ = killpg(Pid::from_raw(group.pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left = groups.clone();
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = live_groups(saved);
    }
    for group in &left {
        let _ = killpg(Pid::from_raw(group.pid as i32), Signal::SIGKILL);
    }
    groups.len()
}

