//! `TransparentProxy`: a stand-in for the sidecar / ztunnel listeners. It listens inside a
//! namespace on the capture ports (default 15001 and 15006, IPv4 and IPv6, all with
//! `IP_TRANSPARENT` so both REDIRECT and TPROXY deliveries work) and records, for every
//! connection, the listener port, the peer and the original destination:
//! * REDIRECT (NAT): `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`;
//! * TPROXY: the accepted socket's local address *is* the original destination.
//!
//! It answers `proxied-by:<port> orig:<original dst>\n` and then echoes what the client sent.
//! A DNS stand-in (UDP + TCP, default 15053) records each query's name and answers `A
//! 10.53.0.1` for A queries (an empty NOERROR answer otherwise).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sockets::{Workers, nat_original_dst, tcp_listener, udp_socket};
use crate::{Netns, TestkitError};

/// Address returned for every DNS `A` query.
pub const DNS_ANSWER_V4: Ipv4Addr = Ipv4Addr::new(10, 53, 0, 1);

/// One connection the proxy accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedConn {
    /// The capture port it arrived on (15001, 15006, …).
    pub listener_port: u16,
    /// The client's address as the proxy saw it.
    pub peer: SocketAddr,
    /// Where the client was really going.
    pub original_dst: SocketAddr,
    /// The accepted socket's local address (== original_dst for TPROXY).
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST` result, if conntrack had one.
    pub nat_original_dst: Option<SocketAddr>,
}

/// One DNS query the stand-in received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// `"udp"` or `"tcp"`.
    pub proto: &'static str,
    pub peer: SocketAddr,
    /// Pre-NAT destination (TCP only; UDP has no per-connection conntrack lookup here).
    pub original_dst: Option<SocketAddr>,
    pub qname: String,
}

/// Ports and behaviour of a [`TransparentProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub tcp_ports: Vec<u16>,
    pub dns_port: Option<u16>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            tcp_ports: vec![15001, 15006],
            dns_port: Some(15053),
        }
    }
}

/// The running stand-in; listeners close when it is dropped.
#[derive(Debug)]
pub struct TransparentProxy {
    conns: Arc<Mutex<Vec<ProxiedConn>>>,
    dns: Arc<Mutex<Vec<DnsQuery>>>,
    _workers: Workers,
}

impl TransparentProxy {
    /// Listen on 15001, 15006 (TCP) and 15053 (DNS) inside `ns`.
    pub fn start(ns: &Netns) -> Result<Self, TestkitError> {
        Self::start_with(ns, &ProxyConfig::default())
    }

    /// Listen on the configured ports inside `ns`.
    pub fn start_with(ns: &Netns, cfg: &ProxyConfig) -> Result<Self, TestkitError> {
        Self::start_owned_by(ns, cfg, None)
    }

    /// Like [`TransparentProxy::start_with`], with the sockets owned by `(uid, gid)` as a real
    /// proxy's are (iptables `-m owner` matches the socket owner, i.e. the creator's
    /// fsuid/fsgid). The sockets are created on a dedicated thread whose fsuid/fsgid is switched
    /// (a per-thread change); the caller's credentials are untouched.
    pub fn start_owned_by(
        ns: &Netns,
        cfg: &ProxyConfig,
        owner: Option<(u32, u32)>,
    ) -> Result<Self, TestkitError> {
        let tcp_ports = cfg.tcp_ports.clone();
        let dns_port = cfg.dns_port;
        let what = format!("open proxy listeners in {}", ns.name());
        let (tcp, dns_udp, dns_tcp) = ns
            .run(move || -> std::io::Result<_> {
                if let Some((uid, gid)) = owner {
                    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
                    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
                }
                let mut tcp = Vec::new();
                for port in tcp_ports {
                    for addr in any_addrs(port) {
                        tcp.push((port, tcp_listener(addr, true)?));
                    }
                }
                let mut dns_udp = Vec::new();
                let mut dns_tcp = Vec::new();
                if let Some(port) = dns_port {
                    for addr in any_addrs(port) {
                        dns_udp.push(udp_socket(addr, true)?);
                        dns_tcp.push(tcp_listener(addr, true)?);
                    }
                }
                Ok((tcp, dns_udp, dns_tcp))
            })?
            .map_err(|e| TestkitError::io(what.clone(), e))?;

        let conns = Arc::new(Mutex::new(Vec::new()));
        let dns = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Workers::default();
        for (port, listener) in tcp {
            let log = Arc::clone(&conns);
            workers
                .serve_tcp(listener, move |stream, peer| {
                    proxy_conn(port, stream, peer, &log)
                })
                .map_err(|e| TestkitError::io(what.clone(), e))?;
        }
        for socket in dns_udp {
            let log = Arc::clone(&dns);
            workers
                .serve_udp(socket, move |query, peer, _local| {
                    record_dns(&log, "udp", peer, None, query)
                })
                .map_err(|e| TestkitError::io(what.clone(), e))?;
        }
        for listener in dns_tcp {
            let log = Arc::clone(&dns);
            workers
                .serve_tcp(listener, move |stream, peer| {
                    dns_tcp_conn(stream, peer, &log)
                })
                .map_err(|e| TestkitError::io(what.clone(), e))?;
        }
        Ok(TransparentProxy {
            conns,
            dns,
            _workers: workers,
        })
    }

    /// Connections recorded so far.
    pub fn connections(&self) -> Vec<ProxiedConn> {
        self.conns.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// DNS queries recorded so far.
    pub fn dns_queries(&self) -> Vec<DnsQuery> {
        self.dns.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Wait until at least `n` connections were recorded.
    pub fn wait_for_connections(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ProxiedConn>, TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let conns = self.connections();
            if conns.len() >= n {
                return Ok(conns);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "proxy saw {} connection(s), wanted {n}: {conns:?}",
                    conns.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn any_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

fn proxy_conn(port: u16, mut stream: TcpStream, peer: SocketAddr, log: &Mutex<Vec<ProxiedConn>>) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let nat = nat_original_dst(&stream);
    let record = ProxiedConn {
        listener_port: port,
        peer,
        original_dst: nat.unwrap_or(local),
        local,
        nat_original_dst: nat,
    };
    let marker = format!("proxied-by:{port} orig:{}\n", record.original_dst);
    if let Ok(mut l) = log.lock() {
        l.push(record);
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream.write_all(marker.as_bytes()).is_err() {
        return;
    }
    echo(stream);
}

/// Echo until EOF, then close.
pub(crate) fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match crate::retry_eintr(|| stream.read(&mut buf)) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn dns_tcp_conn(mut stream: TcpStream, peer: SocketAddr, log: &Mutex<Vec<DnsQuery>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let original = nat_original_dst(&stream);
    let mut len = [0u8; 2];
    if stream.read_exact(&mut len).is_err() {
        return;
    }
    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
    if stream.read_exact(&mut query).is_err() {
        return;
    }
    if let Some(reply) = record_dns(log, "tcp", peer, original, &query) {
        let Ok(n) = u16::try_from(reply.len()) else {
            return;
        };
        let _ = stream.write_all(&n.to_be_bytes());
        let _ = stream.write_all(&reply);
    }
}

fn record_dns(
    log: &Mutex<Vec<DnsQuery>>,
    proto: &'static str,
    peer: SocketAddr,
    original_dst: Option<SocketAddr>,
    query: &[u8],
) -> Option<Vec<u8>> {
    let (qname, question_end, qtype) = parse_question(query)?;
    if let Ok(mut l) = log.lock() {
        l.push(DnsQuery {
            proto,
            peer,
            original_dst,
            qname,
        });
    }
    Some(dns_reply(query, question_end, qtype))
}

/// Parse the first question: (dotted name, offset after QTYPE/QCLASS, qtype).
pub fn parse_question(msg: &[u8]) -> Option<(String, usize, u16)> {
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None; // compression is not used in questions of a query
        }
        labels.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).into_owned());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    msg.get(pos + 3)?;
    Some((labels.join("."), pos + 4, qtype))
}

fn dns_reply(query: &[u8], question_end: usize, qtype: u16) -> Vec<u8> {
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    let rd = query[2] & 0x01;
    reply.push(0x80 | rd); // QR, opcode 0, RD copied
    reply.push(0x80); // RA, rcode NOERROR
    let answers: u16 = if qtype == 1 { 1 } else { 0 };
    reply.extend_from_slice(&1u16.to_be_bytes()); // qdcount
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]); // nscount, arcount
    reply.extend_from_slice(&query[12..question_end]);
    if answers == 1 {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        reply.extend_from_slice(&DNS_ANSWER_V4.octets());
    }
    reply
}

/// A DNS query for `name` (type A, RD set) with id `id`.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_query_round_trips_through_the_parser_and_reply() {
        let q = dns_query(0x1234, "svc.example.com");
        let (name, end, qtype) = parse_question(&q).expect("parse");
        assert_eq!(name, "svc.example.com");
        assert_eq!(end, q.len());
        assert_eq!(qtype, 1);
        let r = dns_reply(&q, end, qtype);
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        assert_eq!(&r[r.len() - 4..], &DNS_ANSWER_V4.octets());
        assert!(parse_question(&q[..10]).is_none());
    }
}
