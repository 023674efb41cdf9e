//! The repair controller (issue 12 item 1, "Numbers"): time from "pod started uncaptured" to
//! "pod captured" by the real agent (`--repair-enabled`, inpod mode, in a private node netns,
//! workloads from a file, the in-pod ztunnel stand-in connected). Every namespace is this
//! process's own (`mcni-*`, removed on exit).
//!
//! Three rounds of N pods each (each pod: its own netns with a veth `eth0` holding its IP,
//! linked from the agent's private `--netns-dir`):
//! 1. **sidecar**: N sidecar-injected pods that started without the plugin (no rules) appear
//!    in the workloads file at T0 (what the API watch brings when such pods start);
//! 2. **ambient, started uncaptured**: N pods in an ambient namespace appear at T0 (no CNI ADD
//!    ever ran for them);
//! 3. **ambient, drifted**: the in-pod rules of those N enrolled pods are flushed by a third
//!    party at T0 (no event announces it: found by the periodic full check,
//!    `--repair-resync-seconds`).
//!
//! Per pod: T0 → captured (sidecar and drift: the agent's "pod captured in place" log line,
//! whose timestamp is after the doctor's verdict "captured"; ambient round 2: the ztunnel
//! stand-in's ack of the pod, which comes after the in-pod rules), and, for the pods the
//! repair controller itself saw uncaptured, its own detect → captured time
//! (`detect_to_captured_ms`, also the `meshcni_repair_duration_seconds` histogram).
//!
//! `repair_bench [--pods 50] [--resync-seconds 1]`. Needs root, iproute2, iptables, and the
//! binaries next to this example (`scripts/bench-repair.sh` builds them).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshcni_testkit::stack::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, namespace_json, pod_json, pod_uid, write_workloads,
};
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, Netns};
use serde_json::{Value, json};

const NODE: &str = "node1";
const WAIT: Duration = Duration::from_secs(300);

type R<T> = Result<T, String>;

fn main() {
    if let Err(e) = run() {
        eprintln!("repair_bench: {e}");
        std::process::exit(1);
    }
}

fn binaries() -> R<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("no target dir above {}", exe.display()))?;
    let agent = dir.join("meshcni-agent");
    let plugin = dir.join("meshcni");
    for b in [&agent, &plugin] {
        if !b.is_file() {
            return Err(format!(
                "{} is missing: build it first (scripts/bench-repair.sh)",
                b.display()
            ));
        }
    }
    Ok((agent, plugin))
}

struct Pod {
    name: String,
    ip: Ipv4Addr,
    ns: Netns,
}

fn make_pods(set: u8, n: usize, prefix: &str, link_dir: &Path) -> R<Vec<Pod>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let ns = Netns::new("rbpod").map_err(|e| e.to_string())?;
        let ip = Ipv4Addr::new(10, 210 + set, (i / 250) as u8, 1 + (i % 250) as u8);
        let batch = format!(
            "link add eth0 type veth peer name peer0\naddr add {ip}/32 dev eth0\nlink set peer0 up\nlink set eth0 up\n"
        );
        let mut c = Command::new("ip")
            .args(["-n", ns.name(), "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn ip -batch: {e}"))?;
        if let Some(mut i) = c.stdin.take() {
            i.write_all(batch.as_bytes())
                .map_err(|e| format!("ip -batch stdin: {e}"))?;
        }
        let out = c
            .wait_with_output()
            .map_err(|e| format!("ip -batch: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip -n {} -batch: {}",
                ns.name(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let name = format!("{prefix}-{i:04}");
        std::os::unix::fs::symlink(ns.path(), link_dir.join(&name))
            .map_err(|e| format!("symlink in {}: {e}", link_dir.display()))?;
        v.push(Pod { name, ip, ns });
    }
    Ok(v)
}

fn sidecar_json(p: &Pod) -> Value {
    let mut v = pod_json(
        "side",
        &p.name,
        NODE,
        Some(p.ip),
        &[],
        &[(
            "sidecar.istio.io/status",
            r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#,
        )],
    );
    if let Some(c) = v["spec"]["containers"].as_array_mut() {
        c.push(json!({"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]}));
    }
    v
}

fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("side", &[]),
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
    ]
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp (the agent's log).
fn parse_ts(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

/// "pod captured in place" lines of `ns/` pods after log offset `from`:
/// `namespace/name → (log time, detect_to_captured_ms)`.
fn captured_lines(log: &str, from: usize, ns: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    for l in log.get(from..).unwrap_or("").lines() {
        if !l.contains("repair: pod captured in place") {
            continue;
        }
        let Some(pod) = l
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pod="))
            .filter(|p| p.starts_with(&format!("{ns}/")))
        else {
            continue;
        };
        let ts = l.split_whitespace().next().and_then(parse_ts);
        let ms = l
            .rsplit_once(" detect_to_captured_ms=")
            .and_then(|(_, v)| v.split_whitespace().next()?.parse::<f64>().ok());
        if let (Some(ts), Some(ms)) = (ts, ms) {
            out.entry(pod.to_string()).or_insert((ts, ms));
        }
    }
    out
}

fn stats(mut v: Vec<f64>) -> (usize, f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (0, f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let p90 = v[((n * 9).div_ceil(10)).saturating_sub(1)];
    (n, median, p90, v[n - 1])
}

fn row(what: &str, v: Vec<f64>) {
    let (n, med, p90, max) = stats(v);
    println!("| {what} | {n} | {med:.1} | {p90:.1} | {max:.1} |");
}

fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) -> R<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            return Err(format!(
                "{what}: not done within {WAIT:?}; log tail:\n{}",
                tail.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn run() -> R<()> {
    let mut n = 50usize;
    let mut resync = 1u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--pods" => n = v.parse().map_err(|e| format!("--pods {v}: {e}"))?,
            "--resync-seconds" => {
                resync = v
                    .parse()
                    .map_err(|e| format!("--resync-seconds {v}: {e}"))?
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let (agent_bin, plugin) = binaries()?;
    let node = Netns::new("rbnode").map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dirs = AgentDirs::create(tmp.path(), &plugin)?;
    let side = make_pods(1, n, "side", &dirs.netns_dir)?;
    let amb = make_pods(2, n, "amb", &dirs.netns_dir)?;
    write_workloads(&dirs.workloads, &namespaces(), &[])?;
    let resync_s = resync.to_string();
    let mut agent = Agent::start_mode(
        &agent_bin,
        node.path(),
        NODE,
        &dirs,
        StackMode::Inpod,
        &[
            ("REPAIR_ENABLED", "true"),
            ("REPAIR_RESYNC_SECONDS", &resync_s),
        ],
    )?;
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&dirs.zds_socket))
        .map_err(|e| e.to_string())?;
    agent.wait_ready(Duration::from_secs(60))?;
    println!(
        "{n} pods per round, agent `--repair-enabled --repair-resync-seconds {resync}`; times in ms from T0.\n"
    );
    println!("| round | pods | median | p90 | max |");
    println!("|---|---:|---:|---:|---:|");

    // 1. Sidecar pods that started without the plugin.
    let from = agent.log().len();
    let sidecars: Vec<Value> = side.iter().map(sidecar_json).collect();
    let t0 = epoch(SystemTime::now());
    write_workloads(&dirs.workloads, &namespaces(), &sidecars)?;
    wait_until("sidecar round", &agent, || {
        captured_lines(&agent.log(), from, "side").len() == n
    })?;
    let got = captured_lines(&agent.log(), from, "side");
    row(
        "sidecar, started uncaptured: T0 (pod in the workload source) → captured",
        got.values().map(|(ts, _)| (ts - t0) * 1e3).collect(),
    );
    row(
        "sidecar: repair's detect → captured",
        got.values().map(|(_, ms)| *ms).collect(),
    );
    for p in &side {
        let save =
            p.ns.exec_ok("iptables-save", &[])
                .map_err(|e| e.to_string())?;
        if !save.contains("ISTIO_OUTPUT") {
            return Err(format!("{}: no capture rules after the repair", p.name));
        }
    }

    // 2. Ambient pods that started uncaptured (no CNI ADD).
    let from = agent.log().len();
    let mut all = sidecars.clone();
    all.extend(
        amb.iter()
            .map(|p| pod_json("mesh", &p.name, NODE, Some(p.ip), &[], &[])),
    );
    let uids: BTreeMap<String, String> = amb
        .iter()
        .map(|p| (pod_uid(&p.name), p.name.clone()))
        .collect();
    let mut acked: BTreeMap<String, f64> = BTreeMap::new();
    let t0 = epoch(SystemTime::now());
    write_workloads(&dirs.workloads, &namespaces(), &all)?;
    wait_until("ambient round", &agent, || {
        let now = epoch(SystemTime::now());
        for uid in zt.workloads().keys() {
            if uids.contains_key(uid) {
                acked.entry(uid.clone()).or_insert(now);
            }
        }
        acked.len() == n
    })?;
    row(
        "ambient, started uncaptured: T0 → acked by ztunnel (rules in place)",
        acked.values().map(|t| (t - t0) * 1e3).collect(),
    );
    // Let the repair controller's checks settle before the next round.
    std::thread::sleep(Duration::from_secs(resync + 1));
    let seen = captured_lines(&agent.log(), from, "mesh");
    println!(
        "| ambient, started uncaptured: of these, seen uncaptured by repair first | {} | {} | | |",
        seen.len(),
        if seen.is_empty() {
            "-".to_string()
        } else {
            let (_, med, _, _) = stats(seen.values().map(|(_, ms)| *ms).collect());
            format!("{med:.1} (detect → captured)")
        }
    );

    // 3. Ambient drift: every pod's in-pod rules flushed.
    let from = agent.log().len();
    let t0 = epoch(SystemTime::now());
    for p in &amb {
        for chain in ["ISTIO_OUTPUT", "ISTIO_PRERT"] {
            p.ns.exec_ok("iptables", &["-t", "nat", "-F", chain])
                .map_err(|e| e.to_string())?;
        }
    }
    let flushed = epoch(SystemTime::now());
    wait_until("ambient drift round", &agent, || {
        captured_lines(&agent.log(), from, "mesh").len() == n
    })?;
    let got = captured_lines(&agent.log(), from, "mesh");
    row(
        &format!(
            "ambient, rules flushed (flushing all took {:.0} ms): T0 → captured",
            (flushed - t0) * 1e3
        ),
        got.values().map(|(ts, _)| (ts - t0) * 1e3).collect(),
    );
    row(
        "ambient drift: repair's detect → captured",
        got.values().map(|(_, ms)| *ms).collect(),
    );
    for p in &amb {
        let save =
            p.ns.exec_ok("iptables-save", &[])
                .map_err(|e| e.to_string())?;
        if !save.contains("--to-ports 15001") {
            return Err(format!("{}: no in-pod rules after the repair", p.name));
        }
    }
    agent.terminate(Duration::from_secs(30))?;
    drop(zt);
    Ok(())
}
