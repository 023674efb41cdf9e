//! Faults of the `inpod` redirect mode (issue 9 items 1, 5 and 7), through the real
//! `meshcni-agent` binary in inpod mode (in a lab node netns, workloads from a file, private
//! `--host-proc-dir` / `--netns-dir`), the real `meshcni` plugin binary exec'd like a runtime,
//! and the in-pod ztunnel stand-in (a real ZDS client with fault knobs):
//!
//! * fail closed: no ztunnel, a nack, an ack timeout → the ambient ADD fails naming the cause
//!   and the pod netns is byte-identical to before (iptables of both flavours and families,
//!   nft, ip rules/routes, sysctls), no host-probe entry; non-ambient pods pass with the agent
//!   down;
//! * agent restart (SIGTERM, SIGKILL, state file lost): traffic keeps flowing while it is down,
//!   the new agent adopts its pods, repairs drifted rules, and replays a full snapshot;
//! * agent killed at crash points mid-enrollment; ztunnel stopped and restarted; a pod deleted
//!   while its Add waits for the ack; malformed / oversized ZDS messages; many concurrent
//!   ADD/DEL.
//!
//! Root only (fails without it); every namespace is the test's own (`mcni-*`), removed on
//! success and failure.

use meshcni_testkit::stack as kit;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kit::{
    Agent, AgentDirs, CniOutcome, DATAPLANE_MODE, StackMode, namespace_json, plugin_add, pod_json,
    write_pod_metadata, write_workloads,
};
use meshcni_testkit::multinode::{EchoServer, open_stream, read_line};
use meshcni_testkit::zds_client::RequestKind;
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab, NetnsSnapshot};
use serde_json::Value;

const NODE: &str = "node1";
const WAIT: Duration = Duration::from_secs(30);
const STATE_FILE: &str = "inpod-mode.json";

fn binaries() -> (PathBuf, PathBuf) {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = Path::new(env!("CARGO_BIN_EXE_meshcni-agent")).with_file_name("meshcni");
    assert!(
        plugin.is_file(),
        "meshcni plugin binary missing at {}",
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

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A lab node with ambient pods (namespace `mesh`, Pending until [`Rig::set_running`]) and
/// plain pods (namespace `plain`, Running), the agent's private dirs and the binaries.
struct Rig {
    lab: MultiNodeLab,
    dirs: AgentDirs,
    agent_bin: PathBuf,
    plugin: PathBuf,
    node_ns: PathBuf,
    ambient: Vec<String>,
    plain: Vec<String>,
    running: BTreeSet<String>,
    _tmp: tempfile::TempDir,
}

impl Rig {
    fn new(tag: &str, ambient: &[&str], plain: &[&str]) -> Rig {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let (agent_bin, plugin) = binaries();
        let all: Vec<&str> = ambient.iter().chain(plain.iter()).copied().collect();
        let lab = MultiNodeLab::new(tag, &[&all]).expect("lab");
        let node_ns = lab.node(1).netns.path().to_path_buf();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
        let rig = Rig {
            lab,
            dirs,
            agent_bin,
            plugin,
            node_ns,
            ambient: ambient.iter().map(|s| s.to_string()).collect(),
            plain: plain.iter().map(|s| s.to_string()).collect(),
            running: BTreeSet::new(),
            _tmp: tmp,
        };
        for name in &rig.ambient {
            let pod = pod_json("mesh", name, NODE, None, &[], &[]);
            write_pod_metadata(&rig.dirs.meta, &pod, &namespaces()[0]).expect("metadata");
        }
        for name in &rig.plain {
            let pod = rig.pod_obj("plain", name, true);
            write_pod_metadata(&rig.dirs.meta, &pod, &namespaces()[1]).expect("metadata");
        }
        rig.publish();
        rig
    }

    fn ip(&self, name: &str) -> Ipv4Addr {
        self.lab.pod(name).ip
    }

    fn pod_obj(&self, ns: &str, name: &str, running: bool) -> Value {
        pod_json(ns, name, NODE, running.then(|| self.ip(name)), &[], &[])
    }

    /// Write the workloads file: ambient pods (Running with their IP once
    /// [`Rig::set_running`]), plain pods Running.
    fn publish(&self) {
        self.publish_without(&[]);
    }

    /// The kubelet reported these pods' IPs (as after their ADD).
    fn set_running(&mut self, names: &[&str]) {
        self.running.extend(names.iter().map(|s| s.to_string()));
        self.publish();
    }

    /// The pods were deleted from the API (the rig's own record is left as it is).
    fn publish_without(&self, gone: &[&str]) {
        let mut pods = Vec::new();
        for name in self.ambient.iter().filter(|n| !gone.contains(&n.as_str())) {
            pods.push(self.pod_obj("mesh", name, self.running.contains(name)));
        }
        for name in &self.plain {
            pods.push(self.pod_obj("plain", name, true));
        }
        write_workloads(&self.dirs.workloads, &namespaces(), &pods).expect("workloads");
    }

    fn start(&self, env: &[(&str, &str)]) -> Agent {
        let agent = Agent::start_mode(
            &self.agent_bin,
            &self.node_ns,
            NODE,
            &self.dirs,
            StackMode::Inpod,
            env,
        )
        .expect("agent");
        // The plugin socket answers (a stale file of a killed agent does not).
        wait_until("the agent's plugin event socket", WAIT, || {
            std::os::unix::net::UnixStream::connect(self.dirs.socket())
                .ok()
                .map(|_| ())
        });
        agent
    }

    fn add(&self, name: &str) -> CniOutcome {
        let ns = if self.plain.iter().any(|p| p == name) {
            "plain"
        } else {
            "mesh"
        };
        plugin_add(
            &self.plugin,
            &self.node_ns,
            self.lab.pod(name).netns.path(),
            ns,
            name,
            self.ip(name),
            &self.dirs,
        )
        .expect("plugin")
    }

    fn snap(&self, name: &str) -> NetnsSnapshot {
        NetnsSnapshot::capture(self.lab.pod(name).netns.path()).expect("snapshot")
    }

    /// Every iptables rule of the pod (both flavours, both families), normalised.
    fn rules(&self, name: &str) -> String {
        let ns = self.lab.pod(name).netns.path();
        let mut out = String::new();
        for prog in [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ] {
            out.push_str(&format!("## {prog}\n"));
            out.push_str(&kit::normalize_save(
                &kit::exec_in(ns, prog, &[]).expect("save"),
            ));
        }
        out
    }

    /// The iptables flavour holding the pod's in-pod rules (`nft` / `legacy`).
    fn flavour(&self, name: &str) -> &'static str {
        let ns = self.lab.pod(name).netns.path();
        if kit::exec_in(ns, "iptables-nft-save", &[])
            .expect("save")
            .contains("ISTIO_OUTPUT")
        {
            "nft"
        } else {
            "legacy"
        }
    }

    /// Host-probe set members in the node netns: IP → how many times it is listed.
    fn probe_entries(&self) -> BTreeMap<IpAddr, usize> {
        let text = kit::exec_in(&self.node_ns, "ipset", &["list"]).expect("ipset list");
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some(ip) = line
                .split_whitespace()
                .next()
                .and_then(|w| w.parse::<IpAddr>().ok())
            {
                *out.entry(ip).or_insert(0) += 1;
            }
        }
        out
    }

    fn probe_count(&self, name: &str) -> usize {
        self.probe_entries()
            .get(&IpAddr::V4(self.ip(name)))
            .copied()
            .unwrap_or(0)
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.dirs.ambient_config()).unwrap_or_default()
    }

    fn wait_config(&self, ready: bool) {
        let want = format!(r#"{{"ztunnelReady":{ready},"redirectMode":"inpod"}}"#);
        wait_until(&format!("ambient config {want}"), WAIT, || {
            (self.config() == want).then_some(())
        });
    }

    /// `/readyz` status of the running agent (the address it logged last).
    fn readyz(&self, agent: &Agent) -> Option<u16> {
        let addr = agent.log().lines().rev().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("readiness="))
                .map(|a| a.trim_matches('"').to_string())
        })?;
        kit::http_get_in(&self.node_ns, &addr, "/readyz")
            .ok()
            .map(|(s, _)| s)
    }

    fn link_netns(&self, name: &str) {
        let link = self.dirs.netns_dir.join(format!("cni-{name}"));
        if !link.exists() {
            std::os::unix::fs::symlink(self.lab.pod(name).netns.path(), &link)
                .expect("symlink netns");
        }
    }

    fn greeting(&self, from: &str, to: SocketAddr) -> Result<String, String> {
        let mut s = open_stream(&self.lab.pod(from).netns, to, Duration::from_secs(3))
            .map_err(|e| format!("{from} → {to}: {e}"))?;
        read_line(&mut s).map_err(|e| format!("{from} → {to}: {e}"))
    }

    /// `from` → `to` arrives with `from`'s address and went through the stand-in's 15001 in
    /// `from`'s netns.
    fn assert_captured(&self, zt: &InpodZtunnelStandIn, from: &str, to: SocketAddr) {
        zt.take_hops();
        let g = self
            .greeting(from, to)
            .unwrap_or_else(|e| panic!("{e}; hops {:?}", zt.hops()));
        assert!(g.contains(&format!("peer:{}:", self.ip(from))), "{g}");
        let hops = zt.wait_for_hops(1, WAIT).expect("a hop");
        assert!(
            hops.iter().any(|h| h.uid == kit::pod_uid(from)
                && h.listener_port == 15001
                && h.original_dst == to),
            "{hops:?}"
        );
    }
}

fn assert_no_duplicate_rules(rules: &str) {
    let mut seen = BTreeSet::new();
    let (mut prog, mut table) = (String::new(), String::new());
    for l in rules.lines() {
        if l.starts_with("##") {
            prog = l.to_string();
        }
        if l.starts_with('*') {
            table = format!("{prog} {l}");
        }
        if l.starts_with("-A ") {
            assert!(
                seen.insert(format!("{table} {l}")),
                "duplicate rule {l} in {table}:\n{rules}"
            );
        }
    }
}

fn kill9(agent: &mut Agent) {
    let pid = agent.pid().expect("agent running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    agent
        .wait_exit(WAIT)
        .expect("wait")
        .expect("agent exited after SIGKILL");
}

/// The requests of connection `conn`: the uids of its Adds in order, and whether it ended
/// its snapshot (`SnapshotSent` after the Adds).
fn snapshot_on(zt: &InpodZtunnelStandIn, conn: usize) -> (Vec<String>, bool) {
    let reqs: Vec<_> = zt
        .requests()
        .into_iter()
        .filter(|r| r.connection == conn)
        .collect();
    let end = reqs
        .iter()
        .position(|r| r.kind == Some(RequestKind::SnapshotSent));
    let adds = reqs[..end.unwrap_or(reqs.len())]
        .iter()
        .filter(|r| r.kind == Some(RequestKind::Add))
        .filter_map(|r| r.uid.clone())
        .collect();
    (adds, end.is_some())
}

/// Wait for a new connection (after `after` connects) with its snapshot complete; returns its
/// number and the snapshot's Adds, sorted.
fn wait_new_snapshot(zt: &InpodZtunnelStandIn, after: usize) -> (usize, Vec<String>) {
    zt.wait_for_connects(after + 1, WAIT).expect("reconnect");
    zt.wait_for_snapshot(WAIT).expect("snapshot");
    let conn = zt.connects();
    let (mut adds, done) = snapshot_on(zt, conn);
    assert!(
        done,
        "connection {conn}: no SnapshotSent: {:?}",
        zt.requests()
    );
    adds.sort();
    (conn, adds)
}

fn uids(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| kit::pod_uid(n)).collect();
    v.sort();
    v
}

// ---- item 1: fail closed -------------------------------------------------------------------

#[test]
fn ambient_add_fails_closed_naming_the_cause_and_leaves_nothing_in_the_pod() {
    let rig = Rig::new("ipf-closed", &["a", "b"], &["p"]);
    let before_a = rig.snap("a");
    let before_b = rig.snap("b");
    let mut agent = rig.start(&[]);

    // No ztunnel: not ready, config says so, the ADD fails naming ztunnel.
    rig.wait_config(false);
    wait_until("/readyz not ready", WAIT, || {
        rig.readyz(&agent).filter(|s| *s != 200)
    });
    let out = rig.add("a");
    assert!(!out.success, "{out:?}");
    assert!(
        out.stdout.contains("no ztunnel connected"),
        "{out:?}\n{}",
        agent.log()
    );
    before_a.assert_same(&rig.snap("a"), "ADD without ztunnel");
    assert_eq!(rig.probe_count("a"), 0, "{:?}", rig.probe_entries());

    // ztunnel refuses the pod.
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    zt.nack_uid(&kit::pod_uid("a"), "no certificate for this workload");
    let out = rig.add("a");
    assert!(!out.success, "{out:?}");
    assert!(
        out.stdout.contains("no certificate for this workload") && out.stdout.contains("refused"),
        "{out:?}"
    );
    before_a.assert_same(&rig.snap("a"), "ADD nacked");
    assert_eq!(rig.probe_count("a"), 0, "{:?}", rig.probe_entries());
    assert!(zt.workload(&kit::pod_uid("a")).is_none());
    zt.clear_nack(&kit::pod_uid("a"));

    // ztunnel never answers: the ack times out.
    zt.set_never_ack(true);
    let out = rig.add("a");
    zt.set_never_ack(false);
    assert!(!out.success, "{out:?}");
    assert!(out.stdout.contains("did not acknowledge"), "{out:?}");
    before_a.assert_same(&rig.snap("a"), "ADD not acked");
    assert_eq!(rig.probe_count("a"), 0, "{:?}", rig.probe_entries());

    // Once ztunnel answers again, the same pod is captured.
    agent.wait_ready(WAIT).expect("ready again");
    let out = rig.add("a");
    assert!(out.success, "{out:?}\n{}", agent.log());
    assert!(zt.workload(&kit::pod_uid("a")).is_some());
    assert_eq!(rig.probe_count("a"), 1);
    assert_no_duplicate_rules(&rig.rules("a"));

    // Agent down: an ambient ADD fails (pod untouched), a plain pod's passes untouched.
    agent.terminate(WAIT).expect("stop agent");
    let out = rig.add("b");
    assert!(!out.success, "{out:?}");
    before_b.assert_same(&rig.snap("b"), "ambient ADD with the agent down");
    let before_p = rig.snap("p");
    let out = rig.add("p");
    assert!(out.success, "{out:?}");
    before_p.assert_same(&rig.snap("p"), "plain ADD with the agent down");
}

// ---- item 5: agent restart -----------------------------------------------------------------

#[test]
fn agent_restart_keeps_traffic_flowing_adopts_pods_repairs_drift_and_replays_the_snapshot() {
    let mut rig = Rig::new("ipf-restart", &["a", "b"], &["srv"]);
    let server = EchoServer::start(&rig.lab.pod("srv").netns, rig.lab.pod("srv").addr(8080))
        .expect("server");
    let mut agent = rig.start(&[]);
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    for p in ["a", "b"] {
        let out = rig.add(p);
        assert!(out.success, "ADD {p}: {out:?}\n{}", agent.log());
    }
    rig.set_running(&["a", "b"]);
    let snap_a = rig.snap("a");
    let rules_b = rig.rules("b");
    assert_no_duplicate_rules(&rules_b);
    rig.assert_captured(&zt, "a", server.addr());

    for (round, signal) in ["SIGTERM", "SIGKILL"].into_iter().enumerate() {
        let connects = zt.connects();
        if signal == "SIGTERM" {
            assert!(agent.terminate(WAIT).expect("SIGTERM").success());
        } else {
            kill9(&mut agent);
        }
        zt.wait_for("disconnected", WAIT, |z| !z.is_connected())
            .expect("stand-in noticed the agent is gone");
        // Traffic keeps flowing (captured) with no agent.
        rig.assert_captured(&zt, "a", server.addr());
        // Drift while the agent is down: a chain of pod b's rules flushed.
        let flush = format!("iptables-{}", rig.flavour("b"));
        kit::exec_in(
            rig.lab.pod("b").netns.path(),
            &flush,
            &["-t", "nat", "-F", "ISTIO_OUTPUT"],
        )
        .expect("flush");
        assert_ne!(rig.rules("b"), rules_b);

        agent = rig.start(&[]);
        let (conn, adds) = wait_new_snapshot(&zt, connects);
        assert_eq!(adds, uids(&["a", "b"]), "round {round} ({signal})");
        let (all_adds, _) = snapshot_on(&zt, conn);
        assert_eq!(all_adds.len(), 2, "each pod once: {all_adds:?}");
        agent.wait_ready(WAIT).expect("ready after restart");
        snap_a.assert_same(&rig.snap("a"), &format!("pod a after {signal} restart"));
        assert_eq!(rig.rules("b"), rules_b, "drift repaired after {signal}");
        assert_eq!(rig.probe_count("a"), 1);
        assert_eq!(rig.probe_count("b"), 1);
        rig.assert_captured(&zt, "a", server.addr());
        rig.assert_captured(&zt, "b", server.addr());
    }

    // The state file is lost: the pods are found again by discovery (--netns-dir), enrolled
    // once more without duplicate rules.
    assert!(agent.terminate(WAIT).expect("SIGTERM").success());
    std::fs::remove_file(rig.dirs.run.join(STATE_FILE)).expect("remove state file");
    rig.link_netns("a");
    rig.link_netns("b");
    let before = zt.requests().len();
    agent = rig.start(&[]);
    agent.wait_ready(WAIT).expect("ready without state");
    for p in ["a", "b"] {
        zt.wait_for(&format!("{p} added again"), WAIT, |z| {
            z.requests()[before..].iter().any(|r| {
                r.kind == Some(RequestKind::Add) && r.uid.as_deref() == Some(&kit::pod_uid(p))
            }) && z.workload(&kit::pod_uid(p)).is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    }
    snap_a.assert_same(&rig.snap("a"), "pod a re-enrolled by discovery");
    assert_eq!(rig.rules("b"), rules_b);
    assert_eq!(rig.probe_count("a"), 1);
    assert_eq!(rig.probe_count("b"), 1);
    rig.assert_captured(&zt, "a", server.addr());
    // The state file is written right after the hand-over's reply (`flush`).
    wait_until("both pods recorded in the state file", WAIT, || {
        let state = std::fs::read_to_string(rig.dirs.run.join(STATE_FILE)).ok()?;
        ["a", "b"]
            .iter()
            .all(|p| state.contains(&kit::pod_uid(p)))
            .then_some(())
    });
}

/// Regression: an agent restarted without its state file while ztunnel is away (or while
/// ztunnel refuses a pod) finds its captured pods again by discovery; its failed hand-over must
/// not strip the rules a previous agent put there (that would let the pod's traffic escape
/// uncaptured): the pod stays fail-closed until ztunnel takes it.
#[test]
fn state_lost_restart_without_ztunnel_keeps_running_pods_captured() {
    let mut rig = Rig::new("ipf-lost", &["a"], &["srv"]);
    let server = EchoServer::start(&rig.lab.pod("srv").netns, rig.lab.pod("srv").addr(8080))
        .expect("server");
    let mut agent = rig.start(&[]);
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    assert!(rig.add("a").success);
    rig.set_running(&["a"]);
    let rules_a = rig.rules("a");
    rig.assert_captured(&zt, "a", server.addr());

    // Agent and ztunnel both go; the agent's state file is lost.
    assert!(agent.terminate(WAIT).expect("SIGTERM").success());
    zt.stop();
    std::fs::remove_file(rig.dirs.run.join(STATE_FILE)).expect("remove state file");
    rig.link_netns("a");
    let log_len = agent.log().len();
    agent = rig.start(&[]);
    // The loop tries to enroll the running pod (found by discovery) and cannot hand it over.
    wait_until("a failed enrollment of pod a", WAIT, || {
        let log = agent.log();
        log[log_len..]
            .lines()
            .any(|l| l.contains("action failed") && l.contains("uid-a"))
            .then_some(())
    });
    assert_eq!(rig.rules("a"), rules_a, "rules kept while ztunnel is away");
    assert!(
        rig.greeting("a", server.addr()).is_err(),
        "traffic of a captured pod must not escape while ztunnel is away"
    );

    // ztunnel is back but refuses the pod for now: still captured (fail closed).
    zt.nack_uid(&kit::pod_uid("a"), "not yet");
    zt.restart().expect("restart stand-in");
    zt.wait_for("a nacked", WAIT, |z| {
        z.requests().iter().any(|r| {
            r.uid.as_deref() == Some("uid-a")
                && matches!(
                    r.outcome,
                    meshcni_testkit::inpod_ztunnel::AckOutcome::Nack(_)
                )
        })
    })
    .expect("nack");
    let log_len = agent.log().len();
    wait_until("the nacked enrollment's failure logged", WAIT, || {
        let log = agent.log();
        log[log_len..]
            .lines()
            .any(|l| l.contains("action failed") && l.contains("uid-a"))
            .then_some(())
    });
    assert_eq!(rig.rules("a"), rules_a, "rules kept while ztunnel refuses");
    assert!(rig.greeting("a", server.addr()).is_err());

    // ztunnel takes it: captured again, rules once.
    zt.clear_nack(&kit::pod_uid("a"));
    zt.wait_for_workload(&kit::pod_uid("a"), WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(rig.rules("a"), rules_a);
    assert_eq!(rig.probe_count("a"), 1);
    rig.assert_captured(&zt, "a", server.addr());
}

// ---- item 7: faults ------------------------------------------------------------------------

fn assert_killed(agent: &mut Agent, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let status = agent
        .wait_exit(WAIT)
        .expect("wait")
        .unwrap_or_else(|| panic!("{point}: crash point never reached\n{}", agent.log()));
    assert_eq!(
        status.signal(),
        Some(9),
        "{point}: agent exited ({status:?}) without reaching the point\n{}",
        agent.log()
    );
}

/// The agent is SIGKILLed at each in-pod crash point while enrolling a pod, once during the
/// pod's CNI ADD (the runtime then retries the ADD) and once while enrolling a running pod it
/// found by discovery (no ADD: the restarted agent converges on its own). Either way the pod
/// ends up captured with its rules exactly once, one host-probe entry, held by ztunnel and in
/// the state file.
#[test]
fn agent_killed_mid_enrollment_converges_after_restart_without_duplicates() {
    const POINTS: [&str; 3] = ["inpod-after-rules", "inpod-after-probe", "inpod-after-ack"];
    let mut ambient = vec!["ref".to_string()];
    for i in 0..POINTS.len() {
        ambient.push(format!("c{i}"));
        ambient.push(format!("d{i}"));
    }
    let names: Vec<&str> = ambient.iter().map(String::as_str).collect();
    let mut rig = Rig::new("ipf-crash", &names, &["srv"]);
    let server = EchoServer::start(&rig.lab.pod("srv").netns, rig.lab.pod("srv").addr(8080))
        .expect("server");
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    let mut agent = rig.start(&[]);
    agent.wait_ready(WAIT).expect("ready");
    assert!(rig.add("ref").success);
    rig.set_running(&["ref"]);
    let reference = rig.rules("ref");
    assert_no_duplicate_rules(&reference);
    assert!(agent.terminate(WAIT).expect("SIGTERM").success());

    let check = |rig: &Rig, pod: &str, point: &str, agent: &Agent| {
        zt.wait_for_workload(&kit::pod_uid(pod), WAIT)
            .unwrap_or_else(|e| panic!("{point}/{pod}: {e}\n{}", agent.log()));
        assert_eq!(
            rig.rules(pod),
            reference,
            "{point}/{pod}: rules exactly once"
        );
        assert_eq!(rig.probe_count(pod), 1, "{point}/{pod}");
        // The state file is written right after the hand-over's reply (`flush`).
        wait_until(
            &format!("{point}/{pod} recorded in the state file"),
            WAIT,
            || {
                let state = std::fs::read_to_string(rig.dirs.run.join(STATE_FILE)).ok()?;
                state.contains(&kit::pod_uid(pod)).then_some(())
            },
        );
        rig.assert_captured(&zt, pod, server.addr());
    };

    for (i, point) in POINTS.iter().enumerate() {
        let crash = format!("{point}:1");
        // During the CNI ADD.
        let pod = format!("c{i}");
        agent = rig.start(&[("MESHCNI_CRASH_AT", &crash)]);
        agent.wait_ready(WAIT).expect("ready");
        let out = rig.add(&pod);
        assert!(
            !out.success,
            "{crash}: ADD must fail when the agent dies: {out:?}"
        );
        assert_killed(&mut agent, &crash);
        agent = rig.start(&[]);
        agent.wait_ready(WAIT).expect("ready after the crash");
        let out = rig.add(&pod);
        assert!(
            out.success,
            "{crash}: retried ADD: {out:?}\n{}",
            agent.log()
        );
        rig.set_running(&[pod.as_str()]);
        check(&rig, &pod, &crash, &agent);
        assert!(agent.terminate(WAIT).expect("SIGTERM").success());

        // A running pod found by discovery (no ADD).
        let pod = format!("d{i}");
        rig.link_netns(&pod);
        rig.set_running(&[pod.as_str()]);
        agent = rig.start(&[("MESHCNI_CRASH_AT", &crash)]);
        assert_killed(&mut agent, &crash);
        agent = rig.start(&[]);
        agent.wait_ready(WAIT).expect("ready after the crash");
        check(&rig, &pod, &crash, &agent);
        assert!(agent.terminate(WAIT).expect("SIGTERM").success());
    }
    // Every pod enrolled along the way is still captured, each once.
    agent = rig.start(&[]);
    agent.wait_ready(WAIT).expect("ready");
    let entries = rig.probe_entries();
    for name in &ambient {
        assert_eq!(entries.get(&IpAddr::V4(rig.ip(name))), Some(&1), "{name}");
        assert_eq!(rig.rules(name), reference, "{name}");
    }
}

/// Killed halfway through a release (between DelWorkload and the removal of the pod's rules):
/// the restarted agent finishes it — rules and probe entry gone, ztunnel no longer holds the
/// pod, the state file forgets it.
#[test]
fn agent_killed_mid_release_finishes_it_after_restart() {
    let rig = Rig::new("ipf-crel", &["a"], &[]);
    let before = rig.snap("a");
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    let mut agent = rig.start(&[("MESHCNI_CRASH_AT", "inpod-release-mid:1")]);
    agent.wait_ready(WAIT).expect("ready");
    assert!(rig.add("a").success);
    zt.wait_for_workload("uid-a", WAIT).expect("held");
    rig.publish_without(&["a"]);
    assert_killed(&mut agent, "inpod-release-mid:1");
    agent = rig.start(&[]);
    agent.wait_ready(WAIT).expect("ready after the crash");
    wait_until("pod a released", WAIT, || {
        (rig.snap("a") == before && rig.probe_count("a") == 0).then_some(())
    });
    let state = std::fs::read_to_string(rig.dirs.run.join(STATE_FILE)).expect("state");
    assert!(!state.contains("uid-a"), "{state}");
    assert!(zt.workload("uid-a").is_none());
}

/// ztunnel crashes (every in-pod listener closes) and comes back: while it is gone the agent
/// is not ready, the ambient config says `ztunnelReady:false`, ambient ADDs fail closed naming
/// ztunnel, captured pods keep their rules (their traffic fails rather than escaping); when it
/// reconnects it gets every pod in its snapshot and traffic resumes.
#[test]
fn ztunnel_killed_and_restarted_gets_the_snapshot_again_and_traffic_resumes() {
    let mut rig = Rig::new("ipf-zt", &["a", "b", "c"], &["srv"]);
    let server = EchoServer::start(&rig.lab.pod("srv").netns, rig.lab.pod("srv").addr(8080))
        .expect("server");
    let mut agent = rig.start(&[]);
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    for p in ["a", "b"] {
        assert!(rig.add(p).success, "ADD {p}");
    }
    rig.set_running(&["a", "b"]);
    let rules_a = rig.rules("a");
    rig.assert_captured(&zt, "a", server.addr());
    let before_c = rig.snap("c");

    for round in 0..2 {
        let connects = zt.connects();
        zt.stop();
        rig.wait_config(false);
        wait_until("/readyz not ready", WAIT, || {
            rig.readyz(&agent).filter(|s| *s != 200)
        });
        assert!(
            rig.greeting("a", server.addr()).is_err(),
            "round {round}: a captured pod's traffic must fail, not escape, with ztunnel gone"
        );
        let out = rig.add("c");
        assert!(!out.success, "{out:?}");
        assert!(out.stdout.contains("no ztunnel connected"), "{out:?}");
        before_c.assert_same(&rig.snap("c"), "ADD with ztunnel gone");
        assert_eq!(rig.rules("a"), rules_a);
        assert_eq!(rig.probe_count("a"), 1);

        zt.restart().expect("restart");
        let (_, adds) = wait_new_snapshot(&zt, connects);
        assert_eq!(adds, uids(&["a", "b"]), "round {round}");
        rig.wait_config(true);
        agent.wait_ready(WAIT).expect("ready again");
        rig.assert_captured(&zt, "a", server.addr());
        rig.assert_captured(&zt, "b", server.addr());
    }
    let out = rig.add("c");
    assert!(out.success, "{out:?}\n{}", agent.log());
    rig.assert_captured(&zt, "c", server.addr());
}

/// The pod is deleted while its Add waits for ztunnel's (delayed) ack: it ends up released —
/// ztunnel got its Del, no rules or host-probe entry left, not in the state file.
#[test]
fn a_pod_deleted_while_its_add_is_in_flight_ends_up_released() {
    let rig = Rig::new("ipf-del", &["a"], &[]);
    let before = rig.snap("a");
    let mut agent = rig.start(&[]);
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    zt.set_ack_delay(Duration::from_millis(1500));
    let out = std::thread::scope(|s| {
        let add = s.spawn(|| rig.add("a"));
        zt.wait_for("the Add of a in flight", WAIT, |z| {
            z.requests()
                .iter()
                .any(|r| r.kind == Some(RequestKind::Add) && r.uid.as_deref() == Some("uid-a"))
        })
        .expect("Add sent");
        rig.publish_without(&["a"]);
        add.join().expect("ADD thread")
    });
    eprintln!("ADD of the pod deleted mid-flight: success={}", out.success);
    zt.wait_for("Del of a", WAIT, |z| {
        z.requests()
            .iter()
            .any(|r| r.kind == Some(RequestKind::Del) && r.uid.as_deref() == Some("uid-a"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    zt.wait_for_no_workload("uid-a", WAIT).expect("dropped");
    wait_until("pod a released", WAIT, || {
        (rig.snap("a") == before && rig.probe_count("a") == 0).then_some(())
    });
    let state = std::fs::read_to_string(rig.dirs.run.join(STATE_FILE)).expect("state");
    assert!(!state.contains("uid-a"), "{state}");
    zt.set_ack_delay(Duration::ZERO);
    // Still healthy.
    agent.wait_ready(WAIT).expect("ready");
    assert!(agent.wait_exit(Duration::ZERO).expect("wait").is_none());
}

/// A malformed or oversized packet from the peer (idle, or as the answer to an Add) drops that
/// connection only: the agent keeps running and serving, the stand-in reconnects and gets the
/// full snapshot, captured traffic carries on.
#[test]
fn malformed_and_oversized_zds_messages_drop_the_connection_not_the_agent() {
    let mut rig = Rig::new("ipf-bad", &["a", "b", "c"], &["srv"]);
    let server = EchoServer::start(&rig.lab.pod("srv").netns, rig.lab.pod("srv").addr(8080))
        .expect("server");
    let mut agent = rig.start(&[]);
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    assert!(rig.add("a").success);
    rig.set_running(&["a"]);

    for what in ["malformed", "oversized"] {
        let connects = zt.connects();
        let drops = agent.log().matches("ZDS: connection dropped").count();
        match what {
            "malformed" => zt.send_malformed().expect("send"),
            _ => zt.send_oversized(4096).expect("send"),
        }
        let (_, adds) = wait_new_snapshot(&zt, connects);
        assert_eq!(adds, uids(&["a"]), "{what}");
        assert!(
            agent.wait_exit(Duration::ZERO).expect("wait").is_none(),
            "{what}: the agent died\n{}",
            agent.log()
        );
        assert!(
            agent.log().matches("ZDS: connection dropped").count() > drops,
            "{what}: drop not logged\n{}",
            agent.log()
        );
        agent.wait_ready(WAIT).expect("ready");
        rig.assert_captured(&zt, "a", server.addr());
    }

    // A garbage answer to an Add: that ADD fails naming it, nothing left in the pod.
    let before_c = rig.snap("c");
    let connects = zt.connects();
    zt.reply_raw_for("uid-c", vec![0xff, 0xff, 0xff]);
    let out = rig.add("c");
    assert!(!out.success, "{out:?}");
    assert!(out.stdout.contains("undecodable"), "{out:?}");
    before_c.assert_same(&rig.snap("c"), "ADD answered with garbage");
    assert_eq!(rig.probe_count("c"), 0);
    wait_new_snapshot(&zt, connects);
    agent.wait_ready(WAIT).expect("ready");
    let out = rig.add("b");
    assert!(out.success, "{out:?}\n{}", agent.log());
    rig.assert_captured(&zt, "b", server.addr());
}

/// Pods in the many-pods test (one netns each, with an `eth0` holding the pod's address whose
/// veth peer stays in the same netns: no node links, so the lab builds quickly; the agent
/// needs only the netns).
const MANY: usize = 200;

fn many_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        78,
        u8::try_from(i / 200).expect("ip"),
        u8::try_from(i % 200 + 10).expect("ip"),
    )
}

fn many_pod(i: usize) -> String {
    format!("m{i:03}")
}

/// 200 ambient pods ADDed at once (one plugin process per pod, in parallel; a failed ADD is
/// retried like the kubelet does), then all deleted: every pod's ADD succeeds, ztunnel gets
/// exactly one Add per pod (a failed attempt hands nothing over), each pod holds its rules
/// exactly once and one host-probe entry; after the deletion every pod netns is as before, no
/// probe entry is left, ztunnel got one Del per pod and the state file is empty. How many
/// ADDs succeed at the first attempt depends on the machine; it is printed.
#[test]
fn many_concurrent_adds_and_deletes_each_take_effect_exactly_once() {
    use meshcni_testkit::Netns;
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, plugin) = binaries();
    let node = Netns::new("ipf-many-node").expect("node netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
    let started = Instant::now();
    let pods: Vec<Netns> = std::thread::scope(|s| {
        let chunks: Vec<_> = (0..4)
            .map(|t| {
                s.spawn(move || {
                    (0..MANY)
                        .filter(|i| i % 4 == t)
                        .map(|i| {
                            let ns = Netns::new(&format!("ipf-m{i}")).expect("pod netns");
                            ns.ip(&[
                                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                            ])
                            .expect("veth");
                            ns.add_addr("eth0", &format!("{}/32", many_ip(i)))
                                .expect("addr");
                            ns.ip(&["link", "set", "eth0", "up"]).expect("up");
                            (i, ns)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Netns)> = chunks
            .into_iter()
            .flat_map(|c| c.join().expect("builder"))
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, ns)| ns).collect()
    });
    eprintln!("{MANY} pod netns built in {:?}", started.elapsed());
    let before: Vec<NetnsSnapshot> = [0, MANY / 2, MANY - 1]
        .iter()
        .map(|i| NetnsSnapshot::capture(pods[*i].path()).expect("snapshot"))
        .collect();
    let objs: Vec<Value> = (0..MANY)
        .map(|i| pod_json("mesh", &many_pod(i), NODE, None, &[], &[]))
        .collect();
    for o in &objs {
        write_pod_metadata(&dirs.meta, o, &namespaces()[0]).expect("metadata");
    }
    write_workloads(&dirs.workloads, &namespaces(), &objs).expect("workloads");
    let mut agent = Agent::start_mode(&agent_bin, node.path(), NODE, &dirs, StackMode::Inpod, &[])
        .expect("agent");
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    let conn = zt.connects();

    // Every ADD at once; a failed one is retried after 500 ms, as the kubelet retries a
    // sandbox whose CNI ADD failed.
    let started = Instant::now();
    let outcomes: Vec<(usize, Vec<CniOutcome>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..MANY)
            .map(|i| {
                let (plugin, dirs, node, ns) = (&plugin, &dirs, node.path(), pods[i].path());
                s.spawn(move || {
                    let mut tries = Vec::new();
                    for _ in 0..40 {
                        let out =
                            plugin_add(plugin, node, ns, "mesh", &many_pod(i), many_ip(i), dirs)
                                .expect("plugin");
                        let ok = out.success;
                        tries.push(out);
                        if ok {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    (i, tries)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let took = started.elapsed();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, tries) in &outcomes {
        for o in tries.iter().filter(|o| !o.success) {
            let kind = if o.stdout.contains("Connection reset") {
                "connection reset by the agent's event socket"
            } else if o.stdout.contains("did not answer within") {
                "the loop did not answer in time"
            } else if o.stdout.contains("was not captured within") {
                "not captured before the deadline"
            } else {
                o.stdout.as_str()
            };
            *kinds.entry(kind.to_string()).or_default() += 1;
        }
    }
    let first_ok = outcomes.iter().filter(|(_, t)| t[0].success).count();
    let max_tries = outcomes.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
    eprintln!(
        "{MANY} concurrent ADDs: all done in {took:?}; {first_ok} succeeded at the first attempt, \
         at most {max_tries} attempts; failed attempts: {kinds:?}"
    );
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|(_, t)| !t.last().is_some_and(|o| o.success))
        .map(|(i, t)| format!("{}: {:?}", many_pod(*i), t.last().map(|o| &o.stdout)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {MANY} pods never got a successful ADD: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let mut adds: BTreeMap<String, usize> = BTreeMap::new();
    for r in zt.requests().iter().filter(|r| r.connection == conn) {
        if r.kind == Some(RequestKind::Add) {
            *adds.entry(r.uid.clone().unwrap_or_default()).or_default() += 1;
        }
    }
    assert_eq!(adds.len(), MANY, "every pod handed over");
    assert!(adds.values().all(|n| *n == 1), "each pod once: {adds:?}");
    assert_eq!(zt.workloads().len(), MANY);
    let save = |ns: &Netns| -> String {
        [
            "iptables-nft-save",
            "iptables-legacy-save",
            "ip6tables-nft-save",
            "ip6tables-legacy-save",
        ]
        .iter()
        .map(|p| {
            format!(
                "## {p}\n{}",
                kit::normalize_save(&kit::exec_in(ns.path(), p, &[]).expect("save"))
            )
        })
        .collect()
    };
    let reference = save(&pods[0]);
    assert!(reference.contains("ISTIO_OUTPUT"), "{reference}");
    assert_no_duplicate_rules(&reference);
    for (i, ns) in pods.iter().enumerate() {
        assert_eq!(save(ns), reference, "{}: rules exactly once", many_pod(i));
    }
    let probes = kit::exec_in(node.path(), "ipset", &["list"]).expect("ipset");
    let members: Vec<&str> = probes
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<IpAddr>().is_ok())
        })
        .collect();
    assert_eq!(members.len(), MANY, "{probes}");

    // Every pod deleted at once.
    let del_from = zt.requests().len();
    let started = Instant::now();
    write_workloads(&dirs.workloads, &namespaces(), &[]).expect("workloads");
    zt.wait_for("every pod dropped", WAIT * 4, |z| z.workloads().is_empty())
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    eprintln!("{MANY} pods released in {:?}", started.elapsed());
    let dels_now = |z: &InpodZtunnelStandIn| {
        let mut dels: BTreeMap<String, usize> = BTreeMap::new();
        for r in &z.requests()[del_from..] {
            if r.kind == Some(RequestKind::Del) {
                *dels.entry(r.uid.clone().unwrap_or_default()).or_default() += 1;
            }
        }
        dels
    };
    // The stand-in drops a workload before it files the request's record: wait for the records.
    zt.wait_for("a Del recorded for every pod", WAIT, |z| {
        dels_now(z).len() >= MANY
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let dels = dels_now(&zt);
    assert_eq!(dels.len(), MANY);
    assert!(dels.values().all(|n| *n == 1), "one Del per pod: {dels:?}");
    wait_until("state file empty", WAIT, || {
        std::fs::read_to_string(dirs.run.join(STATE_FILE))
            .ok()
            .filter(|s| !s.contains("uid-"))
    });
    for ns in &pods {
        assert!(!save(ns).contains("ISTIO"), "{}: rules left", ns.name());
    }
    for (snap, i) in before.iter().zip([0, MANY / 2, MANY - 1]) {
        snap.assert_same(
            &NetnsSnapshot::capture(pods[i].path()).expect("snapshot"),
            &format!("{} after release", many_pod(i)),
        );
    }
    let probes = kit::exec_in(node.path(), "ipset", &["list"]).expect("ipset");
    assert!(
        !probes.lines().any(|l| l
            .split_whitespace()
            .next()
            .is_some_and(|w| w.parse::<IpAddr>().is_ok())),
        "probe entries left:\n{probes}"
    );
    assert!(agent.terminate(WAIT).expect("SIGTERM").success());
}
