//! The workloads the agent knows about: pods on this node and all namespaces, and the pure
//! decisions over them — which pods belong in the mesh ([`wants_mesh`], [`desired_set`]) and
//! which ztunnel is the active one ([`active_ztunnel`]).
//!
//! Sources ([`file`]: a local JSON/YAML file; [`kube`]: a Kubernetes list+watch) decode
//! objects in the Kubernetes JSON shape into [`Workload`]/[`NamespaceInfo`] and send
//! [`SourceUpdate`]s to the reconcile loop (`crate::ambient`).

pub mod file;
pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use meshcni_kube::EnablementSelector;
use serde::{Deserialize, Deserializer};

use crate::enroll::{DesiredPod, DesiredSet, PodId, canonical_ips};
use crate::seam::ZtunnelInfo;

/// Annotation the sidecar injector sets on injected pods.
pub const ANN_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Label identifying ztunnel pods (`app=ztunnel`).
pub const ZTUNNEL_APP_LABEL: (&str, &str) = ("app", "ztunnel");

/// A pod, reduced to what enrollment needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// `metadata.uid`; a source falls back to `namespace/name` when the object has none
    /// (hand-written local files).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `status.podIPs` (else `status.podIP`), parsed, sorted, deduplicated; unparsable
    /// entries are dropped.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Injected with a sidecar (annotation `sidecar.istio.io/status` present).
    pub has_sidecar: bool,
    /// `spec.serviceAccountName` (else the deprecated `spec.serviceAccount`, else `default`,
    /// which is what the API server's admission fills in).
    pub service_account: String,
    pub node_name: String,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`, or empty).
    pub phase: String,
    /// Condition `Ready` is `True`.
    pub ready: bool,
    /// `metadata.creationTimestamp` (RFC 3339; compares correctly as a string).
    pub created: String,
    /// `metadata.deletionTimestamp` is set (graceful termination in progress).
    pub deleting: bool,
}

impl Workload {
    /// `Succeeded` or `Failed`: the containers are gone for good.
    pub fn terminal(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }

    pub fn id(&self) -> PodId {
        PodId::new(&self.uid, &self.namespace, &self.name)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Labelled `app=ztunnel` (says it is a ztunnel; whether it is trusted as one is
    /// [`ZtunnelIdentity::check`]).
    pub fn is_ztunnel(&self) -> bool {
        self.labels.get(ZTUNNEL_APP_LABEL.0).map(String::as_str) == Some(ZTUNNEL_APP_LABEL.1)
    }
}

/// Which pods may be the node's ztunnel: labelled `app=ztunnel`, in the mesh's system namespace
/// (`--system-namespace`) and running as ztunnel's service account
/// (`--ztunnel-service-account`). The label alone is not enough: anyone who can create a pod
/// can set it, and the active ztunnel receives the node's ambient traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl Default for ZtunnelIdentity {
    /// Istio's chart: namespace `istio-system`, service account `ztunnel`.
    fn default() -> Self {
        ZtunnelIdentity {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
        }
    }
}

impl ZtunnelIdentity {
    /// `Ok` if `pod` is a trusted ztunnel; `Err(why not)` for a pod labelled `app=ztunnel`
    /// that is not (`None` for pods that do not claim to be one).
    pub fn check(&self, pod: &Workload) -> Option<Result<(), String>> {
        if !pod.is_ztunnel() {
            return None;
        }
        Some(if pod.namespace != self.namespace {
            Err(format!(
                "labelled app=ztunnel but in namespace {:?}, not the system namespace {:?}",
                pod.namespace, self.namespace
            ))
        } else if pod.service_account != self.service_account {
            Err(format!(
                "labelled app=ztunnel but runs as service account {:?}, not {:?}",
                pod.service_account, self.service_account
            ))
        } else {
            Ok(())
        })
    }

    /// A trusted ztunnel pod.
    pub fn accepts(&self, pod: &Workload) -> bool {
        matches!(self.check(pod), Some(Ok(())))
    }
}

/// A namespace, reduced to its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything known at one moment: pods on this node (keyed by UID) and namespaces (by name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadSnapshot {
    pub pods: BTreeMap<String, Workload>,
    pub namespaces: BTreeMap<String, NamespaceInfo>,
}

impl WorkloadSnapshot {
    /// Build a snapshot. Two pods with one UID: the first keeps it, the others are left out
    /// (see [`WorkloadSnapshot::from_parts_checked`] for the list of what was left out).
    pub fn from_parts(
        pods: impl IntoIterator<Item = Workload>,
        namespaces: impl IntoIterator<Item = NamespaceInfo>,
    ) -> WorkloadSnapshot {
        Self::from_parts_checked(pods, namespaces, |_| false).0
    }

    /// Build a snapshot, refusing every pod whose UID another pod already holds. The holder
    /// is the pod `prefer` says held it before (e.g. in the previous snapshot), else the first
    /// one given. Returns the refused duplicates (a UID is the pod's identity everywhere: in
    /// the enrolled state and in the dataplane, so a second pod with it would silently take
    /// the first one's place, leaving it uncaptured).
    pub fn from_parts_checked(
        pods: impl IntoIterator<Item = Workload>,
        namespaces: impl IntoIterator<Item = NamespaceInfo>,
        prefer: impl Fn(&Workload) -> bool,
    ) -> (WorkloadSnapshot, Vec<DuplicateUid>) {
        let mut snap = WorkloadSnapshot {
            pods: BTreeMap::new(),
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
        };
        let mut dups = Vec::new();
        for p in pods {
            match snap.pods.get_mut(&p.uid) {
                None => {
                    snap.pods.insert(p.uid.clone(), p);
                }
                Some(held) => {
                    let (kept, refused) = if prefer(&p) && !prefer(held) {
                        let old = std::mem::replace(held, p);
                        (held.key(), old)
                    } else {
                        (held.key(), p)
                    };
                    dups.push(DuplicateUid {
                        uid: refused.uid.clone(),
                        holder: kept,
                        refused: refused.key(),
                    });
                }
            }
        }
        (snap, dups)
    }
}

/// A pod refused because another pod holds its UID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateUid {
    pub uid: String,
    /// `namespace/name` of the pod that keeps the UID.
    pub holder: String,
    /// `namespace/name` of the pod left out.
    pub refused: String,
}

impl fmt::Display for DuplicateUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pods {} and {} both have uid {}; {} keeps it, {} is ignored",
            self.holder, self.refused, self.uid, self.holder, self.refused
        )
    }
}

pub use crate::metrics::{RefusalLabels, WorkloadMetrics};

/// Whether `uid` is usable as a pod identity: a Kubernetes UID is letters, digits and `-`
/// (an RFC 4122 UUID). It is written into the dataplane (the iptables mode's ipset comment)
/// and read back to know what is enrolled; a control character (`\n`, NUL) or a cut would
/// not read back the same, and the pod would be released and re-enrolled on every resync.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID_BYTES
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Longest accepted pod UID (a UUID is 36).
pub const MAX_UID_BYTES: usize = 128;

/// Names usable in the `namespace/name` fallback UID of a local file's pod without
/// `metadata.uid` (Kubernetes names are DNS labels/subdomains).
fn valid_fallback_part(s: &str) -> bool {
    s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// A nudge from the enrollment loop to the workload source: a CNI ADD is waiting for a pod
/// the source has not seen. A Kubernetes source that is backing off after failed lists
/// (API server unreachable) retries at once instead of after up to the back-off cap; a healthy
/// one ignores it. Cheap to clone; poking with no source attached does nothing.
#[derive(Debug, Clone, Default)]
pub struct SourcePoke(std::sync::Arc<tokio::sync::Notify>);

impl SourcePoke {
    pub fn new() -> SourcePoke {
        SourcePoke::default()
    }

    /// Wake the source's watches that are waiting right now.
    pub fn poke(&self) {
        self.0.notify_waiters();
    }

    /// Resolves at the next [`SourcePoke::poke`].
    pub async fn poked(&self) {
        self.0.notified().await;
    }
}

/// What a source tells the reconcile loop. Pods and namespaces may come separately (two
/// watches); the loop plans only once it has had both (otherwise a pod seen before its
/// namespace would look un-enrolled and be released).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUpdate {
    /// Both halves at once (local file).
    Snapshot(WorkloadSnapshot),
    /// The complete current set of pods on this node.
    Pods(Vec<Workload>),
    /// The complete current set of namespaces.
    Namespaces(Vec<NamespaceInfo>),
    /// The source has a problem (logged; the last good data stays in force).
    Error(String),
    /// Re-read the driver's state and re-plan (also used to wake the loop).
    Resync,
    /// The CNI plugin's ADD of an ambient pod (`crate::cni_events`): authoritative pod IPs,
    /// and a caller waiting for the pod to be captured.
    CniAdd(crate::seam::CniAddRequest),
    /// Something the redirect driver reported (a proxy connected, a pod lost).
    Driver(crate::seam::DriverEvent),
    /// The repair controller (`crate::repair`) found this pod (UID) not captured as it should
    /// be (not enrolled, or its redirection drifted): enroll it again now, whatever its
    /// back-off, even if the driver counts it as enrolled (an enroll is verify-or-repair).
    Repair(String),
}

/// The agent's enrollment policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollPolicy {
    /// Ambient enablement selectors; a pod is ambient if any matches.
    pub selectors: Vec<EnablementSelector>,
    /// Namespaces whose pods are never enrolled (the agent's `EXCLUDE_NAMESPACES`).
    pub excluded_namespaces: BTreeSet<String>,
    /// Which pods are trusted as ztunnel (never enrolled; one of them is the active ztunnel).
    pub ztunnel: ZtunnelIdentity,
}

impl Default for EnrollPolicy {
    /// Istio's default selectors, nothing excluded.
    fn default() -> Self {
        EnrollPolicy {
            selectors: EnablementSelector::istio_defaults(),
            excluded_namespaces: BTreeSet::new(),
            ztunnel: ZtunnelIdentity::default(),
        }
    }
}

/// Why a pod is (not) in the mesh. `In` is the only enrolling answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshDecision {
    In,
    HostNetwork,
    Sidecar,
    Ztunnel,
    ExcludedNamespace,
    Terminal,
    NoIp,
    NotSelected,
}

impl fmt::Display for MeshDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MeshDecision::In => "in the mesh",
            MeshDecision::HostNetwork => "host network",
            MeshDecision::Sidecar => "has a sidecar",
            MeshDecision::Ztunnel => "is a ztunnel pod",
            MeshDecision::ExcludedNamespace => "namespace excluded",
            MeshDecision::Terminal => "terminated",
            MeshDecision::NoIp => "no pod IP yet",
            MeshDecision::NotSelected => "not selected for ambient",
        })
    }
}

/// Whether `pod` belongs in the mesh, with the reason. `ns` is the pod's namespace (`None`
/// if unknown: no namespace labels). Order: the pod kinds ambient never handles first (host
/// network, sidecar, ztunnel itself, excluded namespace), then lifecycle (terminal), then the
/// enablement selectors (pod label `istio.io/dataplane-mode=ambient`, or namespace label
/// `ambient` unless the pod says `none`, with the default selectors), then the IP.
pub fn mesh_decision(
    pod: &Workload,
    ns: Option<&NamespaceInfo>,
    policy: &EnrollPolicy,
) -> MeshDecision {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    if pod.host_network {
        return MeshDecision::HostNetwork;
    }
    if pod.has_sidecar {
        return MeshDecision::Sidecar;
    }
    // Only a trusted ztunnel is exempt: a pod merely labelled `app=ztunnel` is an ordinary pod.
    if policy.ztunnel.accepts(pod) {
        return MeshDecision::Ztunnel;
    }
    if policy.excluded_namespaces.contains(&pod.namespace) {
        return MeshDecision::ExcludedNamespace;
    }
    if pod.terminal() {
        return MeshDecision::Terminal;
    }
    let ns_labels = ns.map_or(&EMPTY, |n| &n.labels);
    if !policy
        .selectors
        .iter()
        .any(|s| s.matches(&pod.labels, ns_labels))
    {
        return MeshDecision::NotSelected;
    }
    if pod.ips.is_empty() {
        return MeshDecision::NoIp;
    }
    MeshDecision::In
}

/// [`mesh_decision`] `== In`.
pub fn wants_mesh(pod: &Workload, ns: Option<&NamespaceInfo>, policy: &EnrollPolicy) -> bool {
    mesh_decision(pod, ns, policy) == MeshDecision::In
}

/// The desired set: every pod that should be enrolled, plus selected pods still waiting for
/// an IP (with empty `ips`; the planner waits for them).
pub fn desired_set(snapshot: &WorkloadSnapshot, policy: &EnrollPolicy) -> DesiredSet {
    snapshot
        .pods
        .values()
        .filter(|p| {
            matches!(
                mesh_decision(p, snapshot.namespaces.get(&p.namespace), policy),
                MeshDecision::In | MeshDecision::NoIp
            )
        })
        .map(|p| {
            (
                p.uid.clone(),
                DesiredPod {
                    id: p.id(),
                    ips: p.ips.clone(),
                    annotations: p.annotations.clone(),
                    service_account: p.service_account.clone(),
                    netns: None,
                },
            )
        })
        .collect()
}

/// Pods labelled `app=ztunnel` that are not trusted as ztunnel, with the reason (logged by the
/// reconcile loop: such a pod is ignored as a ztunnel and treated as an ordinary pod).
pub fn untrusted_ztunnels<'a>(
    snapshot: &'a WorkloadSnapshot,
    identity: &ZtunnelIdentity,
) -> Vec<(&'a Workload, String)> {
    snapshot
        .pods
        .values()
        .filter_map(|p| match identity.check(p) {
            Some(Err(why)) => Some((p, why)),
            _ => None,
        })
        .collect()
}

/// Spec §3.2 `UpdateActiveNodeProxy`: among trusted ztunnel pods on this node (label
/// `app=ztunnel`, system namespace and ztunnel's service account: `identity`; the reference
/// accepts the label in any namespace), the Ready, non-terminal one with an IP and the newest
/// `creationTimestamp` (ties: larger UID, so the choice is deterministic).
pub fn active_ztunnel(
    snapshot: &WorkloadSnapshot,
    identity: &ZtunnelIdentity,
) -> Option<ZtunnelInfo> {
    snapshot
        .pods
        .values()
        .filter(|p| identity.accepts(p) && p.ready && !p.terminal() && !p.ips.is_empty())
        .max_by(|a, b| a.created.cmp(&b.created).then(a.uid.cmp(&b.uid)))
        .map(|p| ZtunnelInfo {
            pod: p.id(),
            ips: p.ips.clone(),
            created: p.created.clone(),
            annotations: p.annotations.clone(),
        })
}

// ---- decoding the Kubernetes JSON shape -------------------------------------------------

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Meta {
    #[serde(deserialize_with = "null_default")]
    name: String,
    #[serde(deserialize_with = "null_default")]
    namespace: String,
    #[serde(deserialize_with = "null_default")]
    uid: String,
    #[serde(deserialize_with = "null_default")]
    labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default")]
    annotations: BTreeMap<String, String>,
    #[serde(deserialize_with = "null_default")]
    creation_timestamp: String,
    deletion_timestamp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PodSpecLite {
    #[serde(deserialize_with = "null_default")]
    host_network: bool,
    #[serde(deserialize_with = "null_default")]
    node_name: String,
    #[serde(deserialize_with = "null_default")]
    service_account_name: String,
    /// Deprecated alias of `serviceAccountName` (still filled in by the API server).
    #[serde(deserialize_with = "null_default")]
    service_account: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Condition {
    #[serde(rename = "type", deserialize_with = "null_default")]
    typ: String,
    #[serde(deserialize_with = "null_default")]
    status: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodIpLite {
    #[serde(deserialize_with = "null_default")]
    ip: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodStatusLite {
    #[serde(deserialize_with = "null_default")]
    phase: String,
    #[serde(rename = "podIP", deserialize_with = "null_default")]
    pod_ip: String,
    #[serde(rename = "podIPs", deserialize_with = "null_default")]
    pod_ips: Vec<PodIpLite>,
    #[serde(deserialize_with = "null_default")]
    conditions: Vec<Condition>,
}

/// A Pod in API JSON shape (only the fields used here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodObject {
    #[serde(deserialize_with = "null_default")]
    metadata: Meta,
    #[serde(deserialize_with = "null_default")]
    spec: PodSpecLite,
    #[serde(deserialize_with = "null_default")]
    status: PodStatusLite,
}

/// A Namespace in API JSON shape.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NamespaceObject {
    #[serde(deserialize_with = "null_default")]
    metadata: Meta,
}

/// A decoding problem that makes an object unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{kind} object without metadata.name: {object}")]
    NoName { kind: &'static str, object: String },
    #[error("pod {name} without metadata.namespace")]
    NoNamespace { name: String },
    #[error("{kind} object is not valid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

impl PodObject {
    pub fn into_workload(self) -> Result<Workload, DecodeError> {
        let m = self.metadata;
        if m.name.is_empty() {
            return Err(DecodeError::NoName {
                kind: "pod",
                object: format!("namespace {:?}, uid {:?}", m.namespace, m.uid),
            });
        }
        if m.namespace.is_empty() {
            return Err(DecodeError::NoNamespace { name: m.name });
        }
        let raw_ips: Vec<&str> = if self.status.pod_ips.is_empty() {
            vec![self.status.pod_ip.as_str()]
        } else {
            self.status.pod_ips.iter().map(|p| p.ip.as_str()).collect()
        };
        let uid = if m.uid.is_empty() {
            if !valid_fallback_part(&m.namespace) || !valid_fallback_part(&m.name) {
                return Err(DecodeError::Invalid {
                    kind: "pod",
                    reason: format!(
                        "pod {:?}/{:?} has no metadata.uid and its namespace/name cannot stand in for one (letters, digits, '-', '.', '_' only)",
                        m.namespace, m.name
                    ),
                });
            }
            format!("{}/{}", m.namespace, m.name)
        } else if !valid_uid(&m.uid) {
            return Err(DecodeError::Invalid {
                kind: "pod",
                reason: format!(
                    "pod {}/{}: metadata.uid {:?} is not a Kubernetes UID (letters, digits and '-' only, at most {MAX_UID_BYTES} bytes)",
                    m.namespace, m.name, m.uid
                ),
            });
        } else {
            m.uid.clone()
        };
        let ips = canonical_ips(raw_ips.iter().filter_map(|s| s.trim().parse().ok()));
        let ready = self
            .status
            .conditions
            .iter()
            .any(|c| c.typ == "Ready" && c.status == "True");
        let has_sidecar = m.annotations.contains_key(ANN_SIDECAR_STATUS);
        let service_account = [self.spec.service_account_name, self.spec.service_account]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string());
        Ok(Workload {
            uid,
            namespace: m.namespace,
            name: m.name,
            ips,
            host_network: self.spec.host_network,
            labels: m.labels,
            annotations: m.annotations,
            has_sidecar,
            service_account,
            node_name: self.spec.node_name,
            phase: self.status.phase,
            ready,
            created: m.creation_timestamp,
            deleting: m.deletion_timestamp.is_some(),
        })
    }
}

impl NamespaceObject {
    pub fn into_info(self) -> Result<NamespaceInfo, DecodeError> {
        if self.metadata.name.is_empty() {
            return Err(DecodeError::NoName {
                kind: "namespace",
                object: format!("labels {:?}", self.metadata.labels),
            });
        }
        Ok(NamespaceInfo {
            name: self.metadata.name,
            labels: self.metadata.labels,
        })
    }
}

/// Decode a pod from API JSON.
pub fn decode_pod(v: &serde_json::Value) -> Result<Workload, DecodeError> {
    PodObject::deserialize(v)
        .map_err(|e| DecodeError::Invalid {
            kind: "pod",
            reason: e.to_string(),
        })?
        .into_workload()
}

/// Decode a namespace from API JSON.
pub fn decode_namespace(v: &serde_json::Value) -> Result<NamespaceInfo, DecodeError> {
    NamespaceObject::deserialize(v)
        .map_err(|e| DecodeError::Invalid {
            kind: "namespace",
            reason: e.to_string(),
        })?
        .into_info()
}

#[cfg(test)]
mod tests;
