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
//!   `rp_filter=0` on the pod's host veth.
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
//! * **Uninstall** removes every chain, jump, ipset, rule, route, tunnel (node and ztunnel
//!   netns) and restores every sysctl it changed to the value it had before (remembered in a
//!   state file, so this survives agent restarts); nft tables that did not exist before the
//!   first install are deleted again.
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
use meshcni_netx::{IpFamily, NetxError, sysctl, with_netns};
use meshcni_rules::ambient_node::{self as an, NodeConfig, ZtunnelConfig};
use serde::{Deserialize, Serialize};

use crate::ambient::{Action, DriverError, EnrolledState, PodId, RedirectDriver, ZtunnelInfo};

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
        }
    }
}

/// What the driver remembers across restarts (JSON in [`IptablesModeConfig::state_file`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Node netns sysctls we changed → their value before the first change.
    pub sysctls: BTreeMap<String, String>,
    /// iptables tables absent from the node netns before the first install (nft flavor).
    pub created_tables: Vec<String>,
    pub host_ip: Option<Ipv4Addr>,
    pub tunnel_kind: Option<String>,
    pub tunnel_port: Option<u16>,
    pub ztunnel_ip: Option<Ipv4Addr>,
    pub ztunnel_veth: Option<String>,
    pub ztunnel_netns: Option<PathBuf>,
    pub ztunnel_eth: Option<String>,
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
        })
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

    fn save_state(&self) -> Result<(), DriverError> {
        let path = &self.cfg.state_file;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| drv(format!("cannot create {}: {e}", dir.display())))?;
        }
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(&self.state).map_err(drv)?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| drv(format!("cannot write state file {}: {e}", path.display())))
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

    fn flavor(&mut self) -> Result<IptablesFlavor, DriverError> {
        if let Some(f) = self.flavor {
            return Ok(f);
        }
        let opts = self.cfg.iptables.clone();
        let f = with_netns(self.node(), |ns| ipt::detect_here(ns, &opts))
            .and_then(|r| r)
            .map_err(drv)?;
        self.flavor = Some(f);
        Ok(f)
    }

    fn node_save(&mut self) -> Result<String, DriverError> {
        let flavor = self.flavor()?;
        let opts = self.cfg.iptables.clone();
        with_netns(self.node(), |ns| {
            ipt::save_here(ns, &opts, flavor, IpFamily::V4)
        })
        .and_then(|r| r)
        .map_err(drv)
    }

    fn restore(&self, netns: &Path, flavor: IptablesFlavor, text: &str) -> Result<(), DriverError> {
        let opts = self.cfg.iptables.clone();
        with_netns(netns, |ns| {
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

    /// Write node sysctls, remembering each previous value once.
    fn node_sysctls(&mut self, list: &[an::Sysctl]) -> Result<(), DriverError> {
        if self.worker.is_none() {
            self.worker = Some(NodeWorker::start(&self.cfg.node_netns).map_err(drv)?);
        }
        let list = list.to_vec();
        let job = move |ns: &meshcni_netx::InNetns<'_>| {
            let mut prev = Vec::new();
            for s in &list {
                if let Some(old) = sysctl::write_here(ns, &s.path(), s.value)? {
                    prev.push((s.path(), old));
                }
            }
            Ok::<_, NetxError>(prev)
        };
        let changed = match self.worker.as_ref().and_then(|w| w.run(job)) {
            Some(r) => r.map_err(drv)?,
            None => {
                self.worker = None;
                return Err(drv("node netns worker thread is gone"));
            }
        };
        self.remember(changed)
    }

    /// `rp_filter=0` on the pod's host veth (spec §3.4 step 3), named by index on the node
    /// worker thread; the previous value is remembered like every node sysctl.
    fn pod_rp_filter(&mut self, pod: &PodId, oif: u32) -> Result<(), DriverError> {
        if self.worker.is_none() {
            self.worker = Some(NodeWorker::start(&self.cfg.node_netns).map_err(drv)?);
        }
        let job = move |ns: &meshcni_netx::InNetns<'_>| {
            let dev = tunnel::link_name_here(ns, oif)?;
            let s = an::pod_sysctls(&dev);
            let mut prev = Vec::new();
            for s in &s {
                if let Some(old) = sysctl::write_here(ns, &s.path(), s.value)? {
                    prev.push((s.path(), old));
                }
            }
            Ok::<_, NetxError>(prev)
        };
        let changed = match self.worker.as_ref().and_then(|w| w.run(job)) {
            Some(r) => {
                r.map_err(|e| DriverError::pod(format!("iptables mode: enroll {pod}: {e}")))?
            }
            None => {
                self.worker = None;
                return Err(drv("node netns worker thread is gone"));
            }
        };
        self.remember(changed)
    }

    /// Forget the remembered previous values of interfaces that no longer exist. Pod veths
    /// come and go; without this the state (memory and the file rewritten on every new entry)
    /// grows by one entry per pod veth ever enrolled. Called from `actual()` (start-up,
    /// resync), so the cost is off the per-pod path.
    fn prune_sysctls(&mut self) -> Result<(), DriverError> {
        if self.state.sysctls.is_empty() {
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
            return Ok(());
        }
        for k in &gone {
            self.state.sysctls.remove(k);
        }
        self.save_state()
    }

    fn remember(&mut self, changed: Vec<(String, String)>) -> Result<(), DriverError> {
        let mut dirty = false;
        for (k, v) in changed {
            if let std::collections::btree_map::Entry::Vacant(e) = self.state.sysctls.entry(k) {
                e.insert(v);
                dirty = true;
            }
        }
        if dirty {
            self.save_state()?;
        }
        Ok(())
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
            self.restore(&self.cfg.node_netns.clone(), flavor, &text)?;
        }
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

    fn install_ztunnel_netns(&mut self, z: &ResolvedZtunnel) -> Result<(), DriverError> {
        let kind = self.tunnel_kind();
        let port = self
            .state
            .tunnel_port
            .ok_or_else(|| drv("tunnel port unknown (node state not installed)"))?;
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
        let sysctls = an::ztunnel_sysctls(&z.eth, self.cfg.hairpin);
        with_netns(&z.netns, |ns| {
            for s in &sysctls {
                sysctl::write_here(ns, &s.path(), s.value)?;
            }
            Ok::<_, NetxError>(())
        })
        .and_then(|r| r)
        .map_err(drv)?;
        let opts = self.cfg.iptables.clone();
        let chains = an::ztunnel_chains(&zcfg);
        // Same binary as the node (the reference uses one `$IPT` for both netns).
        let flavor = self.flavor()?;
        with_netns(&z.netns, |ns| {
            let save = ipt::save_here(ns, &opts, flavor, IpFamily::V4)?;
            if let Some(text) = an::restore_text(&chains, &save) {
                ipt::restore_here(ns, &opts, flavor, IpFamily::V4, &text, true)?;
            }
            Ok::<_, NetxError>(())
        })
        .and_then(|r| r)
        .map_err(drv)
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
        }
        if self.ipset_exists()? {
            self.ipset_nl()?
                .del(an::IPSET_NAME, ip)
                .map_err(|e| DriverError::pod(format!("iptables mode: release {pod}: {e}")))?;
        }
        self.owners.remove(&ip);
        Ok(())
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

    fn actual(&mut self) -> Result<EnrolledState, DriverError> {
        let entries = self.ipset_entries()?;
        self.prune_sysctls()?;
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
            Action::UpdateIps { pod, old, new } => {
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
        // ztunnel netns (best effort: it may be gone with its pod).
        if let Some(zns) = self.state.ztunnel_netns.clone()
            && zns.exists()
        {
            note(self.uninstall_ztunnel_netns(&zns));
        }
        note(self.uninstall_node());
        if errors.is_empty() {
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
        let opts = self.cfg.iptables.clone();
        let flavor = self.flavor()?;
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
        if let (Some(ip), Some(hip), Some(eth)) = (
            self.state.ztunnel_ip,
            self.state.host_ip,
            self.state.ztunnel_eth.clone(),
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
        Ok(())
    }

    fn uninstall_node(&mut self) -> Result<(), DriverError> {
        let flavor = self.flavor()?;
        let save = self.node_save()?;
        if let Some(text) = an::removal_text(&an::NODE_CHAINS, &save) {
            self.restore(&self.cfg.node_netns.clone(), flavor, &text)?;
        }
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
        self.ipset = None;
        with_netns(self.node(), |ns| ipset::destroy_here(ns, an::IPSET_NAME))
            .and_then(|r| r)
            .map_err(drv)?;
        // Sysctls back to their previous values (interfaces that are gone are skipped).
        let sysctls = self.state.sysctls.clone();
        with_netns(self.node(), |ns| {
            for (k, v) in &sysctls {
                if sysctl::read_here(ns, k)?.is_some() {
                    sysctl::write_here(ns, k, v)?;
                }
            }
            Ok::<_, NetxError>(())
        })
        .and_then(|r| r)
        .map_err(drv)?;
        // nft tables that only exist because we used them.
        if flavor == IptablesFlavor::Nft && !self.state.created_tables.is_empty() {
            let after = self.node_save()?;
            let empty: Vec<String> = self
                .state
                .created_tables
                .iter()
                .filter(|t| {
                    ipt::table_section(&after, t).is_some_and(|s| {
                        !s.lines().any(|l| l.starts_with("-A "))
                            && s.lines()
                                .filter(|l| l.starts_with(':'))
                                .all(|l| l.contains(" ACCEPT "))
                    })
                })
                .cloned()
                .collect();
            with_netns(self.node(), |_ns| {
                for t in &empty {
                    let out = std::process::Command::new("nft")
                        .args(["delete", "table", "ip", t])
                        .output();
                    if let Err(e) = out {
                        tracing::debug!(table = t, error = %e, "could not delete nft table");
                    }
                }
            })
            .map_err(drv)?;
        }
        Ok(())
    }
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
