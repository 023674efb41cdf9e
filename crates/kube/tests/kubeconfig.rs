//! Kubeconfig parsing against the installer's own output and hand-made fixtures.

use std::path::{Path, PathBuf};

use meshcni_kube::{ClusterAccess, KubeconfigError, TlsTrust};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn istio_install(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio/install")
        .join(name)
}

#[test]
fn istio_installer_kubeconfig_with_ca_data() {
    let a = ClusterAccess::from_kubeconfig(&istio_install("kubeconfig-tls")).expect("parse");
    assert_eq!(a.server, "https://10.96.0.1:443");
    assert_eq!(
        a.auth.bearer_token.as_deref(),
        Some("service_account_token_string")
    );
    let TlsTrust::CaPem(pem) = &a.trust else {
        panic!("expected CA, got {:?}", a.trust)
    };
    assert!(
        String::from_utf8_lossy(pem).starts_with("-----BEGIN CERTIFICATE-----"),
        "CA data must decode to PEM"
    );
    assert!(a.auth.client_cert_pem.is_none());
}

#[test]
fn istio_installer_kubeconfig_skip_tls() {
    let a = ClusterAccess::from_kubeconfig(&istio_install("kubeconfig-skip-tls")).expect("parse");
    assert_eq!(a.trust, TlsTrust::InsecureSkipVerify);
    assert_eq!(a.server, "https://10.96.0.1:443");
}

#[test]
fn token_file_and_relative_ca_file() {
    let a = ClusterAccess::from_kubeconfig(&fixture("kubeconfig-tokenfile.yaml")).expect("parse");
    assert_eq!(
        a.server, "https://127.0.0.1:6443",
        "trailing slash stripped"
    );
    // tokenFile wins over token, like client-go.
    assert_eq!(
        a.auth.bearer_token.as_deref(),
        Some("eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.from-token-file.sig")
    );
    let ca = std::fs::read(fixture("tls/ca.crt")).expect("ca");
    assert_eq!(a.trust, TlsTrust::CaPem(ca));
}

#[test]
fn client_certificate_file_and_key_data() {
    let a = ClusterAccess::from_kubeconfig(&fixture("kubeconfig-client-cert.yaml")).expect("parse");
    let (cert, key) = a.auth.client_cert_pem.expect("client cert");
    assert_eq!(cert, std::fs::read(fixture("tls/client.crt")).expect("crt"));
    assert_eq!(key, std::fs::read(fixture("tls/client.key")).expect("key"));
    assert!(a.auth.bearer_token.is_none());
}

#[test]
fn exec_plugin_is_rejected_with_reason() {
    let path = fixture("kubeconfig-exec.yaml");
    let err = ClusterAccess::from_kubeconfig(&path).expect_err("exec unsupported");
    let msg = err.to_string();
    assert!(msg.contains("kubeconfig-exec.yaml"), "{msg}");
    assert!(msg.contains("exec/auth-provider"), "{msg}");
}

#[test]
fn missing_context_names_file_and_context() {
    let err = ClusterAccess::from_kubeconfig(&fixture("kubeconfig-missing-context.yaml"))
        .expect_err("bad context");
    let msg = err.to_string();
    assert!(msg.contains("kubeconfig-missing-context.yaml"), "{msg}");
    assert!(
        msg.contains("\"some-other-context\" not found in contexts"),
        "{msg}"
    );
}

#[test]
fn missing_file_names_path() {
    let err = ClusterAccess::from_kubeconfig(Path::new("/nonexistent/meshcni/kubeconfig"))
        .expect_err("missing");
    assert!(matches!(err, KubeconfigError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/meshcni/kubeconfig"));
}

/// Each invalid document and the phrase its error must contain.
#[test]
fn invalid_documents() {
    let cases: &[(&str, &str)] = &[
        ("", "missing field current-context"),
        ("current-context: c\n", "\"c\" not found in contexts"),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    user: u\n",
            "missing field cluster",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n",
            "cluster \"k\" (of context \"c\") not found in clusters",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\nclusters:\n- name: k\n  cluster:\n    insecure-skip-tls-verify: true\n",
            "missing field server",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nclusters:\n- name: k\n  cluster:\n    server: https://h\n",
            "user \"u\" (of context \"c\") not found in users",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\nclusters:\n- name: k\n  cluster:\n    server: https://h\n    certificate-authority-data: '%%%'\n",
            "certificate-authority-data is not valid base64",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\nclusters:\n- name: k\n  cluster:\n    server: https://h\n    certificate-authority-data: QUJD\n    insecure-skip-tls-verify: true\n",
            "mutually exclusive",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nclusters:\n- name: k\n  cluster:\n    server: https://h\nusers:\n- name: u\n  user:\n    client-certificate-data: QUJD\n",
            "missing field client-key(-data)",
        ),
        (
            "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\nclusters:\n- name: k\n  cluster:\n    server: ftp://h\n",
            "unsupported scheme",
        ),
        ("current-context: [unclosed\n", "parsing kubeconfig"),
    ];
    for (doc, want) in cases {
        let err =
            ClusterAccess::from_kubeconfig_str(doc, Path::new("/etc/cni/net.d/kc")).expect_err(doc);
        let msg = err.to_string();
        assert!(msg.contains("/etc/cni/net.d/kc"), "{msg}");
        assert!(msg.contains(want), "doc {doc:?}: {msg:?} lacks {want:?}");
    }
}

#[test]
fn referenced_file_missing_names_field_and_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nclusters:\n- name: k\n  cluster:\n    server: https://h\nusers:\n- name: u\n  user:\n    tokenFile: missing-token\n",
    )
    .expect("write");
    let msg = ClusterAccess::from_kubeconfig(&kc)
        .expect_err("missing token file")
        .to_string();
    assert!(msg.contains("tokenFile"), "{msg}");
    assert!(
        msg.contains(&dir.path().join("missing-token").display().to_string()),
        "{msg}"
    );
}
