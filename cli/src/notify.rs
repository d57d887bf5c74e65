//! The service manager's readiness protocol (`sd_notify`): one datagram per
//! state to the unix socket named by `NOTIFY_SOCKET` (a path, or an abstract
//! name written with a leading `@`). Without that variable every call does
//! nothing, so the daemon is the same under any init system.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends one state (`READY=1`, `STOPPING=1`, `WATCHDOG=1`, …). A manager that
/// cannot be told is logged once per state and otherwise ignored: the
/// daemon's work does not depend on it.
pub fn send(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    if let Err(e) = send_to(&target, state) {
        apm_runtime::log(format_args!(
            "cannot tell the service manager {state} on {target}: {e}"
        ));
    }
}

fn send_to(target: &str, state: &str) -> std::io::Result<()> {
    let address = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(target)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

/// How often the manager wants `WATCHDOG=1`: half its `WatchdogSec`, as
/// sd_watchdog_enabled(3) advises, and only when the watchdog is meant for
/// this process (`WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog from the daemon's own runtime thread, so that a
/// thread stuck for longer than `WatchdogSec` stops the pings and the
/// manager restarts the service.
pub fn spawn_watchdog() {
    if let Some(every) = watchdog_interval() {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                send("WATCHDOG=1");
            }
        });
    }
}
