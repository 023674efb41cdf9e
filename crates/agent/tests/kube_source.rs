//! The agent's Kubernetes source (kube-rs `watcher` + reflector store) against the stateful
//! fake API server of `meshcni-testkit`: list then watch with the node's field selector,
//! pagination and bookmarks requested, resume after a closed stream without relisting, relist
//! after 410, list failures reported and retried, and a rotated service-account token file
//! picked up without a restart.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshcni_agent::workloads::kube::{AccessConfig, KubeSource, KubeSourceOptions};
use meshcni_agent::workloads::{SourcePoke, SourceUpdate};
use meshcni_testkit::kube_cluster::FakeCluster;
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node}, "status": {"podIP": "10.0.0.1"}})
}

fn opts() -> KubeSourceOptions {
    KubeSourceOptions {
        watch_timeout: Duration::from_secs(2),
        resync: Duration::from_secs(3600),
        min_backoff: Duration::from_millis(20),
        list_page_size: 500,
        max_backoff: Duration::from_millis(100),
    }
}

fn kubeconfig(cluster: &FakeCluster, dir: &Path) -> AccessConfig {
    let path = dir.join("kubeconfig");
    std::fs::write(&path, cluster.kubeconfig_yaml()).expect("write kubeconfig");
    AccessConfig::Kubeconfig(path)
}

/// A running source and what it sent: the latest pod and namespace sets, and the errors.
struct Running {
    source: Option<KubeSource>,
    rx: mpsc::Receiver<SourceUpdate>,
    pods: Option<BTreeSet<String>>,
    namespaces: Option<BTreeSet<String>>,
    errors: Vec<String>,
}

impl Running {
    fn start(access: AccessConfig, node: &str) -> Running {
        let (tx, rx) = mpsc::channel();
        Running {
            source: Some(KubeSource::spawn(access, node.into(), opts(), tx)),
            rx,
            pods: None,
            namespaces: None,
            errors: Vec::new(),
        }
    }

    /// Wait until the latest pod (or namespace) set is exactly `keys`; returns how many
    /// updates of that kind arrived during the wait.
    fn wait_for(&mut self, pods: bool, keys: &[&str]) -> usize {
        let want: BTreeSet<String> = keys.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut updates = 0;
        loop {
            let current = if pods { &self.pods } else { &self.namespaces };
            if current.as_ref() == Some(&want) {
                return updates;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(SourceUpdate::Pods(p)) => {
                    updates += usize::from(pods);
                    self.pods = Some(p.iter().map(|w| w.key()).collect());
                }
                Ok(SourceUpdate::Namespaces(n)) => {
                    updates += usize::from(!pods);
                    self.namespaces = Some(n.iter().map(|n| n.name.clone()).collect());
                }
                Ok(SourceUpdate::Error(e)) => self.errors.push(e),
                Ok(_) => {}
                Err(e) => panic!(
                    "{} never became {want:?} (now {:?}): {e}; errors: {:?}",
                    if pods { "pods" } else { "namespaces" },
                    current,
                    self.errors
                ),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.source.take() {
            s.stop();
        }
    }
}

fn wait_requests(cluster: &FakeCluster, what: &str, n: usize, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.requests().iter().filter(|r| pred(r)).count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} {what} requests: {:?}",
            cluster.requests()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_watch(r: &str) -> bool {
    r.contains("watch=true") || r.contains("watch=1")
}

#[test]
fn list_then_watch_follows_changes_on_this_node_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_pod(pod("a", "p1", "node-1"));
    cluster.apply_pod(pod("a", "other", "node-2"));
    let mut run = Running::start(kubeconfig(&cluster, dir.path()), "node-1");
    run.wait_for(true, &["a/p1"]);

    cluster.apply_pod(pod("b", "p2", "node-1"));
    cluster.apply_pod(pod("a", "other2", "node-2"));
    run.wait_for(true, &["a/p1", "b/p2"]);
    cluster.delete_pod("a", "p1");
    run.wait_for(true, &["b/p2"]);

    let reqs = cluster.requests();
    // The field selector went to the server (list and watch), percent-encoded; the list is
    // paginated and the watch asks for bookmarks.
    let pods: Vec<&String> = reqs
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?"))
        .collect();
    assert!(
        pods.iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{pods:?}"
    );
    assert!(
        pods.iter()
            .any(|r| is_watch(r) && r.contains("allowWatchBookmarks=true")),
        "{pods:?}"
    );
    assert!(
        pods.iter().any(|r| !is_watch(r) && r.contains("limit=500")),
        "{pods:?}"
    );
    assert_eq!(cluster.list_count("/api/v1/pods"), 1, "{reqs:?}");
    assert!(run.errors.is_empty(), "{:?}", run.errors);
}

#[test]
fn closed_stream_resumes_from_last_version_without_relisting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    let mut run = Running::start(kubeconfig(&cluster, dir.path()), "n");
    run.wait_for(false, &["a"]);
    let ns_watch = |r: &str| r.starts_with("GET /api/v1/namespaces?") && is_watch(r);
    wait_requests(&cluster, "namespace watch", 1, ns_watch);
    cluster.close_watches();
    wait_requests(&cluster, "namespace watch", 2, ns_watch);
    cluster.apply_namespace(json!({"metadata": {"name": "b"}}));
    assert_eq!(run.wait_for(false, &["a", "b"]), 1);
    assert_eq!(cluster.list_count("/api/v1/namespaces"), 1, "no relist");
    let watches: Vec<String> = cluster
        .requests()
        .into_iter()
        .filter(|r| ns_watch(r))
        .collect();
    // Every watch resumed from a version the server handed out, not from 0 or nothing.
    assert!(
        watches.iter().all(|w| !w.contains("resourceVersion=0&")
            && !w.ends_with("resourceVersion=0")
            && w.contains("resourceVersion=1")),
        "{watches:?}"
    );
}

#[test]
fn gone_version_relists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_pod(pod("a", "p1", "n"));
    let mut run = Running::start(kubeconfig(&cluster, dir.path()), "n");
    run.wait_for(true, &["a/p1"]);
    // A change the open watch sees is compacted away together with the history: the client
    // gets ERROR 410 and must relist to learn about p2 and the deletion of p1.
    cluster.compact();
    cluster.delete_pod("a", "p1");
    cluster.apply_pod(pod("a", "p2", "n"));
    run.wait_for(true, &["a/p2"]);
    assert!(cluster.list_count("/api/v1/pods") >= 2);
    assert!(
        run.errors.iter().any(|e| e.contains("410")),
        "{:?}",
        run.errors
    );
}

#[test]
fn list_failures_are_reported_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.fail_next_lists(2);
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    cluster.apply_pod(pod("a", "p1", "n"));
    let mut run = Running::start(kubeconfig(&cluster, dir.path()), "n");
    run.wait_for(false, &["a"]);
    run.wait_for(true, &["a/p1"]);
    let errors: Vec<&String> = run.errors.iter().collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for e in &errors {
        assert!(e.contains("injected list failure"), "{errors:?}");
        assert!(e.contains("500"), "{errors:?}");
    }
    // Two failed lists, then one successful list per collection.
    assert_eq!(
        cluster.list_count("/api/v1/namespaces") + cluster.list_count("/api/v1/pods"),
        4,
        "{:?}",
        cluster.requests()
    );
}

/// A source backing off after failed lists (API server unreachable) lists again as soon as it
/// is poked (a CNI ADD waits for a pod it has not seen), not after the back-off: here the
/// back-off is 30 s and the pod must show within 10 s of the API coming back.
#[test]
fn a_poked_source_retries_a_failing_list_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    cluster.set_unreachable(true);
    let (tx, rx) = mpsc::channel();
    let poke = SourcePoke::new();
    let options = KubeSourceOptions {
        min_backoff: Duration::from_secs(30),
        max_backoff: Duration::from_secs(30),
        ..opts()
    };
    let mut run = Running {
        source: Some(KubeSource::spawn_with_poke(
            kubeconfig(&cluster, dir.path()),
            "n".into(),
            options,
            tx,
            poke.clone(),
        )),
        rx,
        pods: None,
        namespaces: None,
        errors: Vec::new(),
    };
    // Both collections failed once and are in their 30 s back-off.
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.errors.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match run.rx.recv_timeout(left) {
            Ok(SourceUpdate::Error(e)) => run.errors.push(e),
            Ok(_) => {}
            Err(e) => panic!("no list failures reported: {e}"),
        }
    }
    cluster.set_unreachable(false);
    cluster.apply_pod(pod("a", "p1", "n"));
    // Unpoked, nothing happens for the back-off's 30 s.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        cluster.list_count("/api/v1/pods"),
        0,
        "{:?}",
        cluster.requests()
    );
    let poker = {
        let poke = poke.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        (
            std::thread::spawn(move || {
                // As the enrollment loop does while an ADD waits: once a second.
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    poke.poke();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }),
            stop,
        )
    };
    let t = Instant::now();
    run.wait_for(true, &["a/p1"]);
    run.wait_for(false, &["a"]);
    poker.1.store(true, std::sync::atomic::Ordering::SeqCst);
    poker.0.join().expect("poker");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "listed {:?} after the API came back; the back-off is 30 s",
        t.elapsed()
    );
}

/// In-cluster access reads the token from `<dir>/token`; kubelet rewrites that file when it
/// rotates the bound token. kube-rs re-reads it about once a minute, so within ~70 s every
/// new request carries the new token, without restarting the source.
#[test]
fn rotated_service_account_token_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    let sa = dir.path().join("sa");
    std::fs::create_dir(&sa).expect("sa dir");
    std::fs::write(sa.join("token"), "token-one").expect("token");
    let port = cluster
        .url()
        .rsplit(':')
        .next()
        .expect("port in url")
        .to_string();
    let access = AccessConfig::InCluster {
        protocol: "http".into(),
        host: "127.0.0.1".into(),
        port,
        service_account_dir: sa.clone(),
        skip_tls_verify: true,
    };
    let mut run = Running::start(access, "n");
    run.wait_for(false, &["a"]);
    assert!(
        cluster
            .authorizations()
            .iter()
            .all(|a| a == "Bearer token-one"),
        "{:?}",
        cluster.authorizations()
    );
    // Rotate the way kubelet does (atomic replace).
    std::fs::write(sa.join("token.new"), "token-two").expect("token");
    std::fs::rename(sa.join("token.new"), sa.join("token")).expect("rotate");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !cluster
        .authorizations()
        .iter()
        .any(|a| a == "Bearer token-two")
    {
        assert!(
            Instant::now() < deadline,
            "the rotated token was never sent: {:?}",
            cluster.authorizations()
        );
        // New requests happen at every watch timeout (2 s) anyway; nudge them.
        cluster.close_watches();
        std::thread::sleep(Duration::from_millis(500));
    }
    let auths = cluster.authorizations();
    let first_new = auths
        .iter()
        .position(|a| a == "Bearer token-two")
        .expect("seen");
    assert!(
        auths[first_new..].iter().all(|a| a == "Bearer token-two"),
        "the old token was used after the new one: {auths:?}"
    );
    // The source kept working across the rotation.
    cluster.apply_namespace(json!({"metadata": {"name": "b"}}));
    run.wait_for(false, &["a", "b"]);
}

/// The server ends each watch with a BOOKMARK of its current version; the next watch resumes
/// from that version (not from the last pod seen), without a relist.
#[test]
fn watch_resumes_from_the_bookmark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    let listed_at = cluster.apply_pod(pod("a", "p1", "n"));
    let mut run = Running::start(kubeconfig(&cluster, dir.path()), "n");
    run.wait_for(true, &["a/p1"]);
    // Versions move on elsewhere; the pod watch sees no event of its own.
    let mut latest = 0;
    for i in 0..3 {
        latest = cluster.apply_namespace(json!({"metadata": {"name": format!("ns{i}")}}));
    }
    assert!(latest > listed_at);
    let pod_watch = |r: &str| r.starts_with("GET /api/v1/pods?") && is_watch(r);
    let want = format!("resourceVersion={latest}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster
        .requests()
        .iter()
        .any(|r| pod_watch(r) && r.contains(&want))
    {
        assert!(
            Instant::now() < deadline,
            "no pod watch from the bookmark's version {latest}: {:?}",
            cluster.requests()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cluster.list_count("/api/v1/pods"), 1, "no relist");
    cluster.apply_pod(pod("a", "p2", "n"));
    run.wait_for(true, &["a/p1", "a/p2"]);
}

/// In-cluster credentials that cannot be used are reported by name, and the source starts
/// once they are fixed: no token file, then a token with a trailing newline (kube-rs would
/// send it verbatim), then a good one.
#[test]
fn unusable_token_file_is_reported_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    let sa = dir.path().join("sa");
    std::fs::create_dir(&sa).expect("sa dir");
    let port = cluster
        .url()
        .rsplit(':')
        .next()
        .expect("port in url")
        .to_string();
    let access = AccessConfig::InCluster {
        protocol: "http".into(),
        host: "127.0.0.1".into(),
        port,
        service_account_dir: sa.clone(),
        skip_tls_verify: true,
    };
    let mut run = Running::start(access, "n");
    let token = sa.join("token");
    let wait_error = |run: &mut Running, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !run.errors.iter().any(|e| e.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no error with {needle:?}: {:?}",
                run.errors
            );
            if let Ok(SourceUpdate::Error(e)) = run.rx.recv_timeout(Duration::from_millis(100)) {
                run.errors.push(e);
            }
        }
    };
    wait_error(
        &mut run,
        &format!("service account token {}: No such file", token.display()),
    );
    std::fs::write(&token, "tok\n").expect("token");
    wait_error(&mut run, "empty or surrounded by whitespace");
    assert!(cluster.requests().is_empty(), "{:?}", cluster.requests());
    std::fs::write(&token, "tok").expect("token");
    run.wait_for(false, &["a"]);
    assert!(
        cluster.authorizations().iter().all(|a| a == "Bearer tok"),
        "{:?}",
        cluster.authorizations()
    );
}
