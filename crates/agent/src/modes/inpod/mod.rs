//! Redirect mode `inpod` (Istio ≥ 1.21, the only mode ztunnel ≥ 1.23 speaks; spec §7): the
//! agent writes a small rule set inside each ambient pod's own netns (REDIRECT to ztunnel's
//! 15001/15006, DNS to 15053, ztunnel's own packets — mark 0x539 — exempt) and hands the
//! netns to ztunnel over ZDS, so ztunnel opens its listeners inside the pod. The node's netns
//! gets only the kubelet health-probe SNAT (ipsets of enrolled pod IPs + one rule).
//!
//! Per pod, [`RedirectDriver::apply`] of an `Enroll`:
//! 1. opens the sandbox netns (the path from the CNI ADD, checked against the identity the
//!    loop took when the ADD arrived; or, for a running pod enrolled by a label change, found by
//!    [`meshcni_netx::podns::NetnsFinder`]: procfs cgroup → pod UID, verified by the pod's IP,
//!    else a netns in `--netns-dir` holding the pod's IP);
//! 2. applies the in-pod rules there (verify-or-repair: identical → nothing run; atomic);
//! 3. adds the pod's IPs to the host-probe sets;
//! 4. sends `AddWorkload` with the netns fd to the newest ztunnel connection and waits for its
//!    ack. With no ztunnel connected, 2 and 3 are skipped; a nack or a timeout undoes 2 and 3 for
//!    a pod that was not captured before (nothing is left in the pod; rules found already in
//!    place stay: the pod stays fail-closed) and fails the action with the cause — the CNI
//!    ADD waiting for it fails closed with that message.
//!
//! The driver holds each enrolled pod's netns open (the fd ztunnel gets a copy of), records
//! the pods in a state file in the run dir (uid, name, namespace, service account, IPs, netns
//! path and identity, annotations), and on start-up rebuilds its view from it: each pod's
//! netns is found again (recorded path if it still names the same netns, else procfs/netns-dir
//! discovery), its rules are re-verified (`AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`), and it is
//! registered with the ZDS server *before* the server accepts connections, so the snapshot a
//! reconnecting ztunnel receives is complete. Pods whose netns is gone are dropped.
//!
//! The ZDS server's connects and disconnects reach the loop as
//! [`DriverEvent::ZtunnelChanged`] (ztunnel is "whoever is connected to our socket" here);
//! pods nacked during a snapshot replay as [`DriverEvent::PodLost`].

pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshcni_netx::inpod::{HostProbe, InpodBackend, apply_inpod, check_inpod, remove_inpod};
use meshcni_netx::podns::{NetnsFinder, PodNetnsQuery};
use meshcni_rules::inpod::{InpodConfig, PodOverrides};
use meshcni_zds::{WorkloadInfo, ZdsEvent, ZdsOptions, ZdsServer};
use tracing::{debug, info, warn};

use crate::enroll::{Action, EnrolledPod, EnrolledState, NetnsId, PodId, PodNetns};
use crate::seam::{
    DriverError, DriverEvent, DriverEvents, RedirectDriver, ZtunnelInfo, ZtunnelSource,
};
pub use state::{InpodState, PodRecord};

/// Everything the in-pod mode needs (from the agent's flags, see `modes::make_driver`).
#[derive(Debug, Clone)]
pub struct InpodModeConfig {
    /// The ZDS socket ztunnel connects to (`ZTUNNEL_UDS_ADDRESS`).
    pub zds_socket: PathBuf,
    /// DNS capture, IPv6, probe SNAT addresses (node-wide; pods override by annotation).
    pub rules: InpodConfig,
    /// iptables (legacy/nft detected per netns) or native nftables (`NATIVE_NFTABLES`).
    pub backend: InpodBackend,
    /// Where the driver records its pods (a hostPath run dir, like the plugin's socket).
    pub state_file: PathBuf,
    /// procfs to scan for pod processes (the host's `/proc`, as mounted into the agent).
    pub proc_root: PathBuf,
    /// Directories of netns bind mounts to search by pod IP when procfs has no answer.
    pub netns_dirs: Vec<PathBuf>,
    /// The node's netns, where the host-probe SNAT goes (the agent's own: hostNetwork).
    pub node_netns: PathBuf,
    /// Re-verify (and repair) every adopted pod's rules at start-up.
    pub reconcile_on_startup: bool,
    /// How long an `AddWorkload` waits for ztunnel's ack. Stays well under the plugin's 5 s.
    pub ack_timeout: Duration,
    /// The kubelet's UID for the nftables host-probe rule (`None`: found in `proc_root`).
    pub kubelet_uid: Option<u32>,
    /// Least time between two verifications of the host-probe SNAT rule and sets in the node
    /// netns by `actual()` (a third party may flush them). `actual()` runs at every resync and
    /// after failed passes; this keeps a burst of failing passes from re-reading the node's
    /// rules each time.
    pub host_rules_check_interval: Duration,
}

impl Default for InpodModeConfig {
    fn default() -> Self {
        InpodModeConfig {
            zds_socket: PathBuf::from("/var/run/ztunnel/ztunnel.sock"),
            rules: InpodConfig::default(),
            backend: InpodBackend::Iptables,
            state_file: PathBuf::from("/var/run/meshcni/inpod-mode.json"),
            proc_root: PathBuf::from("/proc"),
            netns_dirs: vec![PathBuf::from("/var/run/netns")],
            node_netns: PathBuf::from("/proc/self/ns/net"),
            reconcile_on_startup: true,
            ack_timeout: Duration::from_secs(3),
            kubelet_uid: None,
            host_rules_check_interval: Duration::from_secs(10),
        }
    }
}

/// One enrolled pod as the driver holds it.
#[derive(Debug)]
struct HeldPod {
    record: PodRecord,
    /// The open netns (keeps it alive and is what ztunnel gets a copy of).
    netns: File,
}

impl HeldPod {
    fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.netns.as_raw_fd()))
    }

    fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.record.name.clone(),
            namespace: self.record.namespace.clone(),
            service_account: self.record.service_account.clone(),
        }
    }
}

/// What the ZDS callbacks share with the driver.
#[derive(Default)]
struct ProxyView {
    events: Option<DriverEvents>,
    /// Connections that said Hello: id → peer pid.
    connected: BTreeMap<u64, Option<i32>>,
    /// Connections that completed their snapshot: id → peer pid.
    ready: BTreeMap<u64, Option<i32>>,
    /// Pods ztunnel refused in a snapshot replay (dropped at the next `actual()`).
    lost: BTreeSet<String>,
}

impl ProxyView {
    fn current(&self) -> Option<ZtunnelInfo> {
        let (conn, pid) = self.ready.iter().next_back()?;
        let who = match pid {
            Some(p) => format!("ZDS connection {conn} (pid {p})"),
            None => format!("ZDS connection {conn}"),
        };
        Some(ZtunnelInfo {
            pod: PodId::new("", "", &who),
            ips: Vec::new(),
            created: String::new(),
            annotations: BTreeMap::new(),
        })
    }

    fn tell(&self, ev: DriverEvent) {
        if let Some(e) = &self.events {
            e.send(ev);
        }
    }
}

/// The in-pod redirect driver.
pub struct InpodDriver {
    cfg: InpodModeConfig,
    pods: BTreeMap<String, HeldPod>,
    view: Arc<Mutex<ProxyView>>,
    zds: Option<ZdsServer>,
    host: Option<HostProbe>,
    /// When the host-probe rules were last verified (see `host_rules_check_interval`).
    host_checked: Option<Instant>,
    /// `actual()` ran once (state adopted, ZDS serving).
    started: bool,
    /// Netns found for this pass's enrollments without a CNI netns, in one search
    /// (`prepare`): uid → (the addresses searched for, the open netns).
    prefound: BTreeMap<String, (Vec<IpAddr>, File)>,
    /// An enrollment not yet in the state file ([`RedirectDriver::flush`] writes it once the
    /// loop has answered the ADD waiting for it).
    dirty: bool,
}

fn pod_err(pod: &PodId, what: impl std::fmt::Display) -> DriverError {
    DriverError::pod(format!("inpod mode: pod {pod}: {what}"))
}

fn drv(what: impl std::fmt::Display) -> DriverError {
    DriverError::driver(format!("inpod mode: {what}"))
}

/// The identity of an open netns; an error if the file is not a network namespace.
fn netns_id_of(f: &File) -> Result<NetnsId, meshcni_netx::NetxError> {
    meshcni_netx::podns::netns_id_of_fd(f.as_fd())
}

impl InpodDriver {
    /// A driver for `cfg`. Reads the state file; touches nothing else (the ZDS server starts
    /// at the first `actual()`, once the recorded pods are registered).
    pub fn new(cfg: InpodModeConfig) -> Result<InpodDriver, DriverError> {
        // Validate the state file now: a corrupt one is a start-up error, not a silent reset.
        InpodState::load(&cfg.state_file).map_err(drv)?;
        Ok(InpodDriver {
            cfg,
            pods: BTreeMap::new(),
            view: Arc::new(Mutex::new(ProxyView::default())),
            zds: None,
            host: None,
            host_checked: None,
            started: false,
            prefound: BTreeMap::new(),
            dirty: false,
        })
    }

    fn view(&self) -> std::sync::MutexGuard<'_, ProxyView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pods the driver holds (uid → record), for tests and diagnostics.
    pub fn held(&self) -> BTreeMap<String, PodRecord> {
        self.pods
            .iter()
            .map(|(u, p)| (u.clone(), p.record.clone()))
            .collect()
    }

    fn host(&mut self) -> Result<&mut HostProbe, DriverError> {
        if self.host.is_none() {
            let kubelet_uid = match self.cfg.backend {
                InpodBackend::Nftables => Some(
                    self.cfg
                        .kubelet_uid
                        .or_else(|| {
                            meshcni_netx::inpod::find_kubelet_uid(&self.cfg.proc_root)
                                .ok()
                                .flatten()
                        })
                        .ok_or_else(|| {
                            drv(format!(
                                "the nftables host-probe rule matches the kubelet's UID, and no \
                                 kubelet/kubelite/k3s process was found in {}",
                                self.cfg.proc_root.display()
                            ))
                        })?,
                ),
                InpodBackend::Iptables => None,
            };
            let mut h = HostProbe::open(
                &self.cfg.node_netns,
                &self.cfg.rules,
                self.cfg.backend,
                kubelet_uid,
            )
            .map_err(|e| drv(format!("host-probe SNAT in the node netns: {e}")))?;
            h.ensure_rules()
                .map_err(|e| drv(format!("host-probe SNAT rules in the node netns: {e}")))?;
            self.host = Some(h);
            self.host_checked = Some(Instant::now());
        }
        self.host
            .as_mut()
            .ok_or_else(|| drv("host-probe SNAT not available"))
    }

    fn save(&mut self) -> Result<(), DriverError> {
        let state = InpodState {
            pods: self
                .pods
                .iter()
                .map(|(u, p)| (u.clone(), p.record.clone()))
                .collect(),
        };
        state.save(&self.cfg.state_file).map_err(drv)?;
        self.dirty = false;
        Ok(())
    }

    fn start_zds(&mut self) -> Result<(), DriverError> {
        if self.zds.is_some() {
            return Ok(());
        }
        let view = Arc::clone(&self.view);
        let on_event = Box::new(move |ev: ZdsEvent| {
            let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
            match ev {
                ZdsEvent::Connected { conn, peer_pid } => {
                    info!(conn, ?peer_pid, "ztunnel connected to the ZDS socket");
                    v.connected.insert(conn, peer_pid);
                }
                ZdsEvent::SnapshotSent { conn, nacked } => {
                    // The snapshot is what makes a connection usable (ztunnel is not ready
                    // before it): only now is it "the" ztunnel.
                    let pid = v.connected.get(&conn).copied().flatten();
                    v.ready.insert(conn, pid);
                    for (uid, why) in nacked {
                        warn!(conn, uid = %uid, error = %why, "ztunnel refused a pod in its snapshot");
                        v.lost.insert(uid.clone());
                        v.tell(DriverEvent::PodLost { uid, reason: why });
                    }
                    info!(conn, "ztunnel received its snapshot");
                    let cur = v.current();
                    v.tell(DriverEvent::ZtunnelChanged(cur));
                }
                ZdsEvent::Disconnected { conn, reason } => {
                    info!(conn, %reason, "ztunnel connection closed");
                    v.connected.remove(&conn);
                    if v.ready.remove(&conn).is_some() {
                        let cur = v.current();
                        v.tell(DriverEvent::ZtunnelChanged(cur));
                    }
                }
            }
        });
        let opts = ZdsOptions {
            ack_timeout: self.cfg.ack_timeout,
            ..ZdsOptions::default()
        };
        let server = ZdsServer::start(&self.cfg.zds_socket, opts, on_event).map_err(|e| {
            drv(format!(
                "ZDS server on {}: {e}",
                self.cfg.zds_socket.display()
            ))
        })?;
        info!(socket = %self.cfg.zds_socket.display(), "ZDS server listening");
        self.zds = Some(server);
        Ok(())
    }

    /// Start-up: adopt the pods of the state file whose netns can be found, re-verify their
    /// rules, register them for ztunnel's snapshot, then start serving ZDS.
    fn adopt(&mut self) -> Result<(), DriverError> {
        self.adopt_with(true)
    }

    /// [`InpodDriver::adopt`]; without `serve` (an uninstall by a fresh process) only the pods
    /// and their netns are taken over: no rule re-verification, no probe pruning, no ZDS.
    fn adopt_with(&mut self, serve: bool) -> Result<(), DriverError> {
        let state = InpodState::load(&self.cfg.state_file).map_err(drv)?;
        let mut missing: Vec<(&String, &PodRecord)> = Vec::new();
        let mut found: BTreeMap<String, File> = BTreeMap::new();
        for (uid, r) in &state.pods {
            // The recorded path first, if it still names the same netns.
            let same = File::open(&r.netns_path)
                .ok()
                .filter(|f| netns_id_of(f).is_ok_and(|id| id == r.netns_id));
            match same {
                Some(f) => {
                    found.insert(uid.clone(), f);
                }
                None => missing.push((uid, r)),
            }
        }
        if !missing.is_empty() {
            let finder = NetnsFinder::new(&self.cfg.proc_root, self.cfg.netns_dirs.clone())
                .map_err(|e| drv(format!("netns discovery: {e}")))?;
            let queries: Vec<PodNetnsQuery<'_>> = missing
                .iter()
                .map(|(uid, r)| PodNetnsQuery {
                    uid: uid.as_str(),
                    ips: &r.ips,
                })
                .collect();
            let hits = finder
                .find(&queries)
                .map_err(|e| drv(format!("netns discovery: {e}")))?;
            for (uid, hit) in hits {
                info!(uid = %uid, source = %hit.source, "found the netns of an enrolled pod again");
                found.insert(uid, hit.file);
            }
        }
        let mut dropped = 0usize;
        for (uid, mut record) in state.pods {
            let Some(netns) = found.remove(&uid) else {
                info!(uid = %uid, pod = %record.key(), "enrolled pod's netns is gone; forgetting it");
                dropped += 1;
                continue;
            };
            if let Ok(id) = netns_id_of(&netns) {
                record.netns_id = id;
            }
            let held = HeldPod { record, netns };
            if serve && self.cfg.reconcile_on_startup {
                let overrides =
                    PodOverrides::from_annotations(&held.record.annotations).unwrap_or_default();
                if let Err(e) = apply_inpod(
                    &held.netns_path(),
                    &self.cfg.rules,
                    &overrides,
                    self.cfg.backend,
                ) {
                    warn!(uid = %uid, error = %e, "re-verifying an adopted pod's rules failed; it will be enrolled again");
                    continue;
                }
            }
            self.pods.insert(uid, held);
        }
        if !serve {
            return Ok(());
        }
        // The host-probe sets: exactly the adopted pods' IPs.
        let want: BTreeSet<(IpAddr, String)> = self
            .pods
            .iter()
            .flat_map(|(u, p)| p.record.ips.iter().map(move |ip| (*ip, u.clone())))
            .collect();
        let host = self.host()?;
        let have: BTreeSet<(IpAddr, String)> = host
            .entries()
            .map_err(|e| drv(format!("listing the host-probe sets: {e}")))?
            .into_iter()
            .collect();
        for (ip, uid) in have.difference(&want) {
            host.remove(uid, *ip)
                .map_err(|e| drv(format!("pruning host-probe entry {ip}: {e}")))?;
        }
        for (ip, uid) in want.difference(&have) {
            host.upsert(uid, *ip)
                .map_err(|e| drv(format!("host-probe entry {ip}: {e}")))?;
        }
        info!(
            adopted = self.pods.len(),
            dropped, "inpod mode adopted its enrolled pods"
        );
        if dropped > 0 {
            self.save()?;
        }
        // Register before serving: a reconnecting ztunnel must get the whole set.
        self.start_zds_with_registrations()
    }

    fn start_zds_with_registrations(&mut self) -> Result<(), DriverError> {
        self.start_zds()?;
        let zds = self
            .zds
            .as_ref()
            .ok_or_else(|| drv("ZDS server not running"))?;
        for (uid, p) in &self.pods {
            let fd = p
                .netns
                .try_clone()
                .map_err(|e| drv(format!("duplicating the netns fd of pod uid {uid}: {e}")))?;
            zds.register(uid, p.info(), Some(fd.into()));
        }
        Ok(())
    }

    /// Open the netns of an action: the CNI ADD's path (still the same netns) or a discovered
    /// one.
    fn open_netns(
        &mut self,
        pod: &PodId,
        ips: &[IpAddr],
        given: Option<&PodNetns>,
    ) -> Result<File, DriverError> {
        if let Some(n) = given {
            let f = File::open(&n.path).map_err(|e| {
                pod_err(pod, format!("opening its netns {}: {e}", n.path.display()))
            })?;
            let id = netns_id_of(&f)
                .map_err(|e| pod_err(pod, format!("stat of netns {}: {e}", n.path.display())))?;
            if id != n.id {
                return Err(pod_err(
                    pod,
                    format!(
                        "{} now names another netns ({id}, not {}): the sandbox is gone",
                        n.path.display(),
                        n.id
                    ),
                ));
            }
            return Ok(f);
        }
        // Found by the pass's one batched search (`prepare`), for the same addresses.
        if let Some((queried, f)) = self.prefound.remove(&pod.uid)
            && queried == ips
        {
            return Ok(f);
        }
        let finder = NetnsFinder::new(&self.cfg.proc_root, self.cfg.netns_dirs.clone())
            .map_err(|e| pod_err(pod, format!("netns discovery: {e}")))?;
        let mut hits = finder
            .find(&[PodNetnsQuery { uid: &pod.uid, ips }])
            .map_err(|e| pod_err(pod, format!("netns discovery: {e}")))?;
        match hits.remove(&pod.uid) {
            Some(h) => {
                debug!(pod = %pod, source = %h.source, "found the pod's netns");
                Ok(h.file)
            }
            None => Err(pod_err(
                pod,
                format!(
                    "its netns was not found (no process of the pod in {}, no netns holding {:?} in {:?})",
                    self.cfg.proc_root.display(),
                    ips,
                    self.cfg.netns_dirs
                ),
            )),
        }
    }

    /// Rules, probe entries and ztunnel's ack for `record` in `netns`. Without a ztunnel
    /// connection nothing is touched. On failure everything this call added is undone unless
    /// `keep_rules_on_failure` (the pod was enrolled before in this same netns) or the rules
    /// were in place already (captured by an earlier agent): that earlier state stays.
    fn enroll_in(
        &mut self,
        pod: &PodId,
        record: PodRecord,
        netns: File,
        keep_rules_on_failure: bool,
    ) -> Result<(), DriverError> {
        let overrides = PodOverrides::from_annotations(&record.annotations)
            .map_err(|e| pod_err(pod, format!("annotation: {e}")))?;
        // Nobody to hand the pod to: fail before touching its netns. (Applying and then
        // undoing would strip the rules of a pod captured before, e.g. one found again by
        // discovery after an agent restart without its state file, and let its traffic out.)
        if self.zds.is_none() || self.view().connected.is_empty() {
            return Err(pod_err(
                pod,
                format!(
                    "no ztunnel connected to the ZDS socket {}; the pod was left as it was",
                    self.cfg.zds_socket.display()
                ),
            ));
        }
        let held = HeldPod { record, netns };
        let path = held.netns_path();
        let t_rules = Instant::now();
        let applied = apply_inpod(&path, &self.cfg.rules, &overrides, self.cfg.backend)
            .map_err(|e| pod_err(pod, format!("in-pod rules: {e}")))?;
        let rules_us = t_rules.elapsed().as_micros();
        crate::crash::point("inpod-after-rules");
        // Undo only what this call did: rules that were in place already (a pod captured by
        // an earlier agent, found again after a restart) stay, so a refusal leaves the pod
        // fail-closed instead of releasing its traffic.
        let keep = keep_rules_on_failure || !applied.changed;
        let undo = |me: &mut InpodDriver, why: String| -> DriverError {
            if !keep {
                if let Err(e) = remove_inpod(&path, me.cfg.backend) {
                    warn!(pod = %pod, error = %e, "removing the rules of a pod ztunnel did not take");
                }
                if let Ok(h) = me.host() {
                    for ip in &held.record.ips {
                        let _ = h.remove(&pod.uid, *ip);
                    }
                }
            }
            pod_err(pod, why)
        };
        let t_probe = Instant::now();
        let mut probe_err = None;
        match self.host() {
            Ok(h) => {
                for ip in &held.record.ips {
                    if let Err(e) = h.upsert(&pod.uid, *ip) {
                        probe_err = Some(format!("host-probe entry {ip}: {e}"));
                        break;
                    }
                }
            }
            Err(e) => probe_err = Some(e.message),
        }
        if let Some(e) = probe_err {
            return Err(undo(self, e));
        }
        let probe_us = t_probe.elapsed().as_micros();
        crate::crash::point("inpod-after-probe");
        let Some(zds) = self.zds.as_ref() else {
            return Err(undo(self, "the ZDS server is not running".into()));
        };
        let t_zds = Instant::now();
        if let Err(e) = zds.add(&pod.uid, held.info(), held.netns.as_fd()) {
            return Err(undo(self, format!("ztunnel did not take the pod: {e}")));
        }
        let zds_us = t_zds.elapsed().as_micros();
        crate::crash::point("inpod-after-ack");
        self.view().lost.remove(&pod.uid);
        self.pods.insert(pod.uid.clone(), held);
        // Recorded in the state file by `flush`, which the loop calls right after answering the
        // ADD: off the ADD's critical path. A crash before that leaves an enrolled pod unrecorded, which a restart treats
        // as an enrollment to (re)do: its netns is found again, its rules verified (nothing
        // run when in place) and ztunnel given it again.
        self.dirty = true;
        // Where an enrollment's time goes (BENCHMARKS.md, "Ambient (inpod mode)" numbers).
        debug!(pod = %pod, rules_changed = applied.changed, rules_us, probe_us, zds_us,
               "pod handed to ztunnel");
        Ok(())
    }

    fn release(&mut self, pod: &PodId, ips: &[IpAddr]) -> Result<(), DriverError> {
        // Rules first, then ztunnel (upstream's order): once ztunnel drops the pod its
        // listeners in the pod are gone, and rules still redirecting there would refuse every
        // new connection of the pod until they are removed.
        let held = self.pods.remove(&pod.uid);
        if let Some(h) = &held {
            // The netns may be a dying sandbox's; removing from it is harmless.
            if let Err(e) = remove_inpod(&h.netns_path(), self.cfg.backend) {
                warn!(pod = %pod, error = %e, "removing in-pod rules on release");
            }
        }
        crate::crash::point("inpod-release-mid");
        if let Some(zds) = self.zds.as_ref()
            && let Err(e) = zds.del(&pod.uid)
        {
            // Best effort: a ztunnel that is gone drops the pod anyway; one that is
            // still connected and failed to ack gets the delete in its next snapshot.
            warn!(pod = %pod, error = %e, "DelWorkload not acknowledged by every ztunnel");
        }
        let mut ips: BTreeSet<IpAddr> = ips.iter().copied().collect();
        if let Some(h) = &held {
            ips.extend(h.record.ips.iter().copied());
        }
        let host = self.host()?;
        for ip in ips {
            host.remove(&pod.uid, ip)
                .map_err(|e| pod_err(pod, format!("host-probe entry {ip}: {e}")))?;
        }
        self.save()
    }

    /// Check a held pod's rules read-only: differences (empty = in place).
    pub fn check_pod(&self, uid: &str) -> Result<Vec<String>, DriverError> {
        let Some(p) = self.pods.get(uid) else {
            return Err(drv(format!("pod uid {uid} is not enrolled")));
        };
        let overrides = PodOverrides::from_annotations(&p.record.annotations).unwrap_or_default();
        check_inpod(
            &p.netns_path(),
            &self.cfg.rules,
            &overrides,
            self.cfg.backend,
        )
        .map_err(|e| drv(format!("checking pod uid {uid}: {e}")))
    }
}

impl RedirectDriver for InpodDriver {
    fn name(&self) -> &str {
        "inpod"
    }

    fn ztunnel_source(&self) -> ZtunnelSource {
        ZtunnelSource::Connected
    }

    fn needs_netns(&self) -> bool {
        true
    }

    fn flush(&mut self) -> Result<(), DriverError> {
        if !self.dirty {
            return Ok(());
        }
        let t = Instant::now();
        self.save()?;
        debug!(
            state_us = t.elapsed().as_micros(),
            pods = self.pods.len(),
            "state file written"
        );
        Ok(())
    }

    fn attach(&mut self, events: DriverEvents) {
        let mut v = self.view();
        let cur = v.current();
        v.events = Some(events);
        // A connection made before the loop attached.
        if cur.is_some() {
            v.tell(DriverEvent::ZtunnelChanged(cur));
        }
    }

    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        if !self.started {
            self.adopt()?;
            self.started = true;
        }
        // Every resync: the host-probe SNAT rule and sets in the node netns, verify-or-repair
        // (identical → nothing runs). A third party may have flushed the node's iptables (an
        // operator's `iptables -F`, a firewall reload); without the rule every ambient pod's
        // kubelet probes fail. Members of the sets are kept.
        let due = self
            .host_checked
            .is_none_or(|t| t.elapsed() >= self.cfg.host_rules_check_interval);
        if due && let Some(h) = self.host.as_mut() {
            h.ensure_rules()
                .map_err(|e| drv(format!("host-probe SNAT rules in the node netns: {e}")))?;
            self.host_checked = Some(Instant::now());
        }
        let lost: Vec<String> = std::mem::take(&mut self.view().lost).into_iter().collect();
        for uid in lost {
            // ztunnel refused it: forget the hand-over (rules stay, traffic fails closed)
            // so the loop enrolls it again.
            if let Some(h) = self.pods.remove(&uid) {
                if let Some(zds) = &self.zds {
                    let _ = zds.del(&uid);
                }
                drop(h);
            }
        }
        let mut s = EnrolledState::default();
        for (uid, p) in &self.pods {
            s.pods.insert(
                uid.clone(),
                EnrolledPod {
                    id: PodId::new(uid, &p.record.namespace, &p.record.name),
                    ips: p.record.ips.clone(),
                    netns: Some(p.record.netns_id),
                },
            );
        }
        Ok(s)
    }

    /// One netns search for every pod of the pass that is enrolled without a CNI netns (a
    /// label change, a restart without the state file): each search scans procfs and enters
    /// every candidate netns, so searching pod by pod would cost O(pods × netns).
    fn prepare(&mut self, actions: &[Action]) -> Result<(), DriverError> {
        self.prefound.clear();
        let wanted: Vec<(&PodId, &Vec<IpAddr>)> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Enroll {
                    pod,
                    ips,
                    netns: None,
                    ..
                } => Some((pod, ips)),
                _ => None,
            })
            .collect();
        if wanted.len() < 2 {
            return Ok(());
        }
        let queries: Vec<PodNetnsQuery<'_>> = wanted
            .iter()
            .map(|(pod, ips)| PodNetnsQuery { uid: &pod.uid, ips })
            .collect();
        let found = NetnsFinder::new(&self.cfg.proc_root, self.cfg.netns_dirs.clone())
            .and_then(|f| f.find(&queries));
        match found {
            Ok(mut hits) => {
                for (pod, ips) in wanted {
                    if let Some(h) = hits.remove(&pod.uid) {
                        self.prefound.insert(pod.uid.clone(), (ips.clone(), h.file));
                    }
                }
            }
            // Each pod then searches on its own and reports its own error.
            Err(e) => warn!(error = %e, "batched netns discovery failed"),
        }
        Ok(())
    }

    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        match action {
            Action::Enroll {
                pod,
                ips,
                annotations,
                service_account,
                netns,
            } => {
                let t_open = Instant::now();
                let file = self.open_netns(pod, ips, netns.as_ref())?;
                debug!(pod = %pod, open_us = t_open.elapsed().as_micros(), "pod netns opened");
                let id =
                    netns_id_of(&file).map_err(|e| pod_err(pod, format!("netns stat: {e}")))?;
                let same_as_held = self
                    .pods
                    .get(&pod.uid)
                    .is_some_and(|h| h.record.netns_id == id);
                let record = PodRecord {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    service_account: service_account.clone(),
                    ips: ips.clone(),
                    annotations: annotations.clone(),
                    netns_path: netns.as_ref().map(|n| n.path.clone()).unwrap_or_default(),
                    netns_id: id,
                };
                self.enroll_in(pod, record, file, same_as_held)
            }
            Action::UpdateIps {
                pod,
                old,
                new,
                netns,
            } => {
                let Some(held) = self.pods.get(&pod.uid) else {
                    return Err(pod_err(pod, "update of a pod this driver does not hold"));
                };
                let mut record = held.record.clone();
                let new_sandbox = netns.as_ref().is_some_and(|n| n.id != record.netns_id);
                if new_sandbox {
                    let n = netns.as_ref().ok_or_else(|| pod_err(pod, "no netns"))?;
                    let file = self.open_netns(pod, new, Some(n))?;
                    // The old sandbox is being torn down: take its rules and probe entries
                    // away, then enroll the new one (ztunnel replaces the pod by UID).
                    if let Some(old_held) = self.pods.remove(&pod.uid)
                        && let Err(e) = remove_inpod(&old_held.netns_path(), self.cfg.backend)
                    {
                        debug!(pod = %pod, error = %e, "old sandbox rules");
                    }
                    let host = self.host()?;
                    for ip in old.iter().filter(|ip| !new.contains(ip)) {
                        host.remove(&pod.uid, *ip)
                            .map_err(|e| pod_err(pod, format!("host-probe entry {ip}: {e}")))?;
                    }
                    record.ips = new.clone();
                    record.netns_path = n.path.clone();
                    record.netns_id = n.id;
                    return self.enroll_in(pod, record, file, false);
                }
                // Same sandbox, other addresses: only the host-probe entries change.
                let host = self.host()?;
                for ip in old.iter().filter(|ip| !new.contains(ip)) {
                    host.remove(&pod.uid, *ip)
                        .map_err(|e| pod_err(pod, format!("host-probe entry {ip}: {e}")))?;
                }
                for ip in new.iter().filter(|ip| !old.contains(ip)) {
                    host.upsert(&pod.uid, *ip)
                        .map_err(|e| pod_err(pod, format!("host-probe entry {ip}: {e}")))?;
                }
                record.ips = new.clone();
                if let Some(h) = self.pods.get_mut(&pod.uid) {
                    h.record = record;
                }
                // Written by `flush` after the apply, as for an enrollment.
                self.dirty = true;
                Ok(())
            }
            Action::Release { pod, ips } => self.release(pod, ips),
        }
    }

    /// The host-probe SNAT rule and sets in the node netns, verify-or-repair (identical →
    /// nothing runs), as every resync does.
    fn verify_node(&mut self) -> Result<(), DriverError> {
        if let Some(h) = self.host.as_mut() {
            h.ensure_rules()
                .map_err(|e| drv(format!("host-probe SNAT rules in the node netns: {e}")))?;
            self.host_checked = Some(Instant::now());
        }
        Ok(())
    }

    fn ztunnel_changed(&mut self, _ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        // The proxy is whoever is connected (the driver told the loop); nothing to program.
        Ok(())
    }

    fn uninstall(&mut self) -> Result<(), DriverError> {
        let mut errors = Vec::new();
        if !self.started {
            // `meshcni-agent uninstall` after the agent stopped: take over its pods first.
            if let Err(e) = self.adopt_with(false) {
                errors.push(e.message);
            }
            self.started = true;
        }
        let uids: Vec<String> = self.pods.keys().cloned().collect();
        for uid in uids {
            if let Some(zds) = &self.zds {
                let _ = zds.del(&uid);
            }
            if let Some(h) = self.pods.remove(&uid)
                && let Err(e) = remove_inpod(&h.netns_path(), self.cfg.backend)
            {
                errors.push(format!("pod uid {uid}: {e}"));
            }
        }
        if let Ok(h) = self.host()
            && let Err(e) = h.uninstall()
        {
            errors.push(format!("host-probe SNAT: {e}"));
        }
        self.host = None;
        self.zds = None;
        // A socket left by an agent that stopped without uninstalling.
        if std::fs::symlink_metadata(&self.cfg.zds_socket).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) && let Err(e) = std::fs::remove_file(&self.cfg.zds_socket)
        {
            errors.push(format!("remove {}: {e}", self.cfg.zds_socket.display()));
        }
        match std::fs::remove_file(&self.cfg.state_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", self.cfg.state_file.display())),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(drv(errors.join("; ")))
        }
    }
}
