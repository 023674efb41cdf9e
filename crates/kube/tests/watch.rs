//! List + watch against the stateful fake API server: events, node filtering, resume after a
//! closed stream without relisting, relist after 410, back-off after list failures.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshcni_kube::fake_cluster::FakeCluster;
use meshcni_kube::watch::{Reflector, ReflectorOptions, Resource, StoreChange};
use meshcni_kube::{ApiClient, ClientOptions, ClusterAccess};
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"nodeName": node}, "status": {"podIP": "10.0.0.1"}})
}

fn client(cluster: &FakeCluster) -> ApiClient {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, cluster.kubeconfig_yaml()).expect("write kubeconfig");
    let access = ClusterAccess::from_kubeconfig(&path).expect("kubeconfig");
    ApiClient::new(&access, ClientOptions::default()).expect("client")
}

fn opts() -> ReflectorOptions {
    ReflectorOptions {
        watch_timeout: Duration::from_secs(2),
        resync: Duration::from_secs(3600),
        list_timeout: Duration::from_secs(5),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    }
}

/// Runs a reflector on a thread and reports the store's keys after every change.
struct Running {
    stop: Arc<AtomicBool>,
    rx: mpsc::Receiver<(StoreChange, BTreeSet<String>)>,
    errors: mpsc::Receiver<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(client: ApiClient, resource: Resource) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (etx, errors) = mpsc::channel();
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut r = Reflector::new(resource, opts());
            r.run(
                &client,
                &|| s2.load(Ordering::SeqCst),
                &mut |r, change| {
                    let _ = tx.send((change, r.store().keys().cloned().collect()));
                },
                &mut |e| {
                    let _ = etx.send(e.to_string());
                },
            );
        });
        Running {
            stop,
            rx,
            errors,
            thread: Some(thread),
        }
    }

    /// Wait until the store has exactly `keys`; returns the change kinds seen on the way.
    fn wait_for(&self, keys: &[&str]) -> Vec<StoreChange> {
        let want: BTreeSet<String> = keys.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((c, got)) => {
                    seen.push(c);
                    if got == want {
                        return seen;
                    }
                }
                Err(e) => panic!("store never became {want:?}: {e}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_watches(cluster: &FakeCluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster
        .requests()
        .iter()
        .filter(|r| r.contains("watch=1"))
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "fewer than {n} watch requests");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn list_then_watch_follows_changes_on_this_node_only() {
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_pod(pod("a", "p1", "node-1"));
    cluster.apply_pod(pod("a", "other", "node-2"));
    let run = Running::start(client(&cluster), Resource::pods_on_node("node-1"));
    assert_eq!(run.wait_for(&["a/p1"]), vec![StoreChange::Relisted]);

    cluster.apply_pod(pod("b", "p2", "node-1"));
    cluster.apply_pod(pod("a", "other2", "node-2"));
    assert_eq!(run.wait_for(&["a/p1", "b/p2"]), vec![StoreChange::Event]);
    cluster.delete_pod("a", "p1");
    assert_eq!(run.wait_for(&["b/p2"]), vec![StoreChange::Event]);

    // The field selector went to the server, percent-encoded.
    let reqs = cluster.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-1") && r.contains("watch=1")),
        "{reqs:?}"
    );
    assert_eq!(cluster.list_count("/api/v1/pods"), 1);
}

#[test]
fn closed_stream_resumes_from_last_version_without_relisting() {
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    let run = Running::start(client(&cluster), Resource::namespaces());
    run.wait_for(&["a"]);
    wait_watches(&cluster, 1);
    cluster.close_watches();
    wait_watches(&cluster, 2);
    cluster.apply_namespace(json!({"metadata": {"name": "b"}}));
    assert_eq!(run.wait_for(&["a", "b"]), vec![StoreChange::Event]);
    assert_eq!(cluster.list_count("/api/v1/namespaces"), 1, "no relist");
    let watches: Vec<String> = cluster
        .requests()
        .into_iter()
        .filter(|r| r.contains("watch=1"))
        .collect();
    assert!(watches.len() >= 2, "{watches:?}");
    // The second watch resumed from the version of the first list, not from 0.
    assert!(
        watches
            .iter()
            .all(|w| !w.contains("resourceVersion=0&") && !w.contains("resourceVersion=&")),
        "{watches:?}"
    );
}

#[test]
fn gone_version_relists() {
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.apply_pod(pod("a", "p1", "n"));
    let run = Running::start(client(&cluster), Resource::pods_on_node("n"));
    run.wait_for(&["a/p1"]);
    // A change the open watch sees is compacted away together with the history: the client
    // gets ERROR 410 and must relist to learn about p2 and the deletion of p1.
    cluster.compact();
    cluster.delete_pod("a", "p1");
    cluster.apply_pod(pod("a", "p2", "n"));
    let seen = run.wait_for(&["a/p2"]);
    assert!(seen.contains(&StoreChange::Relisted), "{seen:?}");
    assert!(cluster.list_count("/api/v1/pods") >= 2);
}

#[test]
fn list_failures_are_reported_and_retried() {
    let cluster = FakeCluster::start().expect("fake cluster");
    cluster.fail_next_lists(2);
    cluster.apply_namespace(json!({"metadata": {"name": "a"}}));
    let run = Running::start(client(&cluster), Resource::namespaces());
    assert_eq!(run.wait_for(&["a"]), vec![StoreChange::Relisted]);
    let errors: Vec<String> = run.errors.try_iter().collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("HTTP 500"), "{errors:?}");
    assert!(errors[0].contains("injected list failure"), "{errors:?}");
    assert_eq!(cluster.list_count("/api/v1/namespaces"), 3);
}
