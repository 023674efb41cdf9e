//! Ambient enrollment: the reconcile loop and the [`RedirectDriver`] seam every redirect mode
//! (`iptables`, `ebpf`, `inpod`) implements.
//!
//! The loop owns *what* should be redirected: it receives workload snapshots from a source
//! (`workloads`: Kubernetes list+watch or a local file), derives the desired set, plans
//! against what the driver reports as actually applied (`enroll::plan`), and hands the driver
//! one [`Action`] at a time. It also tracks the active ztunnel (spec §3.2
//! `UpdateActiveNodeProxy`) and tells the driver and the ambient config file when it changes.
//! The driver owns *how*: rules, ipsets, routes, maps, ZDS — and nothing else.
//!
//! # Contract for driver authors
//!
//! Calls come from a single thread (the loop's), never concurrently; `&mut self` everywhere.
//!
//! 1. **Start-up**: the loop calls [`RedirectDriver::actual`] first, before anything else. A
//!    driver reconstructs the enrolled set from the dataplane (iptables mode: its ipset, whose
//!    comments are pod UIDs), so an agent restart converges with zero duplicated work. A
//!    driver that cannot know (nothing installed yet) returns an empty state.
//! 2. **ztunnel**: [`RedirectDriver::ztunnel_changed`] is called whenever the active ztunnel
//!    changes (appears, is replaced by a newer Ready one, changes IP, or disappears → `None`),
//!    and once at start-up with the initial value (possibly `None`), always *before* actions
//!    are applied in that pass. After a successful call the loop re-reads `actual()` (spec
//!    §3.2: after re-creating the node rules, re-list and re-enqueue everything).
//! 3. **Actions**: [`RedirectDriver::apply`] for each action of the plan, releases first.
//!    Actions must be idempotent at the dataplane level (an `Enroll` of a pod whose ipset
//!    entry already exists succeeds). On `Ok` the loop records the action as applied; on
//!    `Err` it retries later with exponential backoff (the plan is recomputed each time, so a
//!    retry may become a different action if the world moved on).
//! 4. **Errors**: [`DriverError::scope`] says whether the failure is about one pod
//!    ([`ErrorScope::Pod`]: its netns is gone, ...) or the driver as a whole
//!    ([`ErrorScope::Driver`]: iptables broken, node netns unreachable, ...; *not* "no
//!    ztunnel yet", see 6). Driver-scoped failures close the agent's `redirect-mode` readiness gate
//!    until the next success; pod-scoped ones are retried and logged but keep the gate open.
//! 5. **Shutdown**: [`RedirectDriver::uninstall`] is called only when the agent is told to
//!    remove everything (uninstall); a plain restart leaves the dataplane in place so traffic
//!    keeps flowing and the next agent adopts it through `actual()`.
//!
//! 6. **No ztunnel yet**: a mode that cannot program a pod while no ztunnel is Ready (G1
//!    iptables: the ipset, tunnels and routes exist only after `ztunnel_changed(Some)`) should
//!    fail `apply` with a *pod*-scoped error ("ztunnel not ready"): the pod is retried with
//!    back-off, readiness stays open (Istio §7.7 does not require ztunnel), and every pending
//!    retry is reset the moment `ztunnel_changed` succeeds, so pods enroll right away then.
//!
//! `actual()` is not called on every pass: the loop keeps a copy updated by successful
//! actions and re-reads the driver at start-up, after `ztunnel_changed`, after any apply
//! error, and on the periodic resync.

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
use crate::cni_events::{CniAddRequest, CniOutcome, CniRejection, RejectKind};
use crate::enroll::DesiredSet;
pub use crate::enroll::{Action, EnrolledPod, EnrolledState, PodId};
use crate::enroll::{Conflict, plan};
use crate::workloads::{
    DuplicateUid, EnrollPolicy, MeshDecision, NamespaceInfo, SourceUpdate, Workload,
    WorkloadMetrics, WorkloadSnapshot, active_ztunnel, desired_set, mesh_decision,
    untrusted_ztunnels,
};

/// The active ztunnel on this node: among pods on the node with label `app=ztunnel`, the
/// Ready one with the newest `creationTimestamp` (ties broken by UID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelInfo {
    pub pod: PodId,
    /// Sorted, deduplicated pod IPs (`status.podIPs`, else `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// RFC 3339 `metadata.creationTimestamp` as the API gave it.
    pub created: String,
    /// The ztunnel pod's annotations (e.g. for a driver that needs its netns hint).
    pub annotations: BTreeMap<String, String>,
}

/// Whether an error concerns one pod or the whole driver (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// Only the pod named in the action is affected; other actions proceed.
    Pod,
    /// The driver cannot work at the moment; readiness gate `redirect-mode` closes.
    Driver,
}

/// A driver failure. The message names what failed and on what (command + args, netns, pod,
/// IP), as everywhere in meshcni.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DriverError {
    pub scope: ErrorScope,
    pub message: String,
}

impl DriverError {
    /// A failure limited to the pod of the action being applied.
    pub fn pod(message: impl Into<String>) -> DriverError {
        DriverError {
            scope: ErrorScope::Pod,
            message: message.into(),
        }
    }

    /// A failure of the driver as a whole.
    pub fn driver(message: impl Into<String>) -> DriverError {
        DriverError {
            scope: ErrorScope::Driver,
            message: message.into(),
        }
    }
}

/// A redirect mode's dataplane programming. See the module docs for the calling contract.
pub trait RedirectDriver: Send {
    /// Short name for logs and readiness reasons, e.g. `iptables`.
    fn name(&self) -> &str;

    /// What is currently redirected, reconstructed from the dataplane.
    fn actual(&mut self) -> Result<EnrolledState, DriverError>;

    /// Apply one action. Must be idempotent at the dataplane level.
    fn apply(&mut self, action: &Action) -> Result<(), DriverError>;

    /// Called once per reconcile pass, before its first [`RedirectDriver::apply`], with every
    /// action the pass may apply (some may then be deferred). A driver can do its durable
    /// bookkeeping for the whole pass here in one go (the iptables mode writes its state file
    /// once per pass, not once per pod). An error fails the pass like a driver-scoped error.
    fn prepare(&mut self, actions: &[Action]) -> Result<(), DriverError> {
        let _ = actions;
        Ok(())
    }

    /// The active ztunnel changed (or this is the start-up notification). `None` = no Ready
    /// ztunnel on the node.
    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError>;

    /// Remove every trace of this mode from the node (agent uninstall).
    fn uninstall(&mut self) -> Result<(), DriverError>;

    /// Whether this driver redirects traffic of `ip` (e.g. the node-level iptables mode is
    /// IPv4 only). The loop plans with a pod's handled addresses only, so a dual-stack pod is not
    /// "updated" on every pass; a pod with no handled address is still handed over whole, and
    /// the driver reports why it cannot capture it.
    fn handles(&self, ip: &IpAddr) -> bool {
        let _ = ip;
        true
    }
}

/// The driver for `mode`, or `Err(reason)` when this build has none (ambient then stays
/// not ready with that reason: gate `redirect-mode`). Redirect-mode drivers add their arm
/// here; `args` carries everything a driver may need (node name, host IP, iptables flavour,
/// DNS capture, IPv6, ...).
pub fn make_driver(
    mode: RedirectMode,
    args: &crate::cli::AgentArgs,
) -> Result<Box<dyn RedirectDriver>, String> {
    match mode {
        RedirectMode::Iptables => {
            use crate::modes::iptables::{IptablesDriver, IptablesModeConfig};
            let mut iptables = meshcni_netx::IptablesOptions::from_env();
            if let Some(forced) =
                meshcni_netx::IptablesFlavor::parse_forced(&args.force_iptables_binary)
            {
                iptables.force = Some(forced);
            }
            let cfg = IptablesModeConfig {
                dns_capture: args.ambient_dns_capture,
                // Kept on a hostPath with the rest of the run dir, so a restarted agent adopts
                // its own state (and remembers the sysctls to restore on uninstall).
                state_file: args.cni_agent_run_dir.join("iptables-mode.json"),
                netns_dir: args.netns_dir.clone(),
                node_xtables_lock: args.node_xtables_lock.clone(),
                iptables,
                ..IptablesModeConfig::default()
            };
            IptablesDriver::new(cfg)
                .map(|d| Box::new(d) as Box<dyn RedirectDriver>)
                .map_err(|e| e.message)
        }
        RedirectMode::Ebpf | RedirectMode::Inpod => Err(format!(
            "redirect mode {mode} has no driver in this build of meshcni-agent"
        )),
    }
}

// ---- the reconcile loop ----------------------------------------------------------------

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
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            resync: Duration::from_secs(60),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
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
    last_conflicts: Vec<Conflict>,
    last_source_error: Option<String>,
    /// CNI ADDs waiting for an answer (see "CNI events" below).
    cni_pending: Vec<PendingCni>,
    /// Pod IPs from CNI events: uid → (IPs, when). In force over the watch's IPs until the
    /// watch shows the same IPs (or any IPs after [`CNI_IPS_MAX_AGE`]), or the pod goes.
    cni_ips: BTreeMap<String, (Vec<IpAddr>, Instant)>,
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
            config: None,
            pods: None,
            namespaces: None,
            snapshot: WorkloadSnapshot::default(),
            actual: None,
            notified_ztunnel: None,
            failures: BTreeMap::new(),
            driver_retry: None,
            last_resync: Instant::now(),
            last_conflicts: Vec::new(),
            last_source_error: None,
            cni_pending: Vec::new(),
            cni_ips: BTreeMap::new(),
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

    /// Also record ztunnel readiness in the ambient config file.
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
        let zt = active_ztunnel(&self.snapshot, &self.policy.ztunnel);
        // A ztunnel that is gone is reported in the config file at once, not only once the
        // driver has been told: the driver may be in back-off or failing for a long time.
        if zt.is_none()
            && let Some(w) = &self.config
            && let Err(e) = w.set_ztunnel_ready(false)
        {
            warn!(error = %e, "writing ztunnel readiness into the ambient config");
        }
        if let Some((_, next)) = self.driver_retry {
            if now < next {
                return PassReport {
                    blocked: Some("driver in back-off".into()),
                    ..PassReport::default()
                };
            }
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
        }

        if self.notified_ztunnel.as_ref() != Some(&zt) {
            match &zt {
                Some(z) => info!(ztunnel = %z.pod, ips = ?z.ips, "active ztunnel"),
                None => info!("no ready ztunnel on this node"),
            }
            let res = self.driver.ztunnel_changed(zt.as_ref());
            if let Some(w) = &self.config {
                if let Err(e) = w.set_ztunnel_ready(zt.is_some() && res.is_ok()) {
                    warn!(error = %e, "writing ztunnel readiness into the ambient config");
                }
            }
            if let Err(e) = res {
                self.notified_ztunnel = None;
                return self.driver_failed("applying the ztunnel change", &e, now);
            }
            self.notified_ztunnel = Some(zt.clone());
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

        if !planned.actions.is_empty()
            && let Err(e) = self.driver.prepare(&planned.actions)
        {
            return self.driver_failed("preparing the pass", &e, now);
        }
        let mut report = PassReport::default();
        let mut driver_error = None;
        let mut holders = actual.ip_holders();
        for action in planned.actions {
            let uid = action.pod().uid.clone();
            if self.failures.get(&uid).is_some_and(|f| now < f.next) {
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
                    report.applied.push(action);
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
        self.status.update(|s| {
            s.redirect = Ok(());
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
                    self.update(u);
                    // Coalesce a burst.
                    let until = Instant::now() + self.options.debounce;
                    while let Ok(u) =
                        rx.recv_timeout(until.saturating_duration_since(Instant::now()))
                    {
                        self.update(u);
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

// ---- CNI events ------------------------------------------------------------------------
//
// The plugin's ADD of an ambient pod (`crate::cni_events`) waits here for its answer. A pass
// first resolves each new request against the workload view: the pod (by namespace/name, not
// terminating) must be known — waiting up to the request's lookup deadline for the source to
// catch up —, selected for ambient (else refused, like Istio), and a ztunnel must be Ready on
// the node (else refused: the pod would start uncaptured; the runtime retries the sandbox).
// The event's IPs then override the watch's for that pod (the pod status often has no IP yet
// at ADD time, or still the previous sandbox's), any back-off of the pod is reset, and the
// pass plans as usual. After the pass the request is answered: 200 when the pod is enrolled
// with exactly the event's IPs, 500 with the driver's error if its action failed or the
// driver is failing, and 500 at its deadline if it is still not enrolled (e.g. its IP is
// still held by another pod). On a refusal the IP override is dropped: the sandbox is about
// to be torn down.

/// How long CNI-event IPs win over different, non-empty IPs from the watch. The kubelet
/// writes the sandbox's IPs into the pod status within seconds; past this, the watch is
/// trusted again.
pub const CNI_IPS_MAX_AGE: Duration = Duration::from_secs(120);

/// A CNI request waiting in the loop; `uid` is set once the pod is resolved.
#[derive(Debug)]
struct PendingCni {
    req: CniAddRequest,
    uid: Option<String>,
}

impl PendingCni {
    /// When the loop must look at it again without new input.
    fn due(&self) -> Instant {
        if self.uid.is_some() {
            self.req.deadline
        } else {
            self.req.lookup_deadline
        }
    }
}

enum Lookup {
    Wait,
    Found(String),
    Reject(CniRejection),
}

impl Reconciler {
    fn cni_accept(&mut self, req: CniAddRequest) {
        // A runtime retry of the same pod while the first ADD still waits: the newer one,
        // with the current sandbox's IPs, wins.
        let (ns, name) = (&req.event.namespace, &req.event.name);
        let mut superseded = Vec::new();
        self.cni_pending.retain(|p| {
            let same = &p.req.event.namespace == ns && &p.req.event.name == name;
            if same {
                superseded.push(p.req.reply.clone());
            }
            !same
        });
        for r in superseded {
            r.send(Err(CniRejection::new(
                RejectKind::Superseded,
                format!("a newer ADD for pod {ns}/{name} replaced this one"),
            )));
        }
        debug!(pod = %req.event.key(), ips = ?req.event.ips, "CNI ADD received");
        self.cni_pending.push(PendingCni { req, uid: None });
    }

    /// Forget CNI-event IP overrides that are no longer needed (the source shows the same
    /// IPs, or other IPs long enough, or the pod is gone). Overrides are applied when the
    /// desired set is built ([`Reconciler::desired`]); the snapshot stays the source's view.
    fn apply_cni_ips(&mut self, now: Instant) {
        let pods = &self.snapshot.pods;
        self.cni_ips
            .retain(|uid, (ips, since)| match pods.get(uid) {
                None => false,
                Some(p) if p.ips == *ips => false,
                Some(p) if !p.ips.is_empty() && now.duration_since(*since) > CNI_IPS_MAX_AGE => {
                    false
                }
                Some(_) => true,
            });
    }

    /// Whether a CNI event's IPs currently override the source's for `uid`.
    fn cni_overrides(&self, uid: &str) -> bool {
        self.cni_ips
            .get(uid)
            .is_some_and(|(ips, _)| self.snapshot.pods.get(uid).map(|p| &p.ips) != Some(ips))
    }

    /// The addresses of `ips` this driver plans with: the ones it handles, or all of them if
    /// it handles none (it then reports why it cannot capture the pod).
    fn planned_ips(&self, ips: &[IpAddr]) -> Vec<IpAddr> {
        if ips.iter().any(|ip| self.driver.handles(ip)) {
            ips.iter()
                .copied()
                .filter(|ip| self.driver.handles(ip))
                .collect()
        } else {
            ips.to_vec()
        }
    }

    /// The desired set of this pass: the snapshot's, with CNI-event IPs in force (except for
    /// the pods in `hold_back`), pods claiming a reserved address left out (logged and
    /// counted once), and each pod's IPs reduced to those the driver handles.
    fn desired(&mut self, hold_back: &BTreeSet<String>) -> DesiredSet {
        let mut desired = desired_set(&self.snapshot, &self.policy);
        for (uid, (ips, _)) in &self.cni_ips {
            if hold_back.contains(uid) {
                continue;
            }
            if let Some(d) = desired.get_mut(uid) {
                d.ips = ips.clone();
            }
        }
        let mut refused = BTreeMap::new();
        desired.retain(|uid, d| {
            let hit = d
                .ips
                .iter()
                .find_map(|ip| self.reserved.get(ip).map(|who| (*ip, who)));
            match hit {
                Some((ip, who)) => {
                    refused.insert(
                        uid.clone(),
                        format!("pod {} claims {ip}, which is {who}", d.id),
                    );
                    false
                }
                None => true,
            }
        });
        for (uid, why) in &refused {
            if self.last_reserved_refusals.get(uid) != Some(why) {
                warn!(refused = %why, "not enrolling a pod with a reserved address");
                self.metrics.refused("reserved_ip");
            }
        }
        self.last_reserved_refusals = refused;
        for pod in desired.values_mut() {
            pod.ips = self.planned_ips(&pod.ips);
        }
        desired
    }

    /// Addresses no pod may be enrolled with: the node's own (listed at most every
    /// [`NODE_ADDRESSES_REFRESH`]), every ztunnel pod's and every host-network pod's (its
    /// IP is the node's). Enrolling one would route the node's or ztunnel's own traffic into
    /// the inbound tunnel.
    fn reserved_addresses(&mut self, now: Instant) -> BTreeMap<IpAddr, String> {
        let mut r = BTreeMap::new();
        if let Some(list) = &mut self.node_addresses {
            let stale = self
                .node_addresses_cache
                .1
                .is_none_or(|t| now.saturating_duration_since(t) >= NODE_ADDRESSES_REFRESH);
            if stale {
                match list() {
                    Ok(a) => self.node_addresses_cache.0 = a,
                    Err(e) => warn!(error = %e, "keeping the node addresses listed before"),
                }
                self.node_addresses_cache.1 = Some(now);
            }
            for ip in &self.node_addresses_cache.0 {
                r.insert(*ip, "an address of this node".to_string());
            }
        }
        for p in self.snapshot.pods.values().filter(|p| !p.terminal()) {
            // Only a trusted ztunnel's address is reserved: a pod merely labelled
            // `app=ztunnel` is an ordinary pod (`mesh_decision`) and is enrolled like one.
            let who = if self.policy.ztunnel.accepts(p) {
                format!("the address of ztunnel pod {}", p.key())
            } else if p.host_network {
                format!("the node address of host-network pod {}", p.key())
            } else {
                continue;
            };
            for ip in &p.ips {
                r.entry(*ip).or_insert_with(|| who.clone());
            }
        }
        r
    }

    fn cni_lookup(&self, req: &CniAddRequest, now: Instant, ztunnel: bool) -> Lookup {
        let ev = &req.event;
        let key = ev.key();
        let waited = now.saturating_duration_since(req.received).as_millis();
        let expired = now >= req.lookup_deadline;
        if !self.synced() {
            if !expired {
                return Lookup::Wait;
            }
            let mut m = format!(
                "cannot check pod {key}: the agent has not received its first list of pods and namespaces after {waited} ms"
            );
            if let Some(e) = &self.last_source_error {
                m.push_str(&format!(" (last source error: {e})"));
            }
            return Lookup::Reject(CniRejection::new(RejectKind::NotSynced, m));
        }
        let named: Vec<&Workload> = self
            .snapshot
            .pods
            .values()
            .filter(|p| p.namespace == ev.namespace && p.name == ev.name)
            .filter(|p| ev.uid.as_deref().is_none_or(|uid| p.uid == uid))
            .collect();
        let live = named
            .iter()
            .filter(|p| !p.deleting && !p.terminal())
            .max_by(|a, b| a.created.cmp(&b.created).then(a.uid.cmp(&b.uid)));
        let Some(pod) = live else {
            if !expired {
                return Lookup::Wait;
            }
            let mut m = format!("pod {key} not found in the agent's view after {waited} ms");
            if let Some(old) = named.first() {
                m.push_str(&format!(
                    " (only a terminating pod with that name, uid {})",
                    old.uid
                ));
            }
            return Lookup::Reject(CniRejection::new(RejectKind::NotFound, m));
        };
        let mut with_ips = (*pod).clone();
        with_ips.ips = ev.ips.clone();
        let decision = mesh_decision(
            &with_ips,
            self.snapshot.namespaces.get(&pod.namespace),
            &self.policy,
        );
        if decision != MeshDecision::In {
            let why = match decision {
                MeshDecision::NotSelected => {
                    "no ambient enablement selector matches its labels or its namespace's labels"
                        .to_string()
                }
                d => d.to_string(),
            };
            return Lookup::Reject(CniRejection::new(
                RejectKind::NotSelected,
                format!("pod {key} is not selected for ambient by the agent: {why}"),
            ));
        }
        if let Some((ip, who)) = ev
            .ips
            .iter()
            .find_map(|ip| self.reserved.get(ip).map(|who| (ip, who)))
        {
            return Lookup::Reject(CniRejection::new(
                RejectKind::ReservedIp,
                format!("pod {key}: IP {ip} is {who}; it is never captured as a pod's address"),
            ));
        }
        if !ztunnel {
            if !expired {
                return Lookup::Wait;
            }
            return Lookup::Reject(CniRejection::new(
                RejectKind::NoZtunnel,
                format!(
                    "no ztunnel ready on this node (waited {waited} ms): pod {key} would start without capture"
                ),
            ));
        }
        Lookup::Found(pod.uid.clone())
    }

    /// Before a pass: drop abandoned requests, resolve new ones (or refuse them).
    fn cni_resolve(&mut self, now: Instant) {
        if self.cni_pending.is_empty() {
            return;
        }
        let ztunnel = active_ztunnel(&self.snapshot, &self.policy.ztunnel).is_some();
        let pending = std::mem::take(&mut self.cni_pending);
        let mut keep = Vec::with_capacity(pending.len());
        for mut p in pending {
            if p.req.reply.is_closed() {
                debug!(pod = %p.req.event.key(), "CNI ADD abandoned by its caller");
                if let Some(uid) = &p.uid {
                    self.drop_cni_ips(uid, &p.req.event.ips);
                }
                continue;
            }
            if p.uid.is_some() {
                keep.push(p);
                continue;
            }
            match self.cni_lookup(&p.req, now, ztunnel) {
                Lookup::Wait => keep.push(p),
                Lookup::Reject(r) => {
                    p.req.reply.send(Err(r));
                }
                Lookup::Found(uid) => {
                    self.cni_ips
                        .insert(uid.clone(), (p.req.event.ips.clone(), now));
                    // A fresh sandbox: retry now even if the pod was in back-off.
                    self.failures.remove(&uid);
                    p.uid = Some(uid);
                    keep.push(p);
                }
            }
        }
        self.cni_pending = keep;
        self.apply_cni_ips(now);
    }

    fn drop_cni_ips(&mut self, uid: &str, ips: &[IpAddr]) {
        if self.cni_ips.get(uid).is_some_and(|(i, _)| i == ips) {
            self.cni_ips.remove(uid);
            // Back to what the source says, at once (not at the next source update).
            self.replan = true;
        }
    }

    /// After a pass: answer resolved requests whose outcome is known, and expired ones.
    fn cni_answer(&mut self, report: &PassReport, now: Instant) {
        if self.cni_pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.cni_pending);
        let mut keep = Vec::with_capacity(pending.len());
        for p in pending {
            let Some(uid) = p.uid.clone() else {
                keep.push(p);
                continue;
            };
            let outcome = self.cni_outcome(&uid, &p.req, report, now);
            match outcome {
                None => keep.push(p),
                Some(o) => {
                    if o.is_err() {
                        self.drop_cni_ips(&uid, &p.req.event.ips);
                    }
                    p.req.reply.send(o);
                }
            }
        }
        self.cni_pending = keep;
    }

    fn cni_outcome(
        &self,
        uid: &str,
        req: &CniAddRequest,
        report: &PassReport,
        now: Instant,
    ) -> Option<CniOutcome> {
        let key = req.event.key();
        if let Some((_, e)) = report.failed.iter().find(|(a, _)| a.pod().uid == uid) {
            return Some(Err(CniRejection::new(
                RejectKind::Driver,
                format!(
                    "{} driver could not capture pod {key}: {e}",
                    self.driver.name()
                ),
            )));
        }
        if let Some(blocked) = &report.blocked {
            let detail = self.status.get().redirect.err().unwrap_or(blocked.clone());
            return Some(Err(CniRejection::new(
                RejectKind::Driver,
                format!("pod {key} not captured: {detail}"),
            )));
        }
        let state = self.cni_state.as_ref();
        // Compared with the addresses the driver handles (an IPv4-only driver enrolls a
        // dual-stack pod with its IPv4 address only).
        let want = self.planned_ips(&req.event.ips);
        if state
            .and_then(|s| s.pods.get(uid))
            .is_some_and(|e| e.ips == want)
        {
            return Some(Ok(()));
        }
        if now < req.deadline {
            return None;
        }
        let why = req
            .event
            .ips
            .iter()
            .find_map(|ip| {
                state
                    .and_then(|s| s.holder_of(ip, uid))
                    .map(|h| format!("IP {ip} is still enrolled for pod uid {h}"))
            })
            .or_else(|| {
                self.last_conflicts
                    .iter()
                    .find(|c| c.loser.uid == uid)
                    .map(|c| c.to_string())
            })
            .unwrap_or_else(|| "its enrollment is still pending".into());
        Some(Err(CniRejection::new(
            RejectKind::Timeout,
            format!(
                "pod {key} was not captured within {} ms: {why}",
                now.saturating_duration_since(req.received).as_millis()
            ),
        )))
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
    pub fn spawn(reconciler: Reconciler) -> AmbientLoop {
        let (tx, rx) = std::sync::mpsc::channel();
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

// ---- a driver for tests --------------------------------------------------------------

/// What [`FakeDriver`] has "programmed", shared with the test that created it.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub enrolled: EnrolledState,
    pub ztunnel: Option<ZtunnelInfo>,
    /// Every call, rendered (`actual`, `apply <action>`, `ztunnel <name|none>`, `uninstall`).
    pub calls: Vec<String>,
    /// Fail the next N calls of `apply` with this error.
    pub fail_apply: Vec<DriverError>,
    /// Fail `apply` for these UIDs (pod-scoped) until removed.
    pub fail_uids: BTreeSet<String>,
    /// Fail the next N calls of `actual`.
    pub fail_actual: u32,
    /// When set, `apply` of an Enroll/UpdateIps fails (driver-scoped) while no ztunnel is
    /// known, like the G1 iptables mode whose ipset exists only once ztunnel is up.
    pub require_ztunnel: bool,
    /// Handle IPv4 addresses only (like the node-level iptables mode).
    pub ipv4_only: bool,
}

/// An in-memory [`RedirectDriver`] for tests: records calls, keeps the enrolled set, can be
/// told to fail.
#[derive(Debug, Clone, Default)]
pub struct FakeDriver {
    pub dataplane: Arc<Mutex<FakeDataplane>>,
}

impl FakeDriver {
    pub fn new() -> FakeDriver {
        FakeDriver::default()
    }

    /// A driver whose dataplane already holds `state` (an agent restart).
    pub fn with_state(state: EnrolledState) -> FakeDriver {
        let d = FakeDriver::default();
        d.lock().enrolled = state;
        d
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeDataplane> {
        self.dataplane.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RedirectDriver for FakeDriver {
    fn name(&self) -> &str {
        "fake"
    }

    fn handles(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() || !self.dataplane.lock().is_ok_and(|d| d.ipv4_only)
    }

    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        let mut d = self.lock();
        d.calls.push("actual".into());
        if d.fail_actual > 0 {
            d.fail_actual -= 1;
            return Err(DriverError::driver("fake: listing enrolled pods failed"));
        }
        // Like a real dataplane, only UIDs and IPs survive.
        let mut s = EnrolledState::default();
        for (uid, p) in &d.enrolled.pods {
            s.insert(PodId::new(uid, "", ""), p.ips.iter().copied());
        }
        Ok(s)
    }

    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push(format!("apply {action}"));
        if !d.fail_apply.is_empty() {
            return Err(d.fail_apply.remove(0));
        }
        if d.fail_uids.contains(&action.pod().uid) {
            return Err(DriverError::pod(format!(
                "fake: {} fails for {}",
                action.kind(),
                action.pod()
            )));
        }
        if d.require_ztunnel && d.ztunnel.is_none() && !matches!(action, Action::Release { .. }) {
            return Err(DriverError::driver("fake: no ztunnel, node rules missing"));
        }
        d.enrolled.apply(action);
        Ok(())
    }

    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push(format!(
            "ztunnel {}",
            ztunnel.map_or("none".to_string(), |z| z.pod.name.clone())
        ));
        d.ztunnel = ztunnel.cloned();
        Ok(())
    }

    fn uninstall(&mut self) -> Result<(), DriverError> {
        let mut d = self.lock();
        d.calls.push("uninstall".into());
        d.enrolled = EnrolledState::default();
        d.ztunnel = None;
        Ok(())
    }
}

// ---- wiring from the agent's flags ------------------------------------------------------

/// The enrollment policy from the flags: `--ambient-enablement-selector` (YAML list; empty =
/// Istio's default selectors) and `--exclude-namespaces`.
pub fn policy_from_args(args: &crate::cli::AgentArgs) -> Result<EnrollPolicy, String> {
    let selectors = if args.ambient_enablement_selector.trim().is_empty() {
        meshcni_kube::EnablementSelector::istio_defaults()
    } else {
        serde_yaml::from_str::<Option<Vec<meshcni_kube::EnablementSelector>>>(
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
    let access = if !args.ambient_kubeconfig.is_empty() {
        crate::workloads::kube::AccessConfig::Kubeconfig(args.ambient_kubeconfig.clone().into())
    } else if !args.kubernetes_service_host.is_empty() {
        crate::workloads::kube::AccessConfig::InCluster {
            protocol: args.kubernetes_service_protocol.clone(),
            host: args.kubernetes_service_host.clone(),
            port: if args.kubernetes_service_port.is_empty() {
                "443".into()
            } else {
                args.kubernetes_service_port.clone()
            },
            service_account_dir: args.service_account_dir.clone(),
            skip_tls_verify: args.skip_tls_verify,
        }
    } else {
        return fail(
            "no workload source: set --ambient-workloads-file, --ambient-kubeconfig, or run in a cluster (KUBERNETES_SERVICE_HOST)".into(),
        );
    };
    if node.is_empty() {
        return fail("node name unknown: set NODE_NAME".into());
    }
    let mut l = AmbientLoop::spawn(reconciler);
    let src = crate::workloads::kube::KubeSource::spawn(
        access,
        node,
        crate::workloads::kube::KubeSourceOptions::default(),
        l.sender(),
    );
    l.keep(Box::new(src));
    Some(l)
}
