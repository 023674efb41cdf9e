//! The repair controller (issue 12 item 1): pods that should be captured but are not are
//! captured **in place**, by the real agent (inpod mode, in a lab node netns, workloads from a
//! file, `--repair-enabled`), with the doctor as the oracle:
//! * sidecar pods started without the plugin (a Deployment-style pod and a Job's pod with
//!   `restartPolicy: Never`) get exactly the rules the plugin's ADD installs in a reference pod,
//!   in their own netns (same inode), and a real TCP connection goes through the redirect;
//! * a sidecar pod with one rule deleted is repaired;
//! * an ambient pod whose in-pod rules were flushed is enrolled again through the loop; an
//!   ambient pod the loop could not enroll (netns not found) is enrolled once it can be;
//! * a non-mesh pod and a terminated Job pod are never touched;
//! * labelPods / deletePods act through the API (the fake API server inside the node netns)
//!   and leave the pod's netns alone; Events and `meshcni_repair_*` metrics say what happened.
//!
//! Plus the loop's side (no root): `SourceUpdate::Repair` re-plans an enrollment the driver
//! counts as done, skips the back-off, and never enrolls a pod outside the mesh.
//!
//! Root only for the lab tests; every namespace is the test's own (`mcni-*`), removed on
//! success and failure.

use meshcni_testkit::stack as kit;

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kit::{
    Agent, AgentDirs, DATAPLANE_MODE, StackMode, namespace_json, plugin_add, pod_json,
    write_pod_metadata, write_workloads,
};
use meshcni_testkit::kube_cluster::FakeCluster;
use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn, MultiNodeLab, TransparentProxy};
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

fn namespaces() -> Vec<Value> {
    vec![
        namespace_json("mesh", &[(DATAPLANE_MODE, "ambient")]),
        namespace_json("side", &[]),
        namespace_json("plain", &[]),
    ]
}

/// A pod as Istio's injector leaves it: the status annotation and an `istio-proxy` sidecar.
fn sidecar_pod(name: &str, ip: Ipv4Addr) -> Value {
    let mut p = pod_json(
        "side",
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

/// A Job's pod: `restartPolicy: Never`, owned by a Job (the reference's repair never acts on
/// it: its validation container does not crash-loop).
fn job_pod(name: &str, ip: Ipv4Addr) -> Value {
    let mut p = sidecar_pod(name, ip);
    p["spec"]["restartPolicy"] = json!("Never");
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "batch", "uid": "uid-job", "controller": true}]);
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
    fn new(tag: &str, pods: &[&str]) -> Rig {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let (agent_bin, plugin) = binaries();
        let lab = MultiNodeLab::new(tag, &[pods]).expect("lab");
        let node_ns = lab.node(1).netns.path().to_path_buf();
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = AgentDirs::create(tmp.path(), &plugin).expect("dirs");
        Rig {
            lab,
            _tmp: tmp,
            dirs,
            node_ns,
            agent_bin,
            plugin,
        }
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.lab.pod(pod).ip
    }

    fn netns(&self, pod: &str) -> &Path {
        self.lab.pod(pod).netns.path()
    }

    fn link_netns(&self, name: &str) {
        let link = self.dirs.netns_dir.join(format!("cni-{name}"));
        if !link.exists() {
            std::os::unix::fs::symlink(self.netns(name), &link).expect("symlink netns");
        }
    }

    fn start_agent(&self, env: &[(&str, &str)]) -> (Agent, InpodZtunnelStandIn, String) {
        let mut agent = Agent::start_mode(
            &self.agent_bin,
            &self.node_ns,
            NODE,
            &self.dirs,
            StackMode::Inpod,
            env,
        )
        .expect("agent");
        let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig::new(&self.dirs.zds_socket))
            .expect("stand-in");
        agent.wait_ready(WAIT).expect("ready");
        let monitoring = agent.monitoring();
        (agent, zt, monitoring)
    }

    /// `meshcni-agent <flags> doctor --json` in the node netns: (exit success, report).
    fn doctor(&self) -> (bool, Value) {
        kit::doctor_json(
            &self.agent_bin,
            &self.node_ns,
            &kit::agent_args_for(&self.dirs, StackMode::Inpod),
            NODE,
        )
    }

    /// Wait until the doctor is green (the oracle after every fault).
    fn wait_green(&self, what: &str, agent: &Agent) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (ok, report) = self.doctor();
            if ok {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: doctor not green within {WAIT:?}:\n{}\nagent log:\n{}",
                serde_json::to_string_pretty(&report).unwrap_or_default(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn save(&self, pod: &str) -> String {
        kit::normalize_save(&kit::exec_in(self.netns(pod), "iptables-save", &[]).expect("save"))
    }

    fn exec_pod(&self, pod: &str, program: &str, args: &[&str]) -> String {
        kit::exec_in(self.netns(pod), program, args)
            .unwrap_or_else(|e| panic!("{program} {args:?} in pod {pod}: {e}"))
    }
}

fn pod_verdict<'a>(report: &'a Value, key: &str) -> &'a Value {
    kit::doctor_pod(report, key)
}

/// The value of one sample line of the metrics text (`name{labels} value`).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn scrape(rig: &Rig, monitoring: &str) -> String {
    let (status, body) =
        kit::http_get_in(&rig.node_ns, monitoring, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn inode(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.dev(), m.ino())
}

#[test]
fn pods_started_uncaptured_are_captured_in_place() {
    let rig = Rig::new("rep", &["s", "j", "r", "a", "b", "p"]);
    // Every pod's netns is findable (the agent could touch any of them), the ambient pod b's
    // only later.
    for p in ["s", "j", "r", "a", "p"] {
        rig.link_netns(p);
    }
    let pods = |with_b: bool| {
        let mut v = vec![
            sidecar_pod("s", rig.ip("s")),
            job_pod("j", rig.ip("j")),
            pod_json("mesh", "a", NODE, Some(rig.ip("a")), &[], &[]),
            pod_json("plain", "p", NODE, Some(rig.ip("p")), &[], &[]),
        ];
        // A Job pod that ran to completion: terminated, never touched.
        let mut done = job_pod("done", "10.99.0.20".parse().expect("ip"));
        done["status"]["phase"] = json!("Succeeded");
        v.push(done);
        if with_b {
            v.push(pod_json("mesh", "b", NODE, Some(rig.ip("b")), &[], &[]));
        }
        v
    };
    // The sidecar pods and the plain pod run before the agent: no ADD of ours ever ran.
    write_workloads(&rig.dirs.workloads, &namespaces(), &pods(false)).expect("workloads");
    let ns_before = [inode(rig.netns("s")), inode(rig.netns("j"))];
    let plain_before = rig.save("p");
    let (agent, _zt, monitoring) =
        rig.start_agent(&[("REPAIR_ENABLED", "true"), ("REPAIR_RESYNC_SECONDS", "1")]);

    // The reference: pod r, not known to the agent's workload source, gets the plugin's ADD.
    let side_ns = namespaces()
        .into_iter()
        .find(|n| n["metadata"]["name"] == "side")
        .expect("ns");
    let r = sidecar_pod("r", rig.ip("r"));
    write_pod_metadata(&rig.dirs.meta, &r, &side_ns).expect("metadata");
    let out = plugin_add(
        &rig.plugin,
        &rig.node_ns,
        rig.netns("r"),
        "side",
        "r",
        rig.ip("r"),
        &rig.dirs,
    )
    .expect("plugin");
    assert!(out.success, "ADD side/r: {out:?}");
    let reference = rig.save("r");
    assert!(reference.contains("ISTIO_OUTPUT"), "{reference}");

    let report = rig.wait_green("sidecar pods started uncaptured", &agent);
    for key in ["side/s", "side/j"] {
        assert_eq!(
            pod_verdict(&report, key)["captured"],
            true,
            "{key}: {report}"
        );
    }
    // In place: the pods' own netns, with exactly ADD's rules.
    assert_eq!(
        [inode(rig.netns("s")), inode(rig.netns("j"))],
        ns_before,
        "same netns"
    );
    assert_eq!(rig.save("s"), reference, "pod s: rules differ from ADD's");
    assert_eq!(
        rig.save("j"),
        reference,
        "Job pod j: rules differ from ADD's"
    );
    // Never touched: the plain pod, the terminated Job pod.
    assert_eq!(rig.save("p"), plain_before, "non-mesh pod p was changed");
    let log = agent.log();
    for key in ["plain/p", "side/done"] {
        assert!(
            !log.lines().any(|l| l.contains("repair") && l.contains(key)),
            "{key} was looked at by repair:\n{log}"
        );
    }

    // A real connection from s goes through the redirect into its sidecar.
    let sidecar = TransparentProxy::start(&rig.lab.pod("s").netns).expect("sidecar stand-in");
    let dst = std::net::SocketAddr::from((rig.ip("p"), 8080));
    let got = rig
        .lab
        .pod("s")
        .netns
        .run(move || -> std::io::Result<String> {
            use std::io::{BufRead, BufReader, Write};
            let mut c = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            c.write_all(b"hello\n")?;
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line)?;
            Ok(line)
        })
        .expect("run in s")
        .expect("connect from s");
    assert!(
        got.starts_with("proxied-by:15001") && got.contains(&dst.to_string()),
        "{got}"
    );
    assert_eq!(sidecar.connections().len(), 1);
    drop(sidecar);

    // Drift: one rule deleted in s → put back (the periodic full check finds it).
    let rules = rig.exec_pod("s", "iptables", &["-t", "nat", "-S", "OUTPUT"]);
    let jump = rules
        .lines()
        .find(|l| l.contains("ISTIO_OUTPUT"))
        .unwrap_or_else(|| panic!("no jump to ISTIO_OUTPUT in pod s:\n{rules}"));
    let mut del = vec!["-t", "nat", "-D"];
    del.extend(jump.split_whitespace().skip(1));
    rig.exec_pod("s", "iptables", &del);
    assert_ne!(rig.save("s"), reference);
    rig.wait_green("one rule deleted in s", &agent);
    assert_eq!(rig.save("s"), reference, "pod s after the drift repair");

    // Ambient: a was enrolled by the loop; its in-pod rules flushed by a third party.
    let save = rig.exec_pod("a", "iptables-save", &[]);
    let chain = ["ISTIO_OUTPUT", "ISTIO_PRERT"]
        .into_iter()
        .find(|c| save.contains(&format!(":{c} ")))
        .unwrap_or_else(|| panic!("no in-pod chain in pod a:\n{save}"));
    let a_before = rig.save("a");
    rig.exec_pod("a", "iptables", &["-t", "nat", "-F", chain]);
    rig.wait_green("in-pod rules of a flushed", &agent);
    assert_eq!(rig.save("a"), a_before, "pod a's in-pod rules");

    // Ambient b appears, its netns not findable yet: not enrolled; once it is: enrolled.
    write_workloads(&rig.dirs.workloads, &namespaces(), &pods(true)).expect("workloads");
    let deadline = Instant::now() + WAIT;
    while !agent.log().contains("ambient_not_enrolled") {
        assert!(
            Instant::now() < deadline,
            "b never found not enrolled:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rig.link_netns("b");
    let report = rig.wait_green("ambient pod b enrolled", &agent);
    assert_eq!(pod_verdict(&report, "mesh/b")["captured"], true);

    // What the operator sees.
    let m = scrape(&rig, &monitoring);
    assert_eq!(
        metric(
            &m,
            r#"meshcni_repair_total{result="repaired",reason="sidecar_not_captured"}"#
        ),
        3.0,
        "s, j, s again:\n{m}"
    );
    assert!(
        metric(
            &m,
            r#"meshcni_repair_total{result="repaired",reason="ambient_drifted"}"#
        ) >= 1.0,
        "{m}"
    );
    // (a may count here too: seen before the loop's first enrollment of it.)
    assert!(
        metric(
            &m,
            r#"meshcni_repair_total{result="repaired",reason="ambient_not_enrolled"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "meshcni_repair_duration_seconds_count") >= 5.0,
        "{m}"
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("pod captured in place")
            && l.contains("mesh/b")
            && l.contains("ambient_not_enrolled")),
        "b repaired as not enrolled:\n{log}"
    );
    for key in ["side/s", "side/j", "mesh/a", "mesh/b"] {
        assert!(
            log.lines()
                .any(|l| l.contains("pod captured in place") && l.contains(key)),
            "no repair log line for {key}:\n{log}"
        );
    }
}

/// The options that act through the API: labelPods labels the pod and leaves its netns as it
/// is; deletePods deletes it (UID precondition); in-place repair records an Event naming
/// what was missing. The fake API server listens inside the node netns.
#[test]
fn label_delete_and_events_go_through_the_api() {
    let rig = Rig::new("repapi", &["s"]);
    rig.link_netns("s");
    let cluster = rig
        .lab
        .node(1)
        .netns
        .run(FakeCluster::start)
        .expect("enter node netns")
        .expect("fake API server");
    let kubeconfig = rig.dirs.root.join("repair-kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig_yaml()).expect("kubeconfig");
    let kc = kubeconfig.display().to_string();
    let s = sidecar_pod("s", rig.ip("s"));
    write_workloads(&rig.dirs.workloads, &namespaces(), std::slice::from_ref(&s))
        .expect("workloads");
    let untouched = rig.save("s");
    let wait_for = |what: &str, agent: &Agent, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(Instant::now() < deadline, "{what}:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let events = |reason: &str| -> Vec<Value> {
        cluster
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    };

    // labelPods.
    cluster.apply_pod(s.clone());
    {
        let (mut agent, _zt, _) = rig.start_agent(&[
            ("REPAIR_ENABLED", "true"),
            ("REPAIR_REPAIR_PODS", "false"),
            ("REPAIR_LABEL_PODS", "true"),
            ("REPAIR_BROKEN_POD_LABEL_KEY", "example.com/uncaptured"),
            ("AMBIENT_KUBECONFIG", &kc),
        ]);
        wait_for("labelled", &agent, &|| {
            cluster
                .pod("side", "s")
                .is_some_and(|p| p["metadata"]["labels"]["example.com/uncaptured"] == "true")
        });
        wait_for("LabelBrokenPod event", &agent, &|| {
            !events("LabelBrokenPod").is_empty()
        });
        let ev = &events("LabelBrokenPod")[0];
        assert_eq!(ev["involvedObject"]["name"], "s", "{ev}");
        assert_eq!(ev["involvedObject"]["uid"], kit::pod_uid("s"), "{ev}");
        assert_eq!(ev["type"], "Warning");
        assert!(
            ev["message"]
                .as_str()
                .unwrap_or("")
                .contains("rules differ"),
            "the event says what was missing: {ev}"
        );
        agent.terminate(WAIT).expect("stop");
    }
    assert_eq!(
        rig.save("s"),
        untouched,
        "labelPods must not touch the pod's netns"
    );

    // deletePods.
    {
        let (mut agent, _zt, _) = rig.start_agent(&[
            ("REPAIR_ENABLED", "true"),
            ("REPAIR_REPAIR_PODS", "false"),
            ("REPAIR_DELETE_PODS", "true"),
            ("AMBIENT_KUBECONFIG", &kc),
        ]);
        wait_for("deleted", &agent, &|| cluster.pod("side", "s").is_none());
        wait_for("DeleteBrokenPod event", &agent, &|| {
            !events("DeleteBrokenPod").is_empty()
        });
        let del = cluster
            .requests()
            .into_iter()
            .filter(|r| r.starts_with("DELETE "))
            .collect::<Vec<_>>();
        assert_eq!(del, ["DELETE /api/v1/namespaces/side/pods/s"]);
        agent.terminate(WAIT).expect("stop");
    }
    assert_eq!(
        rig.save("s"),
        untouched,
        "deletePods must not touch the pod's netns"
    );

    // In place, with an Event.
    {
        let (agent, _zt, _) =
            rig.start_agent(&[("REPAIR_ENABLED", "true"), ("AMBIENT_KUBECONFIG", &kc)]);
        wait_for("CaptureRepaired event", &agent, &|| {
            !events("CaptureRepaired").is_empty()
        });
        let ev = &events("CaptureRepaired")[0];
        assert_eq!(ev["type"], "Normal", "{ev}");
        assert_eq!(ev["source"]["component"], "meshcni-agent", "{ev}");
        let msg = ev["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("captured the pod in place") && msg.contains("rules differ"),
            "{msg}"
        );
        assert!(rig.save("s").contains("ISTIO_OUTPUT"));
        rig.wait_green("repaired with the API on", &agent);
    }
}

/// The loop's side of the hand-off (no root): a `Repair` re-plans the enrollment of a pod the
/// driver counts as enrolled (the enroll is verify-or-repair in its netns), skips the pod's
/// back-off, and is ignored for a pod that is not in the mesh.
#[test]
fn loop_enrolls_a_repaired_pod_again_and_never_one_outside_the_mesh() {
    use meshcni_agent::ambient::{FakeDriver, LoopOptions, Reconciler, StatusHandle};
    use meshcni_agent::workloads::{EnrollPolicy, SourceUpdate, decode_namespace, decode_pod};
    let driver = FakeDriver::new();
    let mut rec = Reconciler::new(
        Box::new(driver.clone()),
        EnrollPolicy::default(),
        LoopOptions {
            resync: Duration::from_secs(60),
            min_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60),
            debounce: Duration::from_millis(1),
            ..LoopOptions::default()
        },
        StatusHandle::new(Err("starting".into())),
    );
    let pod = |name: &str, ns: &str, ip: &str| {
        decode_pod(&json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": NODE},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod")
    };
    rec.update(SourceUpdate::Namespaces(vec![
        decode_namespace(&json!({"metadata": {"name": "mesh",
            "labels": {"istio.io/dataplane-mode": "ambient"}}}))
        .expect("ns"),
        decode_namespace(&json!({"metadata": {"name": "plain"}})).expect("ns"),
    ]));
    rec.update(SourceUpdate::Pods(vec![
        pod("a", "mesh", "10.0.0.1"),
        pod("f", "mesh", "10.0.0.2"),
        pod("p", "plain", "10.0.0.3"),
    ]));
    driver.lock().fail_uids.insert("uid-f".into());
    let enrolls = |uid: &str| {
        driver
            .lock()
            .calls
            .iter()
            .filter(|c| c.starts_with("apply enroll") && c.contains(uid))
            .count()
    };
    let t0 = Instant::now();
    rec.reconcile(t0);
    assert_eq!(enrolls("uid-a"), 1);
    assert_eq!(
        enrolls("uid-f"),
        1,
        "tried once, failed, in a 30 s back-off"
    );
    rec.reconcile(t0 + Duration::from_millis(1));
    assert_eq!(enrolls("uid-a"), 1, "nothing to do");
    assert_eq!(enrolls("uid-f"), 1, "still in back-off");

    // a is enrolled as far as the driver knows; repair asks again → enrolled again.
    rec.update(SourceUpdate::Repair("uid-a".into()));
    rec.reconcile(t0 + Duration::from_millis(2));
    assert_eq!(enrolls("uid-a"), 2, "{:?}", driver.lock().calls);
    rec.reconcile(t0 + Duration::from_millis(3));
    assert_eq!(enrolls("uid-a"), 2, "once per repair");

    // f's cause is gone; repair does not wait for the back-off.
    driver.lock().fail_uids.clear();
    rec.update(SourceUpdate::Repair("uid-f".into()));
    rec.reconcile(t0 + Duration::from_millis(4));
    assert_eq!(enrolls("uid-f"), 2);
    assert!(driver.lock().enrolled.pods.contains_key("uid-f"));

    // p is not in the mesh: a repair request for it changes nothing.
    rec.update(SourceUpdate::Repair("uid-p".into()));
    rec.reconcile(t0 + Duration::from_millis(5));
    assert_eq!(enrolls("uid-p"), 0);
    assert!(!driver.lock().enrolled.pods.contains_key("uid-p"));
}
