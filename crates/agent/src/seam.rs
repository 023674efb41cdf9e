//! The seam between the ambient reconcile loop (`crate::ambient`), the plugin's hand-off
//! (`crate::cni_events`) and the redirect-mode drivers (`crate::modes`): the
//! [`RedirectDriver`] trait every mode implements, the events a driver sends back to the loop
//! ([`DriverEvent`]), and the CNI request the loop answers ([`CniAddRequest`]).
//!
//! This module is the bottom of the agent's ambient house: it imports only the pure planner
//! types (`crate::enroll`); the loop, the modes, the workload sources, the CNI event server and
//! the metrics import it, never the other way round.
//!
//! Where the node's proxy comes from depends on the mode ([`ZtunnelSource`]): node-level modes
//! (`iptables`, `ebpf`) redirect to "the ztunnel pod" the workload source reports
//! (`Watched`); `inpod` hands pods to whoever is connected to its ZDS socket (`Connected`), and
//! tells the loop through [`DriverEvent::ZtunnelChanged`] when that changes.
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

//!
//! 7. **Events**: before the first call the loop hands the driver a [`DriverEvents`] sink
//!    ([`RedirectDriver::attach`]); a driver whose proxy is `Connected` reports connects and
//!    disconnects there (the loop then treats it like a ztunnel change: readiness file, pending
//!    CNI ADDs, immediate retries), and reports pods the proxy refused or lost outside an
//!    `apply` (e.g. a nack during a snapshot replay: [`DriverEvent::PodLost`]) so the loop
//!    re-reads `actual()` and retries them.
//! 8. **Netns**: [`Action::Enroll`] and [`Action::UpdateIps`] carry the pod's network namespace
//!    when the loop knows it (from the CNI ADD that created the sandbox). A driver that needs
//!    it ([`RedirectDriver::needs_netns`]) finds it itself when it is `None` (a running pod
//!    enrolled by a label change, or after an agent restart). A new sandbox of an enrolled pod
//!    (a different netns, same UID) is planned as an `UpdateIps` with the new netns even when the
//!    addresses did not change.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use crate::enroll::{Action, EnrolledPod, EnrolledState, NetnsId, PodId, PodNetns};

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

    /// Called after every successful [`RedirectDriver::apply`], once the CNI ADD waiting for
    /// that action (if any) has been answered. A driver persists here what the apply left for
    /// later (the inpod mode writes its state file here instead of inside the ADD's critical
    /// path; the crash window between the dataplane change and the record is as before). An
    /// error fails the pass like a driver-scoped error.
    fn flush(&mut self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Verify-or-repair the mode's node-level pieces only (not the pods): the node netns's
    /// rules a third party may flush. Called by the loop every `LoopOptions::node_check`
    /// between full read-backs ([`RedirectDriver::actual`], which does it too); must be cheap
    /// when nothing changed. The default does nothing (a mode without node rules).
    fn verify_node(&mut self) -> Result<(), DriverError> {
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

    /// Where this mode's proxy comes from (module docs).
    fn ztunnel_source(&self) -> ZtunnelSource {
        ZtunnelSource::Watched
    }

    /// The sink for [`DriverEvent`]s; called once by the loop before any other call.
    fn attach(&mut self, events: DriverEvents) {
        let _ = events;
    }

    /// Whether the mode works inside each pod's netns. The loop then refuses a CNI ADD whose
    /// netns it cannot identify (instead of letting the driver guess).
    fn needs_netns(&self) -> bool {
        false
    }
}

/// Where a mode's node proxy comes from (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZtunnelSource {
    /// The ztunnel pod reported by the workload source (`app=ztunnel`, trusted namespace and
    /// service account, Ready, newest).
    Watched,
    /// Whoever is connected to the driver's socket (ZDS); reported with
    /// [`DriverEvent::ZtunnelChanged`].
    Connected,
}

/// What a driver tells the loop outside the loop's own calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// (`Connected` drivers) the proxy new pods are handed to changed: `Some` after a connect
    /// (or when an older connection is left), `None` when no proxy is connected any more.
    ZtunnelChanged(Option<ZtunnelInfo>),
    /// The proxy refused or dropped a pod the driver had handed over (a nack in a snapshot
    /// replay, ...): re-read `actual()` and enroll it again.
    PodLost { uid: String, reason: String },
    /// The proxy confirmed a pod outside an `apply` (an ack in a snapshot replay).
    PodAcked { uid: String },
}

/// The sink a driver sends [`DriverEvent`]s to (the loop's input channel). Cheap to clone;
/// sending never blocks; events sent after the loop stopped are dropped.
#[derive(Clone)]
pub struct DriverEvents(Arc<dyn Fn(DriverEvent) + Send + Sync>);

impl DriverEvents {
    pub fn new(f: impl Fn(DriverEvent) + Send + Sync + 'static) -> DriverEvents {
        DriverEvents(Arc::new(f))
    }

    /// A sink that drops every event (a driver used outside a loop, e.g. uninstall).
    pub fn discard() -> DriverEvents {
        DriverEvents::new(|_| {})
    }

    pub fn send(&self, event: DriverEvent) {
        (self.0)(event)
    }
}

impl std::fmt::Debug for DriverEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverEvents")
    }
}

// ---- the CNI request the loop answers ----------------------------------------------------

/// A validated `cmdadd` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdAdd {
    /// `CNI_NETNS` of the sandbox; may be empty (Istio then finds the netns itself; the
    /// iptables mode does not need it).
    pub netns: String,
    pub namespace: String,
    pub name: String,
    /// The pod's addresses from the CNI result, sorted, deduplicated, IPv4-mapped IPv6
    /// unmapped.
    pub ips: Vec<IpAddr>,
    /// The pod UID when the plugin sent one (meshcni does; Istio's plugin does not): the
    /// lookup then matches it exactly instead of by namespace/name alone.
    pub uid: Option<String>,
}

impl CmdAdd {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why the agent refused to confirm a capture (HTTP 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// The pod is not in the agent's view after the lookup wait.
    NotFound,
    /// The agent's selectors/exclusions say the pod is not ambient.
    NotSelected,
    /// No Ready ztunnel on this node: the pod would start uncaptured.
    NoZtunnel,
    /// The redirect driver failed (pod- or driver-scoped).
    Driver,
    /// The workload source has not delivered its first list yet.
    NotSynced,
    /// The pod was found and selected but not enrolled in time (e.g. its IP is still held by
    /// another pod), or the loop did not answer in time.
    Timeout,
    /// Ambient enrollment is not running (no driver, loop stopped).
    Unavailable,
    /// A newer ADD for the same pod arrived while this one waited.
    Superseded,
    /// An event IP is the node's own or ztunnel's address.
    ReservedIp,
    /// The event's sandbox netns cannot be read (the mode works inside it).
    BadNetns,
}

impl RejectKind {
    /// Value of the `result` label of `meshcni_cni_events_total`.
    pub fn label(self) -> &'static str {
        match self {
            RejectKind::NotFound => "not_found",
            RejectKind::NotSelected => "not_selected",
            RejectKind::NoZtunnel => "no_ztunnel",
            RejectKind::Driver => "driver_error",
            RejectKind::NotSynced => "not_synced",
            RejectKind::Timeout => "timeout",
            RejectKind::Unavailable => "unavailable",
            RejectKind::Superseded => "superseded",
            RejectKind::ReservedIp => "reserved_ip",
            RejectKind::BadNetns => "bad_netns",
        }
    }
}

/// A refusal with its reason, sent back to the plugin as the 500 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CniRejection {
    pub kind: RejectKind,
    pub message: String,
}

impl CniRejection {
    pub fn new(kind: RejectKind, message: impl Into<String>) -> CniRejection {
        CniRejection {
            kind,
            message: message.into(),
        }
    }
}

/// What the loop answers: `Ok(())` = captured.
pub type CniOutcome = Result<(), CniRejection>;

/// The one-shot answer channel of a request. Cloneable and comparable only so that
/// `SourceUpdate` keeps its derives; equality is identity.
#[derive(Clone)]
pub struct ReplySlot(Arc<Mutex<Option<oneshot::Sender<CniOutcome>>>>);

impl ReplySlot {
    pub fn new() -> (ReplySlot, oneshot::Receiver<CniOutcome>) {
        let (tx, rx) = oneshot::channel();
        (ReplySlot(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Deliver the answer; `false` if it was already answered or nobody waits any more.
    pub fn send(&self, outcome: CniOutcome) -> bool {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        tx.is_some_and(|tx| tx.send(outcome).is_ok())
    }

    /// Nobody waits for the answer any more (the server gave up, or it was answered).
    pub fn is_closed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|tx| tx.is_closed())
    }
}

impl std::fmt::Debug for ReplySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_closed() {
            "ReplySlot(closed)"
        } else {
            "ReplySlot(waiting)"
        })
    }
}

impl PartialEq for ReplySlot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ReplySlot {}

/// A `cmdadd` handed to the reconcile loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniAddRequest {
    pub event: CmdAdd,
    pub received: Instant,
    /// Stop waiting for the pod to appear in the agent's view at this point.
    pub lookup_deadline: Instant,
    /// Answer by then at the latest (a little before the server's own timeout, so the reason
    /// is precise).
    pub deadline: Instant,
    pub reply: ReplySlot,
}

impl CniAddRequest {
    /// A request received now, with the waits of `options`, and the receiver of its answer.
    pub fn new(
        event: CmdAdd,
        options: &CniEventOptions,
    ) -> (CniAddRequest, oneshot::Receiver<CniOutcome>) {
        let (reply, rx) = ReplySlot::new();
        let received = Instant::now();
        let margin = (options.reply_timeout / 10).min(Duration::from_millis(300));
        let deadline = received + options.reply_timeout.saturating_sub(margin);
        let lookup_deadline = (received + options.pod_lookup_wait).min(deadline);
        (
            CniAddRequest {
                event,
                received,
                lookup_deadline,
                deadline,
                reply,
            },
            rx,
        )
    }
}

/// Timing of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CniEventOptions {
    /// How long the loop waits for an unknown pod to show up in its view (Istio: 10 × 10 ms
    /// on its informer cache; a watch may lag more, and pods are normally known long before
    /// the kubelet runs their sandbox, so a longer wait costs nothing in the common case).
    pub pod_lookup_wait: Duration,
    /// The longest a request is held; must stay under the plugin's 5 s timeout.
    pub reply_timeout: Duration,
}

impl Default for CniEventOptions {
    fn default() -> Self {
        CniEventOptions {
            pod_lookup_wait: Duration::from_secs(2),
            reply_timeout: Duration::from_millis(4500),
        }
    }
}
