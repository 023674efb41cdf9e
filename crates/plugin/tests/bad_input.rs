//! Bad input to the real `meshcni` binary: every case runs the built plugin with an explicit
//! environment and stdin and checks (a) exit code 1, (b) a CNI error JSON on stdout whose
//! `code` is the expected one and whose `msg`/`details` name the cause, and (c) where a pod
//! netns is involved, that its `iptables-save`/`ip6tables-save`/`nft list ruleset` output is
//! byte-identical before and after — including a rule-apply failure *after* the v4 and v6
//! restores succeeded (the transaction must roll back). Plus the idempotence/compatibility
//! cases a runtime relies on (repeated DEL, CNI_ARGS order, portMappings spelling, VERSION,
//! STATUS).
//!
//! Needs root, iproute2, iptables (nft flavor) and nft; fails (never skips) without them.

mod common;

use std::path::Path;

use common::{Netns, TestPod, Workdir, k8s_args, require_root, run_plugin};
use meshcni_testkit::kube_api::FakeApiServer;
use serde_json::{Value, json};

const TOOLS: &[&str] = &[
    "ip",
    "iptables-save",
    "ip6tables-save",
    "nft",
    "iptables-nft-restore",
];

/// CNI codes (spec) and meshcni's own (`flow::codes`).
const INCOMPATIBLE_VERSION: u64 = 1;
const INVALID_ENVIRONMENT: u64 = 4;
const DECODING_FAILURE: u64 = 6;
const INVALID_NETWORK_CONFIG: u64 = 7;
const PLUGIN_NOT_AVAILABLE: u64 = 50;
const POD_LOOKUP_FAILED: u64 = meshcni_plugin::flow::codes::POD_LOOKUP_FAILED as u64;
const INVALID_POD_CONFIG: u64 = meshcni_plugin::flow::codes::INVALID_POD_CONFIG as u64;
const APPLY_FAILED: u64 = meshcni_plugin::flow::codes::APPLY_FAILED as u64;

const POD_NS: &str = "shop";

fn sidecar_pod<'a>(name: &'a str, annotations: &'a [(&'a str, &'a str)]) -> TestPod<'a> {
    TestPod {
        namespace: POD_NS,
        name,
        injected: true,
        annotations,
    }
}

/// The ADD environment for `pod` in `netns`.
fn add_env<'a>(netns: &'a str, args: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
        ("CNI_PATH", "/usr/lib/cni"),
    ]
}

fn assert_names(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "error text does not name {n:?}: {text}");
    }
}

/// Runs ADD for a sidecar pod into a fresh pod netns and checks the error and that the
/// netns's rules did not change. Returns the error text.
fn add_fails_unchanged(conf: &Value, pod: &str, netns: &Netns, code: u64) -> String {
    let before = netns.rules();
    let path = netns.path();
    let args = k8s_args(POD_NS, pod);
    let run = run_plugin(&add_env(&path, &args), conf.to_string().as_bytes());
    let text = run.expect_error(code);
    assert_eq!(
        netns.rules(),
        before,
        "rules in {} changed by a failed ADD",
        netns.name
    );
    text
}

// ---------------------------------------------------------------------------------------------
// Malformed configuration / environment

#[test]
fn malformed_json_stdin() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let ns = Netns::pod("badjson", false);
    let before = ns.rules();
    let path = ns.path();
    let args = k8s_args(POD_NS, "p");
    let run = run_plugin(
        &add_env(&path, &args),
        br#"{"cniVersion": "1.0.0", "name": "x", "type": "meshcni",,}"#,
    );
    let text = run.expect_error(DECODING_FAILURE);
    assert_names(
        &text,
        &[
            "failed to decode network config",
            "line 1",
            "not valid JSON",
        ],
    );
    assert_eq!(ns.rules(), before);
}

#[test]
fn missing_cni_version() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let ns = Netns::pod("nover", false);
    let text = add_fails_unchanged(
        &wd.conf(json!({"cniVersion": null})),
        "p",
        &ns,
        INVALID_NETWORK_CONFIG,
    );
    assert_names(&text, &["missing cniVersion"]);
}

#[test]
fn unsupported_cni_version() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let ns = Netns::pod("badver", false);
    let conf = wd.conf(json!({"cniVersion": "9.9.9"}));
    let text = add_fails_unchanged(&conf, "p", &ns, INCOMPATIBLE_VERSION);
    assert_names(&text, &["9.9.9", "1.1.0"]);
}

#[test]
fn missing_cni_netns_on_add() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let args = k8s_args(POD_NS, "p");
    let env: Vec<(&str, &str)> = add_env("", &args)
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let run = run_plugin(&env, wd.conf(json!({})).to_string().as_bytes());
    let text = run.expect_error(INVALID_ENVIRONMENT);
    assert_names(&text, &["CNI_NETNS", "missing", "ADD"]);
    // Set but empty is the same as missing for ADD.
    let run = run_plugin(
        &add_env("", &args),
        wd.conf(json!({})).to_string().as_bytes(),
    );
    assert_names(&run.expect_error(INVALID_ENVIRONMENT), &["CNI_NETNS"]);
}

#[test]
fn cni_netns_does_not_exist() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let missing = wd.dir.path().join("no-such-netns");
    let missing = missing.to_str().expect("utf-8 path");
    let args = k8s_args(POD_NS, "p");
    let run = run_plugin(
        &add_env(missing, &args),
        wd.conf(json!({})).to_string().as_bytes(),
    );
    let text = run.expect_error(APPLY_FAILED);
    assert_names(&text, &[missing, "No such file or directory", "shop/p"]);
}

#[test]
fn cni_netns_is_a_regular_file() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let file = wd.dir.path().join("not-a-netns");
    std::fs::write(&file, b"plain file\n").expect("write file");
    let file = file.to_str().expect("utf-8 path");
    let args = k8s_args(POD_NS, "p");
    let run = run_plugin(
        &add_env(file, &args),
        wd.conf(json!({})).to_string().as_bytes(),
    );
    let text = run.expect_error(APPLY_FAILED);
    assert_names(&text, &[file, "not an nsfs namespace file"]);
    assert_eq!(
        std::fs::read(file).expect("read file"),
        b"plain file\n",
        "file left untouched"
    );
}

#[test]
fn unknown_cni_command() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let ns = Netns::pod("badcmd", false);
    let before = ns.rules();
    let path = ns.path();
    let args = k8s_args(POD_NS, "p");
    let mut env = add_env(&path, &args);
    env[0] = ("CNI_COMMAND", "ATTACH");
    let run = run_plugin(&env, wd.conf(json!({})).to_string().as_bytes());
    assert_names(
        &run.expect_error(INVALID_ENVIRONMENT),
        &["unknown CNI_COMMAND", "ATTACH"],
    );
    assert_eq!(ns.rules(), before);
}

#[test]
fn malformed_cni_args() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("p", &[]).write(&wd.metadata_dir());
    let ns = Netns::pod("badargs", false);
    let before = ns.rules();
    let path = ns.path();
    for (raw, names) in [
        (
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME",
            &["invalid CNI_ARGS", "\"K8S_POD_NAME\"", "KEY=VALUE"][..],
        ),
        (
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p=q",
            &["invalid CNI_ARGS", "p=q"][..],
        ),
        (
            "IgnoreUnknown=maybe;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p",
            &["IgnoreUnknown", "maybe", "boolean"][..],
        ),
        ("=x;K8S_POD_NAME=p", &["empty key"][..]),
    ] {
        let run = run_plugin(
            &add_env(&path, raw),
            wd.conf(json!({})).to_string().as_bytes(),
        );
        assert_names(&run.expect_error(INVALID_ENVIRONMENT), names);
    }
    assert_eq!(ns.rules(), before);
}

/// A `prevResult` that cannot be passed on (bad address, unsupported version) fails ADD before
/// anything is applied — Istio converts it while parsing the config — instead of after the
/// capture has been installed.
#[test]
fn malformed_prev_result_fails_before_capture() {
    require_root(TOOLS);
    let cases = [
        (
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.199.0.500/24"}]}),
            DECODING_FAILURE,
            "10.199.0.500/24",
        ),
        (
            json!({"cniVersion": "9.9.9", "ips": []}),
            INCOMPATIBLE_VERSION,
            "9.9.9",
        ),
    ];
    for (i, (prev, code, cause)) in cases.into_iter().enumerate() {
        let wd = Workdir::new();
        let name = format!("bad-prev-{i}");
        sidecar_pod(&name, &[]).write(&wd.metadata_dir());
        let ns = Netns::pod("badprev", true);
        let conf = wd.conf(json!({ "prevResult": prev }));
        let text = add_fails_unchanged(&conf, &name, &ns, code);
        assert_names(&text, &[cause]);
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid pod annotations → code 101 naming the annotation key and the bad value

#[test]
fn invalid_annotation_values() {
    require_root(TOOLS);
    let cases: &[(&str, &str, &str)] = &[
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.0.0.0/8,10.300.0.0/16",
            "10.300.0.0/16",
        ),
        (
            "traffic.sidecar.istio.io/includeInboundPorts",
            "8080,70000",
            "70000",
        ),
        (
            "sidecar.istio.io/interceptionMode",
            "FOO",
            "REDIRECT or TPROXY",
        ),
        (
            "traffic.sidecar.istio.io/excludeInterfaces",
            "eth0,veth:bad",
            "veth:bad",
        ),
        (
            "traffic.sidecar.istio.io/excludeInterfaces",
            "averyveryverylongname0",
            "longer than 15 bytes",
        ),
    ];
    for (i, (key, value, cause)) in cases.iter().enumerate() {
        let wd = Workdir::new();
        let name = format!("bad-ann-{i}");
        let ann = [(*key, *value)];
        sidecar_pod(&name, &ann).write(&wd.metadata_dir());
        let ns = Netns::pod("badann", true);
        let text = add_fails_unchanged(&wd.conf(json!({})), &name, &ns, INVALID_POD_CONFIG);
        assert_names(&text, &[key, value, cause, &format!("{POD_NS}/{name}")]);
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes API failures → code 100

fn kubeconfig_conf(wd: &Workdir, kubeconfig: &Path) -> Value {
    wd.conf(json!({
        "pod_metadata_dir": null,
        "kubernetes": {"kubeconfig": kubeconfig},
        "pod_fetch_attempts": 1
    }))
}

#[test]
fn kubernetes_api_unreachable() {
    require_root(TOOLS);
    let wd = Workdir::new();
    // A port that was just free: bind, note it, close it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let server = format!("https://127.0.0.1:{port}");
    let kubeconfig = wd.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\n  name: c\n\
             contexts:\n- context:\n    cluster: c\n    user: u\n  name: ctx\ncurrent-context: ctx\nusers:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .expect("write kubeconfig");
    let ns = Netns::pod("noapi", false);
    let started = std::time::Instant::now();
    let text = add_fails_unchanged(
        &kubeconfig_conf(&wd, &kubeconfig),
        "p",
        &ns,
        POD_LOOKUP_FAILED,
    );
    assert_names(&text, &["shop/p", &format!("127.0.0.1:{port}")]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "pod_fetch_attempts=1 must fail fast, took {:?}",
        started.elapsed()
    );
}

#[test]
fn pod_not_found_in_kubernetes_api() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let other = sidecar_pod("someone-else", &[]);
    let server = FakeApiServer::with_objects(vec![other.pod_json()], vec![other.namespace_json()])
        .expect("fake API server");
    let kubeconfig = wd.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml("test-token")).expect("write kubeconfig");
    let ns = Netns::pod("nopod", false);
    let text = add_fails_unchanged(
        &kubeconfig_conf(&wd, &kubeconfig),
        "ghost",
        &ns,
        POD_LOOKUP_FAILED,
    );
    assert_names(&text, &["shop/ghost", "not found"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/shop/pods/ghost"),
        "the plugin asked the API for the pod: {:?}",
        server
            .requests()
            .iter()
            .map(|r| &r.path)
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Rule-apply failure after the v4 and v6 restores succeeded → rolled back
//
// The pod has a global IPv6 address, so the plan carries v4 + v6 rules and the `::6/128`
// address on `lo` (Istio's inbound passthrough source). IPv6 is disabled on `lo` only, so
// both restores succeed and the kernel then refuses the address (EACCES): a genuine late
// failure that must leave the netns exactly as it was.

fn late_failure_netns(tag: &str) -> Netns {
    let ns = Netns::pod(tag, true);
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    ns
}

fn late_failure(backend: Value, ns: &Netns) -> String {
    let wd = Workdir::new();
    sidecar_pod("late", &[]).write(&wd.metadata_dir());
    let text = add_fails_unchanged(&wd.conf(backend), "late", ns, APPLY_FAILED);
    assert_names(
        &text,
        &[
            "shop/late",
            "::6/128",
            "lo",
            &ns.path(),
            "Permission denied",
        ],
    );
    text
}

/// Proves the setup really fails late: with the same pod and netns but IPv6 left enabled on
/// `lo`, ADD succeeds and installs v4 and v6 capture.
#[test]
fn late_failure_setup_succeeds_when_lo_has_ipv6() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("late", &[]).write(&wd.metadata_dir());
    let ns = Netns::pod("lateok", true);
    let path = ns.path();
    let args = k8s_args(POD_NS, "late");
    run_plugin(
        &add_env(&path, &args),
        wd.conf(json!({})).to_string().as_bytes(),
    )
    .expect_ok();
    let v4 = ns.exec("iptables-save", &[]);
    let v6 = ns.exec("ip6tables-save", &[]);
    assert!(
        v4.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{v4}"
    );
    assert!(
        v6.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{v6}"
    );
    assert!(
        ns.ip(&["-6", "addr", "show", "dev", "lo"])
            .contains("::6/128")
    );
}

#[test]
fn late_apply_failure_rolls_back_iptables() {
    require_root(TOOLS);
    let ns = late_failure_netns("lateipt");
    late_failure(json!({}), &ns);
}

#[test]
fn late_apply_failure_rolls_back_native_nftables() {
    require_root(TOOLS);
    let ns = late_failure_netns("latenft");
    late_failure(json!({"native_nftables": true}), &ns);
}

/// Pre-existing rules in the tables the capture touches (`nat` v4/v6) must survive a rolled
/// back ADD exactly as `iptables-save`/`ip6tables-save` show them.
fn with_existing_rules(tag: &str) -> Netns {
    let ns = late_failure_netns(tag);
    ns.exec("iptables-nft", &["-t", "nat", "-N", "PRE_EXISTING"]);
    ns.exec(
        "iptables-nft",
        &["-t", "nat", "-A", "PRE_EXISTING", "-j", "RETURN"],
    );
    ns.exec(
        "iptables-nft",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "10.1.2.3/32",
            "-j",
            "PRE_EXISTING",
        ],
    );
    ns.exec(
        "ip6tables-nft",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "fd00::9/128",
            "-j",
            "RETURN",
        ],
    );
    ns.exec(
        "ip6tables-nft",
        &[
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "fd00::9/128",
            "-j",
            "ACCEPT",
        ],
    );
    ns
}

#[test]
fn late_apply_failure_keeps_existing_iptables_rules() {
    require_root(TOOLS);
    let ns = with_existing_rules("lateexist");
    let save = |ns: &Netns| {
        (
            ns.exec("iptables-save", &[]),
            ns.exec("ip6tables-save", &[]),
        )
    };
    let strip = |(a, b): (String, String)| -> String {
        format!("{a}{b}")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = strip(save(&ns));
    assert!(before.contains("-A PRE_EXISTING -j RETURN"), "{before}");
    let wd = Workdir::new();
    sidecar_pod("late", &[]).write(&wd.metadata_dir());
    let path = ns.path();
    let args = k8s_args(POD_NS, "late");
    let run = run_plugin(
        &add_env(&path, &args),
        wd.conf(json!({})).to_string().as_bytes(),
    );
    assert_names(&run.expect_error(APPLY_FAILED), &["::6/128"]);
    assert_eq!(
        strip(save(&ns)),
        before,
        "iptables view changed by a rolled-back ADD"
    );
}

/// The strict form of the previous test: also the nft view. Currently fails: the iptables-nft
/// rollback (`iptables-nft-restore` of the saved `*nat` section without `--noflush`) recreates
/// `table ip nat` with all four base chains (PREROUTING/INPUT/OUTPUT/POSTROUTING) where before
/// only OUTPUT existed, and moves the table to the end of the ruleset. Same filtering verdicts,
/// different `nft list ruleset` bytes. Owner: crates/netx (rollback for the nft flavor should
/// snapshot/restore at the nft level, as the native backend does).
#[test]
fn late_apply_failure_keeps_existing_rules_byte_identical_in_nft() {
    require_root(TOOLS);
    let ns = with_existing_rules("lateexact");
    late_failure(json!({}), &ns);
}

// ---------------------------------------------------------------------------------------------
// Positive idempotence / compatibility cases

#[test]
fn del_twice_without_netns_or_prev_result() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let conf = wd.conf(json!({"prevResult": null}));
    let args = k8s_args(POD_NS, "gone");
    let mut env = add_env("", &args);
    env[0] = ("CNI_COMMAND", "DEL");
    for _ in 0..2 {
        let run = run_plugin(&env, conf.to_string().as_bytes());
        run.expect_ok();
        assert_eq!(run.stdout.trim(), "", "DEL prints nothing");
    }
    // DEL tolerates a malformed CNI_ARGS too (it must be able to clean up).
    env[4] = ("CNI_ARGS", "K8S_POD_NAME");
    run_plugin(&env, conf.to_string().as_bytes()).expect_ok();
}

/// Istio's DEL never fails: a plugin configuration broken after pods started (here an
/// unsupported `intercept_type`, a relative `pod_metadata_dir`, a wrongly typed field) fails
/// ADD but must not block the teardown of existing pods.
#[test]
fn del_succeeds_with_an_invalid_plugin_config() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let args = k8s_args(POD_NS, "gone");
    let ns = Netns::new("delconf");
    let path = ns.path();
    for bad in [
        json!({"kubernetes": {"intercept_type": "ebpf"}}),
        json!({"pod_metadata_dir": "relative/dir"}),
        json!({"ambient_enabled": "yes"}),
    ] {
        let conf = wd.conf(bad.clone());
        let add = run_plugin(&add_env(&path, &args), conf.to_string().as_bytes());
        add.expect_error(INVALID_NETWORK_CONFIG);
        let mut env = add_env("", &args);
        env[0] = ("CNI_COMMAND", "DEL");
        let del = run_plugin(&env, conf.to_string().as_bytes());
        del.expect_ok();
        assert_eq!(del.stdout.trim(), "", "DEL prints nothing for {bad}");
    }
}

#[test]
fn cni_args_in_any_order_with_ignore_unknown() {
    require_root(TOOLS);
    let wd = Workdir::new();
    sidecar_pod("orders", &[]).write(&wd.metadata_dir());
    for raw in [
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=orders;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u",
        "K8S_POD_UID=u;K8S_POD_NAME=orders;FOO=bar;K8S_POD_NAMESPACE=shop;IgnoreUnknown=true",
        "K8S_POD_NAME=orders;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_NAMESPACE=shop;IgnoreUnknown=1",
    ] {
        let ns = Netns::pod("argorder", false);
        let path = ns.path();
        let run = run_plugin(
            &add_env(&path, raw),
            wd.conf(json!({})).to_string().as_bytes(),
        );
        run.expect_ok();
        assert_eq!(
            run.json()["ips"][0]["address"],
            "10.199.0.5/24",
            "prevResult passed on: {raw}"
        );
        let rules = ns.exec("iptables-save", &[]);
        assert!(
            rules.contains("-A OUTPUT -j ISTIO_OUTPUT"),
            "{raw}: capture applied:\n{rules}"
        );
    }
}

#[test]
fn port_mappings_in_either_key_case_are_accepted() {
    require_root(TOOLS);
    let wd = Workdir::new();
    TestPod {
        namespace: POD_NS,
        name: "plain",
        injected: false,
        annotations: &[],
    }
    .write(&wd.metadata_dir());
    let ns = Netns::pod("portmap", false);
    let path = ns.path();
    let args = k8s_args(POD_NS, "plain");
    for mappings in [
        json!([{"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP", "HostIP": ""}]),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    ] {
        let conf = wd.conf(json!({
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": mappings}
        }));
        let run = run_plugin(&add_env(&path, &args), conf.to_string().as_bytes());
        run.expect_ok();
        assert_eq!(run.json()["cniVersion"], "1.0.0");
        assert_eq!(run.json()["ips"][0]["address"], "10.199.0.5/24");
    }
}

#[test]
fn version_lists_every_supported_version() {
    require_root(TOOLS);
    let run = run_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.0.0"}"#);
    run.expect_ok();
    let v = run.json();
    let listed: Vec<&str> = v["supportedVersions"]
        .as_array()
        .expect("supportedVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(listed.contains(&want), "{want} missing from {listed:?}");
    }
    // libcni answers with its own current version whatever was asked; so does meshcni.
    let answered = v["cniVersion"].as_str().expect("cniVersion");
    assert!(
        listed.contains(&answered),
        "reply cniVersion {answered} not in {listed:?}"
    );
}

#[test]
fn status_with_missing_metadata_dir_is_code_50() {
    require_root(TOOLS);
    let wd = Workdir::new();
    let missing = wd.dir.path().join("no-metadata");
    let conf =
        wd.conf(json!({"cniVersion": "1.1.0", "pod_metadata_dir": missing, "prevResult": null}));
    let run = run_plugin(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes());
    let text = run.expect_error(PLUGIN_NOT_AVAILABLE);
    assert_names(
        &text,
        &["metadata directory", missing.to_str().expect("utf-8")],
    );
    // And ready once it exists.
    std::fs::create_dir_all(&missing).expect("create metadata dir");
    run_plugin(&[("CNI_COMMAND", "STATUS")], conf.to_string().as_bytes()).expect_ok();
}
