//! The lifecycle of one instance as a pure state machine: `step` turns the
//! current phase and an event into the next phase and the effects to
//! perform. It spawns nothing, sleeps never and reads no clock, so every
//! restart policy is tested here with made-up instants.

use std::time::{Duration, Instant};

use apm_compiler::ir::WorkerSpec;
use serde::Serialize;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// It could not be started at all (the reason is reported separately).
    SpawnFailed,
}

impl ExitStatus {
    pub fn is_clean(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit {code}"),
            ExitStatus::Signal(signal) => {
                let name =
                    nix::sys::signal::Signal::try_from(*signal).map_or("unknown", |s| s.as_str());
                write!(f, "killed by {name}")
            }
            ExitStatus::SpawnFailed => f.write_str("could not start"),
        }
    }
}

/// The restart policy of a worker: the reference's Restart policy options.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub restart: bool,
    pub restart_delay: Duration,
    pub max_restarts: u32,
    pub restart_err: bool,
    pub err_delay: Duration,
    pub max_err_restarts: u32,
    pub err_grace: Option<Duration>,
    pub restart_on_exit_codes: Vec<u8>,
    pub kill_timeout: Duration,
    pub startup_grace: Duration,
    /// `drain_timeout`: with `kill_timeout`, the most a stopping
    /// instance's in-flight work is waited for.
    pub drain: Duration,
    /// The instance gets traffic (the worker has `server` lines), so it is
    /// taken out of rotation and its in-flight work waited for before it
    /// is signalled.
    pub proxied: bool,
}

impl Policy {
    pub fn from_spec(spec: &WorkerSpec) -> Policy {
        Policy {
            restart: spec.restart.value,
            restart_delay: spec.restart_delay.as_duration(),
            max_restarts: spec.max_restarts.value,
            restart_err: spec.restart_err.value,
            err_delay: spec.err_delay.as_duration(),
            max_err_restarts: spec.max_err_restarts.value,
            err_grace: spec.err_grace.as_ref().map(|g| g.as_duration()),
            restart_on_exit_codes: spec.restart_on_exit_codes.iter().map(|c| c.value).collect(),
            kill_timeout: spec.kill_timeout.as_duration(),
            startup_grace: spec.startup_grace.as_duration(),
            drain: spec.drain_timeout.as_duration(),
            proxied: !spec.server.is_empty(),
        }
    }

    /// Whether an exit with this status asks for a restart. A list of exit
    /// codes, when set, overrides `restart` and `restart_err`.
    fn wants_restart(&self, status: ExitStatus) -> bool {
        if !self.restart_on_exit_codes.is_empty() {
            return matches!(status, ExitStatus::Code(code) if u8::try_from(code).is_ok_and(|c| self.restart_on_exit_codes.contains(&c)));
        }
        if status.is_clean() {
            self.restart
        } else {
            self.restart_err
        }
    }
}

/// What happens once a stopping process has exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterStop {
    Stay,
    Restart,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Not running, and not meant to.
    Stopped,
    /// Spawned, inside its startup grace: not yet known to be healthy.
    Starting {
        pid: u32,
        since: Instant,
    },
    Running {
        pid: u32,
        since: Instant,
    },
    /// Asked to end, and given no new traffic: its in-flight work may
    /// finish (`Drained`) until `until`, then it is signalled.
    Draining {
        pid: u32,
        until: Instant,
        then: AfterStop,
    },
    /// Asked to end: SIGTERM sent, SIGKILL due at `deadline`.
    Stopping {
        pid: u32,
        deadline: Instant,
        then: AfterStop,
    },
    /// Ended cleanly and the policy does not restart it.
    Exited {
        status: ExitStatus,
    },
    /// Ended with an error and the policy does not restart it.
    Crashed {
        status: ExitStatus,
    },
    /// Ended; will be spawned again at `until`.
    Waiting {
        until: Instant,
        status: ExitStatus,
    },
    /// Ended, and its restart limit is used up.
    Errored {
        status: ExitStatus,
        restarts: u32,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting { .. } => "starting",
            Phase::Running { .. } => "running",
            Phase::Draining { .. } => "draining",
            Phase::Stopping { .. } => "stopping",
            Phase::Exited { .. } => "exited",
            Phase::Crashed { .. } => "crashed",
            Phase::Waiting { .. } => "waiting",
            Phase::Errored { .. } => "errored",
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Phase::Starting { pid, .. }
            | Phase::Running { pid, .. }
            | Phase::Draining { pid, .. }
            | Phase::Stopping { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Whether a process exists for this instance.
    pub fn is_alive(&self) -> bool {
        self.pid().is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The user asked for the instance to run.
    Start,
    /// The user asked for the instance to stop.
    Stop,
    /// The user asked for a restart: stop, then start again.
    Restart,
    Spawned {
        pid: u32,
    },
    Exited {
        status: ExitStatus,
    },
    /// A timer scheduled by `Effect::Wake` fired.
    Wake,
    /// Nothing is in flight any more on the draining process `pid`.
    Drained {
        pid: u32,
    },
    /// The process ended before it bound its `upstream port`, which another
    /// listener had taken: it is started again at once (on another port),
    /// neither a restart nor an attempt of its own. `status` is how it ended.
    PortTaken {
        status: ExitStatus,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Start a process; answer with `Spawned`, or `Exited { SpawnFailed }`.
    Spawn,
    /// SIGTERM to the process group.
    Terminate(u32),
    /// SIGKILL to the process group.
    Kill(u32),
    /// Send `Wake` at this instant (a wake that finds nothing due is ignored).
    Wake(Instant),
    /// The process is out of rotation: hand its sessions on where they
    /// may go, and send `Drained` once nothing is in flight on it.
    Drain(u32),
}

/// One instance: its phase and its restart counters.
#[derive(Clone, Debug, PartialEq)]
pub struct Lifecycle {
    pub phase: Phase,
    /// Restarts after clean exits, counted against `max_restarts`.
    pub restarts: u32,
    /// Restarts after error exits, counted against `max_err_restarts`.
    pub err_restarts: u32,
    /// Processes started since the user last asked for a start; only the
    /// first one's early failure is reported to the CLI.
    pub attempts: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            phase: Phase::Stopped,
            restarts: 0,
            err_restarts: 0,
            attempts: 0,
        }
    }
}

impl Lifecycle {
    /// Applies one event at time `now` and returns the effects to perform,
    /// in order.
    pub fn step(&mut self, event: Event, now: Instant, policy: &Policy) -> Vec<Effect> {
        use Phase::*;
        match (self.phase.clone(), event) {
            // A user start resets the counters: the user is trying again.
            (
                Stopped | Exited { .. } | Crashed { .. } | Errored { .. } | Waiting { .. },
                Event::Start | Event::Restart,
            ) => {
                self.restarts = 0;
                self.err_restarts = 0;
                self.attempts = 0;
                self.phase = Stopped;
                vec![Effect::Spawn]
            }
            (Starting { .. } | Running { .. }, Event::Start) => vec![],
            (Stopping { pid, deadline, .. }, Event::Start | Event::Restart) => {
                self.phase = Stopping {
                    pid,
                    deadline,
                    then: AfterStop::Restart,
                };
                vec![]
            }
            (Running { pid, .. }, Event::Stop | Event::Restart) if policy.proxied => {
                // In-flight work finishes first, whatever `drain_timeout`
                // says: `kill_timeout` bounds it as it bounds the stop.
                let until = now + policy.kill_timeout.max(policy.drain);
                let then = if event == Event::Restart {
                    AfterStop::Restart
                } else {
                    AfterStop::Stay
                };
                self.phase = Draining { pid, until, then };
                vec![Effect::Drain(pid), Effect::Wake(until)]
            }
            (Draining { pid, until, .. }, Event::Stop) => {
                self.phase = Draining {
                    pid,
                    until,
                    then: AfterStop::Stay,
                };
                vec![]
            }
            (Draining { pid, until, .. }, Event::Start | Event::Restart) => {
                self.phase = Draining {
                    pid,
                    until,
                    then: AfterStop::Restart,
                };
                vec![]
            }
            // Nothing in flight any more, or the bound has come.
            (Draining { pid, until, then }, Event::Drained { .. } | Event::Wake)
                if event == (Event::Drained { pid }) || (event == Event::Wake && now >= until) =>
            {
                let deadline = now + policy.kill_timeout;
                self.phase = Stopping {
                    pid,
                    deadline,
                    then,
                };
                vec![Effect::Terminate(pid), Effect::Wake(deadline)]
            }
            (Starting { pid, .. } | Running { pid, .. }, Event::Stop | Event::Restart) => {
                let deadline = now + policy.kill_timeout;
                let then = if event == Event::Restart {
                    AfterStop::Restart
                } else {
                    AfterStop::Stay
                };
                self.phase = Stopping {
                    pid,
                    deadline,
                    then,
                };
                vec![Effect::Terminate(pid), Effect::Wake(deadline)]
            }
            (Stopping { pid, deadline, .. }, Event::Stop) => {
                self.phase = Stopping {
                    pid,
                    deadline,
                    then: AfterStop::Stay,
                };
                vec![]
            }
            (Waiting { .. }, Event::Stop) => {
                self.phase = Stopped;
                vec![]
            }
            (Stopped | Exited { .. } | Crashed { .. } | Errored { .. }, Event::Stop) => vec![],

            (Stopped | Waiting { .. }, Event::Spawned { pid }) => {
                self.attempts += 1;
                let until = now + policy.startup_grace;
                self.phase = Starting { pid, since: now };
                vec![Effect::Wake(until)]
            }
            (Starting { pid, since }, Event::Wake) if now >= since + policy.startup_grace => {
                self.phase = Running { pid, since };
                vec![]
            }
            (Waiting { until, .. }, Event::Wake) if now >= until => vec![Effect::Spawn],
            (Stopping { pid, deadline, .. }, Event::Wake) if now >= deadline => {
                vec![Effect::Kill(pid)]
            }

            (Stopping { then, .. } | Draining { then, .. }, Event::Exited { .. }) => {
                self.phase = Stopped;
                if then == AfterStop::Restart {
                    self.restarts = 0;
                    self.err_restarts = 0;
                    self.attempts = 0;
                    vec![Effect::Spawn]
                } else {
                    vec![]
                }
            }
            (Starting { since, .. } | Running { since, .. }, Event::Exited { status }) => {
                self.ended(status, now - since, now, policy)
            }
            (Starting { .. } | Running { .. }, Event::PortTaken { .. }) => {
                self.attempts = self.attempts.saturating_sub(1);
                self.phase = Stopped;
                vec![Effect::Spawn]
            }
            // A spawn that failed ends an attempt that never ran.
            (
                Stopped | Waiting { .. },
                Event::Exited {
                    status: status @ ExitStatus::SpawnFailed,
                },
            ) => {
                self.attempts += 1;
                self.ended(status, Duration::ZERO, now, policy)
            }
            // Anything else is stale (a wake for a phase that has moved on).
            _ => vec![],
        }
    }

    /// A process ended on its own after `uptime`: restart it or not, by policy.
    fn ended(
        &mut self,
        status: ExitStatus,
        uptime: Duration,
        now: Instant,
        policy: &Policy,
    ) -> Vec<Effect> {
        if !policy.wants_restart(status) {
            self.phase = if status.is_clean() {
                Phase::Exited { status }
            } else {
                Phase::Crashed { status }
            };
            return vec![];
        }
        let clean = status.is_clean();
        let (count, limit, delay) = if clean {
            (
                &mut self.restarts,
                policy.max_restarts,
                policy.restart_delay,
            )
        } else {
            (
                &mut self.err_restarts,
                policy.max_err_restarts,
                policy.err_delay,
            )
        };
        // A process that stayed up for `err_grace` was healthy: its exit starts
        // a fresh budget instead of spending the old one.
        if policy.err_grace.is_some_and(|grace| uptime >= grace) {
            *count = 0;
        }
        if limit > 0 && *count >= limit {
            let restarts = *count;
            self.phase = Phase::Errored { status, restarts };
            return vec![];
        }
        *count += 1;
        let until = now + delay;
        self.phase = Phase::Waiting { until, status };
        vec![Effect::Wake(until)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            restart: false,
            restart_delay: Duration::from_millis(250),
            max_restarts: 0,
            restart_err: false,
            err_delay: Duration::from_millis(500),
            max_err_restarts: 0,
            err_grace: None,
            restart_on_exit_codes: vec![],
            kill_timeout: Duration::from_millis(2000),
            startup_grace: Duration::from_millis(2000),
            drain: Duration::ZERO,
            proxied: false,
        }
    }

    /// An instance and a clock that tests move by hand.
    struct Sim {
        life: Lifecycle,
        now: Instant,
        policy: Policy,
        next_pid: u32,
    }

    impl Sim {
        fn new(policy: Policy) -> Sim {
            Sim {
                life: Lifecycle::default(),
                now: Instant::now(),
                policy,
                next_pid: 100,
            }
        }

        fn send(&mut self, event: Event) -> Vec<Effect> {
            self.life.step(event, self.now, &self.policy)
        }

        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
        }

        /// Start and let the spawn succeed.
        fn spawn(&mut self) -> u32 {
            self.next_pid += 1;
            let pid = self.next_pid;
            let effects = self.send(Event::Spawned { pid });
            assert_eq!(
                effects,
                vec![Effect::Wake(self.now + self.policy.startup_grace)]
            );
            pid
        }

        fn exit(&mut self, code: i32) -> Vec<Effect> {
            self.send(Event::Exited {
                status: ExitStatus::Code(code),
            })
        }
    }

    #[test]
    fn start_runs_after_the_startup_grace() {
        let mut sim = Sim::new(policy());
        assert_eq!(sim.send(Event::Start), vec![Effect::Spawn]);
        let pid = sim.spawn();
        assert_eq!(sim.life.phase.name(), "starting");
        sim.advance(1999);
        assert_eq!(sim.send(Event::Wake), vec![]);
        assert_eq!(sim.life.phase.name(), "starting");
        sim.advance(1);
        sim.send(Event::Wake);
        assert!(matches!(sim.life.phase, Phase::Running { pid: p, .. } if p == pid));
        assert_eq!(sim.life.attempts, 1);
    }

    #[test]
    fn without_restart_policies_exits_are_final() {
        let mut sim = Sim::new(policy());
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(sim.exit(0), vec![]);
        assert_eq!(
            sim.life.phase,
            Phase::Exited {
                status: ExitStatus::Code(0)
            }
        );
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(sim.exit(3), vec![]);
        assert_eq!(
            sim.life.phase,
            Phase::Crashed {
                status: ExitStatus::Code(3)
            }
        );
    }

    #[test]
    fn restart_after_clean_exit_waits_restart_delay_and_respects_max_restarts() {
        let mut sim = Sim::new(Policy {
            restart: true,
            max_restarts: 2,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        for round in 1..=2 {
            let effects = sim.exit(0);
            let until = sim.now + Duration::from_millis(250);
            assert_eq!(effects, vec![Effect::Wake(until)]);
            assert_eq!(sim.life.restarts, round);
            sim.advance(249);
            assert_eq!(sim.send(Event::Wake), vec![], "not due yet");
            sim.advance(1);
            assert_eq!(sim.send(Event::Wake), vec![Effect::Spawn]);
            sim.spawn();
        }
        assert_eq!(sim.exit(0), vec![]);
        assert_eq!(
            sim.life.phase,
            Phase::Errored {
                status: ExitStatus::Code(0),
                restarts: 2
            }
        );
        // An error exit is not restarted by `restart` alone.
        let mut sim = Sim::new(Policy {
            restart: true,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(sim.exit(1), vec![]);
        assert_eq!(sim.life.phase.name(), "crashed");
    }

    #[test]
    fn restart_err_uses_err_delay_and_max_err_restarts() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            max_err_restarts: 1,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(
            sim.send(Event::Exited {
                status: ExitStatus::Signal(9)
            }),
            vec![Effect::Wake(sim.now + Duration::from_millis(500))]
        );
        sim.advance(500);
        assert_eq!(sim.send(Event::Wake), vec![Effect::Spawn]);
        sim.spawn();
        assert_eq!(sim.exit(2), vec![]);
        assert_eq!(
            sim.life.phase,
            Phase::Errored {
                status: ExitStatus::Code(2),
                restarts: 1
            }
        );
        // Clean exits are not restarted by `restart_err` alone.
        let mut sim = Sim::new(Policy {
            restart_err: true,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(sim.exit(0), vec![]);
        assert_eq!(sim.life.phase.name(), "exited");
    }

    #[test]
    fn unlimited_restarts_when_max_is_zero() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            ..policy()
        });
        sim.send(Event::Start);
        for _ in 0..50 {
            sim.spawn();
            assert_eq!(sim.exit(1).len(), 1);
            sim.advance(500);
            assert_eq!(sim.send(Event::Wake), vec![Effect::Spawn]);
        }
        assert_eq!(sim.life.err_restarts, 50);
    }

    #[test]
    fn err_grace_gives_a_process_that_stayed_up_a_fresh_budget() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            max_err_restarts: 2,
            err_grace: Some(Duration::from_secs(10)),
            ..policy()
        });
        sim.send(Event::Start);
        // Two fast crashes spend the budget...
        for _ in 0..2 {
            sim.spawn();
            sim.advance(100);
            sim.exit(1);
            sim.advance(500);
            sim.send(Event::Wake);
        }
        assert_eq!(sim.life.err_restarts, 2);
        // ...but a crash after 10 s of uptime starts a fresh one.
        sim.spawn();
        sim.advance(10_000);
        assert_eq!(sim.exit(1).len(), 1);
        assert_eq!(sim.life.err_restarts, 1);
        assert_eq!(sim.life.phase.name(), "waiting");
        // A fast crash right away would still count.
        sim.advance(500);
        sim.send(Event::Wake);
        sim.spawn();
        sim.exit(1);
        assert_eq!(sim.life.err_restarts, 2);
        sim.advance(500);
        sim.send(Event::Wake);
        sim.spawn();
        assert_eq!(sim.exit(1), vec![]);
        assert_eq!(sim.life.phase.name(), "errored");
    }

    #[test]
    fn restart_on_exit_codes_overrides_restart_flags() {
        let mut sim = Sim::new(Policy {
            restart: true,
            restart_err: true,
            restart_on_exit_codes: vec![3, 0],
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(
            sim.exit(3),
            vec![Effect::Wake(sim.now + Duration::from_millis(500))],
            "error code: err_delay"
        );
        sim.advance(500);
        sim.send(Event::Wake);
        sim.spawn();
        assert_eq!(
            sim.exit(0),
            vec![Effect::Wake(sim.now + Duration::from_millis(250))],
            "clean: restart_delay"
        );
        sim.advance(250);
        sim.send(Event::Wake);
        sim.spawn();
        assert_eq!(sim.exit(1), vec![], "1 is not in the list");
        assert_eq!(sim.life.phase.name(), "crashed");
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(
            sim.send(Event::Exited {
                status: ExitStatus::Signal(15)
            }),
            vec![],
            "signals are not codes"
        );
    }

    #[test]
    fn stop_terminates_then_kills_after_kill_timeout() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            ..policy()
        });
        sim.send(Event::Start);
        let pid = sim.spawn();
        let deadline = sim.now + Duration::from_millis(2000);
        assert_eq!(
            sim.send(Event::Stop),
            vec![Effect::Terminate(pid), Effect::Wake(deadline)]
        );
        sim.advance(1000);
        assert_eq!(sim.send(Event::Wake), vec![], "the startup wake is stale");
        sim.advance(1000);
        assert_eq!(sim.send(Event::Wake), vec![Effect::Kill(pid)]);
        // Killed by our SIGKILL: stopped, not restarted despite restart_err.
        assert_eq!(
            sim.send(Event::Exited {
                status: ExitStatus::Signal(9)
            }),
            vec![]
        );
        assert_eq!(sim.life.phase, Phase::Stopped);
    }

    #[test]
    fn restart_stops_then_spawns_with_fresh_counters() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        sim.exit(1);
        sim.advance(500);
        sim.send(Event::Wake);
        let pid = sim.spawn();
        assert_eq!(sim.life.err_restarts, 1);
        assert_eq!(
            sim.send(Event::Restart),
            vec![
                Effect::Terminate(pid),
                Effect::Wake(sim.now + Duration::from_millis(2000))
            ]
        );
        assert_eq!(
            sim.send(Event::Exited {
                status: ExitStatus::Signal(15)
            }),
            vec![Effect::Spawn]
        );
        assert_eq!((sim.life.err_restarts, sim.life.attempts), (0, 0));
        sim.spawn();
        assert_eq!(sim.life.phase.name(), "starting");
    }

    #[test]
    fn a_proxied_instance_drains_until_nothing_is_in_flight_bounded_and_a_starting_one_is_not_drained()
     {
        let mut sim = Sim::new(Policy {
            drain: Duration::from_millis(3000),
            proxied: true,
            ..policy()
        });
        sim.send(Event::Start);
        let pid = sim.spawn();
        sim.advance(2000);
        sim.send(Event::Wake);
        assert_eq!(sim.life.phase.name(), "running");
        // The longer of drain_timeout and kill_timeout bounds the wait.
        assert_eq!(
            sim.send(Event::Stop),
            vec![
                Effect::Drain(pid),
                Effect::Wake(sim.now + Duration::from_millis(3000))
            ]
        );
        assert_eq!(sim.life.phase.name(), "draining");
        sim.advance(10);
        assert_eq!(sim.send(Event::Wake), vec![], "still draining");
        assert_eq!(
            sim.send(Event::Drained { pid: pid + 1 }),
            vec![],
            "another process's drain is stale"
        );
        // Nothing in flight: signalled at once, long before drain_timeout.
        assert_eq!(
            sim.send(Event::Drained { pid }),
            vec![
                Effect::Terminate(pid),
                Effect::Wake(sim.now + Duration::from_millis(2000))
            ]
        );
        sim.send(Event::Exited {
            status: ExitStatus::Signal(15),
        });
        assert_eq!(sim.life.phase, Phase::Stopped);

        // Work that never ends is cut off at the bound.
        sim.send(Event::Start);
        let pid = sim.spawn();
        sim.advance(2000);
        sim.send(Event::Wake);
        sim.send(Event::Restart);
        sim.advance(2999);
        assert_eq!(sim.send(Event::Wake), vec![], "still draining");
        sim.advance(1);
        assert_eq!(
            sim.send(Event::Wake),
            vec![
                Effect::Terminate(pid),
                Effect::Wake(sim.now + Duration::from_millis(2000))
            ]
        );
        assert_eq!(
            sim.send(Event::Exited {
                status: ExitStatus::Signal(15)
            }),
            vec![Effect::Spawn]
        );
        // Still inside its startup grace, an instance has no traffic to drain.
        let pid = sim.spawn();
        assert_eq!(sim.send(Event::Restart)[0], Effect::Terminate(pid));
    }

    #[test]
    fn stop_while_waiting_cancels_the_restart() {
        let mut sim = Sim::new(Policy {
            restart: true,
            ..policy()
        });
        sim.send(Event::Start);
        sim.spawn();
        sim.exit(0);
        assert_eq!(sim.send(Event::Stop), vec![]);
        sim.advance(250);
        assert_eq!(sim.send(Event::Wake), vec![], "the restart was cancelled");
        assert_eq!(sim.life.phase, Phase::Stopped);
    }

    #[test]
    fn a_failed_spawn_is_an_error_exit() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            max_err_restarts: 1,
            ..policy()
        });
        sim.send(Event::Start);
        let failed = Event::Exited {
            status: ExitStatus::SpawnFailed,
        };
        assert_eq!(
            sim.send(failed),
            vec![Effect::Wake(sim.now + Duration::from_millis(500))]
        );
        sim.advance(500);
        assert_eq!(sim.send(Event::Wake), vec![Effect::Spawn]);
        assert_eq!(sim.send(failed), vec![]);
        assert_eq!(sim.life.phase.name(), "errored");
        assert_eq!(sim.life.attempts, 2);
    }

    #[test]
    fn a_process_whose_port_was_taken_starts_again_at_once_uncounted() {
        let mut sim = Sim::new(Policy {
            restart_err: true,
            max_err_restarts: 1,
            ..policy()
        });
        let taken = Event::PortTaken {
            status: ExitStatus::Code(1),
        };
        sim.send(Event::Start);
        sim.spawn();
        assert_eq!(sim.send(taken), vec![Effect::Spawn]);
        sim.spawn();
        sim.advance(2000);
        sim.send(Event::Wake);
        assert_eq!(sim.life.phase.name(), "running");
        assert_eq!(sim.send(taken), vec![Effect::Spawn]);
        assert_eq!(
            (sim.life.restarts, sim.life.err_restarts, sim.life.attempts),
            (0, 0, 0),
            "neither a restart nor an attempt"
        );
        // Anywhere else it is stale.
        sim.send(Event::Stop);
        assert_eq!(sim.send(taken), vec![]);
    }
}
