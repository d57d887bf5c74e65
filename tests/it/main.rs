//! apm's integration tests, one binary so that they link once.

mod certs;
mod cli;
mod connectors;
mod convert;
mod corpus;
mod daemon;
mod docs;
mod harness;
mod reload;
mod sections;
mod vanguard_attacks;
