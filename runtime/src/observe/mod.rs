//! Observation: what workers print (log files, syslog) and what is measured of
//! them (StatsD, each listener's traffic), and the daemon's own log.

pub mod console;
pub mod daemon_log;
pub mod logs;
pub mod logstyle;
pub(crate) mod statsd;
pub(crate) mod syslog;
pub mod traffic_stats;
