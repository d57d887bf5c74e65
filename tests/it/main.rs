//! apm's integration tests, one binary so that they link once.

mod certs;
mod cli;
mod connectors;
mod convert;
mod corpus;
mod daemon;
mod docs;
mod harness;
mod proxy_attacks;
mod reload;
mod sections;
