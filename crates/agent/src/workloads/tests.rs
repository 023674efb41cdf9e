use super::*;
use serde_json::json;
use std::path::Path;

fn pod_json(name: &str, ns: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.5",
                   "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
    NamespaceInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn decodes_the_api_shape() {
    let w = decode_pod(&pod_json("p", "demo")).expect("decode");
    assert_eq!(w.uid, "uid-p");
    assert_eq!(w.key(), "demo/p");
    assert_eq!(
        w.ips,
        vec![
            "10.0.0.5".parse::<IpAddr>().expect("v4"),
            "fd00::5".parse().expect("v6")
        ]
    );
    assert!(w.ready && !w.terminal() && !w.deleting && !w.has_sidecar && !w.host_network);
    assert_eq!(w.created, "2026-01-01T00:00:00Z");
    assert_eq!(w.node_name, "node-1");

    // podIP only, nulls, a sidecar, deletion, bad IP dropped, uid fallback.
    let w = decode_pod(&json!({
        "metadata": {"name": "q", "namespace": "demo", "labels": null,
                     "annotations": {"sidecar.istio.io/status": "{}"},
                     "deletionTimestamp": "2026-01-01T00:00:01Z"},
        "spec": {"hostNetwork": null},
        "status": {"phase": "Succeeded", "podIP": "not-an-ip", "podIPs": null}
    }))
    .expect("decode");
    assert_eq!(w.uid, "demo/q");
    assert!(w.ips.is_empty());
    assert!(w.has_sidecar && w.deleting && w.terminal() && !w.ready);

    assert!(matches!(
        decode_pod(&json!({"metadata": {"namespace": "x"}})),
        Err(DecodeError::NoName { .. })
    ));
    assert!(matches!(
        decode_pod(&json!({"metadata": {"name": "x"}})),
        Err(DecodeError::NoNamespace { .. })
    ));
    let e = decode_pod(&json!({"metadata": {"name": 5}})).expect_err("bad type");
    assert!(e.to_string().contains("pod object is not valid"), "{e}");
    assert_eq!(
        decode_namespace(&json!({"metadata": {"name": "a", "labels": {"x": "y"}}})).expect("ns"),
        ns("a", &[("x", "y")])
    );
}

#[test]
fn mesh_decisions() {
    let ambient = ns("demo", &[("istio.io/dataplane-mode", "ambient")]);
    let plain = ns("demo", &[]);
    let base = decode_pod(&pod_json("p", "demo")).expect("decode");
    let mut policy = EnrollPolicy::default();
    policy.excluded_namespaces.insert("kube-system".into());
    type Mutate = fn(&mut Workload);
    let cases: &[(&str, Mutate, &NamespaceInfo, MeshDecision)] = &[
        (
            "plain pod, ambient namespace",
            |_| {},
            &ambient,
            MeshDecision::In,
        ),
        (
            "plain pod, plain namespace",
            |_| {},
            &plain,
            MeshDecision::NotSelected,
        ),
        (
            "pod opt-in, plain namespace",
            |p| {
                p.labels
                    .insert("istio.io/dataplane-mode".into(), "ambient".into());
            },
            &plain,
            MeshDecision::In,
        ),
        (
            "pod opt-out",
            |p| {
                p.labels
                    .insert("istio.io/dataplane-mode".into(), "none".into());
            },
            &ambient,
            MeshDecision::NotSelected,
        ),
        (
            "host network",
            |p| p.host_network = true,
            &ambient,
            MeshDecision::HostNetwork,
        ),
        (
            "sidecar",
            |p| p.has_sidecar = true,
            &ambient,
            MeshDecision::Sidecar,
        ),
        (
            "ztunnel itself",
            |p| {
                p.labels.insert("app".into(), "ztunnel".into());
                p.namespace = "istio-system".into();
                p.service_account = "ztunnel".into();
            },
            &ambient,
            MeshDecision::Ztunnel,
        ),
        (
            "labelled app=ztunnel outside the system namespace: an ordinary pod",
            |p| {
                p.labels.insert("app".into(), "ztunnel".into());
                p.service_account = "ztunnel".into();
            },
            &ambient,
            MeshDecision::In,
        ),
        (
            "labelled app=ztunnel in the system namespace, other service account",
            |p| {
                p.labels.insert("app".into(), "ztunnel".into());
                p.namespace = "istio-system".into();
            },
            &ambient,
            MeshDecision::In,
        ),
        (
            "excluded namespace",
            |p| p.namespace = "kube-system".into(),
            &ambient,
            MeshDecision::ExcludedNamespace,
        ),
        (
            "succeeded",
            |p| p.phase = "Succeeded".into(),
            &ambient,
            MeshDecision::Terminal,
        ),
        (
            "failed",
            |p| p.phase = "Failed".into(),
            &ambient,
            MeshDecision::Terminal,
        ),
        ("no IP yet", |p| p.ips.clear(), &ambient, MeshDecision::NoIp),
        (
            "being deleted stays in",
            |p| p.deleting = true,
            &ambient,
            MeshDecision::In,
        ),
    ];
    for (name, mutate, namespace, want) in cases {
        let mut p = base.clone();
        mutate(&mut p);
        assert_eq!(mesh_decision(&p, Some(namespace), &policy), *want, "{name}");
        assert_eq!(
            wants_mesh(&p, Some(namespace), &policy),
            *want == MeshDecision::In
        );
    }
    // Unknown namespace = no labels.
    assert_eq!(
        mesh_decision(&base, None, &policy),
        MeshDecision::NotSelected
    );
    // No selectors at all: nothing is ambient.
    let none = EnrollPolicy {
        selectors: vec![],
        ..EnrollPolicy::default()
    };
    assert_eq!(
        mesh_decision(&base, Some(&ambient), &none),
        MeshDecision::NotSelected
    );
}

fn ztunnel(name: &str, created: &str, ready: bool, ip: &str) -> Workload {
    Workload {
        uid: format!("uid-{name}"),
        namespace: "istio-system".into(),
        name: name.into(),
        ips: ip.parse().map(|i| vec![i]).unwrap_or_default(),
        labels: [("app".to_string(), "ztunnel".to_string())].into(),
        phase: "Running".into(),
        ready,
        created: created.into(),
        service_account: "ztunnel".into(),
        ..Workload::default()
    }
}

#[test]
fn desired_set_and_active_ztunnel() {
    let mut p1 = decode_pod(&pod_json("p1", "demo")).expect("p1");
    p1.ips.clear();
    let p2 = decode_pod(&pod_json("p2", "demo")).expect("p2");
    let p3 = decode_pod(&pod_json("p3", "other")).expect("p3");
    let zt_old = ztunnel("zt-old", "2026-01-01T00:00:00Z", true, "10.0.0.100");
    let zt_new = ztunnel("zt-new", "2026-01-02T00:00:00Z", true, "10.0.0.101");
    let zt_newest_unready = ztunnel("zt-x", "2026-01-03T00:00:00Z", false, "10.0.0.102");
    let snap = WorkloadSnapshot::from_parts(
        [p1, p2, p3, zt_old.clone(), zt_new, zt_newest_unready],
        [
            ns("demo", &[("istio.io/dataplane-mode", "ambient")]),
            ns("istio-system", &[("istio.io/dataplane-mode", "ambient")]),
        ],
    );
    let d = desired_set(&snap, &EnrollPolicy::default());
    assert_eq!(
        d.keys().cloned().collect::<Vec<_>>(),
        vec!["uid-p1", "uid-p2"],
        "p1 waits for its IP, p3's namespace is not ambient, ztunnels never enroll"
    );
    assert!(d["uid-p1"].ips.is_empty());
    let zt = active_ztunnel(&snap, &Default::default()).expect("ztunnel");
    assert_eq!(zt.pod.name, "zt-new", "newest Ready wins");
    assert_eq!(zt.ips, vec!["10.0.0.101".parse::<IpAddr>().expect("ip")]);

    let only_old = WorkloadSnapshot::from_parts([zt_old], []);
    assert_eq!(
        active_ztunnel(&only_old, &Default::default())
            .expect("zt")
            .pod
            .name,
        "zt-old"
    );
    let none = WorkloadSnapshot::from_parts(
        [ztunnel("z", "2026-01-01T00:00:00Z", false, "10.0.0.1")],
        [],
    );
    assert_eq!(active_ztunnel(&none, &Default::default()), None);
}

#[test]
fn workloads_file_json_and_yaml() {
    let path = Path::new("/x/workloads.json");
    let text = json!({
        "namespaces": [{"metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}],
        "pods": [pod_json("mine", "demo"),
                 {"metadata": {"name": "elsewhere", "namespace": "demo"}, "spec": {"nodeName": "node-2"}},
                 {"metadata": {"name": "nonode", "namespace": "demo"}}]
    })
    .to_string();
    let snap = file::parse_workloads(&text, "node-1", path).expect("parse");
    let names: Vec<&str> = snap.pods.values().map(|p| p.name.as_str()).collect();
    // Keyed by UID ("demo/nonode" is the fallback UID); the node-2 pod is ignored.
    assert_eq!(names, vec!["nonode", "mine"]);
    assert_eq!(snap.namespaces.len(), 1);

    let yaml = "namespaces:\n- metadata:\n    name: demo\npods:\n- metadata:\n    name: y\n    namespace: demo\n    uid: u-y\n  status:\n    podIP: 10.1.1.1\n";
    let snap = file::parse_workloads(yaml, "node-1", path).expect("yaml");
    assert_eq!(
        snap.pods["u-y"].ips,
        vec!["10.1.1.1".parse::<IpAddr>().expect("ip")]
    );

    for (bad, want) in [
        ("", "file is empty"),
        ("{\"pods\": [", "not valid JSON/YAML"),
        ("{\"pod\": []}", "unknown field"),
        (
            "{\"namespaces\": [], \"pods\": [{\"metadata\": {\"name\": \"x\"}}]}",
            "pods[0]",
        ),
    ] {
        let e = file::parse_workloads(bad, "node-1", path).expect_err(bad);
        assert!(e.to_string().contains(want), "{bad:?}: {e}");
        assert!(e.to_string().contains("/x/workloads.json"), "{e}");
    }
}

/// Issue 8 item 5: an empty or partial file is not "no pods"; only the explicit form is.
#[test]
fn empty_or_partial_workloads_file_is_refused_and_the_explicit_form_is_not() {
    let path = Path::new("/x/workloads.yaml");
    for (text, missing) in [
        ("{}", "no `pods` and no `namespaces` list"),
        ("---\n", "no `pods` and no `namespaces` list"),
        ("# nothing here yet\n", "no `pods` and no `namespaces` list"),
        ("pods: []\n", "no `namespaces` list"),
        ("namespaces: []\n", "no `pods` list"),
        (
            "pods:\n- metadata: {name: a, namespace: demo, uid: u-a}\n",
            "no `namespaces` list",
        ),
        ("{\"pods\": null, \"namespaces\": []}", "no `pods` list"),
    ] {
        let e = file::parse_workloads(text, "node-1", path).expect_err(text);
        let msg = e.to_string();
        assert!(
            matches!(e, file::FileSourceError::Incomplete { .. }),
            "{text:?}: {msg}"
        );
        assert!(msg.contains(missing), "{text:?}: {msg}");
        assert!(msg.contains("/x/workloads.yaml"), "{msg}");
        assert_eq!(e.refusal_reason(), "file_incomplete");
    }
    for text in [
        "pods: []\nnamespaces: []\n",
        "{\"pods\": [], \"namespaces\": []}",
    ] {
        let snap = file::parse_workloads(text, "node-1", path).expect(text);
        assert!(snap.pods.is_empty() && snap.namespaces.is_empty());
    }
}

/// Issue 8 item 6: a second pod with an earlier pod's UID is refused; the first keeps it.
#[test]
fn duplicate_uid_keeps_the_first_pod_and_reports_the_second() {
    let path = Path::new("/x/workloads.json");
    let mut second = pod_json("second", "demo");
    second["metadata"]["uid"] = json!("uid-first");
    second["status"]["podIP"] = json!("10.0.0.6");
    second["status"]["podIPs"] = json!([{"ip": "10.0.0.6"}]);
    let text = json!({"namespaces": [], "pods": [pod_json("first", "demo"), second]}).to_string();
    let limits = file::FileLimits::default();
    let (snap, dups) =
        file::parse_workloads_checked(&text, "node-1", path, &limits, None).expect("parse");
    assert_eq!(snap.pods.len(), 1);
    assert_eq!(
        snap.pods["uid-first"].name, "first",
        "the first holder keeps it"
    );
    assert_eq!(dups.len(), 1);
    assert_eq!(
        dups[0].to_string(),
        "pods demo/first and demo/second both have uid uid-first; demo/first keeps it, demo/second is ignored"
    );
    // The loop's variant prefers the previous holder even when it comes second.
    let a = decode_pod(&pod_json("first", "demo")).expect("a");
    let mut b = a.clone();
    b.name = "second".into();
    let (snap, dups) = WorkloadSnapshot::from_parts_checked([b, a], [], |p| p.name == "first");
    assert_eq!(snap.pods["uid-first"].name, "first");
    assert_eq!(dups[0].refused, "demo/second");
    // In the file too: a pod inserted before the holder does not take its UID.
    let mut intruder = pod_json("intruder", "demo");
    intruder["metadata"]["uid"] = json!("uid-first");
    let v1 = json!({"namespaces": [], "pods": [pod_json("first", "demo")]}).to_string();
    let v2 = json!({"namespaces": [], "pods": [intruder, pod_json("first", "demo")]}).to_string();
    let (prev, _) = file::parse_workloads_checked(&v1, "node-1", path, &limits, None).expect("v1");
    let (snap, dups) =
        file::parse_workloads_checked(&v2, "node-1", path, &limits, Some(&prev)).expect("v2");
    assert_eq!(snap.pods["uid-first"].name, "first");
    assert_eq!(dups[0].refused, "demo/intruder");
}

/// Issue 8 item 11: a UID that would not read back from the dataplane is refused.
#[test]
fn pod_uids_must_be_kubernetes_uids() {
    for bad in ["a\nb", "a\0b", "a b", "uid/../x", "ü", &"a".repeat(129)] {
        let mut p = pod_json("p", "demo");
        p["metadata"]["uid"] = json!(bad);
        let e = decode_pod(&p).expect_err(bad);
        assert!(
            e.to_string().contains("is not a Kubernetes UID"),
            "{bad:?}: {e}"
        );
        let text = json!({"namespaces": [], "pods": [p]}).to_string();
        let e = file::parse_workloads(&text, "node-1", Path::new("/x/w.json")).expect_err(bad);
        assert!(e.to_string().contains("pods[0]"), "{e}");
    }
    // A fallback UID (no metadata.uid) from a name with a control character is refused too.
    let e = decode_pod(&json!({"metadata": {"name": "a\nb", "namespace": "demo"}}))
        .expect_err("newline in name");
    assert!(e.to_string().contains("cannot stand in"), "{e}");
    // Real UIDs pass.
    let mut p = pod_json("p", "demo");
    p["metadata"]["uid"] = json!("0b5c6c1e-3f5a-4b8e-9c1d-2e3f4a5b6c7d");
    assert!(decode_pod(&p).is_ok());
}

/// Issue 8 item 9: size, nesting and alias expansion are bounded, with an error naming the
/// file and the bound.
#[test]
fn workloads_file_limits() {
    let path = Path::new("/x/hostile.yaml");
    let limits = file::FileLimits::default();
    // Deep nesting (200 KB of flow sequences): refused at once.
    let deep = format!("pods: {}\nnamespaces: []\n", "[".repeat(200_000));
    let t = std::time::Instant::now();
    let e = file::parse_workloads(&deep, "node-1", path).expect_err("deep");
    assert!(
        matches!(e, file::FileSourceError::Limit { .. })
            && e.to_string().contains("nesting deeper than 64 levels")
            && e.to_string().contains("/x/hostile.yaml"),
        "{e}"
    );
    eprintln!("deep nesting refused in {:?}", t.elapsed());
    // Deep block nesting too.
    let mut block = String::from("namespaces: []\npods:\n");
    for i in 0..100 {
        block.push_str(&" ".repeat(2 * i + 2));
        block.push_str("- \n");
    }
    let e = file::parse_workloads(&block, "node-1", path).expect_err("deep block");
    assert!(e.to_string().contains("nesting deeper"), "{e}");
    // A billion-laughs alias bomb (a few hundred bytes).
    let mut bomb = String::from("namespaces: []\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    bomb.push_str("pods: *a9\n");
    let t = std::time::Instant::now();
    let e = file::parse_workloads(&bomb, "node-1", path).expect_err("alias bomb");
    assert!(
        e.to_string()
            .contains("YAML aliases expand to more than 100000 nodes"),
        "{e}"
    );
    eprintln!("alias bomb refused in {:?}", t.elapsed());
    // Size.
    let small = file::FileLimits {
        max_bytes: 100,
        ..limits
    };
    let big = format!("namespaces: []\npods: []\n#{}\n", "x".repeat(200));
    let e = file::parse_workloads_checked(&big, "node-1", path, &small, None).expect_err("size");
    assert!(
        e.to_string()
            .contains("exceeds a limit: 226 bytes, more than the 100 bytes accepted"),
        "{e}"
    );
    assert_eq!(e.refusal_reason(), "file_limit");
    // Modest aliases (shared labels) are fine.
    let ok = "namespaces: []\nx-labels: &l {app: web}\npods:\n- metadata: {name: a, namespace: demo, uid: u-a, labels: *l}\n- metadata: {name: b, namespace: demo, uid: u-b, labels: *l}\n";
    let e = file::parse_workloads(ok, "node-1", path).expect_err("unknown top-level key");
    assert!(e.to_string().contains("unknown field `x-labels`"), "{e}");
    let ok = "namespaces: []\npods:\n- metadata: &m {name: a, namespace: demo, uid: u-a}\n  spec: {nodeName: node-1}\n";
    assert_eq!(
        file::parse_workloads(ok, "node-1", path)
            .expect("anchor")
            .pods["u-a"]
            .name,
        "a"
    );
}
