//! Crash consistency of every mode (issue 12 item 4), judged by `meshcni-agent doctor`: the
//! real agent is SIGKILLed at random moments (seeded RNG, seed printed) in each mode —
//! sidecar-only, `iptables`, `inpod`, `ebpf` — during
//!
//! * **install + enrollment** of N ambient pods (a fresh node; N = 200 in the bench run),
//! * a **workload change** of N/4 pods (half leave the mesh, as many join) on a running agent,
//! * **uninstall** (marker + SIGTERM),
//!
//! and restarted. After each restart `doctor --json` must turn green (its node checks catch
//! every duplicated or leaked rule, set member, route, link, map entry and state file of the
//! mode, its pod rows every pod that should be captured and is not); the time to green is the
//! convergence time. After a killed uninstall, `meshcni-agent uninstall` (what an operator
//! runs) must leave the node netns, the ztunnel netns, sampled pod netns and the agent's
//! directories exactly as a clean uninstall does. In the ambient modes the plugin is also
//! killed mid-ADD and the ADD re-run (the runtime's retry) must succeed with the pod captured.
//!
//! Kill moments are uniform over 1.2 × the phase's clean duration, measured first on the same
//! node (round 0, no kill). A kill that lands after the agent already exited is not counted.
//!
//! CI runs `MESHCNI_CRASH_SUITE_ROUNDS` rounds per mode (default 1: 3 agent kills per mode,
//! plus `MESHCNI_CRASH_SUITE_ADD_KILLS` plugin kills, default 2) on
//! `MESHCNI_CRASH_SUITE_PODS` pods (default 60) to stay within the CI budget;
//! `scripts/crash-suite.sh` runs ≥ 50 agent kills per mode on 200 pods and writes the counts
//! into BENCHMARKS.md.
//! `MESHCNI_CRASH_SUITE_SEED` fixes the seed (default: time-based, printed);
//! `MESHCNI_CRASH_SUITE_OUT` names a file the per-mode counts are appended to (JSON lines).
//!
//! Needs root; fails (never skips) without it. Every namespace is the test's own (`mcni-*`),
//! the bpffs a private mount.

mod ambient_mesh;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshcni_testkit::stack::{
    self as kit, AgentDirs, DATAPLANE_MODE, StackMode, namespace_json, pod_json, ztunnel_json,
};
use meshcni_testkit::{
    InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab, Netns, NetnsSnapshot,
};
use serde_json::Value;

const NODE: &str = "node1";
/// Pods enrolled by the install phase (`MESHCNI_CRASH_SUITE_PODS`; the change phase swaps a
/// quarter of them: half leave, as many join).
fn enroll_count() -> usize {
    env_num("MESHCNI_CRASH_SUITE_PODS", 60) as usize
}
/// How long a restarted agent may take to turn the doctor green (200 pods enroll in well under
/// a minute on an idle machine; the CI machine is shared).
const CONVERGE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sidecar,
    Iptables,
    Inpod,
    Ebpf,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sidecar => "sidecar-only",
            Mode::Iptables => "iptables",
            Mode::Inpod => "inpod",
            Mode::Ebpf => "ebpf",
        }
    }
    fn ambient(self) -> bool {
        self != Mode::Sidecar
    }
}

/// xorshift64*: reproducible from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, (i / 200) as u8, (i % 200 + 1) as u8)
}

/// One node: the agent's directories, the node and ztunnel netns, the pods' netns.
struct Node {
    mode: Mode,
    /// Pods enrolled by the install phase; `change` more exist for the change phase.
    enroll: usize,
    change: usize,
    agent_bin: PathBuf,
    plugin: PathBuf,
    dirs: AgentDirs,
    lab: MultiNodeLab,
    pods: Vec<Netns>,
    bpffs: Option<ambient_mesh::PrivateBpffs>,
    _zt: Option<InpodZtunnelStandIn>,
    baseline: Vec<(String, PathBuf, NetnsSnapshot)>,
    /// The agent's directories after a clean uninstall (round 0).
    clean_files: Option<BTreeMap<String, String>>,
    _tmp: tempfile::TempDir,
}

impl Node {
    fn new(mode: Mode) -> Node {
        let (agent_bin, plugin) = {
            let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
            let plugin = agent.with_file_name("meshcni");
            assert!(plugin.is_file(), "plugin missing at {}", plugin.display());
            (agent, plugin)
        };
        let tag = match mode {
            Mode::Sidecar => "cs-sc",
            Mode::Iptables => "cs-ipt",
            Mode::Inpod => "cs-inp",
            Mode::Ebpf => "cs-ebpf",
        };
        let enroll = enroll_count();
        let change = enroll / 4;
        let lab = MultiNodeLab::new(tag, &[&[]]).expect("lab");
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
        let node_ns = lab.node(1).netns.clone_path();
        let mut pods = Vec::new();
        if mode.ambient() {
            // A veth pair per pod (host side `sv<i>`, `eth0` inside), the pod IP inside and a
            // /32 route to it on the node: what a primary CNI leaves.
            let mut node_batch = String::new();
            for i in 0..enroll + change / 2 {
                let ns = Netns::new(&format!("{tag}-p{i}")).expect("pod netns");
                node_batch.push_str(&format!(
                    "link add sv{i} type veth peer name eth0 netns {}\nlink set sv{i} up\n",
                    ns.name()
                ));
                pods.push(ns);
            }
            let file = tmp.path().join("node.ipbatch");
            std::fs::write(&file, &node_batch).expect("batch");
            kit::exec_in(&node_ns, "ip", &["-batch", &file.display().to_string()])
                .expect("pod veths");
            let mut routes = String::new();
            for (i, ns) in pods.iter().enumerate() {
                let ip = pod_ip(i);
                let f = tmp.path().join("pod.ipbatch");
                std::fs::write(
                    &f,
                    format!("addr add {ip}/32 dev eth0\nlink set eth0 up\nlink set lo up\n"),
                )
                .expect("batch");
                kit::exec_in(ns.path(), "ip", &["-batch", &f.display().to_string()])
                    .expect("pod address");
                routes.push_str(&format!("route add {ip}/32 dev sv{i} scope link\n"));
                std::os::unix::fs::symlink(ns.path(), dirs.netns_dir.join(format!("p{i}")))
                    .expect("netns link");
            }
            std::fs::write(&file, &routes).expect("batch");
            kit::exec_in(&node_ns, "ip", &["-batch", &file.display().to_string()])
                .expect("pod routes");
        }
        let bpffs = (mode == Mode::Ebpf).then(ambient_mesh::PrivateBpffs::mount);
        let zt = (mode == Mode::Inpod).then(|| {
            InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&dirs.zds_socket))
                .expect("ztunnel stand-in")
        });
        let mut baseline = vec![(
            "node netns".to_string(),
            node_ns.clone(),
            NetnsSnapshot::capture(&node_ns).expect("snapshot"),
        )];
        let zt_ns = lab.node(1).ztunnel.netns.path().to_path_buf();
        baseline.push((
            "ztunnel netns".into(),
            zt_ns.clone(),
            NetnsSnapshot::capture(&zt_ns).expect("snapshot"),
        ));
        for i in [0, 1, enroll + change / 2 - 1] {
            if let Some(ns) = pods.get(i) {
                baseline.push((
                    format!("pod p{i} netns"),
                    ns.path().to_path_buf(),
                    NetnsSnapshot::capture(ns.path()).expect("snapshot"),
                ));
            }
        }
        Node {
            mode,
            enroll,
            change,
            agent_bin,
            plugin,
            dirs,
            lab,
            pods,
            bpffs,
            _zt: zt,
            baseline,
            clean_files: None,
            _tmp: tmp,
        }
    }

    fn node_ns(&self) -> PathBuf {
        self.lab.node(1).netns.clone_path()
    }

    /// The agent's flags for the mode (each mode refuses the flags of the others).
    fn args(&self) -> Vec<String> {
        match self.mode {
            Mode::Sidecar => {
                let mut a = kit::agent_args_for(&self.dirs, StackMode::Iptables);
                a.retain(|x| x != "--ambient-enabled" && !x.starts_with("--ambient-redirect-mode"));
                a
            }
            Mode::Iptables => kit::agent_args_for(&self.dirs, StackMode::Iptables),
            Mode::Inpod => kit::agent_args_for(&self.dirs, StackMode::Inpod),
            Mode::Ebpf => {
                let mut a = kit::agent_args_for(&self.dirs, StackMode::Inpod);
                a.retain(|x| !x.starts_with("--ztunnel-uds-address"));
                for x in a.iter_mut() {
                    if x.starts_with("--ambient-redirect-mode=") {
                        *x = "--ambient-redirect-mode=ebpf".into();
                    }
                }
                if let Some(b) = &self.bpffs {
                    a.push(format!(
                        "--ambient-ebpf-pin-dir={}",
                        b.path().join("meshcni").display()
                    ));
                }
                a
            }
        }
    }

    /// The workloads file: ztunnel, and pod `p<i>` in `mesh` (ambient) when `ambient(i)`,
    /// else in `plain`; `no_ip`: listed without an address (not started).
    fn write_workloads(&self, ambient: impl Fn(usize) -> bool, no_ip: Option<usize>) {
        let zt = self.lab.node(1).ztunnel.clone_ref();
        let mut pods = vec![ztunnel_json(NODE, zt.0, &zt.1)];
        for i in 0..self.enroll + self.change / 2 {
            let ns = if ambient(i) { "mesh" } else { "plain" };
            let ip = (no_ip != Some(i)).then(|| pod_ip(i));
            pods.push(pod_json(ns, &format!("p{i}"), NODE, ip, &[], &[]));
        }
        let namespaces = vec![
            namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
            namespace_json("plain", &[]),
            namespace_json("istio-system", &[]),
        ];
        kit::write_workloads(&self.dirs.workloads, &namespaces, &pods).expect("workloads");
    }

    fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dirs.log)
            .expect("log");
        Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--", "nsenter"])
            .arg(format!("--net={}", self.node_ns().display()))
            .arg("--")
            .arg(&self.agent_bin)
            .args(self.args())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NODE_NAME", NODE)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent")
    }

    /// `meshcni-agent <flags> <cmd…>` in the node netns: (success, stdout, stderr).
    fn run(&self, cmd: &[&str]) -> (bool, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.node_ns().display()))
            .arg("--")
            .arg(&self.agent_bin)
            .args(self.args())
            .args(cmd)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NODE_NAME", NODE)
            .stdin(Stdio::null())
            .output()
            .expect("run meshcni-agent");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The doctor's verdict: `Ok` when green, else the failing checks with their details.
    fn doctor(&self) -> Result<(), String> {
        let (ok, stdout, stderr) = self.run(&["doctor", "--json"]);
        let v: Value = serde_json::from_str(&stdout)
            .map_err(|e| format!("doctor --json is not JSON ({e}): {stdout}\n{stderr}"))?;
        if ok && v["ok"] == true {
            return Ok(());
        }
        let mut bad = Vec::new();
        for c in v["node_checks"].as_array().into_iter().flatten() {
            if c["ok"] != true {
                bad.push(format!("node {}: {}", c["check"], c["detail"]));
            }
        }
        for p in v["pods"].as_array().into_iter().flatten() {
            if p["ok"] != true {
                bad.push(format!(
                    "pod {}/{}: {}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or(""),
                    p["detail"]
                ));
            }
        }
        bad.truncate(12);
        Err(bad.join("\n"))
    }

    /// Poll the doctor until green: the time it took, or the last verdict.
    fn converge(&self) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            match self.doctor() {
                Ok(()) => return Ok(t.elapsed()),
                Err(e) if t.elapsed() > CONVERGE => {
                    let log = std::fs::read_to_string(&self.dirs.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    return Err(format!(
                        "{e}\nagent log (last lines, newest first):\n{}",
                        tail.join("\n")
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The agent's directories (names; conflist content), for the uninstall comparison.
    fn files(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for dir in [
            &self.dirs.net_d,
            &self.dirs.bin,
            &self.dirs.run,
            &self.dirs.ambient,
        ] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                let content = if dir == &self.dirs.net_d {
                    std::fs::read_to_string(&p).unwrap_or_default()
                } else {
                    String::new()
                };
                out.insert(p.display().to_string(), content);
            }
        }
        if let Some(b) = &self.bpffs
            && b.path().join("meshcni").exists()
        {
            out.insert("pin dir".into(), String::new());
        }
        out
    }

    /// What an uninstall left that a clean one does not: empty when nothing.
    fn residue(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, path, before) in &self.baseline {
            let after = NetnsSnapshot::capture(path).expect("snapshot");
            for d in before.diff(&after) {
                out.push(format!("[{name}] {d}"));
            }
        }
        let files = self.files();
        if let Some(clean) = &self.clean_files
            && *clean != files
        {
            out.push(format!(
                "files: {files:?}\nclean uninstall leaves: {clean:?}"
            ));
        }
        out
    }
}

trait PathOf {
    fn clone_path(&self) -> PathBuf;
}

impl PathOf for Netns {
    fn clone_path(&self) -> PathBuf {
        self.path().to_path_buf()
    }
}

trait ZtRef {
    fn clone_ref(&self) -> (Ipv4Addr, PathBuf);
}

impl ZtRef for meshcni_testkit::LabPod {
    fn clone_ref(&self) -> (Ipv4Addr, PathBuf) {
        (self.ip, self.netns.path().to_path_buf())
    }
}

fn sigkill(child: &mut Child) -> bool {
    let alive = matches!(child.try_wait(), Ok(None));
    if alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait();
    alive
}

/// SIGTERM and wait for the exit (an uninstall of 200 inpod pods takes tens of seconds on a
/// busy machine); SIGKILL only after [`CONVERGE`].
fn sigterm_wait(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t.elapsed() < CONVERGE {
        std::thread::sleep(Duration::from_millis(20));
    }
    sigkill(child);
}

#[derive(Debug, Default, serde::Serialize)]
struct Stats {
    mode: String,
    pods: usize,
    seed: u64,
    kills: BTreeMap<String, u32>,
    /// Restarts that ended with the doctor green (install/change) or, after a killed
    /// uninstall, `meshcni-agent uninstall` leaving what a clean one leaves.
    convergences: u32,
    violations: Vec<String>,
    converge_ms: Vec<u64>,
    plugin_kills: u32,
    plugin_retries_ok: u32,
    wall_s: u64,
}

impl Stats {
    fn kill(&mut self, phase: &str) {
        *self.kills.entry(phase.to_string()).or_default() += 1;
    }
    fn total_kills(&self) -> u32 {
        self.kills.values().sum()
    }
    fn summary(&self) -> String {
        let mut t = self.converge_ms.clone();
        t.sort_unstable();
        let med = t.get(t.len() / 2).copied().unwrap_or(0);
        let max = t.last().copied().unwrap_or(0);
        format!(
            "{} ({} pods): seed {} kills {} {:?}, convergences {}, violations {}, time to doctor-green median {med} ms max {max} ms (n={}), plugin kills mid-ADD {} (retries ok {}), {} s",
            self.mode,
            self.pods,
            self.seed,
            self.total_kills(),
            self.kills,
            self.convergences,
            self.violations.len(),
            t.len(),
            self.plugin_kills,
            self.plugin_retries_ok,
            self.wall_s
        )
    }
}

fn after_restart(n: &Node, st: &mut Stats, what: &str) -> Option<Child> {
    let agent = n.start();
    match n.converge() {
        Ok(t) => {
            st.convergences += 1;
            st.converge_ms.push(t.as_millis() as u64);
            Some(agent)
        }
        Err(e) => {
            st.violations
                .push(format!("{what}: not green after restart:\n{e}"));
            Some(agent)
        }
    }
}

fn run_mode(mode: Mode, seed: u64, rounds: u64, add_kills: u64) -> Stats {
    let started = Instant::now();
    let mut n = Node::new(mode);
    let mut rng = Rng(seed ^ (mode as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let (enroll, change) = (n.enroll, n.change);
    let initial = move |i: usize| i < enroll;
    let changed = move |i: usize| (change / 2..enroll + change / 2).contains(&i);
    let mut st = Stats {
        pods: enroll,
        mode: mode.name().into(),
        seed,
        ..Stats::default()
    };

    // Round 0: the clean durations of each phase, and what a clean uninstall leaves.
    n.write_workloads(initial, None);
    let t = Instant::now();
    let mut agent = n.start();
    n.converge()
        .unwrap_or_else(|e| panic!("{}: clean install not green: {e}", mode.name()));
    let d_install = t.elapsed();
    n.write_workloads(changed, None);
    let t = Instant::now();
    n.converge()
        .unwrap_or_else(|e| panic!("{}: clean change not green: {e}", mode.name()));
    let d_change = t.elapsed();
    std::fs::write(&n.dirs.marker, "true").expect("marker");
    let t = Instant::now();
    sigterm_wait(&mut agent);
    let d_uninstall = t.elapsed();
    std::fs::remove_file(&n.dirs.marker).expect("marker");
    let clean = n.residue();
    assert!(
        clean.is_empty(),
        "{}: a clean uninstall leaves residue:\n{}",
        mode.name(),
        clean.join("\n")
    );
    n.clean_files = Some(n.files());
    let delay = |rng: &mut Rng, d: Duration| {
        Duration::from_millis(rng.below((d.as_millis() as u64 * 6 / 5).max(50)))
    };
    println!(
        "{}: clean install+enroll {d_install:?}, change {d_change:?}, uninstall {d_uninstall:?}",
        mode.name()
    );

    for round in 0..rounds {
        // Install + enrollment of 200 pods.
        n.write_workloads(initial, None);
        let mut agent = n.start();
        std::thread::sleep(delay(&mut rng, d_install));
        if sigkill(&mut agent) {
            st.kill("install+enroll");
        }
        let Some(mut agent) = after_restart(&n, &mut st, &format!("round {round} install")) else {
            continue;
        };
        // Change of 50 pods.
        n.write_workloads(changed, None);
        std::thread::sleep(delay(&mut rng, d_change));
        if sigkill(&mut agent) {
            st.kill("change");
        }
        let Some(mut agent) = after_restart(&n, &mut st, &format!("round {round} change")) else {
            continue;
        };
        // Uninstall.
        std::fs::write(&n.dirs.marker, "true").expect("marker");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::sleep(delay(&mut rng, d_uninstall));
        if sigkill(&mut agent) {
            st.kill("uninstall");
        }
        let (ok, _, log) = n.run(&["uninstall"]);
        std::fs::remove_file(&n.dirs.marker).expect("marker");
        let residue = n.residue();
        if ok && residue.is_empty() {
            st.convergences += 1;
        } else {
            st.violations.push(format!(
                "round {round} uninstall: exit ok {ok}, residue:\n{}\n{log}",
                residue.join("\n")
            ));
        }
        println!("round {}/{rounds}: {}", round + 1, st.summary());
    }

    // The plugin killed mid-ADD, the runtime's retry.
    if mode.ambient() {
        n.write_workloads(initial, None);
        let mut agent = n.start();
        n.converge()
            .unwrap_or_else(|e| panic!("{}: install before the ADD kills: {e}", mode.name()));
        for k in 0..add_kills {
            let i = enroll + (k as usize % (change / 2).max(1));
            let name = format!("p{i}");
            let joins = |j: usize| initial(j) || j == i;
            n.write_workloads(joins, Some(i));
            let pod = pod_json("mesh", &name, NODE, Some(pod_ip(i)), &[], &[]);
            kit::write_pod_metadata(
                &n.dirs.meta,
                &pod,
                &namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
            )
            .expect("metadata");
            let ips = [IpAddr::V4(pod_ip(i))];
            let add = || {
                kit::plugin_add_spawn(
                    &n.plugin,
                    &n.node_ns(),
                    n.pods[i].path(),
                    "mesh",
                    &name,
                    &ips,
                    &n.dirs,
                )
                .expect("spawn plugin")
            };
            let mut first = add();
            std::thread::sleep(Duration::from_millis(rng.below(60)));
            if sigkill(&mut first) {
                st.plugin_kills += 1;
            }
            let retry = add().wait_with_output().expect("plugin retry");
            if retry.status.success() {
                st.plugin_retries_ok += 1;
            } else {
                st.violations.push(format!(
                    "ADD retry for {name} failed: {}",
                    String::from_utf8_lossy(&retry.stdout)
                ));
            }
            // The API now shows the pod's IP.
            n.write_workloads(joins, None);
            match n.converge() {
                Ok(t) => {
                    st.convergences += 1;
                    st.converge_ms.push(t.as_millis() as u64);
                }
                Err(e) => st
                    .violations
                    .push(format!("after the ADD retry for {name}: {e}")),
            }
            n.write_workloads(initial, None);
            if let Err(e) = n.converge() {
                st.violations.push(format!("{name} leaving the mesh: {e}"));
            }
        }
        std::fs::write(&n.dirs.marker, "true").expect("marker");
        sigterm_wait(&mut agent);
        std::fs::remove_file(&n.dirs.marker).expect("marker");
        let residue = n.residue();
        if !residue.is_empty() {
            st.violations
                .push(format!("final uninstall residue:\n{}", residue.join("\n")));
        }
    }
    st.wall_s = started.elapsed().as_secs();
    st
}

fn suite(mode: Mode) {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let seed = env_num(
        "MESHCNI_CRASH_SUITE_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let rounds = env_num("MESHCNI_CRASH_SUITE_ROUNDS", 1);
    let add_kills = env_num("MESHCNI_CRASH_SUITE_ADD_KILLS", 2);
    println!(
        "{}: seed {seed} (MESHCNI_CRASH_SUITE_SEED={seed} reproduces the kill moments)",
        mode.name()
    );
    let st = run_mode(mode, seed, rounds, add_kills);
    println!("{}", st.summary());
    if let Ok(out) = std::env::var("MESHCNI_CRASH_SUITE_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap_or_else(|e| panic!("open {out}: {e}"));
        writeln!(f, "{}", serde_json::to_string(&st).expect("JSON")).expect("write");
    }
    assert!(st.total_kills() > 0, "{}: no kill landed", mode.name());
    assert!(
        st.violations.is_empty(),
        "{} (seed {seed}): {} violation(s):\n{}",
        mode.name(),
        st.violations.len(),
        st.violations.join("\n---\n")
    );
}

#[test]
fn crash_suite_sidecar_only() {
    suite(Mode::Sidecar);
}

#[test]
fn crash_suite_iptables() {
    suite(Mode::Iptables);
}

#[test]
fn crash_suite_inpod() {
    suite(Mode::Inpod);
}

#[test]
fn crash_suite_ebpf() {
    suite(Mode::Ebpf);
}
