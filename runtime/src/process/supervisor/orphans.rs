//! A crashed daemon's processes: found again by pid and start time (never a
//! reused pid) and ended, group by group.

use super::*;

/// The saved groups that still have live members. A group is the one apm
/// started while its leader is the same process (pid and start time); once
/// the leader is gone, while members started after it remain, since Linux
/// does not reuse a pid as long as a group of that id exists.
pub(super) fn live_groups(saved: &[SavedProcess]) -> Vec<&SavedProcess> {
    // Indexed once, so a restore of thousands of groups is not a scan of
    // every process per group.
    let mut started: HashMap<u32, u64> = HashMap::new();
    let mut newest_in_group: HashMap<u32, u64> = HashMap::new();
    for (pid, stat) in procfs::processes() {
        started.insert(pid, stat.start_ticks);
        let newest = newest_in_group.entry(stat.pgrp).or_insert(stat.start_ticks);
        *newest = (*newest).max(stat.start_ticks);
    }
    saved
        .iter()
        .filter(|group| {
            if started
                .get(&group.pid)
                .is_some_and(|&start| start != group.start_ticks)
            {
                return false; // the pid is another process's now: the group is gone
            }
            newest_in_group
                .get(&group.pid)
                .is_some_and(|&newest| newest >= group.start_ticks)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    /// A process group of its own, led by `sh -c SCRIPT`, and its record.
    fn group(script: &str) -> (std::process::Child, SavedProcess) {
        let child = std::process::Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let start_ticks = procfs::stat(pid).unwrap().start_ticks;
        (child, SavedProcess { pid, start_ticks })
    }

    fn members(pgid: u32) -> usize {
        procfs::processes()
            .iter()
            .filter(|(_, s)| s.pgrp == pgid && !s.zombie)
            .count()
    }

    #[test]
    fn a_group_is_alive_only_while_it_is_the_recorded_one() {
        let (mut child, saved) = group("exec sleep 60");
        assert_eq!(live_groups(&[saved]), [&saved]);
        // The same pid with another start time: another process owns the
        // pid now (reused), and it is not ours to end.
        let reused = SavedProcess {
            start_ticks: saved.start_ticks + 1,
            ..saved
        };
        assert!(live_groups(&[reused]).is_empty());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            live_groups(&[saved]).is_empty(),
            "gone once its last member is"
        );
    }

    #[test]
    fn a_group_outlives_its_leader_through_members_started_after_it() {
        // The leader starts a member in its group, then exits and is reaped.
        let (mut child, saved) = group("sleep 60 & echo started");
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(saved.pid) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(live_groups(&[saved]), [&saved]);
        // Recorded as starting after that member: the member belongs to an
        // older group of the same id, not to the one recorded.
        let later = SavedProcess {
            start_ticks: u64::MAX,
            ..saved
        };
        assert!(live_groups(&[later]).is_empty());
        let _ = killpg(Pid::from_raw(saved.pid as i32), Signal::SIGKILL);
    }

    #[test]
    fn marked_groups_are_the_groups_of_marked_processes_but_our_own() {
        let marker = (
            "APM_TEST_MARK".to_owned(),
            format!("orphans-{}", std::process::id()),
        );
        let spawn = |script: &str, marked: bool, own_group: bool| {
            let mut command = std::process::Command::new("sh");
            command.args(["-c", script]);
            if marked {
                command.env(&marker.0, &marker.1);
            }
            if !own_group {
                command.process_group(0);
            }
            command.spawn().unwrap()
        };
        // A marked group of two (its leader and a member it started), an
        // unmarked group, and a marked process in this test's own group.
        let mut marked = spawn("sleep 60 & exec sleep 60", true, false);
        let mut unmarked = spawn("exec sleep 60", false, false);
        let mut ours = spawn("exec sleep 60", true, true);
        let leader = procfs::stat(marked.id()).unwrap().start_ticks;
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(marked.id()) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            marked_groups(&marker),
            [SavedProcess {
                pid: marked.id(),
                start_ticks: leader
            }]
        );
        let _ = killpg(Pid::from_raw(marked.id() as i32), Signal::SIGKILL);
        for child in [&mut marked, &mut unmarked, &mut ours] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    #[tokio::test]
    async fn end_orphans_ends_each_live_group_and_kills_what_ignores_sigterm() {
        let (mut polite, polite_saved) = group("exec sleep 60");
        let (mut stubborn, stubborn_saved) = group("trap '' TERM; while :; do sleep 0.05; done");
        let (mut gone, gone_saved) = group("exit 0");
        gone.wait().unwrap();
        // A loaded machine may not have run the shell's `trap` yet: its first
        // `sleep` shows the trap is in place, so SIGTERM cannot end it early.
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(stubborn_saved.pid) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let saved = [polite_saved, stubborn_saved, gone_saved];
        let started = Instant::now();
        let grace = Duration::from_millis(300);
        assert_eq!(end_orphans(&saved, grace).await, 2);
        assert!(
            started.elapsed() >= grace,
            "what ignores SIGTERM gets its grace first"
        );
        assert!(polite.wait().unwrap().signal() == Some(Signal::SIGTERM as i32));
        assert!(stubborn.wait().unwrap().signal() == Some(Signal::SIGKILL as i32));
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(stubborn_saved.pid) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(members(stubborn_saved.pid), 0, "its sleeps went with it");
        assert!(live_groups(&saved).is_empty());
    }
}
