//! The blocking client against an in-process fake API server: success, Status errors,
//! timeouts, refused connections and TLS (CA, wrong CA, skip-verify, client certificates).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshcni_kube::{
    ApiClient, Auth, ClientOptions, ClusterAccess, KubeError, ObjectKind, TlsTrust,
};
use meshcni_testkit::kube_api::{FakeApiServer, FakeResponse};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_path(name)).expect("read")).expect("json")
}

fn access(server: &str, trust: TlsTrust, token: Option<&str>) -> ClusterAccess {
    ClusterAccess {
        server: server.to_string(),
        trust,
        auth: Auth {
            bearer_token: token.map(str::to_string),
            ..Auth::default()
        },
        source: PathBuf::from("test-kubeconfig"),
    }
}

fn fast() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(500),
        timeout: Duration::from_millis(700),
    }
}

fn plain_client(server: &FakeApiServer) -> ApiClient {
    ApiClient::new(
        &access(server.url(), TlsTrust::PublicRoots, Some("sa-token")),
        fast(),
    )
    .expect("client")
}

#[test]
fn get_pod_and_namespace_from_real_shaped_json() {
    let server = FakeApiServer::with_objects(
        vec![fixture_json("pod-productpage.json")],
        vec![fixture_json("namespace-default.json")],
    )
    .expect("server");
    let client = plain_client(&server);
    let pod = client
        .get_pod("default", "productpage-v1-5d9b4c9849-x7kq2")
        .expect("pod");
    assert_eq!(pod.metadata.name, "productpage-v1-5d9b4c9849-x7kq2");
    assert_eq!(pod.metadata.namespace, "default");
    assert_eq!(pod.metadata.uid, "7f3c2d1e-9a8b-4c6d-8e5f-1a2b3c4d5e6f");
    assert!(pod.metadata.deletion_timestamp.is_none());
    assert!(pod.annotation("sidecar.istio.io/status").is_some());
    assert_eq!(pod.label("app"), Some("productpage"));
    assert!(!pod.spec.host_network);
    assert_eq!(pod.spec.containers.len(), 2);
    assert_eq!(pod.spec.init_containers[0].name, "istio-validation");
    let proxy = pod.container("istio-proxy").expect("istio-proxy");
    let sc = proxy.security_context.as_ref().expect("securityContext");
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1337), Some(1337)));
    assert_eq!(
        proxy.env_value("ISTIO_META_INTERCEPTION_MODE"),
        Some("REDIRECT")
    );
    assert_eq!(
        proxy.env_value("POD_NAME"),
        Some(""),
        "valueFrom reads as empty"
    );
    assert_eq!(proxy.env_value("DISABLE_ENVOY"), None);
    assert_eq!(pod.status.pod_ip, "10.244.1.7");
    let ips: Vec<&str> = pod.status.pod_ips.iter().map(|i| i.ip.as_str()).collect();
    assert_eq!(ips, ["10.244.1.7", "fd00:10:244:1::7"]);

    let ns = client.get_namespace("default").expect("ns");
    assert_eq!(ns.metadata.name, "default");
    assert_eq!(ns.metadata.labels["kubernetes.io/metadata.name"], "default");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(
        reqs[0].path,
        "/api/v1/namespaces/default/pods/productpage-v1-5d9b4c9849-x7kq2"
    );
    assert_eq!(reqs[0].header("authorization"), Some("Bearer sa-token"));
    assert_eq!(reqs[0].header("accept"), Some("application/json"));
    assert_eq!(reqs[1].path, "/api/v1/namespaces/default");
}

#[test]
fn not_found_mirrors_api_status() {
    let server = FakeApiServer::with_objects(vec![], vec![]).expect("server");
    let client = plain_client(&server);
    let err = client.get_pod("default", "ghost").expect_err("404");
    assert!(matches!(
        err,
        KubeError::NotFound {
            kind: ObjectKind::Pod,
            ..
        }
    ));
    assert_eq!(err.to_string(), "pod default/ghost not found");
    assert!(!err.is_retryable());
    let err = client.get_namespace("ghost").expect_err("404");
    assert_eq!(err.to_string(), "namespace ghost not found");
}

/// (HTTP answer, check on the error, retryable?, text the message must contain)
type ErrorCase = (FakeResponse, fn(&KubeError) -> bool, bool, &'static str);

#[test]
fn http_errors_are_classified() {
    let forbidden_msg = "pods \"p\" is forbidden: User \"system:serviceaccount:istio-system:istio-cni\" cannot get resource \"pods\" in API group \"\" in the namespace \"default\"";
    let cases: Vec<ErrorCase> = vec![
        (
            FakeResponse::status(403, "Forbidden", forbidden_msg),
            |e| matches!(e, KubeError::Forbidden { .. }),
            false,
            "cannot get resource \\\"pods\\\"",
        ),
        (
            FakeResponse::status(401, "Unauthorized", "Unauthorized"),
            |e| matches!(e, KubeError::Unauthorized { .. }),
            false,
            "401 Unauthorized): Unauthorized",
        ),
        (
            FakeResponse::status(500, "InternalError", "etcdserver: request timed out"),
            |e| matches!(e, KubeError::Api { status: 500, .. }),
            true,
            "etcdserver: request timed out",
        ),
        (
            FakeResponse::status(
                429,
                "TooManyRequests",
                "too many requests, please try again later",
            ),
            |e| matches!(e, KubeError::Api { status: 429, .. }),
            true,
            "HTTP 429",
        ),
        (
            FakeResponse::Json {
                status: 502,
                body: "<html>bad gateway</html>".into(),
            },
            |e| matches!(e, KubeError::Api { status: 502, .. }),
            true,
            "<html>bad gateway</html>",
        ),
        (
            FakeResponse::ok("{\"metadata\": "),
            |e| matches!(e, KubeError::BadResponse { .. }),
            false,
            "not a pod object",
        ),
        (
            FakeResponse::ok("[1,2,3]"),
            |e| matches!(e, KubeError::BadResponse { .. }),
            false,
            "invalid type",
        ),
    ];
    for (resp, check, retryable, text) in cases {
        let r = resp.clone();
        let server = FakeApiServer::start(move |_| r.clone()).expect("server");
        let err = plain_client(&server)
            .get_pod("default", "p")
            .expect_err("error");
        let msg = format!("{err:?} / {err}");
        assert!(check(&err), "{resp:?}: got {msg}");
        assert_eq!(err.is_retryable(), retryable, "{msg}");
        let display = err.to_string();
        let want = text.replace("\\\"", "\"");
        assert!(display.contains(&want), "{display:?} lacks {want:?}");
        if !matches!(err, KubeError::BadResponse { .. }) {
            assert!(
                display.contains("/api/v1/namespaces/default/pods/p"),
                "{display}"
            );
        }
    }
}

#[test]
fn slow_server_times_out_within_budget() {
    let server = FakeApiServer::start(|_| FakeResponse::ok("{}").after(Duration::from_secs(3)))
        .expect("server");
    let client = plain_client(&server);
    let start = Instant::now();
    let err = client.get_pod("default", "slow").expect_err("timeout");
    let took = start.elapsed();
    assert!(matches!(err, KubeError::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn connection_refused_names_server_and_is_retryable() {
    // Bind then drop: the port is (for the duration of the test) closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let server = format!("http://127.0.0.1:{port}");
    let client =
        ApiClient::new(&access(&server, TlsTrust::PublicRoots, None), fast()).expect("client");
    let err = client.get_pod("default", "p").expect_err("refused");
    assert!(matches!(err, KubeError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&server), "{err}");
}

#[test]
fn dropped_connection_is_retryable() {
    let server = FakeApiServer::start(|_| FakeResponse::Close).expect("server");
    let err = plain_client(&server)
        .get_pod("default", "p")
        .expect_err("closed");
    assert!(matches!(err, KubeError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains(server.url()), "{err}");
}

#[test]
fn invalid_names_never_reach_the_server() {
    let server = FakeApiServer::with_objects(vec![], vec![]).expect("server");
    let client = plain_client(&server);
    let err = client.get_pod("default", "a/../../b").expect_err("invalid");
    assert!(matches!(err, KubeError::InvalidName { .. }));
    assert!(server.requests().is_empty());
}

#[test]
fn client_from_kubeconfig_file() {
    let server = FakeApiServer::with_objects(vec![fixture_json("pod-productpage.json")], vec![])
        .expect("server");
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("istio-cni-kubeconfig");
    std::fs::write(&kc, server.kubeconfig_yaml("kc-token")).expect("write");
    let client = ApiClient::from_kubeconfig(&kc, ClientOptions::default()).expect("client");
    client
        .get_pod("default", "productpage-v1-5d9b4c9849-x7kq2")
        .expect("pod");
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer kc-token")
    );
}

// ---- TLS -------------------------------------------------------------------------------

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).expect("fixture")
}

fn server_tls_config(require_client_cert: bool) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = rustls_pemfile::certs(&mut read("tls/server.crt").as_slice())
        .collect::<Result<Vec<_>, _>>()
        .expect("certs");
    let key = rustls_pemfile::private_key(&mut read("tls/server.key").as_slice())
        .expect("key")
        .expect("some key");
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut read("tls/ca.crt").as_slice()) {
            roots.add(c.expect("ca")).expect("add");
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(certs, key).expect("cert"))
}

fn tls_server(require_client_cert: bool) -> FakeApiServer {
    let pod = fixture_json("pod-productpage.json").to_string();
    FakeApiServer::start_tls(server_tls_config(require_client_cert), move |_| {
        FakeResponse::ok(pod.clone())
    })
    .expect("tls server")
}

#[test]
fn tls_with_configured_ca() {
    let server = tls_server(false);
    assert!(server.url().starts_with("https://127.0.0.1:"));
    let client = ApiClient::new(
        &access(server.url(), TlsTrust::CaPem(read("tls/ca.crt")), Some("t")),
        fast(),
    )
    .expect("client");
    let pod = client.get_pod("default", "p").expect("pod over TLS");
    assert_eq!(pod.metadata.name, "productpage-v1-5d9b4c9849-x7kq2");
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer t")
    );
}

#[test]
fn tls_with_wrong_ca_fails_without_retry() {
    let server = tls_server(false);
    let client = ApiClient::new(
        &access(
            server.url(),
            TlsTrust::CaPem(read("tls/other-ca.crt")),
            Some("t"),
        ),
        fast(),
    )
    .expect("client");
    let err = client.get_pod("default", "p").expect_err("unknown CA");
    assert!(matches!(err, KubeError::Tls { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(server.url()), "{err}");
    assert!(server.requests().is_empty(), "no request may be sent");
}

#[test]
fn tls_skip_verify_accepts_unknown_ca() {
    let server = tls_server(false);
    let client = ApiClient::new(
        &access(server.url(), TlsTrust::InsecureSkipVerify, None),
        fast(),
    )
    .expect("client");
    client
        .get_pod("default", "p")
        .expect("pod with skip-verify");
}

#[test]
fn tls_client_certificate_from_kubeconfig() {
    let server = tls_server(true);
    let dir = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(fixture_path("kubeconfig-client-cert.yaml"))
        .expect("kc")
        .replace("https://127.0.0.1:6443", server.url());
    // Keep relative client-certificate path valid: write next to the fixtures' tls dir.
    std::fs::create_dir_all(dir.path().join("tls")).expect("mkdir");
    std::fs::write(dir.path().join("tls/client.crt"), read("tls/client.crt")).expect("copy");
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, text).expect("write");
    let client = ApiClient::from_kubeconfig(&kc, fast()).expect("client");
    client
        .get_pod("default", "p")
        .expect("pod with client cert");

    // Without the certificate the server refuses the handshake.
    let no_cert = ApiClient::new(
        &access(server.url(), TlsTrust::CaPem(read("tls/ca.crt")), None),
        fast(),
    )
    .expect("client");
    let err = no_cert.get_pod("default", "p").expect_err("cert required");
    eprintln!("without client cert: {err:?}");
    assert!(
        matches!(err, KubeError::Tls { .. } | KubeError::Unreachable { .. }),
        "{err:?}"
    );
    assert_eq!(
        server.requests().len(),
        1,
        "only the authenticated request arrived"
    );
}

#[test]
fn bad_ca_pem_is_a_config_error() {
    let err = ApiClient::new(
        &access(
            "https://127.0.0.1:1",
            TlsTrust::CaPem(b"not pem".to_vec()),
            None,
        ),
        fast(),
    )
    .expect_err("bad CA");
    assert!(matches!(err, KubeError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("certificate-authority"), "{err}");
}

#[test]
fn retry_policy_over_the_wire() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let pod = fixture_json("pod-productpage.json").to_string();
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let server = FakeApiServer::start(move |_| {
        if h.fetch_add(1, Ordering::SeqCst) < 2 {
            FakeResponse::status(503, "ServiceUnavailable", "apiserver is shutting down")
        } else {
            FakeResponse::ok(pod.clone())
        }
    })
    .expect("server");
    let client = plain_client(&server);
    let policy = meshcni_kube::RetryPolicy {
        attempts: 5,
        interval: Duration::from_millis(10),
        retry_on: meshcni_kube::RetryOn::Retryable,
    };
    let mut retried = Vec::new();
    let pod = policy
        .run(
            |_| client.get_pod("default", "productpage-v1-5d9b4c9849-x7kq2"),
            |n, e| {
                retried.push((n, e.to_string()));
                true
            },
        )
        .expect("pod after retries");
    assert_eq!(pod.metadata.name, "productpage-v1-5d9b4c9849-x7kq2");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(retried.len(), 2);
    assert!(
        retried[0].1.contains("apiserver is shutting down"),
        "{retried:?}"
    );
}
