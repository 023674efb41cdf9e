//! Idle cost of the workloads-file source (issue 8 item 16): CPU time the process spends over
//! a quiet period while a `FileSource` watches a file of N pods, and how often it parsed.
//!
//! `cargo run --release -p meshcni-agent --example file_source_idle -- [pods] [seconds]`
//! (defaults 1000 pods, 5 s). No root needed.

use std::time::Duration;

use meshcni_agent::workloads::WorkloadMetrics;
use meshcni_agent::workloads::file::{FileSource, FileSourceOptions};

/// utime + stime of this process, in ms (clock ticks of 10 ms).
fn cpu_ms() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/self/stat").map_err(|e| e.to_string())?;
    let after = s.rsplit(')').next().ok_or("no ) in /proc/self/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64, String> {
        f.get(i)
            .ok_or("short /proc/self/stat")?
            .parse::<u64>()
            .map_err(|e| e.to_string())
    };
    Ok((tick(11)? + tick(12)?) * 10)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let pods: usize = args
        .next()
        .map_or(Ok(1000), |a| a.parse())
        .map_err(|e| format!("pods: {e}"))?;
    let secs: u64 = args
        .next()
        .map_or(Ok(5), |a| a.parse())
        .map_err(|e| format!("seconds: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("workloads.json");
    let list: Vec<serde_json::Value> = (0..pods)
        .map(|i| {
            serde_json::json!({
                "metadata": {"name": format!("p{i}"), "namespace": "demo", "uid": format!("uid-{i}"),
                             "labels": {"app": "x"}, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"nodeName": "node-1"},
                "status": {"phase": "Running",
                           "podIP": format!("10.{}.{}.{}", 1 + i / 62500, (i / 250) % 250, i % 250 + 1),
                           "conditions": [{"type": "Ready", "status": "True"}]}
            })
        })
        .collect();
    let text = serde_json::json!({"namespaces": [{"metadata": {"name": "demo"}}], "pods": list})
        .to_string();
    std::fs::write(&file, &text).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let metrics = WorkloadMetrics::default();
    let src = FileSource::spawn_with(
        file,
        "node-1".into(),
        FileSourceOptions {
            resync: Duration::from_secs(10),
            metrics: metrics.clone(),
            ..FileSourceOptions::default()
        },
        tx,
    );
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|e| format!("no first snapshot: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let (c0, p0) = (cpu_ms()?, metrics.file_parses.get());
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, p1) = (cpu_ms()?, metrics.file_parses.get());
    src.stop();
    println!(
        "pods: {pods} (file {} bytes), idle {secs} s: cpu {} ms = {:.1} %, parses {}",
        text.len(),
        c1 - c0,
        (c1 - c0) as f64 / (secs as f64 * 10.0),
        p1 - p0
    );
    Ok(())
}
