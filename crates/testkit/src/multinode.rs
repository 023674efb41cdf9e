//! `MultiNodeLab`: several "nodes" joined by an underlay, each with ptp-attached pods and a
//! "ztunnel pod" — the shape ztunnel's own integration tests use (DESIGN.md §4).
//!
//! ```text
//!                     fabric netns: bridge br0
//!            n1 ──────────────┴────────────── n2          (veth per node into br0)
//!   node1 eth0 172.31.0.1/24             node2 eth0 172.31.0.2/24
//!     route 10.77.2.0/24 via .2            route 10.77.1.0/24 via .1
//!     vzt ── ztunnel pod 10.77.1.100       vzt ── ztunnel pod 10.77.2.100
//!     vp0 ── pod a 10.77.1.10              vp0 ── pod c 10.77.2.10
//!     vp1 ── pod b 10.77.1.11              …
//! ```
//!
//! Pods are ptp-attached like Calico does it: `eth0` carries the pod IP as a /32, the default
//! route goes `via 169.254.1.1 onlink`, and the node answers for 169.254.1.1 (a link-scope
//! address on every host veth); the node reaches the pod through a `/32` route on the host veth
//! whose preferred source is the node's underlay IP (so node-originated traffic, and the
//! "host IP by route" lookup of the ambient agent, use the underlay address). Forwarding is
//! enabled inside the node namespaces only. Dropping the lab deletes every namespace (and with
//! them every link), on success and on failure alike.
//!
//! **Dual stack** ([`MultiNodeLab::new_dual_stack`]): additionally every workload pod gets
//! `fd77:<node>::<octet>/128` on `eth0` with a default route `via fe80::1` (the node holds
//! `fe80::1` on every host veth of a dual-stack pod), the node a `/128` route to it (preferred
//! source: the node's underlay IPv6 `fd77:ff::<node>/64` on [`UPLINK`]), routes to the other
//! nodes' `fd77:<other>::/64` over the underlay, and IPv6 forwarding on. The ztunnel pods stay
//! IPv4-only. Labs built with [`MultiNodeLab::new`] are IPv4-only, as before.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::proxy::echo;
use crate::sockets::tcp_listener;
use crate::ztunnel::Acceptor;
use crate::{Netns, TestkitError, veth};

/// The link-local gateway every pod routes through.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Last octet of the ztunnel pod on each node (`10.77.<node>.100`).
pub const ZTUNNEL_HOST_OCTET: u8 = 100;
/// Last octet of the first regular pod on each node (`10.77.<node>.10`, `.11`, …).
pub const FIRST_POD_OCTET: u8 = 10;
/// Name of the ztunnel pod's host-side veth in every node netns.
pub const ZTUNNEL_HOST_VETH: &str = "vzt";
/// Name of the node's underlay interface (towards the fabric bridge).
pub const UPLINK: &str = "eth0";

/// The pod subnet of node `index` (1-based): `10.77.<index>.0/24`.
pub fn node_pod_cidr(index: u8) -> String {
    format!("10.77.{index}.0/24")
}

/// The underlay address of node `index` (1-based): `172.31.0.<index>`.
pub fn node_underlay_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, index)
}

/// The IPv6 link-local gateway dual-stack pods route through.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv6 pod subnet of node `index` (1-based) in a dual-stack lab: `fd77:<index>::/64`.
pub fn node_pod_cidr6(index: u8) -> String {
    format!("fd77:{index:x}::/64")
}

/// The IPv6 underlay address of node `index` (1-based) in a dual-stack lab: `fd77:ff::<index>`.
pub fn node_underlay_ip6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0xff, 0, 0, 0, 0, 0, u16::from(index))
}

/// The IPv6 address of the pod with last octet `octet` on node `index`: `fd77:<index>::<octet>`
/// (the same last number as its IPv4 address, in hex notation).
pub fn pod_ip6(index: u8, octet: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, u16::from(index), 0, 0, 0, 0, 0, u16::from(octet))
}

/// A ptp-attached pod (or the ztunnel pod) of a node.
#[derive(Debug)]
pub struct LabPod {
    /// Name given by the test (`"ztunnel"` for the ztunnel pod).
    pub name: String,
    /// 1-based index of the node it runs on.
    pub node: u8,
    /// The pod's network namespace (`eth0` inside).
    pub netns: Netns,
    /// The pod IP (`/32` on `eth0`).
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (`/128` on `eth0`) in a dual-stack lab.
    pub ip6: Option<Ipv6Addr>,
    /// Host-side veth name in the node netns.
    pub host_veth: String,
}

impl LabPod {
    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// `[ip6]:port` of this pod (panics in an IPv4-only lab: a test bug).
    pub fn addr6(&self, port: u16) -> SocketAddr {
        let ip6 = self
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address (IPv4-only lab)", self.name));
        SocketAddr::new(IpAddr::V6(ip6), port)
    }

    /// Every address of the pod: IPv4 first, then IPv6 if any.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip))
            .chain(self.ip6.map(IpAddr::V6))
            .collect()
    }
}

/// One node: its netns, underlay address, ztunnel pod and workload pods.
#[derive(Debug)]
pub struct LabNode {
    /// 1-based node index.
    pub index: u8,
    /// The node's ("host") network namespace.
    pub netns: Netns,
    /// Underlay address on [`UPLINK`] (also the preferred source of node→pod routes).
    pub underlay_ip: Ipv4Addr,
    /// IPv6 underlay address on [`UPLINK`] in a dual-stack lab.
    pub underlay_ip6: Option<Ipv6Addr>,
    /// The ztunnel pod (host veth [`ZTUNNEL_HOST_VETH`]).
    pub ztunnel: LabPod,
    /// Workload pods in creation order.
    pub pods: Vec<LabPod>,
}

/// The whole lab. Field order is drop order: pods and nodes first, the fabric last.
#[derive(Debug)]
pub struct MultiNodeLab {
    /// Nodes in index order (`nodes[0]` is node 1).
    pub nodes: Vec<LabNode>,
    /// The underlay: a netns holding bridge `br0` with one veth per node.
    pub fabric: Netns,
    tag: String,
    dual_stack: bool,
}

impl MultiNodeLab {
    /// Build a lab with one node per entry of `pods`, each with the named workload pods (names
    /// must be unique across the lab). `tag` goes into every namespace name.
    pub fn new(tag: &str, pods: &[&[&str]]) -> Result<MultiNodeLab, TestkitError> {
        Self::build(tag, pods, false)
    }

    /// [`MultiNodeLab::new`] with dual-stack workload pods (see the module docs).
    pub fn new_dual_stack(tag: &str, pods: &[&[&str]]) -> Result<MultiNodeLab, TestkitError> {
        Self::build(tag, pods, true)
    }

    /// Whether workload pods get IPv6 addresses.
    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }

    fn build(tag: &str, pods: &[&[&str]], dual_stack: bool) -> Result<MultiNodeLab, TestkitError> {
        let count = u8::try_from(pods.len())
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| {
                invalid(
                    "build multi-node lab",
                    format!("bad node count {}", pods.len()),
                )
            })?;
        let fabric = Netns::new(&format!("{tag}-fab"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut lab = MultiNodeLab {
            nodes: Vec::new(),
            fabric,
            tag: tag.to_string(),
            dual_stack,
        };
        for index in 1..=count {
            let node = lab.build_node(index, count)?;
            lab.nodes.push(node);
        }
        for (i, names) in pods.iter().enumerate() {
            for name in names.iter() {
                let index = u8::try_from(i + 1).unwrap_or(u8::MAX);
                lab.add_pod(index, name)?;
            }
        }
        Ok(lab)
    }

    fn build_node(&self, index: u8, count: u8) -> Result<LabNode, TestkitError> {
        let netns = Netns::new(&format!("{}-n{index}", self.tag))?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        let fab_if = format!("n{index}");
        veth(&netns, UPLINK, &self.fabric, &fab_if)?;
        self.fabric.ip(&["link", "set", &fab_if, "master", "br0"])?;
        let underlay_ip = node_underlay_ip(index);
        netns.add_addr(UPLINK, &format!("{underlay_ip}/24"))?;
        for other in (1..=count).filter(|o| *o != index) {
            netns.ip(&[
                "route",
                "add",
                &node_pod_cidr(other),
                "via",
                &node_underlay_ip(other).to_string(),
                "dev",
                UPLINK,
            ])?;
        }
        let underlay_ip6 = if self.dual_stack {
            let ip6 = node_underlay_ip6(index);
            netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            netns.add_addr(UPLINK, &format!("{ip6}/64"))?;
            for other in (1..=count).filter(|o| *o != index) {
                netns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &node_pod_cidr6(other),
                    "via",
                    &node_underlay_ip6(other).to_string(),
                    "dev",
                    UPLINK,
                ])?;
            }
            Some(ip6)
        } else {
            None
        };
        let ztunnel = attach_pod(
            &netns,
            &self.tag,
            index,
            (underlay_ip, None),
            "ztunnel",
            (Ipv4Addr::new(10, 77, index, ZTUNNEL_HOST_OCTET), None),
            ZTUNNEL_HOST_VETH,
        )?;
        Ok(LabNode {
            index,
            netns,
            underlay_ip,
            underlay_ip6,
            ztunnel,
            pods: Vec::new(),
        })
    }

    /// Attach a new workload pod to node `index` (1-based); returns it.
    pub fn add_pod(&mut self, index: u8, name: &str) -> Result<&LabPod, TestkitError> {
        let tag = self.tag.clone();
        let node = self
            .nodes
            .get_mut(usize::from(index).wrapping_sub(1))
            .ok_or_else(|| invalid("add pod", format!("no node {index} in the lab")))?;
        let slot = u8::try_from(node.pods.len()).unwrap_or(u8::MAX);
        let octet = FIRST_POD_OCTET
            .checked_add(slot)
            .filter(|o| *o < ZTUNNEL_HOST_OCTET)
            .ok_or_else(|| invalid("add pod", format!("node {index} is full")))?;
        let ip6 = self.dual_stack.then(|| pod_ip6(index, octet));
        let pod = attach_pod(
            &node.netns,
            &tag,
            index,
            (node.underlay_ip, node.underlay_ip6),
            name,
            (Ipv4Addr::new(10, 77, index, octet), ip6),
            &format!("vp{slot}"),
        )?;
        node.pods.push(pod);
        Ok(&node.pods[node.pods.len() - 1])
    }

    /// Node `index` (1-based).
    pub fn node(&self, index: u8) -> &LabNode {
        self.nodes
            .get(usize::from(index).wrapping_sub(1))
            .unwrap_or_else(|| panic!("no node {index} in the lab"))
    }

    /// The workload pod called `name` (panics if there is none: a test bug).
    pub fn pod(&self, name: &str) -> &LabPod {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter())
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// The node a pod runs on.
    pub fn node_of(&self, pod: &LabPod) -> &LabNode {
        self.node(pod.node)
    }
}

fn invalid(what: &str, why: String) -> TestkitError {
    TestkitError::io(
        what,
        std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    )
}

fn attach_pod(
    node: &Netns,
    tag: &str,
    index: u8,
    (node_ip, node_ip6): (Ipv4Addr, Option<Ipv6Addr>),
    name: &str,
    (ip, ip6): (Ipv4Addr, Option<Ipv6Addr>),
    host_veth: &str,
) -> Result<LabPod, TestkitError> {
    let netns = Netns::new(&format!("{tag}-n{index}-{name}"))?;
    veth(&netns, "eth0", node, host_veth)?;
    netns.add_addr("eth0", &format!("{ip}/32"))?;
    let gw = POD_GATEWAY.to_string();
    netns.ip(&["route", "add", &gw, "dev", "eth0", "scope", "link"])?;
    netns.ip(&[
        "route", "add", "default", "via", &gw, "dev", "eth0", "onlink",
    ])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{gw}/32"),
        "dev",
        host_veth,
        "scope",
        "link",
    ])?;
    node.ip(&[
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        host_veth,
        "scope",
        "link",
        "src",
        &node_ip.to_string(),
    ])?;
    if let (Some(ip6), Some(node_ip6)) = (ip6, node_ip6) {
        let gw6 = POD_GATEWAY6.to_string();
        netns.add_addr("eth0", &format!("{ip6}/128"))?;
        netns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        node.add_addr(host_veth, &format!("{gw6}/64"))?;
        node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            host_veth,
            "src",
            &node_ip6.to_string(),
        ])?;
    }
    Ok(LabPod {
        name: name.to_string(),
        node: index,
        netns,
        ip,
        ip6,
        host_veth: host_veth.to_string(),
    })
}

/// Open a TCP connection to `addr` from inside `ns` and hand it back (the socket stays in
/// `ns`; it can be used from any thread). Read/write timeouts are set to `timeout`.
pub fn open_stream(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, TestkitError> {
    let what = format!("open connection to {addr} from {}", ns.name());
    ns.run(|| -> std::io::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(s)
    })?
    .map_err(|e| TestkitError::io(what, e))
}

/// Read one `\n`-terminated line (byte by byte, so nothing after it is consumed).
pub fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = crate::retry_eintr(|| stream.read(&mut byte))?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        line.push(byte[0]);
        if byte[0] == b'\n' || line.len() > 4096 {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Write a line on a long-lived connection to an echo server and expect the echo of it.
pub fn ping(stream: &mut TcpStream, what: &str) -> Result<(), String> {
    let msg = format!("{what}\n");
    stream
        .write_all(msg.as_bytes())
        .map_err(|e| format!("write {what:?}: {e}"))?;
    let got = read_line(stream).map_err(|e| format!("read echo of {what:?}: {e}"))?;
    if got == msg {
        Ok(())
    } else {
        Err(format!("echo of {what:?} was {got:?}"))
    }
}

/// `count` sequential request/response exchanges from one thread inside `ns`: connect, send
/// `payload`, half-close, read to EOF. Returns the wall time of each exchange (connection
/// setup included) and fails on the first exchange that errors or returns fewer bytes than
/// `min_reply`.
pub fn timed_exchanges(
    ns: &Netns,
    addr: SocketAddr,
    count: usize,
    payload: &[u8],
    min_reply: usize,
) -> Result<Vec<Duration>, TestkitError> {
    let what = format!("{count} exchanges with {addr} from {}", ns.name());
    ns.run(|| -> std::io::Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(count);
        for i in 0..count {
            let start = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(payload)?;
            s.shutdown(Shutdown::Write)?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            times.push(start.elapsed());
            if got.len() < min_reply {
                return Err(std::io::Error::other(format!(
                    "exchange {i}: short reply {:?}",
                    String::from_utf8_lossy(&got)
                )));
            }
        }
        Ok(times)
    })?
    .map_err(|e| TestkitError::io(what, e))
}

/// A TCP server with the same behaviour as [`crate::TcpServer`] (writes
/// `server:<local> peer:<peer>\n`, then echoes) but a blocking accept loop instead of a
/// polling one, so connection-latency measurements do not include a polling interval.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _acceptor: Acceptor,
}

impl EchoServer {
    /// Listen on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<EchoServer, TestkitError> {
        let what = format!("listen on {addr} in {}", ns.name());
        let listener = ns
            .run(move || tcp_listener(addr, false))?
            .map_err(|e| TestkitError::io(what.clone(), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| TestkitError::io(what, e))?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let acceptor = Acceptor::spawn(ns, listener, move |mut stream, peer| {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(local) = stream.local_addr() else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            if stream
                .write_all(format!("server:{local} peer:{peer}\n").as_bytes())
                .is_ok()
            {
                echo(stream);
            }
        })?;
        Ok(EchoServer {
            addr: bound,
            accepted,
            _acceptor: acceptor,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
