//! The whole ambient `iptables` stack as processes, the way a node runs it: the real
//! `meshcni-agent` binary inside a lab node's netns (`nsenter --net`), workloads from a local
//! file, every host path in a temp dir; the real `meshcni` plugin binary exec'd with CNI
//! environment for pods of that node; a ztunnel stand-in in the lab's ztunnel pod; real TCP.
//!
//! One test, in order (each step depends on the previous one's node state):
//! (a) the agent becomes ready and writes `{"ztunnelReady":true,"redirectMode":"iptables"}`;
//! (b) a new ambient pod, added to the workloads file and ADDed through the plugin, is captured
//!     by the time ADD returns: its very first connection goes through the stand-in;
//! (c) with the agent stopped (SIGTERM) the node rules stay, an ambient ADD fails closed with
//!     CNI error 103 naming the socket, a non-ambient ADD passes through;
//! (d) a restarted agent adopts the rules: node state identical, nothing duplicated;
//! (e) the uninstall marker + SIGTERM removes everything: the node netns is back to its
//!     pre-agent snapshot (iptables of both flavours, ip rule, all routes, links, ipsets).
//!
//! A second test removes a stopped agent's leftovers with `meshcni-agent … uninstall`.
//!
//! Needs root; fails (never skips) without it. The lab (one node: pods a, p, n, m, q)
//! is deleted on success and failure.

use meshcni_testkit::stack as kit;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kit::{
    Agent, AgentDirs, CNI_AGENT_FAILED, DATAPLANE_MODE, NodeState, namespace_json, plugin_add,
    pod_json, write_pod_metadata, write_workloads, ztunnel_json,
};
use meshcni_testkit::ztunnel::OUTBOUND_PORT;
use meshcni_testkit::{
    ConnectOpts, MultiNodeLab, NetnsSnapshot, TcpServer, ZtunnelStandIn, connect_text,
};
use serde_json::Value;

const NODE: &str = "node1";
const PORT: u16 = 8080;
const READY: Duration = Duration::from_secs(30);

fn binaries() -> (PathBuf, PathBuf) {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = Path::new(env!("CARGO_BIN_EXE_meshcni-agent")).with_file_name("meshcni");
    assert!(
        plugin.is_file(),
        "the meshcni plugin binary is not next to meshcni-agent at {} — build it too \
         (`cargo test --workspace` or `cargo build -p meshcni-plugin`)",
        plugin.display()
    );
    (agent, plugin)
}

fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ]
}

fn ns_obj(name: &str) -> Value {
    namespaces()
        .into_iter()
        .find(|n| n["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no namespace {name}"))
}

/// `from` → `to`:PORT; returns the reply text (banner `server:<addr> peer:<addr>\n` + echo).
fn exchange(lab: &MultiNodeLab, from: &str, to: &str) -> String {
    let (f, t) = (lab.pod(from), lab.pod(to));
    let payload = format!("{from}->{to}\n");
    let opts = ConnectOpts {
        payload: payload.clone().into_bytes(),
        ..Default::default()
    };
    let got = connect_text(&f.netns, t.addr(PORT), &opts)
        .unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
    assert!(
        got.starts_with(&format!("server:{}:{PORT} peer:{}:", t.ip, f.ip)),
        "{from} → {to}: the server must see the client pod's IP {}: {got:?}",
        f.ip
    );
    assert!(got.ends_with(&payload), "{from} → {to}: echo: {got:?}");
    got
}

/// `from` → `to` must go through the stand-in's outbound listener (exactly one hop, original
/// destination `to`:PORT, peer `from`), and the server's peer is the stand-in's upstream
/// socket (spoofing `from`'s IP).
fn assert_captured(lab: &MultiNodeLab, zt: &ZtunnelStandIn, from: &str, to: &str) {
    zt.take_hops();
    let reply = exchange(lab, from, to);
    let hops = zt.take_hops();
    let (f, t) = (lab.pod(from), lab.pod(to));
    assert_eq!(hops.len(), 1, "{from} → {to}: one ztunnel hop: {hops:?}");
    let hop = &hops[0];
    assert_eq!(hop.listener_port, OUTBOUND_PORT, "{from} → {to}: {hop:?}");
    assert_eq!(hop.original_dst, t.addr(PORT), "{from} → {to}: {hop:?}");
    assert_eq!(hop.peer.ip(), IpAddr::V4(f.ip), "{from} → {to}: {hop:?}");
    let seen: SocketAddr = reply
        .lines()
        .next()
        .and_then(|l| l.split(" peer:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peer in {reply:?}"));
    assert_eq!(hop.upstream_local, Some(seen), "{from} → {to}: {hop:?}");
}

/// Full snapshots of the lab's node and ztunnel netns before the agent first runs, with the
/// operator's non-default sysctls set first (install relaxes them; uninstall must restore).
struct Baseline(Vec<(String, PathBuf, NetnsSnapshot)>);

impl Baseline {
    fn of(lab: &MultiNodeLab) -> Baseline {
        let node = lab.node(1);
        node.netns
            .sysctl("net.ipv4.conf.all.rp_filter", "2")
            .expect("operator sysctl");
        node.netns
            .sysctl("net.ipv4.conf.default.rp_filter", "2")
            .expect("operator sysctl");
        for k in ["all", "default", "eth0"] {
            node.ztunnel
                .netns
                .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "1")
                .expect("operator sysctl");
        }
        Baseline(
            [("node", &node.netns), ("ztunnel", &node.ztunnel.netns)]
                .into_iter()
                .map(|(what, ns)| {
                    (
                        format!("{what} netns"),
                        ns.path().to_path_buf(),
                        NetnsSnapshot::capture(ns.path()).expect("netns snapshot"),
                    )
                })
                .collect(),
        )
    }

    fn assert_restored(&self) {
        for (name, path, before) in &self.0 {
            meshcni_testkit::assert_netns_unchanged(
                path,
                before,
                &format!("after uninstall, {name}"),
            );
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what} (after {timeout:?}): {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn ipset_has(node: &Path, ip: Ipv4Addr) -> Result<(), String> {
    let sets = kit::exec_in(node, "ipset", &["list"])?;
    let ip = ip.to_string();
    if sets
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ip.as_str()))
    {
        Ok(())
    } else {
        Err(format!("{ip} not in any ipset:\n{sets}"))
    }
}

#[test]
fn agent_and_plugin_binaries_capture_fail_closed_restart_and_uninstall_cleanly() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, iptables)"
    );
    let (agent_bin, plugin) = binaries();
    // Every pod's network wiring (the ptp part of the chain) exists from the start, so the
    // pre-agent snapshot covers it; n, m and q are "started" (CNI ADD through meshcni) later.
    let lab = MultiNodeLab::new("ast", &[&["a", "p", "n", "m", "q"]]).expect("lab");
    let node_ns = lab.node(1).netns.path().to_path_buf();
    let pre_agent = NodeState::capture(&node_ns).expect("pre-agent snapshot");
    let full = Baseline::of(&lab);

    let zt_pod = &lab.node(1).ztunnel;
    let zt = ZtunnelStandIn::start(&zt_pod.netns, IpAddr::V4(zt_pod.ip)).expect("stand-in");
    let mut servers = vec![
        TcpServer::start(&lab.pod("p").netns, lab.pod("p").addr(PORT)).expect("server p"),
        TcpServer::start(&lab.pod("a").netns, lab.pod("a").addr(PORT)).expect("server a"),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("agent dirs");
    let mut pods = vec![
        ztunnel_json(NODE, zt_pod.ip, zt_pod.netns.path()),
        pod_json("mesh", "a", NODE, Some(lab.pod("a").ip), &[], &[]),
        pod_json("plain", "p", NODE, Some(lab.pod("p").ip), &[], &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    // The stand-in's "xDS": which workloads are captured (HBONE-capable).
    zt.set_captured([IpAddr::V4(lab.pod("a").ip)]);

    // (a) ready, ambient config written.
    let mut agent = Agent::start(&agent_bin, &node_ns, NODE, &dirs).expect("start agent");
    let (_, config) = agent.wait_ready(READY).expect("agent ready");
    assert_eq!(config, r#"{"ztunnelReady":true,"redirectMode":"iptables"}"#);
    let a_ip = lab.pod("a").ip;
    wait_for("pod a enrolled", Duration::from_secs(10), || {
        ipset_has(&node_ns, a_ip)
    });
    assert_captured(&lab, &zt, "a", "p");
    zt.take_hops();
    exchange(&lab, "p", "a"); // inbound to a: through 15006
    let hops = zt.take_hops();
    assert!(
        hops.len() == 1 && hops[0].listener_port == 15006,
        "p → a: {hops:?}"
    );

    // (b) a new ambient pod: in the workloads file (no IP yet) and ADDed through the plugin.
    let n_ip = lab.pod("n").ip;
    let n_pod = pod_json("mesh", "n", NODE, None, &[], &[]);
    pods.push(n_pod.clone());
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    write_pod_metadata(&dirs.meta, &n_pod, &ns_obj("mesh")).expect("metadata");
    zt.add_captured(IpAddr::V4(n_ip));
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("n").netns.path(),
        "mesh",
        "n",
        n_ip,
        &dirs,
    )
    .expect("run plugin");
    assert!(
        out.success,
        "ADD n must succeed: {out:?}\nagent log:\n{}",
        agent.log()
    );
    let result = out.json().expect("CNI result");
    assert_eq!(
        result["ips"][0]["address"],
        format!("{n_ip}/32"),
        "{result}"
    );
    eprintln!(
        "ambient ADD (plugin → agent → captured) took {:?}",
        out.took
    );
    // Immediately: the pod's first connection is captured.
    assert_captured(&lab, &zt, "n", "p");
    // Then the kubelet reports the pod's IP (the watch catches up): nothing changes.
    let n_running = pod_json("mesh", "n", NODE, Some(n_ip), &[], &[]);
    *pods.last_mut().expect("n") = n_running;
    let before_update = NodeState::capture(&node_ns).expect("snapshot");
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    std::thread::sleep(Duration::from_millis(300));
    let updated = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        before_update.diff(&updated).is_empty(),
        "the watch catching up with the CNI IP must change nothing:\n{}",
        before_update.diff(&updated).join("\n")
    );

    // (c) agent stopped: rules stay; ambient ADD fails closed; non-ambient passes.
    let before_stop = NodeState::capture(&node_ns).expect("snapshot");
    let status = agent.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        agent.log()
    );
    let stopped = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        before_stop.diff(&stopped).is_empty(),
        "SIGTERM must leave the node rules in place:\n{}",
        before_stop.diff(&stopped).join("\n")
    );
    assert!(!dirs.socket().exists(), "socket left after SIGTERM");
    assert_captured(&lab, &zt, "a", "p"); // still captured with no agent running

    let m_ip = lab.pod("m").ip;
    let m_pod = pod_json("mesh", "m", NODE, None, &[], &[]);
    write_pod_metadata(&dirs.meta, &m_pod, &ns_obj("mesh")).expect("metadata");
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("m").netns.path(),
        "mesh",
        "m",
        m_ip,
        &dirs,
    )
    .expect("run plugin");
    assert!(!out.success, "ADD of an ambient pod with no agent: {out:?}");
    let err = out.json().expect("CNI error object");
    assert_eq!(err["code"], CNI_AGENT_FAILED, "{err}");
    let text = format!("{} {}", err["msg"], err["details"]);
    assert!(
        text.contains("cannot enroll ambient pod mesh/m")
            && text.contains(&dirs.socket().display().to_string()),
        "the error names the pod and the socket: {err}"
    );

    let q_ip = lab.pod("q").ip;
    let q_pod = pod_json("plain", "q", NODE, None, &[], &[]);
    write_pod_metadata(&dirs.meta, &q_pod, &ns_obj("plain")).expect("metadata");
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("q").netns.path(),
        "plain",
        "q",
        q_ip,
        &dirs,
    )
    .expect("run plugin");
    assert!(out.success, "non-ambient ADD passes through: {out:?}");
    assert_eq!(
        out.json().expect("CNI result")["ips"][0]["address"],
        format!("{q_ip}/32")
    );
    servers.push(TcpServer::start(&lab.pod("q").netns, lab.pod("q").addr(PORT)).expect("q"));

    // (d) restart: adopts, nothing added or duplicated. (Snapshot again: pods m and q added
    // links and routes since.)
    let before_restart = NodeState::capture(&node_ns).expect("snapshot");
    let mut agent = Agent::start(&agent_bin, &node_ns, NODE, &dirs).expect("restart agent");
    agent.wait_ready(READY).expect("restarted agent ready");
    // Give the first reconcile pass time to (not) change anything, then compare.
    std::thread::sleep(Duration::from_millis(500));
    let restarted = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        before_restart.diff(&restarted).is_empty(),
        "a restarted agent must reconcile without changing the node:\n{}",
        before_restart.diff(&restarted).join("\n")
    );
    // Spelled out: the same number of rules as before the restart, and every jump into our
    // chains exactly once per table (re-adding jumps is how a restart duplicates rules; the
    // chains themselves legitimately repeat some rules, as Istio's do).
    let count = |save: &str| save.lines().filter(|l| l.starts_with("-A ")).count();
    let mut all_jumps = 0;
    for (save, before) in [
        (&restarted.iptables_nft, &before_restart.iptables_nft),
        (&restarted.iptables_legacy, &before_restart.iptables_legacy),
    ] {
        assert_eq!(count(save), count(before), "rule count changed:\n{save}");
        let mut table = "";
        let mut jumps = std::collections::BTreeMap::new();
        for l in save.lines() {
            if let Some(t) = l.strip_prefix('*') {
                table = t;
            } else if l.starts_with("-A ")
                && !l.starts_with("-A ztunnel-")
                && l.contains("-j ztunnel-")
            {
                *jumps.entry((table.to_string(), l.to_string())).or_insert(0) += 1;
            }
        }
        assert!(
            jumps.values().all(|n| *n == 1),
            "jumps into ztunnel chains duplicated: {jumps:?}"
        );
        all_jumps += jumps.len();
    }
    assert!(
        all_jumps >= 7,
        "mangle PREROUTING/INPUT/FORWARD/OUTPUT/POSTROUTING and nat PREROUTING/POSTROUTING \
         jump into the ztunnel chains: only {all_jumps} jumps found"
    );
    assert_captured(&lab, &zt, "n", "q");
    zt.take_hops();
    exchange(&lab, "q", "p"); // plain → plain: untouched
    assert!(zt.take_hops().is_empty(), "q → p must not be captured");

    // (e) uninstall (marker + SIGTERM): the node is back to the pre-agent state.
    std::fs::write(&dirs.marker, "true").expect("marker");
    let status = agent.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        agent.log()
    );
    let after = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        pre_agent.diff(&after).is_empty(),
        "uninstall must restore the pre-agent node state:\n{}",
        pre_agent.diff(&after).join("\n")
    );
    full.assert_restored();
    assert!(!dirs.bin.join("meshcni").exists(), "plugin binary left");
    assert!(!dirs.ambient_config().exists(), "ambient config left");
    assert!(
        !dirs.run.join("iptables-mode.json").exists(),
        "driver state file left"
    );
    zt.take_hops();
    exchange(&lab, "a", "p");
    assert!(zt.take_hops().is_empty(), "a is no longer captured");
    drop(servers);
}

/// A one-node lab where the real agent ran in iptables mode, enrolled pod `a` (other pods are
/// in a plain namespace) and was stopped with a plain SIGTERM (redirection left in place).
struct StoppedAgent {
    agent_bin: PathBuf,
    lab: MultiNodeLab,
    node_ns: PathBuf,
    pre_agent: NodeState,
    full: Baseline,
    _tmp: tempfile::TempDir,
    dirs: AgentDirs,
}

fn stopped_agent_with_enrolled_pod(tag: &str, pod_names: &[&str]) -> StoppedAgent {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, iptables)"
    );
    let (agent_bin, plugin) = binaries();
    let lab = MultiNodeLab::new(tag, &[pod_names]).expect("lab");
    let node_ns = lab.node(1).netns.path().to_path_buf();
    let pre_agent = NodeState::capture(&node_ns).expect("pre-agent snapshot");
    let full = Baseline::of(&lab);
    let zt_pod = &lab.node(1).ztunnel;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("agent dirs");
    let mut pods = vec![ztunnel_json(NODE, zt_pod.ip, zt_pod.netns.path())];
    for name in pod_names {
        let ns = if *name == "a" { "mesh" } else { "plain" };
        pods.push(pod_json(ns, name, NODE, Some(lab.pod(name).ip), &[], &[]));
    }
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    let mut agent = Agent::start(&agent_bin, &node_ns, NODE, &dirs).expect("start agent");
    agent.wait_ready(READY).expect("agent ready");
    let a_ip = lab.pod("a").ip;
    wait_for("pod a enrolled", Duration::from_secs(10), || {
        ipset_has(&node_ns, a_ip)
    });
    let status = agent.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert!(status.success(), "agent exit {status:?}");
    StoppedAgent {
        agent_bin,
        lab,
        node_ns,
        pre_agent,
        full,
        _tmp: tmp,
        dirs,
    }
}

#[test]
fn uninstall_subcommand_removes_what_a_stopped_agent_left() {
    let StoppedAgent {
        agent_bin,
        lab: _lab,
        node_ns,
        pre_agent,
        full,
        _tmp,
        dirs,
    } = stopped_agent_with_enrolled_pod("asu", &["a", "p"]);
    let left = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        !pre_agent.diff(&left).is_empty(),
        "a plain SIGTERM leaves the redirection in place"
    );
    assert!(dirs.bin.join("meshcni").exists(), "plugin left installed");

    let log = kit::run_uninstall(&agent_bin, &node_ns, NODE, &dirs).expect("uninstall");
    let after = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        pre_agent.diff(&after).is_empty(),
        "`meshcni-agent uninstall` must restore the pre-agent node state:\n{}\nlog:\n{log}",
        pre_agent.diff(&after).join("\n")
    );
    assert!(!dirs.bin.join("meshcni").exists(), "plugin binary left");
    assert!(
        !dirs.run.join("iptables-mode.json").exists(),
        "driver state file left"
    );
    full.assert_restored();
    // Idempotent: a second run finds nothing to do and succeeds.
    kit::run_uninstall(&agent_bin, &node_ns, NODE, &dirs).expect("second uninstall");
    assert!(
        pre_agent
            .diff(&NodeState::capture(&node_ns).expect("snapshot"))
            .is_empty()
    );
}

/// `EBPF_ENABLED=true` with an explicit `--ambient-redirect-mode=iptables` runs the iptables
/// mode (the explicit mode wins). `meshcni-agent uninstall` with the same settings must remove
/// that iptables redirection too — not decide on "ebpf" (no driver) and leave it on the node.
#[test]
fn uninstall_subcommand_honours_an_explicit_mode_over_ebpf_enabled() {
    let StoppedAgent {
        agent_bin,
        lab: _lab,
        node_ns,
        pre_agent,
        full,
        _tmp,
        dirs,
    } = stopped_agent_with_enrolled_pod("aue", &["a"]);

    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .arg("--")
        .arg(&agent_bin)
        .args(kit::agent_args(&dirs))
        .arg("uninstall")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NODE_NAME", NODE)
        .env("EBPF_ENABLED", "true")
        .output()
        .expect("run uninstall");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "uninstall failed:\n{log}");
    let after = NodeState::capture(&node_ns).expect("snapshot");
    assert!(
        pre_agent.diff(&after).is_empty(),
        "iptables redirection left behind:\n{}\nlog:\n{log}",
        pre_agent.diff(&after).join("\n")
    );
    assert!(
        !dirs.run.join("iptables-mode.json").exists(),
        "driver state file left"
    );
    full.assert_restored();
}

/// The processes whose command line starts with `program` and whose environment has `var`.
fn processes_with_env(program: &str, var: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if !String::from_utf8_lossy(argv0).ends_with(program) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|b| *b == 0).any(|kv| kv == var.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// `--node-xtables-lock` (issue 8 item 18) is the lock the agent's restores into the node
/// netns take (the host's `/run/xtables.lock` by default, so legacy restores serialise with
/// kube-proxy). With legacy iptables forced and another writer holding that lock, the agent's
/// `iptables-legacy-restore` runs with `XTABLES_LOCKFILE=<the flag's file>` and waits; once the
/// lock is released the agent installs and becomes ready.
#[test]
fn node_xtables_lock_flag_is_the_lock_node_restores_wait_for() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, iptables)"
    );
    let (agent_bin, plugin) = binaries();
    let lab = MultiNodeLab::new("axl", &[&["a"]]).expect("lab");
    let node = lab.node(1);
    // x_tables cannot unregister a table from a netns: on a legacy node they exist already.
    for t in ["filter", "mangle", "nat"] {
        kit::exec_in(node.netns.path(), "iptables-legacy", &["-t", t, "-S"]).expect("legacy");
    }
    kit::exec_in(
        node.ztunnel.netns.path(),
        "iptables-legacy",
        &["-t", "mangle", "-S"],
    )
    .expect("legacy");
    let full = Baseline::of(&lab);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("agent dirs");
    std::fs::create_dir_all(&dirs.run).expect("run dir");
    let lock_path = dirs.run.join("xtables.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("lock file");
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let pods = vec![
        ztunnel_json(NODE, node.ztunnel.ip, node.ztunnel.netns.path()),
        pod_json("mesh", "a", NODE, Some(lab.pod("a").ip), &[], &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    let node_ns = node.netns.path().to_path_buf();
    let mut agent = Agent::start_with_env(
        &agent_bin,
        &node_ns,
        NODE,
        &dirs,
        &[("FORCE_IPTABLES_BINARY", "legacy")],
    )
    .expect("start agent");
    let var = format!("XTABLES_LOCKFILE={}", lock_path.display());
    wait_for(
        "the agent's node restore waiting on the --node-xtables-lock file",
        Duration::from_secs(20),
        || {
            if processes_with_env("iptables-legacy-restore", &var).is_empty() {
                Err(format!("no iptables-legacy-restore with {var}"))
            } else {
                Ok(())
            }
        },
    );
    assert!(
        agent.wait_ready(Duration::from_millis(500)).is_err(),
        "ready while its node restore waits for the lock"
    );
    drop(lock);
    agent
        .wait_ready(READY)
        .expect("ready once the lock is free");
    wait_for("pod a enrolled", Duration::from_secs(10), || {
        ipset_has(&node_ns, lab.pod("a").ip)
    });
    std::fs::write(&dirs.marker, "true").expect("marker");
    let status = agent.terminate(Duration::from_secs(10)).expect("SIGTERM");
    assert!(
        status.success(),
        "agent exit {status:?}; log:\n{}",
        agent.log()
    );
    full.assert_restored();
}
