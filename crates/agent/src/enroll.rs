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

/// The identity of a network namespace (device and inode of its nsfs file): plain data, the
/// type `meshcni_netx::podns` finds namespaces by.
pub use meshcni_netx::podns::NetnsId;

/// A pod sandbox's network namespace as the runtime named it (`CNI_NETNS`), with the identity
/// it had when the loop received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    pub path: std::path::PathBuf,
    pub id: NetnsId,
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
    /// `spec.serviceAccountName` (handed to ztunnel in in-pod mode). Not compared.
    pub service_account: String,
    /// The sandbox netns from the pod's CNI ADD, while that event is in force. When both this
    /// and the enrolled pod's netns are known and differ, the pod is in a new sandbox and is
    /// planned as an [`Action::UpdateIps`] carrying it, even with unchanged addresses.
    pub netns: Option<PodNetns>,
}

/// The desired set, keyed by UID.
pub type DesiredSet = BTreeMap<String, DesiredPod>;

/// One pod as a driver has it redirected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    pub id: PodId,
    /// Sorted, deduplicated, never empty in a consistent state.
    pub ips: Vec<IpAddr>,
    /// The netns the driver redirects in, for drivers that work inside it (in-pod); `None` for
    /// node-level drivers.
    pub netns: Option<NetnsId>,
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
        /// The pod's service account.
        service_account: String,
        /// The sandbox netns when the loop knows it (a CNI ADD); `None` = find it.
        netns: Option<PodNetns>,
    },
    /// The pod is still enrolled but its IPs changed: stop redirecting `old \ new`, start
    /// redirecting `new \ old` (both lists are given in full).
    UpdateIps {
        pod: PodId,
        old: Vec<IpAddr>,
        new: Vec<IpAddr>,
        /// Set when the pod is in a new sandbox (`old` may then equal `new`).
        netns: Option<PodNetns>,
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
            Action::UpdateIps {
                pod,
                old,
                new,
                netns,
            } => {
                write!(f, "update {pod} ips [{}] -> [{}]", list(old), list(new))?;
                if let Some(n) = netns {
                    write!(f, " in {} ({})", n.path.display(), n.id)?;
                }
                Ok(())
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
                if want.is_empty()
                    && d.ips.is_empty()
                    && !e.ips.iter().any(|ip| owner.contains_key(ip))
                {
                    // Still selected, but the view shows no IP (yet): e.g. a restarted agent
                    // whose watch has not caught up with a pod enrolled at CNI ADD. Releasing
                    // would let the pod's traffic escape capture until the status catches up;
                    // as long as no other pod claims the address, keep the enrollment.
                    out.waiting_for_ip.push(d.id.clone());
                } else if want.is_empty() {
                    // Lost its IPs (all taken by other pods): keep nothing half-applied.
                    releases.push(Action::Release {
                        pod: best_id(&d.id, &e.id),
                        ips: e.ips.clone(),
                    });
                } else if want != e.ips || new_sandbox(d, e) {
                    updates.push(Action::UpdateIps {
                        pod: best_id(&d.id, &e.id),
                        old: e.ips.clone(),
                        new: want,
                        netns: d.netns.clone(),
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
                service_account: d.service_account.clone(),
                netns: d.netns.clone(),
            });
        }
    }
    out.actions.extend(releases);
    out.actions.extend(updates);
    out.actions.extend(enrolls);
    out
}

/// The desired pod names a sandbox netns other than the one the driver holds for it.
fn new_sandbox(d: &DesiredPod, e: &EnrolledPod) -> bool {
    matches!((&d.netns, e.netns), (Some(want), Some(held)) if want.id != held)
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

/// Who holds each IP of an [`EnrolledState`], kept in step with it by [`IpHolders::apply`]:
/// [`IpHolders::blocks`] answers what [`EnrolledState::blocks`] does without scanning every
/// enrolled pod, so a pass of n actions costs O(n log n), not O(n²) (enrolling 5,000 pods in one
/// pass scanned the growing state 5,000 times).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpHolders {
    by_ip: BTreeMap<IpAddr, BTreeSet<String>>,
}

impl IpHolders {
    fn add(&mut self, uid: &str, ips: &[IpAddr]) {
        for ip in ips {
            self.by_ip.entry(*ip).or_default().insert(uid.to_string());
        }
    }

    fn remove(&mut self, uid: &str, ips: &[IpAddr]) {
        for ip in ips {
            if let Some(set) = self.by_ip.get_mut(ip) {
                set.remove(uid);
                if set.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    /// Apply `action` to `state` (like [`EnrolledState::apply`]) and to this index, which must
    /// be `state`'s.
    pub fn apply(&mut self, state: &mut EnrolledState, action: &Action) {
        let uid = &action.pod().uid;
        if let Some(old) = state.pods.get(uid) {
            self.remove(uid, &old.ips);
        }
        state.apply(action);
        if let Some(new) = state.pods.get(uid) {
            self.add(uid, &new.ips);
        }
    }

    /// [`EnrolledState::holder_of`] from the index: the first UID (in UID order) other than
    /// `except` holding `ip`.
    pub fn holder_of(&self, ip: &IpAddr, except: &str) -> Option<&str> {
        self.by_ip
            .get(ip)?
            .iter()
            .find(|u| u.as_str() != except)
            .map(String::as_str)
    }

    /// [`EnrolledState::blocks`] from the index.
    pub fn blocks(&self, action: &Action) -> Option<(IpAddr, String)> {
        let (uid, claimed) = match action {
            Action::Enroll { pod, ips, .. } => (&pod.uid, ips),
            Action::UpdateIps { pod, new, .. } => (&pod.uid, new),
            Action::Release { .. } => return None,
        };
        claimed
            .iter()
            .find_map(|ip| self.holder_of(ip, uid).map(|h| (*ip, h.to_string())))
    }
}

impl EnrolledState {
    /// Record that `action` was applied successfully.
    pub fn apply(&mut self, action: &Action) {
        match action {
            Action::Enroll {
                pod, ips, netns, ..
            } => {
                self.pods.insert(
                    pod.uid.clone(),
                    EnrolledPod {
                        id: pod.clone(),
                        ips: canonical_ips(ips.iter().copied()),
                        netns: netns.as_ref().map(|n| n.id),
                    },
                );
            }
            Action::UpdateIps {
                pod, new, netns, ..
            } => {
                let held = self.pods.get(&pod.uid).and_then(|p| p.netns);
                self.pods.insert(
                    pod.uid.clone(),
                    EnrolledPod {
                        id: pod.clone(),
                        ips: canonical_ips(new.iter().copied()),
                        netns: netns.as_ref().map(|n| n.id).or(held),
                    },
                );
            }
            Action::Release { pod, .. } => {
                self.pods.remove(&pod.uid);
            }
        }
    }

    /// The UID of a pod other than `except` enrolled with `ip`.
    pub fn holder_of(&self, ip: &IpAddr, except: &str) -> Option<&str> {
        self.pods
            .iter()
            .find(|(uid, p)| uid.as_str() != except && p.ips.binary_search(ip).is_ok())
            .map(|(uid, _)| uid.as_str())
    }

    /// Whether `action` would take an IP another pod still holds in `self` — which happens
    /// only when an earlier release/update of the same plan failed. The loop defers such an
    /// action to the next pass, keeping IPs exclusive at every step.
    pub fn blocks(&self, action: &Action) -> Option<(IpAddr, String)> {
        let (uid, claimed) = match action {
            Action::Enroll { pod, ips, .. } => (&pod.uid, ips),
            Action::UpdateIps { pod, new, .. } => (&pod.uid, new),
            Action::Release { .. } => return None,
        };
        claimed
            .iter()
            .find_map(|ip| self.holder_of(ip, uid).map(|h| (*ip, h.to_string())))
    }

    /// The IP → holder index of this state, for checking many actions against it (see
    /// [`IpHolders`]).
    pub fn ip_holders(&self) -> IpHolders {
        let mut h = IpHolders::default();
        for (uid, p) in &self.pods {
            h.add(uid, &p.ips);
        }
        h
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
                netns: None,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        canonical_ips(list.iter().map(|s| ip(s)))
    }

    fn desired(pods: &[(&str, &[&str])]) -> DesiredSet {
        pods.iter()
            .map(|(uid, list)| {
                (
                    uid.to_string(),
                    DesiredPod {
                        id: PodId::new(uid, "ns", &format!("pod-{uid}")),
                        ips: ips(list),
                        ..DesiredPod::default()
                    },
                )
            })
            .collect()
    }

    fn actual(pods: &[(&str, &[&str])]) -> EnrolledState {
        let mut s = EnrolledState::default();
        for (uid, list) in pods {
            // As a driver rebuilds it: UID and IPs only.
            s.insert(PodId::new(uid, "", ""), ips(list));
        }
        s
    }

    fn render(p: &Plan) -> Vec<String> {
        p.actions.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn table() {
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a [&'a str])],
            &'a [(&'a str, &'a [&'a str])],
            &'a [&'a str],
        );
        let cases: &[Case] = &[
            ("nothing", &[], &[], &[]),
            (
                "new pod enrolls",
                &[("u1", &["10.0.0.1"])],
                &[],
                &["enroll ns/pod-u1 (uid u1) ips [10.0.0.1]"],
            ),
            (
                "dual-stack pod enrolls with both IPs, sorted",
                &[("u1", &["fd00::1", "10.0.0.1"])],
                &[],
                &["enroll ns/pod-u1 (uid u1) ips [10.0.0.1,fd00::1]"],
            ),
            (
                "already enrolled: nothing (restart with dataplane state)",
                &[("u1", &["10.0.0.1"])],
                &[("u1", &["10.0.0.1"])],
                &[],
            ),
            (
                "no longer desired: release with the enrolled IPs",
                &[],
                &[("u1", &["10.0.0.1"])],
                &["release uid u1 ips [10.0.0.1]"],
            ),
            ("pod without IP waits", &[("u1", &[])], &[], &[]),
            (
                "enrolled pod whose IP the view does not show (yet): kept, not released",
                &[("u1", &[])],
                &[("u1", &["10.0.0.1"])],
                &[],
            ),
            (
                "enrolled pod without IP whose address another pod now claims: released",
                &[("u1", &[]), ("u2", &["10.0.0.1"])],
                &[("u1", &["10.0.0.1"])],
                &[
                    "release ns/pod-u1 (uid u1) ips [10.0.0.1]",
                    "enroll ns/pod-u2 (uid u2) ips [10.0.0.1]",
                ],
            ),
            (
                "IP change",
                &[("u1", &["10.0.0.2"])],
                &[("u1", &["10.0.0.1"])],
                &["update ns/pod-u1 (uid u1) ips [10.0.0.1] -> [10.0.0.2]"],
            ),
            (
                "second IP added",
                &[("u1", &["10.0.0.1", "fd00::1"])],
                &[("u1", &["10.0.0.1"])],
                &["update ns/pod-u1 (uid u1) ips [10.0.0.1] -> [10.0.0.1,fd00::1]"],
            ),
            (
                "duplicate IP, one enrolled: the enrolled one keeps it",
                &[("u2", &["10.0.0.1"]), ("u9", &["10.0.0.1"])],
                &[("u9", &["10.0.0.1"])],
                &[],
            ),
            (
                "duplicate IP, both new: smaller UID wins",
                &[("u9", &["10.0.0.1"]), ("u2", &["10.0.0.1"])],
                &[],
                &["enroll ns/pod-u2 (uid u2) ips [10.0.0.1]"],
            ),
            (
                "IP reused by a new pod after the old one is gone: release before enroll",
                &[("new", &["10.0.0.1"])],
                &[("old", &["10.0.0.1"])],
                &[
                    "release uid old ips [10.0.0.1]",
                    "enroll ns/pod-new (uid new) ips [10.0.0.1]",
                ],
            ),
            (
                "dual-stack pod shares one IP with an enrolled pod: enrolled with the other",
                &[("a", &["10.0.0.1"]), ("b", &["10.0.0.1", "fd00::2"])],
                &[("a", &["10.0.0.1"])],
                &["enroll ns/pod-b (uid b) ips [fd00::2]"],
            ),
            (
                "namespace unlabelled: every pod released, in UID order",
                &[],
                &[("u2", &["10.0.0.2"]), ("u1", &["10.0.0.1"])],
                &[
                    "release uid u1 ips [10.0.0.1]",
                    "release uid u2 ips [10.0.0.2]",
                ],
            ),
            (
                "moved IP: pod A's old IP now B's; A releases it first (update), then B enrolls",
                &[("a", &["10.0.0.2"]), ("b", &["10.0.0.1"])],
                &[("a", &["10.0.0.1"])],
                &[
                    "update ns/pod-a (uid a) ips [10.0.0.1] -> [10.0.0.2]",
                    "enroll ns/pod-b (uid b) ips [10.0.0.1]",
                ],
            ),
        ];
        for (name, want, have, expected) in cases {
            let d = desired(want);
            let mut a = actual(have);
            let p = plan(&d, &a);
            assert_eq!(render(&p), *expected, "{name}");
            for action in &p.actions {
                a.apply(action);
            }
            assert_eq!(plan(&d, &a).actions, vec![], "{name}: idempotent");
        }
    }

    #[test]
    fn conflicts_and_waiting_are_reported() {
        let d = desired(&[("u9", &["10.0.0.1"]), ("u2", &["10.0.0.1"]), ("w", &[])]);
        let p = plan(&d, &EnrolledState::default());
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(p.conflicts[0].holder.uid, "u2");
        assert_eq!(p.conflicts[0].loser.uid, "u9");
        assert!(
            p.conflicts[0]
                .to_string()
                .contains("IP 10.0.0.1 is claimed by"),
            "{}",
            p.conflicts[0]
        );
        assert_eq!(p.waiting_for_ip, vec![PodId::new("w", "ns", "pod-w")]);
        // Once the winner is gone the loser gets the IP.
        let mut a = EnrolledState::default();
        for x in &p.actions {
            a.apply(x);
        }
        let d2 = desired(&[("u9", &["10.0.0.1"])]);
        assert_eq!(
            render(&plan(&d2, &a)),
            vec![
                "release ns/pod-u2 (uid u2) ips [10.0.0.1]",
                "enroll ns/pod-u9 (uid u9) ips [10.0.0.1]"
            ]
        );
    }

    /// xorshift64*: deterministic pseudo-random numbers without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// No IP is held by two enrolled pods.
    fn assert_exclusive(a: &EnrolledState, ctx: &str) {
        let mut seen: BTreeMap<IpAddr, &str> = BTreeMap::new();
        for (uid, p) in &a.pods {
            assert!(!p.ips.is_empty(), "{ctx}: {uid} enrolled without IPs");
            for ip in &p.ips {
                if let Some(other) = seen.insert(*ip, uid) {
                    panic!("{ctx}: {ip} held by {other} and {uid}");
                }
            }
        }
    }

    #[test]
    fn random_event_sequences_converge() {
        // Small pools make IP reuse, duplicates and flips frequent.
        let pool: Vec<IpAddr> = (1..=6)
            .map(|i| IpAddr::from([10, 0, 0, i]))
            .chain((1..=2).map(|i| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i as u16])))
            .collect();
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut world: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
            let mut actual = EnrolledState::default();
            let mut next_uid = 0u32;
            for step in 0..60 {
                let ctx = format!("seed {seed} step {step}");
                // One random event.
                match rng.below(6) {
                    0 | 1 => {
                        next_uid += 1;
                        let n = rng.below(3) as usize;
                        let ips = (0..n)
                            .map(|_| pool[rng.below(pool.len() as u64) as usize])
                            .collect();
                        world.insert(format!("p{next_uid:03}"), ips);
                    }
                    2 if !world.is_empty() => {
                        let k = world.keys().nth(rng.below(world.len() as u64) as usize);
                        let k = k.cloned().unwrap_or_default();
                        world.remove(&k);
                    }
                    3 if !world.is_empty() => {
                        let k = world.keys().nth(rng.below(world.len() as u64) as usize);
                        let k = k.cloned().unwrap_or_default();
                        world.insert(k, vec![pool[rng.below(pool.len() as u64) as usize]]);
                    }
                    4 => {
                        // A "namespace flip": drop or keep every other pod.
                        let keep = rng.below(2) == 0;
                        world.retain(|k, _| keep || k.ends_with(['0', '2', '4', '6', '8']));
                    }
                    _ => {}
                }
                let d: DesiredSet = world
                    .iter()
                    .map(|(uid, ips)| {
                        (
                            uid.clone(),
                            DesiredPod {
                                id: PodId::new(uid, "ns", uid),
                                ips: canonical_ips(ips.iter().copied()),
                                ..DesiredPod::default()
                            },
                        )
                    })
                    .collect();
                // Apply the plan, sometimes with failing actions (not recorded), and re-plan
                // until nothing is left; every intermediate state keeps IPs exclusive.
                let mut rounds = 0;
                loop {
                    let p = plan(&d, &actual);
                    if p.actions.is_empty() {
                        break;
                    }
                    rounds += 1;
                    assert!(rounds < 10, "{ctx}: no convergence: {:?}", p.actions);
                    let mut holders = actual.ip_holders();
                    for a in &p.actions {
                        // The index answers exactly what a scan of the state does.
                        assert_eq!(holders.blocks(a), actual.blocks(a), "{ctx}: index");
                        if actual.blocks(a).is_some() {
                            continue; // an earlier release of this IP failed
                        }
                        if rounds < 3 && rng.below(4) == 0 {
                            continue; // the driver failed this one
                        }
                        holders.apply(&mut actual, a);
                        assert_exclusive(&actual, &ctx);
                        assert_eq!(holders, actual.ip_holders(), "{ctx}: index in step");
                    }
                }
                // Converged: idempotent, and exactly the expected pods are enrolled.
                assert_eq!(plan(&d, &actual), plan(&d, &actual), "{ctx}: deterministic");
                assert!(plan(&d, &actual).actions.is_empty(), "{ctx}");
                for (uid, e) in &actual.pods {
                    let want = &d[uid];
                    assert!(
                        e.ips.iter().all(|ip| want.ips.contains(ip)),
                        "{ctx}: {uid} holds an IP it no longer has"
                    );
                }
                for (uid, want) in &d {
                    let free = want.ips.iter().any(|ip| {
                        !actual
                            .pods
                            .iter()
                            .any(|(u, e)| u != uid && e.ips.contains(ip))
                    });
                    if free {
                        assert!(actual.pods.contains_key(uid), "{ctx}: {uid} not enrolled");
                    }
                }
                // A restarted driver that only knows UIDs and IPs changes nothing.
                let mut rebuilt = EnrolledState::default();
                for (uid, e) in &actual.pods {
                    rebuilt.insert(PodId::new(uid, "", ""), e.ips.iter().copied());
                }
                assert!(
                    plan(&d, &rebuilt).actions.is_empty(),
                    "{ctx}: after restart"
                );
            }
        }
    }

    fn netns(ino: u64) -> PodNetns {
        PodNetns {
            path: format!("/var/run/netns/cni-{ino}").into(),
            id: NetnsId { dev: 4, ino },
        }
    }

    #[test]
    fn a_new_sandbox_with_the_same_ips_is_an_update_carrying_the_new_netns() {
        let mut d = desired(&[("u1", &["10.0.0.1"])]);
        if let Some(p) = d.get_mut("u1") {
            p.netns = Some(netns(2));
        }
        let mut a = actual(&[("u1", &["10.0.0.1"])]);
        if let Some(p) = a.pods.get_mut("u1") {
            p.netns = Some(NetnsId { dev: 4, ino: 1 });
        }
        let p = plan(&d, &a);
        assert_eq!(
            p.actions,
            vec![Action::UpdateIps {
                pod: PodId::new("u1", "ns", "pod-u1"),
                old: ips(&["10.0.0.1"]),
                new: ips(&["10.0.0.1"]),
                netns: Some(netns(2)),
            }]
        );
        // Applied, the state holds the new netns and nothing is left to do.
        for act in &p.actions {
            a.apply(act);
        }
        assert_eq!(a.pods["u1"].netns, Some(NetnsId { dev: 4, ino: 2 }));
        assert!(plan(&d, &a).actions.is_empty());
    }

    #[test]
    fn netns_is_compared_only_when_both_sides_know_it() {
        // Node-level drivers hold no netns: a CNI event's netns never causes work for them.
        let mut d = desired(&[("u1", &["10.0.0.1"])]);
        if let Some(p) = d.get_mut("u1") {
            p.netns = Some(netns(2));
        }
        let a = actual(&[("u1", &["10.0.0.1"])]);
        assert!(plan(&d, &a).actions.is_empty());
        // Same netns: nothing to do. No netns wanted (the watch's view): nothing to do.
        let mut a2 = a.clone();
        if let Some(p) = a2.pods.get_mut("u1") {
            p.netns = Some(NetnsId { dev: 4, ino: 2 });
        }
        assert!(plan(&d, &a2).actions.is_empty());
        let d2 = desired(&[("u1", &["10.0.0.1"])]);
        assert!(plan(&d2, &a2).actions.is_empty());
    }

    #[test]
    fn an_enroll_carries_the_netns_and_service_account() {
        let mut d = desired(&[("u1", &["10.0.0.1"])]);
        if let Some(p) = d.get_mut("u1") {
            p.netns = Some(netns(7));
            p.service_account = "sa1".into();
        }
        let p = plan(&d, &EnrolledState::default());
        match &p.actions[..] {
            [
                Action::Enroll {
                    netns: Some(n),
                    service_account,
                    ..
                },
            ] => {
                assert_eq!(n, &netns(7));
                assert_eq!(service_account, "sa1");
            }
            other => panic!("unexpected plan {other:?}"),
        }
    }
}
