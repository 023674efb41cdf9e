//! Test harness of `tests/inpod_traffic.rs`: a two-node [`MultiNodeLab`] (optionally dual
//! stack) running the **real** ambient stack in `inpod` mode on every node — the
//! `meshcni-agent` binary inside the node netns (workloads from a file, every host path in a
//! private scratch dir: its `--host-proc-dir` is an empty dir and its `--netns-dir` holds only
//! links to this lab's pod namespaces), the real `meshcni` plugin exec'd for every pod's CNI ADD
//! with the pod's netns, and per node an in-pod ztunnel stand-in
//! ([`InpodZtunnelStandIn`], a real ZDS client connected to that node's agent) that opens its
//! listeners inside each pod netns it is handed. The stand-ins capture every pod they hold
//! (`auto_capture`, like an xDS feed of the node's enrolled pods) and are told the other
//! node's enrolled pods with `add_captured`, so captured→captured goes over HBONE (15008).
//!
//! Pods (namespace `mesh` is labelled `istio.io/dataplane-mode=ambient`; `plain` and `late`
//! are not, `late` gets labelled by tests):
//!
//! | node | pod | namespace | labels | captured |
//! |---|---|---|---|---|
//! | 1 | a | mesh | – | yes |
//! | 1 | b | plain | – | no |
//! | 1 | d | mesh | – | yes |
//! | 1 | o | mesh | `istio.io/dataplane-mode=none` (opt-out) | no |
//! | 1 | r | late | – | when `late` is labelled |
//! | 1 | s | mesh | – | yes (IPv6 only with [`Opts::ipv6_only_s`]) |
//! | 2 | c | mesh | – | yes |
//! | 2 | e | plain | – | no |
//! | 2 | f | mesh | – | yes |
//!
//! Every pod runs a [`TcpServer`] on `PORT` (on its IPv4 address and, in a dual-stack lab, its
//! IPv6 address). Ambient pods are Pending (no IP) in the workloads file until their CNI ADD
//! returned (what the API server shows while the runtime sets the sandbox up), then Running.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use meshcni_testkit::multinode::ping;
use meshcni_testkit::multinode::{open_stream, read_line};
use meshcni_testkit::stack::{
    self as kit, Agent, AgentDirs, CniOutcome, DATAPLANE_MODE, StackMode, namespace_json,
    plugin_add_ips, pod_json, pod_uid, write_pod_metadata, write_workloads,
};
use meshcni_testkit::{
    InpodHop, InpodZtunnelConfig, InpodZtunnelStandIn, LabPod, MultiNodeLab, Netns, TcpServer,
};
use serde_json::{Value, json};

pub const PORT: u16 = 8080;
/// Connect/read timeout of one exchange.
pub const T: Duration = Duration::from_secs(5);
/// Upper bound of every wait for the agent or the stand-in.
pub const WAIT: Duration = Duration::from_secs(30);
/// The node's probe SNAT source addresses (the agent's defaults).
pub const PROBE_SNAT_V4: &str = "169.254.7.127";
pub const PROBE_SNAT_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";

/// (node, pod, namespace, pod labels)
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
    (1, "r", "late", &[]),
    (1, "s", "mesh", &[]),
    (2, "c", "mesh", &[]),
    (2, "e", "plain", &[]),
    (2, "f", "mesh", &[]),
];

/// How the mesh is built.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts {
    /// Dual-stack pods (the inpod rules are dual-stack: `AMBIENT_IPV6` defaults on in inpod).
    pub dual_stack: bool,
    /// Per node (index 0 = node 1): `--ambient-dns-capture` of the agent and the stand-in's
    /// DNS proxy on 15053.
    pub dns_capture: [bool; 2],
    /// Dual stack only: pod `s` is IPv6-only (its IPv4 address and route are removed before
    /// anything starts; its CNI result and pod status carry only its IPv6 address).
    pub ipv6_only_s: bool,
    /// Pod annotations `(pod, key, value)` from the start (e.g. per-pod DNS capture). An
    /// `ambient.istio.io/dns-capture` annotation is also given to the pod's stand-in, as
    /// ztunnel learns it from xDS.
    pub annotations: &'static [(&'static str, &'static str, &'static str)],
}

/// One node's stack. Field order is drop order: the stand-in disconnects, then the agent
/// gets SIGTERM.
pub struct NodeStack {
    pub zt: InpodZtunnelStandIn,
    pub agent: Agent,
    pub dirs: AgentDirs,
}

pub struct Mesh {
    /// Per node, index 0 = node 1. Dropped before the lab (field order).
    pub nodes: Vec<NodeStack>,
    /// Per pod name: the server on its IPv4 address, and on its IPv6 one (dual stack).
    pub servers: BTreeMap<String, TcpServer>,
    pub servers6: BTreeMap<String, TcpServer>,
    /// Namespace labels (mutable: label flips).
    pub ns_labels: RefCell<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pod labels (mutable: pod-level opt-in/opt-out), initially those of [`PODS`].
    pub pod_labels: RefCell<BTreeMap<String, BTreeMap<String, String>>>,
    /// Pods shown Running (with IPs) in the workloads file.
    pub running: BTreeSet<String>,
    /// Pods without IPv4.
    pub ipv6_only: BTreeSet<String>,
    pub opts: Opts,
    pub plugin: PathBuf,
    pub lab: MultiNodeLab,
    pub tmp: tempfile::TempDir,
}

fn binaries() -> (PathBuf, PathBuf) {
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = Path::new(env!("CARGO_BIN_EXE_meshcni-agent")).with_file_name("meshcni");
    assert!(
        plugin.is_file(),
        "meshcni plugin binary missing at {}",
        plugin.display()
    );
    (agent, plugin)
}

pub fn spec(name: &str) -> &'static PodSpec {
    PODS.iter()
        .find(|p| p.1 == name)
        .unwrap_or_else(|| panic!("no pod {name} in PODS"))
}

/// The kit's uid of pod `name`.
pub fn uid(name: &str) -> String {
    pod_uid(name)
}

impl Mesh {
    pub fn new(tag: &str, opts: Opts) -> Mesh {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let (agent_bin, plugin) = binaries();
        let node1: Vec<&str> = PODS.iter().filter(|p| p.0 == 1).map(|p| p.1).collect();
        let node2: Vec<&str> = PODS.iter().filter(|p| p.0 == 2).map(|p| p.1).collect();
        let lab = if opts.dual_stack {
            MultiNodeLab::new_dual_stack(tag, &[&node1, &node2])
        } else {
            MultiNodeLab::new(tag, &[&node1, &node2])
        }
        .expect("multi-node lab");
        let mut ipv6_only = BTreeSet::new();
        if opts.ipv6_only_s {
            assert!(opts.dual_stack, "an IPv6-only pod needs a dual-stack lab");
            let s = lab.pod("s");
            s.netns
                .ip(&["route", "del", "default"])
                .expect("drop the IPv4 default route");
            s.netns
                .ip(&["addr", "del", &format!("{}/32", s.ip), "dev", "eth0"])
                .expect("drop the IPv4 address");
            ipv6_only.insert("s".to_string());
        }
        let mut servers = BTreeMap::new();
        let mut servers6 = BTreeMap::new();
        for (_, name, _, _) in PODS {
            let pod = lab.pod(name);
            if !ipv6_only.contains(*name) {
                servers.insert(
                    name.to_string(),
                    TcpServer::start(&pod.netns, pod.addr(PORT)).expect("server"),
                );
            }
            if pod.ip6.is_some() {
                servers6.insert(
                    name.to_string(),
                    TcpServer::start(&pod.netns, pod.addr6(PORT)).expect("server v6"),
                );
            }
        }
        let ns_labels: BTreeMap<String, BTreeMap<String, String>> = [
            (
                "mesh".to_string(),
                [(DATAPLANE_MODE.to_string(), "ambient".to_string())].into(),
            ),
            ("plain".to_string(), BTreeMap::new()),
            ("late".to_string(), BTreeMap::new()),
            ("istio-system".to_string(), BTreeMap::new()),
        ]
        .into();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut mesh = Mesh {
            nodes: Vec::new(),
            servers,
            servers6,
            ns_labels: RefCell::new(ns_labels),
            pod_labels: RefCell::new(
                PODS.iter()
                    .map(|p| {
                        let l = p.3.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                        (p.1.to_string(), l.collect())
                    })
                    .collect(),
            ),
            // Non-ambient pods are running already; ambient ones wait for their ADD.
            running: PODS
                .iter()
                .filter(|p| {
                    p.2 != "mesh"
                        || p.3
                            .iter()
                            .any(|(k, v)| *k == DATAPLANE_MODE && *v == "none")
                })
                .map(|p| p.1.to_string())
                .collect(),
            ipv6_only,
            opts,
            plugin: plugin.clone(),
            lab,
            tmp,
        };
        for index in 1..=2u8 {
            let i = usize::from(index) - 1;
            let dirs = AgentDirs::create(&mesh.tmp.path().join(format!("node{index}")), &plugin)
                .expect("agent dirs");
            // The agent's private netns dir: links to this node's pod namespaces only (what
            // a runtime's /var/run/netns holds), for discovery of running pods.
            for pod in &mesh.lab.node(index).pods {
                std::os::unix::fs::symlink(pod.netns.path(), dirs.netns_dir.join(&pod.name))
                    .expect("netns link");
            }
            mesh.write_node_workloads(index, &dirs);
            for pod in &mesh.lab.node(index).pods {
                write_pod_metadata(
                    &dirs.meta,
                    &mesh.pod_json(&pod.name),
                    &mesh.ns_json(spec(&pod.name).2),
                )
                .expect("pod metadata");
            }
            let dns = if opts.dns_capture[i] { "true" } else { "false" };
            let node_ns = mesh.lab.node(index).netns.path().to_path_buf();
            let mut agent = Agent::start_mode(
                &agent_bin,
                &node_ns,
                &format!("node{index}"),
                &dirs,
                StackMode::Inpod,
                &[("AMBIENT_DNS_CAPTURE", dns)],
            )
            .expect("agent");
            let zt = InpodZtunnelStandIn::start_with(InpodZtunnelConfig {
                dns_capture: opts.dns_capture[i],
                auto_capture: true,
                ..InpodZtunnelConfig::new(&dirs.zds_socket)
            })
            .expect("stand-in");
            for (pod, key, value) in opts.annotations {
                if *key == meshcni_rules::inpod::ANNOTATION_DNS_CAPTURE && spec(pod).0 == index {
                    zt.set_dns_capture(&uid(pod), *value == "true");
                }
            }
            let (_, config) = agent.wait_ready(WAIT).expect("agent ready");
            assert_eq!(config, r#"{"ztunnelReady":true,"redirectMode":"inpod"}"#);
            mesh.nodes.push(NodeStack { zt, agent, dirs });
        }
        // Every pod's CNI ADD through the real plugin, with its netns.
        for (node, name, _, _) in PODS {
            let out = mesh.cni_add(*node, name);
            assert!(
                out.success,
                "ADD {name}: {out:?}\nagent log:\n{}",
                mesh.node(*node).agent.log()
            );
            mesh.running.insert(name.to_string());
        }
        mesh.write_workloads();
        for (node, name, _, _) in PODS {
            let held = mesh.zt(*node).workload(&uid(name)).is_some();
            assert_eq!(held, mesh.is_ambient(name), "{name} held by ztunnel-{node}");
        }
        mesh.sync_captured();
        mesh
    }

    pub fn node(&self, index: u8) -> &NodeStack {
        &self.nodes[usize::from(index) - 1]
    }

    /// The stand-in of node `index` (1-based).
    pub fn zt(&self, index: u8) -> &InpodZtunnelStandIn {
        &self.node(index).zt
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        self.lab.pod(name)
    }

    /// Whether the pod should be in the mesh per the current labels.
    pub fn is_ambient(&self, name: &str) -> bool {
        let (_, _, ns, _) = spec(name);
        if let Some(v) = self.pod_labels.borrow()[name].get(DATAPLANE_MODE) {
            return v == "ambient";
        }
        self.ns_labels.borrow()[*ns]
            .get(DATAPLANE_MODE)
            .map(String::as_str)
            == Some("ambient")
    }

    pub fn ns_json(&self, ns: &str) -> Value {
        let all = self.ns_labels.borrow();
        let labels: Vec<(&str, &str)> = all[ns]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        namespace_json(ns, &labels)
    }

    /// The pod object as the API server shows it now (Pending without IPs before its ADD).
    pub fn pod_json(&self, name: &str) -> Value {
        let (node, _, ns, _) = spec(name);
        let pod = self.pod(name);
        let running = self.running.contains(name);
        let all = self.pod_labels.borrow();
        let labels: Vec<(&str, &str)> = all[name]
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let annotations: Vec<(&str, &str)> = self
            .opts
            .annotations
            .iter()
            .filter(|a| a.0 == name)
            .map(|a| (a.1, a.2))
            .collect();
        let mut v = pod_json(
            ns,
            name,
            &format!("node{node}"),
            running.then_some(pod.ip),
            &labels,
            &annotations,
        );
        if running {
            let ips = self.pod_ips(name);
            v["status"]["podIP"] = json!(ips[0].to_string());
            v["status"]["podIPs"] = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        }
        v
    }

    /// The pod's addresses as its CNI result and status show them.
    pub fn pod_ips(&self, name: &str) -> Vec<IpAddr> {
        let ips = self.pod(name).ips();
        if self.ipv6_only.contains(name) {
            ips.into_iter().filter(IpAddr::is_ipv6).collect()
        } else {
            ips
        }
    }

    fn write_node_workloads(&self, index: u8, dirs: &AgentDirs) {
        let names: Vec<String> = self.ns_labels.borrow().keys().cloned().collect();
        let namespaces: Vec<Value> = names.iter().map(|n| self.ns_json(n)).collect();
        let pods: Vec<Value> = PODS
            .iter()
            .filter(|p| p.0 == index)
            .map(|p| self.pod_json(p.1))
            .collect();
        write_workloads(&dirs.workloads, &namespaces, &pods).expect("workloads file");
    }

    /// Rewrite every node's workloads file from the current state (what the watch delivers).
    pub fn write_workloads(&self) {
        for n in &self.lab.nodes {
            self.write_node_workloads(n.index, &self.node(n.index).dirs);
        }
    }

    /// Set (`Some`) or remove (`None`) a namespace label and rewrite the workloads files; no
    /// CNI event, no restart.
    pub fn set_ns_label(&self, ns: &str, key: &str, value: Option<&str>) {
        {
            let mut all = self.ns_labels.borrow_mut();
            let l = all.get_mut(ns).expect("namespace");
            match value {
                Some(v) => {
                    l.insert(key.to_string(), v.to_string());
                }
                None => {
                    l.remove(key);
                }
            }
        }
        self.write_workloads();
    }

    /// Set (`Some`) or remove (`None`) a pod label and rewrite the workloads files; no CNI
    /// event, no restart.
    pub fn set_pod_label(&self, pod: &str, key: &str, value: Option<&str>) {
        {
            let mut all = self.pod_labels.borrow_mut();
            let l = all.get_mut(pod).expect("pod");
            match value {
                Some(v) => {
                    l.insert(key.to_string(), v.to_string());
                }
                None => {
                    l.remove(key);
                }
            }
        }
        self.write_workloads();
    }

    /// Tell each stand-in the *other* node's ambient pods (its own are auto-captured once
    /// held): the xDS view of which destinations speak HBONE.
    pub fn sync_captured(&self) {
        for n in &self.lab.nodes {
            let remote: Vec<IpAddr> = PODS
                .iter()
                .filter(|p| p.0 != n.index && self.is_ambient(p.1))
                .flat_map(|p| self.pod_ips(p.1))
                .collect();
            let zt = self.zt(n.index);
            for p in PODS.iter().filter(|p| p.0 != n.index) {
                for ip in self.pod(p.1).ips() {
                    zt.remove_captured(ip);
                }
            }
            for ip in remote {
                zt.add_captured(ip);
            }
        }
    }

    /// The pod's CNI ADD: the real plugin, run like a runtime in the node netns, with the
    /// pod's netns and a ptp-style prevResult carrying all its addresses.
    pub fn cni_add(&self, node: u8, name: &str) -> CniOutcome {
        let pod = self.pod(name);
        let (_, _, ns, _) = spec(name);
        plugin_add_ips(
            &self.plugin,
            self.lab.node(node).netns.path(),
            pod.netns.path(),
            ns,
            name,
            &self.pod_ips(name),
            &self.node(node).dirs,
        )
        .expect("plugin")
    }

    /// Forget every recorded hop.
    pub fn clear_hops(&self) {
        for n in &self.nodes {
            n.zt.take_hops();
        }
    }

    /// The server listening on `to`.
    pub fn server_at(&self, to: SocketAddr) -> &TcpServer {
        self.servers
            .values()
            .chain(self.servers6.values())
            .find(|s| s.addr() == to)
            .unwrap_or_else(|| panic!("no server on {to}"))
    }

    /// From the netns `from` (whose traffic should appear to come from `from_ip`) connect to
    /// `to`, send a payload and read to EOF: asserts the server banner names `to` and a peer
    /// with `from_ip`, the payload echoed, and exactly one new accept. Returns the peer the
    /// server saw.
    pub fn exchange_ns(&self, from: &Netns, from_ip: IpAddr, to: SocketAddr) -> SocketAddr {
        let server = self.server_at(to);
        let before = server.accepted().len();
        let payload = format!("{from_ip}->{to} payload\n");
        let opts = meshcni_testkit::ConnectOpts {
            payload: payload.clone().into_bytes(),
            timeout: T,
            ..Default::default()
        };
        let got = meshcni_testkit::connect_text(from, to, &opts)
            .unwrap_or_else(|e| panic!("{from_ip} → {to}: {e}"));
        let peer_ip = match from_ip {
            IpAddr::V4(v) => v.to_string(),
            IpAddr::V6(v) => format!("[{v}]"),
        };
        let banner = format!("server:{to} peer:{peer_ip}:");
        assert!(
            got.starts_with(&banner),
            "{from_ip} → {to}: server must see {from_ip}: {got:?}"
        );
        assert!(got.ends_with(&payload), "{from_ip} → {to}: echo: {got:?}");
        let accepted = server.accepted();
        assert_eq!(accepted.len(), before + 1, "{from_ip} → {to}: one accept");
        accepted[before].1
    }

    /// Pod `from` → `to`'s server (`v6`: over IPv6). Returns the peer the server saw.
    pub fn exchange(&self, from: &str, to: &str, v6: bool) -> SocketAddr {
        let f = self.pod(from);
        let (src, dst) = if v6 {
            (IpAddr::V6(f.ip6.expect("ipv6")), self.pod(to).addr6(PORT))
        } else {
            (IpAddr::V4(f.ip), self.pod(to).addr(PORT))
        };
        self.exchange_ns(&f.netns, src, dst)
    }

    /// Pod `from` → `to` over a connection that must be direct: the server's peer is exactly
    /// the client's own socket, and no stand-in recorded a hop for it (a hop is recorded before
    /// any byte is relayed, so when the banner arrived any hop would already be there).
    pub fn assert_direct(&self, from: &str, to: &str, v6: bool) {
        let dst = if v6 {
            self.pod(to).addr6(PORT)
        } else {
            self.pod(to).addr(PORT)
        };
        let before: Vec<usize> = self.nodes.iter().map(|n| n.zt.hops().len()).collect();
        let mut s = open_stream(&self.pod(from).netns, dst, T)
            .unwrap_or_else(|e| panic!("{from} → {dst}: {e}"));
        let banner = read_line(&mut s).unwrap_or_else(|e| panic!("{from} → {dst}: {e}"));
        let local = s.local_addr().expect("local");
        assert_eq!(
            banner,
            format!("server:{dst} peer:{local}\n"),
            "{from} → {to} ({dst}) must be direct"
        );
        ping(&mut s, &format!("{from}->{to}")).expect("echo on a direct connection");
        let after: Vec<usize> = self.nodes.iter().map(|n| n.zt.hops().len()).collect();
        assert_eq!(
            before,
            after,
            "{from} → {dst}: no stand-in hop: {:?} {:?}",
            self.zt(1).hops(),
            self.zt(2).hops()
        );
    }

    /// Exactly `n1` and `n2` hops on the two stand-ins (waiting up to `T` for them).
    pub fn hops(&self, n1: usize, n2: usize) -> (Vec<InpodHop>, Vec<InpodHop>) {
        let deadline = Instant::now() + T;
        loop {
            let h1 = self.zt(1).hops();
            let h2 = self.zt(2).hops();
            if (h1.len() >= n1 && h2.len() >= n2) || Instant::now() > deadline {
                assert_eq!(
                    h1.len(),
                    n1,
                    "hops of ztunnel-1: {h1:?} (ztunnel-2: {h2:?})"
                );
                assert_eq!(
                    h2.len(),
                    n2,
                    "hops of ztunnel-2: {h2:?} (ztunnel-1: {h1:?})"
                );
                return (h1, h2);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait until `cond` holds (polling every 10 ms), else panic naming `what`.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {WAIT:?}; agent logs:\n--- node1\n{}\n--- node2\n{}",
                self.node(1).agent.log(),
                self.node(2).agent.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Every rule-ish thing in a netns: both iptables flavours, both families, and nft.
pub fn netns_rules(ns: &Netns) -> String {
    let mut out = String::new();
    for (prog, args) in [
        ("iptables-legacy-save", &[][..]),
        ("ip6tables-legacy-save", &[][..]),
        ("iptables-nft-save", &[][..]),
        ("ip6tables-nft-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let text = kit::exec_in(ns.path(), prog, args).unwrap_or_else(|e| panic!("{e}"));
        out.push_str(&format!("## {prog}\n{}", kit::normalize_save(&text)));
    }
    out
}

/// Whether the in-pod rules (or any trace of them) are in the netns text of [`netns_rules`].
pub fn has_inpod_rules(rules: &str) -> bool {
    let l = rules.to_lowercase();
    ["istio", "0x539", "15001", "15006"]
        .iter()
        .any(|n| l.contains(n))
}

/// The in-pod rules of one family (`iptables-save` / `ip6tables-save` of whichever flavour
/// holds them), for asserting both families are programmed.
pub fn family_has_redirects(rules: &str, v6: bool) -> bool {
    let mut cur = "";
    let mut found = false;
    for line in rules.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            cur = h;
            continue;
        }
        let is_v6 = cur.starts_with("ip6tables");
        let is_ipt = cur.starts_with("ip");
        if is_ipt && is_v6 == v6 && line.contains("--to-ports 15001") {
            found = true;
        }
    }
    found
}

// ---- a real resolver and DNS clients ---------------------------------------------------------

/// `(proto, peer, qname)` of each query a [`Resolver`] answered.
type QueryLog = Arc<Mutex<Vec<(&'static str, SocketAddr, String)>>>;

/// A real DNS server (UDP + TCP on `addr`, inside a netns) answering every `A` query with
/// `answer`, recording `(proto, peer, qname)`.
pub struct Resolver {
    pub addr: SocketAddr,
    pub answer: Ipv4Addr,
    queries: QueryLog,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Resolver {
    pub fn start(ns: &Netns, addr: SocketAddr, answer: Ipv4Addr) -> Resolver {
        let (udp, tcp) = ns
            .run(move || -> std::io::Result<(UdpSocket, TcpListener)> {
                Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
            })
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind resolver on {addr}: {e}"));
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        tcp.set_nonblocking(true).expect("nonblocking");
        let queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (q, stop) = (Arc::clone(&queries), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((name, reply)) = answer_query(&buf[..n], answer) {
                        q.lock().expect("lock").push(("udp", peer, name));
                        let _ = udp.send_to(&reply, peer);
                    }
                }
            }));
        }
        {
            let (q, stop) = (Arc::clone(&queries), Arc::clone(&stop));
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut s, peer)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(T));
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        continue;
                    }
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut query).is_err() {
                        continue;
                    }
                    if let Some((name, reply)) = answer_query(&query, answer) {
                        q.lock().expect("lock").push(("tcp", peer, name));
                        let n = u16::try_from(reply.len()).unwrap_or(0).to_be_bytes();
                        let _ = s.write_all(&n);
                        let _ = s.write_all(&reply);
                    }
                }
            }));
        }
        Resolver {
            addr,
            answer,
            queries,
            stop,
            threads,
        }
    }

    pub fn queries(&self) -> Vec<(&'static str, SocketAddr, String)> {
        self.queries.lock().expect("lock").clone()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An `A` answer to `query` with `addr`; `None` if it is not a query.
fn answer_query(query: &[u8], addr: Ipv4Addr) -> Option<(String, Vec<u8>)> {
    let (name, end, _) = meshcni_testkit::proxy::parse_question(query)?;
    let mut r = Vec::new();
    r.extend_from_slice(query.get(..2)?);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..end)?);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
    r.extend_from_slice(&addr.octets());
    Some((name, r))
}

/// The `A` address of a one-answer reply to a query with id `id`.
pub fn answer_of(reply: &[u8], id: u16) -> Option<Ipv4Addr> {
    if reply.len() < 16 || reply[..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return None;
    }
    let a = &reply[reply.len() - 4..];
    Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}

/// A DNS query over TCP (length-prefixed) from inside `ns`; the reply.
pub fn dns_tcp(ns: &Netns, to: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    let q = query.to_vec();
    ns.run(move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&to, T)?;
        s.set_read_timeout(Some(T))?;
        let n = u16::try_from(q.len()).map_err(std::io::Error::other)?;
        s.write_all(&n.to_be_bytes())?;
        s.write_all(&q)?;
        s.shutdown(Shutdown::Write)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut reply)?;
        Ok(reply)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("DNS over TCP to {to}: {e}"))
}

/// A DNS query over UDP from inside `ns`; the reply.
pub fn dns_udp(ns: &Netns, to: SocketAddr, query: &[u8]) -> Result<Vec<u8>, String> {
    meshcni_testkit::udp_exchange(
        ns,
        to,
        &meshcni_testkit::ConnectOpts {
            payload: query.to_vec(),
            timeout: T,
            ..Default::default()
        },
    )
    .map_err(|e| format!("DNS over UDP to {to}: {e}"))
}
