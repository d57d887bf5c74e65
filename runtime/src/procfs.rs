//! What /proc tells about a process: its start time (to recognise it after
//! a daemon crash, never confusing it with a reused pid), CPU time and memory.

use std::time::Duration;

/// The fields of `/proc/<pid>/stat` that apm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// The process group.
    pub pgrp: u32,
    /// Ended but not yet reaped: it holds its pid and does nothing.
    pub zombie: bool,
    /// Clock ticks since boot at which the process started.
    pub start_ticks: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
}

pub fn stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces or ')'.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field numbers from proc(5), shifted by the 2 fields before `state`.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let (pgrp, utime, stime, start_ticks, rss_pages) =
        (field(5)?, field(14)?, field(15)?, field(22)?, field(24)?);
    Some(ProcStat {
        pgrp: pgrp as u32,
        zombie: fields.first() == Some(&"Z"),
        start_ticks,
        cpu_ticks: utime + stime,
        rss_bytes: rss_pages * page_size(),
    })
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |n| n as u64)
    })
}

/// The length of a clock tick.
pub fn tick() -> Duration {
    static TICK: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100);
        Duration::from_secs(1) / hz.max(1) as u32
    })
}

/// Whether `pid` is still the process that started at `start_ticks`, and
/// has not ended.
pub fn is_same_process(pid: u32, start_ticks: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_ticks == start_ticks && !s.zombie)
}

/// Every process that has not ended, by pid.
pub fn processes() -> Vec<(u32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| !s.zombie)
        .collect()
}

/// Whether the environment `/proc/<pid>/environ` shows holds the entry
/// `entry` (`KEY=VALUE`). A process of another user reads as not holding it,
/// unless the caller is root.
pub fn has_env_entry(pid: u32, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let stat = stat(me).unwrap();
        assert!(stat.rss_bytes > 0);
        assert!(is_same_process(me, stat.start_ticks));
        assert!(!is_same_process(me, stat.start_ticks + 1));
        assert!(!stat.zombie);
        assert!(
            processes()
                .iter()
                .any(|(pid, s)| *pid == me && s.pgrp == stat.pgrp)
        );
        assert!(tick() > Duration::ZERO);
        let path = std::env::var("PATH").unwrap_or_default();
        assert!(has_env_entry(me, format!("PATH={path}").as_bytes()));
        assert!(!has_env_entry(me, b"PATH=/no/such/path/anywhere"));
    }
}
