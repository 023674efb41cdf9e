//! Ambient enrollment: the reconcile loop.
//!
//! The loop owns *what* should be redirected: it receives workload snapshots from a source
//! (`workloads`: Kubernetes list+watch or a local file), derives the desired set, plans
//! against what the driver reports as actually applied (`enroll::plan`), and hands the driver
//! one [`Action`] at a time. It also tracks the node's proxy — the watched ztunnel pod (spec
//! §3.2 `UpdateActiveNodeProxy`) or, for a `Connected` mode, what the driver reports — and
//! tells the driver and the ambient config file when it changes. The driver owns *how*:
//! rules, ipsets, routes, maps, ZDS — and nothing else. The seam (trait, events, the CNI
//! request) and its calling contract are in [`crate::seam`]; the drivers in [`crate::modes`];
//! the plugin hand-off's part of the loop in [`cni_handoff`].

mod cni_handoff;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, info, warn};

use crate::ambient_config::AmbientConfigWriter;
use crate::ambient_config::RedirectMode;
pub use crate::enroll::{Action, EnrolledPod, EnrolledState, PodId};
use crate::enroll::{Conflict, plan};
pub use crate::modes::fake::{FakeDataplane, FakeDriver};
pub use crate::modes::make_driver;
pub use crate::seam::{
    DriverError, DriverEvent, DriverEvents, ErrorScope, RedirectDriver, ZtunnelInfo, ZtunnelSource,
};
use crate::workloads::{
    DuplicateUid, EnrollPolicy, NamespaceInfo, SourceUpdate, Workload, WorkloadMetrics,
    WorkloadSnapshot, active_ztunnel, untrusted_ztunnels,
};
pub use cni_handoff::CNI_IPS_MAX_AGE;
use cni_handoff::PendingCni;

// ---- the reconcile loop ----------------------------------------------------------------

/// See `Reconciler::held_back`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeldBack {
    BackOff,
    CniGaveUp,
}

/// Timing of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// Re-read the driver's actual state and re-plan at least this often (repairs drift, e.g.
    /// someone flushed the ipset).
    pub resync: Duration,
    /// First retry delay after a failure; doubles per consecutive failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// After an update arrives, wait this long for more before planning (coalesces bursts).
    pub debounce: Duration,
    /// Verify-or-repair the mode's node-level pieces ([`RedirectDriver::verify_node`]) at least
    /// this often, between resyncs: a third party flushing the node's rules is repaired within
    /// this time, not the resync period.
    pub node_check: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            resync: Duration::from_secs(60),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
            node_check: Duration::from_secs(10),
        }
    }
}

/// What the loop exposes to readiness and to tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopStatus {
    /// `Ok` = the driver works (readiness gate `redirect-mode` open); `Err(reason)` otherwise.
    pub redirect: Result<(), String>,
    /// Pods enrolled according to the last pass.
    pub enrolled: BTreeSet<String>,
    /// The active ztunnel last reported to the driver.
    pub ztunnel: Option<PodId>,
    /// Completed passes (for tests waiting for convergence).
    pub passes: u64,
    /// Actions applied successfully since start.
    pub applied: u64,
    /// Pods whose last action failed (uid → error).
    pub failing: BTreeMap<String, String>,
    /// Current IP conflicts, rendered.
    pub conflicts: Vec<String>,
}

/// Shared, cloneable view of [`LoopStatus`].
#[derive(Debug, Clone)]
pub struct StatusHandle(Arc<Mutex<LoopStatus>>);

impl StatusHandle {
    pub fn new(initial: Result<(), String>) -> StatusHandle {
        StatusHandle(Arc::new(Mutex::new(LoopStatus {
            redirect: initial,
            enrolled: BTreeSet::new(),
            ztunnel: None,
            passes: 0,
            applied: 0,
            failing: BTreeMap::new(),
            conflicts: Vec::new(),
        })))
    }

    pub fn get(&self) -> LoopStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut LoopStatus)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The readiness probe: open iff the driver works.
    pub fn probe(&self) -> Result<(), String> {
        self.get().redirect
    }
}

/// Per-pod retry bookkeeping.
#[derive(Debug, Clone)]
struct Failure {
    attempts: u32,
    next: Instant,
    error: String,
}

/// The reconcile state machine. [`Reconciler::run`] drives it from a channel; tests may call
/// [`Reconciler::update`] and [`Reconciler::reconcile`] directly.
pub struct Reconciler {
    driver: Box<dyn RedirectDriver>,
    policy: EnrollPolicy,
    options: LoopOptions,
    status: StatusHandle,
    gauge: Option<Gauge>,
    ztunnel_gauge: Option<Gauge>,
    config: Option<Arc<AmbientConfigWriter>>,
    pods: Option<Vec<Workload>>,
    namespaces: Option<Vec<NamespaceInfo>>,
    snapshot: WorkloadSnapshot,
    /// `None` = must be (re-)read from the driver.
    actual: Option<EnrolledState>,
    /// `None` = the driver has not been told yet (start-up, or the last call failed).
    notified_ztunnel: Option<Option<ZtunnelInfo>>,
    failures: BTreeMap<String, Failure>,
    /// Whole-pass retry after a driver-scoped failure.
    driver_retry: Option<(u32, Instant)>,
    last_resync: Instant,
    /// Last [`RedirectDriver::verify_node`] (or full read-back, which includes it).
    last_node_check: Instant,
    last_conflicts: Vec<Conflict>,
    last_source_error: Option<String>,
    /// Nudges the workload source when an ADD waits for a pod it has not seen (and when).
    source_poke: Option<(crate::workloads::SourcePoke, Option<Instant>)>,
    /// CNI ADDs waiting for an answer (see "CNI events" below).
    cni_pending: Vec<PendingCni>,
    /// Pod IPs from CNI events: uid → (IPs, when). In force over the watch's IPs until the
    /// watch shows the same IPs (or any IPs after [`CNI_IPS_MAX_AGE`]), or the pod goes.
    cni_ips: BTreeMap<String, cni_handoff::CniOverride>,
    /// The proxy a `Connected` driver reported last (see [`DriverEvent::ZtunnelChanged`]).
    connected_ztunnel: Option<ZtunnelInfo>,
    /// What is enrolled after the current pass, kept only while CNI requests wait for it.
    cni_state: Option<EnrolledState>,
    /// Pods labelled `app=ztunnel` but not trusted as ztunnel, already logged (uid → reason).
    untrusted_ztunnels: BTreeMap<String, String>,
    /// Input refusals are counted here.
    metrics: WorkloadMetrics,
    /// The node's own addresses (never enrolled as a pod's), refreshed every
    /// [`NODE_ADDRESSES_REFRESH`].
    node_addresses: Option<NodeAddresses>,
    node_addresses_cache: (Vec<IpAddr>, Option<Instant>),
    /// Addresses no pod may be enrolled with this pass: IP → whose it is.
    reserved: BTreeMap<IpAddr, String>,
    /// Pods refused last pass for claiming a reserved address (uid → reason), to log changes once.
    last_reserved_refusals: BTreeMap<String, String>,
    /// Who held each UID in the last snapshot (uid → `namespace/name`): keeps a UID with its
    /// first holder when a second pod claims it.
    uid_holders: BTreeMap<String, String>,
    last_duplicates: Vec<DuplicateUid>,
    /// Plan again at once (a CNI override was dropped).
    replan: bool,
    /// Pods the repair controller asked to enroll again ([`SourceUpdate::Repair`]).
    repair: BTreeSet<String>,
}

/// Lists the node's own addresses (see [`Reconciler::with_node_addresses`]).
pub type NodeAddresses = Box<dyn FnMut() -> Result<Vec<IpAddr>, String> + Send>;

/// How often the node's addresses are re-listed.
pub const NODE_ADDRESSES_REFRESH: Duration = Duration::from_secs(10);

/// Every address of the agent's own network namespace (the node's, for the host-network
/// agent; the netns the iptables mode programs).
pub fn own_netns_addresses() -> Result<Vec<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("listing the node's addresses (getifaddrs): {e}"))?;
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.push(ip);
    }
    Ok(out)
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub applied: Vec<Action>,
    pub failed: Vec<(Action, DriverError)>,
    /// Actions skipped because their pod is in back-off.
    pub deferred: usize,
    /// The pass did not plan: sources not synced yet, or a driver-scoped failure.
    pub blocked: Option<String>,
}

impl Reconciler {
    pub fn new(
        driver: Box<dyn RedirectDriver>,
        policy: EnrollPolicy,
        options: LoopOptions,
        status: StatusHandle,
    ) -> Reconciler {
        Reconciler {
            driver,
            policy,
            options,
            status,
            gauge: None,
            ztunnel_gauge: None,
            config: None,
            pods: None,
            namespaces: None,
            snapshot: WorkloadSnapshot::default(),
            actual: None,
            notified_ztunnel: None,
            failures: BTreeMap::new(),
            driver_retry: None,
            last_resync: Instant::now(),
            last_node_check: Instant::now(),
            last_conflicts: Vec::new(),
            last_source_error: None,
            source_poke: None,
            cni_pending: Vec::new(),
            cni_ips: BTreeMap::new(),
            connected_ztunnel: None,
            cni_state: None,
            untrusted_ztunnels: BTreeMap::new(),
            metrics: WorkloadMetrics::default(),
            node_addresses: None,
            node_addresses_cache: (Vec::new(), None),
            reserved: BTreeMap::new(),
            last_reserved_refusals: BTreeMap::new(),
            uid_holders: BTreeMap::new(),
            last_duplicates: Vec::new(),
            replan: false,
            repair: BTreeSet::new(),
        }
    }

    /// Count input refusals (duplicate UIDs, reserved addresses) into these metrics.
    pub fn with_metrics(mut self, metrics: WorkloadMetrics) -> Reconciler {
        self.metrics = metrics;
        self
    }

    /// Never enroll a pod with one of the node's own addresses, as listed by `list` (e.g.
    /// [`own_netns_addresses`]). ztunnel pods' and host-network pods' addresses are always
    /// refused.
    pub fn with_node_addresses(mut self, list: NodeAddresses) -> Reconciler {
        self.node_addresses = Some(list);
        self
    }

    /// Also keep this gauge at the number of enrolled pods.
    pub fn with_gauge(mut self, gauge: Gauge) -> Reconciler {
        self.gauge = Some(gauge);
        self
    }

    /// Also keep this gauge at 1 while the node's ztunnel is there for the driver, else 0.
    pub fn with_ztunnel_gauge(mut self, gauge: Gauge) -> Reconciler {
        self.ztunnel_gauge = Some(gauge);
        self
    }

    /// Also record ztunnel readiness in the ambient config file.
    /// Poke the workload source (at most once a second) while a CNI ADD waits for a pod it
    /// has not seen: a source backing off after failed lists retries at once.
    pub fn with_source_poke(mut self, poke: crate::workloads::SourcePoke) -> Reconciler {
        self.source_poke = Some((poke, None));
        self
    }

    pub fn with_config_writer(mut self, writer: Arc<AmbientConfigWriter>) -> Reconciler {
        self.config = Some(writer);
        self
    }

    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Take in what a source reported.
    pub fn update(&mut self, update: SourceUpdate) {
        match update {
            SourceUpdate::Snapshot(s) => {
                self.pods = Some(s.pods.into_values().collect());
                self.namespaces = Some(s.namespaces.into_values().collect());
            }
            SourceUpdate::Pods(p) => self.pods = Some(p),
            SourceUpdate::Namespaces(n) => self.namespaces = Some(n),
            SourceUpdate::Resync => self.actual = None,
            SourceUpdate::Error(e) => {
                debug!(error = %e, "workload source reported a problem");
                self.last_source_error = Some(e);
            }
            SourceUpdate::CniAdd(req) => {
                self.cni_accept(req);
                return;
            }
            SourceUpdate::Driver(ev) => {
                self.driver_event(ev);
                return;
            }
            SourceUpdate::Repair(uid) => {
                info!(uid = %uid, "repair: enrolling the pod again");
                self.failures.remove(&uid);
                self.actual = None;
                self.repair.insert(uid);
                return;
            }
        }
        self.rebuild_snapshot();
    }

    /// The snapshot from the latest pods and namespaces; a UID claimed by two pods stays with
    /// the pod that held it before (else the first), the other is refused (logged, counted).
    fn rebuild_snapshot(&mut self) {
        let (Some(p), Some(n)) = (&self.pods, &self.namespaces) else {
            return;
        };
        let holders = &self.uid_holders;
        let (snap, dups) =
            WorkloadSnapshot::from_parts_checked(p.iter().cloned(), n.iter().cloned(), |w| {
                holders.get(&w.uid) == Some(&w.key())
            });
        for d in dups.iter().filter(|d| !self.last_duplicates.contains(d)) {
            warn!(conflict = %d, "duplicate pod UID; the pod that held it keeps it");
            self.metrics.refused("duplicate_uid");
        }
        self.last_duplicates = dups;
        self.uid_holders = snap
            .pods
            .iter()
            .map(|(u, w)| (u.clone(), w.key()))
            .collect();
        self.snapshot = snap;
        self.apply_cni_ips(Instant::now());
    }

    /// Hand the driver its event sink: events arrive on `tx` as [`SourceUpdate::Driver`]
    /// ([`AmbientLoop::spawn`] does this; a test driving the reconciler by hand may too).
    pub fn attach_driver_events(&mut self, tx: Sender<SourceUpdate>) {
        let tx = Mutex::new(tx);
        self.driver.attach(DriverEvents::new(move |ev| {
            let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(SourceUpdate::Driver(ev));
        }));
    }

    /// What the driver reported outside the loop's calls.
    fn driver_event(&mut self, ev: DriverEvent) {
        match ev {
            DriverEvent::ZtunnelChanged(z) => {
                // Applied at the next pass like a watched ztunnel change: the driver is told,
                // the config file written, every back-off reset.
                self.connected_ztunnel = z;
            }
            DriverEvent::PodLost { uid, reason } => {
                warn!(uid = %uid, %reason, "the proxy lost a pod; enrolling it again");
                self.failures.remove(&uid);
                self.actual = None;
            }
            DriverEvent::PodAcked { uid } => debug!(uid = %uid, "pod confirmed by the proxy"),
        }
    }

    /// The node's proxy: the watched ztunnel pod, or the one a `Connected` driver reported.
    pub(super) fn current_ztunnel(&self) -> Option<ZtunnelInfo> {
        match self.driver.ztunnel_source() {
            ZtunnelSource::Watched => active_ztunnel(&self.snapshot, &self.policy.ztunnel),
            ZtunnelSource::Connected => self.connected_ztunnel.clone(),
        }
    }

    /// Whether both pods and namespaces have been received.
    pub fn synced(&self) -> bool {
        self.pods.is_some() && self.namespaces.is_some()
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        (self.options.min_backoff * factor).min(self.options.max_backoff)
    }

    fn driver_failed(&mut self, what: &str, e: &DriverError, now: Instant) -> PassReport {
        let attempts = self.driver_retry.map_or(1, |(a, _)| a + 1);
        let next = now + self.backoff(attempts);
        self.driver_retry = Some((attempts, next));
        self.actual = None;
        let reason = format!("{} driver: {what}: {e}", self.driver.name());
        warn!(error = %reason, attempt = attempts, "redirect driver failed; retrying");
        self.status.update(|s| s.redirect = Err(reason.clone()));
        PassReport {
            blocked: Some(reason),
            ..PassReport::default()
        }
    }

    /// One reconcile pass at time `now`, answering the CNI requests it can.
    pub fn reconcile(&mut self, now: Instant) -> PassReport {
        self.cni_state = None;
        self.replan = false;
        self.reserved = self.reserved_addresses(now);
        self.cni_resolve(now);
        let report = self.reconcile_pass(now);
        self.cni_answer(&report, now);
        self.cni_state = None;
        report
    }

    /// Log (once per pod and reason) each pod labelled `app=ztunnel` that is not trusted as the
    /// node's ztunnel (wrong namespace or service account): it is ignored as a ztunnel.
    fn warn_untrusted_ztunnels(&mut self) {
        let mut now = BTreeMap::new();
        for (pod, why) in untrusted_ztunnels(&self.snapshot, &self.policy.ztunnel) {
            if self.untrusted_ztunnels.get(&pod.uid) != Some(&why) {
                warn!(
                    pod = %pod.key(),
                    uid = %pod.uid,
                    reason = %why,
                    system_namespace = %self.policy.ztunnel.namespace,
                    service_account = %self.policy.ztunnel.service_account,
                    "ignoring untrusted ztunnel pod: it will not receive this node's traffic"
                );
            }
            now.insert(pod.uid.clone(), why);
        }
        self.untrusted_ztunnels = now;
    }

    /// Why `action` is not tried now, if it is not: its pod waits out a back-off, or (not for
    /// a release) the CNI ADD that asked for it failed (timed out) — the runtime tears that
    /// sandbox down, and capturing it would leave rules behind. Checked before `prepare` and
    /// again before each apply (an ADD can give up while the pass works on other pods).
    fn held_back(&self, action: &Action, now: Instant) -> Option<HeldBack> {
        let uid = &action.pod().uid;
        if self.failures.get(uid).is_some_and(|f| now < f.next) {
            Some(HeldBack::BackOff)
        } else if !matches!(action, Action::Release { .. }) && self.cni_given_up(uid) {
            Some(HeldBack::CniGaveUp)
        } else {
            None
        }
    }

    fn reconcile_pass(&mut self, now: Instant) -> PassReport {
        if !self.synced() {
            let mut reason = "waiting for the first list of pods and namespaces".to_string();
            if let Some(e) = &self.last_source_error {
                reason.push_str(&format!(" (last source error: {e})"));
            }
            self.status.update(|s| s.redirect = Err(reason.clone()));
            return PassReport {
                blocked: Some(reason),
                ..PassReport::default()
            };
        }
        self.warn_untrusted_ztunnels();
        let zt = self.current_ztunnel();
        // A ztunnel that is gone is reported in the config file at once, not only once the
        // driver has been told: the driver may be in back-off or failing for a long time.
        if zt.is_none()
            && let Some(w) = &self.config
            && let Err(e) = w.set_ztunnel_ready(false)
        {
            warn!(error = %e, "writing ztunnel readiness into the ambient config");
        }
        if let Some((_, next)) = self.driver_retry
            && now < next
        {
            return PassReport {
                blocked: Some("driver in back-off".into()),
                ..PassReport::default()
            };
        }
        if now.duration_since(self.last_resync) >= self.options.resync {
            self.actual = None;
            self.last_resync = now;
        }
        if self.actual.is_none() {
            match self.driver.actual() {
                Ok(a) => self.actual = Some(a),
                Err(e) => return self.driver_failed("reading enrolled state", &e, now),
            }
            self.last_node_check = now;
        } else if now.duration_since(self.last_node_check) >= self.options.node_check
            && self.notified_ztunnel.is_some()
        {
            self.last_node_check = now;
            if let Err(e) = self.driver.verify_node() {
                return self.driver_failed("checking the node's rules", &e, now);
            }
        }

        if self.notified_ztunnel.as_ref() != Some(&zt) {
            match &zt {
                Some(z) => info!(ztunnel = %z.pod, ips = ?z.ips, "active ztunnel"),
                None => info!("no ready ztunnel on this node"),
            }
            let res = self.driver.ztunnel_changed(zt.as_ref());
            if let Some(w) = &self.config
                && let Err(e) = w.set_ztunnel_ready(zt.is_some() && res.is_ok())
            {
                warn!(error = %e, "writing ztunnel readiness into the ambient config");
            }
            if let Err(e) = res {
                self.notified_ztunnel = None;
                return self.driver_failed("applying the ztunnel change", &e, now);
            }
            self.notified_ztunnel = Some(zt.clone());
            if let Some(g) = &self.ztunnel_gauge {
                g.set(i64::from(zt.is_some()));
            }
            self.status
                .update(|s| s.ztunnel = zt.as_ref().map(|z| z.pod.clone()));
            // New node rules: re-read, and retry every pod now.
            self.failures.clear();
            match self.driver.actual() {
                Ok(a) => self.actual = Some(a),
                Err(e) => return self.driver_failed("reading enrolled state", &e, now),
            }
        }

        let mut actual = self.actual.take().unwrap_or_default();
        let mut desired = self.desired(&BTreeSet::new());
        // Repair: a desired pod the driver counts as enrolled is planned as an enrollment
        // again (verify-or-repair in its netns). A pod that is not desired is never touched.
        for uid in std::mem::take(&mut self.repair) {
            if desired.contains_key(&uid) {
                actual.pods.remove(&uid);
            }
        }
        let mut planned = plan(&desired, &actual);
        // A CNI event's IPs are put in force only when they can be honoured whole: if another
        // pod holds (or wins) one of them, the pod stays exactly as it is (its current
        // enrollment untouched) while its request waits, and is refused at the deadline.
        let held_back: BTreeSet<String> = planned
            .conflicts
            .iter()
            .filter(|c| self.cni_overrides(&c.loser.uid))
            .map(|c| c.loser.uid.clone())
            .collect();
        if !held_back.is_empty() {
            for uid in &held_back {
                debug!(uid = %uid, "CNI event IPs held back: another pod holds one of them");
            }
            desired = self.desired(&held_back);
            let conflicts = planned.conflicts;
            planned = plan(&desired, &actual);
            planned.conflicts = conflicts;
        }
        if planned.conflicts != self.last_conflicts {
            for c in &planned.conflicts {
                warn!(conflict = %c, "pod IP conflict");
            }
            self.last_conflicts = planned.conflicts.clone();
        }
        for p in &planned.waiting_for_ip {
            debug!(pod = %p, "selected for ambient, waiting for an IP");
        }

        // The driver prepares what this pass will try: not the pods waiting out a back-off,
        // nor those whose ADD gave up (both deferred below; an IP still held is decided as
        // the pass goes).
        let tried: Vec<Action> = planned
            .actions
            .iter()
            .filter(|a| self.held_back(a, now).is_none())
            .cloned()
            .collect();
        if !tried.is_empty()
            && let Err(e) = self.driver.prepare(&tried)
        {
            return self.driver_failed("preparing the pass", &e, now);
        }
        let mut report = PassReport::default();
        let mut driver_error = None;
        let mut holders = actual.ip_holders();
        // Releases, then updates, then enrolls (as planned); within each, the pods a runtime
        // waits for first, most urgent first.
        let mut actions = planned.actions;
        actions.sort_by_key(|a| {
            let rank = match a {
                Action::Release { .. } => 0u8,
                Action::UpdateIps { .. } => 1,
                Action::Enroll { .. } => 2,
            };
            (
                rank,
                self.cni_deadline(&a.pod().uid).is_none(),
                self.cni_deadline(&a.pod().uid),
            )
        });
        for action in actions {
            let uid = action.pod().uid.clone();
            if let Some(why) = self.held_back(&action, now) {
                if why == HeldBack::CniGaveUp {
                    debug!(action = %action, "deferred: the CNI ADD that asked for it gave up");
                }
                report.deferred += 1;
                continue;
            }
            if let Some((ip, holder)) = holders.blocks(&action) {
                debug!(action = %action, %ip, %holder, "deferred: the IP is not released yet");
                report.deferred += 1;
                continue;
            }
            match self.driver.apply(&action) {
                Ok(()) => {
                    info!(action = %action, driver = self.driver.name(), "applied");
                    holders.apply(&mut actual, &action);
                    self.failures.remove(&uid);
                    self.cni_answer_applied(&uid, &actual);
                    report.applied.push(action);
                    // The driver's durable bookkeeping of the action (the inpod state file),
                    // once its CNI ADD has its answer: off the ADD's critical path.
                    if let Err(e) = self.driver.flush() {
                        warn!(error = %e, driver = self.driver.name(), "persisting an applied action failed");
                        driver_error = Some(e);
                        break;
                    }
                }
                Err(e) => {
                    let attempts = self.failures.get(&uid).map_or(1, |f| f.attempts + 1);
                    warn!(action = %action, error = %e, attempt = attempts, "action failed; will retry");
                    self.failures.insert(
                        uid,
                        Failure {
                            attempts,
                            next: now + self.backoff(attempts),
                            error: e.to_string(),
                        },
                    );
                    let scope = e.scope;
                    report.failed.push((action, e.clone()));
                    if scope == ErrorScope::Driver {
                        driver_error = Some(e);
                        break;
                    }
                }
            }
        }
        // Forget failures of pods that need nothing any more.
        let desired_uids: BTreeSet<&String> = desired.keys().collect();
        self.failures
            .retain(|uid, _| desired_uids.contains(uid) || actual.pods.contains_key(uid));

        let enrolled: BTreeSet<String> = actual.pods.keys().cloned().collect();
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(enrolled.len()).unwrap_or(i64::MAX));
        }
        let any_failed = !report.failed.is_empty();
        if self.cni_pending.iter().any(|p| p.uid.is_some()) {
            self.cni_state = Some(actual.clone());
        }
        self.actual = if any_failed { None } else { Some(actual) };
        let failing: BTreeMap<String, String> = self
            .failures
            .iter()
            .map(|(u, f)| (u.clone(), f.error.clone()))
            .collect();
        let conflicts: Vec<String> = self.last_conflicts.iter().map(|c| c.to_string()).collect();
        let applied_n = report.applied.len() as u64;
        if let Some(e) = driver_error {
            let mut r = self.driver_failed("applying an action", &e, now);
            r.applied = report.applied;
            r.failed = report.failed;
            self.status.update(|s| {
                s.enrolled = enrolled;
                s.failing = failing;
                s.conflicts = conflicts;
                s.applied += applied_n;
                s.passes += 1;
            });
            return r;
        }
        self.driver_retry = None;
        // Ready means "a pod started now is captured". A mode whose proxy connects to it
        // cannot capture anything while none is connected: the gate says so (a watched
        // ztunnel's absence keeps it open: those modes fail such pods' ADDs individually).
        let redirect = match (self.driver.ztunnel_source(), &zt) {
            (ZtunnelSource::Connected, None) => Err(format!(
                "{} driver: no ztunnel connected to the agent's ZDS socket",
                self.driver.name()
            )),
            _ => Ok(()),
        };
        self.status.update(|s| {
            s.redirect = redirect;
            s.enrolled = enrolled;
            s.failing = failing;
            s.conflicts = conflicts;
            s.applied += applied_n;
            s.passes += 1;
        });
        report
    }

    /// When the next pass is due without new input (retries, resync).
    pub fn next_deadline(&self, now: Instant) -> Instant {
        if self.replan {
            return now;
        }
        let mut next = self.last_resync + self.options.resync;
        if self.notified_ztunnel.is_some() {
            next = next.min(self.last_node_check + self.options.node_check);
        }
        if let Some((_, t)) = self.driver_retry {
            next = next.min(t);
        }
        if let Some(t) = self.failures.values().map(|f| f.next).min() {
            next = next.min(t);
        }
        if let Some(t) = self.cni_pending.iter().map(PendingCni::due).min() {
            next = next.min(t);
        }
        next.max(now)
    }

    /// Run until `stop` is set (checked at least every 200 ms and on every message); then
    /// call `driver.uninstall()` if `uninstall` is set by then.
    pub fn run(mut self, rx: Receiver<SourceUpdate>, control: Arc<LoopControl>) {
        info!(
            driver = self.driver.name(),
            "ambient enrollment loop started"
        );
        let mut dirty = true;
        loop {
            if control.stop.load(Ordering::SeqCst) {
                break;
            }
            let now = Instant::now();
            if dirty || now >= self.next_deadline(now) {
                self.reconcile(now);
                dirty = false;
            }
            let now = Instant::now();
            let wait = self
                .next_deadline(now)
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), Duration::from_millis(200));
            match rx.recv_timeout(wait) {
                Ok(u) => {
                    // Coalesce a burst — but not while a CNI ADD waits for its answer (a pod
                    // start): then plan at once with whatever is already queued.
                    let mut until = Instant::now() + self.options.debounce;
                    let mut next = Some(u);
                    while let Some(u) = next.take() {
                        self.update(u);
                        if !self.cni_pending.is_empty() {
                            until = Instant::now();
                        }
                        let left = until.saturating_duration_since(Instant::now());
                        next = if left.is_zero() {
                            rx.try_recv().ok()
                        } else {
                            rx.recv_timeout(left).ok()
                        };
                    }
                    dirty = true;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Sources gone: keep serving retries until stopped.
                    std::thread::sleep(wait);
                }
            }
        }
        if control.uninstall.load(Ordering::SeqCst) {
            match self.driver.uninstall() {
                Ok(()) => info!(driver = self.driver.name(), "removed ambient redirection"),
                Err(e) => warn!(error = %e, "removing ambient redirection failed"),
            }
        }
        info!("ambient enrollment loop stopped");
    }
}

/// Stop switch of a running loop.
#[derive(Debug, Default)]
pub struct LoopControl {
    pub stop: AtomicBool,
    /// Set together with `stop` to have the driver remove everything.
    pub uninstall: AtomicBool,
}

/// A running loop thread plus its sources.
pub struct AmbientLoop {
    control: Arc<LoopControl>,
    tx: Sender<SourceUpdate>,
    thread: Option<JoinHandle<()>>,
    status: StatusHandle,
    sources: Vec<Box<dyn Send>>,
}

impl AmbientLoop {
    /// Start `reconciler` on its own thread. Returns the loop and the sender sources use.
    pub fn spawn(mut reconciler: Reconciler) -> AmbientLoop {
        let (tx, rx) = std::sync::mpsc::channel();
        reconciler.attach_driver_events(tx.clone());
        let control = Arc::new(LoopControl::default());
        let status = reconciler.status();
        let c2 = control.clone();
        let s2 = status.clone();
        let thread = std::thread::Builder::new()
            .name("ambient-enroll".into())
            .spawn(move || {
                // A panic (a driver bug) must not leave readiness open over a dead loop.
                let run = std::panic::AssertUnwindSafe(|| reconciler.run(rx, c2));
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!("the ambient enrollment loop panicked; enrollment stopped");
                    s2.update(|s| {
                        s.redirect = Err(
                            "the ambient enrollment loop panicked (see the log); restart the agent"
                                .into(),
                        )
                    });
                }
            })
            .ok();
        AmbientLoop {
            control,
            tx,
            thread,
            status,
            sources: Vec::new(),
        }
    }

    /// The sender sources feed.
    pub fn sender(&self) -> Sender<SourceUpdate> {
        self.tx.clone()
    }

    /// Keep a source alive as long as the loop.
    pub fn keep(&mut self, source: Box<dyn Send>) {
        self.sources.push(source);
    }

    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Stop the sources and the loop; with `uninstall`, the driver removes its dataplane
    /// state before the loop exits. Waits for the loop thread.
    pub fn stop(mut self, uninstall: bool) {
        self.shutdown(uninstall);
    }

    fn shutdown(&mut self, uninstall: bool) {
        self.sources.clear();
        self.control.uninstall.store(uninstall, Ordering::SeqCst);
        self.control.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(SourceUpdate::Resync);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AmbientLoop {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

// ---- wiring from the agent's flags ------------------------------------------------------

/// The enrollment policy from the flags: `--ambient-enablement-selector` (YAML list; empty =
/// Istio's default selectors) and `--exclude-namespaces`.
pub fn policy_from_args(args: &crate::cli::AgentArgs) -> Result<EnrollPolicy, String> {
    let selectors = if args.ambient_enablement_selector.trim().is_empty() {
        meshcni_kube::EnablementSelector::istio_defaults()
    } else {
        serde_saphyr::from_str::<Option<Vec<meshcni_kube::EnablementSelector>>>(
            &args.ambient_enablement_selector,
        )
        .map_err(|e| format!("--ambient-enablement-selector is not a YAML list of selectors: {e}"))?
        .unwrap_or_default()
    };
    for s in &selectors {
        s.validate()
            .map_err(|e| format!("--ambient-enablement-selector: {e}"))?;
    }
    Ok(EnrollPolicy {
        selectors,
        excluded_namespaces: args.excluded_namespaces().into_iter().collect(),
        ztunnel: crate::workloads::ZtunnelIdentity {
            namespace: args.system_namespace.clone(),
            service_account: args.ztunnel_service_account.clone(),
        },
    })
}

/// Start ambient enrollment for the running agent: registers the `redirect-mode` readiness
/// gate, builds the driver for `mode` ([`make_driver`]) and the workload source
/// (`--ambient-workloads-file`, else the Kubernetes API), and spawns the loop. When something
/// is missing (no driver for the mode, bad selector, no source), the gate stays closed with the
/// reason and `None` is returned.
pub fn start_from_args(
    args: &crate::cli::AgentArgs,
    mode: RedirectMode,
    readiness: &crate::readiness::Readiness,
    enrolled_gauge: Gauge,
    ztunnel_gauge: Gauge,
    workload_metrics: WorkloadMetrics,
    config: Option<Arc<AmbientConfigWriter>>,
) -> Option<AmbientLoop> {
    let status = StatusHandle::new(Err("starting".into()));
    {
        let s = status.clone();
        readiness.probe("redirect-mode", move || s.probe());
    }
    let fail = |reason: String| {
        warn!(%reason, "ambient enrollment not started");
        status.update(|s| s.redirect = Err(reason));
        None
    };
    let policy = match policy_from_args(args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let driver = match make_driver(mode, args) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let node = args.effective_node_name();
    let mut reconciler = Reconciler::new(driver, policy, LoopOptions::default(), status.clone())
        .with_gauge(enrolled_gauge)
        .with_ztunnel_gauge(ztunnel_gauge)
        .with_metrics(workload_metrics.clone())
        // The driver programs the agent's own netns (the node's: host-network DaemonSet).
        .with_node_addresses(Box::new(own_netns_addresses));
    if let Some(w) = config {
        reconciler = reconciler.with_config_writer(w);
    }
    if !args.ambient_workloads_file.is_empty() {
        let mut l = AmbientLoop::spawn(reconciler);
        let src = crate::workloads::file::FileSource::spawn_with(
            args.ambient_workloads_file.clone().into(),
            node,
            crate::workloads::file::FileSourceOptions {
                resync: Duration::from_secs(10),
                metrics: workload_metrics,
                ..Default::default()
            },
            l.sender(),
        );
        l.keep(Box::new(src));
        return Some(l);
    }
    let Some(access) = crate::workloads::kube::AccessConfig::from_args(args) else {
        return fail(
            "no workload source: set --ambient-workloads-file, --ambient-kubeconfig, or run in a cluster (KUBERNETES_SERVICE_HOST)".into(),
        );
    };
    if node.is_empty() {
        return fail("node name unknown: set NODE_NAME".into());
    }
    let poke = crate::workloads::SourcePoke::new();
    let mut l = AmbientLoop::spawn(reconciler.with_source_poke(poke.clone()));
    let src = crate::workloads::kube::KubeSource::spawn_with_poke(
        access,
        node,
        crate::workloads::kube::KubeSourceOptions::default(),
        l.sender(),
        poke,
    );
    l.keep(Box::new(src));
    Some(l)
}
