//! The plugin hand-off's part of the reconcile loop: CNI ADDs of ambient pods waiting for
//! their answer (`POST /cmdadd`, served by `crate::cni_events`).
//!
//! The plugin's ADD of an ambient pod (`crate::cni_events`) waits here for its answer. A pass
//! first resolves each new request against the workload view: the pod (by namespace/name, not
//! terminating) must be known — waiting up to the request's lookup deadline for the source to
//! catch up —, selected for ambient (else refused, like Istio), and a ztunnel must be Ready on
//! the node (else refused: the pod would start uncaptured; the runtime retries the sandbox).
//! The event's IPs then override the watch's for that pod (the pod status often has no IP yet
//! at ADD time, or still the previous sandbox's), any back-off of the pod is reset, and the
//! pass plans as usual. After the pass the request is answered: 200 when the pod is enrolled
//! with exactly the event's IPs, 500 with the driver's error if its action failed or the
//! driver is failing, and 500 at its deadline if it is still not enrolled (e.g. its IP is
//! still held by another pod). On a refusal the IP override is dropped: the sandbox is about
//! to be torn down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{NODE_ADDRESSES_REFRESH, PassReport, Reconciler};
use crate::enroll::{DesiredSet, EnrolledState, NetnsId, PodNetns};
use crate::seam::{CniAddRequest, CniOutcome, CniRejection, RejectKind, ZtunnelSource};
use crate::workloads::{MeshDecision, Workload, desired_set, mesh_decision};

/// How long CNI-event IPs win over different, non-empty IPs from the watch. The kubelet
/// writes the sandbox's IPs into the pod status within seconds; past this, the watch is
/// trusted again.
pub const CNI_IPS_MAX_AGE: Duration = Duration::from_secs(120);

/// A CNI request waiting in the loop; `uid` is set once the pod is resolved.
#[derive(Debug)]
pub(super) struct PendingCni {
    pub(super) req: CniAddRequest,
    pub(super) uid: Option<String>,
    /// The sandbox netns, identified when the pod was resolved.
    pub(super) netns: Option<PodNetns>,
}

impl PendingCni {
    /// When the loop must look at it again without new input.
    pub(super) fn due(&self) -> Instant {
        if self.uid.is_some() {
            self.req.deadline
        } else {
            self.req.lookup_deadline
        }
    }
}

/// A CNI event's view of a pod, in force over the source's (see [`Reconciler::desired`]).
#[derive(Debug, Clone)]
pub(super) struct CniOverride {
    pub(super) ips: Vec<IpAddr>,
    pub(super) netns: Option<PodNetns>,
    pub(super) since: Instant,
}

enum Lookup {
    Wait,
    Found(String),
    Reject(CniRejection),
}

impl Reconciler {
    pub(super) fn cni_accept(&mut self, req: CniAddRequest) {
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
        self.cni_pending.push(PendingCni {
            req,
            uid: None,
            netns: None,
        });
    }

    /// Forget CNI-event IP overrides that are no longer needed (the source shows the same
    /// IPs, or other IPs long enough, or the pod is gone). Overrides are applied when the
    /// desired set is built ([`Reconciler::desired`]); the snapshot stays the source's view.
    pub(super) fn apply_cni_ips(&mut self, now: Instant) {
        let pods = &self.snapshot.pods;
        self.cni_ips.retain(|uid, o| match pods.get(uid) {
            None => false,
            Some(p) if p.ips == o.ips => false,
            Some(p) if !p.ips.is_empty() && now.duration_since(o.since) > CNI_IPS_MAX_AGE => false,
            Some(_) => true,
        });
    }

    /// Whether a CNI event's IPs currently override the source's for `uid`.
    pub(super) fn cni_overrides(&self, uid: &str) -> bool {
        self.cni_ips
            .get(uid)
            .is_some_and(|o| self.snapshot.pods.get(uid).map(|p| &p.ips) != Some(&o.ips))
    }

    /// The addresses of `ips` this driver plans with: the ones it handles, or all of them if
    /// it handles none (it then reports why it cannot capture the pod).
    pub(super) fn planned_ips(&self, ips: &[IpAddr]) -> Vec<IpAddr> {
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
    pub(super) fn desired(&mut self, hold_back: &BTreeSet<String>) -> DesiredSet {
        let mut desired = desired_set(&self.snapshot, &self.policy);
        for (uid, o) in &self.cni_ips {
            if hold_back.contains(uid) {
                continue;
            }
            if let Some(d) = desired.get_mut(uid) {
                d.ips = o.ips.clone();
                d.netns = o.netns.clone();
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
    pub(super) fn reserved_addresses(&mut self, now: Instant) -> BTreeMap<IpAddr, String> {
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

    /// An ADD waits for a pod the source has not shown (or for its first lists): if the
    /// source has reported a failure, nudge it (at most once a second).
    fn poke_source(&mut self, now: Instant) {
        if self.last_source_error.is_none() {
            return;
        }
        if let Some((poke, last)) = &mut self.source_poke
            && last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            *last = Some(now);
            poke.poke();
        }
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
                match self.driver.ztunnel_source() {
                    ZtunnelSource::Watched => format!(
                        "no ztunnel ready on this node (waited {waited} ms): pod {key} would start without capture"
                    ),
                    ZtunnelSource::Connected => format!(
                        "no ztunnel connected to the agent's ZDS socket (waited {waited} ms): pod {key} would start without capture"
                    ),
                },
            ));
        }
        Lookup::Found(pod.uid.clone())
    }

    /// Before a pass: drop abandoned requests, resolve new ones (or refuse them).
    pub(super) fn cni_resolve(&mut self, now: Instant) {
        if self.cni_pending.is_empty() {
            return;
        }
        let ztunnel = self.current_ztunnel().is_some();
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
                Lookup::Wait => {
                    self.poke_source(now);
                    keep.push(p);
                }
                Lookup::Reject(r) => {
                    p.req.reply.send(Err(r));
                }
                Lookup::Found(uid) => {
                    let netns = match self.sandbox_netns(&p.req) {
                        Ok(n) => n,
                        Err(r) => {
                            p.req.reply.send(Err(r));
                            continue;
                        }
                    };
                    self.cni_ips.insert(
                        uid.clone(),
                        CniOverride {
                            ips: p.req.event.ips.clone(),
                            netns: netns.clone(),
                            since: now,
                        },
                    );
                    p.netns = netns;
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

    /// The sandbox netns of a request, identified now (a path reused by a later sandbox is
    /// then told apart). Without a path the driver finds the netns itself; a path that cannot
    /// be read is refused when the driver works inside the pod's netns.
    fn sandbox_netns(&self, req: &CniAddRequest) -> Result<Option<PodNetns>, CniRejection> {
        let path = req.event.netns.trim();
        if path.is_empty() {
            return Ok(None);
        }
        match std::fs::metadata(path) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                Ok(Some(PodNetns {
                    path: path.into(),
                    id: NetnsId {
                        dev: m.dev(),
                        ino: m.ino(),
                    },
                }))
            }
            Err(e) if self.driver.needs_netns() => Err(CniRejection::new(
                RejectKind::BadNetns,
                format!(
                    "pod {}: its sandbox netns {path} cannot be read by the agent: {e}",
                    req.event.key()
                ),
            )),
            Err(_) => Ok(None),
        }
    }

    pub(super) fn drop_cni_ips(&mut self, uid: &str, ips: &[IpAddr]) {
        if self.cni_ips.get(uid).is_some_and(|o| o.ips == ips) {
            self.cni_ips.remove(uid);
            // Back to what the source says, at once (not at the next source update).
            self.replan = true;
        }
    }

    /// After a pass: answer resolved requests whose outcome is known, and expired ones.
    pub(super) fn cni_answer(&mut self, report: &PassReport, now: Instant) {
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
            let outcome = self.cni_outcome(&uid, &p, report, now);
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

    /// Whether `state` has `uid` enrolled the way the request asked.
    fn cni_satisfied(&self, uid: &str, pending: &PendingCni, state: &EnrolledState) -> bool {
        // Compared with the addresses the driver handles (an IPv4-only driver enrolls a
        // dual-stack pod with its IPv4 address only).
        let want = self.planned_ips(&pending.req.event.ips);
        state.pods.get(uid).is_some_and(|e| {
            // A driver that works in the netns must hold this sandbox's, not an older one.
            e.ips == want
                && pending
                    .netns
                    .as_ref()
                    .is_none_or(|n| e.netns.is_none_or(|held| held == n.id))
        })
    }

    /// Right after `uid`'s action was applied in a pass: answer the requests for it that are
    /// satisfied now, instead of at the end of the pass (a pass enrolling many pods may take
    /// longer than the runtime waits).
    pub(super) fn cni_answer_applied(&mut self, uid: &str, state: &EnrolledState) {
        if !self
            .cni_pending
            .iter()
            .any(|p| p.uid.as_deref() == Some(uid))
        {
            return;
        }
        let pending = std::mem::take(&mut self.cni_pending);
        let mut keep = Vec::with_capacity(pending.len());
        for p in pending {
            if p.uid.as_deref() == Some(uid) && self.cni_satisfied(uid, &p, state) {
                p.req.reply.send(Ok(()));
            } else {
                keep.push(p);
            }
        }
        self.cni_pending = keep;
    }

    /// The earliest answer deadline of a request waiting for `uid` (actions of pods a runtime
    /// waits for go first, most urgent first).
    pub(super) fn cni_deadline(&self, uid: &str) -> Option<Instant> {
        self.cni_pending
            .iter()
            .filter(|p| p.uid.as_deref() == Some(uid))
            .map(|p| p.req.deadline)
            .min()
    }

    /// Whether every request waiting for `uid` is past its deadline (or its caller is gone):
    /// its ADD has failed (or is about to), so the sandbox must not be captured now.
    pub(super) fn cni_given_up(&self, uid: &str) -> bool {
        let now = Instant::now();
        let mut waiting = self
            .cni_pending
            .iter()
            .filter(|p| p.uid.as_deref() == Some(uid))
            .peekable();
        waiting.peek().is_some()
            && waiting.all(|p| p.req.reply.is_closed() || now >= p.req.deadline)
    }

    fn cni_outcome(
        &self,
        uid: &str,
        pending: &PendingCni,
        report: &PassReport,
        now: Instant,
    ) -> Option<CniOutcome> {
        let req = &pending.req;
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
        if state.is_some_and(|s| self.cni_satisfied(uid, pending, s)) {
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
