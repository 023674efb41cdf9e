//! `meshcni-agent doctor` (issue 12 item 3) as the oracle of a real node: the real agent in
//! `inpod` mode (in a lab node netns, workloads from a file), the real plugin exec'd like a
//! runtime for an ambient pod and a sidecar pod, the in-pod ztunnel stand-in connected. Green
//! first (CLI exit 0 and `/debug/doctor` 200, every pod's should/why right), then each kind of
//! mismatch is provoked on its own and must be the only thing reported (exit non-zero), and
//! undone: sidecar rules drifted and missing, ambient in-pod rules drifted, an ambient pod not
//! enrolled, a pod enrolled that should not be, our conflist entry missing and first in the
//! chain, the plugin binary changed, the kubeconfig unparsable, the ambient config file naming
//! another mode.
//!
//! Root only; every namespace is the test's own (`mcni-*`), removed on success and failure.

mod ambient_mesh;

use meshcni_testkit::stack as kit;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kit::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, namespace_json, plugin_add, pod_json,
    write_pod_metadata, write_workloads,
};
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab};
use serde_json::{Value, json};

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

fn namespaces(mesh_ambient: bool) -> Vec<Value> {
    vec![
        namespace_json(
            "mesh",
            if mesh_ambient {
                &[(DATAPLANE_MODE, "ambient")]
            } else {
                &[]
            },
        ),
        namespace_json("plain", &[]),
        namespace_json("side", &[]),
        namespace_json("kube-system", &[]),
    ]
}

/// A pod as Istio's injector leaves it: the status annotation and an `istio-proxy` sidecar.
fn sidecar_pod(namespace: &str, name: &str, ip: Ipv4Addr) -> Value {
    let mut p = pod_json(
        namespace,
        name,
        NODE,
        Some(ip),
        &[],
        &[(
            "sidecar.istio.io/status",
            r#"{"initContainers":null,"containers":["istio-proxy"],"volumes":["istio-envoy"]}"#,
        )],
    );
    p["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"]}));
    p
}

struct Rig {
    lab: MultiNodeLab,
    _tmp: tempfile::TempDir,
    dirs: AgentDirs,
    node_ns: PathBuf,
    agent_bin: PathBuf,
    plugin: PathBuf,
}

impl Rig {
    fn args(&self) -> Vec<String> {
        kit::agent_args_for(&self.dirs, StackMode::Inpod)
    }

    /// `meshcni-agent <flags> doctor [--json]` in the node netns: (exit success, stdout).
    fn doctor_raw(&self, json: bool) -> (bool, String, String) {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node_ns.display()))
            .arg("--")
            .arg(&self.agent_bin)
            .args(self.args())
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NODE_NAME", NODE);
        if json {
            c.arg("--json");
        }
        let out = c.output().expect("run meshcni-agent doctor");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn doctor(&self) -> (bool, Value) {
        let (ok, stdout, stderr) = self.doctor_raw(true);
        let v: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e}): {stdout}\n{stderr}"));
        (ok, v)
    }

    /// Assert exactly `expected` fails (`node:<check>`, `pod:<ns>/<name>`), with the exit code
    /// to match; returns the report.
    fn expect_failing(&self, what: &str, expected: &[&str]) -> Value {
        let (ok, report) = self.doctor();
        let failing = failing(&report);
        let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            failing,
            want,
            "{what}: wrong set of mismatches; report:\n{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        assert_eq!(ok, expected.is_empty(), "{what}: exit status");
        assert_eq!(report["ok"], Value::Bool(expected.is_empty()), "{what}");
        report
    }

    fn link_netns(&self, name: &str) {
        let link = self.dirs.netns_dir.join(format!("cni-{name}"));
        if !link.exists() {
            std::os::unix::fs::symlink(self.lab.pod(name).netns.path(), &link)
                .expect("symlink netns");
        }
    }

    fn add(&self, ns: &str, name: &str) {
        let out = plugin_add(
            &self.plugin,
            &self.node_ns,
            self.lab.pod(name).netns.path(),
            ns,
            name,
            self.lab.pod(name).ip,
            &self.dirs,
        )
        .expect("plugin");
        assert!(out.success, "ADD {ns}/{name}: {out:?}");
    }

    fn exec_pod(&self, pod: &str, program: &str, args: &[&str]) {
        kit::exec_in(self.lab.pod(pod).netns.path(), program, args)
            .unwrap_or_else(|e| panic!("{program} {args:?} in pod {pod}: {e}"));
    }
}

fn failing(report: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in report["node_checks"].as_array().expect("node_checks") {
        if c["ok"] != Value::Bool(true) {
            out.insert(format!("node:{}", c["check"].as_str().unwrap_or("?")));
        }
    }
    for p in report["pods"].as_array().expect("pods") {
        if p["ok"] != Value::Bool(true) {
            out.insert(format!(
                "pod:{}/{}",
                p["namespace"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

fn pod<'a>(report: &'a Value, key: &str) -> &'a Value {
    kit::doctor_pod(report, key)
}

fn node_check<'a>(report: &'a Value, check: &str) -> Vec<&'a Value> {
    report["node_checks"]
        .as_array()
        .expect("node_checks")
        .iter()
        .filter(|c| c["check"] == check)
        .collect()
}

/// Replace a file's content for the duration of `f`, then put the original back.
fn with_file(path: &Path, content: &[u8], f: impl FnOnce()) {
    let orig = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f();
    std::fs::write(path, orig).unwrap_or_else(|e| panic!("restore {}: {e}", path.display()));
}

#[test]
fn doctor_is_green_on_a_good_node_and_names_each_kind_of_mismatch() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, plugin) = binaries();
    let lab = MultiNodeLab::new("doc", &[&["a", "s", "p", "b"]]).expect("lab");
    let node_ns = lab.node(1).netns.path().to_path_buf();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
    let rig = Rig {
        node_ns,
        dirs,
        _tmp: tmp,
        agent_bin,
        plugin,
        lab,
    };
    let ip = |n: &str| rig.lab.pod(n).ip;
    let side = sidecar_pod("side", "s", ip("s"));
    let green_pods = |a_ip: Option<Ipv4Addr>| {
        vec![
            pod_json("mesh", "a", NODE, a_ip, &[], &[]),
            side.clone(),
            pod_json("plain", "p", NODE, Some(ip("p")), &[], &[]),
            pod_json(
                "mesh",
                "o",
                NODE,
                Some("10.99.0.9".parse().expect("ip")),
                &[(DATAPLANE_MODE, "none")],
                &[],
            ),
            pod_json(
                "kube-system",
                "k",
                NODE,
                Some("10.99.0.10".parse().expect("ip")),
                &[],
                &[],
            ),
        ]
    };
    write_workloads(&rig.dirs.workloads, &namespaces(true), &green_pods(None)).expect("workloads");
    for (ns, p) in [("mesh", &green_pods(None)[0]), ("side", &side)] {
        let nsobj = namespaces(true)
            .into_iter()
            .find(|n| n["metadata"]["name"] == ns)
            .expect("ns");
        write_pod_metadata(&rig.dirs.meta, p, &nsobj).expect("metadata");
    }
    rig.link_netns("s");
    let mut agent = Agent::start_mode(
        &rig.agent_bin,
        &rig.node_ns,
        NODE,
        &rig.dirs,
        StackMode::Inpod,
        &[],
    )
    .expect("agent");
    let _zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&rig.dirs.zds_socket))
        .expect("stand-in");
    agent.wait_ready(WAIT).expect("ready");
    rig.add("mesh", "a");
    rig.add("side", "s");
    // The pod's IP reaches the workload source, as the API's watch would bring it.
    write_workloads(
        &rig.dirs.workloads,
        &namespaces(true),
        &green_pods(Some(ip("a"))),
    )
    .expect("workloads");

    // ---- green: CLI and HTTP.
    let report = rig.expect_failing("green", &[]);
    let expect_pod = |key: &str, capture: &str, should: bool, reason: &str| {
        let p = pod(&report, key);
        assert_eq!(p["capture"], capture, "{key}: {p}");
        assert_eq!(p["should_capture"], should, "{key}: {p}");
        assert!(
            p["reason"].as_str().unwrap_or("").contains(reason),
            "{key}: reason {:?} lacks {reason:?}",
            p["reason"]
        );
        assert_eq!(
            p["captured"],
            if should {
                Value::Bool(true)
            } else {
                Value::Null
            },
            "{key}: {p}"
        );
    };
    expect_pod("mesh/a", "ambient", true, "ambient");
    expect_pod("side/s", "sidecar", true, "sidecar injected");
    expect_pod("plain/p", "none", false, "not in the mesh");
    expect_pod("mesh/o", "none", false, "opted out");
    expect_pod(
        "kube-system/k",
        "none",
        false,
        "excluded namespace kube-system",
    );
    for check in [
        "cni-config",
        "plugin-binary",
        "kubeconfig",
        "ambient-config",
        "ambient-enrollment",
        "inpod-host-probe",
    ] {
        assert_eq!(node_check(&report, check).len(), 1, "{check}: {report}");
    }
    let (ok, table, _) = rig.doctor_raw(false);
    assert!(ok);
    assert!(
        table.contains("side/s") && table.contains("cni-config") && !table.contains("FAIL"),
        "{table}"
    );
    let monitoring = agent.monitoring();
    let (status, body) =
        kit::http_get_in(&rig.node_ns, &monitoring, "/debug/doctor").expect("GET /debug/doctor");
    assert_eq!(status, 200, "{body}");
    let served: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(served["ok"], true);
    assert_eq!(failing(&served), BTreeSet::new());
    assert_eq!(served["pods"].as_array().map(Vec::len), Some(5));

    // Sidecar rules drifted, seen by the running agent's endpoint too (503).
    rig.exec_pod("s", "iptables", &["-t", "nat", "-F", "ISTIO_OUTPUT"]);
    let r = rig.expect_failing("sidecar drift", &["pod:side/s"]);
    assert!(
        pod(&r, "side/s")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("rules differ"),
        "{r}"
    );
    let (status, body) =
        kit::http_get_in(&rig.node_ns, &monitoring, "/debug/doctor").expect("GET /debug/doctor");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("rules differ"), "{body}");
    rig.add("side", "s");
    rig.expect_failing("sidecar repaired by ADD", &[]);

    // The rest without an agent that could put things back: its state stays (a stop is an
    // upgrade here), and the doctor reads it.
    agent.terminate(WAIT).expect("stop agent");
    rig.expect_failing("agent stopped", &[]);

    // Node: a host-probe set member of no enrolled pod (leak), then the SNAT rule gone.
    let node_sh = |args: &[&str]| {
        kit::exec_in(&rig.node_ns, args[0], &args[1..])
            .unwrap_or_else(|e| panic!("{args:?} in the node: {e}"));
    };
    node_sh(&[
        "ipset",
        "add",
        "istio-inpod-probes-v4",
        "10.99.0.77",
        "comment",
        "uid-gone",
    ]);
    let r = rig.expect_failing("host-probe leak", &["node:inpod-host-probe"]);
    assert!(
        node_check(&r, "inpod-host-probe")[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("10.99.0.77 (pod uid \"uid-gone\") of no enrolled pod (leak)"),
        "{r}"
    );
    node_sh(&["ipset", "del", "istio-inpod-probes-v4", "10.99.0.77"]);
    let save = kit::exec_in(&rig.node_ns, "iptables-save", &["-t", "nat"]).expect("save");
    let host_chain = meshcni_rules::inpod::host_chain_names()
        .into_iter()
        .find(|c| save.contains(&format!(":{c} ")))
        .unwrap_or_else(|| panic!("no host-probe chain in the node:\n{save}"));
    node_sh(&["iptables", "-t", "nat", "-F", &host_chain]);
    rig.expect_failing("host-probe rule gone", &["node:inpod-host-probe"]);
    let restore = format!(
        "*nat\n{}COMMIT\n",
        save.lines()
            .filter(|l| l.starts_with(&format!("-A {host_chain} ")))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", rig.node_ns.display()))
            .args(["--", "iptables-restore", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-restore");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(restore.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success(), "{restore}");
    }
    rig.expect_failing("host-probe rule back", &[]);

    // Sidecar rules gone entirely.
    rig.exec_pod("s", "iptables", &["-t", "nat", "-F"]);
    rig.exec_pod("s", "iptables", &["-t", "nat", "-X"]);
    rig.expect_failing("sidecar rules missing", &["pod:side/s"]);
    rig.add("side", "s");
    rig.expect_failing("sidecar repaired", &[]);

    // Ambient in-pod rules drifted; put back with the driver's own applier and config.
    let save = kit::exec_in(rig.lab.pod("a").netns.path(), "iptables-save", &[]).expect("save");
    let chain = ["ISTIO_OUTPUT", "ISTIO_PRERT"]
        .into_iter()
        .find(|c| save.contains(&format!(":{c} ")))
        .unwrap_or_else(|| panic!("no in-pod chain in pod a:\n{save}"));
    rig.exec_pod("a", "iptables", &["-t", "nat", "-F", chain]);
    let r = rig.expect_failing("in-pod drift", &["pod:mesh/a"]);
    assert!(
        pod(&r, "mesh/a")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("in-pod rules differ"),
        "{r}"
    );
    {
        let cli = <meshcni_agent::cli::Cli as clap::Parser>::try_parse_from(
            std::iter::once("meshcni-agent".to_string()).chain(rig.args()),
        )
        .expect("flags");
        let cfg = meshcni_agent::modes::inpod_config(
            &cli.args,
            meshcni_agent::ambient_config::RedirectMode::Inpod,
        );
        meshcni_netx::inpod::apply_inpod(
            rig.lab.pod("a").netns.path(),
            &cfg.rules,
            &Default::default(),
            cfg.backend,
        )
        .expect("re-apply in-pod rules");
    }
    rig.expect_failing("in-pod repaired", &[]);

    // An ambient pod that is running but not enrolled.
    let mut pods = green_pods(Some(ip("a")));
    pods.push(pod_json("mesh", "b", NODE, Some(ip("b")), &[], &[]));
    write_workloads(&rig.dirs.workloads, &namespaces(true), &pods).expect("workloads");
    let r = rig.expect_failing("not enrolled", &["pod:mesh/b"]);
    let b = pod(&r, "mesh/b");
    assert_eq!(b["should_capture"], true);
    assert_eq!(b["captured"], false);
    assert!(
        b["detail"].as_str().unwrap_or("").contains("not enrolled"),
        "{b}"
    );

    // Pod a is gone from the node while the driver still holds it: a leaked enrollment.
    let mut pods = green_pods(Some(ip("a")));
    pods.retain(|p| p["metadata"]["name"] != "a");
    write_workloads(&rig.dirs.workloads, &namespaces(true), &pods).expect("workloads");
    let r = rig.expect_failing("leaked enrollment", &["node:ambient-enrollment"]);
    assert!(
        node_check(&r, "ambient-enrollment")[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("uid-a (mesh/a)"),
        "{r}"
    );

    // The namespace leaves ambient: pod a is enrolled but should not be.
    write_workloads(
        &rig.dirs.workloads,
        &namespaces(false),
        &green_pods(Some(ip("a"))),
    )
    .expect("workloads");
    let r = rig.expect_failing("enrolled, should not be", &["pod:mesh/a"]);
    assert!(
        pod(&r, "mesh/a")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("should not be"),
        "{r}"
    );
    write_workloads(
        &rig.dirs.workloads,
        &namespaces(true),
        &green_pods(Some(ip("a"))),
    )
    .expect("workloads");
    rig.expect_failing("workloads back", &[]);

    // Node: our conflist entry missing, then first in the chain.
    let conflist = rig.dirs.net_d.join("10-lab.conflist");
    let installed: Value =
        serde_json::from_slice(&std::fs::read(&conflist).expect("conflist")).expect("JSON");
    let mut without = installed.clone();
    without["plugins"]
        .as_array_mut()
        .expect("plugins")
        .retain(|p| p["type"] != "meshcni");
    with_file(&conflist, without.to_string().as_bytes(), || {
        rig.expect_failing("entry missing", &["node:cni-config"]);
    });
    let mut first = installed.clone();
    first["plugins"].as_array_mut().expect("plugins").reverse();
    with_file(&conflist, first.to_string().as_bytes(), || {
        let r = rig.expect_failing("entry first", &["node:cni-config"]);
        assert!(
            node_check(&r, "cni-config")[0]["detail"]
                .as_str()
                .unwrap_or("")
                .contains("first in the chain"),
            "{r}"
        );
    });

    // Node: the installed binary differs from the image's.
    let bin = rig.dirs.bin.join("meshcni");
    let mut changed = std::fs::read(&bin).expect("binary");
    changed.push(0);
    with_file(&bin, &changed, || {
        rig.expect_failing("binary changed", &["node:plugin-binary"]);
    });

    // Node: the kubeconfig is not one.
    let kc = rig.dirs.run.join("meshcni-kubeconfig");
    with_file(&kc, b"apiVersion: v1\nclusters: [", || {
        rig.expect_failing("kubeconfig garbage", &["node:kubeconfig"]);
    });

    // Node: the ambient config file names another mode.
    with_file(
        &rig.dirs.ambient_config(),
        br#"{"ztunnelReady":true,"redirectMode":"iptables"}"#,
        || {
            rig.expect_failing("ambient config mode", &["node:ambient-config"]);
        },
    );
    rig.expect_failing("all restored", &[]);
}

/// The `iptables` mode's enrollment as the doctor reads it: the node's `ztunnel-pods-ips` set
/// (entries commented with the owner's UID, as the driver writes them), provoked directly in
/// a private node netns. Nothing is installed there, so only the pod rows are looked at.
#[test]
fn doctor_reads_iptables_mode_enrollment_from_the_node_ipset() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, plugin) = binaries();
    let node = meshcni_testkit::Netns::new("docipt").expect("node netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("ip") };
    let pods = vec![
        pod_json("mesh", "a", NODE, Some(ip("10.98.0.1")), &[], &[]),
        pod_json("mesh", "b", NODE, Some(ip("10.98.0.2")), &[], &[]),
        pod_json("mesh", "c", NODE, Some(ip("10.98.0.3")), &[], &[]),
        pod_json("plain", "p", NODE, Some(ip("10.98.0.4")), &[], &[]),
    ];
    write_workloads(&dirs.workloads, &namespaces(true), &pods).expect("workloads");
    let set = meshcni_rules::ambient_node::IPSET_NAME;
    let ipset = |args: &[&str]| {
        kit::exec_in(node.path(), "ipset", args).unwrap_or_else(|e| panic!("ipset {args:?}: {e}"));
    };
    ipset(&["create", set, "hash:ip", "comment"]);
    ipset(&["add", set, "10.98.0.1", "comment", &kit::pod_uid("a")]);
    ipset(&["add", set, "10.98.0.3", "comment", "uid-someone-else"]);
    ipset(&["add", set, "10.98.0.4", "comment", &kit::pod_uid("p")]);
    let doctor = || -> (bool, Value) {
        kit::doctor_json(
            &agent_bin,
            node.path(),
            &kit::agent_args_for(&dirs, StackMode::Iptables),
            NODE,
        )
    };
    let (ok, r) = doctor();
    assert!(!ok, "{r}");
    assert_eq!(r["ambient"], "iptables");
    let pod_failing: BTreeSet<String> = failing(&r)
        .into_iter()
        .filter(|f| f.starts_with("pod:"))
        .collect();
    assert_eq!(
        pod_failing,
        ["pod:mesh/b", "pod:mesh/c", "pod:plain/p"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>(),
        "{r}"
    );
    assert_eq!(pod(&r, "mesh/a")["captured"], true, "{r}");
    let detail = |k: &str| pod(&r, k)["detail"].as_str().unwrap_or("").to_string();
    assert!(
        detail("mesh/a").contains("10.98.0.1 in ztunnel-pods-ips"),
        "{r}"
    );
    assert!(
        detail("mesh/b").contains("10.98.0.2 not in ztunnel-pods-ips"),
        "{r}"
    );
    assert!(
        detail("mesh/c").contains("10.98.0.3 enrolled for pod uid uid-someone-else"),
        "{r}"
    );
    assert!(detail("plain/p").contains("should not be"), "{r}");
    assert!(
        node_check(&r, "ambient-enrollment")[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("10.98.0.3 (pod uid \"uid-someone-else\")"),
        "{r}"
    );

    // Put the set right: every pod row is green.
    ipset(&["add", set, "10.98.0.2", "comment", &kit::pod_uid("b")]);
    ipset(&["del", set, "10.98.0.3"]);
    ipset(&["add", set, "10.98.0.3", "comment", &kit::pod_uid("c")]);
    ipset(&["del", set, "10.98.0.4"]);
    let (_, r) = doctor();
    assert!(
        failing(&r)
            .iter()
            .all(|f| f.starts_with("node:") && f != "node:ambient-enrollment"),
        "{r}"
    );
    assert_eq!(pod(&r, "mesh/b")["captured"], true, "{r}");
}

/// Without a workloads file the doctor reads the pods of its node and the namespaces from the
/// API server, with the agent's own access (`--ambient-kubeconfig` here; in-cluster in a
/// DaemonSet): one list each, the pod list filtered by `spec.nodeName`.
#[test]
fn doctor_reads_the_pods_of_its_node_from_the_api_server() {
    let cluster = meshcni_testkit::kube_cluster::FakeCluster::start().expect("fake API server");
    cluster.apply_namespace(namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]));
    cluster.apply_namespace(namespace_json("plain", &[]));
    cluster.apply_pod(pod_json(
        "mesh",
        "a",
        NODE,
        Some("10.97.0.1".parse().expect("ip")),
        &[],
        &[],
    ));
    cluster.apply_pod(pod_json(
        "plain",
        "p",
        NODE,
        Some("10.97.0.2".parse().expect("ip")),
        &[],
        &[],
    ));
    cluster.apply_pod(pod_json(
        "mesh",
        "elsewhere",
        "node2",
        Some("10.97.0.3".parse().expect("ip")),
        &[],
        &[],
    ));
    // A finished Job's pod (netns gone) and a sidecar pod whose sandbox has no IP yet: neither
    // is an uncaptured pod.
    let mut done = pod_json(
        "mesh",
        "job",
        NODE,
        Some("10.97.0.4".parse().expect("ip")),
        &[],
        &[],
    );
    done["status"]["phase"] = Value::from("Succeeded");
    cluster.apply_pod(done);
    let mut pending = sidecar_pod("plain", "starting", "10.97.0.5".parse().expect("ip"));
    pending["status"] = json!({"phase": "Pending"});
    cluster.apply_pod(pending);
    let tmp = tempfile::tempdir().expect("tempdir");
    let kc = tmp.path().join("kubeconfig");
    std::fs::write(&kc, cluster.kubeconfig_yaml()).expect("kubeconfig");
    let cli = <meshcni_agent::cli::Cli as clap::Parser>::try_parse_from([
        "meshcni-agent".to_string(),
        format!("--ambient-kubeconfig={}", kc.display()),
        format!("--cni-agent-run-dir={}", tmp.path().join("run").display()),
        format!("--node-name={NODE}"),
        "--ambient-enabled".into(),
        "--ambient-redirect-mode=inpod".into(),
    ])
    .expect("flags");
    let inv = meshcni_agent::doctor::inventory(&cli.args).expect("inventory from the API");
    let names: BTreeSet<String> = inv
        .pods
        .iter()
        .map(|p| format!("{}/{}", p.pod.metadata.namespace, p.pod.metadata.name))
        .collect();
    assert_eq!(
        names,
        ["mesh/a", "mesh/job", "plain/p", "plain/starting"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        inv.namespaces["mesh"]
            .get(DATAPLANE_MODE)
            .map(String::as_str),
        Some("ambient")
    );
    assert!(
        cluster
            .requests()
            .iter()
            .any(|r| r.contains("/api/v1/pods") && r.contains("spec.nodeName")),
        "{:?}",
        cluster.requests()
    );
    // No agent ever ran: the ambient pod is not enrolled, the plain one needs nothing.
    let checks = meshcni_agent::doctor::pod_checks(
        &cli.args,
        meshcni_agent::ambient_config::RedirectMode::Inpod,
        &inv,
    );
    let by: std::collections::BTreeMap<String, &meshcni_agent::doctor::PodCheck> = checks
        .iter()
        .map(|c| (format!("{}/{}", c.namespace, c.name), c))
        .collect();
    assert!(
        !by["mesh/a"].ok && by["mesh/a"].should_capture,
        "{checks:?}"
    );
    assert!(by["mesh/a"].detail.contains("not enrolled"), "{checks:?}");
    assert!(
        by["plain/p"].ok && !by["plain/p"].should_capture,
        "{checks:?}"
    );
    let job = by["mesh/job"];
    assert!(
        job.ok && !job.should_capture && job.reason.contains("terminated"),
        "{job:?}"
    );
    let starting = by["plain/starting"];
    assert!(
        starting.ok
            && starting.should_capture
            && starting.captured.is_none()
            && starting.reason.contains("not started"),
        "{starting:?}"
    );
}

/// `doctor --json` with `flags` inside `netns` (ambient flags and node name included by the
/// caller): (exit success, report).
fn doctor_in(agent_bin: &Path, netns: &Path, flags: &[String]) -> (bool, Value) {
    kit::doctor_json(agent_bin, netns, flags, NODE)
}

/// The failures that are about the redirect mode (node check `check` + enrollment + pods);
/// the installer's checks are not set up in the driver-only labs.
fn mode_failing(report: &Value, check: &str) -> BTreeSet<String> {
    failing(report)
        .into_iter()
        .filter(|f| {
            f.starts_with("pod:") || *f == format!("node:{check}") || f == "node:ambient-enrollment"
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Node 1 of an `ambient_mesh` lab as a workloads file (what the agent's source would say).
fn mesh_workloads(m: &ambient_mesh::Mesh, path: &Path) {
    let mut pods = Vec::new();
    for (node, name, ns, labels) in ambient_mesh::PODS {
        if *node != 1 {
            continue;
        }
        pods.push(pod_json(
            ns,
            name,
            "node1",
            Some(m.pod(name).ip),
            labels,
            &[],
        ));
    }
    write_workloads(path, &namespaces(true), &pods).expect("workloads");
}

fn detail_of(report: &Value, check: &str) -> String {
    node_check(report, check)
        .first()
        .and_then(|c| c["detail"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Regression (issue 12 item 3): in the `ebpf` mode the doctor said "redirect mode ebpf has no
/// driver in this build" for every ambient pod. Now it reads the pinned datapath (read-only)
/// and the driver's state file: the pods of a real `ebpf` node are green, and each kind of
/// drift is named — an enrolled pod's map entry missing, a map entry of no pod, the pod
/// programs detached from an enrolled pod's veth, programs attached to a veth no pod holds.
#[test]
fn doctor_checks_the_ebpf_datapath_and_each_pods_map_entry_and_programs() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, _) = binaries();
    let m = ambient_mesh::Mesh::new_in("doceb", ambient_mesh::Mode::Ebpf);
    let node = &m.lab.nodes[0];
    let node_ns = node.netns.path().to_path_buf();
    let bpffs = m.bpffs.as_ref().expect("bpffs").path().to_path_buf();
    let wl = m.tmp.path().join("doctor-workloads.json");
    mesh_workloads(&m, &wl);
    let flags = vec![
        format!(
            "--cni-agent-run-dir={}",
            m.tmp.path().join("node1").display()
        ),
        format!("--ambient-ebpf-pin-dir={}", bpffs.join("node1").display()),
        format!("--ambient-workloads-file={}", wl.display()),
        "--ambient-enabled".to_string(),
        "--ambient-redirect-mode=ebpf".to_string(),
        "--node-name=node1".to_string(),
    ];
    let doctor = || doctor_in(&agent_bin, &node_ns, &flags);
    let (_, r) = doctor();
    assert_eq!(mode_failing(&r, "ebpf-datapath"), set(&[]), "{r:#}");
    assert_eq!(node_check(&r, "ebpf-datapath").len(), 1, "{r:#}");
    for p in ["mesh/a", "mesh/d"] {
        assert_eq!(pod(&r, p)["captured"], true, "{p}: {r:#}");
        assert!(
            pod(&r, p)["detail"]
                .as_str()
                .unwrap_or("")
                .contains("programs attached"),
            "{r:#}"
        );
    }
    assert_eq!(pod(&r, "plain/b")["captured"], Value::Null, "{r:#}");

    let cfg = ambient_mesh::ebpf_config(node, m.tmp.path(), &bpffs);
    let drv = meshcni_agent::modes::ebpf::EbpfDriver::new(cfg).expect("driver");
    let dp = drv.datapath();
    let ip_d = std::net::IpAddr::V4(m.pod("d").ip);
    let entry_d = dp
        .pods()
        .expect("pods")
        .into_iter()
        .find(|(ip, _)| *ip == ip_d)
        .map(|(_, e)| e)
        .expect("d in the map");

    // An enrolled pod's entry gone.
    dp.remove_pod(ip_d).expect("remove");
    let (ok, r) = doctor();
    assert!(!ok);
    assert_eq!(
        mode_failing(&r, "ebpf-datapath"),
        set(&["pod:mesh/d", "node:ebpf-datapath"]),
        "{r:#}"
    );
    assert!(
        pod(&r, "mesh/d")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not in the pod map"),
        "{r:#}"
    );
    dp.set_pod(ip_d, entry_d).expect("put back");

    // A map entry nobody owns.
    let stray: std::net::IpAddr = "10.66.6.6".parse().expect("ip");
    dp.set_pod(stray, entry_d).expect("stray entry");
    let (_, r) = doctor();
    assert_eq!(
        mode_failing(&r, "ebpf-datapath"),
        set(&["node:ebpf-datapath"]),
        "{r:#}"
    );
    assert!(
        detail_of(&r, "ebpf-datapath").contains("10.66.6.6 has no recorded owner"),
        "{r:#}"
    );
    dp.remove_pod(stray).expect("remove stray");

    // Pod a's programs detached.
    let a = m.pod("a");
    let ix_a = meshcni_ebpf::ifindex_in(&node_ns, &a.host_veth).expect("ifindex");
    dp.detach_pod(&node_ns, ix_a).expect("detach");
    let (_, r) = doctor();
    assert_eq!(
        mode_failing(&r, "ebpf-datapath"),
        set(&["pod:mesh/a", "node:ebpf-datapath"]),
        "{r:#}"
    );
    assert!(
        pod(&r, "mesh/a")["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not attached"),
        "{r:#}"
    );
    dp.attach_pod(&node_ns, &a.host_veth).expect("re-attach");

    // Programs on the veth of a pod that is not enrolled: a leaked attachment.
    let b = m.pod("b");
    dp.attach_pod(&node_ns, &b.host_veth).expect("attach b");
    let (_, r) = doctor();
    assert_eq!(
        mode_failing(&r, "ebpf-datapath"),
        set(&["node:ebpf-datapath"]),
        "{r:#}"
    );
    assert!(
        detail_of(&r, "ebpf-datapath").contains("no enrolled pod holds (leak)"),
        "{r:#}"
    );
    let ix_b = meshcni_ebpf::ifindex_in(&node_ns, &b.host_veth).expect("ifindex");
    dp.detach_pod(&node_ns, ix_b).expect("detach b");
    let (_, r) = doctor();
    assert_eq!(mode_failing(&r, "ebpf-datapath"), set(&[]), "{r:#}");
    drop(drv);
}

/// The `iptables` mode's node pieces, by the driver's own comparison: green on a real node,
/// then a duplicated jump, a missing policy rule, a missing pod route, a pod route of no
/// enrolled pod and a changed sysctl are each named.
#[test]
fn doctor_checks_the_iptables_mode_node_rules_routes_links_and_sysctls() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, _) = binaries();
    let m = ambient_mesh::Mesh::new_in("docipn", ambient_mesh::Mode::Iptables);
    let node = &m.lab.nodes[0];
    let node_ns = node.netns.path().to_path_buf();
    let wl = m.tmp.path().join("doctor-workloads.json");
    mesh_workloads(&m, &wl);
    let flags = vec![
        format!(
            "--cni-agent-run-dir={}",
            m.tmp.path().join("node1").display()
        ),
        format!(
            "--node-xtables-lock={}",
            m.tmp.path().join("node1.xtables.lock").display()
        ),
        format!("--ambient-workloads-file={}", wl.display()),
        "--ambient-enabled".to_string(),
        "--ambient-redirect-mode=iptables".to_string(),
        "--node-name=node1".to_string(),
    ];
    let doctor = || doctor_in(&agent_bin, &node_ns, &flags);
    let (_, r) = doctor();
    assert_eq!(mode_failing(&r, "iptables-node"), set(&[]), "{r:#}");
    assert_eq!(node_check(&r, "iptables-node").len(), 1, "{r:#}");
    let sh = |program: &str, args: &[&str]| {
        kit::exec_in(&node_ns, program, args).unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    };
    let expect = |what: &str, needle: &str| {
        let (ok, r) = doctor();
        assert!(!ok, "{what}");
        assert_eq!(
            mode_failing(&r, "iptables-node"),
            set(&["node:iptables-node"]),
            "{what}: {r:#}"
        );
        let d = detail_of(&r, "iptables-node");
        assert!(d.contains(needle), "{what}: {d:?} lacks {needle:?}");
    };
    sh(
        "iptables",
        &["-t", "nat", "-I", "PREROUTING", "-j", "ztunnel-PREROUTING"],
    );
    expect(
        "duplicated jump",
        "2 jumps from nat/PREROUTING to ztunnel-PREROUTING",
    );
    sh(
        "iptables",
        &["-t", "nat", "-D", "PREROUTING", "-j", "ztunnel-PREROUTING"],
    );
    sh(
        "ip",
        &[
            "rule",
            "del",
            "priority",
            "101",
            "fwmark",
            "0x100/0x100",
            "lookup",
            "101",
        ],
    );
    expect("missing rule", "ip rule priority 101 present 0 times");
    sh(
        "ip",
        &[
            "rule",
            "add",
            "priority",
            "101",
            "fwmark",
            "0x100/0x100",
            "lookup",
            "101",
        ],
    );
    let a = m.pod("a").ip.to_string();
    let route =
        kit::exec_in(&node_ns, "ip", &["route", "show", "table", "100", &a]).expect("route");
    assert!(route.contains("istioin"), "{route}");
    sh("ip", &["route", "del", &a, "table", "100"]);
    expect(
        "missing pod route",
        &format!("enrolled {a} has no table-100 route"),
    );
    let mut args: Vec<&str> = vec!["route", "add", &a];
    let rest: Vec<&str> = route.split_whitespace().skip(1).collect();
    args.extend(rest.iter().copied());
    args.extend(["table", "100"]);
    sh("ip", &args);
    sh(
        "ip",
        &[
            "route",
            "add",
            "10.66.6.7",
            "via",
            "192.168.126.2",
            "dev",
            "istioin",
            "table",
            "100",
        ],
    );
    expect(
        "orphan pod route",
        "table-100 route for 10.66.6.7, which is not enrolled (leak)",
    );
    sh("ip", &["route", "del", "10.66.6.7", "table", "100"]);
    let v = node.netns.sysctl("net.ipv4.conf.istioin.rp_filter", "1");
    v.expect("sysctl");
    expect("sysctl", "net/ipv4/conf/istioin/rp_filter");
    node.netns
        .sysctl("net.ipv4.conf.istioin.rp_filter", "0")
        .expect("sysctl");
    let (_, r) = doctor();
    assert_eq!(mode_failing(&r, "iptables-node"), set(&[]), "{r:#}");
}

/// Ambient off (sidecar only): nothing of any redirect mode may be on the node. A fresh node
/// netns is green; a ztunnel set, an `istioin` link and a driver state file are each named.
#[test]
fn doctor_with_ambient_off_finds_leftovers_of_any_redirect_mode() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, _) = binaries();
    let node = meshcni_testkit::Netns::new("docoff").expect("node netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).expect("run dir");
    let wl = tmp.path().join("workloads.json");
    write_workloads(&wl, &namespaces(false), &[]).expect("workloads");
    let flags = vec![
        format!("--cni-agent-run-dir={}", run.display()),
        format!(
            "--ambient-ebpf-pin-dir={}",
            tmp.path().join("pins").display()
        ),
        format!(
            "--node-xtables-lock={}",
            tmp.path().join("xt.lock").display()
        ),
        format!("--ambient-workloads-file={}", wl.display()),
        "--node-name=node1".to_string(),
    ];
    let doctor = || doctor_in(&agent_bin, node.path(), &flags);
    let leftovers = |r: &Value| -> (bool, String) {
        let c = node_check(r, "ambient-leftovers");
        assert_eq!(c.len(), 1, "{r:#}");
        (
            c[0]["ok"] == true,
            c[0]["detail"].as_str().unwrap_or("").to_string(),
        )
    };
    let (_, r) = doctor();
    assert_eq!(r["ambient"], "off");
    assert!(leftovers(&r).0, "{r:#}");
    let sh = |program: &str, args: &[&str]| {
        kit::exec_in(node.path(), program, args)
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    };
    sh("ipset", &["create", "ztunnel-pods-ips", "hash:ip"]);
    let (ok, r) = doctor();
    assert!(!ok);
    assert_eq!(
        leftovers(&r),
        (false, "ipset ztunnel-pods-ips exists".into())
    );
    sh("ipset", &["destroy", "ztunnel-pods-ips"]);
    sh(
        "ip",
        &[
            "link", "add", "istioin", "type", "veth", "peer", "name", "mcnipeer",
        ],
    );
    assert_eq!(
        leftovers(&doctor().1),
        (false, "link istioin exists".into())
    );
    sh("ip", &["link", "del", "istioin"]);
    std::fs::write(run.join("inpod-mode.json"), "{}").expect("state");
    assert!(leftovers(&doctor().1).1.contains("inpod-mode.json exists"));
    std::fs::remove_file(run.join("inpod-mode.json")).expect("rm");
    sh("iptables", &["-t", "nat", "-N", "ztunnel-PREROUTING"]);
    assert_eq!(
        leftovers(&doctor().1),
        (false, "chain nat/ztunnel-PREROUTING exists".into())
    );
    sh("iptables", &["-t", "nat", "-X", "ztunnel-PREROUTING"]);
    assert!(leftovers(&doctor().1).0);
}

/// Regression (found by `crash_suite`): a pod the inpod driver enrolled while it was running
/// (a label change, an agent start) has no recorded netns path — the driver found it by its
/// cgroup or IP — and the doctor failed it with "recorded netns : cannot open network
/// namespace". Now the doctor finds it the way the driver does and checks it is the recorded
/// namespace.
#[test]
fn doctor_finds_the_netns_of_an_inpod_pod_enrolled_by_discovery() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let (agent_bin, plugin) = binaries();
    let lab = MultiNodeLab::new("docdisc", &[&["a"]]).expect("lab");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
    let a = lab.pod("a");
    std::os::unix::fs::symlink(a.netns.path(), dirs.netns_dir.join("a")).expect("link");
    let cli = <meshcni_agent::cli::Cli as clap::Parser>::try_parse_from(
        std::iter::once("meshcni-agent".to_string())
            .chain(kit::agent_args_for(&dirs, StackMode::Inpod)),
    )
    .expect("flags");
    let cfg = meshcni_agent::modes::inpod_config(
        &cli.args,
        meshcni_agent::ambient_config::RedirectMode::Inpod,
    );
    meshcni_netx::inpod::apply_inpod(a.netns.path(), &cfg.rules, &Default::default(), cfg.backend)
        .expect("in-pod rules");
    let record = meshcni_agent::modes::inpod::PodRecord {
        namespace: "mesh".into(),
        name: "a".into(),
        service_account: "default".into(),
        ips: vec![std::net::IpAddr::V4(a.ip)],
        annotations: Default::default(),
        netns_path: PathBuf::new(),
        netns_id: meshcni_netx::podns::netns_id(a.netns.path()).expect("netns id"),
    };
    meshcni_agent::modes::inpod::InpodState {
        pods: [(kit::pod_uid("a"), record)].into(),
    }
    .save(&cfg.state_file)
    .expect("state file");
    write_workloads(
        &dirs.workloads,
        &namespaces(true),
        &[pod_json("mesh", "a", NODE, Some(a.ip), &[], &[])],
    )
    .expect("workloads");
    let (_, r) = doctor_in(
        &agent_bin,
        lab.node(1).netns.path(),
        &kit::agent_args_for(&dirs, StackMode::Inpod),
    );
    let p = pod(&r, "mesh/a");
    assert_eq!(p["captured"], true, "{r:#}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or("")
            .contains("in-pod rules in place"),
        "{r:#}"
    );
}
