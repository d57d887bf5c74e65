//! apm's integration tests, one binary so that they link once.

mod api;
mod augur;
mod browser;
mod certs;
mod cli;
mod connectors;
mod container;
mod convert;
mod corpus;
mod daemon;
mod docs;
mod export;
mod first_hour;
mod harness;
mod install;
mod logs;
mod metrics;
mod monitor;
mod polyglot;
mod proxy_attacks;
mod reload;
mod sections;
mod security_local;
mod sessions;
mod stats;
mod vanguard_attacks;
