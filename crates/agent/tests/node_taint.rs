//! `--remove-node-taint` (`node_taint.rs`) end to end: the `meshcni-agent` binary on temp dirs
//! standing in for the host, in a network namespace of its own, against a stateful fake API
//! server (testkit's `FakeApiServer`, serving one Node and applying the JSON patches it gets:
//! `test` and `replace` of `/spec/taints`, 422 when a `test` fails, as the API server does).
//!
//! Checked: the taint goes only once the agent is ready (a missing service-account token keeps
//! the `install` gate closed; with ambient on, a redirect mode that is not up keeps it), other
//! taints stay, a concurrent change of the taint list between the agent's GET and PATCH is
//! neither lost nor overwritten (the patch's `test` fails, the agent re-reads and retries), with
//! the option off no request touches a node, API errors are logged, counted and retried, the
//! agent never puts the taint back, and inconsistent settings are refused at start.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcni_testkit::kube_api::{FakeApiServer, FakeRequest, FakeResponse};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const NODE_PATH: &str = "/api/v1/nodes/node-a";
const TAINT: &str = "cni.istio.io/not-ready";

const PRIMARY: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}
  ]
}
"#;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(rel)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `metric{labels} value` → value.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

// ---- the fake API server's node ----

/// The node object the fake serves, and the faults it injects.
#[derive(Default)]
struct NodeState {
    taints: Vec<Value>,
    /// Answers given instead of the real one, in order, to the next requests on the node.
    injected: Vec<FakeResponse>,
    /// While > 0, each PATCH first adds a taint of another writer (as if it had been added
    /// between the agent's GET and its PATCH).
    concurrent_edits: u32,
    resource_version: u64,
}

impl NodeState {
    fn object(&self) -> Value {
        json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {"name": NODE, "resourceVersion": self.resource_version.to_string()},
            "spec": {"taints": self.taints},
        })
    }

    /// Apply a JSON patch of `test`/`replace` ops on `/spec/taints` the way the API server
    /// does: all or nothing, 422 when a `test` fails.
    fn patch(&mut self, body: &str) -> FakeResponse {
        let Ok(Value::Array(ops)) = serde_json::from_str::<Value>(body) else {
            return FakeResponse::status(400, "BadRequest", "not a JSON patch");
        };
        let mut taints = self.taints.clone();
        for op in &ops {
            if op["path"] != "/spec/taints" {
                return FakeResponse::status(422, "Invalid", "fake: unsupported path");
            }
            match op["op"].as_str() {
                Some("test") if op["value"] == Value::Array(taints.clone()) => {}
                Some("test") => {
                    return FakeResponse::status(
                        422,
                        "Invalid",
                        "the server rejected our request due to an error in our request: testing value /spec/taints failed",
                    );
                }
                Some("replace") => match op["value"].as_array() {
                    Some(v) => taints = v.clone(),
                    None => return FakeResponse::status(422, "Invalid", "fake: bad value"),
                },
                _ => return FakeResponse::status(422, "Invalid", "fake: unsupported op"),
            }
        }
        self.taints = taints;
        self.resource_version += 1;
        FakeResponse::ok(self.object().to_string())
    }
}

fn taint(key: &str, effect: &str) -> Value {
    json!({"key": key, "effect": effect})
}

/// A fake API server inside the agent's netns serving the node; stopped from inside it.
struct Api {
    server: Option<FakeApiServer>,
    netns: PathBuf,
    state: Arc<Mutex<NodeState>>,
}

impl Api {
    fn start(netns: &Path, taints: Vec<Value>) -> Api {
        let state = Arc::new(Mutex::new(NodeState {
            taints,
            resource_version: 1,
            ..NodeState::default()
        }));
        let s = state.clone();
        let server = meshcni_netx::run_in_netns(netns, move || {
            FakeApiServer::start(move |r: &FakeRequest| {
                let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
                if r.path != NODE_PATH {
                    return FakeResponse::status(404, "NotFound", "fake: only node-a is served");
                }
                if !st.injected.is_empty() {
                    return st.injected.remove(0);
                }
                match r.method.as_str() {
                    "GET" => FakeResponse::ok(st.object().to_string()),
                    "PATCH" => {
                        if r.header("content-type") != Some("application/json-patch+json") {
                            return FakeResponse::status(415, "UnsupportedMediaType", "fake");
                        }
                        if st.concurrent_edits > 0 {
                            st.concurrent_edits -= 1;
                            st.taints
                                .push(taint("example.com/concurrent", "NoSchedule"));
                        }
                        st.patch(&r.body)
                    }
                    _ => FakeResponse::status(405, "MethodNotAllowed", "fake"),
                }
            })
        })
        .expect("enter the netns")
        .expect("fake API server");
        Api {
            server: Some(server),
            netns: netns.to_path_buf(),
            state,
        }
    }
    fn port(&self) -> u16 {
        self.server.as_ref().expect("running").addr().port()
    }
    fn requests(&self) -> Vec<FakeRequest> {
        self.server.as_ref().expect("running").requests()
    }
    fn node_requests(&self, method: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with("/api/v1/nodes"))
            .count()
    }
    fn taints(&self) -> Vec<Value> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .taints
            .clone()
    }
    fn with_state(&self, f: impl FnOnce(&mut NodeState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }
    fn wait_taints(&self, want: &[Value], agent: &Agent, within: Duration) {
        let t = Instant::now();
        while self.taints() != want {
            assert!(
                t.elapsed() < within,
                "taints {:?} != {want:?} after {within:?}; requests {:?}\nlog:\n{}",
                self.taints(),
                self.requests(),
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = meshcni_netx::run_in_netns(&self.netns, move || drop(s));
        }
    }
}

// ---- the node's dirs and the agent ----

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    netns: meshcni_testkit::Netns,
}

impl Node {
    fn new(with_token: bool) -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let netns = meshcni_testkit::Netns::new("taint").expect("private netns for the agent");
        for d in [
            "host/etc/cni/net.d",
            "host/opt/cni/bin",
            "image/opt/cni/bin",
            "sa",
        ] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::write(root.join("host/etc/cni/net.d/10-bridge.conflist"), PRIMARY).expect("primary");
        fs::write(root.join("image/opt/cni/bin/meshcni"), b"\x7fELF stand-in").expect("src");
        fs::copy(fixture("install/kube-ca.crt"), root.join("sa/ca.crt")).expect("ca");
        let n = Node {
            _tmp: tmp,
            root,
            netns,
        };
        if with_token {
            n.write_token();
        }
        n
    }
    fn write_token(&self) {
        fs::copy(fixture("install/token-foo"), self.root.join("sa/token")).expect("token");
    }

    fn args(&self, api_port: u16) -> Vec<String> {
        let p = |rel: &str| self.root.join(rel).to_string_lossy().into_owned();
        vec![
            format!("--mounted-cni-net-dir={}", p("host/etc/cni/net.d")),
            format!("--cni-bin-dir={}", p("image/opt/cni/bin")),
            format!("--cni-bin-dirs={}", p("host/opt/cni/bin")),
            format!("--service-account-dir={}", p("sa")),
            format!("--cni-agent-run-dir={}", p("run/meshcni")),
            format!("--ambient-config-dir={}", p("etc/ambient-config")),
            format!("--uninstall-marker-file={}", p("lifecycle/uninstall")),
            "--listen-address=127.0.0.1".into(),
            "--log-level=info".into(),
            format!("--node-name={NODE}"),
            "--kubernetes-service-protocol=http".into(),
            "--kubernetes-service-host=127.0.0.1".into(),
            format!("--kubernetes-service-port={api_port}"),
        ]
    }

    /// `meshcni-agent <args>` inside the node's netns.
    fn command(&self, args: &[String]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns.path().display()))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_meshcni-agent"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(args);
        c
    }

    fn agent(&self, api_port: u16, extra: &[&str]) -> Agent {
        let readiness = free_port();
        let monitoring = free_port();
        let log = self.root.join("agent.log");
        let mut args = self.args(api_port);
        args.push(format!("--readiness-port={readiness}"));
        args.push(format!("--monitoring-port={monitoring}"));
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log).expect("log file")))
            .spawn()
            .expect("spawn meshcni-agent");
        Agent {
            child,
            readiness,
            monitoring,
            log,
            netns: self.netns.path().to_path_buf(),
        }
    }
}

struct Agent {
    child: Child,
    readiness: u16,
    monitoring: u16,
    log: PathBuf,
    netns: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        meshcni_testkit::stack::http_get_in(&self.netns, &format!("127.0.0.1:{port}"), path).ok()
    }
    fn readyz(&self) -> Option<(u16, String)> {
        self.get(self.readiness, "/readyz")
    }
    fn metrics(&self) -> String {
        self.get(self.monitoring, "/metrics")
            .expect("GET /metrics")
            .1
    }
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("agent exited early ({st}); log:\n{}", self.log_text());
        }
    }
    /// Wait until `/readyz` answers `code` with a body for which `ok` holds.
    fn wait_readyz(&mut self, code: u16, ok: impl Fn(&str) -> bool, within: Duration) {
        let t = Instant::now();
        loop {
            if let Some((c, body)) = self.readyz()
                && c == code
                && ok(&body)
            {
                return;
            }
            self.alive();
            assert!(
                t.elapsed() < within,
                "/readyz not {code} within {within:?}: {:?}\nlog:\n{}",
                self.readyz(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn wait_metric(&self, series: &str, want: f64, within: Duration) {
        let t = Instant::now();
        while metric(&self.metrics(), series) != Some(want) {
            assert!(
                t.elapsed() < within,
                "{series} != {want} within {within:?}:\n{}\nlog:\n{}",
                self.metrics(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---- tests ----

#[test]
fn taint_is_removed_only_once_ready_other_taints_stay_and_it_is_never_put_back() {
    let node = Node::new(false);
    let other = taint("node.kubernetes.io/unschedulable", "NoSchedule");
    let api = Api::start(
        node.netns.path(),
        vec![
            taint(TAINT, "NoSchedule"),
            other.clone(),
            taint(TAINT, "NoExecute"),
        ],
    );
    let mut agent = node.agent(api.port(), &["--remove-node-taint"]);
    // No service-account token: the `install` gate stays closed; the taint must stay.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        agent.alive();
        if let Some((code, _)) = agent.readyz() {
            assert_eq!(code, 503, "ready without a service-account token");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api.node_requests("PATCH"), 0, "patched before ready");
    assert_eq!(api.node_requests("GET"), 0, "asked before ready");
    assert_eq!(api.taints().len(), 3);
    assert!(
        agent
            .log_text()
            .contains("waiting for the agent to be ready before removing it"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        metric(&agent.metrics(), "meshcni_node_taint_removed"),
        Some(0.0)
    );

    node.write_token();
    agent.wait_readyz(200, |_| true, Duration::from_secs(20));
    api.wait_taints(
        std::slice::from_ref(&other),
        &agent,
        Duration::from_secs(10),
    );
    agent.wait_metric("meshcni_node_taint_removed", 1.0, Duration::from_secs(5));
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshcni_node_taint_removals_total"), Some(1.0));
    assert_eq!(metric(&m, "meshcni_node_taint_conflicts_total"), Some(0.0));
    assert!(agent.log_text().contains("readiness taint removed"));
    let reqs = api.requests();
    assert!(
        reqs.iter()
            .all(|r| r.path == NODE_PATH && r.header("authorization") == Some("Bearer foo")),
        "only our own node, with the service-account token: {reqs:?}"
    );

    // The readiness dips (the primary CNI rewrites its config, dropping our entry) and an
    // operator puts the taint back: the agent adds nothing and removes nothing any more.
    let patches = api.node_requests("PATCH");
    api.with_state(|s| s.taints.push(taint(TAINT, "NoSchedule")));
    fs::write(
        node.root.join("host/etc/cni/net.d/10-bridge.conflist"),
        PRIMARY,
    )
    .expect("rewrite");
    std::thread::sleep(Duration::from_secs(3));
    agent.alive();
    assert_eq!(api.node_requests("PATCH"), patches, "{:?}", api.requests());
    assert_eq!(api.taints(), vec![other, taint(TAINT, "NoSchedule")]);
}

#[test]
fn a_concurrent_change_of_the_taint_list_is_retried_and_kept() {
    let node = Node::new(true);
    let mine = taint(TAINT, "NoSchedule");
    let api = Api::start(node.netns.path(), vec![mine]);
    api.with_state(|s| s.concurrent_edits = 2);
    let agent = node.agent(api.port(), &["--remove-node-taint"]);
    api.wait_taints(
        &[
            taint("example.com/concurrent", "NoSchedule"),
            taint("example.com/concurrent", "NoSchedule"),
        ],
        &agent,
        Duration::from_secs(30),
    );
    agent.wait_metric("meshcni_node_taint_removed", 1.0, Duration::from_secs(5));
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshcni_node_taint_conflicts_total"), Some(2.0));
    assert_eq!(metric(&m, "meshcni_node_taint_removals_total"), Some(1.0));
    assert_eq!(api.node_requests("PATCH"), 3, "{:?}", api.requests());
    assert_eq!(api.node_requests("GET"), 3, "re-read after each conflict");
    assert!(
        agent.log_text().contains("concurrent update, retrying"),
        "{}",
        agent.log_text()
    );
}

#[test]
fn with_the_option_off_no_node_is_touched() {
    let node = Node::new(true);
    let api = Api::start(node.netns.path(), vec![taint(TAINT, "NoSchedule")]);
    let mut agent = node.agent(api.port(), &[]);
    agent.wait_readyz(200, |_| true, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    agent.alive();
    assert_eq!(
        api.requests().len(),
        0,
        "requests with the option off: {:?}",
        api.requests()
    );
    assert_eq!(api.taints(), vec![taint(TAINT, "NoSchedule")]);
    let m = agent.metrics();
    assert_eq!(metric(&m, "meshcni_node_taint_removed"), Some(0.0));
    assert_eq!(metric(&m, "meshcni_node_taint_removals_total"), Some(0.0));
}

#[test]
fn api_errors_are_logged_counted_and_retried() {
    let node = Node::new(true);
    let api = Api::start(node.netns.path(), vec![taint(TAINT, "NoSchedule")]);
    api.with_state(|s| {
        s.injected = vec![
            FakeResponse::status(
                403,
                "Forbidden",
                "nodes \"node-a\" is forbidden: User \"system:serviceaccount:kube-system:meshcni\" cannot get resource \"nodes\"",
            ),
            FakeResponse::Close,
            // The GET of the next attempt is real; its PATCH gets a 500.
        ]
    });
    let agent = node.agent(api.port(), &["--remove-node-taint"]);
    // After the two injected failures, fail the PATCH of the third attempt once.
    let t = Instant::now();
    while api.node_requests("GET") < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    api.with_state(|s| {
        s.injected.push(FakeResponse::status(
            500,
            "InternalError",
            "etcd leader changed",
        ))
    });
    api.wait_taints(&[], &agent, Duration::from_secs(30));
    agent.wait_metric("meshcni_node_taint_removed", 1.0, Duration::from_secs(5));
    let m = agent.metrics();
    let errors = |op: &str, reason: &str| {
        metric(
            &m,
            &format!(
                "meshcni_node_taint_api_errors_total{{operation=\"{op}\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(errors("get", "http_403"), Some(1.0), "{m}");
    assert_eq!(errors("get", "unreachable"), Some(1.0), "{m}");
    let log = agent.log_text();
    assert!(log.contains("cannot get resource"), "{log}");
    assert!(log.contains("could not remove it; retrying"), "{log}");
    // The 500 landed on a GET or on the PATCH (whichever came first after it was queued).
    let e500 =
        errors("get", "http_500").unwrap_or(0.0) + errors("patch", "http_500").unwrap_or(0.0);
    assert_eq!(e500, 1.0, "{m}");
    assert!(log.contains("etcd leader changed"), "{log}");
}

#[test]
fn with_ambient_the_taint_stays_while_the_redirect_mode_is_not_up() {
    let node = Node::new(true);
    let api = Api::start(node.netns.path(), vec![taint(TAINT, "NoSchedule")]);
    let mut agent = node.agent(
        api.port(),
        &[
            "--remove-node-taint",
            "--ambient-enabled",
            "--ambient-redirect-mode=iptables",
        ],
    );
    // Every gate but `redirect-mode` open (no ztunnel, no workload source on this node).
    agent.wait_readyz(
        503,
        |b| b.starts_with("not ready: redirect-mode (") && !b.contains("), "),
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    agent.alive();
    assert_eq!(api.node_requests("PATCH"), 0, "{:?}", api.requests());
    assert_eq!(api.node_requests("GET"), 0, "{:?}", api.requests());
    assert_eq!(api.taints(), vec![taint(TAINT, "NoSchedule")]);
}

#[test]
fn inconsistent_settings_are_refused_at_start() {
    let node = Node::new(true);
    let base = vec![
        format!("--node-name={NODE}"),
        "--log-level=error".to_string(),
    ];
    let run = |extra: &[&str]| {
        let mut args = base.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("check-config".into());
        let out = node.command(&args).output().expect("check-config");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--remove-node-taint=true"]);
    assert!(!ok);
    assert!(
        err.contains("--remove-node-taint (REMOVE_NODE_TAINT) = true needs API access"),
        "{err}"
    );
    let (ok, err) = run(&["--node-taint-key=example.com/not-ready"]);
    assert!(!ok);
    assert!(err.contains("--node-taint-key (NODE_TAINT_KEY)"), "{err}");
    let (ok, err) = run(&["--remove-node-taint=true", "--node-taint-key=Bad Key"]);
    assert!(!ok);
    assert!(err.contains("is not a taint key"), "{err}");
    let (ok, err) = run(&[
        "--remove-node-taint=true",
        "--node-taint-key=example.com/not-ready",
        "--kubernetes-service-host=127.0.0.1",
    ]);
    assert!(ok, "{err}");
}
