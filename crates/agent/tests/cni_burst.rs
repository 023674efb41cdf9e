//! The reconcile loop under a burst of CNI ADDs (issue 9 item 7, "200 concurrent ADD/DEL"),
//! driven step by step with a slow test driver (no threads, no sockets): a pass that enrolls
//! many pods answers each waiting ADD as soon as its pod is enrolled, not at the end of the
//! pass, takes the most urgent requests first, and does not enroll a pod whose ADD has already
//! given up (it would be captured while its runtime tears the sandbox down).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshcni_agent::ambient::{
    Action, DriverError, EnrolledState, LoopOptions, Reconciler, RedirectDriver, StatusHandle,
    ZtunnelInfo,
};
use meshcni_agent::cni_events::{CmdAdd, CniAddRequest, CniEventOptions, CniOutcome};
use meshcni_agent::enroll::EnrolledPod;
use meshcni_agent::workloads::{
    EnrollPolicy, SourceUpdate, WorkloadSnapshot, decode_namespace, decode_pod,
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const NODE: &str = "node-a";

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

fn snapshot(names: &[&str]) -> WorkloadSnapshot {
    let mut zt = pod(
        "ztunnel-x",
        "istio-system",
        Some("10.0.0.250"),
        json!({"app": "ztunnel"}),
    );
    zt["spec"]["serviceAccountName"] = json!("ztunnel");
    let mut pods = vec![decode_pod(&zt).expect("ztunnel")];
    for n in names {
        pods.push(decode_pod(&pod(n, "demo", None, json!({}))).expect("pod"));
    }
    let namespaces = [
        json!({"metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        json!({"metadata": {"name": "istio-system"}}),
    ];
    WorkloadSnapshot::from_parts(
        pods,
        namespaces.iter().map(|n| decode_namespace(n).expect("ns")),
    )
}

type Replies = Arc<Mutex<BTreeMap<String, oneshot::Receiver<CniOutcome>>>>;
/// (uid applied, uids whose ADD was answered since the previous apply began)
type ApplyLog = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// Enrolls in memory, taking `delay` per action; records, at the start of each apply, which
/// ADDs were answered since the previous apply began.
struct SlowDriver {
    delay: Duration,
    state: EnrolledState,
    replies: Replies,
    log: ApplyLog,
}

impl RedirectDriver for SlowDriver {
    fn name(&self) -> &str {
        "slow"
    }
    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        Ok(self.state.clone())
    }
    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        let answered: Vec<String> = self
            .replies
            .lock()
            .expect("replies")
            .iter_mut()
            .filter_map(|(uid, rx)| rx.try_recv().ok().map(|_| uid.clone()))
            .collect();
        self.log
            .lock()
            .expect("log")
            .push((action.pod().uid.clone(), answered));
        std::thread::sleep(self.delay);
        match action {
            Action::Enroll { pod, ips, .. } => {
                self.state.pods.insert(
                    pod.uid.clone(),
                    EnrolledPod {
                        id: pod.clone(),
                        ips: ips.clone(),
                        netns: None,
                    },
                );
            }
            Action::Release { pod, .. } => {
                self.state.pods.remove(&pod.uid);
            }
            Action::UpdateIps { pod, new, .. } => {
                if let Some(p) = self.state.pods.get_mut(&pod.uid) {
                    p.ips = new.clone();
                }
            }
        }
        Ok(())
    }
    fn ztunnel_changed(&mut self, _: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        Ok(())
    }
    fn uninstall(&mut self) -> Result<(), DriverError> {
        Ok(())
    }
}

fn request(
    name: &str,
    ip: &str,
    options: &CniEventOptions,
) -> (CniAddRequest, oneshot::Receiver<CniOutcome>) {
    CniAddRequest::new(
        CmdAdd {
            netns: String::new(),
            namespace: "demo".into(),
            name: name.into(),
            ips: vec![ip.parse().expect("ip")],
            uid: Some(format!("uid-{name}")),
        },
        options,
    )
}

struct Rig {
    rec: Reconciler,
    replies: Replies,
    log: ApplyLog,
}

fn rig(names: &[&str], delay: Duration) -> Rig {
    let replies: Replies = Arc::default();
    let log = Arc::default();
    let driver = SlowDriver {
        delay,
        state: EnrolledState::default(),
        replies: Arc::clone(&replies),
        log: Arc::clone(&log),
    };
    let mut rec = Reconciler::new(
        Box::new(driver),
        EnrollPolicy::default(),
        LoopOptions::default(),
        StatusHandle::new(Err("starting".into())),
    );
    rec.update(SourceUpdate::Snapshot(snapshot(names)));
    Rig { rec, replies, log }
}

#[test]
fn each_add_is_answered_as_soon_as_its_pod_is_enrolled_not_at_the_end_of_the_pass() {
    let names = ["p0", "p1", "p2", "p3"];
    let mut r = rig(&names, Duration::from_millis(50));
    let options = CniEventOptions {
        pod_lookup_wait: Duration::from_millis(100),
        reply_timeout: Duration::from_secs(10),
    };
    let mut t0 = None;
    for (i, n) in names.iter().enumerate() {
        let (req, rx) = request(n, &format!("10.1.0.{}", i + 2), &options);
        t0.get_or_insert(req.received);
        r.replies
            .lock()
            .expect("replies")
            .insert(format!("uid-{n}"), rx);
        r.rec.update(SourceUpdate::CniAdd(req));
    }
    let report = r.rec.reconcile(t0.expect("t0"));
    assert_eq!(report.applied.len(), 4, "{report:?}");
    let log = r.log.lock().expect("log").clone();
    // When each apply begins, the ADD of the pod enrolled just before has its answer.
    for i in 1..log.len() {
        assert_eq!(
            log[i].1,
            vec![log[i - 1].0.clone()],
            "answers newly received when each apply began: {log:?}"
        );
    }
}

#[test]
fn the_most_urgent_add_goes_first_and_one_that_gave_up_is_not_enrolled() {
    let names = ["a", "b", "c"];
    let mut r = rig(&names, Duration::from_millis(400));
    let long = CniEventOptions {
        pod_lookup_wait: Duration::from_millis(100),
        reply_timeout: Duration::from_secs(10),
    };
    let short = CniEventOptions {
        pod_lookup_wait: Duration::from_millis(100),
        reply_timeout: Duration::from_millis(300),
    };
    // "a" waits long, "b" and "c" briefly: b goes first (uid order would put a first); c's
    // deadline passes during b's apply, so c is not enrolled at all; a comes last.
    let (ra, rxa) = request("a", "10.1.0.2", &long);
    let (rb, rxb) = request("b", "10.1.0.3", &short);
    let (rc, rxc) = request("c", "10.1.0.4", &short);
    let t0 = ra.received;
    for (uid, rx) in [("uid-a", rxa), ("uid-b", rxb), ("uid-c", rxc)] {
        r.replies.lock().expect("replies").insert(uid.into(), rx);
    }
    r.rec.update(SourceUpdate::CniAdd(ra));
    r.rec.update(SourceUpdate::CniAdd(rb));
    r.rec.update(SourceUpdate::CniAdd(rc));
    r.rec.reconcile(t0);
    let applied: Vec<String> = r
        .log
        .lock()
        .expect("log")
        .iter()
        .map(|(u, _)| u.clone())
        .collect();
    assert_eq!(
        applied,
        vec!["uid-b".to_string(), "uid-a".to_string()],
        "{applied:?}"
    );
    // Later passes answer c's timeout and never enroll it (its IP came only from the ADD).
    r.rec.reconcile(t0 + Duration::from_secs(1));
    r.rec.reconcile(t0 + Duration::from_secs(2));
    let applied: Vec<String> = r
        .log
        .lock()
        .expect("log")
        .iter()
        .map(|(u, _)| u.clone())
        .collect();
    assert!(!applied.contains(&"uid-c".to_string()), "{applied:?}");
    let mut replies = r.replies.lock().expect("replies");
    let c = replies
        .get_mut("uid-c")
        .expect("c")
        .try_recv()
        .expect("c answered")
        .expect_err("c refused");
    assert!(c.message.contains("was not captured within"), "{c}");
}
