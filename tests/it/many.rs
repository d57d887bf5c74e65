//! Many workers: `apm ls` of hundreds of them, and `apm check` of a large
//! file within a memory bound.

use std::process::{Command, Stdio};

use crate::harness::*;

/// `apm ls` (the `table` call) shows every worker as `apm ls --json` (the
/// full `list`) describes it, in the same order, with 300 workers of two
/// processes each.
#[test]
fn ls_shows_hundreds_of_workers_as_list_describes_them() {
    const WORKERS: usize = 300;
    let d = Daemon::new("ls_many");
    let config: String = (0..WORKERS)
        .map(|i| format!("worker {{ name w{i:03}; exec sleep; params 1000; instances 2; }}\n"))
        .collect();
    d.load(&config);
    let listing = d.list();
    let workers = listing["workers"].as_array().unwrap();
    assert_eq!(workers.len(), WORKERS);
    let table = stdout(&d.ok(&["ls"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        WORKERS + 2,
        "header, rows, daemon line:\n{table}"
    );
    assert!(lines[0].starts_with("name"), "{table}");
    assert!(lines[WORKERS + 1].starts_with("daemon: pid"), "{table}");
    for (worker, line) in workers.iter().zip(&lines[1..]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let pids: Vec<String> = pids(worker).iter().map(u32::to_string).collect();
        assert_eq!(pids.len(), 2, "{worker}");
        assert_eq!(cells[0], worker["name"].as_str().unwrap(), "{line}");
        assert_eq!(cells[1], "running", "{line}");
        assert_eq!(cells[2], pids.join(","), "{line}");
        assert_eq!(cells[3], "2/2", "{line}");
        assert_eq!(cells[5], "0", "no restarts: {line}");
        assert_ne!(
            cells[7], "-",
            "a running process has a memory figure: {line}"
        );
    }
}

/// The peak resident memory (KiB) of `apm ARGS` run to its end in `dir`,
/// and whether it succeeded; None without python3. Measured through a
/// python3 parent: a child's peak counts the memory of the process it was
/// forked from (the kernel keeps the larger at exec), and this test
/// process, among hundreds of tests, is far larger than python's few MB.
fn peak_rss_kib(dir: &std::path::Path, args: &[&str]) -> Option<(bool, u64)> {
    const MEASURE: &str = "import resource, subprocess, sys\n\
        run = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
        print(run.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)";
    let output = Command::new("python3")
        .current_dir(dir)
        .args(["-c", MEASURE, env!("CARGO_BIN_EXE_apm")])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (code, peak) = text.trim().split_once(' ')?;
    Some((code == "0", peak.parse().ok()?))
}

/// `apm check` of 10,000 workers in 100 included files (90,002 statements,
/// near the 100,000 a config may hold) stays within a memory bound per
/// worker: the IR of each worker is what a large config holds at once.
#[test]
fn check_of_a_large_config_stays_within_a_memory_bound() {
    const WORKERS: usize = 10_000;
    const PER_FILE: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("workers")).unwrap();
    std::fs::write(
        dir.path().join("apm.conf"),
        "daemon { gui_port 0; }\ninclude workers/*.conf;\n",
    )
    .unwrap();
    for file in 0..WORKERS / PER_FILE {
        let text: String = (file * PER_FILE..(file + 1) * PER_FILE)
            .map(|i| {
                format!(
                    "worker {{\n    name w{i};\n    exec sh;\n    params server.js, --port, {port};\n    \
                     instances {instances};\n    restart_err true;\n    kill_timeout 3s;\n    \
                     env NODE_ENV=production, SHARD={i};\n    \
                     server http://127.0.0.1:{listen}, http://unix:/run/w{i}.sock;\n}}\n",
                    port = 10_000 + i,
                    instances = 1 + i % 4,
                    listen = 1024 + i,
                )
            })
            .collect();
        std::fs::write(dir.path().join(format!("workers/{file:04}.conf")), text).unwrap();
    }
    let Some((succeeded, peak_kib)) = peak_rss_kib(dir.path(), &["check", "apm.conf"]) else {
        return prerequisite_missing("python3 is not installed");
    };
    assert!(succeeded, "apm check failed");
    eprintln!("apm check of {WORKERS} workers: peak RSS {peak_kib} KiB");
    // Generous: this file peaks at about 64 MB in a debug build (python's
    // few MB included). What is caught is a per-worker cost that grows, or
    // freed memory kept until exit, not a few percent.
    let bound_kib = 40 * 1024 + WORKERS as u64 * 6;
    assert!(
        peak_kib < bound_kib,
        "apm check of {WORKERS} workers peaked at {peak_kib} KiB (bound {bound_kib} KiB)"
    );
}
