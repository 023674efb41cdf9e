//! Hosts without Kubernetes: the real `meshcni` binary with a local pod-metadata directory
//! (`pod_metadata_dir`). A pod without a metadata file is not a mesh pod (passed through, logged
//! at info with the file looked for); a file that exists but is invalid fails ADD naming the
//! file; a runtime that passes only `K8S_POD_NAME` (podman) gets
//! `pod_metadata_default_namespace` (default `default`).
//!
//! Needs root, iproute2, iptables and nft (pod netns rules are compared); fails without them.

mod common;

use common::{Netns, TestPod, Workdir, k8s_args, require_root, run_plugin};
use serde_json::{Value, json};

const TOOLS: &[&str] = &["ip", "iptables-save", "ip6tables-save", "nft"];
const POD_LOOKUP_FAILED: u64 = meshcni_plugin::flow::codes::POD_LOOKUP_FAILED as u64;
const CAPTURE_MISMATCH: u64 = meshcni_plugin::flow::codes::CAPTURE_MISMATCH as u64;

fn add_env<'a>(netns: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    cni_env("ADD", netns, args)
}

fn cni_env<'a>(command: &'a str, netns: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

/// ADD succeeds, hands back the prevResult, leaves the netns's rules as they were; returns
/// the plugin's stderr (its log).
fn add_passes_untouched(conf: &Value, args: &str, ns: &Netns) -> String {
    let before = ns.rules();
    let path = ns.path();
    let run = run_plugin(&add_env(&path, args), conf.to_string().as_bytes());
    run.expect_ok();
    assert_eq!(
        run.json()["ips"],
        conf["prevResult"]["ips"],
        "prevResult passed on: {run:?}"
    );
    assert_eq!(ns.rules(), before, "rules changed for a non-mesh pod");
    run.stderr
}

/// The info log line that says why the pod is not captured, with the metadata file path.
fn assert_info_line(log: &str, needles: &[&str]) {
    let found = log.lines().any(|l| {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            return false;
        };
        let text = v.to_string();
        v["level"] == "INFO" && needles.iter().all(|n| text.contains(n))
    });
    assert!(found, "no INFO log line naming {needles:?}:\n{log}");
}

#[test]
fn missing_metadata_file_is_not_a_mesh_pod() {
    require_root(TOOLS);
    let wd = Workdir::new();
    // Another pod of the namespace has a file; this one has none.
    TestPod {
        namespace: "demo",
        name: "other",
        injected: true,
        annotations: &[],
    }
    .write(&wd.metadata_dir());
    let ns = Netns::pod("nometa", false);
    let log = add_passes_untouched(&wd.conf(json!({})), &k8s_args("demo", "nometa"), &ns);
    let looked_for = wd.metadata_dir().join("pods/demo/nometa.json");
    assert_info_line(
        &log,
        &[
            "demo/nometa",
            &looked_for.display().to_string(),
            "not a mesh pod",
        ],
    );
    // Also in a namespace that has no directory at all, and with ambient on.
    let log = add_passes_untouched(
        &wd.conf(json!({"ambient_enabled": true})),
        &k8s_args("elsewhere", "nometa"),
        &ns,
    );
    assert_info_line(&log, &["pods/elsewhere/nometa.json", "not a mesh pod"]);
}

#[test]
fn invalid_metadata_file_fails_naming_the_path() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let dir = wd.metadata_dir().join("pods/demo");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("broken.json");
    std::fs::write(&file, "{\"spec\": [").expect("write");
    let ns = Netns::pod("badmeta", false);
    let before = ns.rules();
    let path = ns.path();
    let args = k8s_args("demo", "broken");
    let run = run_plugin(
        &add_env(&path, &args),
        wd.conf(json!({})).to_string().as_bytes(),
    );
    let text = run.expect_error(POD_LOOKUP_FAILED);
    assert!(
        text.contains(&file.display().to_string()) && text.contains("demo/broken"),
        "error must name the pod and the file: {text}"
    );
    assert_eq!(ns.rules(), before);
}

/// podman's CNI backend passes `IgnoreUnknown=1;K8S_POD_NAME=<container name>` and no
/// namespace: the pod is looked up in `pod_metadata_default_namespace` (default `default`).
#[test]
fn podman_args_without_namespace_use_the_default_namespace() {
    require_root(TOOLS);
    let wd = Workdir::new();
    for ns_name in ["default", "demo"] {
        TestPod {
            namespace: ns_name,
            name: "web",
            injected: true,
            annotations: &[],
        }
        .write(&wd.metadata_dir());
    }
    let podman_args = "IgnoreUnknown=1;K8S_POD_NAME=web";
    for (extra, want_ns) in [
        (json!({}), "default"),
        (json!({"pod_metadata_default_namespace": "demo"}), "demo"),
    ] {
        let ns = Netns::pod("podman", false);
        let path = ns.path();
        let run = run_plugin(
            &add_env(&path, podman_args),
            wd.conf(extra).to_string().as_bytes(),
        );
        run.expect_ok();
        let rules = ns.rules();
        assert!(
            rules.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
            "pod {want_ns}/web must be captured:\n{rules}\n{run:?}"
        );
        assert!(run.stderr.contains(&format!("{want_ns}/web")), "{run:?}");
    }
}

/// Container names podman allows but Kubernetes does not (`_`, capitals) cannot have a
/// metadata file: such containers start uncaptured instead of failing.
#[test]
fn names_that_cannot_have_a_file_are_not_mesh_pods() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let ns = Netns::pod("badname", false);
    let log = add_passes_untouched(
        &wd.conf(json!({})),
        "IgnoreUnknown=1;K8S_POD_NAME=My_Web",
        &ns,
    );
    assert_info_line(&log, &["My_Web", "not a mesh pod"]);
}

/// CHECK identifies and looks up the pod exactly as ADD does: a pod without a metadata file
/// (which ADD passed through) passes CHECK, and a podman pod (no `K8S_POD_NAMESPACE`) captured
/// by ADD is really checked, so an empty netns fails with CAPTURE_MISMATCH.
#[test]
fn check_identifies_pods_like_add() {
    require_root(TOOLS);
    let wd = Workdir::new();
    TestPod {
        namespace: "default",
        name: "web",
        injected: true,
        annotations: &[],
    }
    .write(&wd.metadata_dir());
    let conf = wd.conf(json!({})).to_string();

    // No metadata file: ADD passes it through, so CHECK must pass too.
    let ns = Netns::pod("chknometa", false);
    let path = ns.path();
    let args = k8s_args("demo", "nometa");
    run_plugin(&add_env(&path, &args), conf.as_bytes()).expect_ok();
    let before = ns.rules();
    run_plugin(&cni_env("CHECK", &path, &args), conf.as_bytes()).expect_ok();
    assert_eq!(ns.rules(), before, "CHECK changed the netns");

    // podman: ADD captures default/web; CHECK passes while the rules are there ...
    let podman_args = "IgnoreUnknown=1;K8S_POD_NAME=web";
    let captured = Netns::pod("chkpodman", false);
    let cpath = captured.path();
    run_plugin(&add_env(&cpath, podman_args), conf.as_bytes()).expect_ok();
    run_plugin(&cni_env("CHECK", &cpath, podman_args), conf.as_bytes()).expect_ok();
    // ... and fails on a netns without them.
    let empty = Netns::pod("chkpodempty", false);
    let epath = empty.path();
    let run = run_plugin(&cni_env("CHECK", &epath, podman_args), conf.as_bytes());
    let text = run.expect_error(CAPTURE_MISMATCH);
    assert!(
        text.contains("default/web"),
        "error must name the pod: {text}"
    );
}
