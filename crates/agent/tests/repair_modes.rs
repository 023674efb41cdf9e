//! In-place repair (issue 12 item 1) in the node-level ambient redirect modes `iptables` and
//! `ebpf`: the real `meshcni-agent` with `--repair-enabled` (REPAIR_ENABLED=true, a 1 s
//! resync) runs in a lab node netns, workloads from a file, the ztunnel pod served by the
//! `ZtunnelStandIn`. Two ambient pods are enrolled; then one pod's enrollment is broken behind
//! the agent's back —
//! * `iptables`: its member of the node ipset `ztunnel-pods-ips` and its table-100 route
//!   deleted;
//! * `ebpf`: its entry in the pinned pod map deleted; then, once repaired, its tc programs
//!   detached from its host veth —
//!
//! and the same body asserts after each breakage (made while the agent is frozen with
//! SIGSTOP, so the red verdict cannot race the 1 s repair resync): `meshcni-agent doctor` (in
//! the node netns) says the pod is not captured; then, the agent thawed, the doctor is green
//! again within 20 s with the pod's netns unchanged (same inode: no restart); the repair is
//! reported (a new `pod captured in place` log line naming the pod, the
//! `meshcni_repair_total{result="repaired",reason="ambient_…"}` counter on the monitoring port);
//! a real TCP connection from the repaired pod goes through the stand-in's outbound listener
//! again. The time from "broken" (the agent thawed) to "doctor green" is printed per mode and
//! breakage.
//!
//! Needs root (netns, iptables, ipset, a private bpffs for `ebpf`); fails, never skips. Every
//! namespace is the test's own (`mcni-*`), the agent's `--netns-dir` and `--host-proc-dir` are
//! private directories, the bpffs is a private mount.

use meshcni_testkit::stack as kit;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kit::{
    Agent, AgentDirs, BpffsMount, DATAPLANE_MODE, StackMode, ZTUNNEL_NETNS_ANNOTATION,
    namespace_json, pod_json, write_workloads, ztunnel_json,
};
use meshcni_testkit::ztunnel::OUTBOUND_PORT;
use meshcni_testkit::{ConnectOpts, MultiNodeLab, TcpServer, ZtunnelStandIn, connect_text};
use serde_json::Value;

const NODE: &str = "node1";
const PORT: u16 = 8080;
/// The bound for "doctor green again" after the breakage.
const REPAIR_BOUND: Duration = Duration::from_secs(20);
const READY: Duration = Duration::from_secs(30);

fn doctor(agent_bin: &Path, node_ns: &Path, dirs: &AgentDirs, mode: StackMode) -> (bool, Value) {
    kit::doctor_json(agent_bin, node_ns, &kit::agent_args_for(dirs, mode), NODE)
}

fn pod_row<'a>(report: &'a Value, key: &str) -> &'a Value {
    kit::doctor_pod(report, key)
}

/// The sum of `meshcni_repair_total{result="repaired",reason="ambient_…"}` samples.
fn ambient_repairs(node_ns: &Path, monitoring: &str) -> f64 {
    let (status, body) = kit::http_get_in(node_ns, monitoring, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with(r#"meshcni_repair_total{result="repaired",reason="ambient_"#))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

/// How many `pod captured in place` lines name `key`.
fn repair_lines(log: &str, key: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("pod captured in place") && l.contains(key))
        .count()
}

fn inode(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.dev(), m.ino())
}

/// `from` → `to`:PORT must go through the stand-in's outbound listener: one hop, original
/// destination `to`:PORT, peer `from`'s IP; the server echoes the payload.
fn assert_through_ztunnel(lab: &MultiNodeLab, zt: &ZtunnelStandIn, from: &str, to: &str) {
    zt.take_hops();
    let (f, t) = (lab.pod(from), lab.pod(to));
    let payload = format!("{from}->{to}\n");
    let opts = ConnectOpts {
        payload: payload.clone().into_bytes(),
        ..Default::default()
    };
    let got = connect_text(&f.netns, t.addr(PORT), &opts)
        .unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
    assert!(got.ends_with(&payload), "{from} → {to}: echo: {got:?}");
    let hops = zt.take_hops();
    assert_eq!(hops.len(), 1, "{from} → {to}: one ztunnel hop: {hops:?}");
    let hop = &hops[0];
    assert_eq!(hop.listener_port, OUTBOUND_PORT, "{from} → {to}: {hop:?}");
    assert_eq!(
        hop.original_dst,
        SocketAddr::from((t.ip, PORT)),
        "{from} → {to}: {hop:?}"
    );
    assert_eq!(hop.peer.ip(), IpAddr::V4(f.ip), "{from} → {to}: {hop:?}");
}

fn repairs_a_broken_enrollment_in_place(mode: StackMode, tag: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, iptables, ipset, bpffs)"
    );
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = agent_bin.with_file_name("meshcni");
    assert!(plugin.is_file(), "plugin missing at {}", plugin.display());
    let lab = MultiNodeLab::new(tag, &[&["a", "b", "p"]]).expect("lab");
    let node = lab.node(1);
    let node_ns = node.netns.path().to_path_buf();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("mcni-{tag}-"))
        .tempdir()
        .expect("tmp");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("agent dirs");
    let _bpffs = (mode == StackMode::Ebpf).then(|| BpffsMount::mount(&dirs.bpffs));
    for (name, ns) in [
        ("ztunnel", node.ztunnel.netns.path()),
        ("a", lab.pod("a").netns.path()),
        ("b", lab.pod("b").netns.path()),
    ] {
        std::os::unix::fs::symlink(ns, dirs.netns_dir.join(name)).expect("netns link");
    }
    let mut zt_pod = ztunnel_json(NODE, node.ztunnel.ip, node.ztunnel.netns.path());
    if mode == StackMode::Ebpf {
        // The ebpf mode finds the ztunnel's netns by its IP in the private netns dir.
        zt_pod["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations")
            .remove(ZTUNNEL_NETNS_ANNOTATION);
    }
    let pods = vec![
        zt_pod,
        pod_json("mesh", "a", NODE, Some(lab.pod("a").ip), &[], &[]),
        pod_json("mesh", "b", NODE, Some(lab.pod("b").ip), &[], &[]),
        pod_json("plain", "p", NODE, Some(lab.pod("p").ip), &[], &[]),
    ];
    let namespaces = vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces, &pods).expect("workloads");
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    zt.set_captured([IpAddr::V4(lab.pod("a").ip), IpAddr::V4(lab.pod("b").ip)]);
    let _server = TcpServer::start(&lab.pod("p").netns, lab.pod("p").addr(PORT)).expect("server");

    let mut agent = Agent::start_mode(
        &agent_bin,
        &node_ns,
        NODE,
        &dirs,
        mode,
        &[("REPAIR_ENABLED", "true"), ("REPAIR_RESYNC_SECONDS", "1")],
    )
    .expect("start agent");
    agent.wait_ready(READY).expect("agent ready");
    let monitoring = agent.monitoring();
    let wait_green = |what: &str, bound: Duration| -> Duration {
        let t0 = Instant::now();
        loop {
            let (ok, report) = doctor(&agent_bin, &node_ns, &dirs, mode);
            if ok {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < bound,
                "{} mode, {what}: doctor not green within {bound:?}:\n{report:#}\nagent log:\n{}",
                mode.name(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_green("a and b enrolled", READY);
    assert_through_ztunnel(&lab, &zt, "a", "p");
    assert_through_ztunnel(&lab, &zt, "b", "p");
    let a_ns = inode(lab.pod("a").netns.path());
    let agent_pid = nix::unistd::Pid::from_raw(
        i32::try_from(agent.pid().expect("agent running")).expect("pid"),
    );
    let a_ip = lab.pod("a").ip;
    let breakages: &[&str] = match mode {
        StackMode::Iptables => &["ipset member and table-100 route deleted"],
        StackMode::Ebpf => &["pod map entry deleted", "pod programs detached"],
        StackMode::Inpod => unreachable!("node-level modes only"),
    };
    for &what in breakages {
        let repairs_before = ambient_repairs(&node_ns, &monitoring);
        let logged_before = repair_lines(&agent.log(), "mesh/a");
        // Break a's enrollment behind the agent's back. The agent is frozen (SIGSTOP)
        // meanwhile so the doctor's red verdict is seen before the 1 s repair resync can put
        // it right.
        nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP)
            .expect("SIGSTOP agent");
        match what {
            "ipset member and table-100 route deleted" => {
                let set = meshcni_rules::ambient_node::IPSET_NAME;
                kit::exec_in(&node_ns, "ipset", &["del", set, &a_ip.to_string()])
                    .expect("ipset del a");
                kit::exec_in(
                    &node_ns,
                    "ip",
                    &["route", "del", &a_ip.to_string(), "table", "100"],
                )
                .expect("delete a's table-100 route");
            }
            _ => {
                let cfg = meshcni_agent::modes::ebpf::EbpfModeConfig {
                    node_netns: node_ns.clone(),
                    netns_dirs: vec![dirs.netns_dir.clone()],
                    proc_root: dirs.proc.clone(),
                    pin_dir: dirs.bpf_pin_dir(),
                    state_file: dirs.run.join("ebpf-mode.json"),
                    ..Default::default()
                };
                let drv = meshcni_agent::modes::ebpf::EbpfDriver::new(cfg).expect("ebpf driver");
                if what == "pod map entry deleted" {
                    drv.datapath()
                        .remove_pod(IpAddr::V4(a_ip))
                        .expect("remove a's map entry");
                } else {
                    let ix = meshcni_ebpf::ifindex_in(&node_ns, &lab.pod("a").host_veth)
                        .expect("ifindex of a's veth");
                    drv.datapath()
                        .detach_pod(&node_ns, ix)
                        .expect("detach a's programs");
                }
            }
        }
        let (ok, report) = doctor(&agent_bin, &node_ns, &dirs, mode);
        assert!(
            !ok,
            "{} mode, {what}: doctor green right after a's enrollment was broken:\n{report:#}",
            mode.name()
        );
        assert_eq!(
            pod_row(&report, "mesh/a")["captured"],
            false,
            "{} mode, {what}: {report:#}",
            mode.name()
        );

        nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT)
            .expect("SIGCONT agent");
        let broken = Instant::now();
        wait_green(what, REPAIR_BOUND);
        let took = broken.elapsed();
        println!(
            "repair_modes: {} mode, {what}: broken → doctor green in {:.2} s",
            mode.name(),
            took.as_secs_f64()
        );
        assert_eq!(
            inode(lab.pod("a").netns.path()),
            a_ns,
            "{what}: a's netns changed: the pod was not repaired in place"
        );
        let log = agent.log();
        assert!(
            repair_lines(&log, "mesh/a") > logged_before,
            "{} mode, {what}: no new repair log line for mesh/a:\n{log}",
            mode.name()
        );
        let repairs_after = ambient_repairs(&node_ns, &monitoring);
        assert!(
            repairs_after >= repairs_before + 1.0,
            "{} mode, {what}: meshcni_repair_total (ambient, repaired) {repairs_before} → {repairs_after}",
            mode.name()
        );
        assert_through_ztunnel(&lab, &zt, "a", "p");
    }
    assert_through_ztunnel(&lab, &zt, "a", "p");
    assert_through_ztunnel(&lab, &zt, "b", "p");
    agent
        .terminate(Duration::from_secs(10))
        .expect("agent stops");
}

#[test]
fn iptables_mode_pod_with_ipset_member_and_route_deleted_is_repaired_in_place() {
    repairs_a_broken_enrollment_in_place(StackMode::Iptables, "rmipt");
}

#[test]
fn ebpf_mode_pod_with_map_entry_deleted_or_programs_detached_is_repaired_in_place() {
    repairs_a_broken_enrollment_in_place(StackMode::Ebpf, "rmebpf");
}
