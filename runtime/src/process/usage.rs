//! A process's CPU use and memory, as the listing shows them.

use std::time::{Duration, Instant};

use crate::process::procfs::{self, ProcStat};

/// What a look at a process found: its CPU time then, and its CPU use
/// since the look before and its memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    pub cpu_ticks: u64,
    pub at: Instant,
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

impl Usage {
    /// The CPU figure as listings show it: one decimal.
    pub fn cpu_shown(self) -> f64 {
        (self.cpu_percent * 10.0).round() / 10.0
    }

    /// The figures of `stat`, read at `now`: CPU use since the look `last`,
    /// or without one since the process started `uptime` ago.
    pub fn after(
        last: Option<Usage>,
        stat: &ProcStat,
        now: Instant,
        uptime: Option<Duration>,
    ) -> Usage {
        let tick = procfs::tick().as_secs_f64();
        let cpu_percent = match (last, uptime) {
            (Some(last), _) if now > last.at => {
                stat.cpu_ticks.saturating_sub(last.cpu_ticks) as f64 * tick
                    / (now - last.at).as_secs_f64()
                    * 100.0
            }
            (None, Some(up)) if !up.is_zero() => {
                stat.cpu_ticks as f64 * tick / up.as_secs_f64() * 100.0
            }
            _ => 0.0,
        };
        Usage {
            cpu_ticks: stat.cpu_ticks,
            at: now,
            cpu_percent,
            rss_bytes: stat.rss_bytes,
        }
    }
}

/// The shortest time between two rounds of the sampler.
const PERIOD: Duration = Duration::from_secs(1);
/// A round's reads take at most 1/PAUSE_FACTOR of the sampler's time, so
/// thousands of processes cost a bounded share of a core.
const PAUSE_FACTOR: u32 = 50;
/// Without a look for this long, the sampler stops until the next one.
const IDLE: Duration = Duration::from_secs(60);

/// Reads the CPU and memory of the processes being looked at on a thread of
/// its own, one round every `PERIOD` (or longer when a round is slow), so
/// that a listing of thousands of processes reads none of them itself.
/// It follows the processes the listing hands it and drops one once it has
/// ended; after `IDLE` without a look it forgets them all and sleeps.
pub struct Sampler {
    shared: std::sync::Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    table: std::sync::Mutex<Table>,
    woken: std::sync::Condvar,
}

#[derive(Default)]
struct Table {
    /// By pid: the process's start time (a reused pid is another process)
    /// and its newest figures.
    followed: std::collections::HashMap<u32, (u64, Usage)>,
    last_look: Option<Instant>,
    /// The supervisor has gone: the thread ends.
    closed: bool,
}

impl Sampler {
    pub fn spawn() -> Sampler {
        let shared = std::sync::Arc::new(Shared::default());
        let sampling = shared.clone();
        std::thread::Builder::new()
            .name("apm-usage".into())
            .spawn(move || sampling.run())
            .expect("spawning the usage sampler");
        Sampler { shared }
    }

    /// The figures of the process `pid` that started at `start_ticks`: the
    /// sampler's newest, or when it does not follow that process yet, read
    /// now (CPU since `last`, or since the start `uptime` ago) and followed
    /// from then on.
    pub fn look(
        &self,
        pid: u32,
        start_ticks: Option<u64>,
        last: Option<Usage>,
        uptime: Option<Duration>,
    ) -> Option<Usage> {
        let now = Instant::now();
        let mut table = self.shared.table.lock().unwrap_or_else(|e| e.into_inner());
        if table
            .last_look
            .is_none_or(|at| now.saturating_duration_since(at) >= IDLE)
        {
            self.shared.woken.notify_one();
        }
        table.last_look = Some(now);
        if let Some(&(ticks, usage)) = table.followed.get(&pid)
            && Some(ticks) == start_ticks
        {
            return Some(usage);
        }
        drop(table);
        let stat = procfs::stat(pid).filter(|s| start_ticks.is_none_or(|t| t == s.start_ticks))?;
        let usage = Usage::after(last, &stat, now, uptime);
        let mut table = self.shared.table.lock().unwrap_or_else(|e| e.into_inner());
        table.followed.insert(pid, (stat.start_ticks, usage));
        Some(usage)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.shared
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.woken.notify_one();
    }
}

impl Shared {
    fn run(&self) {
        loop {
            let followed: Vec<(u32, (u64, Usage))> = {
                let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
                while !table.closed && table.last_look.is_none_or(|at| at.elapsed() >= IDLE) {
                    // Figures kept while nobody looks would be old by the next look.
                    table.followed.clear();
                    table = self.woken.wait(table).unwrap_or_else(|e| e.into_inner());
                }
                if table.closed {
                    return;
                }
                table
                    .followed
                    .iter()
                    .map(|(&pid, &entry)| (pid, entry))
                    .collect()
            };
            let began = Instant::now();
            let sampled: Vec<(u32, Option<(u64, Usage)>)> = followed
                .into_iter()
                .map(|(pid, (ticks, last))| (pid, sample(pid, ticks, last).map(|u| (ticks, u))))
                .collect();
            let took = began.elapsed();
            {
                let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
                for (pid, entry) in sampled {
                    match entry {
                        Some(entry) => table.followed.insert(pid, entry),
                        None => table.followed.remove(&pid),
                    };
                }
            }
            std::thread::sleep(PERIOD.max(took * PAUSE_FACTOR));
        }
    }
}

/// The next figures of a followed process; None once it has ended (or its
/// pid is another process's).
fn sample(pid: u32, start_ticks: u64, last: Usage) -> Option<Usage> {
    let stat = procfs::stat(pid).filter(|s| s.start_ticks == start_ticks && !s.zombie)?;
    Some(Usage::after(Some(last), &stat, Instant::now(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(cpu_ticks: u64) -> ProcStat {
        ProcStat {
            pgrp: 1,
            zombie: false,
            start_ticks: 7,
            cpu_ticks,
            rss_bytes: 4096,
        }
    }

    #[test]
    fn cpu_is_measured_since_the_last_look_or_else_since_the_start() {
        let tick = procfs::tick();
        let start = Instant::now();
        let first = Usage::after(None, &stat(10), start, Some(tick * 20));
        assert!((first.cpu_percent - 50.0).abs() < 1e-6, "10 ticks in 20");
        let second = Usage::after(Some(first), &stat(40), start + tick * 30, None);
        assert!((second.cpu_percent - 100.0).abs() < 1e-6, "30 ticks in 30");
        assert_eq!(second.rss_bytes, 4096);
        let same_instant = Usage::after(Some(second), &stat(50), second.at, None);
        assert_eq!(same_instant.cpu_percent, 0.0, "no time, no division");
    }

    #[test]
    fn a_followed_process_is_answered_from_the_last_sample() {
        let sampler = Sampler::spawn();
        let me = std::process::id();
        let ticks = procfs::stat(me).unwrap().start_ticks;
        let first = sampler.look(me, Some(ticks), None, None).unwrap();
        let again = sampler.look(me, Some(ticks), None, None).unwrap();
        assert_eq!(first.at, again.at, "the second look reads nothing");
        assert!(first.rss_bytes > 0);
        assert_eq!(
            sampler.look(me, Some(ticks + 1), None, None),
            None,
            "a pid that started at another time is another process"
        );
    }
}
