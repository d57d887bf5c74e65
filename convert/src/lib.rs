//! placeholder for the build probe
