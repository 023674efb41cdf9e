//! The demo's ambient section, run for real in each redirect mode (`meshcni-demo --section
//! ambient --ambient-mode <mode>`, what `scripts/demo.sh --ambient-mode <mode>` runs after its
//! build): every flow lands where expected, the agents' uninstall leaves both netns of each
//! node as they were, and nothing of the demo is left on the machine (its namespaces, its
//! private bpffs mounts). Needs root and the workspace's binaries (`meshcni`, `meshcni-agent`
//! next to `meshcni-demo`: `cargo build --workspace`); fails, never skips, without them.

use std::path::Path;
use std::process::Command;

/// Run the ambient section in `mode` with a fresh work dir; returns (success, stdout, stderr).
fn run_ambient(mode: &str) -> (bool, String, String) {
    let demo = Path::new(env!("CARGO_BIN_EXE_meshcni-demo"));
    let bin_dir = demo.parent().expect("bin dir");
    for b in ["meshcni", "meshcni-agent"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} missing: build the workspace first (`cargo build --workspace`)",
            bin_dir.join(b).display()
        );
    }
    let work = tempfile::Builder::new()
        .prefix("mcni-demo-test-")
        .tempdir()
        .expect("work dir");
    let out = Command::new(demo)
        .args(["--plugin-dir", &bin_dir.display().to_string()])
        .args(["--work-dir", &work.path().display().to_string()])
        .args(["--section", "ambient", "--ambient-mode", mode])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", demo.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // The demo removes what it created; the caller's trap (scripts/demo.sh) is only the
    // backstop for a killed demo, so nothing may be left here.
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let work_s = work.path().display().to_string();
    assert!(
        !mounts.contains(&work_s),
        "{mode}: a mount under {work_s} is left:\n{mounts}"
    );
    if let Ok(names) = std::fs::read_to_string(work.path().join("netns")) {
        for ns in names.lines() {
            assert!(
                !Path::new("/run/netns").join(ns).exists(),
                "{mode}: netns {ns} left"
            );
        }
    }
    (out.status.success(), stdout, stderr)
}

/// `flows`: the section's flow count (the inpod section adds a kubelet-probe-like flow).
fn assert_all_flows_and_clean(mode: &str, flows: usize) -> String {
    let (ok, stdout, stderr) = run_ambient(mode);
    assert!(ok, "{mode}: demo failed\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("{flows}/{flows} flows landed where expected")),
        "{mode}:\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            r#"{{"ztunnelReady":true,"redirectMode":"{mode}"}}"#
        )),
        "{mode}: the ambient config file is printed:\n{stdout}"
    );
    assert!(!stdout.contains("NOT CLEAN"), "{mode}:\n{stdout}");
    stdout
}

#[test]
fn ambient_section_in_iptables_mode() {
    assert_all_flows_and_clean("iptables", 9);
}

#[test]
fn ambient_section_in_ebpf_mode_lists_what_it_attached_and_removes_it() {
    let out = assert_all_flows_and_clean("ebpf", 9);
    // Both nodes: the programs of each hook, the three pinned maps, the pod map's addresses.
    for needle in [
        "name meshcni_pod_in",
        "name meshcni_pod_eg",
        "name meshcni_zt_host",
        "name meshcni_zt_in",
        "name meshcni_pods",
        "name meshcni_zt",
        "name meshcni_hostip",
        "entries: 2: ",
        "iptables-nft-save 0 rules, iptables-legacy-save 0 rules, `nft list ruleset` 0 lines, `ipset list` 0 lines",
    ] {
        assert!(out.contains(needle), "missing {needle:?}:\n{out}");
    }
    for node in ["node1", "node2"] {
        let removed = out
            .lines()
            .filter(|l| l.contains(&format!("ambient-{node}/bpffs/meshcni removed; programs")))
            .count();
        assert_eq!(removed, 1, "{node}: pins and programs gone:\n{out}");
        for what in ["node", "ztunnel netns"] {
            assert!(
                out.contains(&format!(
                    "{node} {what}: iptables (nft+legacy), nft ruleset, ip rule, all routes, links, addresses, ipsets, sysctls identical to before the agent"
                )),
                "{node} {what}:\n{out}"
            );
        }
    }
}

#[test]
fn ambient_section_in_inpod_mode() {
    assert_all_flows_and_clean("inpod", 10);
}
