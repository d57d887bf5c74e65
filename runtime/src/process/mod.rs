//! Process supervision: the supervisor task and what it uses to start, watch,
//! restart and recover processes.

pub mod augur;
pub(crate) mod cgroup;
pub(crate) mod filewatch;
pub(crate) mod health;
pub mod lifecycle;
pub mod procfs;
pub mod sock_diag;
pub mod state;
pub mod supervisor;
pub(crate) mod usage;
