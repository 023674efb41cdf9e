//! Flows and the table that shows where each one went. A flow is real traffic from one pod's
//! netns to another pod; where it ended up is read from three witnesses: the bytes the client
//! got back, the sidecar stand-ins' records (listener port, original destination, peer) and the
//! servers' records (the peer they saw). Each flow states where it is expected to land, so the
//! demo fails loudly if the plugin's rules do not do what the table claims.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use meshcni_testkit::proxy::{DNS_ANSWER_V4, dns_query};
use meshcni_testkit::{ConnectOpts, TcpServer, TransparentProxy, connect, udp_exchange};
use nix::unistd::{Gid, Uid, setfsgid, setfsuid};

use crate::error::DemoError;
use crate::node::{Node, Pod};

/// The proxy's uid/gid (Istio's default).
pub const PROXY_ID: u32 = 1337;

/// Where a flow should land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Taken by `pod`'s sidecar on `port`.
    Sidecar { pod: &'static str, port: u16 },
    /// Delivered to the destination's server.
    Server,
}

/// What a flow sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    /// One DNS query (A record) over UDP to port 53.
    DnsUdp(&'static str),
}

/// One flow to make.
#[derive(Debug, Clone)]
pub struct Flow {
    pub name: &'static str,
    pub from: &'static str,
    /// Run the client as this uid/gid (1337 = "the proxy").
    pub uid: Option<u32>,
    pub to: &'static str,
    pub port: u16,
    pub proto: Proto,
    pub expect: Expect,
}

/// One table row: what happened.
#[derive(Debug, Clone)]
pub struct Row {
    pub flow: String,
    pub from: String,
    pub to: String,
    pub captured_at: String,
    pub original_dst: String,
    pub server_peer: String,
    pub as_expected: bool,
}

/// Sidecar stand-ins and servers per pod.
#[derive(Default)]
pub struct Mesh {
    sidecars: BTreeMap<&'static str, TransparentProxy>,
    servers: BTreeMap<(&'static str, u16), TcpServer>,
    dns_servers: BTreeMap<&'static str, TransparentProxy>,
}

impl Mesh {
    /// Start a sidecar stand-in (15001, 15006, DNS 15053) in `pod`, owned by the proxy uid.
    ///
    /// Why the proxy uid: the capture rules exempt the proxy's own sockets (uid/gid 1337), and
    /// with DNS capture only the proxy's replies are put back into the app's conntrack zone.
    /// Socket ownership is the file credentials at creation (fsuid/fsgid), so the listeners are
    /// created from a thread whose fsuid/fsgid is 1337; the thread keeps its capabilities
    /// (transparent sockets need CAP_NET_ADMIN) and the change dies with the thread.
    pub fn start_sidecar(&mut self, pod: &Pod) -> Result<(), DemoError> {
        let proxy = std::thread::scope(|s| {
            s.spawn(|| {
                setfsgid(Gid::from_raw(PROXY_ID));
                setfsuid(Uid::from_raw(PROXY_ID));
                TransparentProxy::start(&pod.ns)
            })
            .join()
        })
        .map_err(|_| {
            DemoError::Unexpected(format!("sidecar start for {} panicked", pod.def.name))
        })??;
        // setfsuid is per thread (no glibc set*id broadcast); make sure this thread kept root's.
        let status = std::fs::read_to_string("/proc/thread-self/status")
            .map_err(|e| DemoError::io("read /proc/thread-self/status", e))?;
        let fsuid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(3));
        if fsuid != Some("0") {
            return Err(DemoError::Unexpected(format!(
                "the demo's main thread lost its fsuid while starting a sidecar: {fsuid:?}"
            )));
        }
        self.sidecars.insert(pod.def.name, proxy);
        Ok(())
    }

    /// A TCP server on `0.0.0.0:port` in `pod`.
    pub fn start_server(&mut self, pod: &Pod, port: u16) -> Result<(), DemoError> {
        let server = TcpServer::start(&pod.ns, SocketAddr::from(([0, 0, 0, 0], port)))?;
        self.servers.insert((pod.def.name, port), server);
        Ok(())
    }

    /// A DNS server (UDP + TCP 53) in `pod`.
    pub fn start_dns_server(&mut self, pod: &Pod) -> Result<(), DemoError> {
        let cfg = meshcni_testkit::ProxyConfig {
            tcp_ports: Vec::new(),
            dns_port: Some(53),
        };
        self.dns_servers
            .insert(pod.def.name, TransparentProxy::start_with(&pod.ns, &cfg)?);
        Ok(())
    }

    /// Make `flow` and report what happened.
    pub fn run(&self, node: &Node, flow: &Flow) -> Result<Row, DemoError> {
        let from = node.pod(flow.from)?;
        let to = node.pod(flow.to)?;
        let dst = SocketAddr::V4(SocketAddrV4::new(to.ip, flow.port));
        let who = match flow.uid {
            Some(PROXY_ID) => format!("{} proxy (uid {PROXY_ID})", flow.from),
            Some(uid) => format!("{} (uid {uid})", flow.from),
            None => format!("{} app", flow.from),
        };
        let mut row = Row {
            flow: flow.name.to_string(),
            from: format!("{who} {}", from.ip),
            to: format!("{}:{}", flow.to, flow.port),
            captured_at: "- (direct)".into(),
            original_dst: "-".into(),
            server_peer: "-".into(),
            as_expected: false,
        };
        let landed = match flow.proto {
            Proto::Tcp => self.tcp(node, flow, dst, &mut row)?,
            Proto::DnsUdp(qname) => self.dns(node, flow, dst, qname, &mut row)?,
        };
        row.as_expected = landed == flow.expect;
        Ok(row)
    }

    fn opts(flow: &Flow, payload: Vec<u8>) -> ConnectOpts {
        ConnectOpts {
            uid: flow.uid,
            gid: flow.uid,
            timeout: Duration::from_secs(3),
            payload,
        }
    }

    fn tcp(
        &self,
        node: &Node,
        flow: &Flow,
        dst: SocketAddr,
        row: &mut Row,
    ) -> Result<Expect, DemoError> {
        let before = self.counts();
        let payload = format!("{} says hi\n", flow.from);
        let from = node.pod(flow.from)?;
        let reply = connect(
            &from.ns,
            dst,
            &Self::opts(flow, payload.clone().into_bytes()),
        )?;
        let reply = String::from_utf8_lossy(&reply).into_owned();
        if !reply.ends_with(&payload) {
            return Err(DemoError::Unexpected(format!(
                "{}: payload not echoed: {reply:?}",
                flow.name
            )));
        }
        for (pod, proxy) in &self.sidecars {
            let conns = proxy.connections();
            if let Some(rec) = conns.get(before.sidecar(pod)) {
                let tproxy = rec.local.port() != rec.listener_port;
                row.captured_at = format!(
                    "{pod} sidecar :{}{}",
                    rec.listener_port,
                    if tproxy { " (TPROXY)" } else { "" }
                );
                row.original_dst = rec.original_dst.to_string();
                row.server_peer = format!("- (sidecar saw {})", rec.peer.ip());
                return Ok(Expect::Sidecar {
                    pod,
                    port: rec.listener_port,
                });
            }
        }
        for ((pod, port), server) in &self.servers {
            let accepted = server.accepted();
            if let Some((_, peer)) = accepted.get(before.server(pod, *port)) {
                row.server_peer = format!("{} (on {pod}:{port})", peer.ip());
                return Ok(Expect::Server);
            }
        }
        Err(DemoError::Unexpected(format!(
            "{}: reply {reply:?} but neither a sidecar nor a server recorded the connection",
            flow.name
        )))
    }

    fn dns(
        &self,
        node: &Node,
        flow: &Flow,
        dst: SocketAddr,
        qname: &str,
        row: &mut Row,
    ) -> Result<Expect, DemoError> {
        let before = self.counts();
        let from = node.pod(flow.from)?;
        let reply = udp_exchange(&from.ns, dst, &Self::opts(flow, dns_query(0x6d63, qname)))?;
        if reply.len() < 16
            || reply[..2] != [0x6d, 0x63]
            || reply[reply.len() - 4..] != DNS_ANSWER_V4.octets()
        {
            return Err(DemoError::Unexpected(format!(
                "{}: not a DNS answer: {reply:?}",
                flow.name
            )));
        }
        let answer = format!("{qname} → {DNS_ANSWER_V4}");
        for (pod, proxy) in &self.sidecars {
            if let Some(q) = proxy.dns_queries().get(before.sidecar_dns(pod)) {
                row.captured_at = format!("{pod} sidecar :15053 (DNS)");
                // UDP has no per-connection original-destination lookup; show the question.
                row.original_dst = match q.original_dst {
                    Some(o) => format!("{o} ({answer})"),
                    None => format!("n/a for udp ({answer})"),
                };
                row.server_peer = format!("- (sidecar saw {})", q.peer.ip());
                return Ok(Expect::Sidecar { pod, port: 15053 });
            }
        }
        for (pod, dns) in &self.dns_servers {
            if let Some(q) = dns.dns_queries().get(before.dns_server(pod)) {
                row.server_peer = format!("{} (dns on {pod}:53)", q.peer.ip());
                row.original_dst = format!("- ({answer})");
                return Ok(Expect::Server);
            }
        }
        Err(DemoError::Unexpected(format!(
            "{}: answered, but nobody recorded the query",
            flow.name
        )))
    }

    fn counts(&self) -> Counts {
        Counts {
            sidecar: self
                .sidecars
                .iter()
                .map(|(p, s)| (*p, s.connections().len()))
                .collect(),
            sidecar_dns: self
                .sidecars
                .iter()
                .map(|(p, s)| (*p, s.dns_queries().len()))
                .collect(),
            server: self
                .servers
                .iter()
                .map(|(k, s)| (*k, s.accepted().len()))
                .collect(),
            dns_server: self
                .dns_servers
                .iter()
                .map(|(p, s)| (*p, s.dns_queries().len()))
                .collect(),
        }
    }
}

/// Record counts before a flow, so the new record is the one at that index.
struct Counts {
    sidecar: BTreeMap<&'static str, usize>,
    sidecar_dns: BTreeMap<&'static str, usize>,
    server: BTreeMap<(&'static str, u16), usize>,
    dns_server: BTreeMap<&'static str, usize>,
}

impl Counts {
    fn sidecar(&self, pod: &str) -> usize {
        self.sidecar.get(pod).copied().unwrap_or(0)
    }
    fn sidecar_dns(&self, pod: &str) -> usize {
        self.sidecar_dns.get(pod).copied().unwrap_or(0)
    }
    fn server(&self, pod: &'static str, port: u16) -> usize {
        self.server.get(&(pod, port)).copied().unwrap_or(0)
    }
    fn dns_server(&self, pod: &str) -> usize {
        self.dns_server.get(pod).copied().unwrap_or(0)
    }
}

/// Render rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "flow",
        "from",
        "to",
        "captured at",
        "original dst seen",
        "server saw peer",
        "check",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.flow.clone(),
                r.from.clone(),
                r.to.clone(),
                r.captured_at.clone(),
                r.original_dst.clone(),
                r.server_peer.clone(),
                if r.as_expected { "ok" } else { "UNEXPECTED" }.to_string(),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| -> String {
        cols.iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&header.map(String::from));
    out.push('\n');
    out.push_str(&width.map(|w| "-".repeat(w)).join("-+-"));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}
