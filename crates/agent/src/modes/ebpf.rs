//! Redirect mode `ebpf` (issue 11): the `meshcni-ebpf` datapath driven by the enrollment core.
//!
//! * Start: load the programs and open (or create) the pinned maps under the pin directory
//!   (`--ambient-ebpf-pin-dir`, default `/sys/fs/bpf/meshcni`; capacity
//!   `--ambient-ebpf-max-pods`, default 16,384 addresses). Links and maps pinned by a previous
//!   agent are reused: a restart switches each link to the new program in place.
//! * Enroll: find the pod's netns (the CNI ADD's, else `netx::podns`), its veth pair (the pod's
//!   veth whose peer is a veth of the node netns), attach the pod programs to the host side
//!   once (a re-attach of a pinned link is an in-place switch), then one map entry per pod IP
//!   (IPv4 and IPv6).
//! * Release: delete the pod's map entries, then detach the pod programs from its host veth
//!   and remove their pins (a pod that leaves the mesh but keeps running holds nothing of ours).
//!   At start-up and on resync, programs on veths of pods with no address in the map (a release
//!   or enroll cut short by a crash) are detached the same way.
//! * ztunnel add/restart: attach the ztunnel programs (host veth and, inside its netns, `eth0`
//!   with `bpf_sk_assign`) and write the ztunnel map entry; ztunnel gone: the entry is cleared,
//!   so enrolled pods' TCP is dropped (fail closed), never leaked uncaptured.
//! * Who owns which address: the map holds addresses only, so the pod UIDs are recorded in
//!   `<run dir>/ebpf-mode.json`, written before an address enters the map; an address in the
//!   map without a recorded owner reads back as `unknown-<ip>` and is released by the planner.
//! * Uninstall: detach the ztunnel netns program and its routing, then
//!   `meshcni_ebpf::uninstall` (every link, filter, sysctl and pin of ours). The ztunnel netns
//!   is the one in use, else the one recorded in the state file: its path when the ztunnel pod
//!   names it (annotation), else the ztunnel pod's UID, IPs and netns identity (a netns found
//!   by scanning has no path that outlives the agent), found again the same way and checked
//!   against that identity, so `meshcni-agent uninstall` after the agent is gone cleans it too.
//!
//! No iptables, nft, ipset or policy route is written in the node netns.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use meshcni_ebpf::{AttachMode, Datapath, DatapathConfig, Hook, PodEntry, ZtunnelEntry};
use meshcni_netx::netlink::Netlink;
use meshcni_netx::podns::{NetnsFinder, PodNetnsQuery};
use meshcni_netx::tunnel::{self, LinkDetails};
use serde::{Deserialize, Serialize};

use crate::enroll::{Action, EnrolledState, PodId};
use crate::seam::{DriverError, RedirectDriver, ZtunnelInfo};

/// ztunnel pod annotation naming its netns file explicitly (the same as the iptables mode's).
pub use crate::modes::iptables::ZTUNNEL_NETNS_ANNOTATION;

/// Configuration of the driver.
#[derive(Debug, Clone)]
pub struct EbpfModeConfig {
    /// The node network namespace (default: the agent's own).
    pub node_netns: PathBuf,
    /// Named netns files (pods and ztunnel found here by their IPs when no process names them).
    pub netns_dirs: Vec<PathBuf>,
    /// The proc filesystem to find pods' netns by cgroup (`--host-proc-dir`).
    pub proc_root: PathBuf,
    /// The meshcni directory in bpffs (its parent must be on bpffs).
    pub pin_dir: PathBuf,
    /// Capacity of the pod map, in addresses.
    pub pod_capacity: u32,
    pub attach: AttachMode,
    /// Steer pods' DNS to ztunnel:15053.
    pub dns_capture: bool,
    /// Enroll pods' IPv6 addresses too (`AMBIENT_IPV6`; default on in this mode).
    pub enable_ipv6: bool,
    /// Owners of the enrolled addresses and the ztunnel netns in use.
    pub state_file: PathBuf,
}

impl Default for EbpfModeConfig {
    fn default() -> Self {
        EbpfModeConfig {
            node_netns: PathBuf::from("/proc/self/ns/net"),
            netns_dirs: vec![PathBuf::from("/var/run/netns")],
            proc_root: PathBuf::from("/proc"),
            pin_dir: PathBuf::from(meshcni_ebpf::DEFAULT_PIN_DIR),
            pod_capacity: meshcni_ebpf::DEFAULT_POD_CAPACITY,
            attach: AttachMode::Auto,
            dns_capture: false,
            enable_ipv6: true,
            state_file: PathBuf::from("/var/run/meshcni/ebpf-mode.json"),
        }
    }
}

/// What the driver keeps on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbpfState {
    /// Address → pod UID.
    #[serde(default)]
    pub owners: BTreeMap<IpAddr, String>,
    /// Pod UID → host veth ifindex its programs are attached to.
    #[serde(default)]
    pub veths: BTreeMap<String, u32>,
    /// The ztunnel netns (path) and the name of its veth inside it, when attached.
    #[serde(default)]
    pub ztunnel_netns: Option<(PathBuf, String)>,
    /// The ztunnel netns when it was found by scanning (no stable path): how to find it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ztunnel_found: Option<FoundZtunnel>,
}

/// A ztunnel netns found by scanning (`/proc`, the netns dir), recorded so that an uninstall
/// by another process can find the same netns again and undo our routing there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundZtunnel {
    /// The ztunnel pod's UID and IPs (what the scan looks for).
    pub uid: String,
    pub ips: Vec<IpAddr>,
    /// The netns identity (`st_dev`, `st_ino` of its nsfs file): a netns found again must be
    /// this one (a new ztunnel pod's netns is not ours to touch).
    pub dev: u64,
    pub ino: u64,
    /// The ztunnel veth's name inside it.
    pub eth: String,
}

/// The active ztunnel, resolved.
#[derive(Debug)]
struct Ztunnel {
    /// Held open: the path of a netns found by scan is `/proc/self/fd/N` of this file.
    _file: Option<File>,
    netns: PathBuf,
    eth: String,
    /// Found by scanning: how to find it again (recorded in the state file).
    found: Option<FoundZtunnel>,
}

pub struct EbpfDriver {
    cfg: EbpfModeConfig,
    dp: Datapath,
    state: EbpfState,
    dirty: bool,
    ztunnel: Option<Ztunnel>,
    /// Pods `prepare` attached and recorded ahead of their enroll, with the addresses it
    /// recorded for them: undone if their enroll fails or does not come.
    prepared: BTreeMap<String, Vec<IpAddr>>,
    /// Netns files `prepare` found (one scan for the whole pass), taken by `enroll`.
    found: std::collections::HashMap<String, File>,
}

impl std::fmt::Debug for EbpfDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDriver")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn drv(e: impl std::fmt::Display) -> DriverError {
    DriverError::driver(format!("ebpf mode: {e}"))
}

fn pod_err(pod: &PodId, e: impl std::fmt::Display) -> DriverError {
    DriverError::pod(format!("ebpf mode: pod {pod}: {e}"))
}

/// `/proc/self/fd/N` of an open netns file (valid while `file` is open).
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The veth pair of a pod (or ztunnel) netns: (name inside it, host-side link in the node
/// netns). The inside veth must have its peer in another netns, and that peer must be a veth
/// of `node` pointing back to it.
fn veth_pair(node: &Path, inner: &Path) -> Result<Option<(String, LinkDetails)>, String> {
    let mut inl =
        Netlink::open(inner).map_err(|e| format!("netlink in {}: {e}", inner.display()))?;
    let links = tunnel::list_links(&mut inl)
        .map_err(|e| format!("list links in {}: {e}", inner.display()))?;
    let mut nnl = Netlink::open(node).map_err(|e| format!("netlink in {}: {e}", node.display()))?;
    for l in links {
        if l.kind != "veth" || l.link_netnsid.is_none() {
            continue;
        }
        let Some(peer) = l.link else { continue };
        let host = tunnel::link_by_index(&mut nnl, peer)
            .map_err(|e| format!("read link {peer} in {}: {e}", node.display()))?;
        if let Some(host) = host
            && host.kind == "veth"
            && host.link == Some(l.index)
        {
            return Ok(Some((l.name, host)));
        }
    }
    Ok(None)
}

impl EbpfDriver {
    /// Load the datapath (pins under `cfg.pin_dir`) and read the state file.
    pub fn new(cfg: EbpfModeConfig) -> Result<EbpfDriver, DriverError> {
        let dp = Datapath::load(&DatapathConfig {
            pin_dir: cfg.pin_dir.clone(),
            pod_capacity: cfg.pod_capacity,
            attach: cfg.attach,
        })
        .map_err(|e| {
            drv(format!(
                "load datapath (pin dir {}): {e}",
                cfg.pin_dir.display()
            ))
        })?;
        let state = load_state(&cfg.state_file).map_err(drv)?;
        let mut d = EbpfDriver {
            cfg,
            dp,
            state,
            dirty: false,
            ztunnel: None,
            prepared: BTreeMap::new(),
            found: std::collections::HashMap::new(),
        };
        d.set_host_ips()?;
        Ok(d)
    }

    /// The loaded datapath (status, tests).
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// The recorded state.
    pub fn state(&self) -> &EbpfState {
        &self.state
    }

    fn save(&mut self) -> Result<(), DriverError> {
        if !self.dirty {
            return Ok(());
        }
        let path = &self.cfg.state_file;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| drv(format!("create {}: {e}", dir.display())))?;
        }
        let text = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| drv(format!("encode state: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| drv(format!("write {}: {e}", tmp.display())))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| drv(format!("sync {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            drv(format!(
                "rename {} to {}: {e}",
                tmp.display(),
                path.display()
            ))
        })?;
        self.dirty = false;
        Ok(())
    }

    /// The node's own addresses are never steered (kubelet probes reach pods directly).
    fn set_host_ips(&mut self) -> Result<(), DriverError> {
        let mut nl = Netlink::open(&self.cfg.node_netns).map_err(drv)?;
        let mut ips: Vec<IpAddr> = nl
            .addresses()
            .map_err(drv)?
            .into_iter()
            .map(|a| a.addr)
            .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
            .collect();
        ips.sort();
        ips.dedup();
        if ips.len() > meshcni_ebpf::maps::HOST_IPS_CAPACITY {
            tracing::warn!(
                addresses = ips.len(),
                kept = meshcni_ebpf::maps::HOST_IPS_CAPACITY,
                "the node has more addresses than the host-address map holds; traffic from the others to enrolled pods goes through ztunnel"
            );
            ips.truncate(meshcni_ebpf::maps::HOST_IPS_CAPACITY);
        }
        self.dp.set_host_ips(&ips).map_err(drv)
    }

    fn find_netns(&self, uid: &str, ips: &[IpAddr]) -> Result<Option<File>, String> {
        let finder = NetnsFinder::new(&self.cfg.proc_root, self.cfg.netns_dirs.clone())
            .map_err(|e| format!("netns discovery: {e}"))?;
        let mut hits = finder
            .find(&[PodNetnsQuery { uid, ips }])
            .map_err(|e| format!("netns discovery: {e}"))?;
        Ok(hits.remove(uid).map(|h| h.file))
    }

    fn enroll(
        &mut self,
        pod: &PodId,
        ips: &[IpAddr],
        netns: Option<&Path>,
    ) -> Result<(), DriverError> {
        let result = self.enroll_inner(pod, ips, netns);
        if let Some(recorded) = self.prepared.remove(&pod.uid)
            && result.is_err()
        {
            self.undo_prepared(&pod.uid, &recorded)?;
        }
        result
    }

    fn enroll_inner(
        &mut self,
        pod: &PodId,
        ips: &[IpAddr],
        netns: Option<&Path>,
    ) -> Result<(), DriverError> {
        if ips.is_empty() {
            return Err(pod_err(pod, "no IP address to enroll"));
        }
        for ip in ips {
            if let Some(owner) = self.state.owners.get(ip)
                && owner != &pod.uid
            {
                return Err(pod_err(
                    pod,
                    format!("IP {ip} is already enrolled for pod uid {owner}"),
                ));
            }
        }
        let held;
        let ns_path: PathBuf = match netns {
            Some(p) => p.to_path_buf(),
            None => {
                held = match self.found.remove(&pod.uid) {
                    Some(f) => Some(f),
                    None => self
                        .find_netns(&pod.uid, ips)
                        .map_err(|e| pod_err(pod, e))?,
                };
                match &held {
                    Some(f) => fd_path(f),
                    None => {
                        return Err(pod_err(
                            pod,
                            format!(
                                "its netns was not found (no process of the pod in {}, no netns holding {ips:?} in {:?})",
                                self.cfg.proc_root.display(),
                                self.cfg.netns_dirs
                            ),
                        ));
                    }
                }
            }
        };
        let (inner, host) = veth_pair(&self.cfg.node_netns, &ns_path)
            .map_err(|e| pod_err(pod, e))?
            .ok_or_else(|| {
                pod_err(
                    pod,
                    format!(
                        "netns {} has no veth whose peer is in node netns {}",
                        ns_path.display(),
                        self.cfg.node_netns.display()
                    ),
                )
            })?;
        let mac = meshcni_ebpf::mac_in(&ns_path, &inner).map_err(|e| pod_err(pod, e))?;
        self.dp
            .attach_pod(&self.cfg.node_netns, &host.name)
            .map_err(|e| pod_err(pod, e))?;
        if self.state.veths.get(&pod.uid) != Some(&host.index) {
            self.state.veths.insert(pod.uid.clone(), host.index);
            self.dirty = true;
        }
        let entry = PodEntry {
            host_ifindex: host.index,
            mac,
            dns_capture: self.cfg.dns_capture,
        };
        for ip in ips {
            // The owner is on disk before the address is in the map (see module docs).
            if self.state.owners.get(ip) != Some(&pod.uid) {
                self.state.owners.insert(*ip, pod.uid.clone());
                self.dirty = true;
            }
        }
        self.save()?;
        for ip in ips {
            self.dp.set_pod(*ip, entry).map_err(|e| pod_err(pod, e))?;
        }
        Ok(())
    }

    /// Every address in the pod map.
    fn map_addresses(&self) -> Result<Vec<IpAddr>, DriverError> {
        Ok(self
            .dp
            .pods()
            .map_err(drv)?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Take back what `prepare` did for a pod whose enroll failed or did not come this pass:
    /// the owners of its addresses that are not in the map and, if its veth record is still
    /// the one `prepare` wrote and no address of it is in the map, its programs and record.
    fn undo_prepared(&mut self, uid: &str, recorded: &[IpAddr]) -> Result<(), DriverError> {
        let in_map: std::collections::BTreeSet<IpAddr> =
            self.map_addresses()?.into_iter().collect();
        for ip in recorded {
            if !in_map.contains(ip) && self.state.owners.get(ip).is_some_and(|o| o == uid) {
                self.state.owners.remove(ip);
                self.dirty = true;
            }
        }
        let holds_any = self
            .state
            .owners
            .iter()
            .any(|(ip, o)| o == uid && in_map.contains(ip));
        if !holds_any {
            self.forget_veth(&PodId::new(uid, "", ""))?;
        }
        self.save()
    }

    /// The part of a pass's enrolls that does not depend on the order they are applied in,
    /// done for all of them at once: netns discovery (one scan), the pod programs attached
    /// from one thread in the node netns, and the owners and veths recorded with one
    /// state-file write. `enroll` then finds the programs running (no link change) and the records
    /// written, and only adds the map entries. Pods whose addresses another pod owns, and
    /// pods already attached, are left to their own enroll.
    fn prepare_enrolls(&mut self, actions: &[Action]) -> Result<(), DriverError> {
        self.found.clear();
        // Leftovers of an earlier pass whose enroll never came (deferred, or the pass ended).
        let stale: Vec<(String, Vec<IpAddr>)> =
            std::mem::take(&mut self.prepared).into_iter().collect();
        for (uid, recorded) in stale {
            self.undo_prepared(&uid, &recorded)?;
        }
        let wanted: Vec<(&PodId, &[IpAddr], Option<&Path>)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Enroll {
                    pod, ips, netns, ..
                } => Some((
                    pod,
                    ips.as_slice(),
                    netns.as_ref().map(|n| n.path.as_path()),
                )),
                _ => None,
            })
            .filter(|(pod, ips, _)| {
                !ips.is_empty()
                    && !self.state.veths.contains_key(&pod.uid)
                    && ips
                        .iter()
                        .all(|ip| self.state.owners.get(ip).is_none_or(|o| o == &pod.uid))
            })
            .collect();
        // One pod (a CNI ADD): nothing to batch; its enroll does the same work.
        if wanted.len() < 2 {
            return Ok(());
        }
        let queries: Vec<PodNetnsQuery<'_>> = wanted
            .iter()
            .filter(|(_, _, netns)| netns.is_none())
            .map(|(pod, ips, _)| PodNetnsQuery { uid: &pod.uid, ips })
            .collect();
        if !queries.is_empty() {
            match NetnsFinder::new(&self.cfg.proc_root, self.cfg.netns_dirs.clone())
                .and_then(|f| f.find(&queries))
            {
                Ok(hits) => self
                    .found
                    .extend(hits.into_iter().map(|(uid, hit)| (uid, hit.file))),
                // Each pod's enroll looks again and reports what it finds.
                Err(e) => tracing::debug!(error = %e, "netns discovery for the pass failed"),
            }
        }
        let mut targets: Vec<(&PodId, &[IpAddr], LinkDetails)> = Vec::new();
        for (pod, ips, netns) in &wanted {
            let path = match netns {
                Some(p) => p.to_path_buf(),
                None => match self.found.get(&pod.uid) {
                    Some(f) => fd_path(f),
                    None => continue,
                },
            };
            if let Ok(Some((_, host))) = veth_pair(&self.cfg.node_netns, &path) {
                targets.push((pod, ips, host));
            }
        }
        let names: Vec<String> = targets.iter().map(|(_, _, h)| h.name.clone()).collect();
        let results = self
            .dp
            .attach_pods(&self.cfg.node_netns, &names)
            .map_err(drv)?;
        for ((pod, ips, host), result) in targets.into_iter().zip(results) {
            if let Err(e) = result {
                // The pod's enroll attaches again and reports the error for its pod.
                tracing::debug!(pod = %pod, error = %e, "attach ahead of the enroll failed");
                continue;
            }
            self.state.veths.insert(pod.uid.clone(), host.index);
            let mut recorded = Vec::new();
            for ip in ips {
                if self.state.owners.get(ip) != Some(&pod.uid) {
                    self.state.owners.insert(*ip, pod.uid.clone());
                    recorded.push(*ip);
                }
            }
            self.prepared.insert(pod.uid.clone(), recorded);
            self.dirty = true;
        }
        self.save()
    }

    fn release_ips(&mut self, pod: &PodId, ips: &[IpAddr]) -> Result<(), DriverError> {
        for ip in ips {
            if let Some(owner) = self.state.owners.get(ip)
                && owner != &pod.uid
                && !owner.starts_with("unknown-")
            {
                continue; // another pod holds it now
            }
            self.dp.remove_pod(*ip).map_err(|e| pod_err(pod, e))?;
            if self.state.owners.remove(ip).is_some() {
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// After a release of the whole pod: detach its programs from its host veth (a pod that
    /// left the mesh but runs on keeps nothing of ours) and remove the link pins — unless an
    /// enrolled pod holds that ifindex now (a reused index).
    fn forget_veth(&mut self, pod: &PodId) -> Result<(), DriverError> {
        let Some(ifindex) = self.state.veths.remove(&pod.uid) else {
            return Ok(());
        };
        if !self.state.veths.values().any(|ix| *ix == ifindex) {
            self.dp
                .detach_pod(&self.cfg.node_netns, ifindex)
                .map_err(|e| pod_err(pod, e))?;
        }
        self.dirty = true;
        Ok(())
    }

    /// Start-up / resync: pod programs of pods that hold no address in the map any more (a
    /// release cut short after the map, or an enroll cut short before it) are detached and
    /// their records dropped; attachments on node veths no record names are detached too.
    fn prune_attachments(
        &mut self,
        enrolled: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Result<(), DriverError> {
        let stale: Vec<String> = self
            .state
            .veths
            .keys()
            .filter(|uid| !enrolled.contains_key(*uid))
            .cloned()
            .collect();
        for uid in stale {
            self.forget_veth(&PodId::new(&uid, "", ""))?;
        }
        let held: std::collections::BTreeSet<u32> = self.state.veths.values().copied().collect();
        let Some(pinned) = meshcni_ebpf::inspect(&self.cfg.pin_dir).map_err(drv)? else {
            return Ok(());
        };
        let node_ino = meshcni_ebpf::netns_inode_of(&self.cfg.node_netns).map_err(drv)?;
        for a in pinned.attachments {
            if a.netns_inode == node_ino
                && matches!(a.hook, Hook::PodIngress | Hook::PodEgress)
                && !held.contains(&a.ifindex)
            {
                tracing::warn!(pin = %a.path.display(), "pod program attached to a veth no enrolled pod holds (an enroll or release was cut short); detaching");
                self.dp
                    .detach(&self.cfg.node_netns, a.ifindex, a.hook)
                    .map_err(drv)?;
            }
        }
        Ok(())
    }

    fn resolve_ztunnel(&self, z: &ZtunnelInfo) -> Result<Ztunnel, DriverError> {
        let (file, netns) = match z.annotations.get(ZTUNNEL_NETNS_ANNOTATION) {
            Some(p) => (None, PathBuf::from(p)),
            None => {
                let f = self
                    .find_netns(&z.pod.uid, &z.ips)
                    .map_err(drv)?
                    .ok_or_else(|| {
                        drv(format!(
                            "netns of ztunnel {} ({:?}) not found in {} or {:?}",
                            z.pod,
                            z.ips,
                            self.cfg.proc_root.display(),
                            self.cfg.netns_dirs
                        ))
                    })?;
                let p = fd_path(&f);
                (Some(f), p)
            }
        };
        let (eth, _) = veth_pair(&self.cfg.node_netns, &netns)
            .map_err(drv)?
            .ok_or_else(|| {
                drv(format!(
                    "ztunnel {} netns {} has no veth whose peer is in node netns {}",
                    z.pod,
                    netns.display(),
                    self.cfg.node_netns.display()
                ))
            })?;
        let found = match &file {
            None => None,
            Some(f) => {
                let id = meshcni_netx::podns::netns_id_of_fd(f.as_fd())
                    .map_err(|e| drv(format!("identity of ztunnel {} netns: {e}", z.pod)))?;
                Some(FoundZtunnel {
                    uid: z.pod.uid.clone(),
                    ips: z.ips.clone(),
                    dev: id.dev,
                    ino: id.ino,
                    eth: eth.clone(),
                })
            }
        };
        Ok(Ztunnel {
            _file: file,
            netns,
            eth,
            found,
        })
    }

    /// The recorded scanned ztunnel netns, found again (same UID/IPs scan) and verified to be
    /// the same netns; `None` when it is gone (with its pod) or is another netns now.
    fn refind_ztunnel(&self, rec: &FoundZtunnel) -> Result<Option<(File, PathBuf)>, DriverError> {
        let Some(file) = self.find_netns(&rec.uid, &rec.ips).map_err(drv)? else {
            tracing::info!(uid = rec.uid, ips = ?rec.ips, "the recorded ztunnel netns is gone (nothing of ours left there)");
            return Ok(None);
        };
        let id = meshcni_netx::podns::netns_id_of_fd(file.as_fd())
            .map_err(|e| drv(format!("identity of the ztunnel netns found again: {e}")))?;
        if (id.dev, id.ino) != (rec.dev, rec.ino) {
            tracing::info!(
                uid = rec.uid,
                "the ztunnel pod's netns found now is not the recorded one; leaving it alone"
            );
            return Ok(None);
        }
        let path = fd_path(&file);
        Ok(Some((file, path)))
    }

    fn install_ztunnel(&mut self, z: &ZtunnelInfo) -> Result<(), DriverError> {
        let zt = self.resolve_ztunnel(z)?;
        let (_, host) = veth_pair(&self.cfg.node_netns, &zt.netns)
            .map_err(drv)?
            .ok_or_else(|| drv(format!("ztunnel {} veth vanished", z.pod)))?;
        // A previous ztunnel's netns that still exists: undo our routing there (best effort:
        // it is usually gone with its pod).
        if let Some(old) = self.ztunnel.take()
            && old.netns != zt.netns
            && old.netns.exists()
            && let Err(e) = self.dp.detach_ztunnel_netns(&old.netns, &old.eth)
        {
            tracing::warn!(netns = %old.netns.display(), error = %e, "could not detach the previous ztunnel netns");
        }
        self.dp
            .attach_ztunnel_netns(&zt.netns, &zt.eth)
            .map_err(drv)?;
        self.dp
            .attach(&self.cfg.node_netns, &host.name, Hook::ZtunnelHost)
            .map_err(drv)?;
        let entry = ZtunnelEntry {
            host_ifindex: host.index,
            mac: meshcni_ebpf::mac_in(&zt.netns, &zt.eth).map_err(drv)?,
            host_mac: meshcni_ebpf::mac_in(&self.cfg.node_netns, &host.name).map_err(drv)?,
            ip4: z.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            ip6: z.ips.iter().find_map(|ip| match ip {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
        };
        self.dp.set_ztunnel(Some(entry)).map_err(drv)?;
        // A stable path is recorded as is; a scanned netns (whose fd path dies with us) as
        // what finds it again.
        let record = zt
            ._file
            .is_none()
            .then(|| (zt.netns.clone(), zt.eth.clone()));
        if self.state.ztunnel_netns != record || self.state.ztunnel_found != zt.found {
            self.state.ztunnel_netns = record;
            self.state.ztunnel_found = zt.found.clone();
            self.dirty = true;
            self.save()?;
        }
        tracing::info!(ztunnel = %z.pod, netns = %zt.netns.display(), veth = host.name, "ambient ebpf mode redirects to ztunnel");
        self.ztunnel = Some(zt);
        Ok(())
    }
}

/// The driver's state file (`Default` when absent).
fn load_state(path: &Path) -> Result<EbpfState, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("state file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EbpfState::default()),
        Err(e) => Err(format!("read state file {}: {e}", path.display())),
    }
}

/// What the driver left on the node, read without loading anything (`doctor`).
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Recorded owners (state file): address → pod UID.
    pub owners: BTreeMap<IpAddr, String>,
    /// The pod map.
    pub map: BTreeMap<IpAddr, PodEntry>,
    /// Host veths (node netns ifindex) with both pod programs attached.
    pub attached: std::collections::BTreeSet<u32>,
    /// Every difference from what install and enrollment write (leaks included).
    pub problems: Vec<String>,
}

/// Read-only (`doctor`): the pinned maps and links under the pin dir and the state file,
/// compared with what [`EbpfDriver`] writes: the three maps pinned; every map entry has its
/// owner recorded and every recorded owner's address is in the map, pointing at the veth the
/// pod's programs are attached to; both pod programs attached (link pin or clsact record)
/// exactly on each recorded pod veth, no attachment of a veth no pod holds or that is gone;
/// a ztunnel entry while pods are enrolled.
pub fn inspect_node(cfg: &EbpfModeConfig) -> Result<NodeView, String> {
    use meshcni_ebpf::Hook;
    let state = load_state(&cfg.state_file)?;
    let mut v = NodeView {
        owners: state.owners.clone(),
        ..NodeView::default()
    };
    let Some(pinned) = meshcni_ebpf::inspect(&cfg.pin_dir)
        .map_err(|e| format!("reading pin dir {}: {e}", cfg.pin_dir.display()))?
    else {
        v.problems.push(format!(
            "pin dir {} missing: the datapath is not loaded",
            cfg.pin_dir.display()
        ));
        return Ok(v);
    };
    for m in [
        meshcni_ebpf::maps::PODS_MAP,
        meshcni_ebpf::maps::ZTUNNEL_MAP,
        meshcni_ebpf::maps::HOST_IPS_MAP,
    ] {
        if !pinned.maps.iter().any(|p| p == m) {
            v.problems.push(format!("map {m} not pinned"));
        }
    }
    v.map = pinned.pods.iter().copied().collect();
    for (ip, entry) in &v.map {
        match state.owners.get(ip) {
            None => v
                .problems
                .push(format!("map entry {ip} has no recorded owner (leak)")),
            Some(uid) => match state.veths.get(uid) {
                Some(ix) if *ix == entry.host_ifindex => {}
                other => v.problems.push(format!(
                    "map entry {ip} (pod uid {uid}) points at ifindex {}, the pod's veth is {other:?}",
                    entry.host_ifindex
                )),
            },
        }
    }
    for (ip, uid) in &state.owners {
        if !v.map.contains_key(ip) {
            v.problems.push(format!(
                "owner of {ip} (pod uid {uid}) recorded, address not in the map (stale record)"
            ));
        }
    }
    let node_ino = meshcni_ebpf::netns_inode_of(&cfg.node_netns)
        .map_err(|e| format!("node netns {}: {e}", cfg.node_netns.display()))?;
    let mut hooks: BTreeMap<u32, Vec<Hook>> = BTreeMap::new();
    for a in &pinned.attachments {
        if a.netns_inode != node_ino || !matches!(a.hook, Hook::PodIngress | Hook::PodEgress) {
            continue;
        }
        if a.live_ifindex != a.ifindex {
            v.problems.push(format!(
                "{} is attached to a device that is gone (stale pin)",
                a.path.display()
            ));
            continue;
        }
        hooks.entry(a.ifindex).or_default().push(a.hook);
    }
    let held: std::collections::BTreeSet<u32> = state.veths.values().copied().collect();
    for (ix, hs) in &hooks {
        if !held.contains(ix) {
            v.problems.push(format!(
                "pod programs attached to ifindex {ix}, which no enrolled pod holds (leak)"
            ));
        }
        if hs.contains(&Hook::PodIngress) && hs.contains(&Hook::PodEgress) {
            v.attached.insert(*ix);
        }
    }
    for (uid, ix) in &state.veths {
        if !v.attached.contains(ix) {
            v.problems.push(format!(
                "pod uid {uid}: pod programs not both attached to its veth (ifindex {ix})"
            ));
        }
    }
    if !v.map.is_empty() && pinned.ztunnel.is_none() {
        v.problems.push(
            "pods enrolled but no ztunnel in the map: their TCP is dropped (fail closed)".into(),
        );
    }
    Ok(v)
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

impl RedirectDriver for EbpfDriver {
    fn name(&self) -> &str {
        "ebpf"
    }

    /// IPv4 always, IPv6 unless `AMBIENT_IPV6=false`.
    fn handles(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() || self.cfg.enable_ipv6
    }

    /// Every address of the map, grouped by its recorded owner.
    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        // Before anything is attached: an earlier agent's attachments of the other kind
        // (`--ambient-ebpf-attach` changed) would double our programs. Not at `new`: an
        // uninstall with either setting must still work.
        self.dp.check_attach_kind().map_err(drv)?;
        let mut by_uid: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        let in_map = self.map_addresses()?;
        for ip in &in_map {
            let uid = self
                .state
                .owners
                .get(ip)
                .cloned()
                .unwrap_or_else(|| format!("unknown-{ip}"));
            by_uid.entry(uid).or_default().push(*ip);
        }
        // Owners recorded for addresses that never reached the map (an enroll cut short).
        let before = self.state.owners.len();
        self.state.owners.retain(|ip, _| in_map.contains(ip));
        if self.state.owners.len() != before {
            self.dirty = true;
        }
        self.prune_attachments(&by_uid)?;
        let mut state = EnrolledState::default();
        for (uid, mut ips) in by_uid {
            ips.sort();
            ips.dedup();
            state.insert(PodId::new(&uid, "", ""), ips);
        }
        Ok(state)
    }

    fn prepare(&mut self, actions: &[Action]) -> Result<(), DriverError> {
        self.prepare_enrolls(actions)
    }

    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        match action {
            Action::Enroll {
                pod, ips, netns, ..
            } => self.enroll(pod, ips, netns.as_ref().map(|n| n.path.as_path())),
            Action::UpdateIps {
                pod,
                old,
                new,
                netns,
            } => {
                let gone: Vec<IpAddr> =
                    old.iter().filter(|ip| !new.contains(ip)).copied().collect();
                self.release_ips(pod, &gone)?;
                self.enroll(pod, new, netns.as_ref().map(|n| n.path.as_path()))
            }
            Action::Release { pod, ips } => {
                self.release_ips(pod, ips)?;
                self.forget_veth(pod)
            }
        }
    }

    fn flush(&mut self) -> Result<(), DriverError> {
        self.save()
    }

    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        match ztunnel {
            Some(z) => {
                self.set_host_ips()?;
                self.install_ztunnel(z)
            }
            None => {
                tracing::warn!(
                    "no ready ztunnel: enrolled pods' TCP is dropped until a ztunnel is ready (fail closed)"
                );
                self.dp.set_ztunnel(None).map_err(drv)
            }
        }
    }

    fn uninstall(&mut self) -> Result<(), DriverError> {
        let mut netns: Vec<PathBuf> = vec![self.cfg.node_netns.clone()];
        // Held open while we work in it (a refound netns's path is its fd's).
        let mut _held: Option<File> = None;
        let zt = match (&self.ztunnel, &self.state.ztunnel_found) {
            (Some(z), _) => Some((z.netns.clone(), z.eth.clone())),
            (None, Some(rec)) => {
                let rec = rec.clone();
                self.refind_ztunnel(&rec)?.map(|(file, path)| {
                    _held = Some(file);
                    (path, rec.eth)
                })
            }
            (None, None) => self.state.ztunnel_netns.clone(),
        };
        if let Some((zns, eth)) = zt
            && zns.exists()
        {
            self.dp.detach_ztunnel_netns(&zns, &eth).map_err(drv)?;
            netns.push(zns);
        }
        let refs: Vec<&Path> = netns.iter().map(PathBuf::as_path).collect();
        let report = meshcni_ebpf::uninstall(&self.cfg.pin_dir, &refs).map_err(drv)?;
        tracing::info!(
            links = report.links,
            filters = report.filters,
            maps = report.maps,
            "ebpf mode uninstalled"
        );
        match std::fs::remove_file(&self.cfg.state_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(drv(format!(
                    "remove {}: {e}",
                    self.cfg.state_file.display()
                )));
            }
        }
        self.state = EbpfState::default();
        self.ztunnel = None;
        self.dirty = false;
        Ok(())
    }
}
