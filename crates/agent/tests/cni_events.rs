//! The plugin event server (`pluginevent.sock`, `POST /cmdadd`) end to end: the plugin's own
//! client code (`meshcni_plugin::agent_client::push_cmdadd`, which checks wire compatibility)
//! → the server → the reconcile loop with the fake driver, fed by a local workloads file.
//! Also the `meshcni-agent` binary (in its own netns): socket created 0600 while running,
//! removed on SIGTERM.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshcni_agent::ambient::StatusHandle;
use meshcni_agent::ambient::{AmbientLoop, DriverError, FakeDriver, LoopOptions, Reconciler};
use meshcni_agent::cni_events::{
    Backend, CniEventError, CniEventMetrics, CniEventOptions, CniEventServer, ConnectionLimits,
    SOCKET_NAME,
};
use meshcni_agent::metrics::{DURATION_BUCKETS, EventLabels};
use meshcni_agent::workloads::EnrollPolicy;
use meshcni_agent::workloads::file::FileSource;
use meshcni_plugin::agent_client::{AgentError, CmdAddEvent, EventAddr, EventIp, push_cmdadd};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{Value, json};

const NODE: &str = "node-1";
/// The plugin's timeout (`flow::AGENT_TIMEOUT`).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(5);
const LOOKUP_WAIT: Duration = Duration::from_millis(400);

fn pod(name: &str, ns: &str, ip: Option<&str>, labels: Value) -> Value {
    let mut status = json!({"phase": "Pending"});
    if let Some(ip) = ip {
        status = json!({"phase": "Running", "podIP": ip,
                        "conditions": [{"type": "Ready", "status": "True"}]});
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": NODE},
        "status": status
    })
}

fn ztunnel() -> Value {
    let mut zt = pod(
        "ztunnel-x",
        "istio-system",
        Some("10.0.0.250"),
        json!({"app": "ztunnel"}),
    );
    zt["spec"]["serviceAccountName"] = json!("ztunnel");
    zt
}

fn namespaces() -> Vec<Value> {
    vec![
        json!({"metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        json!({"metadata": {"name": "plain"}}),
        json!({"metadata": {"name": "istio-system"}}),
    ]
}

fn write_file(path: &Path, pods: &[Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"namespaces": namespaces(), "pods": pods}).to_string(),
    )
    .expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// What the plugin sends for a pod with one IPv4 address (same construction as
/// `flow::enroll_ambient`).
fn event(ns: &str, name: &str, ip: &str) -> CmdAddEvent {
    CmdAddEvent {
        netns: format!("/var/run/netns/cni-{name}"),
        pod_name: name.into(),
        pod_namespace: ns.into(),
        ips: vec![EventIp {
            interface: 0,
            address: EventAddr {
                ip: ip.into(),
                mask: "////AA==".into(),
            },
            gateway: Some("10.0.0.1".into()),
        }],
        pod_uid: None,
    }
}

struct Setup {
    dir: tempfile::TempDir,
    file: PathBuf,
    driver: FakeDriver,
    status: StatusHandle,
    metrics: CniEventMetrics,
    rt: tokio::runtime::Runtime,
    server: Option<CniEventServer>,
    running: Option<AmbientLoop>,
}

impl Setup {
    fn new(pods: &[Value]) -> Setup {
        Setup::with(FakeDriver::new(), pods)
    }

    fn new_with_driver(driver: FakeDriver, pods: &[Value]) -> Setup {
        Setup::with(driver, pods)
    }

    fn with(driver: FakeDriver, pods: &[Value]) -> Setup {
        Setup::with_options(
            driver,
            pods,
            CniEventOptions {
                pod_lookup_wait: LOOKUP_WAIT,
                reply_timeout: Duration::from_millis(4500),
            },
        )
    }

    fn with_options(driver: FakeDriver, pods: &[Value], options: CniEventOptions) -> Setup {
        Setup::with_limits(driver, pods, options, ConnectionLimits::default())
    }

    fn with_limits(
        driver: FakeDriver,
        pods: &[Value],
        options: CniEventOptions,
        limits: ConnectionLimits,
    ) -> Setup {
        let s = Setup::with_debounce(driver, pods, options, limits, Duration::from_millis(5));
        s.wait_synced();
        s
    }

    fn with_debounce(
        driver: FakeDriver,
        pods: &[Value],
        options: CniEventOptions,
        limits: ConnectionLimits,
        debounce: Duration,
    ) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("workloads.json");
        write_file(&file, pods);
        let status = StatusHandle::new(Err("starting".into()));
        let rec = Reconciler::new(
            Box::new(driver.clone()),
            EnrollPolicy::default(),
            LoopOptions {
                resync: Duration::from_secs(60),
                min_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
                debounce,
                ..LoopOptions::default()
            },
            status.clone(),
        );
        let mut l = AmbientLoop::spawn(rec);
        let src = FileSource::spawn(
            file.clone(),
            NODE.into(),
            Duration::from_millis(300),
            l.sender(),
        );
        l.keep(Box::new(src));
        let metrics = CniEventMetrics {
            events: Family::default(),
            duration: Histogram::new(DURATION_BUCKETS),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = {
            let _g = rt.enter();
            CniEventServer::start_with_limits(
                &dir.path().join("run"),
                Backend::Loop(l.sender()),
                options,
                metrics.clone(),
                limits,
            )
            .expect("start server")
        };
        let s = Setup {
            dir,
            file,
            driver,
            status,
            metrics,
            rt,
            server: Some(server),
            running: Some(l),
        };
        // Not waited for here: a long debounce holds back the first pass on the file's data.
        s
    }

    fn wait_synced(&self) {
        let s = self;
        // The loop has read the file before the first event (the lookup wait covers a lag,
        // but tests asserting "refused" should not depend on it).
        let deadline = Instant::now() + Duration::from_secs(10);
        let connected = s.driver.lock().connected;
        // A connected-proxy mode stays not ready until its proxy connects: wait for the first
        // pass instead.
        while (!connected && s.status.get().redirect.is_err()) || s.status.get().passes == 0 {
            assert!(
                Instant::now() < deadline,
                "loop never synced: {:?}",
                s.status.get()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join(SOCKET_NAME)
    }

    fn add(&self, ev: &CmdAddEvent) -> Result<(), AgentError> {
        push_cmdadd(&self.socket(), ev, PLUGIN_TIMEOUT)
    }

    fn applies(&self) -> Vec<String> {
        self.driver
            .lock()
            .calls
            .iter()
            .filter(|c| c.starts_with("apply"))
            .cloned()
            .collect()
    }

    fn count(&self, result: &'static str) -> u64 {
        self.metrics
            .events
            .get_or_create(&EventLabels { result })
            .get()
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown(Duration::from_secs(1)));
        }
        if let Some(l) = self.running.take() {
            l.stop(false);
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn rejected(r: Result<(), AgentError>) -> (u16, String) {
    match r {
        Err(AgentError::Rejected { status, body, .. }) => (status, body),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

fn ambient(name: &str) -> Value {
    pod(name, "demo", None, json!({}))
}

#[test]
fn ambient_pod_is_captured_with_the_event_ips() {
    let s = Setup::new(&[ztunnel(), ambient("app")]);
    // The watch has no IP for the pod yet (status.podIP empty): the event's IP is used.
    let t = Instant::now();
    s.add(&event("demo", "app", "10.0.0.2")).expect("captured");
    let took = t.elapsed();
    let enrolled = s.driver.lock().enrolled.clone();
    assert_eq!(
        enrolled.pods["uid-app"].ips,
        vec!["10.0.0.2".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(
        s.applies(),
        ["apply enroll demo/app (uid uid-app) ips [10.0.0.2]"]
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(s.count("captured"), 1);

    // The runtime retries an ADD that already succeeded: 200 again, nothing re-applied.
    s.add(&event("demo", "app", "10.0.0.2"))
        .expect("already captured");
    assert_eq!(s.applies().len(), 1, "{:?}", s.applies());

    // The watch catches up with the same IP: still nothing to do.
    write_file(
        &s.file,
        &[ztunnel(), pod("app", "demo", Some("10.0.0.2"), json!({}))],
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.applies().len(), 1, "{:?}", s.applies());
    assert_eq!(s.count("captured"), 2);
}

#[test]
fn a_cmdadd_is_not_held_back_by_the_loops_debounce() {
    // The loop coalesces bursts of source updates for `debounce` before planning. A CNI ADD is
    // a pod start waiting for its answer: it is planned at once. With a debounce longer than
    // the reply timeout, an ADD that waited for it would be refused as "too slow".
    let s = Setup::with_debounce(
        FakeDriver::new(),
        &[ztunnel(), ambient("app")],
        CniEventOptions {
            pod_lookup_wait: LOOKUP_WAIT,
            reply_timeout: Duration::from_millis(4500),
        },
        ConnectionLimits::default(),
        Duration::from_secs(10),
    );
    s.add(&event("demo", "app", "10.0.0.2"))
        .expect("captured without waiting for the debounce");
    assert_eq!(
        s.applies(),
        ["apply enroll demo/app (uid uid-app) ips [10.0.0.2]"]
    );
}

#[test]
fn event_ips_win_over_a_stale_watch() {
    // The pod status still shows the previous sandbox's IP.
    let s = Setup::new(&[ztunnel(), pod("app", "demo", Some("10.0.0.9"), json!({}))]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.status.get().enrolled.contains("uid-app") {
        assert!(Instant::now() < deadline, "initial enroll");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.add(&event("demo", "app", "10.0.0.3")).expect("captured");
    assert_eq!(
        s.driver.lock().enrolled.pods["uid-app"].ips,
        vec!["10.0.0.3".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(
        s.applies(),
        [
            "apply enroll demo/app (uid uid-app) ips [10.0.0.9]",
            "apply update demo/app (uid uid-app) ips [10.0.0.9] -> [10.0.0.3]"
        ]
    );
    // A resync of the (still stale) file does not take the IP back.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.applies().len(), 2, "{:?}", s.applies());
}

#[test]
fn non_ambient_pod_is_refused_with_the_reason() {
    let s = Setup::new(&[
        ztunnel(),
        pod("web", "plain", None, json!({})),
        pod(
            "opted-out",
            "demo",
            None,
            json!({"istio.io/dataplane-mode": "none"}),
        ),
    ]);
    let (status, body) = rejected(s.add(&event("plain", "web", "10.0.0.4")));
    assert_eq!(status, 500);
    assert!(
        body.contains("pod plain/web is not selected for ambient by the agent: no ambient enablement selector matches"),
        "{body}"
    );
    let (_, body) = rejected(s.add(&event("demo", "opted-out", "10.0.0.5")));
    assert!(body.contains("demo/opted-out is not selected"), "{body}");
    assert!(s.applies().is_empty(), "{:?}", s.applies());
    assert_eq!(s.count("not_selected"), 2);
}

#[test]
fn unknown_pod_is_refused_after_the_lookup_wait_and_a_late_pod_is_found() {
    let s = Setup::new(&[ztunnel()]);
    let t = Instant::now();
    let (status, body) = rejected(s.add(&event("demo", "ghost", "10.0.0.6")));
    let took = t.elapsed();
    assert_eq!(status, 500);
    assert!(
        body.contains("pod demo/ghost not found in the agent's view after"),
        "{body}"
    );
    assert!(
        took >= LOOKUP_WAIT && took < LOOKUP_WAIT + Duration::from_secs(1),
        "answered after {took:?}"
    );
    assert_eq!(s.count("not_found"), 1);

    // The pod shows up in the source while the ADD waits: captured.
    let file = s.file.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        write_file(&file, &[ztunnel(), ambient("late")]);
    });
    s.add(&event("demo", "late", "10.0.0.7"))
        .expect("found after the source caught up");
    writer.join().expect("writer");
    assert!(s.driver.lock().enrolled.pods.contains_key("uid-late"));
}

#[test]
fn malformed_events_get_400() {
    let s = Setup::new(&[ztunnel(), ambient("app")]);
    let mut ev = event("demo", "app", "10.0.0.2");
    ev.pod_name = String::new();
    let (status, body) = rejected(s.add(&ev));
    assert_eq!(status, 400);
    assert!(body.contains("field PodName is missing or empty"), "{body}");

    let mut ev = event("demo", "app", "10.0.0.300");
    ev.ips[0].address.mask = "////AA==".into();
    let (status, body) = rejected(s.add(&ev));
    assert_eq!(status, 400);
    assert!(body.contains(r#"IPs[0].Address.IP "10.0.0.300""#), "{body}");

    let mut ev = event("demo", "app", "10.0.0.2");
    ev.ips.clear();
    let (status, body) = rejected(s.add(&ev));
    assert_eq!(
        (status, body.contains("IPs is empty")),
        (400, true),
        "{body}"
    );

    // Not JSON at all, by hand.
    let mut c = UnixStream::connect(s.socket()).expect("connect");
    c.write_all(
        b"POST /cmdadd HTTP/1.1\r\nHost: unix\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope!",
    )
    .expect("write");
    let mut reply = String::new();
    c.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("body is not a cmdadd event"), "{reply}");

    // Other paths and methods are not ours.
    let mut c = UnixStream::connect(s.socket()).expect("connect");
    c.write_all(b"GET /cmdadd HTTP/1.1\r\nHost: unix\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut reply = String::new();
    c.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");

    assert!(s.applies().is_empty(), "{:?}", s.applies());
    assert_eq!(s.count("bad_request"), 4);
}

#[test]
fn no_ztunnel_is_refused_then_captured_once_ztunnel_is_ready() {
    let s = Setup::new(&[ambient("app")]);
    let (status, body) = rejected(s.add(&event("demo", "app", "10.0.0.2")));
    assert_eq!(status, 500);
    assert!(body.contains("no ztunnel ready on this node"), "{body}");
    assert!(
        body.contains("demo/app would start without capture"),
        "{body}"
    );
    assert!(s.applies().is_empty(), "{:?}", s.applies());
    assert_eq!(s.count("no_ztunnel"), 1);

    // The runtime retries the sandbox; ztunnel has come up meanwhile.
    write_file(&s.file, &[ztunnel(), ambient("app")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status.get().ztunnel.is_none() {
        assert!(Instant::now() < deadline, "ztunnel never seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.add(&event("demo", "app", "10.0.0.2")).expect("captured");
}

#[test]
fn driver_failures_are_refused_with_the_driver_text() {
    let driver = FakeDriver::new();
    driver.lock().fail_uids.insert("uid-bad".into());
    let s = Setup::with(driver.clone(), &[ztunnel(), ambient("bad"), ambient("ok")]);
    let (status, body) = rejected(s.add(&event("demo", "bad", "10.0.0.2")));
    assert_eq!(status, 500);
    assert!(
        body.contains(
            "fake driver could not capture pod demo/bad: fake: enroll fails for demo/bad (uid uid-bad)"
        ),
        "{body}"
    );
    assert_eq!(s.count("driver_error"), 1);

    // A driver-scoped failure (the whole driver is broken).
    driver
        .lock()
        .fail_apply
        .push(DriverError::driver("fake: iptables-restore exploded"));
    let (status, body) = rejected(s.add(&event("demo", "ok", "10.0.0.3")));
    assert_eq!(status, 500);
    assert!(
        body.contains("fake driver could not capture pod demo/ok: fake: iptables-restore exploded"),
        "{body}"
    );
    // Once the driver works again the retried ADD succeeds at once (back-off reset).
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status.get().redirect.is_err() {
        assert!(Instant::now() < deadline, "driver never recovered");
        std::thread::sleep(Duration::from_millis(5));
    }
    driver.lock().fail_uids.clear();
    s.add(&event("demo", "bad", "10.0.0.2"))
        .expect("captured after the fix");
    s.add(&event("demo", "ok", "10.0.0.3")).expect("captured");
}

#[test]
fn an_ip_still_held_by_another_pod_is_refused_at_the_deadline() {
    // `old` still holds 10.0.0.5 in the agent's view (its deletion not seen yet) when the
    // runtime hands the IP to `new`: `new` cannot be captured without stealing it.
    let s = Setup::with_options(
        FakeDriver::new(),
        &[
            ztunnel(),
            pod("old", "demo", Some("10.0.0.5"), json!({})),
            ambient("new"),
        ],
        CniEventOptions {
            pod_lookup_wait: LOOKUP_WAIT,
            reply_timeout: Duration::from_millis(2000),
        },
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.status.get().enrolled.contains("uid-old") {
        assert!(Instant::now() < deadline, "old never enrolled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let (status, body) = rejected(s.add(&event("demo", "new", "10.0.0.5")));
    let took = t.elapsed();
    assert_eq!(status, 500);
    assert!(
        body.contains("pod demo/new was not captured within")
            && body.contains("IP 10.0.0.5 is still enrolled for pod uid uid-old"),
        "{body}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2000),
        "the loop answers before the server's own timeout: {took:?}"
    );
    assert_eq!(s.count("timeout"), 1);
    // The refused sandbox's IP is not left behind as `new`'s.
    assert!(!s.driver.lock().enrolled.pods.contains_key("uid-new"));

    // `old` is gone; the runtime's retry succeeds.
    write_file(&s.file, &[ztunnel(), ambient("new")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status.get().enrolled.contains("uid-old") {
        assert!(Instant::now() < deadline, "old never released");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.add(&event("demo", "new", "10.0.0.5")).expect("captured");
}

#[test]
fn a_retried_add_supersedes_the_waiting_one() {
    // The pod is not known yet; the runtime's second ADD (new sandbox, new IP) replaces the
    // first while both wait.
    let s = Setup::new(&[ztunnel()]);
    let socket = s.socket();
    let (first, second) = std::thread::scope(|sc| {
        let a =
            sc.spawn(|| push_cmdadd(&socket, &event("demo", "app", "10.0.0.2"), PLUGIN_TIMEOUT));
        std::thread::sleep(Duration::from_millis(100));
        let b =
            sc.spawn(|| push_cmdadd(&socket, &event("demo", "app", "10.0.0.3"), PLUGIN_TIMEOUT));
        std::thread::sleep(Duration::from_millis(100));
        write_file(&s.file, &[ztunnel(), ambient("app")]);
        (a.join().expect("a"), b.join().expect("b"))
    });
    let (status, body) = rejected(first);
    assert_eq!(status, 500);
    assert!(
        body.contains("a newer ADD for pod demo/app replaced this one"),
        "{body}"
    );
    second.expect("the newer ADD is captured");
    assert_eq!(
        s.applies(),
        ["apply enroll demo/app (uid uid-app) ips [10.0.0.3]"]
    );
    assert_eq!((s.count("superseded"), s.count("captured")), (1, 1));
}

#[test]
fn twenty_concurrent_adds_are_all_answered_correctly() {
    let mut pods = vec![ztunnel()];
    for i in 0..20 {
        if i % 4 == 3 {
            pods.push(pod(&format!("p{i}"), "plain", None, json!({})));
        } else {
            pods.push(ambient(&format!("p{i}")));
        }
    }
    let s = Setup::new(&pods);
    let socket = s.socket();
    let t = Instant::now();
    let answers: Vec<(usize, Result<(), AgentError>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let socket = socket.clone();
                sc.spawn(move || {
                    let ns = if i % 4 == 3 { "plain" } else { "demo" };
                    let ev = event(ns, &format!("p{i}"), &format!("10.0.1.{}", i + 1));
                    (i, push_cmdadd(&socket, &ev, PLUGIN_TIMEOUT))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let took = t.elapsed();
    let enrolled = s.driver.lock().enrolled.clone();
    for (i, r) in answers {
        if i % 4 == 3 {
            let (status, body) = rejected(r);
            assert_eq!(status, 500);
            assert!(
                body.contains(&format!("plain/p{i} is not selected")),
                "{body}"
            );
            assert!(!enrolled.pods.contains_key(&format!("uid-p{i}")));
        } else {
            r.unwrap_or_else(|e| panic!("p{i}: {e}"));
            assert_eq!(
                enrolled.pods[&format!("uid-p{i}")].ips,
                vec![
                    format!("10.0.1.{}", i + 1)
                        .parse::<std::net::IpAddr>()
                        .expect("ip")
                ]
            );
        }
    }
    assert_eq!(enrolled.pods.len(), 15);
    assert_eq!((s.count("captured"), s.count("not_selected")), (15, 5));
    assert!(took < Duration::from_secs(3), "took {took:?}");
    eprintln!("20 concurrent cmdadd answered in {took:?}");
}

#[test]
fn socket_is_0600_replaces_a_stale_one_and_is_removed_on_shutdown() {
    let mut s = Setup::new(&[ztunnel()]);
    let path = s.socket();
    let meta = std::fs::symlink_metadata(&path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary name left next to it.
    let names: Vec<String> = std::fs::read_dir(path.parent().expect("dir"))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [SOCKET_NAME]);
    s.shutdown();
    assert!(!path.exists(), "socket left behind after shutdown");
    assert!(matches!(
        push_cmdadd(&path, &event("demo", "x", "10.0.0.2"), PLUGIN_TIMEOUT),
        Err(AgentError::Unreachable { .. })
    ));

    // A stale socket of a previous agent is replaced; a regular file is not touched.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _g = rt.enter();
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join(SOCKET_NAME);
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("stale socket"));
    assert!(stale.exists());
    let metrics = CniEventMetrics {
        events: Family::default(),
        duration: Histogram::new(DURATION_BUCKETS),
    };
    let server = CniEventServer::start(
        dir.path(),
        Backend::Unavailable("redirect-mode (no driver)".into()),
        CniEventOptions::default(),
        metrics.clone(),
    )
    .expect("replaces the stale socket");
    let (status, body) = rejected(
        std::thread::scope(|sc| {
            sc.spawn(|| push_cmdadd(&stale, &event("demo", "x", "10.0.0.2"), PLUGIN_TIMEOUT))
                .join()
        })
        .expect("client"),
    );
    assert_eq!(status, 500);
    assert!(
        body.contains("ambient enrollment is not running on this node: redirect-mode (no driver)"),
        "{body}"
    );
    assert_eq!(
        metrics
            .events
            .get_or_create(&EventLabels {
                result: "unavailable"
            })
            .get(),
        1
    );
    drop(server);
    assert!(!stale.exists(), "drop removes the socket");

    std::fs::write(&stale, b"not a socket").expect("write");
    let err = CniEventServer::start(
        dir.path(),
        Backend::Unavailable("x".into()),
        CniEventOptions::default(),
        metrics,
    )
    .expect_err("must not replace a regular file");
    assert!(matches!(err, CniEventError::NotASocket { .. }), "{err}");
    assert_eq!(std::fs::read(&stale).expect("kept"), b"not a socket");
}

#[test]
fn the_agent_binary_serves_the_socket_and_removes_it_on_sigterm() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    for d in ["net.d", "bin", "image", "sa"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("image/meshcni"), b"stand-in").expect("plugin");
    let workloads = root.join("workloads.json");
    write_file(&workloads, &[ztunnel(), ambient("app")]);
    let run_dir = root.join("run");
    let log = root.join("agent.log");
    let p = |p: PathBuf| p.to_string_lossy().into_owned();
    // In a network namespace of its own: whatever redirect driver this build has, it cannot
    // touch the host's rules. The unix socket is a path, reachable from here.
    let mut child = std::process::Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .env("NODE_NAME", NODE)
        .args([
            format!("--mounted-cni-net-dir={}", p(root.join("net.d"))),
            format!("--cni-bin-dir={}", p(root.join("image"))),
            format!("--cni-bin-dirs={}", p(root.join("bin"))),
            format!("--service-account-dir={}", p(root.join("sa"))),
            format!("--cni-agent-run-dir={}", p(run_dir.clone())),
            format!("--ambient-config-dir={}", p(root.join("ambient"))),
            format!("--uninstall-marker-file={}", p(root.join("marker"))),
            format!("--ambient-workloads-file={}", p(workloads)),
            "--ambient-enabled".into(),
            // The only redirect mode built (the default, inpod, is refused at start-up).
            "--ambient-redirect-mode=iptables".into(),
            // lo is down in the fresh netns; the wildcard binds anyway.
            "--listen-address=0.0.0.0".into(),
            "--readiness-port=0".into(),
            "--monitoring-port=0".into(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn meshcni-agent");
    let socket = run_dir.join(SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait().expect("wait").is_some() {
            let _ = child.kill();
            panic!(
                "no {} from the agent; log:\n{}",
                socket.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&socket)
        .expect("meta")
        .permissions()
        .mode();
    // Whatever the redirect driver situation of this build, the ADD gets a verdict over the
    // socket (200 with a driver, 500 with the reason without one), never a transport error.
    let verdict = push_cmdadd(&socket, &event("demo", "app", "10.0.0.2"), PLUGIN_TIMEOUT);
    eprintln!("agent verdict: {verdict:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(mode & 0o777, 0o600, "socket mode");
    match verdict {
        Ok(()) => {}
        Err(AgentError::Rejected { status, body, .. }) => {
            assert_eq!(status, 500);
            assert!(!body.is_empty(), "500 without a reason");
        }
        Err(e) => panic!("no verdict: {e}\nlog:\n{log_text}"),
    }
    assert!(status.success(), "agent exit {status:?}; log:\n{log_text}");
    assert!(!socket.exists(), "socket left behind after SIGTERM");
}

/// The loop side alone, driven step by step (no threads, no socket).
#[test]
fn reconciler_answers_not_synced_and_terminating_only() {
    use meshcni_agent::cni_events::{CmdAdd, CniAddRequest, RejectKind};
    use meshcni_agent::workloads::{SourceUpdate, WorkloadSnapshot, decode_namespace, decode_pod};
    let options = CniEventOptions {
        pod_lookup_wait: Duration::from_millis(200),
        reply_timeout: Duration::from_secs(4),
    };
    let ev = CmdAdd {
        netns: String::new(),
        namespace: "demo".into(),
        name: "app".into(),
        ips: vec!["10.0.0.2".parse().expect("ip")],
        uid: None,
    };
    let mut rec = Reconciler::new(
        Box::new(FakeDriver::new()),
        EnrollPolicy::default(),
        LoopOptions::default(),
        StatusHandle::new(Err("starting".into())),
    );

    // Nothing listed yet: waits during the lookup window, then refuses.
    let (req, mut rx) = CniAddRequest::new(ev.clone(), &options);
    let t0 = req.received;
    rec.update(SourceUpdate::CniAdd(req));
    rec.reconcile(t0);
    assert!(rx.try_recv().is_err(), "still waiting");
    rec.update(SourceUpdate::Error("api server unreachable".into()));
    rec.reconcile(t0 + Duration::from_millis(250));
    let r = rx.try_recv().expect("answered").expect_err("refused");
    assert_eq!(r.kind, RejectKind::NotSynced);
    assert!(
        r.message.contains("cannot check pod demo/app: the agent has not received its first list of pods and namespaces")
            && r.message.contains("(last source error: api server unreachable)"),
        "{r}"
    );

    // Only a terminating pod of that name (a StatefulSet pod being replaced).
    let mut old = pod("app", "demo", Some("10.0.0.9"), json!({}));
    old["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
    let snap = WorkloadSnapshot::from_parts(
        [decode_pod(&ztunnel()), decode_pod(&old)]
            .into_iter()
            .map(|p| p.expect("pod")),
        namespaces()
            .iter()
            .map(|n| decode_namespace(n).expect("ns")),
    );
    rec.update(SourceUpdate::Snapshot(snap));
    let (req, mut rx) = CniAddRequest::new(ev, &options);
    let t0 = req.received;
    rec.update(SourceUpdate::CniAdd(req));
    rec.reconcile(t0);
    assert!(rx.try_recv().is_err(), "still waiting for the new pod");
    rec.reconcile(t0 + Duration::from_millis(250));
    let r = rx.try_recv().expect("answered").expect_err("refused");
    assert_eq!(r.kind, RejectKind::NotFound);
    assert!(
        r.message.contains("pod demo/app not found in the agent's view after 250 ms (only a terminating pod with that name, uid uid-app)"),
        "{r}"
    );
}

fn step_reconciler(driver: &FakeDriver, pods: &[Value]) -> Reconciler {
    use meshcni_agent::workloads::{SourceUpdate, WorkloadSnapshot, decode_namespace, decode_pod};
    let mut rec = Reconciler::new(
        Box::new(driver.clone()),
        EnrollPolicy::default(),
        LoopOptions::default(),
        StatusHandle::new(Err("starting".into())),
    );
    rec.update(SourceUpdate::Snapshot(WorkloadSnapshot::from_parts(
        pods.iter().map(|p| decode_pod(p).expect("pod")),
        namespaces()
            .iter()
            .map(|n| decode_namespace(n).expect("ns")),
    )));
    rec
}

/// Issue 8 item 8: an ADD naming p3 with p4's IP used to release p3's real IP at once, and p3
/// stayed uncaptured until the next source update. A refused request must leave everything
/// exactly as it was.
#[test]
fn a_refused_cmdadd_leaves_the_enrollment_exactly_as_before() {
    use meshcni_agent::cni_events::{CmdAdd, CniAddRequest, RejectKind};
    use meshcni_agent::workloads::SourceUpdate;
    let driver = FakeDriver::new();
    let mut rec = step_reconciler(
        &driver,
        &[
            ztunnel(),
            pod("p3", "demo", Some("10.0.0.3"), json!({})),
            pod("p4", "demo", Some("10.0.0.4"), json!({})),
        ],
    );
    let t0 = Instant::now();
    rec.reconcile(t0);
    let before = driver.lock().enrolled.clone();
    assert_eq!(before.pods.len(), 2, "{before:?}");
    let calls_before = driver.lock().calls.len();

    let options = CniEventOptions {
        pod_lookup_wait: Duration::from_millis(200),
        reply_timeout: Duration::from_secs(2),
    };
    let ev = CmdAdd {
        netns: String::new(),
        namespace: "demo".into(),
        name: "p3".into(),
        ips: vec!["10.0.0.4".parse().expect("ip")],
        uid: None,
    };
    let (req, mut rx) = CniAddRequest::new(ev, &options);
    let (received, deadline) = (req.received, req.deadline);
    rec.update(SourceUpdate::CniAdd(req));
    rec.reconcile(received);
    assert!(rx.try_recv().is_err(), "waits for the IP to be free");
    assert_eq!(
        driver.lock().enrolled,
        before,
        "nothing changed while it waits"
    );
    rec.reconcile(received + Duration::from_millis(500));
    assert_eq!(driver.lock().enrolled, before);

    rec.reconcile(deadline);
    let r = rx.try_recv().expect("answered").expect_err("refused");
    assert_eq!(r.kind, RejectKind::Timeout);
    assert!(
        r.message
            .contains("IP 10.0.0.4 is still enrolled for pod uid uid-p4"),
        "{r}"
    );
    // Passes after the refusal change nothing either.
    rec.reconcile(deadline + Duration::from_millis(10));
    assert_eq!(driver.lock().enrolled, before, "state exactly as before");
    let calls = driver.lock().calls.clone();
    assert!(
        !calls[calls_before..].iter().any(|c| c.starts_with("apply")),
        "no action at all: {:?}",
        &calls[calls_before..]
    );
}

/// Issue 8 item 14: with an IPv4-only driver a dual-stack pod is enrolled with its IPv4
/// address; the ADD (v4+v6 in the event) must be answered 200, not time out.
#[test]
fn dual_stack_add_is_captured_by_an_ipv4_only_driver() {
    let driver = FakeDriver::new();
    driver.lock().ipv4_only = true;
    let s = Setup::with(driver, &[ztunnel(), ambient("app")]);
    let mut ev = event("demo", "app", "10.0.0.2");
    ev.ips.push(EventIp {
        interface: 0,
        address: EventAddr {
            ip: "fd00::2".into(),
            mask: "/////////////////////w==".into(),
        },
        gateway: None,
    });
    let t = Instant::now();
    s.add(&ev).expect("dual-stack pod captured");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        s.driver.lock().enrolled.pods["uid-app"].ips,
        vec!["10.0.0.2".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert_eq!(s.count("captured"), 1);
}

/// Issue 8 item 7: an ADD whose IP is ztunnel's (or the node's) is refused, nothing applied.
#[test]
fn an_add_with_ztunnels_address_is_refused() {
    let s = Setup::new(&[ztunnel(), ambient("app")]);
    let (status, body) = rejected(s.add(&event("demo", "app", "10.0.0.250")));
    assert_eq!(status, 500);
    assert!(
        body.contains(
            "pod demo/app: IP 10.0.0.250 is the address of ztunnel pod istio-system/ztunnel-x"
        ),
        "{body}"
    );
    assert!(s.applies().is_empty(), "{:?}", s.applies());
    assert_eq!(s.count("reserved_ip"), 1);
}

/// Issue 8 item 10: slow clients (partial requests) used to stay open forever, without a cap,
/// so that with a low fd limit real `/cmdadd`s timed out. Now: at most `max_connections` are
/// served, a connection without a request head is closed after `header_timeout` (or evicted
/// for a newcomer), a slow body gets 408 — and real requests succeed while 200 slow clients
/// keep connecting.
#[test]
fn real_cmdadds_succeed_while_many_slow_clients_are_connected() {
    let limits = ConnectionLimits {
        max_connections: 8,
        header_timeout: Duration::from_millis(1500),
        body_timeout: Duration::from_millis(500),
        ..ConnectionLimits::default()
    };
    let mut pods = vec![ztunnel()];
    for i in 0..5 {
        pods.push(ambient(&format!("real{i}")));
    }
    let s = Setup::with_limits(
        FakeDriver::new(),
        &pods,
        CniEventOptions {
            pod_lookup_wait: LOOKUP_WAIT,
            reply_timeout: Duration::from_millis(4500),
        },
        limits,
    );
    let socket = s.socket();
    let server = s.server.as_ref().expect("server");

    // A slow client alone: the server closes it after the header timeout.
    let mut lone = UnixStream::connect(&socket).expect("connect");
    lone.write_all(b"POST /cmdadd HTTP/1.1\r\nHost: unix\r\n")
        .expect("partial head");
    lone.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = lone.read_to_end(&mut buf);
    let closed_after = t.elapsed();
    assert!(
        closed_after < Duration::from_secs(4),
        "a client without a request head stayed connected for {closed_after:?}"
    );

    // A body that never completes: 408.
    let mut slow_body = UnixStream::connect(&socket).expect("connect");
    slow_body
        .write_all(b"POST /cmdadd HTTP/1.1\r\nHost: unix\r\nContent-Length: 100\r\n\r\n{\"Pod")
        .expect("partial body");
    slow_body
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = String::new();
    let _ = slow_body.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");

    // 200 slow clients, and the real requests among them.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let max_open = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut held = Vec::new();
            for _ in 0..200 {
                if let Ok(mut c) = UnixStream::connect(&socket) {
                    let _ = c.write_all(b"POST /cmdadd HTTP/1.1\r\nHost: un");
                    held.push(c);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        sc.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                max_open.fetch_max(
                    server.open_connections(),
                    std::sync::atomic::Ordering::SeqCst,
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        for i in 0..5 {
            let t = Instant::now();
            s.add(&event(
                "demo",
                &format!("real{i}"),
                &format!("10.0.2.{}", i + 1),
            ))
            .unwrap_or_else(|e| panic!("real cmdadd {i} among slow clients: {e}"));
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "real{i} took {:?}",
                t.elapsed()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let max_open = max_open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(max_open <= 8, "{max_open} connections served at once");
    assert_eq!(s.count("captured"), 5);
    eprintln!(
        "closed a lone slow client after {closed_after:?}; at most {max_open} connections open"
    );
}

// ---- the seam for modes whose proxy connects to the agent and that work in the pod netns ----

fn netns_driver() -> FakeDriver {
    let d = FakeDriver::new();
    {
        let mut dp = d.lock();
        dp.connected = true;
        dp.needs_netns = true;
    }
    d
}

fn zds_peer() -> meshcni_agent::seam::ZtunnelInfo {
    meshcni_agent::seam::ZtunnelInfo {
        pod: meshcni_agent::enroll::PodId::new("", "", "zds peer pid 1"),
        ips: Vec::new(),
        created: String::new(),
        annotations: Default::default(),
    }
}

fn with_netns(mut ev: CmdAddEvent, netns: &Path) -> CmdAddEvent {
    ev.netns = netns.display().to_string();
    ev
}

fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").ino()
}

#[test]
fn a_connected_mode_refuses_until_its_proxy_connects_then_enrolls_in_the_sandbox_netns() {
    let s = Setup::new_with_driver(netns_driver(), &[ambient("app")]);
    let ns_a = s.dir.path().join("netns-a");
    let ns_b = s.dir.path().join("netns-b");
    std::fs::write(&ns_a, b"").expect("netns a");
    std::fs::write(&ns_b, b"").expect("netns b");

    // No proxy connected: not ready (a pod started now would not be captured) and refused,
    // naming the ZDS socket (a watched ztunnel pod would not do).
    let gate = s.status.get().redirect;
    assert!(
        gate.as_ref()
            .is_err_and(|e| e.contains("no ztunnel connected")),
        "{gate:?}"
    );
    let (status, body) = rejected(s.add(&with_netns(event("demo", "app", "10.0.0.2"), &ns_a)));
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("no ztunnel connected to the agent's ZDS socket"),
        "{body}"
    );
    assert!(s.applies().is_empty(), "{:?}", s.applies());

    assert!(
        s.driver
            .emit(meshcni_agent::seam::DriverEvent::ZtunnelChanged(Some(
                zds_peer()
            )))
    );
    s.add(&with_netns(event("demo", "app", "10.0.0.2"), &ns_a))
        .expect("captured once a proxy is connected");
    // The ADD is answered as soon as the pod is enrolled; the pass records readiness after.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status.get().redirect.is_err() {
        assert!(
            Instant::now() < deadline,
            "ready once a proxy is connected: {:?}",
            s.status.get().redirect
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let applies = s.applies();
    assert_eq!(applies.len(), 1, "{applies:?}");
    assert!(
        applies[0].starts_with("apply enroll demo/app"),
        "{applies:?}"
    );
    let held = s.driver.lock().enrolled.pods["uid-app"].netns;
    assert_eq!(held.map(|n| n.ino), Some(ino(&ns_a)));

    // A new sandbox with the same address: planned as an update carrying the new netns, and
    // answered only once the driver holds it.
    s.add(&with_netns(event("demo", "app", "10.0.0.2"), &ns_b))
        .expect("new sandbox captured");
    let applies = s.applies();
    assert_eq!(applies.len(), 2, "{applies:?}");
    assert!(
        applies[1].contains(&format!("in {}", ns_b.display())),
        "{applies:?}"
    );
    let held = s.driver.lock().enrolled.pods["uid-app"].netns;
    assert_eq!(held.map(|n| n.ino), Some(ino(&ns_b)));

    // The proxy goes away: new ADDs are refused again.
    assert!(
        s.driver
            .emit(meshcni_agent::seam::DriverEvent::ZtunnelChanged(None))
    );
    let (status, body) = rejected(s.add(&with_netns(event("demo", "app", "10.0.0.2"), &ns_a)));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("no ztunnel connected"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.status.get().redirect.is_ok() {
        assert!(Instant::now() < deadline, "not ready without a proxy");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_netns_mode_refuses_a_sandbox_netns_it_cannot_read() {
    let s = Setup::new_with_driver(netns_driver(), &[ambient("app")]);
    assert!(
        s.driver
            .emit(meshcni_agent::seam::DriverEvent::ZtunnelChanged(Some(
                zds_peer()
            )))
    );
    let missing = s.dir.path().join("no-such-netns");
    let (status, body) = rejected(s.add(&with_netns(event("demo", "app", "10.0.0.2"), &missing)));
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("sandbox netns") && body.contains("no-such-netns"),
        "{body}"
    );
    assert_eq!(s.count("bad_netns"), 1);
    assert!(s.applies().is_empty(), "{:?}", s.applies());
}

#[test]
fn a_pod_the_proxy_lost_is_enrolled_again() {
    let s = Setup::new_with_driver(netns_driver(), &[ambient("app")]);
    let ns_a = s.dir.path().join("netns-a");
    std::fs::write(&ns_a, b"").expect("netns a");
    assert!(
        s.driver
            .emit(meshcni_agent::seam::DriverEvent::ZtunnelChanged(Some(
                zds_peer()
            )))
    );
    s.add(&with_netns(event("demo", "app", "10.0.0.2"), &ns_a))
        .expect("captured");
    // The driver lost it (e.g. nacked in a snapshot replay) and says so.
    s.driver.lock().enrolled.pods.remove("uid-app");
    assert!(s.driver.emit(meshcni_agent::seam::DriverEvent::PodLost {
        uid: "uid-app".into(),
        reason: "nacked in snapshot".into(),
    }));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.driver.lock().enrolled.pods.contains_key("uid-app") {
        assert!(
            Instant::now() < deadline,
            "not re-enrolled: {:?}",
            s.applies()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.applies().len(), 2, "{:?}", s.applies());
}
