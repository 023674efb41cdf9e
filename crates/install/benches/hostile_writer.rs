//! Benchmark for issue 7 item 3: a hostile writer replaces the primary CNI config with a
//! version without our entry 100 times per second for 10 s while the keeper runs (default
//! tuning, so its rewrite-loop detector is active after the 11th re-insert). A separate
//! poller reads the file every ~0.2 ms, the way a runtime would, and records when our entry
//! is visible. Reported: the windows without our entry (from the writer's rename to the first
//! poll that sees our entry again; overlapping removals merge into one window), their
//! distribution and the total share of time without our entry.
//!
//! ```text
//! cargo bench -p meshcni-install --bench hostile_writer
//! RATE=100 SECONDS=10 cargo bench -p meshcni-install --bench hostile_writer
//! ```
//!
//! Uses only API that also exists before the fix, so the same file measures the old keeper.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshcni_install::{InstallConfig, InstallStatus, Installer, Shutdown};
use serde_json::{Value, json};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn primary(mtu: u64) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "cniVersion": "0.3.1",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "calico", "mtu": mtu, "ipam": {"type": "calico-ipam"}},
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
        ]
    }))
    .expect("serialize")
}

fn write_atomic(path: &Path, content: &[u8]) {
    let tmp = path.with_file_name(".hostile-tmp");
    fs::write(&tmp, content).expect("write tmp");
    fs::rename(&tmp, path).expect("rename");
}

fn has_entry(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|d| {
            d["plugins"]
                .as_array()
                .map(|p| p.iter().any(|p| p["type"] == "meshcni"))
        })
        .unwrap_or(false)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rate = env_u64("RATE", 100).max(1);
    let seconds = env_u64("SECONDS", 10).max(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf_dir = tmp.path().join("net.d");
    let bin_dir = tmp.path().join("bin");
    let src_dir = tmp.path().join("src");
    let run_dir = tmp.path().join("run");
    let sa_dir = tmp.path().join("sa");
    for d in [&conf_dir, &bin_dir, &src_dir, &run_dir, &sa_dir] {
        fs::create_dir(d).expect("mkdir");
    }
    fs::write(src_dir.join("meshcni"), vec![0x7f; 64 * 1024]).expect("fake binary");
    fs::write(sa_dir.join("token"), "token").expect("token");
    fs::write(sa_dir.join("ca.crt"), "ca").expect("ca");
    let path = conf_dir.join("10-calico.conflist");
    write_atomic(&path, &primary(1500));
    let cfg = InstallConfig {
        mounted_cni_net_dir: conf_dir.clone(),
        cni_agent_run_dir: "/var/run/meshcni".into(),
        kubeconfig_dir: Some(run_dir),
        service_account_dir: sa_dir,
        k8s_service_host: "10.96.0.1".into(),
        k8s_service_port: "443".into(),
        cni_bin_source_dir: src_dir,
        cni_bin_target_dirs: vec![bin_dir],
        ..InstallConfig::default()
    };
    let installer = Arc::new(Installer::new(cfg).expect("installer"));
    let status = Arc::new(InstallStatus::new());
    let shutdown = Shutdown::new();
    let keeper = installer
        .spawn_keeper(status.clone(), shutdown.clone())
        .expect("spawn keeper");
    let t = Instant::now();
    while !(has_entry(&path) && status.ready()) {
        assert!(t.elapsed() < Duration::from_secs(10), "initial install");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Poller: (time, entry visible) samples.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::with_capacity(100_000);
            while !stop.load(Ordering::SeqCst) {
                let seen = has_entry(&path);
                samples.push((Instant::now(), seen));
                std::thread::sleep(Duration::from_micros(200));
            }
            samples
        })
    };
    // Hostile writer: remove our entry `rate` times per second.
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let n = rate * seconds;
    let start = Instant::now();
    let mut writes = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        write_atomic(&path, &primary(1400 + i % 100));
        writes.push(Instant::now());
    }
    let wrote_for = start.elapsed();
    // Let the last removal be answered, then stop polling.
    let t = Instant::now();
    while !has_entry(&path) && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    let samples = poller.join().expect("poller");
    shutdown.trigger();
    let _ = keeper.join();

    // Windows: from a removal to the first later sample that shows our entry; a removal that
    // lands inside an open window extends it.
    let mut windows: Vec<Duration> = Vec::new();
    let mut si = 0;
    let mut wi = 0;
    while wi < writes.len() {
        let begin = writes[wi];
        let mut end_search = begin;
        loop {
            while si < samples.len() && (samples[si].0 <= end_search || !samples[si].1) {
                si += 1;
            }
            let end = samples.get(si).map(|s| s.0);
            // Merge removals that happened before the entry was seen again.
            let mut merged = false;
            while wi + 1 < writes.len() && end.is_none_or(|e| writes[wi + 1] < e) {
                wi += 1;
                end_search = writes[wi];
                merged = true;
            }
            if !merged {
                windows.push(end.map_or(Duration::MAX, |e| e - begin));
                break;
            }
        }
        wi += 1;
    }
    let missing_total: Duration = windows
        .iter()
        .copied()
        .filter(|d| *d != Duration::MAX)
        .sum();
    let unanswered = windows.iter().filter(|d| **d == Duration::MAX).count();
    windows.retain(|d| *d != Duration::MAX);
    windows.sort();
    // From the first removal to the last sample (the last window may outlast the writer).
    let observed = samples.last().map_or(wrote_for, |s| s.0 - start);
    let mut gaps: Vec<Duration> = samples.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort();
    println!(
        "hostile writer: {n} removals in {:.2} s ({rate}/s target); observed for {:.2} s",
        wrote_for.as_secs_f64(),
        observed.as_secs_f64()
    );
    println!(
        "poller: {} samples, interval median {} / p99 {}",
        samples.len(),
        ms(pct(&gaps, 0.5)),
        ms(pct(&gaps, 0.99))
    );
    println!(
        "windows without our entry: {} (removals merged into one window: {}), unanswered: {unanswered}",
        windows.len(),
        n as usize - windows.len() - unanswered
    );
    println!(
        "| removals | windows | median | p90 | p99 | max | time without entry |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n| {n} | {} | {} | {} | {} | {} | {:.2} % |",
        windows.len(),
        ms(pct(&windows, 0.5)),
        ms(pct(&windows, 0.9)),
        ms(pct(&windows, 0.99)),
        ms(windows.last().copied().unwrap_or_default()),
        missing_total.as_secs_f64() / observed.as_secs_f64() * 100.0
    );
    println!(
        "keeper: re-inserts {}, rewrite-loop warnings {}, last reported latency {:?}",
        status.reinserts(),
        status.rewrite_loop_warnings(),
        status.last_reinsert_latency()
    );
}
