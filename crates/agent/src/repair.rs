//! The repair controller (issue 12 item 1; Istio's `cni/pkg/repair`, spec §6): finds pods on
//! this node that should be captured but are not, and fixes them **in place**, without a
//! restart.
//!
//! * **Trigger**: the agent's workload source (the workloads file, else the API watch of the
//!   pods on this node) — every pod that is new or changed is checked at once — plus a full
//!   check of every pod each `--repair-resync-seconds` (drift no event announces: rules
//!   deleted inside a pod), plus the retries below.
//! * **Detection** is the doctor's per-pod verdict (`crate::doctor::pod_checks_for`), the one
//!   comparison of "what should be" with "what is": a pod that should be captured (sidecar
//!   injected; ambient by its or its namespace's labels) and whose verdict is "not captured".
//!   Nothing else is ever touched: a pod that should not be captured, a terminated one, one
//!   without an IP yet (its ADD captures it), one whose ADD would fail.
//! * **Fix** (`REPAIR_REPAIR_PODS`, the default): a sidecar pod's netns is found like the
//!   doctor finds it (the pod's process cgroup in `--host-proc-dir`, else the netns in
//!   `--netns-dir` holding its IP) and the plugin ADD's own atomic verify-or-repair apply runs
//!   in it (`meshcni_plugin::flow::repair_sidecar_capture`); an ambient pod is handed to the
//!   enrollment loop (`SourceUpdate::Repair`), which enrolls it again through its driver —
//!   the same path a label change takes. Works for any pod, including a Job's with
//!   `restartPolicy: Never` (the reference only acts on a crash-looping validation container).
//!   `REPAIR_DELETE_PODS` / `REPAIR_LABEL_PODS` instead delete or label the pod through the API.
//! * **After**: the doctor's verdict again; only "captured" counts as repaired. Each pod is
//!   retried with a doubling back-off (0.2 s … 60 s) while it stays broken.
//! * **Report**: a Kubernetes Event on the pod (when the agent has API access) naming what was
//!   missing, a log line, `meshcni_repair_total{result,reason}` and
//!   `meshcni_repair_duration_seconds` (first seen uncaptured → captured).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::ambient_config::RedirectMode;
use crate::cli::AgentArgs;
use crate::doctor::{InventoryPod, PodCheck, PodInventory};
use crate::metrics::RepairMetrics;
use crate::workloads::{NamespaceInfo, SourceUpdate, Workload};

/// What the controller does with a broken pod (first enabled wins, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    /// Capture it in place.
    InPlace,
    /// Delete it (API, UID precondition).
    Delete,
    /// Label it (API merge patch).
    Label,
}

impl RepairAction {
    pub fn from_args(args: &AgentArgs) -> Option<RepairAction> {
        if args.repair_repair_pods {
            Some(RepairAction::InPlace)
        } else if args.repair_delete_pods {
            Some(RepairAction::Delete)
        } else if args.repair_label_pods {
            Some(RepairAction::Label)
        } else {
            None
        }
    }
}

/// Timing.
#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// Full check of every pod this often.
    pub resync: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long an ambient pod handed to the loop may take to show up captured.
    pub ambient_wait: Duration,
    /// How often pods handed to the loop are checked again.
    pub poll: Duration,
}

impl RepairOptions {
    pub fn from_args(args: &AgentArgs) -> RepairOptions {
        RepairOptions {
            resync: Duration::from_secs(args.repair_resync_seconds),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            ambient_wait: Duration::from_secs(10),
            poll: Duration::from_millis(20),
        }
    }
}

/// Per-pod bookkeeping while it is broken.
#[derive(Debug, Clone)]
struct Broken {
    /// First seen uncaptured.
    detected: Instant,
    attempts: u32,
    /// Not before this.
    next: Instant,
    /// Handed to the enrollment loop; captured expected before this.
    waiting_until: Option<Instant>,
    reason: &'static str,
    detail: String,
    /// Label/delete done: nothing more to do for this pod.
    done: bool,
}

/// A running controller; stops when dropped.
pub struct RepairController {
    stop: Arc<AtomicBool>,
    wake: Sender<SourceUpdate>,
    thread: Option<JoinHandle<()>>,
}

impl RepairController {
    /// Start: the workload source (file or API watch) and the controller thread. `enroll`
    /// is the enrollment loop's sender (ambient on).
    pub fn spawn(
        args: &AgentArgs,
        mode: RedirectMode,
        metrics: RepairMetrics,
        enroll: Option<Sender<SourceUpdate>>,
    ) -> Result<RepairController, String> {
        let action = RepairAction::from_args(args).ok_or("no repair action enabled")?;
        let node = args.effective_node_name();
        let (tx, rx) = std::sync::mpsc::channel();
        let source: Box<dyn Send> = if !args.ambient_workloads_file.is_empty() {
            Box::new(crate::workloads::file::FileSource::spawn(
                PathBuf::from(&args.ambient_workloads_file),
                node.clone(),
                Duration::from_secs(10),
                tx.clone(),
            ))
        } else {
            let access = crate::workloads::kube::AccessConfig::from_args(args).ok_or(
                "no workload source: set --ambient-workloads-file, --ambient-kubeconfig, or run in a cluster (KUBERNETES_SERVICE_HOST)",
            )?;
            if node.is_empty() {
                return Err("node name unknown: set NODE_NAME".into());
            }
            Box::new(crate::workloads::kube::KubeSource::spawn(
                access,
                node.clone(),
                crate::workloads::kube::KubeSourceOptions::default(),
                tx.clone(),
            ))
        };
        // The API is written to (events, labels, deletes) when it is the workload source, or
        // when named explicitly next to a workloads file.
        let api = (args.ambient_workloads_file.is_empty() || !args.ambient_kubeconfig.is_empty())
            .then(|| crate::workloads::kube::AccessConfig::from_args(args))
            .flatten();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            args: args.clone(),
            mode,
            action,
            options: RepairOptions::from_args(args),
            metrics,
            enroll,
            api,
            node,
            known: BTreeMap::new(),
            namespaces: None,
            broken: BTreeMap::new(),
            last_full: None,
        };
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("repair".into())
            .spawn(move || {
                let _source = source;
                worker.run(rx, s2)
            })
            .map_err(|e| format!("starting the repair thread: {e}"))?;
        info!(?action, "repair controller started");
        Ok(RepairController {
            stop,
            wake: tx,
            thread: Some(thread),
        })
    }
}

impl Drop for RepairController {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(SourceUpdate::Resync);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    args: AgentArgs,
    mode: RedirectMode,
    action: RepairAction,
    options: RepairOptions,
    metrics: RepairMetrics,
    enroll: Option<Sender<SourceUpdate>>,
    api: Option<crate::workloads::kube::AccessConfig>,
    node: String,
    /// Pods as last reported (`namespace/name` → pod).
    known: BTreeMap<String, Workload>,
    namespaces: Option<Vec<NamespaceInfo>>,
    /// `namespace/name` → bookkeeping while broken.
    broken: BTreeMap<String, Broken>,
    last_full: Option<Instant>,
}

/// The reason label of a broken pod's verdict.
fn reason_of(check: &PodCheck) -> &'static str {
    if check.capture == "sidecar" {
        "sidecar_not_captured"
    } else if check.detail.starts_with("not enrolled") {
        "ambient_not_enrolled"
    } else {
        "ambient_drifted"
    }
}

impl Worker {
    fn run(mut self, rx: Receiver<SourceUpdate>, stop: Arc<AtomicBool>) {
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut full = false;
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            let wait = self
                .next_due(now)
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), Duration::from_millis(500));
            match rx.recv_timeout(wait) {
                Ok(u) => {
                    self.take(u, &mut dirty, &mut full);
                    // Coalesce a burst of updates.
                    while let Ok(u) = rx.recv_timeout(Duration::from_millis(5)) {
                        self.take(u, &mut dirty, &mut full);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if self.namespaces.is_none() {
                continue; // Not synced yet.
            }
            let now = Instant::now();
            if self
                .last_full
                .is_none_or(|t| now.duration_since(t) >= self.options.resync)
            {
                full = true;
            }
            let due: BTreeSet<String> = self
                .broken
                .iter()
                .filter(|(_, b)| !b.done && now >= b.next.min(b.waiting_until.unwrap_or(b.next)))
                .map(|(k, _)| k.clone())
                .collect();
            let waiting = self.broken.values().any(|b| b.waiting_until.is_some());
            if !full && dirty.is_empty() && due.is_empty() && !waiting {
                continue;
            }
            let mut keys: BTreeSet<String> = if full {
                self.known.keys().cloned().collect()
            } else {
                std::mem::take(&mut dirty)
            };
            keys.extend(due);
            keys.extend(
                self.broken
                    .iter()
                    .filter(|(_, b)| b.waiting_until.is_some())
                    .map(|(k, _)| k.clone()),
            );
            if full {
                self.last_full = Some(now);
                full = false;
                dirty.clear();
            }
            self.pass(&keys);
        }
        info!("repair controller stopped");
    }

    /// When something is due without new input.
    fn next_due(&self, now: Instant) -> Instant {
        let mut next = self
            .last_full
            .map_or(now, |t| t + self.options.resync)
            .max(now);
        for b in self.broken.values().filter(|b| !b.done) {
            next = next.min(b.next);
            if b.waiting_until.is_some() {
                next = next.min(now + self.options.poll);
            }
        }
        next
    }

    fn take(&mut self, u: SourceUpdate, dirty: &mut BTreeSet<String>, full: &mut bool) {
        let (pods, nss) = match u {
            SourceUpdate::Snapshot(s) => (
                Some(s.pods.into_values().collect::<Vec<_>>()),
                Some(s.namespaces.into_values().collect::<Vec<_>>()),
            ),
            SourceUpdate::Pods(p) => (Some(p), None),
            SourceUpdate::Namespaces(n) => (None, Some(n)),
            SourceUpdate::Error(e) => {
                debug!(error = %e, "repair: workload source problem");
                return;
            }
            _ => return,
        };
        if let Some(n) = nss {
            if self.namespaces.as_ref() != Some(&n) {
                // Namespace labels decide ambient membership: check every pod.
                *full = true;
            }
            self.namespaces = Some(n);
        }
        if let Some(pods) = pods {
            let mut now: BTreeMap<String, Workload> = BTreeMap::new();
            for p in pods {
                now.insert(p.key(), p);
            }
            for (k, p) in &now {
                if self.known.get(k) != Some(p) {
                    dirty.insert(k.clone());
                }
            }
            self.broken.retain(|k, _| now.contains_key(k));
            self.known = now;
        }
    }

    /// Check `keys` with the doctor and act on the broken ones.
    fn pass(&mut self, keys: &BTreeSet<String>) {
        if keys.is_empty() {
            return;
        }
        let inv = match crate::doctor::inventory(&self.args) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "repair: cannot read the pods on this node");
                return;
            }
        };
        let checks = crate::doctor::pod_checks_for(&self.args, self.mode, &inv, keys);
        let now = Instant::now();
        for check in checks {
            let key = format!("{}/{}", check.namespace, check.name);
            if !(check.should_capture && check.captured == Some(false)) {
                if check.should_capture
                    && check.captured == Some(true)
                    && let Some(b) = self.broken.remove(&key)
                    && !b.done
                {
                    // Captured: by our hand-off to the loop, or by anything else since we saw
                    // it broken (its ADD, the loop on its own).
                    self.captured(&inv, &check, &b, now);
                } else if !check.should_capture || check.captured.is_none() {
                    self.broken.remove(&key);
                }
                continue;
            }
            let b = self.broken.entry(key.clone()).or_insert_with(|| Broken {
                detected: now,
                attempts: 0,
                next: now,
                waiting_until: None,
                reason: reason_of(&check),
                detail: check.detail.clone(),
                done: false,
            });
            if b.done {
                continue;
            }
            if let Some(until) = b.waiting_until {
                if now < until {
                    continue;
                }
                // The loop did not capture it in time: a failed attempt.
                b.waiting_until = None;
                let b = b.clone();
                self.failed(
                    &inv,
                    &check,
                    &key,
                    &b,
                    format!(
                        "the enrollment loop did not capture it within {:?}: {}",
                        self.options.ambient_wait, check.detail
                    ),
                    now,
                );
                continue;
            }
            if now < b.next {
                continue;
            }
            b.reason = reason_of(&check);
            b.detail = check.detail.clone();
            b.attempts += 1;
            let b = b.clone();
            self.act(&inv, &check, &key, &b, now);
        }
    }

    fn item<'a>(inv: &'a PodInventory, check: &PodCheck) -> Option<&'a InventoryPod> {
        inv.pods.iter().find(|p| {
            p.pod.metadata.namespace == check.namespace && p.pod.metadata.name == check.name
        })
    }

    fn act(&mut self, inv: &PodInventory, check: &PodCheck, key: &str, b: &Broken, now: Instant) {
        info!(pod = %key, reason = b.reason, detail = %b.detail, attempt = b.attempts,
              action = ?self.action, "repair: pod should be captured but is not");
        match self.action {
            RepairAction::InPlace if check.capture == "sidecar" => {
                let Some(item) = Self::item(inv, check) else {
                    return;
                };
                match self.fix_sidecar(item) {
                    Ok(diffs) if diffs.is_empty() => {
                        self.broken.remove(key);
                        self.captured(inv, check, b, Instant::now());
                    }
                    Ok(diffs) => {
                        let why = format!(
                            "still differs from what ADD installs after the apply: {}",
                            diffs.join("; ")
                        );
                        self.failed(inv, check, key, b, why, now);
                    }
                    Err(e) => self.failed(inv, check, key, b, e, now),
                }
            }
            RepairAction::InPlace => {
                let Some(tx) = &self.enroll else {
                    let why = "ambient enrollment is not running".to_string();
                    self.failed(inv, check, key, b, why, now);
                    return;
                };
                if tx.send(SourceUpdate::Repair(check.uid.clone())).is_err() {
                    let why = "the enrollment loop has stopped".to_string();
                    self.failed(inv, check, key, b, why, now);
                    return;
                }
                if let Some(e) = self.broken.get_mut(key) {
                    e.waiting_until = Some(now + self.options.ambient_wait);
                }
            }
            RepairAction::Delete | RepairAction::Label => {
                let r = if self.action == RepairAction::Delete {
                    self.delete_pod(check)
                } else {
                    self.label_pod(check)
                };
                match r {
                    Ok(()) => {
                        let (result, reason, verb) = if self.action == RepairAction::Delete {
                            ("deleted", "DeleteBrokenPod", "deleted")
                        } else {
                            ("labelled", "LabelBrokenPod", "labelled")
                        };
                        self.metrics.count(result, b.reason);
                        info!(pod = %key, reason = b.reason, "repair: pod {verb}");
                        self.event(
                            check,
                            "Warning",
                            reason,
                            &format!(
                                "meshcni-agent {verb} the pod: it should be captured ({}) but is not: {}",
                                check.reason, b.detail
                            ),
                        );
                        if let Some(e) = self.broken.get_mut(key) {
                            e.done = true;
                        }
                    }
                    Err(e) => self.failed(inv, check, key, b, e, now),
                }
            }
        }
    }

    fn captured(&self, _inv: &PodInventory, check: &PodCheck, b: &Broken, now: Instant) {
        let secs = now.duration_since(b.detected).as_secs_f64();
        self.metrics.duration.observe(secs);
        self.metrics.count("repaired", b.reason);
        let key = format!("{}/{}", check.namespace, check.name);
        info!(pod = %key, uid = %check.uid, reason = b.reason, detail = %b.detail,
              detect_to_captured_ms = secs * 1000.0, "repair: pod captured in place");
        self.event(
            check,
            "Normal",
            "CaptureRepaired",
            &format!(
                "meshcni-agent captured the pod in place ({}; {:.0} ms after it was found uncaptured); what was missing: {}",
                check.reason,
                secs * 1000.0,
                b.detail
            ),
        );
    }

    fn failed(
        &mut self,
        _inv: &PodInventory,
        check: &PodCheck,
        key: &str,
        b: &Broken,
        why: String,
        now: Instant,
    ) {
        let factor = 1u32 << b.attempts.saturating_sub(1).min(16);
        let delay = (self.options.min_backoff * factor).min(self.options.max_backoff);
        if let Some(e) = self.broken.get_mut(key) {
            e.next = now + delay;
            e.waiting_until = None;
        }
        self.metrics.count("failed", b.reason);
        warn!(pod = %key, reason = b.reason, error = %why, attempt = b.attempts,
              retry_in_ms = delay.as_millis() as u64, "repair failed; will retry");
        self.event(
            check,
            "Warning",
            "CaptureRepairFailed",
            &format!(
                "meshcni-agent could not capture the pod ({}): {why}",
                check.reason
            ),
        );
    }

    /// ADD's apply in the pod's netns, then the doctor's comparison (the plugin's CHECK) on
    /// the same netns: the differences left (empty: captured).
    fn fix_sidecar(&self, item: &InventoryPod) -> Result<Vec<String>, String> {
        use meshcni_plugin::pod::{Decision, PodRef, decide};
        let conf = crate::doctor::plugin_conf(&self.args)?;
        let md = &item.pod.metadata;
        let cfg = match decide(
            &conf,
            PodRef {
                namespace: &md.namespace,
                name: &md.name,
            },
            &item.pod,
        ) {
            Ok(Decision::Sidecar(cfg)) => *cfg,
            Ok(_) => return Err("no longer a sidecar pod".into()),
            Err(e) => return Err(format!("ADD would fail: {e}")),
        };
        let w = crate::workloads::decode_pod(&item.object)
            .map_err(|e| format!("cannot read the pod: {e}"))?;
        let finder = meshcni_netx::podns::NetnsFinder::new(
            &self.args.host_proc_dir,
            vec![self.args.netns_dir.clone()],
        )
        .map_err(|e| format!("cannot search for the pod's netns: {e}"))?;
        let found = finder
            .find(&[meshcni_netx::podns::PodNetnsQuery {
                uid: &w.uid,
                ips: &w.ips,
            }])
            .map_err(|e| format!("searching the pod's netns: {e}"))?;
        let Some(ns) = found.values().next() else {
            return Err(format!(
                "netns not found (no process of pod uid {} in {}, no netns in {} holding {:?})",
                w.uid,
                self.args.host_proc_dir.display(),
                self.args.netns_dir.display(),
                w.ips
            ));
        };
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ns.file)
        ));
        let outcome = meshcni_plugin::flow::repair_sidecar_capture(&conf, &path, cfg.clone())?;
        debug!(pod = %w.key(), source = %ns.source, ?outcome, "sidecar capture applied");
        meshcni_plugin::flow::sidecar_capture_differences(&conf, &path, cfg)
    }

    fn client(&self) -> Result<meshcni_kube::ApiClient, String> {
        let access = self
            .api
            .as_ref()
            .ok_or("no Kubernetes API access (workloads file only)")?
            .resolve()?;
        meshcni_kube::ApiClient::new(&access, meshcni_kube::ClientOptions::default())
            .map_err(|e| format!("API client: {e}"))
    }

    fn send(&self, method: &str, path: &str, ctype: &str, body: &str) -> Result<String, String> {
        let (status, text) = self
            .client()?
            .send(method, path, ctype, body.as_bytes())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(format!(
                "{method} {path}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            ))
        }
    }

    fn delete_pod(&self, check: &PodCheck) -> Result<(), String> {
        let path = format!("/api/v1/namespaces/{}/pods/{}", check.namespace, check.name);
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "DeleteOptions",
            "preconditions": {"uid": check.uid},
        });
        self.send("DELETE", &path, "application/json", &body.to_string())
            .map(|_| ())
    }

    fn label_pod(&self, check: &PodCheck) -> Result<(), String> {
        let path = format!("/api/v1/namespaces/{}/pods/{}", check.namespace, check.name);
        let body = serde_json::json!({"metadata": {
            "uid": check.uid,
            "labels": {&self.args.repair_broken_pod_label_key: &self.args.repair_broken_pod_label_value},
        }});
        self.send(
            "PATCH",
            &path,
            "application/merge-patch+json",
            &body.to_string(),
        )
        .map(|_| ())
    }

    /// A core/v1 Event on the pod; without API access, the log line is all there is.
    fn event(&self, check: &PodCheck, typ: &str, reason: &str, message: &str) {
        if self.api.is_none() {
            return;
        }
        let ts = rfc3339(SystemTime::now());
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{}.", check.name), "namespace": check.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": check.namespace,
                               "name": check.name, "uid": check.uid},
            "type": typ,
            "reason": reason,
            "message": message,
            "source": {"component": "meshcni-agent", "host": self.node},
            "reportingComponent": "meshcni-agent",
            "reportingInstance": self.node,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        });
        let path = format!("/api/v1/namespaces/{}/events", check.namespace);
        if let Err(e) = self.send("POST", &path, "application/json", &body.to_string()) {
            warn!(pod = %format!("{}/{}", check.namespace, check.name), error = %e,
                  "repair: could not record the event");
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_601_600 + 3723);
        assert_eq!(rfc3339(t), "2026-12-07T01:02:03Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn first_enabled_action_wins() {
        let mut a = AgentArgs::defaults();
        assert_eq!(RepairAction::from_args(&a), Some(RepairAction::InPlace));
        a.repair_repair_pods = false;
        a.repair_label_pods = true;
        assert_eq!(RepairAction::from_args(&a), Some(RepairAction::Label));
        a.repair_delete_pods = true;
        assert_eq!(RepairAction::from_args(&a), Some(RepairAction::Delete));
        a.repair_delete_pods = false;
        a.repair_label_pods = false;
        assert_eq!(RepairAction::from_args(&a), None);
    }
}
