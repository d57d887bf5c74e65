//! Benchmark of plans: diff and render two 10,000-worker configs that
//! differ in 1% of their workers. Target: under 50 ms (release). The
//! reference measured in the same run is compiling the new config, which
//! every reload does anyway.
//!
//! Run: cargo bench -p apm-compiler --bench plan

use std::path::Path;
use std::time::{Duration, Instant};

use apm_compiler::{MemLoader, compile, plan};

fn config(workers: usize, changed_every: usize) -> String {
    (0..workers)
        .map(|i| {
            let changed = changed_every > 0 && i % changed_every == 0;
            let (instances, env) = if changed { (2, "staging") } else { (1, "production") };
            format!(
                "worker {{\n    name w{i};\n    exec node;\n    params server.js;\n    instances {instances};\n    env NODE_ENV={env}, SHARD={i};\n    restart_err true;\n    kill_timeout 3s;\n    server http://127.{}.0.1:{};\n}}\n",
                i / 60000,
                1024 + i % 60000
            )
        })
        .collect()
}

fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

fn main() {
    let workers = 10_000;
    let old = compile(
        Path::new("old.conf"),
        &MemLoader::new().file("old.conf", config(workers, 0)),
    )
    .unwrap();
    let new_text = config(workers, 100);
    let compile_new = median(
        (0..5)
            .map(|_| {
                let start = Instant::now();
                compile(
                    Path::new("new.conf"),
                    &MemLoader::new().file("new.conf", new_text.clone()),
                )
                .unwrap();
                start.elapsed()
            })
            .collect(),
    );
    let new = compile(
        Path::new("new.conf"),
        &MemLoader::new().file("new.conf", new_text),
    )
    .unwrap();
    let (old_workers, new_workers): (Vec<_>, Vec<_>) = (
        old.config.workers.iter().collect(),
        new.config.workers.iter().collect(),
    );
    let mut changed = 0;
    let planned = median(
        (0..9)
            .map(|_| {
                let start = Instant::now();
                let plan = plan::diff(&old_workers, &new_workers, false);
                let text = plan.render();
                let elapsed = start.elapsed();
                changed = plan
                    .steps
                    .iter()
                    .filter(|s| !matches!(s, plan::Step::Unchanged { .. }))
                    .count();
                assert!(!text.is_empty());
                elapsed
            })
            .collect(),
    );
    println!(
        "plan of {workers} workers, {changed} changed: {:.1} ms (target < 50 ms: {})",
        planned.as_secs_f64() * 1e3,
        if planned < Duration::from_millis(50) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "reference, compiling the new config: {:.1} ms; plan / compile = {:.2}",
        compile_new.as_secs_f64() * 1e3,
        planned.as_secs_f64() / compile_new.as_secs_f64()
    );
}
