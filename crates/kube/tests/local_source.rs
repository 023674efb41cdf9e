//! `LocalPodSource`: files in the API JSON shape, NotFound like the API.

use std::path::Path;

use meshcni_kube::{KubeError, LocalPodSource, ObjectKind, PodSource};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

fn populated() -> (tempfile::TempDir, LocalPodSource) {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("pods/default")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("namespaces")).expect("mkdir");
    std::fs::write(
        dir.path()
            .join("pods/default/productpage-v1-5d9b4c9849-x7kq2.json"),
        fixture("pod-productpage.json"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("namespaces/default.json"),
        fixture("namespace-default.json"),
    )
    .expect("write");
    // A minimal hand-written file: name/namespace come from the location.
    std::fs::write(
        dir.path().join("pods/default/tiny.json"),
        r#"{"metadata":{"labels":null,"annotations":{"a":"b"}},"spec":{"containers":[{"name":"app"}]}}"#,
    )
    .expect("write");
    let src = LocalPodSource::new(dir.path());
    (dir, src)
}

#[test]
fn reads_pod_and_namespace() {
    let (_dir, src) = populated();
    let pod = src
        .get_pod("default", "productpage-v1-5d9b4c9849-x7kq2")
        .expect("pod");
    assert_eq!(pod.metadata.uid, "7f3c2d1e-9a8b-4c6d-8e5f-1a2b3c4d5e6f");
    assert_eq!(pod.spec.node_name, "kind-worker");
    let proxy = pod.container("istio-proxy").expect("proxy");
    assert_eq!(
        proxy.args[..2],
        ["proxy".to_string(), "sidecar".to_string()]
    );
    let ns = src.get_namespace("default").expect("ns");
    assert_eq!(ns.metadata.labels["istio-injection"], "enabled");
}

#[test]
fn minimal_file_fills_identity_from_path() {
    let (_dir, src) = populated();
    let pod = src.get_pod("default", "tiny").expect("tiny");
    assert_eq!(pod.metadata.name, "tiny");
    assert_eq!(pod.metadata.namespace, "default");
    assert!(pod.metadata.labels.is_empty());
    assert_eq!(pod.annotation("a"), Some("b"));
}

#[test]
fn missing_files_are_not_found() {
    let (_dir, src) = populated();
    let err = src.get_pod("default", "nope").expect_err("missing");
    let want = src.pod_path("default", "nope");
    assert!(matches!(
        &err,
        KubeError::MissingFile {
            kind: ObjectKind::Pod,
            path,
            ..
        } if *path == want
    ));
    assert!(err.is_not_found());
    // The message names the file that was looked for.
    assert_eq!(
        err.to_string(),
        format!(
            "pod default/nope not found: no metadata file {}",
            want.display()
        )
    );
    assert!(!err.is_retryable());
    let err = src.get_namespace("nope").expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!(
            "namespace nope not found: no metadata file {}",
            src.namespace_path("nope").display()
        )
    );
    let err = src.get_pod("other-ns", "x").expect_err("missing dir");
    assert!(err.is_not_found());
}

#[test]
fn bad_json_names_the_file() {
    let (dir, src) = populated();
    std::fs::write(dir.path().join("pods/default/broken.json"), "{\"spec\": [").expect("write");
    let err = src.get_pod("default", "broken").expect_err("broken");
    assert!(matches!(err, KubeError::LocalParse { .. }));
    assert!(
        err.to_string().contains("pods/default/broken.json"),
        "{err}"
    );
}

#[test]
fn path_traversal_names_are_rejected() {
    let (_dir, src) = populated();
    for (ns, name) in [
        ("..", "x"),
        ("default", "../../etc/passwd"),
        ("default", ""),
        ("Default", "x"),
    ] {
        let err = src.get_pod(ns, name).expect_err("invalid");
        assert!(
            matches!(err, KubeError::InvalidName { .. }),
            "{ns}/{name}: {err}"
        );
    }
}
