//! What ADD does when ambient detection fails (`ambient_detection_failure_policy`), through the
//! real `meshcni` binary: `closed` (the default) fails the ADD with a CNI error naming the pod
//! and the cause, so an ambient pod never starts uncaptured; `open` lets the pod continue on the
//! sidecar path (started, uncaptured unless it is a sidecar pod). Detection fails here because
//! the pod's namespace cannot be read (404 from the API; an invalid local namespace file) while
//! the pod itself can — so "open" is observable: the ADD succeeds.
//!
//! Needs root, iproute2, iptables and nft; fails without them.

mod common;

use common::{Netns, TestPod, Workdir, k8s_args, require_root, run_plugin};
use meshcni_testkit::kube_api::FakeApiServer;
use serde_json::{Value, json};

const TOOLS: &[&str] = &["ip", "iptables-save", "ip6tables-save", "nft"];
const POD_LOOKUP_FAILED: u64 = meshcni_plugin::flow::codes::POD_LOOKUP_FAILED as u64;

fn add(conf: &Value, ns: &Netns, pod_ns: &str, pod: &str) -> common::PluginRun {
    cni("ADD", conf, ns, pod_ns, pod)
}

fn cni(command: &str, conf: &Value, ns: &Netns, pod_ns: &str, pod: &str) -> common::PluginRun {
    let path = ns.path();
    let args = k8s_args(pod_ns, pod);
    run_plugin(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "0123456789abcdef"),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", &args),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        conf.to_string().as_bytes(),
    )
}

/// An API server that knows pod shop/app (not injected) but not namespace shop.
fn api_without_namespace(wd: &Workdir) -> (FakeApiServer, Value) {
    let pod = TestPod {
        namespace: "shop",
        name: "app",
        injected: false,
        annotations: &[],
    };
    let server = FakeApiServer::with_objects(vec![pod.pod_json()], vec![]).expect("fake API");
    let kubeconfig = wd.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml("t")).expect("write kubeconfig");
    let conf = wd.conf(json!({
        "pod_metadata_dir": null,
        "kubernetes": {"kubeconfig": kubeconfig},
        "ambient_enabled": true,
        "pod_fetch_attempts": 1
    }));
    (server, conf)
}

fn with(mut conf: Value, key: &str, v: Value) -> Value {
    conf[key] = v;
    conf
}

#[test]
fn detection_failure_fails_closed_by_default() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let (_server, conf) = api_without_namespace(&wd);
    let ns = Netns::pod("afpdef", false);
    let before = ns.rules();
    // No policy field, Istio's retry flag off: still closed.
    let conf = with(conf, "enable_ambient_detection_retry", json!(false));
    let text = add(&conf, &ns, "shop", "app").expect_error(POD_LOOKUP_FAILED);
    for n in ["shop/app", "ambient", "namespace shop not found", "closed"] {
        assert!(text.contains(n), "error must name {n:?}: {text}");
    }
    assert_eq!(ns.rules(), before);
    // Explicit "closed" is the same.
    let conf = with(conf, "ambient_detection_failure_policy", json!("closed"));
    add(&conf, &ns, "shop", "app").expect_error(POD_LOOKUP_FAILED);
}

#[test]
fn open_policy_lets_the_pod_start() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let (_server, conf) = api_without_namespace(&wd);
    let conf = with(conf, "ambient_detection_failure_policy", json!("open"));
    let ns = Netns::pod("afpopen", false);
    let before = ns.rules();
    let run = add(&conf, &ns, "shop", "app");
    run.expect_ok();
    assert_eq!(run.json()["ips"], conf["prevResult"]["ips"]);
    assert_eq!(ns.rules(), before, "a non-sidecar pod stays uncaptured");
    assert!(
        run.stderr.contains("ambient detection failed")
            && run.stderr.contains("WARN")
            && run.stderr.contains("ambient_detection_failure_policy=open"),
        "the fail-open decision is logged as a warning: {}",
        run.stderr
    );
}

#[test]
fn both_policies_with_a_bad_local_namespace_file() {
    require_root(TOOLS);
    let wd = Workdir::new();
    TestPod {
        namespace: "shop",
        name: "app",
        injected: false,
        annotations: &[],
    }
    .write(&wd.metadata_dir());
    let ns_file = wd.metadata_dir().join("namespaces/shop.json");
    std::fs::write(&ns_file, "not json").expect("write");
    let ns = Netns::pod("afplocal", false);
    let conf = wd.conf(json!({"ambient_enabled": true}));
    let text = add(&conf, &ns, "shop", "app").expect_error(POD_LOOKUP_FAILED);
    assert!(
        text.contains(&ns_file.display().to_string()),
        "names the file: {text}"
    );
    let conf = with(conf, "ambient_detection_failure_policy", json!("open"));
    add(&conf, &ns, "shop", "app").expect_ok();
}

/// CHECK takes ADD's decision path, the failure policy included: with `closed` a pod whose
/// ambient status cannot be decided fails CHECK as it fails ADD (it used to be checked as a
/// non-ambient pod and pass); with `open` it is checked as non-ambient.
#[test]
fn check_follows_the_failure_policy() {
    require_root(TOOLS);
    let wd = Workdir::new();
    TestPod {
        namespace: "shop",
        name: "app",
        injected: false,
        annotations: &[],
    }
    .write(&wd.metadata_dir());
    let ns_file = wd.metadata_dir().join("namespaces/shop.json");
    std::fs::write(&ns_file, "not json").expect("write");
    let ns = Netns::pod("afpcheck", false);
    let before = ns.rules();
    let conf = wd.conf(json!({"ambient_enabled": true}));
    let text = cni("CHECK", &conf, &ns, "shop", "app").expect_error(POD_LOOKUP_FAILED);
    for n in ["shop/app", "closed", &ns_file.display().to_string()] {
        assert!(text.contains(n), "CHECK error must name {n:?}: {text}");
    }
    let conf = with(conf, "ambient_detection_failure_policy", json!("open"));
    cni("CHECK", &conf, &ns, "shop", "app").expect_ok();
    assert_eq!(ns.rules(), before, "CHECK changed the netns");
}
