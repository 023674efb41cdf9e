//! `ZtunnelStandIn`: a node-level ztunnel (≤ 1.22) stand-in for the "ztunnel pod" netns of a
//! lab. It opens the same transparent listeners ztunnel does (15001 outbound, 15006 inbound
//! plaintext, 15008 inbound "HBONE"; `0.0.0.0` and `[::]`, `IP_TRANSPARENT`) and forwards the
//! way ztunnel does, so a redirect mode is exercised end to end:
//!
//! * **15001 (outbound)**: the original destination is the accepted socket's local address
//!   (TPROXY; `SO_ORIGINAL_DST` when the connection was NATed instead). If it is a *captured*
//!   workload (the stand-in's xDS stand-in: an updatable IP set) the stand-in opens a tunnel from
//!   its own pod IP to `<dst ip>:15008` and sends `CONNECT <dst ip:port> <client ip>\n` (HBONE
//!   emulated by one header line); otherwise it connects to the destination directly **with the
//!   client's source address** (`IP_TRANSPARENT`, bind `<client ip>:0`), as ztunnel does.
//! * **15006 (inbound plaintext)**: connects to the original destination with the client's source
//!   address.
//! * **15008 (inbound HBONE)**: reads the `CONNECT` line, then connects to the target with the
//!   original client's IP as source.
//!
//! Bytes are piped both ways; half-closes are propagated. Every hop is recorded
//! ([`ZtunnelHop`]), including failed upstream connects. The stand-in only opens sockets: the
//! ztunnel netns routes/rules/tunnels are the redirect mode's business.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, connect, setsockopt, socket,
    sockopt,
};
use nix::sys::time::TimeVal;

use crate::multinode::read_line;
use crate::sockets::{nat_original_dst, tcp_listener};
use crate::{Netns, TestkitError};

/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PORT: u16 = 15006;
/// Inbound HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// One connection the stand-in accepted and what it did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelHop {
    /// The listener it arrived on (15001, 15006 or 15008).
    pub listener_port: u16,
    /// The peer as accepted (for 15008: the sending ztunnel).
    pub peer: SocketAddr,
    /// The accepted socket's local address (TPROXY) or `SO_ORIGINAL_DST` when NATed.
    pub original_dst: SocketAddr,
    /// 15008 only: the target and original client of the `CONNECT` line.
    pub hbone: Option<(SocketAddr, IpAddr)>,
    /// Where the stand-in connected upstream.
    pub upstream_dst: Option<SocketAddr>,
    /// The upstream socket's local address (source the next hop saw), if the connect worked.
    pub upstream_local: Option<SocketAddr>,
    /// Why the hop failed (bad CONNECT line, upstream connect error), if it did.
    pub error: Option<String>,
}

/// Behaviour of a [`ZtunnelStandIn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelConfig {
    /// The ztunnel pod's own IP: source of HBONE tunnels.
    pub own_ip: IpAddr,
    /// Workload IPs that are "captured" (HBONE-capable) at start.
    pub captured: Vec<IpAddr>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// `SO_MARK` for upstream sockets (ztunnel ≤ 1.22 node-level sets none).
    pub upstream_mark: Option<u32>,
}

impl ZtunnelConfig {
    /// Defaults for a ztunnel pod with address `own_ip`.
    pub fn new(own_ip: IpAddr) -> Self {
        ZtunnelConfig {
            own_ip,
            captured: Vec::new(),
            connect_timeout: Duration::from_secs(3),
            upstream_mark: None,
        }
    }
}

#[derive(Debug)]
struct Shared {
    cfg: ZtunnelConfig,
    captured: RwLock<HashSet<IpAddr>>,
    hops: Mutex<Vec<ZtunnelHop>>,
}

/// The running stand-in. Listeners close on drop (piping threads of still-open connections
/// finish when those connections close).
#[derive(Debug)]
pub struct ZtunnelStandIn {
    shared: Arc<Shared>,
    _acceptors: Vec<Acceptor>,
}

impl ZtunnelStandIn {
    /// Start in `ns` with own IP `own_ip` and nothing captured.
    pub fn start(ns: &Netns, own_ip: IpAddr) -> Result<Self, TestkitError> {
        Self::start_with(ns, ZtunnelConfig::new(own_ip))
    }

    /// Start in `ns` with `cfg`.
    pub fn start_with(ns: &Netns, cfg: ZtunnelConfig) -> Result<Self, TestkitError> {
        let shared = Arc::new(Shared {
            captured: RwLock::new(cfg.captured.iter().copied().collect()),
            cfg,
            hops: Mutex::new(Vec::new()),
        });
        let mut acceptors = Vec::new();
        for port in [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT] {
            for addr in [
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            ] {
                let what = format!("ztunnel stand-in: listen on {addr} in {}", ns.name());
                let listener = ns
                    .run(move || tcp_listener(addr, true))?
                    .map_err(|e| TestkitError::io(what.clone(), e))?;
                let shared = Arc::clone(&shared);
                acceptors.push(Acceptor::spawn(ns, listener, move |stream, peer| {
                    handle_conn(port, stream, peer, &shared);
                })?);
            }
        }
        Ok(ZtunnelStandIn {
            shared,
            _acceptors: acceptors,
        })
    }

    /// Replace the captured workload set (as an xDS update would).
    pub fn set_captured(&self, ips: impl IntoIterator<Item = IpAddr>) {
        if let Ok(mut c) = self.shared.captured.write() {
            *c = ips.into_iter().collect();
        }
    }

    /// Mark one workload captured.
    pub fn add_captured(&self, ip: IpAddr) {
        if let Ok(mut c) = self.shared.captured.write() {
            c.insert(ip);
        }
    }

    /// Mark one workload uncaptured.
    pub fn remove_captured(&self, ip: IpAddr) {
        if let Ok(mut c) = self.shared.captured.write() {
            c.remove(&ip);
        }
    }

    /// Hops recorded so far.
    pub fn hops(&self) -> Vec<ZtunnelHop> {
        self.shared
            .hops
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }

    /// Return and forget the hops recorded so far.
    pub fn take_hops(&self) -> Vec<ZtunnelHop> {
        self.shared
            .hops
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    /// Wait until at least `n` hops were recorded; returns them.
    pub fn wait_for_hops(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ZtunnelHop>, TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            let hops = self.hops();
            if hops.len() >= n {
                return Ok(hops);
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "ztunnel stand-in recorded {} hop(s), wanted {n}: {hops:?}",
                    hops.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A blocking accept loop on a thread inside a netns; each connection is handled on its own
/// thread (spawned from the netns thread, so sockets it creates belong to the netns too).
/// Blocking `accept` (no polling interval) keeps the measured connection latency honest; on
/// drop the listening socket is shut down, which wakes the blocked `accept`.
#[derive(Debug)]
pub(crate) struct Acceptor {
    stop: Arc<AtomicBool>,
    waker: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub(crate) fn spawn<F>(
        ns: &Netns,
        listener: TcpListener,
        handle: F,
    ) -> Result<Self, TestkitError>
    where
        F: Fn(TcpStream, SocketAddr) + Send + Sync + 'static,
    {
        let what = format!("accept loop in {}", ns.name());
        let waker = listener
            .try_clone()
            .map_err(|e| TestkitError::io(what.clone(), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = Arc::new(handle);
        let thread = meshcni_netx::spawn_in_netns(ns.path(), "mcni-accept", move |_| {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let handle = Arc::clone(&handle);
                        std::thread::spawn(move || handle(stream, peer));
                    }
                    Err(_) if flag.load(Ordering::SeqCst) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })?;
        Ok(Acceptor {
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (it returns EINVAL on a shut-down listener).
        let _ =
            nix::sys::socket::shutdown(self.waker.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle_conn(port: u16, mut client: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let Ok(local) = client.local_addr() else {
        return;
    };
    let original_dst = nat_original_dst(&client).unwrap_or(local);
    let mut hop = ZtunnelHop {
        listener_port: port,
        peer,
        original_dst,
        hbone: None,
        upstream_dst: None,
        upstream_local: None,
        error: None,
    };
    let upstream = match plan_upstream(port, &mut client, peer, original_dst, shared, &mut hop) {
        Ok(plan) => plan,
        Err(e) => {
            hop.error = Some(e);
            record(shared, hop);
            return;
        }
    };
    hop.upstream_dst = Some(upstream.dst);
    match open_upstream(&upstream, shared) {
        Ok(mut up) => {
            hop.upstream_local = up.local_addr().ok();
            if let Some(line) = &upstream.preamble
                && let Err(e) = up.write_all(line.as_bytes())
            {
                hop.error = Some(format!("send CONNECT to {}: {e}", upstream.dst));
                record(shared, hop);
                return;
            }
            record(shared, hop);
            pipe(client, up);
        }
        Err(e) => {
            hop.error = Some(format!(
                "connect {} → {} failed: {e}",
                upstream
                    .bind
                    .map_or_else(|| "(any)".to_string(), |b| b.to_string()),
                upstream.dst
            ));
            record(shared, hop);
            // Dropping the client closes it; a real ztunnel would reset it too.
        }
    }
}

fn record(shared: &Shared, hop: ZtunnelHop) {
    if let Ok(mut h) = shared.hops.lock() {
        h.push(hop);
    }
}

/// Where and how to connect upstream.
struct Upstream {
    dst: SocketAddr,
    /// Local address to bind (`None` = kernel's choice).
    bind: Option<SocketAddr>,
    /// Bind to a non-local address (`IP_TRANSPARENT`).
    transparent: bool,
    /// Bytes to send first (the HBONE-like CONNECT line).
    preamble: Option<String>,
}

fn plan_upstream(
    port: u16,
    client: &mut TcpStream,
    peer: SocketAddr,
    original_dst: SocketAddr,
    shared: &Shared,
    hop: &mut ZtunnelHop,
) -> Result<Upstream, String> {
    let spoofed = |dst: SocketAddr, src: IpAddr| Upstream {
        dst,
        bind: Some(SocketAddr::new(src, 0)),
        transparent: true,
        preamble: None,
    };
    match port {
        OUTBOUND_PORT => {
            let captured = shared
                .captured
                .read()
                .map(|c| c.contains(&original_dst.ip()))
                .unwrap_or(false);
            if captured {
                Ok(Upstream {
                    dst: SocketAddr::new(original_dst.ip(), HBONE_PORT),
                    bind: Some(SocketAddr::new(shared.cfg.own_ip, 0)),
                    transparent: false,
                    preamble: Some(format!("CONNECT {original_dst} {}\n", peer.ip())),
                })
            } else {
                Ok(spoofed(original_dst, peer.ip()))
            }
        }
        INBOUND_PORT => Ok(spoofed(original_dst, peer.ip())),
        HBONE_PORT => {
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            let line = read_line(client).map_err(|e| format!("read CONNECT line: {e}"))?;
            let _ = client.set_read_timeout(None);
            let (target, source) = parse_connect(&line)?;
            hop.hbone = Some((target, source));
            Ok(spoofed(target, source))
        }
        other => Err(format!("unexpected listener port {other}")),
    }
}

/// Parse `CONNECT <ip:port> <client ip>\n`.
pub fn parse_connect(line: &str) -> Result<(SocketAddr, IpAddr), String> {
    let mut parts = line.trim_end_matches('\n').split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("CONNECT"), Some(target), Some(source), None) => {
            let target = target
                .parse::<SocketAddr>()
                .map_err(|e| format!("bad CONNECT target {target:?}: {e}"))?;
            let source = source
                .parse::<IpAddr>()
                .map_err(|e| format!("bad CONNECT source {source:?}: {e}"))?;
            Ok((target, source))
        }
        _ => Err(format!("bad CONNECT line {line:?}")),
    }
}

fn open_upstream(up: &Upstream, shared: &Shared) -> io::Result<TcpStream> {
    let family = match up.dst {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd =
        socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)?;
    if let Some(mark) = shared.cfg.upstream_mark {
        setsockopt(&fd, sockopt::Mark, &mark).map_err(io::Error::from)?;
    }
    if up.transparent {
        match up.dst {
            SocketAddr::V4(_) => {
                setsockopt(&fd, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
            }
            SocketAddr::V6(_) => crate::sys::set_ipv6_transparent(std::os::fd::AsFd::as_fd(&fd))?,
        }
    }
    match up.bind {
        Some(SocketAddr::V4(b)) => bind(fd.as_raw_fd(), &SockaddrIn::from(b)),
        Some(SocketAddr::V6(b)) => bind(fd.as_raw_fd(), &SockaddrIn6::from(b)),
        None => Ok(()),
    }
    .map_err(io::Error::from)?;
    // A blocking connect honours SO_SNDTIMEO.
    let t = shared.cfg.connect_timeout;
    let tv = TimeVal::new(
        i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        i64::from(t.subsec_micros()),
    );
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(io::Error::from)?;
    match up.dst {
        SocketAddr::V4(d) => connect(fd.as_raw_fd(), &SockaddrIn::from(d)),
        SocketAddr::V6(d) => connect(fd.as_raw_fd(), &SockaddrIn6::from(d)),
    }
    .map_err(io::Error::from)?;
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(None)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Copy both ways until both directions saw EOF; propagate half-closes.
pub(crate) fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(mut a_read), Ok(mut b_read)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let mut b_write = b;
    let forward = std::thread::spawn(move || {
        let _ = copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let mut a_write = a;
    let _ = copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = forward.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = crate::retry_eintr(|| from.read(&mut buf))?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parses_and_rejects_garbage() {
        let (t, s) = parse_connect("CONNECT 10.77.2.10:8080 10.77.1.10\n").expect("parse");
        assert_eq!(t, "10.77.2.10:8080".parse::<SocketAddr>().expect("addr"));
        assert_eq!(s, "10.77.1.10".parse::<IpAddr>().expect("ip"));
        assert!(parse_connect("CONNECT 10.77.2.10 10.77.1.10\n").is_err());
        assert!(parse_connect("GET / HTTP/1.1\n").is_err());
        assert!(parse_connect("CONNECT 10.77.2.10:1 x\n").is_err());
        assert!(parse_connect("CONNECT 10.77.2.10:1 10.0.0.1 extra\n").is_err());
    }
}
