//! apm's integration tests, one binary so that they link once.

mod augur;
mod certs;
mod cli;
mod connectors;
mod convert;
mod corpus;
mod daemon;
mod docs;
mod first_hour;
mod harness;
mod ipc;
mod logs;
mod proxy_attacks;
mod reload;
mod sections;
mod security_local;
mod stats;
mod vanguard_attacks;
