//! The `iptables` redirect mode (Istio G1 node-level ambient, spec §3): node netns chains in
//! mangle/nat/filter, the `ztunnel-pods-ips` ipset, marks, ip rules 100–103, tables 100–102,
//! `istioin`/`istioout` tunnels (GENEVE, or VXLAN when the kernel lacks GENEVE) into the
//! ztunnel pod, and TPROXY rules inside the ztunnel pod's netns.
//!
//! What is generated lives in `meshcni_rules::ambient_node` (pure, golden-tested); how it is
//! applied lives in `meshcni_netx`. This module decides the order, the idempotence and the
//! failure behaviour:
//!
//! * **O(1) iptables**: the node rules do not depend on pods (pods are ipset members), and all
//!   node iptables changes are one `iptables-restore --noflush` transaction — none at all when
//!   the saved chains already match (reconcile after an agent restart changes nothing).
//! * **Per pod**: one ipset entry (nfnetlink, no exec) + one route in table 100 (rtnetlink) +
//!   `rp_filter=0` on the pod's host veth, in that order (release: route, then entry).
//! * **ztunnel change** (restart/move): nothing is torn down. The chains are rewritten in one
//!   atomic restore, the tunnels' remote is changed in place (changelink; re-created only if
//!   the kernel refuses), routes are replaced (`NLM_F_REPLACE`) and only then stale ones
//!   deleted — pod routes in table 100 survive, so the capture gap is the few milliseconds
//!   between those steps (the reference runs `cleanupNode` and rebuilds: everything is
//!   uncaptured meanwhile).
//! * **ztunnel gone** (`ztunnel_changed(None)`): fail closed. Rules, routes and tunnels stay,
//!   so enrolled pods' TCP keeps going into the tunnel and is dropped there instead of leaking
//!   out uncaptured (the 1.19/1.20 choice; 1.18 cleaned up and leaked). New pods are still
//!   enrolled (ipset + route) once the node state exists. The agent writes
//!   `ztunnelReady:false`.
//! * **Conflicts**: before the first install, rule priorities 100–103, tables 100–102,
//!   `ztunnel-*` chains, `istioin`/`istioout` links and our mark bits in other chains / ip rules
//!   are checked; anything not ours is refused with an error naming it.
//! * **Uninstall** removes every chain, jump, ipset, rule, route, tunnel (node and every
//!   ztunnel netns it programmed) and restores every sysctl it changed, in both, to the value
//!   it had before (remembered in a state file, so this survives agent restarts); nft tables
//!   and built-in chains that did not exist before the first install are deleted again. The
//!   node and ztunnel netns end byte-identical to before (tests compare full snapshots).
//! * **Crash consistency** (the agent can be SIGKILLed between any two steps):
//!   - a value to restore is written to the state file durably (temp file, fsync, rename,
//!     fsync of the directory) *before* the kernel value changes, so it is never lost;
//!   - `actual()` (start-up and every resync) reads every piece of every enrolled pod — ipset
//!     member, table-100 route, veth `rp_filter` — and completes a pod cut short between its
//!     steps; a table-100 pod route without a member (a release cut short) is removed;
//!   - every install/uninstall step is idempotent, so a restarted agent (or `meshcni-agent
//!     uninstall`) finishes what a killed one began. Named crash points
//!     ([`crate::crash`]) between the steps let tests kill the agent at each one.
//! * **State writes are batched**: the pod-veth values a reconcile pass will change are
//!   remembered in one durable write per pass ([`RedirectDriver::prepare`]), not one per pod.
//! * **Locks and time limits**: iptables commands in the node netns take the node's global
//!   xtables lock ([`IptablesModeConfig::node_xtables_lock`], `/run/xtables.lock`), so legacy
//!   restores serialise with kube-proxy; the ztunnel netns keeps a netns-scoped lock. Every
//!   child process (iptables, nft, ipset) is killed at its time limit with an error naming it.
//!
//! IPv4 only, like the reference.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use meshcni_netx::ipset::{self, IpsetNl};
use meshcni_netx::iptables::{self as ipt, IptablesFlavor, IptablesOptions};
use meshcni_netx::netlink::{AddressSpec, Netlink, netns_identity};
use meshcni_netx::route::{self, Route4, Rule4, RuleTarget};
use meshcni_netx::tunnel::{self, LinkDetails, TunnelKind, TunnelSpec};
use meshcni_netx::{IpFamily, NetxError, nft, sysctl, with_netns};
use meshcni_rules::ambient_node::{self as an, NodeConfig, ZtunnelConfig};
use serde::{Deserialize, Serialize};

use crate::enroll::{Action, EnrolledState, PodId};
use crate::seam::{DriverError, RedirectDriver, ZtunnelInfo};

/// ztunnel pod annotation naming its netns file explicitly (skips the `/var/run/netns` scan).
pub const ZTUNNEL_NETNS_ANNOTATION: &str = "meshcni.io/netns-path";

/// Configuration of the driver.
#[derive(Debug, Clone)]
pub struct IptablesModeConfig {
    /// The node network namespace to program (default: the agent's own, `/proc/self/ns/net`).
    pub node_netns: PathBuf,
    /// Where named netns files live (ztunnel's netns is found here by its veth peer).
    pub netns_dir: PathBuf,
    /// Persistent driver state (previous sysctl values, created tables, active ztunnel).
    pub state_file: PathBuf,
    /// HostIP (`src` of per-pod inbound routes, kubelet-probe source). Default: the node
    /// address used to reach ztunnel (`GetHostIPByRoute`).
    pub host_ip: Option<Ipv4Addr>,
    /// Force an encapsulation; `None` = GENEVE if the kernel has it, else VXLAN.
    pub tunnel_kind: Option<TunnelKind>,
    /// DNAT pod DNS to ztunnel:15053.
    pub dns_capture: bool,
    /// Same-node captured→captured hairpin (not in the reference; default on).
    pub hairpin: bool,
    pub iptables: IptablesOptions,
    /// The xtables lock file for iptables commands in the node netns (`XTABLES_LOCKFILE`):
    /// the host's global `/run/xtables.lock`, so restores serialise with kube-proxy and every
    /// other writer (legacy iptables). The ztunnel netns keeps a lock of its own.
    pub node_xtables_lock: PathBuf,
}

impl Default for IptablesModeConfig {
    fn default() -> Self {
        IptablesModeConfig {
            node_netns: PathBuf::from("/proc/self/ns/net"),
            netns_dir: PathBuf::from("/var/run/netns"),
            state_file: PathBuf::from("/var/run/meshcni/iptables-mode.json"),
            host_ip: None,
            tunnel_kind: None,
            dns_capture: false,
            hairpin: true,
            iptables: IptablesOptions::from_env(),
            node_xtables_lock: PathBuf::from(DEFAULT_XTABLES_LOCK),
        }
    }
}

/// The host's global xtables lock (what iptables uses without `XTABLES_LOCKFILE`).
pub const DEFAULT_XTABLES_LOCK: &str = "/run/xtables.lock";

/// What the driver remembers across restarts (JSON in [`IptablesModeConfig::state_file`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Node netns sysctls we changed → their value before the first change.
    pub sysctls: BTreeMap<String, String>,
    /// iptables tables absent from the node netns before the first install (nft flavor).
    pub created_tables: Vec<String>,
    /// Built-in chains (`table/CHAIN`) absent from nf_tables before the first install
    /// (iptables-nft creates them on use; deleted again on uninstall when empty).
    #[serde(default)]
    pub created_chains: Vec<String>,
    pub host_ip: Option<Ipv4Addr>,
    pub tunnel_kind: Option<String>,
    pub tunnel_port: Option<u16>,
    pub ztunnel_ip: Option<Ipv4Addr>,
    pub ztunnel_veth: Option<String>,
    pub ztunnel_netns: Option<PathBuf>,
    pub ztunnel_eth: Option<String>,
    /// What install changed in each ztunnel netns it programmed (keyed by netns path), so
    /// uninstall can put it back exactly.
    #[serde(default)]
    pub ztunnel_netns_memory: BTreeMap<PathBuf, ZtunnelNetnsMemory>,
}

/// What install changed inside one ztunnel netns (recorded before the change is made).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtunnelNetnsMemory {
    /// Sysctls we changed there → their value before the first change.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// iptables tables absent there before our first restore (nft flavor: deleted again).
    #[serde(default)]
    pub created_tables: Vec<String>,
    /// Built-in chains (`table/CHAIN`) absent there before our first restore (nft flavor).
    #[serde(default)]
    pub created_chains: Vec<String>,
    /// Whether `created_tables` has been determined (before the first restore).
    #[serde(default)]
    pub tables_checked: bool,
    /// The ztunnel's IP, node address and eth inside that netns (to remove its routes).
    #[serde(default)]
    pub ztunnel_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub host_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub eth: Option<String>,
}

/// Where a sysctl lives: the node netns (via the node worker thread) or a ztunnel netns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SysctlNs {
    Node,
    Ztunnel(PathBuf),
}

/// The resolved active ztunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedZtunnel {
    pub ip: Ipv4Addr,
    /// Host side of its veth in the node netns.
    pub veth: String,
    /// Its netns file.
    pub netns: PathBuf,
    /// Its end of the veth inside its netns.
    pub eth: String,
    /// Node address as seen from the route to ztunnel (`HOSTIP_BY_ROUTE`).
    pub host_ip_by_route: Ipv4Addr,
}

/// Timings of the last `ztunnel_changed` (the capture switch window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchTimings {
    /// Whole call.
    pub total: Duration,
    /// From the (atomic) commit of the node chains to the node tunnels pointing at the new
    /// ztunnel and its routes being in place (packets in this window may reach neither).
    pub node_switch: Duration,
    /// Whether the tunnels had to be re-created (changelink refused).
    pub recreated_tunnels: bool,
}

/// The `iptables` redirect-mode driver.
#[derive(Debug)]
pub struct IptablesDriver {
    cfg: IptablesModeConfig,
    flavor: Option<IptablesFlavor>,
    state: PersistedState,
    /// IP → pod UID as enrolled (from the ipset comments, kept up to date by `apply`).
    owners: BTreeMap<Ipv4Addr, String>,
    ipset: Option<IpsetNl>,
    last_switch: SwitchTimings,
    kind: Option<TunnelKind>,
    /// Node netns rtnetlink socket reused by per-pod work (taken and put back; an error
    /// path simply drops it and the next call reopens).
    pod_nl: Option<Netlink>,
    /// Long-lived thread inside the node netns for per-pod sysctl writes (a thread spawn +
    /// setns per pod would dominate the per-pod cost).
    worker: Option<NodeWorker>,
    /// ifindex of `istioin` (per-pod routes), refreshed on install and after a route error.
    tun_in_index: Option<u32>,
    /// Durable state-file writes (count, bytes) since this driver was created.
    state_writes: (u64, u64),
    /// Pieces repaired by `actual()` since this driver was created.
    repairs: RepairCounts,
}

/// What `actual()` found missing or stale and repaired (crash recovery, drift).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairCounts {
    /// Enrolled pods (ipset members) whose table-100 route was missing.
    pub routes: u64,
    /// Enrolled pods whose host veth had the wrong `rp_filter`.
    pub sysctls: u64,
    /// Table-100 pod routes via `istioin` without an ipset member (a release cut short).
    pub orphan_routes: u64,
    /// Times the node netns's rules were found missing or changed (flushed by a third party)
    /// and restored.
    pub node_rules: u64,
}

type Job = Box<dyn for<'a> FnOnce(&meshcni_netx::InNetns<'a>) + Send>;

/// A thread parked inside the node netns running jobs sent to it.
struct NodeWorker {
    tx: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for NodeWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeWorker")
    }
}

impl NodeWorker {
    fn start(netns: &Path) -> Result<NodeWorker, NetxError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        // Detached: the loop ends when the driver (the only sender) is dropped.
        meshcni_netx::spawn_in_netns(netns, "mcni-iptables-node", move |ns| {
            while let Ok(job) = rx.recv() {
                job(ns);
            }
        })?;
        Ok(NodeWorker { tx })
    }

    /// Run `f` on the worker; `None` if the worker is gone.
    fn run<R: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&meshcni_netx::InNetns<'a>) -> R + Send + 'static,
    ) -> Option<R> {
        let (rtx, rrx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .send(Box::new(move |ns| {
                let _ = rtx.send(f(ns));
            }))
            .ok()?;
        rrx.recv().ok()
    }
}

fn drv(e: impl std::fmt::Display) -> DriverError {
    DriverError::driver(format!("iptables mode: {e}"))
}

const OUR_LINKS: [&str; 2] = [an::TUN_IN, an::TUN_OUT];

impl IptablesDriver {
    /// A driver for `cfg`. Loads the state file if present; touches nothing else.
    pub fn new(cfg: IptablesModeConfig) -> Result<IptablesDriver, DriverError> {
        let state = match std::fs::read(&cfg.state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                drv(format!(
                    "state file {} is not valid: {e}",
                    cfg.state_file.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PersistedState::default(),
            Err(e) => {
                return Err(drv(format!(
                    "cannot read state file {}: {e}",
                    cfg.state_file.display()
                )));
            }
        };
        Ok(IptablesDriver {
            cfg,
            flavor: None,
            state,
            owners: BTreeMap::new(),
            ipset: None,
            last_switch: SwitchTimings::default(),
            kind: None,
            pod_nl: None,
            worker: None,
            tun_in_index: None,
            state_writes: (0, 0),
            repairs: RepairCounts::default(),
        })
    }

    /// Durable writes of the state file so far: (count, bytes).
    pub fn state_writes(&self) -> (u64, u64) {
        self.state_writes
    }

    /// What `actual()` has repaired so far.
    pub fn repairs(&self) -> RepairCounts {
        self.repairs
    }

    /// The persisted state (for tests and diagnostics).
    pub fn state(&self) -> &PersistedState {
        &self.state
    }

    /// Timings of the last ztunnel switch.
    pub fn last_switch(&self) -> SwitchTimings {
        self.last_switch
    }

    /// The tunnel encapsulation in use (detected on first install).
    pub fn tunnel_kind(&mut self) -> TunnelKind {
        if let Some(k) = self.kind {
            return k;
        }
        let k = self
            .cfg
            .tunnel_kind
            .or(match self.state.tunnel_kind.as_deref() {
                Some("geneve") => Some(TunnelKind::Geneve),
                Some("vxlan") => Some(TunnelKind::Vxlan),
                _ => None,
            })
            .unwrap_or_else(tunnel::detect_kind);
        tracing::info!(
            kind = k.name(),
            "ambient iptables mode tunnel encapsulation"
        );
        self.kind = Some(k);
        k
    }

    /// Write the state file durably: temp file, fsync, rename over the old one, fsync the
    /// directory. A crash at any point leaves either the old or the new file, never a torn
    /// one, and a value recorded here survives a power cut.
    fn save_state(&mut self) -> Result<(), DriverError> {
        use std::io::Write;
        let path = self.cfg.state_file.clone();
        let fail = |what: &str, p: &Path, e: std::io::Error| {
            drv(format!(
                "cannot write state file {}: {what} {}: {e}",
                path.display(),
                p.display()
            ))
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| fail("create", &dir, e))?;
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(&self.state).map_err(drv)?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| fail("create", &tmp, e))?;
        f.write_all(&bytes).map_err(|e| fail("write", &tmp, e))?;
        f.sync_all().map_err(|e| fail("fsync", &tmp, e))?;
        drop(f);
        crate::crash::point("state-before-rename");
        std::fs::rename(&tmp, &path).map_err(|e| fail("rename onto it", &tmp, e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("fsync directory", &dir, e))?;
        self.state_writes.0 += 1;
        self.state_writes.1 += bytes.len() as u64;
        Ok(())
    }

    /// The remembered previous values for sysctls of `ns`.
    fn memory(&mut self, ns: &SysctlNs) -> &mut BTreeMap<String, String> {
        match ns {
            SysctlNs::Node => &mut self.state.sysctls,
            SysctlNs::Ztunnel(p) => {
                &mut self
                    .state
                    .ztunnel_netns_memory
                    .entry(p.clone())
                    .or_default()
                    .sysctls
            }
        }
    }

    /// Remember `current` values (key → value read from the kernel) not remembered yet, and
    /// write the state file once if anything was added. Must run before the kernel writes.
    fn remember_before_write(
        &mut self,
        ns: &SysctlNs,
        current: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), DriverError> {
        let mem = self.memory(ns);
        let mut added = Vec::new();
        for (k, v) in current {
            if let std::collections::btree_map::Entry::Vacant(e) = mem.entry(k.clone()) {
                e.insert(v);
                added.push(k);
            }
        }
        if added.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.save_state() {
            // Not on disk: not remembered (the caller must not write, and the next attempt
            // must save again).
            let mem = self.memory(ns);
            for k in &added {
                mem.remove(k);
            }
            return Err(e);
        }
        crate::crash::point("sysctl-after-save");
        Ok(())
    }

    fn ensure_worker(&mut self) -> Result<&NodeWorker, DriverError> {
        if self.worker.is_none() {
            self.worker = Some(NodeWorker::start(&self.cfg.node_netns).map_err(drv)?);
        }
        self.worker
            .as_ref()
            .ok_or_else(|| drv("node netns worker thread unavailable"))
    }

    /// Run `f` inside `ns` (the node worker thread, or a thread entering a ztunnel netns).
    fn in_ns<R: Send + 'static>(
        &mut self,
        ns: &SysctlNs,
        f: impl for<'a> FnOnce(&meshcni_netx::InNetns<'a>) -> Result<R, NetxError> + Send + 'static,
    ) -> Result<R, DriverError> {
        match ns {
            SysctlNs::Node => match self.ensure_worker()?.run(f) {
                Some(r) => r.map_err(drv),
                None => {
                    self.worker = None;
                    Err(drv("node netns worker thread is gone"))
                }
            },
            SysctlNs::Ztunnel(p) => with_netns(p, f).and_then(|r| r).map_err(drv),
        }
    }

    /// Set sysctls (`(key, value)`) in `ns`: read the current values, durably remember every
    /// value about to change (once per key), and only then write.
    fn set_sysctls(
        &mut self,
        ns: &SysctlNs,
        list: Vec<(String, String)>,
    ) -> Result<(), DriverError> {
        let current = self.in_ns(ns, move |here| {
            let mut out = Vec::new();
            for (k, want) in list {
                let cur = sysctl::read_here(here, &k)?.ok_or_else(|| NetxError::Netlink {
                    netns: here.path().to_path_buf(),
                    op: format!("read sysctl {k}"),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })?;
                if cur != want {
                    out.push((k, cur, want));
                }
            }
            Ok(out)
        })?;
        if current.is_empty() {
            return Ok(());
        }
        self.remember_before_write(
            ns,
            current.iter().map(|(k, cur, _)| (k.clone(), cur.clone())),
        )?;
        self.in_ns(ns, move |here| {
            for (k, _, want) in &current {
                crate::crash::point("sysctl-before-write");
                sysctl::write_here(here, k, want)?;
                crate::crash::point("sysctl-after-write");
            }
            Ok(())
        })
    }

    fn node(&self) -> &Path {
        &self.cfg.node_netns
    }

    fn nl(&self) -> Result<Netlink, DriverError> {
        Netlink::open(self.node()).map_err(drv)
    }

    fn take_pod_nl(&mut self) -> Result<Netlink, DriverError> {
        match self.pod_nl.take() {
            Some(nl) => Ok(nl),
            None => self.nl(),
        }
    }

    /// iptables options for the node netns: the global xtables lock (see
    /// [`IptablesModeConfig::node_xtables_lock`]).
    fn node_opts(&self) -> IptablesOptions {
        IptablesOptions {
            lock_file: Some(self.cfg.node_xtables_lock.clone()),
            ..self.cfg.iptables.clone()
        }
    }

    fn flavor(&mut self) -> Result<IptablesFlavor, DriverError> {
        if let Some(f) = self.flavor {
            return Ok(f);
        }
        let opts = self.node_opts();
        let f = with_netns(self.node(), |ns| ipt::detect_here(ns, &opts))
            .and_then(|r| r)
            .map_err(drv)?;
        self.flavor = Some(f);
        Ok(f)
    }

    fn node_save(&mut self) -> Result<String, DriverError> {
        let flavor = self.flavor()?;
        let opts = self.node_opts();
        with_netns(self.node(), |ns| {
            ipt::save_here(ns, &opts, flavor, IpFamily::V4)
        })
        .and_then(|r| r)
        .map_err(drv)
    }

    /// `iptables-restore --noflush` of `text` into the node netns.
    fn restore(&self, flavor: IptablesFlavor, text: &str) -> Result<(), DriverError> {
        let opts = self.node_opts();
        with_netns(self.node(), |ns| {
            ipt::restore_here(ns, &opts, flavor, IpFamily::V4, text, true)
        })
        .and_then(|r| r)
        .map_err(drv)
    }

    fn ipset_nl(&mut self) -> Result<&mut IpsetNl, DriverError> {
        if self.ipset.is_none() {
            self.ipset = Some(IpsetNl::open(&self.cfg.node_netns).map_err(drv)?);
        }
        self.ipset
            .as_mut()
            .ok_or_else(|| drv("ipset socket unavailable"))
    }

    /// Write node sysctls, remembering each previous value once (before writing it).
    fn node_sysctls(&mut self, list: &[an::Sysctl]) -> Result<(), DriverError> {
        let list = list
            .iter()
            .map(|s| (s.path(), s.value.to_string()))
            .collect();
        self.set_sysctls(&SysctlNs::Node, list)
    }

    /// `rp_filter=0` on the pod's host veth (spec §3.4 step 3), named by index on the node
    /// worker thread; the previous value is remembered (durably, before the write) like every
    /// node sysctl.
    fn pod_rp_filter(&mut self, pod: &PodId, oif: u32) -> Result<(), DriverError> {
        let names = self
            .in_ns(&SysctlNs::Node, move |ns| tunnel::link_name_here(ns, oif))
            .map_err(|e| DriverError::pod(format!("iptables mode: enroll {pod}: {e}")))?;
        let list = an::pod_sysctls(&names)
            .iter()
            .map(|s| (s.path(), s.value.to_string()))
            .collect();
        self.set_sysctls(&SysctlNs::Node, list)
            .map_err(|e| DriverError {
                scope: e.scope,
                message: format!("iptables mode: enroll {pod}: {}", e.message),
            })
    }

    /// The pod-veth sysctls of `oifs` whose value differs from what enrollment sets, as
    /// (path, current value, wanted value), read on the node worker. Interfaces that no longer
    /// exist are skipped.
    fn pod_sysctl_drift(
        &mut self,
        oifs: Vec<u32>,
    ) -> Result<Vec<(String, String, String)>, DriverError> {
        self.in_ns(&SysctlNs::Node, move |ns| {
            let mut out = Vec::new();
            for oif in oifs {
                let Ok(dev) = tunnel::link_name_here(ns, oif) else {
                    continue;
                };
                for s in an::pod_sysctls(&dev) {
                    if let Some(cur) = sysctl::read_here(ns, &s.path())?
                        && cur != s.value
                    {
                        out.push((s.path(), cur, s.value.to_string()));
                    }
                }
            }
            Ok(out)
        })
    }

    /// Read the pod-veth sysctls of `oifs` and remember (one durable write) every value that
    /// enrolling them will change. Unknown interfaces are skipped (their enroll reports it).
    fn remember_pod_sysctls(&mut self, oifs: Vec<u32>) -> Result<usize, DriverError> {
        if oifs.is_empty() {
            return Ok(0);
        }
        let found: Vec<(String, String)> = self
            .pod_sysctl_drift(oifs)?
            .into_iter()
            .map(|(path, current, _)| (path, current))
            .collect();
        let n = found.len();
        self.remember_before_write(&SysctlNs::Node, found)?;
        Ok(n)
    }

    /// Forget the remembered previous values of interfaces that no longer exist. Pod veths
    /// come and go; without this the state (memory and the file rewritten on every new entry)
    /// grows by one entry per pod veth ever enrolled. Called from `actual()` (start-up,
    /// resync), so the cost is off the per-pod path.
    fn prune_sysctls(&mut self) -> Result<(), DriverError> {
        // ztunnel netns that no longer exist (a replaced ztunnel pod): nothing to restore there.
        let current = self.state.ztunnel_netns.clone();
        let before = self.state.ztunnel_netns_memory.len();
        self.state
            .ztunnel_netns_memory
            .retain(|p, _| Some(p) == current.as_ref() || p.exists());
        let zt_pruned = self.state.ztunnel_netns_memory.len() != before;
        if self.state.sysctls.is_empty() {
            if zt_pruned {
                self.save_state()?;
            }
            return Ok(());
        }
        let keys: Vec<String> = self.state.sysctls.keys().cloned().collect();
        let gone = with_netns(self.node(), move |ns| {
            let mut gone = Vec::new();
            for k in keys {
                if sysctl::read_here(ns, &k)?.is_none() {
                    gone.push(k);
                }
            }
            Ok::<_, NetxError>(gone)
        })
        .and_then(|r| r)
        .map_err(drv)?;
        if gone.is_empty() {
            if zt_pruned {
                self.save_state()?;
            }
            return Ok(());
        }
        for k in &gone {
            self.state.sysctls.remove(k);
        }
        self.save_state()
    }

    /// Resolve the ztunnel's veth, netns and the node address towards it.
    pub fn resolve_ztunnel(&self, z: &ZtunnelInfo) -> Result<ResolvedZtunnel, DriverError> {
        let ip = z
            .ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| {
                drv(format!(
                    "ztunnel {} has no IPv4 address ({:?}); this mode is IPv4-only",
                    z.pod, z.ips
                ))
            })?;
        let mut nl = self.nl()?;
        let oif = route::host_route_oif(&mut nl, ip)
            .map_err(drv)?
            .ok_or_else(|| {
                drv(format!(
                    "no main-table route to ztunnel {} IP {ip}/32 in node netns {}",
                    z.pod,
                    self.node().display()
                ))
            })?;
        let veth = tunnel::link_by_index(&mut nl, oif)
            .map_err(drv)?
            .ok_or_else(|| {
                drv(format!(
                    "route to ztunnel IP {ip} uses vanished ifindex {oif}"
                ))
            })?;
        if veth.kind != "veth" {
            return Err(drv(format!(
                "route to ztunnel IP {ip} goes via {} (kind {:?}), not a veth",
                veth.name, veth.kind
            )));
        }
        let (netns, eth) = match z.annotations.get(ZTUNNEL_NETNS_ANNOTATION) {
            Some(p) => {
                let p = PathBuf::from(p);
                let why = match self.is_peer_netns(&mut nl, &p, &veth)? {
                    PeerNetns::Yes => None,
                    PeerNetns::Node => Some("is the node's own netns".to_string()),
                    PeerNetns::Other => Some(format!(
                        "is not the netns of its peer (IFLA_LINK_NETNSID {:?})",
                        veth.link_netnsid
                    )),
                };
                if let Some(why) = why {
                    return Err(drv(format!(
                        "netns {} (annotation {ZTUNNEL_NETNS_ANNOTATION} of ztunnel {}) {why} of ztunnel veth {}",
                        p.display(),
                        z.pod,
                        veth.name
                    )));
                }
                let eth = peer_in(&p, &veth)?.ok_or_else(|| {
                    drv(format!(
                        "netns {} (annotation {ZTUNNEL_NETNS_ANNOTATION}) holds no peer of {}",
                        p.display(),
                        veth.name
                    ))
                })?;
                (p, eth)
            }
            None => self.find_peer_netns(&mut nl, &veth)?,
        };
        // Once our rules are in place (a restarted agent adopting them), a route lookup goes
        // through our own `ip rule … lookup 100`, whose route to ztunnel has no `src`, and
        // yields the veth's address instead of the node's: keep the address the installed
        // rules were built with.
        let host_ip_by_route = match self.state.host_ip {
            Some(adopted) => adopted,
            None => with_netns(self.node(), |ns| route::source_for_here(ns, ip))
                .and_then(|r| r)
                .map_err(drv)?,
        };
        Ok(ResolvedZtunnel {
            ip,
            veth: veth.name,
            netns,
            eth,
            host_ip_by_route,
        })
    }

    /// Whether the netns file `path` is the netns holding the peer of `veth` (a link of the
    /// node netns), by identity: the node netns's id for `path` (`RTM_GETNSID`) must be the
    /// veth's `IFLA_LINK_NETNSID`. Interface indexes alone prove nothing (every netns numbers
    /// its links from 1), and the node netns is recognised by its nsfs inode, not its path.
    fn is_peer_netns(
        &self,
        nl: &mut Netlink,
        path: &Path,
        veth: &LinkDetails,
    ) -> Result<PeerNetns, DriverError> {
        let node = netns_identity(self.node()).map_err(drv)?;
        if netns_identity(path).map_err(drv)? == node {
            return Ok(PeerNetns::Node);
        }
        let Some(want) = veth.link_netnsid else {
            // No IFLA_LINK_NETNSID: the veth's peer is in the node netns itself.
            return Ok(PeerNetns::Other);
        };
        let file = std::fs::File::open(path)
            .map_err(|e| drv(format!("cannot open netns {}: {e}", path.display())))?;
        let id = nl.netns_id(std::os::fd::AsFd::as_fd(&file)).map_err(drv)?;
        Ok(if id == Some(want) {
            PeerNetns::Yes
        } else {
            PeerNetns::Other
        })
    }

    /// The netns under `--netns-dir` that holds ztunnel's end of `veth`, found by identity
    /// ([`Self::is_peer_netns`]); entries that are not netns files are skipped.
    fn find_peer_netns(
        &self,
        nl: &mut Netlink,
        veth: &LinkDetails,
    ) -> Result<(PathBuf, String), DriverError> {
        let dir = &self.cfg.netns_dir;
        let Some(nsid) = veth.link_netnsid else {
            return Err(drv(format!(
                "ztunnel veth {} has its peer in the node netns (no IFLA_LINK_NETNSID): not a pod veth",
                veth.name
            )));
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| drv(format!("cannot list netns dir {}: {e}", dir.display())))?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            match self.is_peer_netns(nl, &p, veth) {
                Ok(PeerNetns::Yes) => {
                    let eth = peer_in(&p, veth)?.ok_or_else(|| {
                        drv(format!(
                            "netns {} holds the peer of ztunnel veth {} (netnsid {nsid}) but no veth at ifindex {:?} pointing back to it",
                            p.display(),
                            veth.name,
                            veth.link
                        ))
                    })?;
                    return Ok((p, eth));
                }
                Ok(PeerNetns::Node | PeerNetns::Other) => {}
                Err(e) => {
                    tracing::debug!(path = %p.display(), error = %e, "skipping netns dir entry");
                }
            }
        }
        Err(drv(format!(
            "no netns under {} is the peer netns (IFLA_LINK_NETNSID {nsid}) of ztunnel veth {}",
            dir.display(),
            veth.name,
        )))
    }

    /// Conflicts in the node netns: things in our priorities/tables/chains/links/marks that
    /// we did not create. Pure over the listings (see [`find_conflicts`]).
    fn check_conflicts(&mut self, save: &str) -> Result<(), DriverError> {
        let mut nl = self.nl()?;
        let rules = route::list_rules(&mut nl).map_err(drv)?;
        let routes = route::list_routes(&mut nl, None).map_err(drv)?;
        let links = tunnel::list_links(&mut nl).map_err(drv)?;
        let problems = find_conflicts(save, &rules, &routes, &links, &self.state);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(drv(format!(
                "refusing to install in node netns {}: already in use by something else: {}",
                self.node().display(),
                problems.join("; ")
            )))
        }
    }

    fn tunnel_port(
        &mut self,
        kind: TunnelKind,
        links: &[LinkDetails],
        zt: &Path,
    ) -> Result<u16, DriverError> {
        if let Some(p) = links
            .iter()
            .find(|l| l.name == an::TUN_IN && l.kind == kind.name())
            .and_then(|l| l.port)
        {
            return Ok(p);
        }
        let mut bound = with_netns(self.node(), tunnel::bound_udp_ports_here).map_err(drv)?;
        bound.extend(with_netns(zt, tunnel::bound_udp_ports_here).map_err(drv)?);
        Ok(tunnel::pick_port(
            kind.default_port(),
            links,
            &OUR_LINKS,
            &bound,
        ))
    }

    /// Create or retarget a tunnel. Returns true if it had to be re-created (its routes are
    /// then gone).
    fn ensure_tunnel(
        nl: &mut Netlink,
        spec: &TunnelSpec,
        addr: Ipv4Addr,
    ) -> Result<bool, DriverError> {
        let mut recreated = false;
        match tunnel::link_details(nl, &spec.name).map_err(drv)? {
            None => {
                tunnel::add_tunnel(nl, spec).map_err(drv)?;
            }
            Some(d)
                if d.kind == spec.kind.name()
                    && d.vni == Some(spec.vni)
                    && d.port == Some(spec.port) =>
            {
                if d.remote != Some(spec.remote) && !tunnel::change_remote(nl, spec).map_err(drv)? {
                    tunnel::del_link(nl, &spec.name).map_err(drv)?;
                    tunnel::add_tunnel(nl, spec).map_err(drv)?;
                    recreated = true;
                }
            }
            Some(_) => {
                tunnel::del_link(nl, &spec.name).map_err(drv)?;
                tunnel::add_tunnel(nl, spec).map_err(drv)?;
                recreated = true;
            }
        }
        nl.add_address(&AddressSpec {
            ifname: spec.name.clone(),
            addr: IpNet::V4(Ipv4Net::new(addr, an::TUN_PREFIX).map_err(drv)?),
        })
        .map_err(drv)?;
        nl.set_link_up(&spec.name).map_err(drv)?;
        Ok(recreated)
    }

    fn install_node(&mut self, z: &ResolvedZtunnel) -> Result<(), DriverError> {
        let started = Instant::now();
        self.tun_in_index = None;
        let flavor = self.flavor()?;
        let save = self.node_save()?;
        self.check_conflicts(&save)?;
        if self.state.sysctls.is_empty()
            && self.state.created_tables.is_empty()
            && self.state.host_ip.is_none()
        {
            // First install: remember which tables did not exist (nft creates them on use).
            self.state.created_tables = ["filter", "mangle", "nat"]
                .iter()
                .filter(|t| ipt::table_section(&save, t).is_none())
                .map(|t| t.to_string())
                .collect();
            self.state.created_chains =
                absent_builtin_chains(self.node(), flavor, &["filter", "mangle", "nat"])?;
        }
        let host_ip = self.cfg.host_ip.unwrap_or(z.host_ip_by_route);
        let kind = self.tunnel_kind();
        let mut nl = self.nl()?;
        let links = tunnel::list_links(&mut nl).map_err(drv)?;
        let port = self.tunnel_port(kind, &links, &z.netns)?;
        self.state.host_ip = Some(host_ip);
        self.state.tunnel_kind = Some(kind.name().to_string());
        self.state.tunnel_port = Some(port);
        let old_veth = self.state.ztunnel_veth.clone();
        self.state.ztunnel_ip = Some(z.ip);
        self.state.ztunnel_veth = Some(z.veth.clone());
        self.state.ztunnel_netns = Some(z.netns.clone());
        self.state.ztunnel_eth = Some(z.eth.clone());
        self.save_state()?;

        // ipset first: the rules reference it.
        with_netns(self.node(), |ns| ipset::create_here(ns, an::IPSET_NAME))
            .and_then(|r| r)
            .map_err(drv)?;
        let node_cfg = NodeConfig {
            ztunnel_veth: z.veth.clone(),
            ztunnel_ip: z.ip,
            host_ip,
            tunnel_port: port,
            dns_capture: self.cfg.dns_capture,
            hairpin: self.cfg.hairpin,
        };
        // One atomic commit: until it lands the old rules apply in full, so the switch window
        // starts when it returns and ends when tunnels and routes point at the new ztunnel.
        if let Some(text) = an::restore_text(&an::node_chains(&node_cfg), &save) {
            self.restore(flavor, &text)?;
        }
        crate::crash::point("install-after-chains");
        let switch_start = Instant::now();
        let mut sysctls = an::node_sysctls(&z.veth);
        let mut recreated = false;
        for (name, vni, addr, mac) in [
            (an::TUN_IN, an::VNI_IN, an::TUN_IN_HOST, an::MAC_TUN_IN_HOST),
            (
                an::TUN_OUT,
                an::VNI_OUT,
                an::TUN_OUT_HOST,
                an::MAC_TUN_OUT_HOST,
            ),
        ] {
            let spec = TunnelSpec {
                name: name.to_string(),
                kind,
                vni,
                remote: z.ip,
                port,
                mac: Some(mac),
            };
            recreated |= Self::ensure_tunnel(&mut nl, &spec, addr)?;
        }
        crate::crash::point("install-after-tunnels");
        sysctls.extend(an::tunnel_sysctls());
        for r in an::node_ip_rules() {
            route::add_rule(&mut nl, &to_rule4(&r)).map_err(drv)?;
        }
        let desired: Vec<Route4> = an::node_routes(&node_cfg).iter().map(to_route4).collect();
        for r in &desired {
            route::replace_route(&mut nl, r).map_err(drv)?;
        }
        if recreated {
            // The tunnel was re-created: its pod routes went with it.
            let entries = self.ipset_entries()?;
            for e in entries {
                route::replace_route(&mut nl, &to_route4(&an::pod_route(e.ip, host_ip)))
                    .map_err(drv)?;
            }
        }
        let node_switch = switch_start.elapsed();
        // Stale node routes (a previous ztunnel's veth/IP).
        let ours: Vec<&str> = [z.veth.as_str()]
            .into_iter()
            .chain(old_veth.as_deref())
            .collect();
        let idx: BTreeMap<u32, String> = tunnel::list_links(&mut nl)
            .map_err(drv)?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        for e in route::list_routes(&mut nl, None).map_err(drv)? {
            if ![an::TABLE_INBOUND, an::TABLE_OUTBOUND, an::TABLE_PROXY].contains(&e.table) {
                continue;
            }
            let dev = e.oif.and_then(|o| idx.get(&o)).cloned().unwrap_or_default();
            if dev == an::TUN_IN && e.table == an::TABLE_INBOUND {
                continue; // pod routes
            }
            let is_desired = desired.iter().any(|d| {
                d.table == e.table && d.dst == e.dst && d.gateway == e.gateway && d.dev == dev
            });
            if !is_desired && (ours.contains(&dev.as_str()) || OUR_LINKS.contains(&dev.as_str())) {
                let stale = Route4 {
                    table: e.table,
                    dst: e.dst,
                    gateway: e.gateway,
                    dev,
                    src: e.src,
                    onlink: false,
                    scope_link: false,
                    local: false,
                };
                route::del_route(&mut nl, &stale).map_err(drv)?;
            }
        }
        self.node_sysctls(&sysctls)?;
        self.last_switch = SwitchTimings {
            total: started.elapsed(),
            node_switch,
            recreated_tunnels: recreated,
        };
        Ok(())
    }

    /// iptables options for a ztunnel netns (its own, netns-scoped lock).
    fn ztunnel_opts(&self) -> IptablesOptions {
        self.cfg.iptables.clone()
    }

    fn install_ztunnel_netns(&mut self, z: &ResolvedZtunnel) -> Result<(), DriverError> {
        let kind = self.tunnel_kind();
        let port = self
            .state
            .tunnel_port
            .ok_or_else(|| drv("tunnel port unknown (node state not installed)"))?;
        // Same binary as the node (the reference uses one `$IPT` for both netns).
        let flavor = self.flavor()?;
        let opts = self.ztunnel_opts();
        let save = with_netns(&z.netns, |ns| {
            ipt::save_here(ns, &opts, flavor, IpFamily::V4)
        })
        .and_then(|r| r)
        .map_err(drv)?;
        // Before changing anything there: remember what to remove and which tables our
        // restore will bring into existence (durably, so a crash cannot lose it).
        {
            let mem = self
                .state
                .ztunnel_netns_memory
                .entry(z.netns.clone())
                .or_default();
            let before = mem.clone();
            if !mem.tables_checked {
                let mut created: Vec<String> = Vec::new();
                for (t, _, _) in an::ZTUNNEL_CHAINS {
                    let t = t.name().to_string();
                    if ipt::table_section(&save, &t).is_none() && !created.contains(&t) {
                        created.push(t);
                    }
                }
                mem.created_tables = created;
                mem.created_chains = absent_builtin_chains(&z.netns, flavor, &["mangle"])?;
                mem.tables_checked = true;
            }
            mem.ztunnel_ip = Some(z.ip);
            mem.host_ip = Some(z.host_ip_by_route);
            mem.eth = Some(z.eth.clone());
            if *mem != before {
                self.save_state()?;
            }
        }
        crate::crash::point("ztunnel-after-tables-saved");
        let mut nl = Netlink::open(&z.netns).map_err(drv)?;
        for (name, vni, addr, mac) in [
            (
                an::ZTUN_IN,
                an::VNI_IN,
                an::TUN_IN_ZTUNNEL,
                an::MAC_TUN_IN_ZTUNNEL,
            ),
            (
                an::ZTUN_OUT,
                an::VNI_OUT,
                an::TUN_OUT_ZTUNNEL,
                an::MAC_TUN_OUT_ZTUNNEL,
            ),
        ] {
            let spec = TunnelSpec {
                name: name.to_string(),
                kind,
                vni,
                remote: z.host_ip_by_route,
                port,
                mac: Some(mac),
            };
            Self::ensure_tunnel(&mut nl, &spec, addr)?;
        }
        let zcfg = ZtunnelConfig {
            ztunnel_ip: z.ip,
            host_ip_by_route: z.host_ip_by_route,
            eth: z.eth.clone(),
            hairpin: self.cfg.hairpin,
        };
        for r in an::ztunnel_ip_rules() {
            route::add_rule(&mut nl, &to_rule4(&r)).map_err(drv)?;
        }
        for r in an::ztunnel_routes(&zcfg) {
            route::replace_route(&mut nl, &to_route4(&r)).map_err(drv)?;
        }
        let sysctls = an::ztunnel_sysctls(&z.eth, self.cfg.hairpin)
            .iter()
            .map(|s| (s.path(), s.value.to_string()))
            .collect();
        self.set_sysctls(&SysctlNs::Ztunnel(z.netns.clone()), sysctls)?;
        let chains = an::ztunnel_chains(&zcfg);
        with_netns(&z.netns, |ns| {
            if let Some(text) = an::restore_text(&chains, &save) {
                ipt::restore_here(ns, &opts, flavor, IpFamily::V4, &text, true)?;
            }
            Ok::<_, NetxError>(())
        })
        .and_then(|r| r)
        .map_err(drv)
    }

    /// Complete every half-enrolled pod and drop orphaned pod routes (see `actual()`).
    fn repair(&mut self, entries: &[ipset::IpsetEntry]) -> Result<(), DriverError> {
        let Some((host_ip, veth_of)) = self.repair_routes(entries)? else {
            return Ok(());
        };
        // Pod veth sysctls: read them all on the node worker, fix those that differ.
        let oifs: Vec<u32> = veth_of.values().copied().collect();
        let wrong: Vec<(String, String)> = self
            .pod_sysctl_drift(oifs)?
            .into_iter()
            .map(|(path, _, wanted)| (path, wanted))
            .collect();
        if !wrong.is_empty() {
            for (k, _) in &wrong {
                tracing::warn!(
                    sysctl = k,
                    "enrolled pod's veth sysctl not set (enrollment was cut short); repairing"
                );
            }
            self.repairs.sysctls += wrong.len() as u64;
            self.set_sysctls(&SysctlNs::Node, wrong)?;
        }
        self.repair_node_rules(host_ip)
    }

    /// Every enrolled pod's table-100 route, and no other: verify-or-repair. `None` before the
    /// first install (or with the node tunnel gone: nothing can be completed; `ztunnel_changed`
    /// (re)installs and the loop reads `actual()` again after it); else the host address and
    /// each routed pod's veth.
    fn repair_routes(
        &mut self,
        entries: &[ipset::IpsetEntry],
    ) -> Result<Option<(Ipv4Addr, PodVeths)>, DriverError> {
        let Some(host_ip) = self.state.host_ip else {
            return Ok(None);
        };
        let mut nl = self.nl()?;
        let Some(tun_in) = nl.link_index(an::TUN_IN).map_err(drv)? else {
            return Ok(None);
        };
        let routes = route::list_routes(&mut nl, None).map_err(drv)?;
        let members: std::collections::BTreeSet<Ipv4Addr> = entries.iter().map(|e| e.ip).collect();
        let (routed, veth_of) = pod_routes(&routes, Some(tun_in), &members);
        for e in entries {
            if routed.contains(&e.ip) {
                continue;
            }
            tracing::warn!(ip = %e.ip, pod_uid = e.comment.as_deref().unwrap_or("?"),
                "enrolled pod has no table-100 route (enrollment was cut short); repairing");
            route::replace_route_oif(&mut nl, &to_route4(&an::pod_route(e.ip, host_ip)), tun_in)
                .map_err(drv)?;
            self.repairs.routes += 1;
        }
        for ip in routed.difference(&members) {
            tracing::warn!(%ip, "table-100 pod route without an enrolled pod (release was cut short); removing");
            route::del_route(&mut nl, &to_route4(&an::pod_route(*ip, host_ip))).map_err(drv)?;
            self.repairs.orphan_routes += 1;
        }
        self.tun_in_index = Some(tun_in);
        Ok(Some((host_ip, veth_of)))
    }

    /// The node netns's rules, verify-or-repair: a third party may have flushed or edited them
    /// (an operator's `iptables -F`, a firewall reload that drops foreign chains), which lets
    /// enrolled pods bypass ztunnel silently. Identical → no command runs; otherwise one
    /// `iptables-restore --noflush` puts them back exactly as `install_node` wrote them.
    fn repair_node_rules(&mut self, host_ip: Ipv4Addr) -> Result<(), DriverError> {
        let (Some(ztunnel_veth), Some(ztunnel_ip), Some(tunnel_port)) = (
            self.state.ztunnel_veth.clone(),
            self.state.ztunnel_ip,
            self.state.tunnel_port,
        ) else {
            return Ok(());
        };
        let node_cfg = NodeConfig {
            ztunnel_veth,
            ztunnel_ip,
            host_ip,
            tunnel_port,
            dns_capture: self.cfg.dns_capture,
            hairpin: self.cfg.hairpin,
        };
        let flavor = self.flavor()?;
        let save = self.node_save()?;
        if let Some(text) = an::restore_text(&an::node_chains(&node_cfg), &save) {
            tracing::warn!(
                netns = %self.node().display(),
                "node iptables rules of the iptables redirect mode are missing or changed (flushed by another program?); restoring them"
            );
            // The rules reference the set: make sure it exists (members are kept).
            with_netns(self.node(), |ns| ipset::create_here(ns, an::IPSET_NAME))
                .and_then(|r| r)
                .map_err(drv)?;
            self.restore(flavor, &text)?;
            self.repairs.node_rules += 1;
        }
        Ok(())
    }

    fn ipset_entries(&mut self) -> Result<Vec<ipset::IpsetEntry>, DriverError> {
        Ok(
            with_netns(self.node(), |ns| ipset::list_here(ns, an::IPSET_NAME))
                .and_then(|r| r)
                .map_err(drv)?
                .unwrap_or_default(),
        )
    }

    fn installed(&self) -> bool {
        self.state.host_ip.is_some() && self.state.tunnel_port.is_some()
    }

    fn enroll_ip(&mut self, pod: &PodId, ip: Ipv4Addr) -> Result<(), DriverError> {
        // The ipset comment is how `actual()` reads the owner back; a cut UID would read back
        // as another pod (released and re-enrolled on every resync).
        if pod.uid.len() > ipset::MAX_COMMENT {
            return Err(DriverError::pod(format!(
                "iptables mode: cannot enroll {pod}: its UID is {} bytes, longer than the {} bytes an ipset comment holds",
                pod.uid.len(),
                ipset::MAX_COMMENT
            )));
        }
        if let Some(owner) = self.owners.get(&ip)
            && owner != &pod.uid
        {
            return Err(DriverError::pod(format!(
                "iptables mode: cannot enroll {pod}: IP {ip} is already enrolled for pod uid {owner}"
            )));
        }
        // No node state before the first Ready ztunnel: a per-pod wait (loop contract 6), so
        // readiness stays open and the pod is retried as soon as `ztunnel_changed` succeeds.
        let host_ip = self.state.host_ip.ok_or_else(|| {
            DriverError::pod(format!(
                "iptables mode: cannot enroll {pod} yet: ztunnel not ready (node rules are not installed yet: no ztunnel has been ready on this node)"
            ))
        })?;
        let mut nl = self.take_pod_nl()?;
        let oif = route::host_route_oif(&mut nl, ip)
            .map_err(drv)?
            .ok_or_else(|| {
                DriverError::pod(format!(
                    "iptables mode: cannot enroll {pod}: no main-table route to its IP {ip}/32 in node netns {} (pod veth not found)",
                    self.node().display()
                ))
            })?;
        let uid = pod.uid.clone();
        self.ipset_nl()?
            .add(an::IPSET_NAME, ip, Some(&uid))
            .map_err(|e| DriverError::pod(format!("iptables mode: enroll {pod}: {e}")))?;
        crate::crash::point("enroll-after-ipset");
        let tun_in = match self.tun_in_index {
            Some(i) => i,
            None => {
                let i = nl.link_index(an::TUN_IN).map_err(drv)?.ok_or_else(|| {
                    drv(format!(
                        "tunnel {} is missing from node netns {}",
                        an::TUN_IN,
                        self.node().display()
                    ))
                })?;
                self.tun_in_index = Some(i);
                i
            }
        };
        if let Err(e) =
            route::replace_route_oif(&mut nl, &to_route4(&an::pod_route(ip, host_ip)), tun_in)
        {
            self.tun_in_index = None;
            return Err(DriverError::pod(format!(
                "iptables mode: enroll {pod}: {e}"
            )));
        }
        self.pod_nl = Some(nl);
        crate::crash::point("enroll-after-route");
        self.pod_rp_filter(pod, oif)?;
        self.owners.insert(ip, uid);
        Ok(())
    }

    fn release_ip(&mut self, pod: &PodId, ip: Ipv4Addr) -> Result<(), DriverError> {
        if let Some(owner) = self.owners.get(&ip)
            && owner != &pod.uid
        {
            // Another pod holds it now: not ours to remove.
            return Ok(());
        }
        if let Some(host_ip) = self.state.host_ip {
            let mut nl = self.take_pod_nl()?;
            route::del_route(&mut nl, &to_route4(&an::pod_route(ip, host_ip)))
                .map_err(|e| DriverError::pod(format!("iptables mode: release {pod}: {e}")))?;
            self.pod_nl = Some(nl);
            crate::crash::point("release-after-route");
        }
        if self.ipset_exists()? {
            self.ipset_nl()?
                .del(an::IPSET_NAME, ip)
                .map_err(|e| DriverError::pod(format!("iptables mode: release {pod}: {e}")))?;
        }
        self.owners.remove(&ip);
        Ok(())
    }

    /// `iptables-save` (IPv4) of the node netns, with the driver's flavour detection and lock.
    pub fn node_save_text(&mut self) -> Result<String, DriverError> {
        self.node_save()
    }

    /// Read-only (`doctor`): every difference between the node netns and what this driver
    /// installs for the ztunnel recorded in its state file — the node chains (`node_chains`,
    /// each exactly once, one jump from its hook), the ipset, the policy rules (each exactly
    /// once), the node routes, the two tunnels, the node/tunnel sysctls, and per enrolled
    /// address its table-100 route and `rp_filter=0` on its veth (nothing routed that is not
    /// enrolled). Before the first install nothing of this mode may be there at all. Empty:
    /// exactly what install and enrollment write.
    pub fn check_node(&mut self) -> Result<Vec<String>, DriverError> {
        let mut out = Vec::new();
        let save = self.node_save()?;
        let set = with_netns(self.node(), |ns| ipset::list_here(ns, an::IPSET_NAME))
            .and_then(|r| r)
            .map_err(drv)?;
        let mut nl = self.nl()?;
        let links = tunnel::list_links(&mut nl).map_err(drv)?;
        let rules = route::list_rules(&mut nl).map_err(drv)?;
        let routes = route::list_routes(&mut nl, None).map_err(drv)?;
        let st = self.state.clone();
        let (Some(host_ip), Some(port), Some(zip), Some(zv)) =
            (st.host_ip, st.tunnel_port, st.ztunnel_ip, st.ztunnel_veth)
        else {
            // Not installed (per the state file): nothing of ours may be in the node netns.
            for (table, chain, _) in an::NODE_CHAINS {
                if an::chain_exists(&save, table, chain) {
                    out.push(format!(
                        "not installed, but chain {}/{chain} exists",
                        table.name()
                    ));
                }
            }
            if set.is_some() {
                out.push(format!(
                    "not installed, but ipset {} exists",
                    an::IPSET_NAME
                ));
            }
            for l in links
                .iter()
                .filter(|l| OUR_LINKS.contains(&l.name.as_str()))
            {
                out.push(format!("not installed, but link {} exists", l.name));
            }
            for r in an::node_ip_rules() {
                if rules.contains(&to_rule4(&r)) {
                    out.push(format!(
                        "not installed, but ip rule priority {} exists",
                        r.priority
                    ));
                }
            }
            return Ok(out);
        };
        let node_cfg = NodeConfig {
            ztunnel_veth: zv.clone(),
            ztunnel_ip: zip,
            host_ip,
            tunnel_port: port,
            dns_capture: self.cfg.dns_capture,
            hairpin: self.cfg.hairpin,
        };
        for c in an::node_chains(&node_cfg) {
            let t = c.table.name();
            if !an::chain_exists(&save, c.table, c.chain) {
                out.push(format!("chain {t}/{} missing", c.chain));
                continue;
            }
            if an::saved_chain_rules(&save, c.table, c.chain) != c.rules {
                out.push(format!(
                    "chain {t}/{}: rules differ from what install writes",
                    c.chain
                ));
            }
            let jumps = an::jump_count(&save, c.table, c.hook, c.chain);
            if jumps != 1 {
                out.push(format!(
                    "{jumps} jumps from {t}/{} to {} (expected 1)",
                    c.hook, c.chain
                ));
            }
        }
        let members: Vec<Ipv4Addr> = match &set {
            None => {
                out.push(format!("ipset {} missing", an::IPSET_NAME));
                Vec::new()
            }
            Some(entries) => entries.iter().map(|e| e.ip).collect(),
        };
        for r in an::node_ip_rules() {
            let n = rules.iter().filter(|x| **x == to_rule4(&r)).count();
            if n != 1 {
                out.push(format!(
                    "ip rule priority {} present {n} times (expected 1)",
                    r.priority
                ));
            }
        }
        let kind = st.tunnel_kind.clone().unwrap_or_default();
        let mut tun_in = None;
        for (name, vni) in [(an::TUN_IN, an::VNI_IN), (an::TUN_OUT, an::VNI_OUT)] {
            match links.iter().find(|l| l.name == name) {
                None => out.push(format!("link {name} missing")),
                Some(l) => {
                    if name == an::TUN_IN {
                        tun_in = Some(l.index);
                    }
                    if l.kind != kind
                        || l.vni != Some(vni)
                        || l.remote != Some(zip)
                        || l.port != Some(port)
                    {
                        out.push(format!(
                            "link {name} is {} vni {:?} remote {:?} port {:?} (install writes {kind} vni {vni} remote {zip} port {port})",
                            l.kind, l.vni, l.remote, l.port
                        ));
                    }
                }
            }
        }
        let idx: BTreeMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let dev_of =
            |e: &route::RouteEntry| e.oif.and_then(|o| idx.get(&o)).cloned().unwrap_or_default();
        for d in an::node_routes(&node_cfg) {
            let found = routes.iter().any(|e| {
                d.table == e.table && d.dst == e.dst && d.gateway == e.gateway && d.dev == dev_of(e)
            });
            if !found {
                out.push(format!(
                    "route {} table {} dev {} missing",
                    d.dst, d.table, d.dev
                ));
            }
        }
        let (routed, veth_of) = pod_routes(&routes, tun_in, &members.iter().copied().collect());
        for ip in &members {
            if !routed.contains(ip) {
                out.push(format!(
                    "enrolled {ip} has no table-{} route",
                    an::TABLE_INBOUND
                ));
            }
        }
        for ip in &routed {
            if !members.contains(ip) {
                out.push(format!(
                    "table-{} route for {ip}, which is not enrolled (leak)",
                    an::TABLE_INBOUND
                ));
            }
        }
        let mut sysctls: Vec<an::Sysctl> = an::node_sysctls(&zv);
        sysctls.extend(an::tunnel_sysctls());
        let wanted: Vec<(String, String)> = sysctls
            .iter()
            .map(|s| (s.path(), s.value.to_string()))
            .collect();
        let found = self.in_ns(&SysctlNs::Node, move |ns| {
            let mut bad = Vec::new();
            for (path, value) in wanted {
                let cur = sysctl::read_here(ns, &path)?;
                if cur.as_deref() != Some(value.as_str()) {
                    bad.push(format!("sysctl {path} is {cur:?}, install writes {value}"));
                }
            }
            Ok(bad)
        })?;
        out.extend(found);
        for (path, cur, want) in self.pod_sysctl_drift(veth_of.values().copied().collect())? {
            out.push(format!(
                "enrolled pod's sysctl {path} is {cur}, enrollment writes {want}"
            ));
        }
        Ok(out)
    }

    fn ipset_exists(&mut self) -> Result<bool, DriverError> {
        if !self.owners.is_empty() || self.installed() {
            return Ok(true);
        }
        Ok(
            with_netns(self.node(), |ns| ipset::list_here(ns, an::IPSET_NAME))
                .and_then(|r| r)
                .map_err(drv)?
                .is_some(),
        )
    }
}

/// What a netns file is to a node-netns veth (see [`IptablesDriver::is_peer_netns`]).
enum PeerNetns {
    /// The netns of the veth's peer.
    Yes,
    /// The node netns itself (under whatever path).
    Node,
    /// Some other netns.
    Other,
}

/// Whether `netns` holds the veth peer of `veth` (the link at `veth.link` whose own peer is
/// `veth.index`); returns its name.
fn peer_in(netns: &Path, veth: &LinkDetails) -> Result<Option<String>, DriverError> {
    let Some(peer_index) = veth.link else {
        return Ok(None);
    };
    let mut nl = Netlink::open(netns).map_err(drv)?;
    Ok(tunnel::link_by_index(&mut nl, peer_index)
        .map_err(drv)?
        .filter(|l| l.kind == "veth" && l.link == Some(veth.index))
        .map(|l| l.name))
}

fn to_route4(r: &an::Route) -> Route4 {
    Route4 {
        table: r.table,
        dst: r.dst,
        gateway: r.gateway,
        dev: r.dev.clone(),
        src: r.src,
        onlink: r.onlink,
        scope_link: r.scope_link,
        local: r.local,
    }
}

fn to_rule4(r: &an::IpRule) -> Rule4 {
    Rule4 {
        priority: r.priority,
        fwmark: r.fwmark,
        action: match r.action {
            an::IpRuleAction::Lookup(t) => RuleTarget::Lookup(t),
            an::IpRuleAction::Goto(g) => RuleTarget::Goto(g),
        },
    }
}

/// Everything in the node netns that collides with this mode and is not ours (pure).
pub fn find_conflicts(
    save: &str,
    rules: &[Rule4],
    routes: &[route::RouteEntry],
    links: &[LinkDetails],
    state: &PersistedState,
) -> Vec<String> {
    let mut out = Vec::new();
    let our_rules: Vec<Rule4> = an::node_ip_rules().iter().map(to_rule4).collect();
    for r in rules {
        if an::NODE_RULE_PRIORITIES.contains(&r.priority) {
            if !our_rules.contains(r) {
                out.push(format!("ip rule `{r}` occupies priority {}", r.priority));
            }
        } else if r
            .fwmark
            .is_some_and(|(_, mask)| mask & an::NODE_MARK_BITS != 0)
        {
            out.push(format!(
                "ip rule `{r}` tests mark bits {:#x} used by this mode",
                an::NODE_MARK_BITS
            ));
        }
    }
    let idx: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    let mut allowed: Vec<&str> = OUR_LINKS.to_vec();
    if let Some(v) = state.ztunnel_veth.as_deref() {
        allowed.push(v);
    }
    // Our tunnel present = a previous install by this mode (adopted even if the state file
    // was lost: then routes of our tables via any veth are taken as ours).
    let tunnel_present = links
        .iter()
        .any(|l| l.name == an::TUN_IN && l.vni == Some(an::VNI_IN));
    let adopted = tunnel_present && state.ztunnel_veth.is_none();
    let installed = state.ztunnel_veth.is_some();
    for e in routes {
        if ![an::TABLE_INBOUND, an::TABLE_OUTBOUND, an::TABLE_PROXY].contains(&e.table) {
            continue;
        }
        let dev = e.oif.and_then(|o| idx.get(&o).copied()).unwrap_or("?");
        let ours = OUR_LINKS.contains(&dev)
            || (installed && allowed.contains(&dev))
            || (adopted && links.iter().any(|l| l.name == dev && l.kind == "veth"));
        if !ours {
            out.push(format!(
                "route table {} {} dev {dev} is in a table this mode uses",
                e.table, e.dst
            ));
        }
    }
    for l in links {
        if OUR_LINKS.contains(&l.name.as_str()) {
            let vni_ok = (l.name == an::TUN_IN && l.vni == Some(an::VNI_IN))
                || (l.name == an::TUN_OUT && l.vni == Some(an::VNI_OUT));
            if !vni_ok || !(l.kind == "vxlan" || l.kind == "geneve") {
                out.push(format!(
                    "link {} exists (kind {:?}, vni {:?}) and is not this mode's tunnel",
                    l.name, l.kind, l.vni
                ));
            }
        }
    }
    let our_chain_names: Vec<&str> = an::NODE_CHAINS.iter().map(|c| c.1).collect();
    let chains_present = an::NODE_CHAINS
        .iter()
        .any(|(t, c, _)| an::chain_exists(save, *t, c));
    if chains_present && state.host_ip.is_none() && !tunnel_present {
        out.push(
            "iptables chains ztunnel-* already exist and were not created by this agent"
                .to_string(),
        );
    }
    for f in an::foreign_mark_users(save, &our_chain_names) {
        out.push(format!(
            "iptables rule uses mark bits {:#x}: {f}",
            an::NODE_MARK_BITS
        ));
    }
    out
}

fn ipv4s(ips: &[IpAddr]) -> Vec<Ipv4Addr> {
    ips.iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        })
        .collect()
}

impl RedirectDriver for IptablesDriver {
    fn name(&self) -> &str {
        "iptables"
    }

    /// IPv4 only, like the reference's node-level mode (ipset `hash:ip` family inet, IPv4
    /// tunnels and routes).
    fn handles(&self, ip: &std::net::IpAddr) -> bool {
        ip.is_ipv4()
    }

    /// Reads every piece of every enrolled pod, not only the ipset: a pod whose route or
    /// veth `rp_filter` is missing (an agent killed between the steps of an enroll, or drift)
    /// is repaired here, and a table-100 pod route without an ipset member (a release cut
    /// short) is removed. Runs at start-up and on every resync.
    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        let entries = self.ipset_entries()?;
        self.prune_sysctls()?;
        self.repair(&entries)?;
        let mut state = EnrolledState::default();
        let mut by_uid: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        self.owners.clear();
        for e in entries {
            // An entry without a comment was not written by us (or is corrupt): give it a
            // synthetic owner so the planner releases it.
            let uid = e.comment.unwrap_or_else(|| format!("unknown-{}", e.ip));
            self.owners.insert(e.ip, uid.clone());
            by_uid.entry(uid).or_default().push(IpAddr::V4(e.ip));
        }
        for (uid, ips) in by_uid {
            state.insert(PodId::new(&uid, "", ""), ips);
        }
        Ok(state)
    }

    /// One durable state write for the whole pass: every pod-veth sysctl value the pass's
    /// enrollments will change is read and remembered here, before any of them is written
    /// (enrolling 5,000 pods writes the state file once, not 5,000 times).
    fn prepare(&mut self, actions: &[Action]) -> Result<(), DriverError> {
        if !self.installed() {
            return Ok(());
        }
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        for a in actions {
            match a {
                Action::Enroll { ips: new, .. } => ips.extend(ipv4s(new)),
                Action::UpdateIps { old, new, .. } => {
                    let old4 = ipv4s(old);
                    ips.extend(ipv4s(new).into_iter().filter(|ip| !old4.contains(ip)));
                }
                Action::Release { .. } => {}
            }
        }
        if ips.is_empty() {
            return Ok(());
        }
        let mut nl = self.take_pod_nl()?;
        let mut oifs = Vec::with_capacity(ips.len());
        for ip in ips {
            // A pod without a route is reported by its own enroll.
            if let Ok(Some(oif)) = route::host_route_oif(&mut nl, ip) {
                oifs.push(oif);
            }
        }
        self.pod_nl = Some(nl);
        self.remember_pod_sysctls(oifs).map(|_| ())
    }

    fn apply(&mut self, action: &Action) -> Result<(), DriverError> {
        match action {
            Action::Enroll { pod, ips, .. } => {
                let v4 = ipv4s(ips);
                if v4.is_empty() {
                    return Err(DriverError::pod(format!(
                        "iptables mode: cannot enroll {pod}: no IPv4 address among {ips:?} (this mode is IPv4-only)"
                    )));
                }
                for ip in v4 {
                    self.enroll_ip(pod, ip)?;
                }
                Ok(())
            }
            Action::UpdateIps { pod, old, new, .. } => {
                let (old4, new4) = (ipv4s(old), ipv4s(new));
                for ip in old4.iter().filter(|ip| !new4.contains(ip)) {
                    self.release_ip(pod, *ip)?;
                }
                for ip in new4.iter().filter(|ip| !old4.contains(ip)) {
                    self.enroll_ip(pod, *ip)?;
                }
                Ok(())
            }
            Action::Release { pod, ips } => {
                for ip in ipv4s(ips) {
                    self.release_ip(pod, ip)?;
                }
                Ok(())
            }
        }
    }

    /// Between resyncs: the node netns's rules and the enrolled pods' table-100 routes (both
    /// read in one netlink dump / one save; nothing written when intact). Pod veth sysctls
    /// wait for the next `actual()`.
    fn verify_node(&mut self) -> Result<(), DriverError> {
        if !self.installed() {
            return Ok(());
        }
        let entries = self.ipset_entries()?;
        match self.repair_routes(&entries)? {
            Some((host_ip, _)) => self.repair_node_rules(host_ip),
            None => Ok(()),
        }
    }

    fn ztunnel_changed(&mut self, ztunnel: Option<&ZtunnelInfo>) -> Result<(), DriverError> {
        let Some(z) = ztunnel else {
            // Fail closed: keep everything (see module docs).
            tracing::warn!(
                "no ready ztunnel: keeping node rules and routes; enrolled pods' TCP is dropped in the tunnel until a ztunnel is ready (fail closed)"
            );
            return Ok(());
        };
        let resolved = self.resolve_ztunnel(z)?;
        self.install_node(&resolved)?;
        crate::crash::point("install-before-ztunnel-netns");
        self.install_ztunnel_netns(&resolved)?;
        tracing::info!(
            ztunnel = %z.pod,
            ip = %resolved.ip,
            veth = resolved.veth,
            netns = %resolved.netns.display(),
            total_ms = self.last_switch.total.as_secs_f64() * 1e3,
            switch_ms = self.last_switch.node_switch.as_secs_f64() * 1e3,
            "ambient iptables mode redirects to ztunnel"
        );
        Ok(())
    }

    fn uninstall(&mut self) -> Result<(), DriverError> {
        // Never installed here (no state, no tunnel of ours): touch nothing. This keeps an
        // uninstall on a node that never ran this mode from deleting look-alike state (e.g. an
        // Istio 1.18–1.20 node agent's chains and rules, which use the same names).
        if self.state == PersistedState::default() {
            let mut nl = self.nl()?;
            let ours = tunnel::list_links(&mut nl)
                .map_err(drv)?
                .into_iter()
                .any(|l| OUR_LINKS.contains(&l.name.as_str()));
            if !ours {
                return Ok(());
            }
        }
        let mut errors: Vec<String> = Vec::new();
        let mut note = |r: Result<(), DriverError>| {
            if let Err(e) = r {
                errors.push(e.message);
            }
        };
        // Every ztunnel netns we programmed that still exists (best effort: a netns may be
        // gone with its pod), the current one first.
        let mut zt_netns: Vec<PathBuf> = self.state.ztunnel_netns.iter().cloned().collect();
        for p in self.state.ztunnel_netns_memory.keys() {
            if !zt_netns.contains(p) {
                zt_netns.push(p.clone());
            }
        }
        for zns in zt_netns {
            if zns.exists() {
                note(self.uninstall_ztunnel_netns(&zns));
            }
        }
        crate::crash::point("uninstall-after-ztunnel-netns");
        note(self.uninstall_node());
        if errors.is_empty() {
            crate::crash::point("uninstall-before-state-remove");
            match std::fs::remove_file(&self.cfg.state_file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("remove {}: {e}", self.cfg.state_file.display())),
            }
            self.state = PersistedState::default();
            self.owners.clear();
            self.ipset = None;
            self.pod_nl = None;
            self.worker = None;
            self.tun_in_index = None;
            Ok(())
        } else {
            Err(drv(format!("uninstall incomplete: {}", errors.join("; "))))
        }
    }
}

impl IptablesDriver {
    fn uninstall_ztunnel_netns(&mut self, zns: &Path) -> Result<(), DriverError> {
        let opts = self.ztunnel_opts();
        let flavor = self.flavor()?;
        let mem = self
            .state
            .ztunnel_netns_memory
            .get(zns)
            .cloned()
            .unwrap_or_default();
        let current = self.state.ztunnel_netns.as_deref() == Some(zns);
        with_netns(zns, |ns| {
            let save = ipt::save_here(ns, &opts, flavor, IpFamily::V4)?;
            if let Some(text) = an::removal_text(&an::ZTUNNEL_CHAINS, &save) {
                ipt::restore_here(ns, &opts, flavor, IpFamily::V4, &text, true)?;
            }
            Ok::<_, NetxError>(())
        })
        .and_then(|r| r)
        .map_err(drv)?;
        let mut nl = Netlink::open(zns).map_err(drv)?;
        for r in an::ztunnel_ip_rules() {
            route::del_rule(&mut nl, &to_rule4(&r)).map_err(drv)?;
        }
        let pick = |m: Option<Ipv4Addr>, s: Option<Ipv4Addr>| m.or(if current { s } else { None });
        let eth = mem.eth.clone().or(if current {
            self.state.ztunnel_eth.clone()
        } else {
            None
        });
        if let (Some(ip), Some(hip), Some(eth)) = (
            pick(mem.ztunnel_ip, self.state.ztunnel_ip),
            pick(mem.host_ip, self.state.host_ip),
            eth,
        ) {
            let zcfg = ZtunnelConfig {
                ztunnel_ip: ip,
                host_ip_by_route: hip,
                eth,
                hairpin: self.cfg.hairpin,
            };
            for r in an::ztunnel_routes(&zcfg) {
                route::del_route(&mut nl, &to_route4(&r)).map_err(drv)?;
            }
        }
        for l in [an::ZTUN_IN, an::ZTUN_OUT] {
            tunnel::del_link(&mut nl, l).map_err(drv)?;
        }
        restore_sysctls(zns, &mem.sysctls)?;
        delete_created(zns, &opts, flavor, &mem.created_tables, &mem.created_chains)
    }

    fn uninstall_node(&mut self) -> Result<(), DriverError> {
        let flavor = self.flavor()?;
        let save = self.node_save()?;
        if let Some(text) = an::removal_text(&an::NODE_CHAINS, &save) {
            self.restore(flavor, &text)?;
        }
        crate::crash::point("uninstall-after-chains");
        let mut nl = self.nl()?;
        for r in an::node_ip_rules() {
            route::del_rule(&mut nl, &to_rule4(&r)).map_err(drv)?;
        }
        // Routes in our tables via our links or the ztunnel veth (the tunnels' own routes go
        // with the links, but delete explicitly so a half-installed state is cleaned too).
        let idx: BTreeMap<u32, String> = tunnel::list_links(&mut nl)
            .map_err(drv)?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let zv = self.state.ztunnel_veth.clone().unwrap_or_default();
        for e in route::list_routes(&mut nl, None).map_err(drv)? {
            if ![an::TABLE_INBOUND, an::TABLE_OUTBOUND, an::TABLE_PROXY].contains(&e.table) {
                continue;
            }
            let dev = e.oif.and_then(|o| idx.get(&o)).cloned().unwrap_or_default();
            if OUR_LINKS.contains(&dev.as_str()) || (!zv.is_empty() && dev == zv) {
                route::del_route(
                    &mut nl,
                    &Route4 {
                        table: e.table,
                        dst: e.dst,
                        gateway: e.gateway,
                        dev,
                        src: e.src,
                        onlink: false,
                        scope_link: false,
                        local: false,
                    },
                )
                .map_err(drv)?;
            }
        }
        for l in OUR_LINKS {
            tunnel::del_link(&mut nl, l).map_err(drv)?;
        }
        crate::crash::point("uninstall-after-links");
        self.ipset = None;
        with_netns(self.node(), |ns| ipset::destroy_here(ns, an::IPSET_NAME))
            .and_then(|r| r)
            .map_err(drv)?;
        // Sysctls back to their previous values (interfaces that are gone are skipped).
        restore_sysctls(self.node(), &self.state.sysctls)?;
        // nft tables that only exist because we used them.
        let opts = self.node_opts();
        delete_created(
            self.node(),
            &opts,
            flavor,
            &self.state.created_tables,
            &self.state.created_chains,
        )
    }
}

/// Write remembered previous values back in `netns` (keys whose interface is gone are skipped).
fn restore_sysctls(netns: &Path, values: &BTreeMap<String, String>) -> Result<(), DriverError> {
    if values.is_empty() {
        return Ok(());
    }
    with_netns(netns, |ns| {
        for (i, (k, v)) in values.iter().enumerate() {
            if sysctl::read_here(ns, k)?.is_some() {
                sysctl::write_here(ns, k, v)?;
            }
            if i == 0 {
                crate::crash::point("uninstall-mid-sysctls");
            }
        }
        Ok::<_, NetxError>(())
    })
    .and_then(|r| r)
    .map_err(drv)
}

/// Built-in chains of the iptables tables.
fn builtin_chains(table: &str) -> &'static [&'static str] {
    match table {
        "filter" => &["INPUT", "FORWARD", "OUTPUT"],
        "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        "mangle" => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        _ => &[],
    }
}

/// With iptables-nft: the built-in chains (`table/CHAIN`) of `tables` that nf_tables does not
/// have yet in `netns` (iptables-nft creates them when a restore uses the table, and
/// `iptables-nft-save` lists them whether they exist or not, so ask the kernel).
fn absent_builtin_chains(
    netns: &Path,
    flavor: IptablesFlavor,
    tables: &[&str],
) -> Result<Vec<String>, DriverError> {
    if flavor != IptablesFlavor::Nft {
        return Ok(Vec::new());
    }
    let present = with_netns(netns, |ns| nft::kernel_chains_here(ns, nft::NFPROTO_IPV4))
        .and_then(|r| r)
        .map_err(drv)?;
    let mut out = Vec::new();
    for t in tables {
        for c in builtin_chains(t) {
            if !present
                .iter()
                .any(|p| p.table.family == "ip" && p.table.name == *t && p.name == *c)
            {
                out.push(format!("{t}/{c}"));
            }
        }
    }
    Ok(out)
}

/// With iptables-nft, delete what only exists because we used it: the built-in chains in
/// `chains` (`table/CHAIN`) that are empty with policy ACCEPT, then the tables in `tables`
/// left with nothing but such chains.
fn delete_created(
    netns: &Path,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    tables: &[String],
    chains: &[String],
) -> Result<(), DriverError> {
    if flavor != IptablesFlavor::Nft || (tables.is_empty() && chains.is_empty()) {
        return Ok(());
    }
    with_netns(netns, |ns| {
        let after = ipt::save_here(ns, opts, flavor, IpFamily::V4)?;
        let present = nft::kernel_chains_here(ns, nft::NFPROTO_IPV4)?;
        let exists = |t: &str, c: &str| {
            present
                .iter()
                .any(|p| p.table.family == "ip" && p.table.name == t && p.name == c)
        };
        let mut text = String::new();
        for t in tables {
            let empty = ipt::table_section(&after, t).is_some_and(|s| {
                !s.lines().any(|l| l.starts_with("-A "))
                    && s.lines()
                        .filter(|l| l.starts_with(':'))
                        .all(|l| l.contains(" ACCEPT "))
            });
            if empty
                && present
                    .iter()
                    .any(|p| p.table.family == "ip" && p.table.name == *t)
            {
                text.push_str(&format!("delete table ip {t}\n"));
            }
        }
        for tc in chains {
            let Some((t, c)) = tc.split_once('/') else {
                continue;
            };
            if text.contains(&format!("delete table ip {t}\n")) || !exists(t, c) {
                continue;
            }
            let empty = ipt::table_section(&after, t).is_some_and(|s| {
                s.lines().any(|l| l.starts_with(&format!(":{c} ACCEPT ")))
                    && !s.lines().any(|l| l.starts_with(&format!("-A {c} ")))
            });
            if empty {
                text.push_str(&format!("delete chain ip {t} {c}\n"));
            }
        }
        if !text.is_empty() {
            nft::apply_here(ns, &text)?;
        }
        Ok::<_, NetxError>(())
    })
    .and_then(|r| r)
    .map_err(drv)
}

/// Routed pod IP → the ifindex of its veth in the node netns.
type PodVeths = BTreeMap<Ipv4Addr, u32>;

/// The per-pod /32 routes among `routes`: the pod IPs routed into the inbound tunnel
/// (`tun_in`, table `TABLE_INBOUND`) and, for ipset members, the veth their main-table route
/// leaves by. Shared by the driver's repair and the doctor's node check.
fn pod_routes(
    routes: &[route::RouteEntry],
    tun_in: Option<u32>,
    members: &std::collections::BTreeSet<Ipv4Addr>,
) -> (
    std::collections::BTreeSet<Ipv4Addr>,
    BTreeMap<Ipv4Addr, u32>,
) {
    let mut routed = std::collections::BTreeSet::new();
    let mut veth_of: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for r in routes {
        if r.dst.prefix_len() != 32 {
            continue;
        }
        if r.table == an::TABLE_INBOUND && tun_in.is_some() && r.oif == tun_in {
            routed.insert(r.dst.addr());
        } else if r.table == 254
            && r.unicast
            && members.contains(&r.dst.addr())
            && let Some(oif) = r.oif
        {
            veth_of.insert(r.dst.addr(), oif);
        }
    }
    (routed, veth_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, vni: Option<u32>) -> LinkDetails {
        LinkDetails {
            index,
            name: name.into(),
            kind: kind.into(),
            link: None,
            link_netnsid: None,
            up: true,
            vni,
            remote: None,
            port: None,
        }
    }

    #[test]
    fn foreign_rules_routes_links_and_marks_are_conflicts_ours_are_not() {
        let ours: Vec<Rule4> = an::node_ip_rules().iter().map(to_rule4).collect();
        let links = vec![
            link(5, "vethZ", "veth", None),
            link(6, "istioin", "vxlan", Some(1000)),
            link(7, "flannel.1", "vxlan", Some(1)),
        ];
        let state = PersistedState {
            ztunnel_veth: Some("vethZ".into()),
            host_ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..PersistedState::default()
        };
        let route = |table, oif| route::RouteEntry {
            table,
            dst: Ipv4Net::default(),
            gateway: None,
            oif: Some(oif),
            src: None,
            unicast: true,
        };
        let clean = find_conflicts("", &ours, &[route(100, 6), route(102, 5)], &links, &state);
        assert!(clean.is_empty(), "{clean:?}");

        let foreign_rule = Rule4 {
            priority: 101,
            fwmark: None,
            action: RuleTarget::Lookup(200),
        };
        let calico_mark = Rule4 {
            priority: 50,
            fwmark: Some((0x100, 0x100)),
            action: RuleTarget::Lookup(7),
        };
        let bad_link = link(8, "istioout", "geneve", Some(7));
        let save = "*mangle\n-A cali-PREROUTING -j MARK --set-xmark 0x200/0x200\nCOMMIT\n";
        let found = find_conflicts(
            save,
            &[foreign_rule, calico_mark],
            &[route(101, 7)],
            &[links.clone(), vec![bad_link]].concat(),
            &PersistedState::default(),
        );
        let all = found.join("\n");
        assert!(all.contains("priority 101"), "{all}");
        assert!(all.contains("tests mark bits"), "{all}");
        assert!(
            all.contains("route table 101 0.0.0.0/0 dev flannel.1"),
            "{all}"
        );
        assert!(all.contains("link istioout exists"), "{all}");
        assert!(all.contains("cali-PREROUTING"), "{all}");
        assert_eq!(found.len(), 5, "{all}");
    }
}
