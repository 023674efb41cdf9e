//! Ambient `inpod` redirect mode, measured on the real binaries (issue 9 "Numbers"). Every
//! namespace is this process's own (`mcni-*`, removed on exit); the agent runs in a private node
//! netns with every host path (including `--host-proc-dir` and `--netns-dir`) in a scratch dir.
//!
//! * `add [--pods 50]`: per pod, a fresh empty pod netns; the reference `bridge` plugin
//!   (+ `host-local`) exec'd with the CNI env (ADD, timed), then `meshcni` exec'd the same way
//!   (chained: the bridge's result as `prevResult`) for a non-ambient pod (pass-through, timed)
//!   and for the ambient pod (timed: the plugin hands the pod to the agent, which puts the rules
//!   in the pod, adds the probe-set entry and waits for the ztunnel stand-in's ZDS ack). Both
//!   plugins are exec'd directly into the node netns (`setns` before `exec`, no `nsenter`).
//!   The agent runs with `--log-level=debug`; its timestamps and the driver's step timings
//!   give the breakdown.
//! * `enroll [--pods 200]`: N running pods (each a netns with a veth `eth0` (peer in the same netns) holding its IP,
//!   linked from the agent's private `--netns-dir`) in a namespace that is not ambient; the
//!   label is flipped in the workloads file and the time until the stand-in holds all N is
//!   taken. Then the agent gets SIGTERM and a new one is started: the time until it is ready
//!   and the stand-in's new snapshot holds all N. Then the baseline on another N fresh netns:
//!   the same state with one exec per rule (see [`baseline`]).
//! * `rss [--pods 1000]`: N running pods enrolled by the label flip; agent `VmRSS`/`VmHWM`
//!   once all are acked and again after a settle time.
//!
//! `--agent-arg FLAG` (repeatable) appends a flag to the agent's command line, e.g.
//! `--agent-arg --ambient-ipv6=false`.
//!
//! Needs root, `/usr/lib/cni/{bridge,host-local}` (or `REF_PLUGINS`), iproute2, iptables,
//! ipset, and the release binaries next to this example (`scripts/bench-inpod.sh` builds them).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use meshcni_rules::inpod::{InpodConfig, PodOverrides, pod_restore, pod_routing, pod_rules};
use meshcni_rules::model::Family;
use meshcni_testkit::ambient_bench::{cpu_time, memory_kib};
use meshcni_testkit::stack::{
    AgentDirs, DATAPLANE_MODE, StackMode, agent_args_for, http_get_in, namespace_json, pod_json,
    pod_uid, write_pod_metadata, write_workloads,
};
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, Netns};
use serde_json::{Value, json};

const NODE: &str = "node1";
const WAIT: Duration = Duration::from_secs(600);

type R<T> = Result<T, String>;

/// `--agent-arg` values, appended to every agent's command line.
static EXTRA_AGENT_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

fn main() {
    if let Err(e) = run() {
        eprintln!("inpod_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> R<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        return Err(
            "usage: inpod_bench add|enroll|rss [--pods N] [--settle-seconds S] [--agent-arg FLAG]…"
                .into(),
        );
    }
    let cmd = args.remove(0);
    let mut pods = None;
    let mut settle = Duration::from_secs(5);
    let mut extra = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        if a == "--agent-arg" {
            extra.push(v);
            continue;
        }
        let n: u64 = v.parse().map_err(|e| format!("{a} {v}: {e}"))?;
        match a.as_str() {
            "--pods" => pods = Some(n as usize),
            "--settle-seconds" => settle = Duration::from_secs(n),
            _ => return Err(format!("unknown option {a}")),
        }
    }
    let _ = EXTRA_AGENT_ARGS.set(extra);
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    match cmd.as_str() {
        "add" => bench_add(pods.unwrap_or(50)),
        "enroll" => bench_enroll(pods.unwrap_or(200)),
        "rss" => bench_rss(pods.unwrap_or(1000), settle),
        other => Err(format!("unknown command {other} (add, enroll, rss)")),
    }
}

// ---- common ------------------------------------------------------------------------------

fn binaries() -> R<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/examples/<this> → target/<profile>/
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("no target dir above {}", exe.display()))?;
    let agent = dir.join("meshcni-agent");
    let plugin = dir.join("meshcni");
    for b in [&agent, &plugin] {
        if !b.is_file() {
            return Err(format!(
                "{} is missing: build it first (cargo build --release -p meshcni-agent -p meshcni-plugin)",
                b.display()
            ));
        }
    }
    Ok((agent, plugin))
}

fn ref_plugins() -> PathBuf {
    std::env::var_os("REF_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

/// The `meshcni-agent` binary in inpod mode in the node netns, with every path under `dirs`
/// (testkit's `agent_args_for`) and the given log level. SIGTERM + reap on drop.
struct AgentProc {
    child: Option<Child>,
    dirs: AgentDirs,
    node: PathBuf,
}

impl AgentProc {
    fn start(bin: &Path, node: &Path, dirs: &AgentDirs, level: &str) -> R<AgentProc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dirs.log)
            .map_err(|e| format!("open {}: {e}", dirs.log.display()))?;
        let args: Vec<String> = agent_args_for(dirs, StackMode::Inpod)
            .into_iter()
            .map(|a| {
                if a.starts_with("--log-level=") {
                    format!("--log-level={level}")
                } else {
                    a
                }
            })
            .collect();
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--", "nsenter"])
            .arg(format!("--net={}", node.display()))
            .arg("--")
            .arg(bin)
            .args(args)
            .args(EXTRA_AGENT_ARGS.get().into_iter().flatten())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NODE_NAME", NODE)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        Ok(AgentProc {
            child: Some(child),
            dirs: dirs.clone(),
            node: node.to_path_buf(),
        })
    }

    fn pid(&self) -> R<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| "agent not running".to_string())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.dirs.log).unwrap_or_default()
    }

    /// `/readyz` 200 (address from the newest `readiness=` log line) and the ambient config
    /// says ztunnel is ready in inpod mode.
    fn is_ready(&mut self) -> R<bool> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.child = None;
            return Err(format!("agent exited ({st}); log:\n{}", self.log()));
        }
        let log = self.log();
        let Some(addr) = log.lines().rev().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("readiness="))
                .map(|a| a.trim_matches('"').to_string())
        }) else {
            return Ok(false);
        };
        match http_get_in(&self.node, &addr, "/readyz") {
            Ok((200, _)) => {}
            _ => return Ok(false),
        }
        let cfg = std::fs::read_to_string(self.dirs.ambient_config()).unwrap_or_default();
        Ok(cfg == r#"{"ztunnelReady":true,"redirectMode":"inpod"}"#)
    }

    fn wait_ready(&mut self) -> R<()> {
        // Ready takes well under a second here; a minute means it never will (e.g. a flag
        // combination the lab cannot satisfy): fail with the log instead of waiting for WAIT.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.is_ready()? {
            if Instant::now() > deadline {
                return Err(format!("agent not ready; log:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn terminate(&mut self) -> R<()> {
        let Some(mut c) = self.child.take() else {
            return Err("agent not running".into());
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| format!("kill -TERM {pid}: {e}"))?;
        let st = c.wait().map_err(|e| format!("wait for the agent: {e}"))?;
        if !st.success() {
            return Err(format!("agent exited with {st} on SIGTERM"));
        }
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

fn namespaces(bulk_ambient: bool) -> Vec<Value> {
    let bulk: &[(&str, &str)] = if bulk_ambient {
        &[(DATAPLANE_MODE, "ambient")]
    } else {
        &[]
    };
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("bulk", bulk),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ]
}

fn standin(dirs: &AgentDirs) -> R<InpodZtunnelStandIn> {
    let mut cfg = InpodZtunnelConfig::new(&dirs.zds_socket);
    // Reconnect quickly after the agent restart (the stand-in's default backoff tops at 0.5 s;
    // ztunnel's own is not part of what is measured here).
    cfg.backoff_min = Duration::from_millis(5);
    cfg.backoff_max = Duration::from_millis(20);
    InpodZtunnelStandIn::start_with(cfg).map_err(|e| format!("stand-in: {e}"))
}

fn stats_ms(v: &[Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = ms.len();
    let med = ms[n.div_ceil(2) - 1];
    let p90 = ms[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
    (med, p90, ms[0])
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Run `cmd` with its network namespace switched to `netns` between fork and exec.
fn in_netns(cmd: &mut Command, netns: &std::fs::File) -> R<()> {
    let fd = netns
        .try_clone()
        .map_err(|e| format!("dup netns fd: {e}"))?;
    // SAFETY: the closure only makes the setns syscall (async-signal-safe, no allocation).
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

struct Exec {
    ok: bool,
    stdout: String,
    stderr: String,
    took: Duration,
    started: SystemTime,
}

fn exec_plugin(bin: &Path, node: &std::fs::File, env: &[(&str, String)], stdin: &str) -> R<Exec> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    in_netns(&mut cmd, node)?;
    let started = SystemTime::now();
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())
            .map_err(|e| format!("stdin of {}: {e}", bin.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {}: {e}", bin.display()))?;
    Ok(Exec {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
        started,
    })
}

fn open(p: &Path) -> R<std::fs::File> {
    std::fs::File::open(p).map_err(|e| format!("open {}: {e}", p.display()))
}

// ---- 1. CNI ADD ----------------------------------------------------------------------------

fn bench_add(n: usize) -> R<()> {
    let (agent_bin, plugin) = binaries()?;
    let refp = ref_plugins();
    for p in ["bridge", "host-local"] {
        if !refp.join(p).is_file() {
            return Err(format!("{} missing", refp.join(p).display()));
        }
    }
    let node = Netns::new("iadd-node").map_err(|e| e.to_string())?;
    node.sysctl("net.ipv4.ip_forward", "1")
        .map_err(|e| e.to_string())?;
    let node_fd = open(node.path())?;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dirs = AgentDirs::create(tmp.path(), &plugin)?;
    let names: Vec<String> = (0..n).map(|i| format!("add-{i:04}")).collect();
    let nss = namespaces(false);
    let mut pods: Vec<Value> = names
        .iter()
        .map(|nm| pod_json("mesh", nm, NODE, None, &[], &[]))
        .collect();
    let plain = pod_json("plain", "plain", NODE, None, &[], &[]);
    pods.push(plain.clone());
    write_workloads(&dirs.workloads, &nss, &pods)?;
    for p in &pods {
        let ns = if p["metadata"]["namespace"] == "mesh" {
            &nss[0]
        } else {
            &nss[2]
        };
        write_pod_metadata(&dirs.meta, p, ns)?;
    }
    let mut agent = AgentProc::start(&agent_bin, node.path(), &dirs, "debug")?;
    let zt = standin(&dirs)?;
    agent.wait_ready()?;

    let ipam = tmp.path().join("ipam");
    let bridge_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
        "bridge": "mcnib0", "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "dataDir": ipam,
                 "ranges": [[{"subnet": "10.251.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}})
    .to_string();
    let mesh_conf = |prev: &Value| {
        json!({"cniVersion": "1.0.0", "name": "bench", "type": "meshcni",
            "ambient_enabled": true, "cni_agent_run_dir": dirs.run,
            "pod_metadata_dir": dirs.meta, "plugin_log_level": "warn",
            "kubernetes": {"exclude_namespaces": ["kube-system", "istio-system"]},
            "prevResult": prev})
        .to_string()
    };
    let env = |cmd: &str, ns: &Path, pod_ns: &str, pod: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", format!("ctr-{pod}")),
            ("CNI_NETNS", ns.display().to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", refp.display().to_string()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_ns};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=ctr-{pod};K8S_POD_UID={}",
                    pod_uid(pod)
                ),
            ),
        ]
    };
    let (mut t_bridge, mut t_plain, mut t_mesh) = (Vec::new(), Vec::new(), Vec::new());
    let mut starts: BTreeMap<String, (SystemTime, Duration)> = BTreeMap::new();
    let mut netns = Vec::new();
    let load_before = load();
    for name in &names {
        let pod_ns = Netns::new("iadd-pod").map_err(|e| e.to_string())?;
        let b = exec_plugin(
            &refp.join("bridge"),
            &node_fd,
            &env("ADD", pod_ns.path(), "mesh", name),
            &bridge_conf,
        )?;
        if !b.ok {
            return Err(format!("bridge ADD {name}: {} {}", b.stdout, b.stderr));
        }
        let prev: Value =
            serde_json::from_str(&b.stdout).map_err(|e| format!("bridge result: {e}"))?;
        let p = exec_plugin(
            &plugin,
            &node_fd,
            &env("ADD", pod_ns.path(), "plain", "plain"),
            &mesh_conf(&prev),
        )?;
        if !p.ok {
            return Err(format!(
                "meshcni ADD (plain) {name}: {} {}",
                p.stdout, p.stderr
            ));
        }
        let m = exec_plugin(
            &plugin,
            &node_fd,
            &env("ADD", pod_ns.path(), "mesh", name),
            &mesh_conf(&prev),
        )?;
        if !m.ok {
            return Err(format!(
                "meshcni ADD {name}: {} {}\nagent log:\n{}",
                m.stdout,
                m.stderr,
                agent.log()
            ));
        }
        if zt.workload(&pod_uid(name)).is_none() {
            return Err(format!(
                "{name}: ADD succeeded but the stand-in does not hold it"
            ));
        }
        t_bridge.push(b.took);
        t_plain.push(p.took);
        t_mesh.push(m.took);
        starts.insert(name.clone(), (m.started, m.took));
        netns.push(pod_ns);
    }
    let load_after = load();
    let rules = node
        .exec_ok("iptables-save", &[])
        .map_err(|e| e.to_string())?;
    if !rules.contains("istio-inpod-probes-v4") {
        return Err("no host-probe rule in the node netns".into());
    }
    let pod_rules_text = netns[0]
        .exec_ok("iptables-save", &[])
        .map_err(|e| e.to_string())?;
    if !pod_rules_text.contains("--to-ports 15001") {
        return Err(format!("no in-pod redirect: {pod_rules_text}"));
    }
    let breakdown = breakdown(&agent.log(), &starts)?;
    drop(zt);
    drop(agent);

    let (bm, bp, bmin) = stats_ms(&t_bridge);
    let (pm, pp, pmin) = stats_ms(&t_plain);
    let (mm, mp, mmin) = stats_ms(&t_mesh);
    println!("load average before/after: {load_before} / {load_after}; {n} pods");
    println!();
    println!(
        "| exec'd into the node netns, per pod | median ms | p90 ms | min ms | × bridge median |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!("| bridge + host-local ADD (reference) | {bm:.2} | {bp:.2} | {bmin:.2} | 1.00 |");
    println!(
        "| **meshcni ADD, ambient pod (inpod, incl. ZDS ack)** | **{mm:.2}** | **{mp:.2}** | {mmin:.2} | **{:.2}** |",
        mm / bm
    );
    println!(
        "| meshcni ADD, non-ambient pod (pass-through) | {pm:.2} | {pp:.2} | {pmin:.2} | {:.2} |",
        pm / bm
    );
    println!();
    println!("| step of the ambient ADD (from the agent's debug log) | median ms | p90 ms |");
    println!("| --- | ---: | ---: |");
    for (label, v) in &breakdown {
        let (m, p, _) = stats_ms(v);
        println!("| {label} | {m:.2} | {p:.2} |");
    }
    Ok(())
}

/// Seconds since the epoch of an RFC 3339 timestamp `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
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
    // days from civil (Howard Hinnant)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + mi * 60) as f64 + sec)
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

type Breakdown = Vec<(&'static str, Vec<Duration>)>;

/// Per pod, from the agent's log: plugin start → "CNI ADD received" (plugin start-up, pod
/// lookup, HTTP hand-off, server → loop), → "pod netns opened" minus the open (the loop pass up
/// to the driver), the driver's own steps (open, rules, probe set, ZDS round trip; the state
/// file is written after the reply), "pod handed to ztunnel" → "applied" (loop bookkeeping), and "applied" → plugin exit
/// (the reply back through the server and the plugin's exit).
fn breakdown(log: &str, starts: &BTreeMap<String, (SystemTime, Duration)>) -> R<Breakdown> {
    let labels = [
        "plugin start → agent loop has the request (exec, pod lookup, HTTP hand-off)",
        "loop pass until the driver starts (resolve, plan)",
        "driver: open the netns",
        "driver: in-pod rules (iptables-nft: nf_tables netlink; else restore)",
        "driver: host-probe ipset entry (netlink)",
        "driver: ZDS AddWorkload → ack (stand-in)",
        "driver done → loop logs `applied`",
        "`applied` → plugin exit (reply, plugin exit)",
        "total (plugin exec wall time)",
    ];
    let mut out: Breakdown = labels.iter().map(|l| (*l, Vec::new())).collect();
    let d = |s: f64| Duration::from_secs_f64(s.max(0.0));
    for (name, (start, took)) in starts {
        let start = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs_f64();
        let key = format!("/{name} ");
        let find = |msg: &str| -> Option<&str> {
            log.lines().find(|l| l.contains(&key) && l.contains(msg))
        };
        let ts = |l: &str| l.split_whitespace().next().and_then(parse_ts);
        let (Some(recv), Some(opened), Some(handed), Some(applied)) = (
            find("CNI ADD received"),
            find("pod netns opened"),
            find("pod handed to ztunnel"),
            find("applied"),
        ) else {
            return Err(format!("{name}: missing log lines"));
        };
        let (Some(t_recv), Some(t_open), Some(t_hand), Some(t_app)) =
            (ts(recv), ts(opened), ts(handed), ts(applied))
        else {
            return Err(format!("{name}: unparsable timestamps"));
        };
        let us = |l: &str, k: &str| field(l, k).unwrap_or(0.0) / 1e6;
        let open_s = us(opened, "open_us");
        let end = start + took.as_secs_f64();
        let vals = [
            t_recv - start,
            t_open - open_s - t_recv,
            open_s,
            us(handed, "rules_us"),
            us(handed, "probe_us"),
            us(handed, "zds_us"),
            t_app - t_hand,
            end - t_app,
            took.as_secs_f64(),
        ];
        for (i, v) in vals.iter().enumerate() {
            out[i].1.push(d(*v));
        }
    }
    Ok(out)
}

/// The driver's per-pod step timings (debug lines `pod netns opened` / `pod handed to
/// ztunnel`).
fn driver_steps(log: &str) -> Breakdown {
    let mut out: Breakdown = vec![
        ("netns: open / discover (netns-dir scan, by IP)", Vec::new()),
        ("in-pod rules", Vec::new()),
        ("host-probe ipset entry", Vec::new()),
        ("ZDS AddWorkload → ack", Vec::new()),
        (
            "state file write (once per pass, after the pass's ADD replies)",
            Vec::new(),
        ),
    ];
    let d = |us: f64| Duration::from_secs_f64(us / 1e6);
    for l in log.lines() {
        if l.contains("pod netns opened") {
            if let Some(v) = field(l, "open_us") {
                out[0].1.push(d(v));
            }
        } else if l.contains("pod handed to ztunnel") {
            for (i, k) in ["rules_us", "probe_us", "zds_us"].iter().enumerate() {
                if let Some(v) = field(l, k) {
                    out[i + 1].1.push(d(v));
                }
            }
        } else if l.contains("state file written")
            && let Some(v) = field(l, "state_us")
        {
            out[4].1.push(d(v));
        }
    }
    out
}

// ---- 2. enroll by label flip, restart; baseline --------------------------------------------

/// A running pod: its own netns with a veth `eth0` (peer in the same netns) holding the IP (what the driver needs:
/// the netns, found by the IP; the stand-in listens in it).
struct BulkPod {
    name: String,
    ip: Ipv4Addr,
    ns: Netns,
}

fn bulk_ip(set: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200 + set, (i / 250) as u8, 1 + (i % 250) as u8)
}

fn make_pods(set: u8, n: usize, prefix: &str, link_dir: Option<&Path>) -> R<Vec<BulkPod>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let ns = Netns::new("ipod").map_err(|e| e.to_string())?;
        let ip = bulk_ip(set, i);
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
        if let Some(dir) = link_dir {
            std::os::unix::fs::symlink(ns.path(), dir.join(&name))
                .map_err(|e| format!("symlink in {}: {e}", dir.display()))?;
        }
        v.push(BulkPod { name, ip, ns });
    }
    Ok(v)
}

fn bulk_workloads(pods: &[BulkPod]) -> Vec<Value> {
    pods.iter()
        .map(|p| pod_json("bulk", &p.name, NODE, Some(p.ip), &[], &[]))
        .collect()
}

fn wait_held(zt: &InpodZtunnelStandIn, n: usize, what: &str, agent: &AgentProc) -> R<()> {
    let deadline = Instant::now() + WAIT;
    while zt.workloads().len() < n {
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: the stand-in holds {} of {n}; agent log tail:\n{}",
                zt.workloads().len(),
                tail(&agent.log(), 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

struct Flip {
    wall: Duration,
    cpu: Duration,
    rss: u64,
    hwm: u64,
}

/// Agent up with N running non-ambient pods, stand-in connected; then the label flip.
fn flip(
    agent_bin: &Path,
    node: &Netns,
    dirs: &AgentDirs,
    pods: &[BulkPod],
) -> R<(AgentProc, InpodZtunnelStandIn, Flip)> {
    write_workloads(&dirs.workloads, &namespaces(false), &bulk_workloads(pods))?;
    let mut agent = AgentProc::start(agent_bin, node.path(), dirs, "debug")?;
    let zt = standin(dirs)?;
    agent.wait_ready()?;
    // Let the agent settle on the non-ambient set before the flip.
    std::thread::sleep(Duration::from_millis(500));
    if !zt.workloads().is_empty() {
        return Err("pods enrolled before the label flip".into());
    }
    let pid = agent.pid()?;
    let cpu0 = cpu_time(pid)?;
    let t = Instant::now();
    write_workloads(&dirs.workloads, &namespaces(true), &bulk_workloads(pods))?;
    wait_held(&zt, pods.len(), "label flip", &agent)?;
    let wall = t.elapsed();
    let cpu = cpu_time(pid)? - cpu0;
    let (rss, hwm) = memory_kib(pid)?;
    Ok((
        agent,
        zt,
        Flip {
            wall,
            cpu,
            rss,
            hwm,
        },
    ))
}

fn bench_enroll(n: usize) -> R<()> {
    let (agent_bin, plugin) = binaries()?;
    let node = Netns::new("ienr-node").map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dirs = AgentDirs::create(tmp.path(), &plugin)?;
    let t = Instant::now();
    let pods = make_pods(1, n, "bulk", Some(&dirs.netns_dir))?;
    eprintln!("created {n} pod netns in {:?}", t.elapsed());
    let load_before = load();
    let (mut agent, zt, f) = flip(&agent_bin, &node, &dirs, &pods)?;
    // Rules really are in every pod? Check one, and count the rules there.
    let before = pods[0]
        .ns
        .exec_ok("iptables-save", &[])
        .map_err(|e| e.to_string())?;
    if !before.contains("--to-ports 15001") {
        return Err(format!("no in-pod rules in {}: {before}", pods[0].name));
    }

    let steps = driver_steps(&agent.log());

    // Restart: SIGTERM, then a new agent until ready + a complete snapshot of all N.
    let connects = zt.connects();
    agent.terminate()?;
    let t = Instant::now();
    let spawned = SystemTime::now();
    let mut agent2 = AgentProc::start(&agent_bin, node.path(), &dirs, "debug")?;
    let mut ready_at = None;
    let mut snap_at = None;
    let deadline = Instant::now() + WAIT;
    while ready_at.is_none() || snap_at.is_none() {
        if ready_at.is_none() && agent2.is_ready()? {
            ready_at = Some(t.elapsed());
        }
        if snap_at.is_none()
            && zt.connects() > connects
            && zt.snapshot_complete()
            && zt.workloads().len() == n
        {
            snap_at = Some(t.elapsed());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "restart: not recovered; log:\n{}",
                tail(&agent2.log(), 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let restart_wall = t.elapsed();
    let log = agent2.log();
    let adopted = log
        .lines()
        .rev()
        .find(|l| l.contains("inpod mode adopted its enrolled pods"))
        .and_then(|l| field(l, "adopted"))
        .unwrap_or(-1.0) as i64;
    if adopted != n as i64 {
        return Err(format!("restart adopted {adopted} pods, not {n}"));
    }
    let after = pods[0]
        .ns
        .exec_ok("iptables-save", &[])
        .map_err(|e| e.to_string())?;
    if meshcni_testkit::stack::normalize_save(&after)
        != meshcni_testkit::stack::normalize_save(&before)
    {
        return Err(format!(
            "rules changed across the restart:\n{before}\n---\n{after}"
        ));
    }
    let (rss, hwm) = memory_kib(agent2.pid()?)?;
    let since_spawn = |msg: &str| -> Option<f64> {
        // The log file is shared with the first agent: the newest line is the new agent's.
        let l = log.lines().rev().find(|l| l.contains(msg))?;
        let t = l.split_whitespace().next().and_then(parse_ts)?;
        let s0 = spawned
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        Some((t - s0) * 1e3)
    };
    let marks: Vec<(&str, Option<f64>)> = [
        "ambient enrollment loop started",
        "found the netns of an enrolled pod again",
        "inpod mode adopted its enrolled pods",
        "ZDS server listening",
        "ztunnel received its snapshot",
    ]
    .iter()
    .map(|m| (*m, since_spawn(m)))
    .collect();
    drop(agent2);
    drop(zt);
    let load_mid = load();

    // Baseline on N fresh pods.
    let base_pods = make_pods(2, n, "base", None)?;
    let b = baseline(tmp.path(), &node, &base_pods)?;
    let load_after = load();

    let (ready_at, snap_at) = (ready_at.unwrap_or_default(), snap_at.unwrap_or_default());
    println!(
        "load average before / after meshcni / after baseline: {load_before} / {load_mid} / {load_after}; {n} pods"
    );
    println!();
    println!(
        "| {n} running pods | meshcni (agent) | baseline (one exec per rule) | baseline ÷ meshcni |"
    );
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| label flip → all {n} acked by the stand-in | {:.0} ms ({:.2} ms/pod; agent CPU {:.0} ms) | {:.0} ms ({:.2} ms/pod) | {:.1}× |",
        ms(f.wall),
        ms(f.wall) / n as f64,
        ms(f.cpu),
        ms(b.enroll),
        ms(b.enroll) / n as f64,
        ms(b.enroll) / ms(f.wall)
    );
    println!(
        "| restart: new agent → ready and the stand-in's snapshot holds all {n} | {:.0} ms (ready {:.0} ms, snapshot complete {:.0} ms) | {:.0} ms (verify {:.0} ms, snapshot {:.0} ms) | {:.1}× |",
        ms(restart_wall),
        ms(ready_at),
        ms(snap_at),
        ms(b.restart),
        ms(b.verify),
        ms(b.snapshot),
        ms(b.restart) / ms(restart_wall)
    );
    println!(
        "| processes exec'd per pod (enroll) | one `*-restore` per IP family | {} | |",
        b.execs_per_pod
    );
    println!();
    println!(
        "| label flip, per pod, in the driver (agent debug log) | median ms | p90 ms | sum over {n} pods ms |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (label, v) in &steps {
        let (m, p, _) = stats_ms(v);
        let sum: f64 = v.iter().map(|d| ms(*d)).sum();
        println!("| {label} | {m:.2} | {p:.2} | {sum:.0} |");
    }
    println!();
    println!("restarted agent's log, ms after its spawn (newest line of each kind):");
    for (m, t) in &marks {
        match t {
            Some(t) => println!("- {t:.0} ms: {m}"),
            None => println!("- (not logged): {m}"),
        }
    }
    println!();
    println!(
        "agent after the flip: VmRSS {} / VmHWM {}; restarted agent with {n} pods: VmRSS {} / VmHWM {}",
        mib(f.rss),
        mib(f.hwm),
        mib(rss),
        mib(hwm)
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Baseline {
    enroll: Duration,
    verify: Duration,
    snapshot: Duration,
    restart: Duration,
    execs_per_pod: usize,
}

/// `iptables-restore` text → one argv per line: the `-N` chains and `-A`/`-I` rules as written
/// (or `-C` per rule with `check`), each with `-t <table>`.
fn per_rule_argv(text: &str, check: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut table = String::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(chain) = line.strip_prefix("-N ") {
            if !check {
                out.push(vec![
                    "-t".into(),
                    table.clone(),
                    "-N".into(),
                    chain.trim().into(),
                ]);
            }
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            let mut argv = vec!["-t".to_string(), table.clone()];
            let mut words = shell_words(line);
            if check {
                words[0] = "-C".into();
            }
            argv.extend(words);
            out.push(argv);
        }
    }
    out
}

/// Split on whitespace, honouring double quotes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

fn run_ok(program: &str, args: &[String]) -> R<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("spawn {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The baseline: what the agent does per pod, done the way the reference's node-level mode
/// programs rules (one process per rule, G2), on the same kind of pods, with the same ZDS
/// server code and the same stand-in:
///
/// * enroll, per pod: `ip netns exec <pod> iptables|ip6tables -t <table> -N <chain>` per custom
///   chain and `… -A <rule>` per rule of the product-default in-pod rule set (the generator's
///   own text, v4 and v6), `ip netns exec <pod> ip [-6] rule add fwmark 0x111/0xfff pref 32764
///   lookup 100` and `ip [-6] route add local default dev lo table 100`, `ip netns exec <node>
///   ipset add istio-inpod-probes-v4 <ip>`, then `AddWorkload` with the netns fd over ZDS,
///   waiting for the ack;
/// * restart, per pod: `ip netns exec <pod> iptables|ip6tables -t <table> -C <rule>` per rule
///   (verify), then a new ZDS server with every pod registered and the stand-in reconnected
///   until its snapshot is complete.
fn baseline(tmp: &Path, node: &Netns, pods: &[BulkPod]) -> R<Baseline> {
    let cfg = InpodConfig::default();
    let rs = pod_rules(&cfg, &PodOverrides::default());
    let v4 = pod_restore(&rs, Family::V4);
    let v6 = pod_restore(&rs, Family::V6);
    let routing = pod_routing(&cfg);
    let mut add: Vec<(String, Vec<String>)> = Vec::new();
    let mut check: Vec<(String, Vec<String>)> = Vec::new();
    for (bin, text) in [("iptables", &v4), ("ip6tables", &v6)] {
        add.extend(
            per_rule_argv(text, false)
                .into_iter()
                .map(|a| (bin.to_string(), a)),
        );
        check.extend(
            per_rule_argv(text, true)
                .into_iter()
                .map(|a| (bin.to_string(), a)),
        );
    }
    let mark = format!("{:#x}/{:#x}", routing.fwmark, routing.mask);
    let fams: &[&str] = if routing.ipv6 { &["-4", "-6"] } else { &["-4"] };
    for fam in fams {
        add.push((
            "ip".into(),
            [
                fam,
                "rule",
                "add",
                "fwmark",
                &mark,
                "pref",
                &routing.priority.to_string(),
                "lookup",
                &routing.table.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ));
        add.push((
            "ip".into(),
            [
                fam,
                "route",
                "add",
                "local",
                "default",
                "dev",
                "lo",
                "table",
                &routing.table.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ));
    }
    // The node side, once (not timed): the probe set and its SNAT rule.
    let node_exec = |args: &[&str]| -> R<()> {
        let mut a: Vec<String> = vec!["netns".into(), "exec".into(), node.name().into()];
        a.extend(args.iter().map(|s| s.to_string()));
        run_ok("ip", &a)
    };
    node_exec(&["ipset", "create", "base-probes-v4", "hash:ip"])?;

    let sock = tmp.join("base-zds/ztunnel.sock");
    let noop = Box::new(|_: meshcni_zds::ZdsEvent| {});
    let opts = meshcni_zds::ZdsOptions::default();
    let server = meshcni_zds::ZdsServer::start(&sock, opts.clone(), noop)
        .map_err(|e| format!("baseline ZDS server: {e}"))?;
    let mut cfgz = InpodZtunnelConfig::new(&sock);
    cfgz.backoff_min = Duration::from_millis(5);
    cfgz.backoff_max = Duration::from_millis(20);
    let zt = InpodZtunnelStandIn::start_with(cfgz).map_err(|e| format!("stand-in: {e}"))?;
    let deadline = Instant::now() + WAIT;
    while server.ready_connections() == 0 {
        if Instant::now() > deadline {
            return Err("baseline stand-in never connected".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let info = |p: &BulkPod| meshcni_zds::WorkloadInfo {
        name: p.name.clone(),
        namespace: "bulk".into(),
        service_account: "default".into(),
    };
    let in_pod = |p: &BulkPod, prog: &str, args: &[String]| -> R<()> {
        let mut a: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            p.ns.name().into(),
            prog.into(),
        ];
        a.extend(args.iter().cloned());
        run_ok("ip", &a)
    };
    let mut files = Vec::new();
    let t = Instant::now();
    for p in pods {
        for (prog, args) in &add {
            in_pod(p, prog, args)?;
        }
        node_exec(&["ipset", "add", "base-probes-v4", &p.ip.to_string()])?;
        let f = open(p.ns.path())?;
        server
            .add(&pod_uid(&p.name), info(p), f.as_fd())
            .map_err(|e| format!("baseline ZDS add {}: {e}", p.name))?;
        files.push(f);
    }
    let enroll = t.elapsed();
    if zt.workloads().len() != pods.len() {
        return Err("baseline: the stand-in does not hold every pod".into());
    }
    let connects = zt.connects();
    drop(server);
    let t = Instant::now();
    for p in pods {
        for (prog, args) in &check {
            in_pod(p, prog, args)?;
        }
    }
    let verify = t.elapsed();
    let noop = Box::new(|_: meshcni_zds::ZdsEvent| {});
    let server = meshcni_zds::ZdsServer::start(&sock, opts, noop)
        .map_err(|e| format!("baseline ZDS server (restart): {e}"))?;
    for (p, f) in pods.iter().zip(&files) {
        let fd = f.try_clone().map_err(|e| format!("dup: {e}"))?;
        server.register(&pod_uid(&p.name), info(p), Some(fd.into()));
    }
    let deadline = Instant::now() + WAIT;
    while !(zt.connects() > connects
        && zt.snapshot_complete()
        && zt.workloads().len() == pods.len())
    {
        if Instant::now() > deadline {
            return Err("baseline: snapshot never completed".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let restart = t.elapsed();
    let snapshot = restart - verify;
    drop(server);
    drop(zt);
    Ok(Baseline {
        enroll,
        verify,
        snapshot,
        restart,
        execs_per_pod: add.len() + 1,
    })
}

// ---- 3. RSS at 1,000 pods ------------------------------------------------------------------

fn bench_rss(n: usize, settle: Duration) -> R<()> {
    let (agent_bin, plugin) = binaries()?;
    let node = Netns::new("irss-node").map_err(|e| e.to_string())?;
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dirs = AgentDirs::create(tmp.path(), &plugin)?;
    let t = Instant::now();
    let pods = make_pods(1, n, "bulk", Some(&dirs.netns_dir))?;
    eprintln!("created {n} pod netns in {:?}", t.elapsed());
    let load_before = load();
    let (agent, zt, f) = flip(&agent_bin, &node, &dirs, &pods)?;
    let pid = agent.pid()?;
    let (rss0, _) = memory_kib(pid)?;
    let threads0 = threads(pid);
    std::thread::sleep(settle);
    let (rss1, hwm1) = memory_kib(pid)?;
    let held = zt.workloads().len();
    println!(
        "load average before / after: {load_before} / {}; {n} pods",
        load()
    );
    println!();
    println!("| {n} enrolled pods (label flip) | value |");
    println!("| --- | ---: |");
    println!(
        "| enroll wall (flip → all acked) | {:.0} ms ({:.2} ms/pod) |",
        ms(f.wall),
        ms(f.wall) / n as f64
    );
    println!("| agent CPU while enrolling | {:.0} ms |", ms(f.cpu));
    println!("| VmRSS right after | {} |", mib(rss0));
    println!("| VmRSS after {} s | {} |", settle.as_secs(), mib(rss1));
    println!("| peak (VmHWM) | {} |", mib(hwm1.max(f.hwm)));
    println!("| threads | {threads0} |");
    println!("| pods held by the stand-in | {held} |");
    Ok(())
}

fn threads(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_default()
}
