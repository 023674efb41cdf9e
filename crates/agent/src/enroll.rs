//! The enrollment core: from the pods that *should* be in the mesh (desired) and the pods a
//! redirect-mode driver reports as *actually* redirected (actual), compute the actions that make
//! actual equal desired. Pure: no I/O, no clock, deterministic output order.
//!
//! Identity is the pod UID (a re-created pod with the same name is a different pod). The
//! planner guarantees:
//! * every desired pod with at least one IP ends up enrolled with exactly its IPs;
//! * every enrolled UID that is not desired is released (with the IPs it was enrolled with);
//! * an IP is never held by two pods at once: releases and IP shrinks come first in the plan,
//!   and a desired pod whose IP is still held by another *desired* pod (two live pods claiming
//!   one IP, e.g. a stale status) is not enrolled while the conflict lasts — the pod already
//!   enrolled with it keeps it; between two newcomers the smaller UID wins. Each such case is
//!   reported as a [`Conflict`];
//! * applying the plan to `actual` ([`EnrolledState::apply`]) and planning again yields no
//!   action (idempotence), and an unchanged input yields no action.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// Who a pod is. `namespace`/`name` are informational (logs, annotations); they may be empty
/// when a driver reconstructed its state from the dataplane, which only records the UID.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

impl PodId {
    pub fn new(uid: &str, namespace: &str, name: &str) -> PodId {
        PodId {
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for PodId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "uid {}", self.uid)
        } else {
            write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
        }
    }
}

/// A pod that should be in the mesh, as derived from the workload snapshot
/// (see `workloads::desired_set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredPod {
    pub id: PodId,
    /// Sorted, deduplicated. Empty = the pod has no IP yet: nothing is done until it has one.
    pub ips: Vec<IpAddr>,
    /// The pod's annotations (per-pod overrides a driver may honour, e.g. Istio's
    /// `ambient.istio.io/*`). Not compared by the planner.
    pub annotations: BTreeMap<String, String>,
}

/// The desired set, keyed by UID.
pub type DesiredSet = BTreeMap<String, DesiredPod>;

/// One pod as a driver has it redirected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    pub id: PodId,
    /// Sorted, deduplicated, never empty in a consistent state.
    pub ips: Vec<IpAddr>,
}

/// What is actually enrolled, keyed by UID. Drivers build it from the dataplane in
/// `RedirectDriver::actual` (e.g. the iptables mode from its ipset, whose entries carry the
/// pod UID as comment), so a restarted agent converges without re-applying anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrolledState {
    pub pods: BTreeMap<String, EnrolledPod>,
}

/// A change the driver must make. IP lists are sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start redirecting this pod's traffic through ztunnel.
    Enroll {
        pod: PodId,
        ips: Vec<IpAddr>,
        /// The pod's annotations, for per-pod overrides.
        annotations: BTreeMap<String, String>,
    },
    /// The pod is still enrolled but its IPs changed: stop redirecting `old \ new`, start
    /// redirecting `new \ old` (both lists are given in full).
    UpdateIps {
        pod: PodId,
        old: Vec<IpAddr>,
        new: Vec<IpAddr>,
    },
    /// Stop redirecting this pod (deleted, terminal, opted out, namespace unlabelled, ...).
    /// `ips` are the IPs it was enrolled with.
    Release { pod: PodId, ips: Vec<IpAddr> },
}

impl Action {
    /// The pod the action is about.
    pub fn pod(&self) -> &PodId {
        match self {
            Action::Enroll { pod, .. }
            | Action::UpdateIps { pod, .. }
            | Action::Release { pod, .. } => pod,
        }
    }

    /// `enroll` / `update-ips` / `release`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Enroll { .. } => "enroll",
            Action::UpdateIps { .. } => "update-ips",
            Action::Release { .. } => "release",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ips: &[IpAddr]| {
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Action::Enroll { pod, ips, .. } => write!(f, "enroll {pod} ips [{}]", list(ips)),
            Action::UpdateIps { pod, old, new } => {
                write!(f, "update {pod} ips [{}] -> [{}]", list(old), list(new))
            }
            Action::Release { pod, ips } => write!(f, "release {pod} ips [{}]", list(ips)),
        }
    }
}

/// Two pods claiming one IP; `loser` is not enrolled with it while this lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub ip: IpAddr,
    /// The pod that keeps (or gets) the IP.
    pub holder: PodId,
    /// The pod left waiting.
    pub loser: PodId,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IP {} is claimed by {} and {}; {} keeps it, {} waits",
            self.ip, self.holder, self.loser, self.holder, self.loser
        )
    }
}

/// The result of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// In order: releases, then IP updates, then enrollments (each group sorted by UID), so
    /// no IP is ever held by two pods in between.
    pub actions: Vec<Action>,
    /// IP conflicts seen (sorted by IP).
    pub conflicts: Vec<Conflict>,
    /// Desired pods waiting for an IP (sorted by UID).
    pub waiting_for_ip: Vec<PodId>,
}

/// Sort and deduplicate an IP list (the canonical form used everywhere in this module).
pub fn canonical_ips(ips: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    ips.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Compute the actions that turn `actual` into `desired`. See the module docs for the
/// guarantees.
pub fn plan(desired: &DesiredSet, actual: &EnrolledState) -> Plan {
    let mut out = Plan::default();

    // Who may hold which IP. Precedence: a desired pod that already holds the IP (it is
    // enrolled with it), then the smallest UID among the other desired claimants.
    let mut claims: BTreeMap<IpAddr, Vec<&DesiredPod>> = BTreeMap::new();
    for d in desired.values() {
        for ip in canonical_ips(d.ips.iter().copied()) {
            claims.entry(ip).or_default().push(d);
        }
    }
    let holds = |uid: &str, ip: &IpAddr| {
        actual
            .pods
            .get(uid)
            .is_some_and(|e| e.ips.binary_search(ip).is_ok())
    };
    let mut owner: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (ip, claimants) in &claims {
        let winner = claimants
            .iter()
            .find(|d| holds(&d.id.uid, ip))
            .or_else(|| claimants.iter().min_by(|a, b| a.id.uid.cmp(&b.id.uid)))
            .copied();
        let Some(winner) = winner else { continue };
        owner.insert(*ip, winner.id.uid.as_str());
        for loser in claimants.iter().filter(|d| d.id.uid != winner.id.uid) {
            out.conflicts.push(Conflict {
                ip: *ip,
                holder: winner.id.clone(),
                loser: loser.id.clone(),
            });
        }
    }

    // The IPs each desired pod gets now (its own IPs minus those another pod wins).
    let target = |d: &DesiredPod| -> Vec<IpAddr> {
        canonical_ips(d.ips.iter().copied())
            .into_iter()
            .filter(|ip| owner.get(ip) == Some(&d.id.uid.as_str()))
            .collect()
    };

    let mut releases = Vec::new();
    let mut updates = Vec::new();
    let mut enrolls = Vec::new();
    for (uid, e) in &actual.pods {
        match desired.get(uid) {
            Some(d) => {
                let want = target(d);
                if want.is_empty() {
                    // Lost its IPs (no IP in status any more, or all taken): keep nothing
                    // half-applied.
                    releases.push(Action::Release {
                        pod: best_id(&d.id, &e.id),
                        ips: e.ips.clone(),
                    });
                } else if want != e.ips {
                    updates.push(Action::UpdateIps {
                        pod: best_id(&d.id, &e.id),
                        old: e.ips.clone(),
                        new: want,
                    });
                }
            }
            None => releases.push(Action::Release {
                pod: e.id.clone(),
                ips: e.ips.clone(),
            }),
        }
    }
    for (uid, d) in desired {
        if actual.pods.contains_key(uid) {
            continue;
        }
        if d.ips.is_empty() {
            out.waiting_for_ip.push(d.id.clone());
            continue;
        }
        let want = target(d);
        if !want.is_empty() {
            enrolls.push(Action::Enroll {
                pod: d.id.clone(),
                ips: want,
                annotations: d.annotations.clone(),
            });
        }
    }
    out.actions.extend(releases);
    out.actions.extend(updates);
    out.actions.extend(enrolls);
    out
}

/// Prefer the desired pod's identity (it has namespace/name), keeping the UID of the enrolled
/// entry (they are equal by construction).
fn best_id(desired: &PodId, enrolled: &PodId) -> PodId {
    if desired.name.is_empty() {
        enrolled.clone()
    } else {
        desired.clone()
    }
}

impl EnrolledState {
    /// Record that `action` was applied successfully.
    pub fn apply(&mut self, action: &Action) {
        match action {
            Action::Enroll { pod, ips, .. } => {
                self.pods.insert(
                    pod.uid.clone(),
                    EnrolledPod {
                        id: pod.clone(),
                        ips: canonical_ips(ips.iter().copied()),
                    },
                );
            }
            Action::UpdateIps { pod, new, .. } => {
                self.pods.insert(
                    pod.uid.clone(),
                    EnrolledPod {
                        id: pod.clone(),
                        ips: canonical_ips(new.iter().copied()),
                    },
                );
            }
            Action::Release { pod, .. } => {
                self.pods.remove(&pod.uid);
            }
        }
    }

    /// Number of enrolled pods.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Add (or replace) a pod; IPs are canonicalised. Convenience for drivers rebuilding
    /// their state.
    pub fn insert(&mut self, id: PodId, ips: impl IntoIterator<Item = IpAddr>) {
        self.pods.insert(
            id.uid.clone(),
            EnrolledPod {
                id,
                ips: canonical_ips(ips),
            },
        );
    }
}
