//! apm's integration tests, one binary so that they link once.

mod certs;
mod cli;
mod convert;
mod corpus;
mod daemon;
mod docs;
mod reload;
mod sections;
