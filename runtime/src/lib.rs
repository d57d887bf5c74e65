//! apm's runtime: applies worker specs (IR, never syntax) to real processes.
#![forbid(unsafe_code)]

pub mod lifecycle;
