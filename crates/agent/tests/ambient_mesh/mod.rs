//! Test harness shared by `tests/ambient_traffic.rs` and `examples/ambient_conn_bench.rs`: a
//! two-node [`MultiNodeLab`] with a ztunnel stand-in per node, a node-level redirect driver
//! ([`Mode`]: `iptables`, or `ebpf` with its pins on a private bpffs mount) running against each
//! node netns, and enrollment decided by the agent's own reconciler
//! (`ambient::Reconciler`, fed a Kubernetes-shaped snapshot of the lab's pods and
//! namespaces, one pass at a time).
//!
//! Pods (namespace `mesh` is labelled `istio.io/dataplane-mode=ambient`, `plain` is not):
//!
//! | node | pod | namespace | labels | captured |
//! |---|---|---|---|---|
//! | 1 | a | mesh | – | yes |
//! | 1 | b | plain | – | no |
//! | 1 | d | mesh | – | yes |
//! | 1 | o | mesh | `istio.io/dataplane-mode=none` (opt-out) | no |
//! | 2 | c | mesh | – | yes |
//! | 2 | e | plain | – | no |

#![allow(dead_code)] // each includer uses a subset

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use meshcni_agent::ambient::{LoopOptions, Reconciler, RedirectDriver, StatusHandle};
use meshcni_agent::modes::ebpf::{EbpfDriver, EbpfModeConfig};
use meshcni_agent::modes::iptables::{
    IptablesDriver, IptablesModeConfig, ZTUNNEL_NETNS_ANNOTATION,
};
use meshcni_agent::workloads::{
    EnrollPolicy, NamespaceInfo, SourceUpdate, Workload, WorkloadSnapshot, desired_set,
};
use meshcni_testkit::{
    LabNode, LabPod, MultiNodeLab, NetnsSnapshot, TcpServer, ZtunnelHop, ZtunnelStandIn,
};

pub const PORT: u16 = 8080;
pub const T: Duration = Duration::from_secs(5);
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// (node, pod, namespace, extra labels)
pub type PodSpec = (
    u8,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

pub const PODS: &[PodSpec] = &[
    (1, "a", "mesh", &[]),
    (1, "b", "plain", &[]),
    (1, "d", "mesh", &[]),
    (1, "o", "mesh", &[(DATAPLANE_MODE, "none")]),
    (2, "c", "mesh", &[]),
    (2, "e", "plain", &[]),
];

/// The node-level redirect mode a [`Mesh`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Ebpf,
}

/// A bpffs instance of our own on a temporary directory (the host's `/sys/fs/bpf` is never
/// used); unmounted on drop.
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    pub fn mount() -> PrivateBpffs {
        let dir = tempfile::Builder::new()
            .prefix("mcni-bpffs-")
            .tempdir()
            .expect("temp dir");
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a private bpffs (root needed)");
        PrivateBpffs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The lab plus the meshcni dataplane and ztunnel stand-ins.
pub struct Mesh {
    pub mode: Mode,
    /// Per node (index 0 = node 1): the reconciler owning that node's driver. Dropped before
    /// the lab and the bpffs mount (field order).
    pub reconcilers: Vec<(Reconciler, StatusHandle)>,
    /// `ebpf` mode: the bpffs holding each node's pin dir (`node<i>`).
    pub bpffs: Option<PrivateBpffs>,
    pub ztunnels: Vec<ZtunnelStandIn>,
    pub servers: BTreeMap<String, TcpServer>,
    /// Per pod name: labels (mutable to enroll/release running pods).
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    pub pod_ns: BTreeMap<String, String>,
    /// Pods absent from the Kubernetes view (deleted).
    pub deleted: std::collections::BTreeSet<String>,
    /// Nodes (0-based) whose ztunnel pod is reported not ready.
    pub ztunnel_down: std::collections::BTreeSet<usize>,
    pub lab: MultiNodeLab,
    pub tmp: tempfile::TempDir,
    /// Every node and ztunnel netns as it was before the first install: dropping the mesh
    /// uninstalls (like `meshcni-agent uninstall`, from each node's state file) and asserts
    /// each netns is byte-identical to this again.
    pub baselines: Vec<(String, std::path::PathBuf, NetnsSnapshot)>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return; // the test already failed; the lab is deleted anyway
        }
        for n in &self.lab.nodes {
            let mut driver = self.driver(n);
            driver
                .uninstall()
                .unwrap_or_else(|e| panic!("uninstall node{}: {e}", n.index));
            if let Some(bpffs) = &self.bpffs {
                let pins = bpffs.path().join(format!("node{}", n.index));
                assert!(
                    !pins.exists(),
                    "pin dir {} left after uninstall",
                    pins.display()
                );
            }
        }
        for (name, path, before) in &self.baselines {
            meshcni_testkit::assert_netns_unchanged(
                path,
                before,
                &format!("after uninstall, {name}"),
            );
        }
    }
}

/// The `iptables` driver programming one lab node's netns (state file under `state_dir`).
/// The ztunnel netns is named through the ztunnel pod annotation (see [`Mesh::snapshot`]).
pub fn iptables_driver(node: &LabNode, state_dir: &Path) -> Box<dyn RedirectDriver> {
    Box::new(IptablesDriver::new(driver_config(node, state_dir)).expect("iptables driver"))
}

/// The `ebpf` driver configuration of one lab node: pins under `bpffs/node<i>`, state file
/// under `state_dir`, pods' netns found in a private directory holding only this node's pods
/// (symlinks; `Mesh::new_in` creates it) and an empty proc root (no process scan).
pub fn ebpf_config(node: &LabNode, state_dir: &Path, bpffs: &Path) -> EbpfModeConfig {
    EbpfModeConfig {
        node_netns: node.netns.path().to_path_buf(),
        netns_dirs: vec![state_dir.join(format!("node{}-netns", node.index))],
        proc_root: state_dir.join("empty-proc"),
        pin_dir: bpffs.join(format!("node{}", node.index)),
        state_file: state_dir.join(format!("node{}/ebpf-mode.json", node.index)),
        ..EbpfModeConfig::default()
    }
}

/// The driver configuration of one lab node (state file under `state_dir`).
pub fn driver_config(node: &LabNode, state_dir: &Path) -> IptablesModeConfig {
    IptablesModeConfig {
        node_netns: node.netns.path().to_path_buf(),
        netns_dir: state_dir.join("netns"),
        state_file: state_dir.join(format!("node{}/iptables-mode.json", node.index)),
        node_xtables_lock: state_dir.join(format!("node{}.xtables.lock", node.index)),
        ..IptablesModeConfig::default()
    }
}

impl Mesh {
    /// Build the lab, start stand-ins and a server on `PORT` in every pod, create the
    /// drivers, tell them about the ztunnel and reconcile every node.
    pub fn new(tag: &str) -> Mesh {
        Mesh::new_in(tag, Mode::Iptables)
    }

    /// A new driver for node `n` of this mesh's mode (what a restarted agent, or
    /// `meshcni-agent uninstall`, would create).
    pub fn driver(&self, n: &LabNode) -> Box<dyn RedirectDriver> {
        match (self.mode, &self.bpffs) {
            (Mode::Ebpf, Some(bpffs)) => Box::new(
                EbpfDriver::new(ebpf_config(n, self.tmp.path(), bpffs.path()))
                    .expect("ebpf driver"),
            ),
            _ => iptables_driver(n, self.tmp.path()),
        }
    }

    /// [`Mesh::new`] in redirect mode `mode`.
    pub fn new_in(tag: &str, mode: Mode) -> Mesh {
        Mesh::build(tag, mode, false)
    }

    /// An `ebpf`-mode mesh whose workload pods are dual-stack: each pod has an IPv4 and an
    /// IPv6 address, both in the Kubernetes view the reconciler gets, and a server on each.
    /// The ztunnel pods keep IPv4 only, with an IPv6 default route via the node (`fe80::1` on
    /// the node side of their veth) so their spoofed upstream connections can leave with a
    /// pod's IPv6 source, as on a dual-stack cluster.
    pub fn new_dual_stack_ebpf(tag: &str) -> Mesh {
        Mesh::build(tag, Mode::Ebpf, true)
    }

    fn build(tag: &str, mode: Mode, dual_stack: bool) -> Mesh {
        let node1: Vec<&str> = PODS.iter().filter(|p| p.0 == 1).map(|p| p.1).collect();
        let node2: Vec<&str> = PODS.iter().filter(|p| p.0 == 2).map(|p| p.1).collect();
        let lab = if dual_stack {
            MultiNodeLab::new_dual_stack(tag, &[&node1, &node2])
        } else {
            MultiNodeLab::new(tag, &[&node1, &node2])
        }
        .expect("multi-node lab");
        if dual_stack {
            for n in &lab.nodes {
                n.netns
                    .ip(&[
                        "addr",
                        "add",
                        "fe80::1/64",
                        "dev",
                        meshcni_testkit::multinode::ZTUNNEL_HOST_VETH,
                    ])
                    .expect("fe80::1 on the ztunnel veth");
                n.ztunnel
                    .netns
                    .ip(&[
                        "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                    ])
                    .expect("ztunnel IPv6 default route");
            }
        }
        let ztunnels = lab
            .nodes
            .iter()
            .map(|n| {
                ZtunnelStandIn::start(&n.ztunnel.netns, IpAddr::V4(n.ztunnel.ip))
                    .expect("ztunnel stand-in")
            })
            .collect();
        let mut servers = BTreeMap::new();
        let mut labels = BTreeMap::new();
        let mut pod_ns = BTreeMap::new();
        for (_, name, ns, extra) in PODS {
            let pod = lab.pod(name);
            servers.insert(
                name.to_string(),
                TcpServer::start(&pod.netns, pod.addr(PORT)).expect("server"),
            );
            if pod.ip6.is_some() {
                servers.insert(
                    format!("{name}/v6"),
                    TcpServer::start(&pod.netns, pod.addr6(PORT)).expect("IPv6 server"),
                );
            }
            labels.insert(
                name.to_string(),
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            pod_ns.insert(name.to_string(), ns.to_string());
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut baselines = Vec::new();
        for n in &lab.nodes {
            for (what, ns) in [("node", &n.netns), ("ztunnel", &n.ztunnel.netns)] {
                let snap = NetnsSnapshot::capture(ns.path()).expect("netns snapshot");
                baselines.push((
                    format!("{what} netns of node{}", n.index),
                    ns.path().to_path_buf(),
                    snap,
                ));
            }
        }
        let bpffs = (mode == Mode::Ebpf).then(PrivateBpffs::mount);
        if mode == Mode::Ebpf {
            std::fs::create_dir_all(tmp.path().join("empty-proc")).expect("empty proc root");
            for n in &lab.nodes {
                let dir = tmp.path().join(format!("node{}-netns", n.index));
                std::fs::create_dir_all(&dir).expect("netns dir");
                for p in &n.pods {
                    std::os::unix::fs::symlink(p.netns.path(), dir.join(&p.name))
                        .expect("netns symlink");
                }
            }
        }
        let reconcilers = lab
            .nodes
            .iter()
            .map(|n| {
                let status = StatusHandle::new(Err("starting".into()));
                let driver: Box<dyn RedirectDriver> = match &bpffs {
                    Some(b) => Box::new(
                        EbpfDriver::new(ebpf_config(n, tmp.path(), b.path())).expect("ebpf driver"),
                    ),
                    None => iptables_driver(n, tmp.path()),
                };
                let rec = Reconciler::new(
                    driver,
                    EnrollPolicy::default(),
                    LoopOptions::default(),
                    status.clone(),
                );
                (rec, status)
            })
            .collect();
        let mut mesh = Mesh {
            mode,
            reconcilers,
            bpffs,
            ztunnels,
            servers,
            labels,
            pod_ns,
            deleted: Default::default(),
            ztunnel_down: Default::default(),
            lab,
            tmp,
            baselines,
        };
        mesh.reconcile();
        mesh
    }

    /// The Kubernetes view of node `i` (0-based): its pods and both namespaces.
    pub fn snapshot(&self, i: usize) -> WorkloadSnapshot {
        let node = &self.lab.nodes[i];
        let node_name = format!("node{}", node.index);
        let mut pods: Vec<Workload> = node
            .pods
            .iter()
            .filter(|p| !self.deleted.contains(&p.name))
            .map(|p| Workload {
                uid: format!("uid-{}", p.name),
                namespace: self.pod_ns[&p.name].clone(),
                name: p.name.clone(),
                ips: p.ips(),
                labels: self.labels[&p.name].clone(),
                node_name: node_name.clone(),
                phase: "Running".into(),
                ready: true,
                created: "2026-01-01T00:00:00Z".into(),
                ..Workload::default()
            })
            .collect();
        pods.push(Workload {
            uid: format!("uid-ztunnel-{}", node.index),
            namespace: "istio-system".into(),
            name: format!("ztunnel-{}", node.index),
            ips: vec![IpAddr::V4(node.ztunnel.ip)],
            labels: [("app".to_string(), "ztunnel".to_string())].into(),
            service_account: "ztunnel".into(),
            annotations: [(
                ZTUNNEL_NETNS_ANNOTATION.to_string(),
                node.ztunnel.netns.path().display().to_string(),
            )]
            .into(),
            node_name,
            phase: "Running".into(),
            ready: !self.ztunnel_down.contains(&i),
            created: "2026-01-01T00:00:00Z".into(),
            ..Workload::default()
        });
        let namespaces = [
            NamespaceInfo {
                name: "mesh".into(),
                labels: [(DATAPLANE_MODE.to_string(), "ambient".to_string())].into(),
            },
            NamespaceInfo {
                name: "plain".into(),
                labels: BTreeMap::new(),
            },
        ];
        WorkloadSnapshot::from_parts(pods, namespaces)
    }

    /// One reconcile pass per node (the reconciler tells the driver about the ztunnel on the
    /// first pass, then plans desired vs actual and applies), asserting it applied cleanly
    /// and enrolled exactly the desired pods; then the stand-ins learn the captured set
    /// (their "xDS").
    pub fn reconcile(&mut self) {
        let mut captured = Vec::new();
        for i in 0..self.reconcilers.len() {
            let snapshot = self.snapshot(i);
            let desired = desired_set(&snapshot, &EnrollPolicy::default());
            let (rec, status) = &mut self.reconcilers[i];
            rec.update(SourceUpdate::Snapshot(snapshot.clone()));
            let report = rec.reconcile(std::time::Instant::now());
            assert!(
                report.blocked.is_none() && report.failed.is_empty(),
                "node {} reconcile: {report:?}",
                i + 1
            );
            let st = status.get();
            assert_eq!(st.redirect, Ok(()), "node {} redirect status", i + 1);
            let want: std::collections::BTreeSet<String> = desired.keys().cloned().collect();
            assert_eq!(st.enrolled, want, "node {} enrolled set", i + 1);
            captured.extend(
                st.enrolled
                    .iter()
                    .flat_map(|uid| snapshot.pods[uid].ips.iter().copied()),
            );
        }
        for z in &self.ztunnels {
            z.set_captured(captured.iter().copied());
        }
        if self.mode == Mode::Ebpf {
            self.assert_no_node_rules();
        }
    }

    /// Names of the pods enrolled on any node, per the reconcilers' status.
    pub fn enrolled(&self) -> Vec<String> {
        self.reconcilers
            .iter()
            .flat_map(|(_, st)| st.get().enrolled)
            .map(|uid| uid.trim_start_matches("uid-").to_string())
            .collect()
    }

    /// Set (or with `None` remove) a label on a pod; call [`Mesh::reconcile`] afterwards.
    pub fn set_label(&mut self, pod: &str, key: &str, value: Option<&str>) {
        let l = self.labels.get_mut(pod).expect("pod");
        match value {
            Some(v) => {
                l.insert(key.to_string(), v.to_string());
            }
            None => {
                l.remove(key);
            }
        }
    }

    /// `ebpf` mode: no iptables/nft rule, ipset or policy rule in any node netns, and no
    /// iptables/nft rule or ipset in any ztunnel netns, whose only policy rule is the
    /// datapath's `fwmark 0x400/0xfff lookup 100` (both iptables flavours, IPv4 and IPv6).
    pub fn assert_no_node_rules(&self) {
        let nodes = self.lab.nodes.iter().map(|n| (n, &n.netns, false));
        let ztunnels = self.lab.nodes.iter().map(|n| (n, &n.ztunnel.netns, true));
        for (n, ns, ztunnel) in nodes.chain(ztunnels) {
            for save in [
                "iptables-nft-save",
                "ip6tables-nft-save",
                "iptables-legacy-save",
                "ip6tables-legacy-save",
            ] {
                let out = ns
                    .exec_ok(save, &[])
                    .unwrap_or_else(|e| panic!("{save} in node{}: {e}", n.index));
                let rules: Vec<&str> = out
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .collect();
                assert!(rules.is_empty(), "{save} in node{}: {rules:?}", n.index);
            }
            let nft = ns
                .exec_ok("nft", &["list", "ruleset"])
                .unwrap_or_else(|e| panic!("nft in node{}: {e}", n.index));
            assert!(
                nft.trim().is_empty(),
                "nft ruleset in node{}: {nft}",
                n.index
            );
            let sets = ns
                .exec_ok("ipset", &["list", "-n"])
                .unwrap_or_else(|e| panic!("ipset in node{}: {e}", n.index));
            assert!(sets.trim().is_empty(), "ipsets in node{}: {sets}", n.index);
            for family in ["-4", "-6"] {
                let rules = ns.ip(&[family, "rule", "show"]).expect("ip rule");
                let extra: Vec<&str> = rules
                    .lines()
                    .filter(|l| {
                        !(l.starts_with("0:\tfrom all lookup local")
                            || l.starts_with("32766:\tfrom all lookup main")
                            || l.starts_with("32767:\tfrom all lookup default"))
                    })
                    .collect();
                if ztunnel {
                    assert_eq!(
                        extra,
                        vec!["20000:\tfrom all fwmark 0x400/0xfff lookup 100"],
                        "ip {family} rule in the ztunnel netns of node{}",
                        n.index
                    );
                } else {
                    assert!(
                        extra.is_empty(),
                        "ip {family} rule in node{}: {extra:?}",
                        n.index
                    );
                }
            }
        }
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        self.lab.pod(name)
    }

    /// The stand-in of node `index` (1-based).
    pub fn zt(&self, index: u8) -> &ZtunnelStandIn {
        &self.ztunnels[usize::from(index) - 1]
    }

    /// Forget every recorded hop.
    pub fn clear_hops(&self) {
        for z in &self.ztunnels {
            z.take_hops();
        }
    }

    pub fn server(&self, pod: &str) -> &TcpServer {
        &self.servers[pod]
    }

    /// `from` connects to `to`:PORT, sends a payload, and reads the reply; asserts the bytes
    /// echoed and that the server saw `from`'s IP. Returns the server's peer address.
    pub fn exchange(&self, from: &str, to: &str) -> SocketAddr {
        let (f, t) = (self.pod(from), self.pod(to));
        let before = self.server(to).accepted().len();
        let payload = format!("{from}->{to} payload\n");
        let opts = meshcni_testkit::ConnectOpts {
            payload: payload.clone().into_bytes(),
            ..Default::default()
        };
        let got = meshcni_testkit::connect_text(&f.netns, t.addr(PORT), &opts)
            .unwrap_or_else(|e| panic!("{from} → {to}: {e}"));
        let banner = format!("server:{}:{PORT} peer:{}:", t.ip, f.ip);
        assert!(
            got.starts_with(&banner),
            "{from} → {to}: server must see the client pod's IP {}: {got:?}",
            f.ip
        );
        assert!(got.ends_with(&payload), "{from} → {to}: echo: {got:?}");
        let accepted = self.server(to).accepted();
        assert_eq!(accepted.len(), before + 1, "{from} → {to}: one accept");
        accepted[before].1
    }

    /// [`Mesh::exchange`] over IPv6 (dual-stack mesh): `from` connects to `to`'s IPv6
    /// address; asserts the echo and that the server saw `from`'s IPv6 address.
    pub fn exchange6(&self, from: &str, to: &str) -> SocketAddr {
        let (f, t) = (self.pod(from), self.pod(to));
        let server = &self.servers[&format!("{to}/v6")];
        let before = server.accepted().len();
        let payload = format!("{from}->{to} v6 payload\n");
        let opts = meshcni_testkit::ConnectOpts {
            payload: payload.clone().into_bytes(),
            ..Default::default()
        };
        let got = meshcni_testkit::connect_text(&f.netns, t.addr6(PORT), &opts)
            .unwrap_or_else(|e| panic!("{from} → {to} (IPv6): {e}"));
        let from6 = f.ip6.expect("dual-stack pod");
        let banner = format!("server:{} peer:[{from6}]:", t.addr6(PORT));
        assert!(
            got.starts_with(&banner),
            "{from} → {to} (IPv6): server must see the client pod's IPv6 {from6}: {got:?}"
        );
        assert!(
            got.ends_with(&payload),
            "{from} → {to} (IPv6): echo: {got:?}"
        );
        let accepted = server.accepted();
        assert_eq!(
            accepted.len(),
            before + 1,
            "{from} → {to} (IPv6): one accept"
        );
        accepted[before].1
    }

    /// Hops of both stand-ins, waiting until there are at least `n` in total.
    pub fn hops(&self, n: usize) -> (Vec<ZtunnelHop>, Vec<ZtunnelHop>) {
        let deadline = std::time::Instant::now() + T;
        loop {
            let h1 = self.zt(1).hops();
            let h2 = self.zt(2).hops();
            if h1.len() + h2.len() >= n || std::time::Instant::now() > deadline {
                return (h1, h2);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
