//! The `meshcni-agent` binary in redirect mode `ebpf` (issue 11 item 6): started in a lab node
//! netns with its pins on a private bpffs, it attaches to the ztunnel pod (found by scanning:
//! no netns annotation, a link in its private `--netns-dir`) and enrolls a running ambient pod;
//! the agent then stops without uninstalling, and `meshcni-agent uninstall` (a new process,
//! from the agent's flags and state file) must leave nothing of ours: no pin, none of the
//! agent's programs or maps in the kernel (`bpftool prog|map show id`), no tc filter on the
//! veths, and the node and ztunnel netns exactly as before (rules, routes, sysctls).
//!
//! Needs root, `bpftool` and the built `meshcni` next to `meshcni-agent`; fails, never skips.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcni_testkit::stack::{
    Agent, AgentDirs, BpffsMount, DATAPLANE_MODE, StackMode, ZTUNNEL_NETNS_ANNOTATION, exec_in,
    namespace_json, pod_json, run_uninstall_mode, write_workloads, ztunnel_json,
};
use meshcni_testkit::{MultiNodeLab, NetnsSnapshot};

const NODE: &str = "node1";

fn bpftool(args: &[&str]) -> std::process::Output {
    std::process::Command::new("bpftool")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run bpftool {args:?} (is bpftool installed?): {e}"))
}

fn bpftool_ok(args: &[&str]) -> String {
    let out = bpftool(args);
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel ids of the programs our pinned links run and of our pinned maps.
fn our_ids(pins: &Path) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut progs = BTreeSet::new();
    for e in std::fs::read_dir(pins.join("links")).expect("links pin dir") {
        let path = e.expect("entry").path();
        let text = bpftool_ok(&["link", "show", "pinned", &path.display().to_string()]);
        let id = text
            .split_whitespace()
            .skip_while(|w| *w != "prog")
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no prog id in {text:?}"));
        progs.insert(id);
    }
    let mut maps = BTreeSet::new();
    for e in std::fs::read_dir(pins.join("maps")).expect("maps pin dir") {
        let path = e.expect("entry").path();
        let text = bpftool_ok(&["map", "show", "pinned", &path.display().to_string()]);
        let id = text
            .split(':')
            .next()
            .and_then(|w| w.trim().parse().ok())
            .unwrap_or_else(|| panic!("no map id in {text:?}"));
        maps.insert(id);
    }
    (progs, maps)
}

#[test]
fn uninstall_subcommand_in_ebpf_mode_leaves_nothing_of_ours() {
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = agent_bin.with_file_name("meshcni");
    let lab = MultiNodeLab::new("ebst", &[&["a", "b"]]).expect("lab");
    let node = lab.node(1);
    let tmp = tempfile::Builder::new()
        .prefix("mcni-ebst-")
        .tempdir()
        .expect("tmp");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("agent dirs");
    let bpffs = BpffsMount::mount(&dirs.bpffs);
    // The agent finds the ztunnel pod's and a's netns by IP in its private netns dir.
    for (name, ns) in [
        ("ztunnel", node.ztunnel.netns.path()),
        ("a", lab.pod("a").netns.path()),
    ] {
        std::os::unix::fs::symlink(ns, dirs.netns_dir.join(name)).expect("netns link");
    }
    let mut zt = ztunnel_json(NODE, node.ztunnel.ip, node.ztunnel.netns.path());
    zt["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations")
        .remove(ZTUNNEL_NETNS_ANNOTATION);
    let pods = vec![
        zt,
        pod_json("mesh", "a", NODE, Some(lab.pod("a").ip), &[], &[]),
        pod_json("plain", "b", NODE, Some(lab.pod("b").ip), &[], &[]),
    ];
    let namespaces = vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("plain", &[]),
        namespace_json("istio-system", &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces, &pods).expect("workloads");
    let before: Vec<(&str, &Path, NetnsSnapshot)> = [
        ("node netns", node.netns.path()),
        ("ztunnel netns", node.ztunnel.netns.path()),
    ]
    .into_iter()
    .map(|(what, p)| (what, p, NetnsSnapshot::capture(p).expect("snapshot")))
    .collect();

    let mut agent = Agent::start_mode(
        &agent_bin,
        node.netns.path(),
        NODE,
        &dirs,
        StackMode::Ebpf,
        &[],
    )
    .expect("start agent");
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("agent ready in ebpf mode");
    let pins = dirs.bpf_pin_dir();
    // a is enrolled from the workloads file (its netns found by IP): both pod links pinned.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pod_links = || -> usize {
        std::fs::read_dir(pins.join("links"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("pod-"))
                    .count()
            })
            .unwrap_or(0)
    };
    while pod_links() < 2 {
        assert!(
            Instant::now() < deadline,
            "a not enrolled within 20 s; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rules = exec_in(node.ztunnel.netns.path(), "ip", &["rule"]).expect("ip rule");
    assert!(
        rules.contains("lookup 100"),
        "the ztunnel netns got our local-delivery rule: {rules}"
    );
    let (progs, maps) = our_ids(&pins);
    assert_eq!(
        progs.len(),
        4,
        "pod in/eg, ztunnel host, ztunnel netns: {progs:?}"
    );
    assert_eq!(maps.len(), 3, "{maps:?}");

    // The agent goes away without uninstalling (no marker): everything stays pinned.
    agent
        .terminate(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(pins.exists(), "pins survive the agent");

    let log = run_uninstall_mode(&agent_bin, node.netns.path(), NODE, &dirs, StackMode::Ebpf)
        .expect("meshcni-agent uninstall");
    assert!(
        !pins.exists(),
        "pin dir {} left; log:\n{log}",
        pins.display()
    );
    // The kernel frees programs and maps once their last reference is gone (deferred work).
    let deadline = Instant::now() + Duration::from_secs(5);
    let left = loop {
        let left: Vec<String> = progs
            .iter()
            .map(|id| ("prog", id))
            .chain(maps.iter().map(|id| ("map", id)))
            .filter(|(kind, id)| {
                bpftool(&[kind, "show", "id", &id.to_string()])
                    .status
                    .success()
            })
            .map(|(kind, id)| format!("{kind} {id}"))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        left.is_empty(),
        "still in the kernel: {left:?}; log:\n{log}"
    );
    for (ns, dev) in [
        (node.netns.path(), lab.pod("a").host_veth.as_str()),
        (node.netns.path(), "vzt"),
        (node.ztunnel.netns.path(), "eth0"),
    ] {
        for dir in ["ingress", "egress"] {
            let f = exec_in(ns, "tc", &["filter", "show", "dev", dev, dir]).expect("tc filter");
            assert!(f.trim().is_empty(), "tc filter on {dev} {dir}: {f}");
        }
    }
    for (what, path, snap) in &before {
        meshcni_testkit::assert_netns_unchanged(path, snap, &format!("after uninstall, {what}"));
    }
    drop(bpffs);
}
