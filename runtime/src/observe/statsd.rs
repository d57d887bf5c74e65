//! `statsd { }`: every `interval`, a worker's instances' CPU, memory,
//! restarts and whether they run go to a StatsD server over UDP, as gauges
//! named `PREFIX.WORKER.INDEX.METRIC`. The supervisor publishes the
//! instances' pids; the reporter reads `/proc` itself, so a report never
//! waits on the supervisor and `apm ls` keeps its own CPU samples.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use apm_compiler::ir::StatsdConfig;
use tokio::sync::watch;

use crate::process::procfs;

/// A UDP payload every network on the way carries unfragmented.
const DATAGRAM: usize = 1432;

/// What the reporter knows of an instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceSample {
    pub pid: Option<u32>,
    pub restarts: u32,
    /// The process's `metric()` values, with a connector.
    pub board: Option<BoardOf>,
}

/// A process's board, the same while the process is.
#[derive(Clone)]
pub struct BoardOf(pub std::sync::Arc<crate::ipc::Board>);

impl PartialEq for BoardOf {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for BoardOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoardOf")
    }
}

/// A worker's reporter; it stops when dropped.
pub struct Reporter {
    pub config: StatsdConfig,
    instances: watch::Sender<Vec<InstanceSample>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reporter {
    pub fn start(worker: &str, config: &StatsdConfig) -> Reporter {
        let (instances, rx) = watch::channel(Vec::new());
        let prefix = format!("{}.{worker}", metric_name(&config.prefix.value));
        let task = tokio::spawn(report(
            worker.to_owned(),
            config.host.value.clone(),
            prefix,
            config.interval.as_duration(),
            rx,
        ));
        Reporter {
            config: config.clone(),
            instances,
            task,
        }
    }

    pub fn publish(&self, samples: Vec<InstanceSample>) {
        self.instances.send_if_modified(|current| {
            let changed = *current != samples;
            if changed {
                *current = samples;
            }
            changed
        });
    }
}

/// StatsD reads `:`, `|` and `@` as separators, and spaces break a line.
fn metric_name(prefix: &str) -> String {
    prefix
        .chars()
        .map(|c| {
            if matches!(c, ':' | '|' | '@') || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

async fn report(
    worker: String,
    host: String,
    prefix: String,
    interval: Duration,
    instances: watch::Receiver<Vec<InstanceSample>>,
) {
    let mut failed = false;
    let mut samples: HashMap<u32, (u64, Instant)> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let lines = gauges(&prefix, &instances.borrow().clone(), &mut samples);
        if let Err(e) = send(&host, &lines).await
            && !std::mem::replace(&mut failed, true)
        {
            crate::log(format_args!(
                "{worker}: statsd {host}: {e}; metrics are dropped until it works"
            ));
        }
    }
}

/// The gauges of one report; CPU is measured since the previous one.
fn gauges(
    prefix: &str,
    instances: &[InstanceSample],
    samples: &mut HashMap<u32, (u64, Instant)>,
) -> Vec<String> {
    let now = Instant::now();
    let tick = procfs::tick();
    let mut lines = Vec::new();
    let mut seen = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        let name = format!("{prefix}.{index}");
        let stat = instance.pid.and_then(procfs::stat).filter(|s| !s.zombie);
        let (cpu, memory) = match (instance.pid, stat) {
            (Some(pid), Some(stat)) => {
                seen.push(pid);
                let cpu = samples
                    .insert(pid, (stat.cpu_ticks, now))
                    .map_or(0.0, |(ticks, at)| {
                        let elapsed = (now - at).as_secs_f64();
                        let used = stat.cpu_ticks.saturating_sub(ticks) as f64 * tick.as_secs_f64();
                        if elapsed > 0.0 {
                            used / elapsed * 100.0
                        } else {
                            0.0
                        }
                    });
                (cpu, stat.rss_bytes)
            }
            _ => (0.0, 0),
        };
        lines.push(format!("{name}.up:{}|g", u8::from(stat.is_some())));
        lines.push(format!("{name}.cpu:{cpu:.1}|g"));
        lines.push(format!("{name}.memory:{memory}|g"));
        lines.push(format!("{name}.restarts:{}|g", instance.restarts));
        if let Some(board) = &instance.board {
            lines.extend(board.0.statsd_lines(&name, metric_name));
        }
    }
    samples.retain(|pid, _| seen.contains(pid));
    lines
}

/// Sends the lines, several to a datagram as StatsD servers read them.
async fn send(host: &str, lines: &[String]) -> Result<(), String> {
    let target = crate::resolve(host).await?;
    let socket = crate::udp_socket_for(target)
        .await
        .map_err(|e| e.to_string())?;
    let mut datagram = String::new();
    for line in lines {
        if !datagram.is_empty() && datagram.len() + 1 + line.len() > DATAGRAM {
            socket
                .send(datagram.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            datagram.clear();
        }
        if !datagram.is_empty() {
            datagram.push('\n');
        }
        let _ = write!(datagram, "{line}");
    }
    if !datagram.is_empty() {
        socket
            .send(datagram.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_instance_reports_down_with_nothing_used() {
        let mut samples = HashMap::new();
        let lines = gauges(
            "apm.web",
            &[InstanceSample {
                pid: None,
                restarts: 2,
                board: None,
            }],
            &mut samples,
        );
        assert_eq!(
            lines,
            [
                "apm.web.0.up:0|g",
                "apm.web.0.cpu:0.0|g",
                "apm.web.0.memory:0|g",
                "apm.web.0.restarts:2|g"
            ]
        );
    }

    #[test]
    fn a_running_process_reports_its_memory_and_cpu_from_the_second_report_on() {
        let me = std::process::id();
        let mut samples = HashMap::new();
        let instance = [InstanceSample {
            pid: Some(me),
            restarts: 0,
            board: None,
        }];
        let first = gauges("p.w", &instance, &mut samples);
        assert_eq!(first[0], "p.w.0.up:1|g");
        assert!(!first[2].starts_with("p.w.0.memory:0|"), "{first:?}");
        assert!(samples.contains_key(&me));
        let second = gauges("p.w", &instance, &mut samples);
        assert!(second[1].starts_with("p.w.0.cpu:"), "{second:?}");
        gauges("p.w", &[], &mut samples);
        assert!(samples.is_empty(), "samples of gone processes are dropped");
    }

    #[test]
    fn separators_in_the_prefix_become_underscores() {
        assert_eq!(metric_name("my app:x|y@z"), "my_app_x_y_z");
    }
}
