//! Micro-benchmark of one Vanguard decision with 100 path rules, 1,000 CIDRs
//! and a rate limit that is not hit (target: under 1 µs). The reference
//! measured in the same run is the same decision with no rules at all.
//!
//! Then a flood from a million distinct addresses, each breaching the limit
//! and getting banned, as fast as one core can send it: the growth of the
//! process's resident memory is Vanguard's state (target: under 64 MB).
//!
//! Run: cargo bench -p apm-runtime --bench vanguard

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use apm_runtime::traffic::vanguard::Vanguard;

fn vanguard(rules: &str) -> Vanguard {
    let config = format!("worker {{ exec x; vanguard {{ {rules} }} }}");
    let compilation = apm_compiler::compile(
        Path::new("a.conf"),
        &apm_compiler::MemLoader::new().file("a.conf", config),
    )
    .unwrap();
    assert!(!compilation.has_errors());
    Vanguard::new(compilation.config.workers[0].vanguard.as_ref().unwrap())
}

fn per_decision(v: &Vanguard, rounds: u32) -> f64 {
    let clients: Vec<IpAddr> = (0..1000u32)
        .map(|i| IpAddr::from([192, 0, (i >> 8) as u8, i as u8]))
        .collect();
    let start = Instant::now();
    for round in 0..rounds {
        let ip = clients[(round % 1000) as usize];
        let _ = black_box(v.admit_request(black_box(ip), black_box("/api/v1/users/42?page=2")));
    }
    start.elapsed().as_secs_f64() / rounds as f64
}

/// Resident memory of this process, in bytes.
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn flood(clients: u32) {
    let v = vanguard("rate_limit 1; rate_burst 1; ban_ttl 2s;");
    let before = resident();
    let mut peak = before;
    let start = Instant::now();
    for i in 0..clients {
        let ip = IpAddr::from((0x0100_0000 + i).to_be_bytes());
        let _ = black_box(v.admit_request(ip, "/"));
        let _ = black_box(v.admit_request(ip, "/"));
        if i % 50_000 == 0 {
            peak = peak.max(resident());
        }
    }
    peak = peak.max(resident());
    let flooded = start.elapsed();
    let stats = v.stats();
    let mb = (peak - before) as f64 / (1 << 20) as f64;
    println!(
        "flood of {clients} addresses in {:.1} s (each banned): {} tracked and {} banned at the end; memory grew {mb:.1} MB (target < 64 MB: {})",
        flooded.as_secs_f64(),
        stats.tracked,
        stats.banned_now,
        if mb < 64.0 { "met" } else { "MISSED" }
    );
}

fn main() {
    let paths: Vec<String> = (0..100).map(|i| format!("/blocked-{i}*")).collect();
    let cidrs: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let rules = format!(
        "rate_limit 1000000; ban_path {}; ban_ip {};",
        paths.join(", "),
        cidrs.join(", ")
    );
    let full = vanguard(&rules);
    let empty = vanguard("");
    let rounds = 1_000_000;
    per_decision(&full, 10_000); // warm up
    let with_rules = per_decision(&full, rounds);
    let without = per_decision(&empty, rounds);
    println!(
        "Vanguard decision, 100 path rules + 1,000 CIDRs + rate limit: {:.0} ns (target < 1000 ns: {})",
        with_rules * 1e9,
        if with_rules < 1e-6 { "met" } else { "MISSED" }
    );
    println!(
        "reference, no rules: {:.0} ns; ratio {:.1}",
        without * 1e9,
        with_rules / without
    );
    flood(1_000_000);
}
