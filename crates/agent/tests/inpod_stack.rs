//! The real `meshcni-agent` binary in `inpod` mode (in a lab node netns, workloads from a
//! file) with the real `meshcni` plugin binary exec'd like a runtime and the in-pod ztunnel
//! stand-in connected to the agent's ZDS socket: an ambient pod's ADD succeeds only once its
//! rules are in place and ztunnel acked it, and its first connection is captured; without a
//! ztunnel the ADD fails closed naming it; a non-ambient pod passes untouched.
//!
//! Root only; every namespace is the test's own (`mcni-*`), removed on success and failure.

use meshcni_testkit::stack as kit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kit::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, namespace_json, plugin_add, pod_json,
    write_pod_metadata, write_workloads,
};
use meshcni_testkit::multinode::{EchoServer, open_stream, read_line};
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab};
use serde_json::Value;

const NODE: &str = "node1";
const WAIT: Duration = Duration::from_secs(20);

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

fn greeting(lab: &MultiNodeLab, from: &str, to: SocketAddr) -> String {
    let mut s = open_stream(&lab.pod(from).netns, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
    read_line(&mut s).unwrap_or_else(|e| panic!("{from} → {to}: {e}"))
}

#[test]
fn ambient_add_waits_for_ztunnel_ack_and_the_first_connection_is_captured() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, plugin) = binaries();
    let lab = MultiNodeLab::new("ips", &[&["a", "p", "n"]]).expect("lab");
    let node_ns = lab.node(1).netns.path().to_path_buf();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
    let pods = vec![
        pod_json("mesh", "a", NODE, None, &[], &[]),
        pod_json("plain", "p", NODE, Some(lab.pod("p").ip), &[], &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces(), &pods).expect("workloads");
    for (ns, name) in [("mesh", "a"), ("plain", "p")] {
        let pod = pods
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .expect("pod");
        let nsobj = namespaces()
            .into_iter()
            .find(|n| n["metadata"]["name"] == ns)
            .expect("ns");
        write_pod_metadata(&dirs.meta, pod, &nsobj).expect("metadata");
    }
    let server = EchoServer::start(&lab.pod("p").netns, lab.pod("p").addr(8080)).expect("server");
    let mut agent =
        Agent::start_mode(&agent_bin, &node_ns, NODE, &dirs, StackMode::Inpod, &[]).expect("agent");

    let deadline = std::time::Instant::now() + WAIT;
    while !dirs.socket().exists() || !dirs.zds_socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "agent sockets never appeared; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // No ztunnel yet: the ambient ADD fails closed, naming ztunnel; nothing is left in the pod.
    let before = kit::exec_in(lab.pod("a").netns.path(), "iptables-save", &[]).expect("save");
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("a").netns.path(),
        "mesh",
        "a",
        lab.pod("a").ip,
        &dirs,
    )
    .expect("plugin");
    assert!(!out.success, "ADD without ztunnel must fail: {out:?}");
    assert!(
        out.stdout.contains("ztunnel"),
        "{out:?}\nagent log:\n{}",
        agent.log()
    );
    assert_eq!(
        kit::exec_in(lab.pod("a").netns.path(), "iptables-save", &[]).expect("save"),
        before
    );

    // ztunnel connects: ready, and the ADD succeeds once acked.
    let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&dirs.zds_socket))
        .expect("stand-in");
    let (_, config) = agent.wait_ready(WAIT).expect("ready");
    assert_eq!(config, r#"{"ztunnelReady":true,"redirectMode":"inpod"}"#);
    let monitoring = agent.monitoring();
    let (status, body) = kit::http_get_in(&node_ns, &monitoring, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(body.contains("meshcni_ztunnel_connected 1"), "{body}");
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("a").netns.path(),
        "mesh",
        "a",
        lab.pod("a").ip,
        &dirs,
    )
    .expect("plugin");
    assert!(out.success, "ADD a: {out:?}\nagent log:\n{}", agent.log());
    eprintln!("inpod ambient ADD took {:?}", out.took);
    assert!(
        zt.workload(&kit::pod_uid("a")).is_some(),
        "acked before the ADD returned"
    );
    zt.take_hops();
    let g = greeting(&lab, "a", server.addr());
    assert!(g.contains(&format!("peer:{}:", lab.pod("a").ip)), "{g}");
    let hops = zt.take_hops();
    assert_eq!(hops.len(), 1, "{hops:?}");
    assert_eq!(hops[0].listener_port, 15001);

    // A non-ambient pod passes untouched (rules-wise) even with the agent gone.
    agent
        .terminate(Duration::from_secs(10))
        .expect("stop agent");
    let before = kit::exec_in(lab.pod("p").netns.path(), "iptables-save", &[]).expect("save");
    let out = plugin_add(
        &plugin,
        &node_ns,
        lab.pod("p").netns.path(),
        "plain",
        "p",
        lab.pod("p").ip,
        &dirs,
    )
    .expect("plugin");
    assert!(out.success, "{out:?}");
    assert_eq!(
        kit::exec_in(lab.pod("p").netns.path(), "iptables-save", &[]).expect("save"),
        before
    );
}
