//! What `list`, `monitor` and the GUI report of running processes.

use crate::harness::*;

fn memory(d: &Daemon, name: &str) -> u64 {
    d.worker(name).unwrap()["instances"][0]["memory_bytes"]
        .as_u64()
        .unwrap()
}

/// With `stats_interval`, a worker's figures are collected at most once per
/// interval and every look in between gets the same ones; without it, a
/// look gets the sampler's newest, which follow the process within a round.
#[test]
fn stats_interval_collects_once_per_interval() {
    let d = Daemon::new("stats_interval");
    let trigger = d.dir().join("grow");
    // Grows by 64 MiB once the trigger file appears.
    let app = format!(
        "import os, time\nwhile not os.path.exists({trigger:?}): time.sleep(0.02)\nheap = bytearray(64 << 20)\nheap[::4096] = b'x' * len(heap[::4096])\ntime.sleep(600)\n",
        trigger = trigger.display().to_string()
    );
    let script = d.write("grow.py", &app);
    let script = script.to_str().unwrap();
    d.ok(&[
        "run",
        "python3",
        script,
        "-name",
        "cached",
        "-stats_interval",
        "1h",
    ]);
    d.ok(&["run", "python3", script, "-name", "live"]);
    let pids: Vec<u32> = ["cached", "live"]
        .iter()
        .map(|w| pids(&d.wait_running(w))[0])
        .collect();
    let before = memory(&d, "cached");
    assert!(before > 0);
    std::fs::write(&trigger, "").unwrap();
    wait_until(PATIENCE, "both processes to grow by 64 MiB", || {
        pids.iter()
            .all(|&pid| status_kib(pid, "VmRSS:") > 64 * 1024)
    });
    wait_until(PATIENCE, "the sampler to see `live` grow", || {
        memory(&d, "live") > 64 << 20
    });
    assert_eq!(
        memory(&d, "cached"),
        before,
        "within the interval, the last figures"
    );
}
