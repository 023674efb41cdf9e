//! The agent's Kubernetes source against a real kube-apiserver (v1.34) and etcd, built from
//! their Go modules by `scripts/k8s-build.sh` (cached under `$MESHCNI_K8S_ROOT`, default
//! `/opt/meshcni`). Both run in a network namespace this test creates, on its loopback; no
//! kubelet is needed (pods are created with `spec.nodeName` set and stay Pending).
//!
//! The source connects the way it does in a cluster: in-cluster access with a bound
//! service-account token file and the cluster CA, as the chart's service account, holding
//! exactly the chart's ClusterRole (read from `deploy/manifests/meshcni.yaml`, which the
//! manifests test keeps equal to the chart rendered with defaults). Proven in order:
//! paginated list (page size 2) and watch of pods on the node and of namespaces; the API
//! server stopped, the cluster changed meanwhile through a second API server and etcd
//! compacted, the first started again → the watch from the old version gets 410 and the
//! relist converges with no change lost; the token file rotated and the old token revoked →
//! the source keeps working on the new one; the role losing `watch` (and `namespaces`) →
//! a 403 naming the verb and resource.
//!
//! Needs root (network namespace) and the binaries; fails if either is missing.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshcni_agent::workloads::SourceUpdate;
use meshcni_agent::workloads::kube::{AccessConfig, KubeSource, KubeSourceOptions};
use meshcni_testkit::Netns;
use serde_json::{Value, json};

const K8S_VERSION: &str = "v1.34.4";
const ETCD_VERSION: &str = "v3.6.16";
const NODE: &str = "node-1";
/// Address the API server advertises (on the namespace's `lo`; nothing else uses it).
const ADVERTISE: &str = "10.250.0.1";

fn root_dir() -> PathBuf {
    std::env::var_os("MESHCNI_K8S_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/meshcni"))
}

fn binary(component: &str, version: &str, name: &str) -> PathBuf {
    let p = root_dir()
        .join(component)
        .join(version)
        .join("bin")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it with scripts/k8s-build.sh (or set MESHCNI_K8S_ROOT)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CA, API server serving cert, admin client cert (system:masters), service-account key.
fn make_pki(dir: &Path) {
    let o = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    o(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ca.key",
    ]);
    o(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=mcni-test-ca",
        "-days",
        "1",
        "-out",
        "ca.crt",
    ]);
    let cert = |name: &str, subj: &str, ext: &str| {
        o(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ]);
        o(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            subj,
            "-out",
            &format!("{name}.csr"),
        ]);
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
        o(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ]);
    };
    cert(
        "apiserver",
        "/CN=kube-apiserver",
        &format!(
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:{ADVERTISE}\n"
        ),
    );
    cert(
        "admin",
        "/O=system:masters/CN=mcni-test-admin",
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    );
    o(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sa.key",
    ]);
    o(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// A child process killed (and reaped) on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Cluster {
    dir: PathBuf,
    etcd: Option<Proc>,
}

impl Cluster {
    fn start_etcd(&mut self) {
        let args: Vec<String> = [
            "--name=mcni-test",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=mcni-test=http://127.0.0.1:2380",
            "--listen-metrics-urls=http://127.0.0.1:2381",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--data-dir={}", self.dir.join("etcd").display())])
        .collect();
        let mut p = Proc::spawn(
            "etcd",
            &binary("etcd", ETCD_VERSION, "etcd"),
            &args,
            self.dir.join("etcd.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            p.assert_alive();
            let ok = Command::new("curl")
                .args(["-fsS", "http://127.0.0.1:2381/health"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "etcd not healthy within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        self.etcd = Some(p);
    }

    fn start_apiserver(&self, port: u16) -> Proc {
        let pki = self.dir.join("pki");
        let f = |n: &str| pki.join(n).display().to_string();
        let args = vec![
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!("--advertise-address={ADVERTISE}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            format!("--client-ca-file={}", f("ca.crt")),
            format!("--tls-cert-file={}", f("apiserver.crt")),
            format!("--tls-private-key-file={}", f("apiserver.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", f("sa.pub")),
            format!("--service-account-signing-key-file={}", f("sa.key")),
            "--authorization-mode=RBAC".into(),
            format!(
                "--audit-policy-file={}",
                self.dir.join("audit-policy.json").display()
            ),
            format!("--audit-log-path={}", self.dir.join("audit.log").display()),
            "--audit-log-mode=blocking".into(),
            format!(
                "--cert-dir={}",
                self.dir.join(format!("certs-{port}")).display()
            ),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let mut p = Proc::spawn(
            &format!("kube-apiserver:{port}"),
            &binary("kubernetes", K8S_VERSION, "kube-apiserver"),
            &args,
            self.dir.join(format!("apiserver-{port}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            p.assert_alive();
            if self
                .kubectl_raw(port, &["get", "--raw", "/readyz"])
                .status
                .success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver on {port} not ready within 180 s"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        p
    }

    /// The service account's requests as the API server audited them (one record per
    /// request, at ResponseComplete): (requestURI, verb, HTTP code, credential id).
    fn audited(&self) -> Vec<(String, String, u64, String)> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete")
            .map(|e| {
                (
                    e["requestURI"].as_str().unwrap_or_default().to_string(),
                    e["verb"].as_str().unwrap_or_default().to_string(),
                    e["responseStatus"]["code"].as_u64().unwrap_or(0),
                    e["user"]["extra"]["authentication.kubernetes.io/credential-id"][0]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    fn kubeconfig(&self, port: u16) -> PathBuf {
        let pki = self.dir.join("pki");
        let path = self.dir.join(format!("admin-{port}.kubeconfig"));
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "t", "cluster": {
                "server": format!("https://127.0.0.1:{port}"),
                "certificate-authority": pki.join("ca.crt")}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": pki.join("admin.crt"),
                "client-key": pki.join("admin.key")}}],
            "contexts": [{"name": "admin", "context": {"cluster": "t", "user": "admin"}}],
            "current-context": "admin",
        });
        std::fs::write(&path, kc.to_string()).expect("kubeconfig");
        path
    }

    fn kubectl_raw(&self, port: u16, args: &[&str]) -> std::process::Output {
        Command::new(binary("kubernetes", K8S_VERSION, "kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig(port).display()))
            .args(args)
            .output()
            .expect("spawn kubectl")
    }

    fn kubectl(&self, port: u16, args: &[&str]) -> String {
        let out = self.kubectl_raw(port, args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, port: u16, object: &Value) {
        let mut child = Command::new(binary("kubernetes", K8S_VERSION, "kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig(port).display()))
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(object.to_string().as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("kubectl apply");
        assert!(
            out.status.success(),
            "kubectl apply {object}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Compact etcd's history up to its current revision (etcd's JSON gateway).
    fn compact_etcd(&self) -> u64 {
        let range = run(Command::new("curl").args([
            "-fsS",
            "-X",
            "POST",
            "http://127.0.0.1:2379/v3/kv/range",
            "-d",
            r#"{"key":"Lw=="}"#,
        ]));
        let v: Value = serde_json::from_str(&range).expect("range answer");
        let rev: u64 = v["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no revision in {range}"));
        run(Command::new("curl").args([
            "-fsS",
            "-X",
            "POST",
            "http://127.0.0.1:2379/v3/kv/compaction",
            "-d",
            &json!({"revision": rev.to_string(), "physical": true}).to_string(),
        ]));
        rev
    }
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "demo"},
           "spec": {"nodeName": NODE, "automountServiceAccountToken": false,
                    "containers": [{"name": "c", "image": "example.invalid/none:1"}]}})
}

/// The chart's ServiceAccount, ClusterRole and ClusterRoleBinding.
fn chart_rbac() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/manifests/meshcni.yaml");
    let text = std::fs::read_to_string(&path).expect("read deploy/manifests/meshcni.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("manifest YAML");
    let rbac: Vec<Value> = docs
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ServiceAccount" | "ClusterRole" | "ClusterRoleBinding")
            )
        })
        .collect();
    assert_eq!(rbac.len(), 3, "{rbac:?}");
    rbac
}

/// What the source sent, kept current.
struct Seen {
    rx: mpsc::Receiver<SourceUpdate>,
    pods: Option<BTreeSet<String>>,
    namespaces: Option<Vec<meshcni_agent::workloads::NamespaceInfo>>,
    errors: Vec<String>,
}

impl Seen {
    fn pump(&mut self, timeout: Duration) {
        if let Ok(u) = self.rx.recv_timeout(timeout) {
            self.take(u);
        }
        while let Ok(u) = self.rx.try_recv() {
            self.take(u);
        }
    }

    fn take(&mut self, u: SourceUpdate) {
        match u {
            SourceUpdate::Pods(p) => self.pods = Some(p.iter().map(|w| w.key()).collect()),
            SourceUpdate::Namespaces(n) => self.namespaces = Some(n),
            SourceUpdate::Error(e) => self.errors.push(e),
            _ => {}
        }
    }

    fn wait(&mut self, what: &str, secs: u64, mut done: impl FnMut(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; pods {:?}, errors (last 10) {:?}",
                self.pods,
                self.errors.iter().rev().take(10).collect::<Vec<_>>()
            );
            self.pump(Duration::from_millis(200));
        }
    }

    fn wait_pods(&mut self, what: &str, secs: u64, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| format!("demo/{s}")).collect();
        self.wait(what, secs, |s| s.pods.as_ref() == Some(&want));
    }
}

fn start_source(sa_dir: &Path, port: u16) -> (KubeSource, Seen) {
    let (tx, rx) = mpsc::channel();
    let options = KubeSourceOptions {
        watch_timeout: Duration::from_secs(5),
        resync: Duration::from_secs(3600),
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        list_page_size: 2,
    };
    let access = AccessConfig::InCluster {
        protocol: "https".into(),
        host: "127.0.0.1".into(),
        port: port.to_string(),
        service_account_dir: sa_dir.to_path_buf(),
        skip_tls_verify: false,
    };
    let source = KubeSource::spawn(access, NODE.into(), options, tx);
    (
        source,
        Seen {
            rx,
            pods: None,
            namespaces: None,
            errors: Vec::new(),
        },
    )
}

/// A token of the chart's service account, bound to Secret `secret` (deleting the Secret
/// revokes it).
fn bound_token(c: &Cluster, secret: &str) -> String {
    c.kubectl(
        6443,
        &["-n", "kube-system", "create", "secret", "generic", secret],
    );
    c.kubectl(
        6443,
        &[
            "-n",
            "kube-system",
            "create",
            "token",
            "meshcni",
            "--duration=1h",
            "--bound-object-kind=Secret",
            &format!("--bound-object-name={secret}"),
        ],
    )
    .trim()
    .to_string()
}

/// The credential id the API server records for a bound token: `JTI=<jti>`.
fn credential_id(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).expect("JWT payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("JWT payload base64");
    let claims: Value = serde_json::from_slice(&bytes).expect("JWT claims");
    format!("JTI={}", claims["jti"].as_str().expect("jti claim"))
}

fn write_token(sa_dir: &Path, token: &str) {
    // Atomic replace, as kubelet's projected volume does.
    std::fs::write(sa_dir.join("token.tmp"), token).expect("token");
    std::fs::rename(sa_dir.join("token.tmp"), sa_dir.join("token")).expect("token");
}

#[test]
fn agent_source_on_a_real_apiserver() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (creates a network namespace)"
    );
    // Fail early if a binary is missing.
    for (c, v, n) in [
        ("kubernetes", K8S_VERSION, "kube-apiserver"),
        ("kubernetes", K8S_VERSION, "kubectl"),
        ("etcd", ETCD_VERSION, "etcd"),
    ] {
        binary(c, v, n);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir(dir.join("pki")).expect("pki dir");
    make_pki(&dir.join("pki"));
    let ns = Netns::new("kapi").expect("netns");
    ns.add_addr("lo", &format!("{ADVERTISE}/32"))
        .expect("advertise address");
    ns.run(move || scenario(dir)).expect("run in netns");
}

fn scenario(dir: PathBuf) {
    let mut c = Cluster { dir, etcd: None };
    // Audit the agent's service account only (to see pagination and which token it used).
    std::fs::write(
        c.dir.join("audit-policy.json"),
        json!({"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
               "omitStages": ["RequestReceived"],
               "rules": [{"level": "Metadata",
                          "users": ["system:serviceaccount:kube-system:meshcni"]},
                         {"level": "None"}]})
        .to_string(),
    )
    .expect("audit policy");
    c.start_etcd();
    let mut api = c.start_apiserver(6443);

    // The chart's RBAC, a namespace with pods on this node (and one elsewhere).
    for o in chart_rbac() {
        c.apply(6443, &o);
    }
    c.apply(
        6443,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
    );
    c.apply(
        6443,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": "demo"}}),
    );
    for p in ["p1", "p2", "p3"] {
        c.apply(6443, &pod(p));
    }
    let mut elsewhere = pod("elsewhere");
    elsewhere["spec"]["nodeName"] = json!("node-2");
    c.apply(6443, &elsewhere);

    let sa_dir = c.dir.join("sa");
    std::fs::create_dir(&sa_dir).expect("sa dir");
    std::fs::copy(c.dir.join("pki/ca.crt"), sa_dir.join("ca.crt")).expect("ca.crt");
    let token_a = bound_token(&c, "token-a");
    write_token(&sa_dir, &token_a);

    // 1. Paginated list (page size 2, 3 pods on the node), then watch.
    let (source, mut seen) = start_source(&sa_dir, 6443);
    seen.wait_pods("initial list", 60, &["p1", "p2", "p3"]);
    // Two pages: the first with limit=2, the second with its continue token.
    let audited = c.audited();
    let pod_lists: Vec<&String> = audited
        .iter()
        .filter(|(uri, verb, ..)| verb == "list" && uri.starts_with("/api/v1/pods?"))
        .map(|(uri, ..)| uri)
        .collect();
    assert!(
        pod_lists.len() >= 2
            && pod_lists.iter().all(|u| u.contains("limit=2"))
            && pod_lists.iter().any(|u| u.contains("continue=")),
        "{pod_lists:?}"
    );
    seen.wait("namespaces listed", 30, |s| {
        s.namespaces
            .as_ref()
            .is_some_and(|n| n.iter().any(|n| n.name == "demo"))
    });
    c.apply(6443, &pod("p4"));
    seen.wait_pods("watch: pod added", 30, &["p1", "p2", "p3", "p4"]);
    c.kubectl(
        6443,
        &[
            "label",
            "namespace",
            "demo",
            "istio.io/dataplane-mode=ambient",
        ],
    );
    seen.wait("watch: namespace labelled", 30, |s| {
        s.namespaces.as_ref().is_some_and(|n| {
            n.iter().any(|n| {
                n.name == "demo"
                    && n.labels.get("istio.io/dataplane-mode").map(String::as_str)
                        == Some("ambient")
            })
        })
    });
    assert!(seen.errors.is_empty(), "errors: {:?}", seen.errors);

    // 2. API server restart with changes and a compaction while it was away: the watch
    //    resumes from a version etcd no longer has → 410 → relist, nothing lost.
    api.assert_alive();
    api.stop();
    let mut other = c.start_apiserver(6444);
    // No kubelet confirms a graceful deletion: delete at once.
    c.kubectl(
        6444,
        &[
            "-n",
            "demo",
            "delete",
            "pod",
            "p1",
            "p2",
            "--grace-period=0",
            "--force",
        ],
    );
    c.apply(6444, &pod("p5"));
    for i in 0..5 {
        c.kubectl(
            6444,
            &["-n", "demo", "create", "configmap", &format!("bump-{i}")],
        );
    }
    other.assert_alive();
    other.stop();
    let compacted = c.compact_etcd();
    let errors_before = seen.errors.len();
    let mut api = c.start_apiserver(6443);
    seen.wait_pods("after restart + compaction", 120, &["p3", "p4", "p5"]);
    let after: Vec<&String> = seen.errors[errors_before..].iter().collect();
    assert!(
        after
            .iter()
            .any(|e| e.contains("410") || e.contains("too old resource version")),
        "no 410 after compaction to revision {compacted}: {after:?}"
    );

    // 3. Token rotation: a new bound token in the file, the old one revoked.
    let token_b = bound_token(&c, "token-b");
    write_token(&sa_dir, &token_b);
    c.kubectl(6443, &["-n", "kube-system", "delete", "secret", "token-a"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(binary("kubernetes", K8S_VERSION, "kubectl"))
            .args([
                "--server=https://127.0.0.1:6443",
                &format!(
                    "--certificate-authority={}",
                    sa_dir.join("ca.crt").display()
                ),
                &format!("--token={token_a}"),
                "get",
                "pods",
                "-n",
                "demo",
            ])
            .output()
            .expect("kubectl");
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Unauthorized") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old token still works after its Secret was deleted"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every watch open now was opened after the revocation (watch timeout 5 s), so what
    // the source sees from here on came with the new token.
    std::thread::sleep(Duration::from_secs(7));
    let audited_before = c.audited().len();
    c.apply(6443, &pod("p6"));
    seen.wait_pods("with the rotated token", 120, &["p3", "p4", "p5", "p6"]);
    // The API server saw successful pod watches with the new token's credential.
    let (cred_a, cred_b) = (credential_id(&token_a), credential_id(&token_b));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let audited = c.audited();
        let used_b = audited.iter().any(|(uri, verb, code, cred)| {
            verb == "watch" && uri.starts_with("/api/v1/pods?") && *code == 200 && *cred == cred_b
        });
        if used_b {
            assert!(
                audited.iter().any(|(.., cred)| *cred == cred_a),
                "token A was never audited: {audited:?}"
            );
            assert!(
                audited[audited_before..]
                    .iter()
                    .all(|(_, _, code, cred)| *cred != cred_a || *code == 401),
                "token A still accepted after revocation"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no successful pod watch with the new token ({cred_b}): {:?}",
            &audited[audited_before..]
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // 4. RBAC: the role loses `watch` on pods and everything on namespaces.
    let mut role = chart_rbac()
        .into_iter()
        .find(|o| o["kind"] == "ClusterRole")
        .expect("role");
    role["rules"] = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]);
    c.apply(6443, &role);
    let errors_before = seen.errors.len();
    seen.wait("403 on watch", 60, |s| {
        s.errors[errors_before..]
            .iter()
            .any(|e| e.contains("HTTP 403") && e.contains("cannot watch resource \"pods\""))
    });
    source.stop();
    let (source, mut seen) = start_source(&sa_dir, 6443);
    seen.wait("403 on list", 60, |s| {
        s.errors.iter().any(|e| {
            e.contains("HTTP 403")
                && e.contains("watching namespaces")
                && e.contains("cannot list resource \"namespaces\"")
        })
    });
    source.stop();
    api.assert_alive();
    api.stop();
    if let Some(e) = c.etcd.take() {
        e.stop();
    }
}
