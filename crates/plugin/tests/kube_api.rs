//! The plugin's pod path over real-shaped Kubernetes data: configuration (HEAD and G1
//! shapes) → kubeconfig → API client (or local metadata dir) → pod → decision / capture
//! config, and ambient detection from the namespace.

use std::path::{Path, PathBuf};

use meshcni_kube::{ApiClient, ClientOptions, LocalPodSource, PodSource};
use meshcni_plugin::config::PluginConf;
use meshcni_plugin::pod::{
    Decision, PodRef, SkipReason, decide, is_ambient_pod, skip_before_lookup,
};
use meshcni_testkit::kube_api::FakeApiServer;

const POD_NS: &str = "default";
const POD_NAME: &str = "productpage-v1-5d9b4c9849-x7kq2";

fn kube_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kube/tests/fixtures")
        .join(name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(kube_fixture(name)).expect("read fixture"))
        .expect("fixture json")
}

/// A plain (not injected) pod in the ambient namespace.
fn ambient_candidate() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ratings-v1-7d8f9c-abcde", "namespace": "ambient-demo",
                     "uid": "11111111-2222-3333-4444-555555555555",
                     "labels": {"app": "ratings"},
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]},
        "spec": {"containers": [{"name": "ratings", "image": "ratings:1"}], "nodeName": "kind-worker"},
        "status": {"phase": "Pending"}
    })
}

fn fake_cluster() -> FakeApiServer {
    FakeApiServer::with_objects(
        vec![json("pod-productpage.json"), ambient_candidate()],
        vec![
            json("namespace-default.json"),
            json("namespace-ambient.json"),
        ],
    )
    .expect("fake API server")
}

/// HEAD-shaped conflist entry whose run dir holds the kubeconfig, like the agent writes it.
fn head_conf(run_dir: &Path) -> PluginConf {
    let entry = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "istio-cni",
        "type": "meshcni",
        "plugin_log_level": "info",
        "cni_agent_run_dir": run_dir,
        "ambient_enabled": true,
        "enablement_selectors": [
            {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
            {"podSelector": {"matchExpressions": [{"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}]},
             "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}}
        ],
        "exclude_namespaces": ["kube-system"],
        "pod_namespace": "istio-system",
        "native_nftables": false,
        "enable_ambient_detection_retry": false
    });
    PluginConf::from_json(entry.to_string().as_bytes()).expect("HEAD conf")
}

fn expect_productpage_sidecar(decision: Decision) {
    let Decision::Sidecar(cfg) = decision else {
        panic!("expected sidecar capture, got {decision:?}")
    };
    assert_eq!(cfg.inbound_interception_mode, "REDIRECT");
    assert_eq!(
        (cfg.proxy_uid.as_str(), cfg.proxy_gid.as_str()),
        ("1337", "1337")
    );
    assert_eq!(cfg.outbound_ip_ranges_include, "*");
    assert_eq!(cfg.outbound_ip_ranges_exclude, "");
    assert_eq!(cfg.inbound_ports_include, "*");
    // Annotation "15020" + the fix-up.
    assert_eq!(cfg.inbound_ports_exclude, "15020,15021,15090");
    assert_eq!(cfg.outbound_ports_exclude, "15020");
    assert!(!cfg.redirect_dns && !cfg.enable_ipv6);
}

#[test]
fn head_conf_api_source_sidecar_pod() {
    let server = fake_cluster();
    let run_dir = tempfile::tempdir().expect("tmp");
    let conf = head_conf(run_dir.path());
    std::fs::write(
        conf.kubeconfig_path(),
        server.kubeconfig_yaml("istio-cni-token"),
    )
    .expect("write kubeconfig");

    let args = PodRef {
        namespace: POD_NS,
        name: POD_NAME,
    };
    assert_eq!(skip_before_lookup(&conf, args), None);
    let client = ApiClient::from_kubeconfig(&conf.kubeconfig_path(), ClientOptions::default())
        .expect("client");
    let source: &dyn PodSource = &client;

    let pod = source.get_pod(POD_NS, POD_NAME).expect("pod");
    let ns = source.get_namespace(POD_NS).expect("namespace");
    assert!(
        !is_ambient_pod(&pod, &ns.metadata.labels, &conf.enablement_selectors()),
        "sidecar pods are never ambient"
    );
    expect_productpage_sidecar(decide(&conf, args, &pod).expect("decision"));

    let reqs = server.requests();
    assert!(
        reqs.iter()
            .all(|r| r.header("authorization") == Some("Bearer istio-cni-token"))
    );
}

#[test]
fn local_metadata_dir_gives_the_same_decision() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = LocalPodSource::new(dir.path());
    std::fs::create_dir_all(src.pod_path(POD_NS, POD_NAME).parent().expect("parent"))
        .expect("mkdir");
    std::fs::copy(
        kube_fixture("pod-productpage.json"),
        src.pod_path(POD_NS, POD_NAME),
    )
    .expect("copy");
    let entry = serde_json::json!({
        "type": "meshcni",
        "pod_metadata_dir": dir.path(),
        "exclude_namespaces": null
    });
    let conf = PluginConf::from_json(entry.to_string().as_bytes()).expect("conf");
    assert_eq!(conf.pod_metadata_dir.as_deref(), Some(dir.path()));

    let source: Box<dyn PodSource> = Box::new(LocalPodSource::new(
        conf.pod_metadata_dir.clone().expect("dir"),
    ));
    let pod = source.get_pod(POD_NS, POD_NAME).expect("pod");
    let args = PodRef {
        namespace: POD_NS,
        name: POD_NAME,
    };
    expect_productpage_sidecar(decide(&conf, args, &pod).expect("decision"));

    let err = source.get_pod(POD_NS, "missing").expect_err("not found");
    assert!(err.is_not_found() && !err.is_retryable());
}

#[test]
fn g1_conf_kubeconfig_and_exclusions() {
    let server = fake_cluster();
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("ZZZ-istio-cni-kubeconfig");
    std::fs::write(&kc, server.kubeconfig_yaml("g1-token")).expect("write");
    let entry = serde_json::json!({
        "cniVersion": "0.3.1",
        "name": "istio-cni",
        "type": "meshcni",
        "log_level": "info",
        "log_uds_address": "/var/run/istio-cni/log.sock",
        "ambient_enabled": false,
        "kubernetes": {
            "kubeconfig": kc,
            "cni_bin_dir": "/opt/cni/bin",
            "exclude_namespaces": ["istio-system", "kube-system"]
        }
    });
    let conf = PluginConf::from_json(entry.to_string().as_bytes()).expect("G1 conf");
    assert_eq!(conf.kubeconfig_path(), kc);
    assert_eq!(
        skip_before_lookup(
            &conf,
            PodRef {
                namespace: "istio-system",
                name: "istiod-1"
            }
        ),
        Some(SkipReason::ExcludedNamespace("istio-system".into()))
    );
    let client = ApiClient::from_kubeconfig(&conf.kubeconfig_path(), ClientOptions::default())
        .expect("client");
    let pod = client.get_pod(POD_NS, POD_NAME).expect("pod");
    expect_productpage_sidecar(
        decide(
            &conf,
            PodRef {
                namespace: POD_NS,
                name: POD_NAME,
            },
            &pod,
        )
        .expect("decision"),
    );
}

#[test]
fn ambient_pod_detected_from_namespace_label() {
    let server = fake_cluster();
    let run_dir = tempfile::tempdir().expect("tmp");
    let conf = head_conf(run_dir.path());
    std::fs::write(conf.kubeconfig_path(), server.kubeconfig_yaml("t")).expect("write");
    let client = ApiClient::from_kubeconfig(&conf.kubeconfig_path(), ClientOptions::default())
        .expect("client");

    let pod = client
        .get_pod("ambient-demo", "ratings-v1-7d8f9c-abcde")
        .expect("pod");
    let ns = client.get_namespace("ambient-demo").expect("ns");
    assert!(is_ambient_pod(
        &pod,
        &ns.metadata.labels,
        &conf.enablement_selectors()
    ));
    // On the sidecar path the same pod is a pass-through (no proxy).
    assert_eq!(
        decide(
            &conf,
            PodRef {
                namespace: "ambient-demo",
                name: "ratings-v1-7d8f9c-abcde"
            },
            &pod
        ),
        Ok(Decision::Skip(SkipReason::NoIstioProxy))
    );
    // The same pod in the non-ambient namespace is not ambient.
    let default_ns = client.get_namespace("default").expect("ns");
    assert!(!is_ambient_pod(
        &pod,
        &default_ns.metadata.labels,
        &conf.enablement_selectors()
    ));
}

#[test]
fn missing_pod_is_not_found_and_own_agent_pod_needs_no_lookup() {
    let server = fake_cluster();
    let run_dir = tempfile::tempdir().expect("tmp");
    let conf = head_conf(run_dir.path());
    std::fs::write(conf.kubeconfig_path(), server.kubeconfig_yaml("t")).expect("write");
    let client = ApiClient::from_kubeconfig(&conf.kubeconfig_path(), ClientOptions::default())
        .expect("client");
    let err = client.get_pod(POD_NS, "gone-pod").expect_err("404");
    assert_eq!(err.to_string(), "pod default/gone-pod not found");

    let before = server.requests().len();
    assert_eq!(
        skip_before_lookup(
            &conf,
            PodRef {
                namespace: "istio-system",
                name: "istio-cni-node-abcde"
            }
        ),
        Some(SkipReason::OwnAgentPod)
    );
    assert_eq!(server.requests().len(), before);
}

#[test]
fn missing_kubeconfig_is_a_clear_error() {
    let run_dir = tempfile::tempdir().expect("tmp");
    let conf = head_conf(run_dir.path());
    let err = ApiClient::from_kubeconfig(&conf.kubeconfig_path(), ClientOptions::default())
        .expect_err("no kubeconfig yet");
    let msg = err.to_string();
    assert!(msg.contains("istio-cni-kubeconfig"), "{msg}");
}
