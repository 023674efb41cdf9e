//! `InpodZtunnelStandIn`: a ztunnel (≥ 1.23, in-pod mode) stand-in that is a real ZDS client.
//!
//! * **ZDS** ([`crate::zds_client`], hand-written from the contract): connects to the agent's
//!   `SOCK_SEQPACKET` socket (reconnecting with exponential backoff while it is absent or after
//!   it dropped us), sends `ZdsHello{V1}` (`08 01`), then answers every `WorkloadRequest` with
//!   exactly one `WorkloadResponse{ack}` (`0a 00` = ok). `AddWorkload` must carry exactly one
//!   netns fd (`SCM_RIGHTS`); none or several is nacked with a message naming the count.
//!   `SnapshotSent` drops the workloads not mentioned (Add/Keep) since this connection's hello.
//!   A packet that does not decode, or is longer than ztunnel's 1024-byte buffer, is a protocol
//!   error: the connection is dropped and re-established, as ztunnel does. Decoding is
//!   stricter than protobuf's (which skips unknown fields): an unknown field number — e.g. a
//!   `DelWorkload` uid sent at field 1 — is an error, so an encoding slip cannot pass silently.
//!   An Add without `workload_info` is nacked (ztunnel ≥ 1.30 requires it; knob).
//! * **Per workload**: a dedicated thread enters the pod netns through the received fd (`setns`)
//!   and opens ztunnel's listeners there: 15001 (outbound), 15006 (inbound plaintext), 15008
//!   (inbound "HBONE", emulated as a `CONNECT <dst ip:port> <client ip>\n` line like
//!   [`crate::ztunnel`]) on `0.0.0.0` and, where the netns has IPv6, `[::]`; and 15053 (DNS,
//!   UDP + TCP) when DNS capture is on for that workload. Connection handlers are spawned from
//!   those netns threads, so every socket the stand-in opens for a pod lives in the pod's netns.
//!   All carry `SO_MARK 0x539`, which the in-pod rules exempt; listeners also set
//!   `SO_REUSEPORT`, so two stand-ins (a rolling restart) can hold the same pod. Another Add of
//!   a held uid with the same netns keeps its listeners; a different netns replaces them.
//! * **Forwarding** (in-pod rules REDIRECT, so the original destination is `SO_ORIGINAL_DST` /
//!   `IP6T_SO_ORIGINAL_DST`; the local address when delivered by TPROXY):
//!   15001 → captured destination (the explicit set, plus every held pod's addresses with
//!   `auto_capture`): HBONE to `<dst ip>:15008` from the pod; otherwise a direct
//!   connect to the original destination (from the pod, marked). 15006 → connect to the original
//!   destination (the pod's own ip:port) with the **client's IP as source** (`IP_TRANSPARENT`);
//!   the in-pod connmark 0x111 rules route the replies back. 15008 → read `CONNECT`, connect to
//!   the target with the original client's IP as source. Bytes are piped both ways,
//!   half-closes propagated; each hop is recorded ([`InpodHop`]).
//! * **Faults** for tests: nack chosen uids, delay acks, never ack, drop the connection on the
//!   N-th request, replace the hello, send raw / malformed / oversized packets, disconnect,
//!   stop (a ztunnel crash: every listener closes) and restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, connect, setsockopt, socket,
    sockopt,
};
use nix::sys::time::TimeVal;

use crate::TestkitError;
use crate::multinode::read_line;
use crate::proxy::parse_question;
use crate::sockets::{nat_original_dst, recv_with_dst, send_from};
use crate::zds_client::{
    self, HELLO_V1, RecvError, RequestKind, WorkloadInfo, WorkloadRequest, ZDS_READ_BUFFER,
};
use crate::ztunnel::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, parse_connect, pipe};

/// ztunnel's in-pod socket mark (1337).
pub const ZTUNNEL_MARK: u32 = 0x539;
/// DNS proxy port.
pub const DNS_PORT: u16 = 15053;
/// Default answer of the DNS proxy for `A` queries.
pub const DEFAULT_DNS_ANSWER: Ipv4Addr = Ipv4Addr::new(10, 53, 0, 1);

/// What the DNS proxy on 15053 does with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer every `A` query with this address (other types: empty NOERROR).
    Answer(Ipv4Addr),
    /// Forward to this upstream (from inside the pod netns, marked 0x539) and relay the reply.
    Forward(SocketAddr),
}

/// Behaviour of an [`InpodZtunnelStandIn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodZtunnelConfig {
    /// The agent's ZDS socket (ztunnel's `INPOD_UDS`).
    pub socket_path: PathBuf,
    /// Workload IPs that are "captured" (reached over HBONE) at start.
    pub captured: Vec<IpAddr>,
    /// DNS capture (15053) for workloads without a per-uid setting.
    pub dns_capture: bool,
    pub dns_mode: DnsMode,
    /// Open `[::]` listeners where the pod netns has IPv6 (ztunnel's `IPV6_ENABLED`).
    pub ipv6: bool,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// First and largest reconnect delay (doubling in between).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Also treat the addresses of every held workload (found in its netns at Add) as
    /// captured, as an xDS feed listing the enrolled pods would. Remote pods (other nodes'
    /// stand-ins) still need [`InpodZtunnelStandIn::add_captured`].
    pub auto_capture: bool,
    /// Nack an `AddWorkload` without `workload_info` (ztunnel ≥ 1.30 requires it; 1.21 sent
    /// only the uid).
    pub require_workload_info: bool,
}

impl InpodZtunnelConfig {
    /// Defaults: nothing captured, DNS capture off, answer `A 10.53.0.1`, IPv6 on, reconnect
    /// backoff 10 ms → 500 ms, no auto-capture, `workload_info` required.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        InpodZtunnelConfig {
            socket_path: socket_path.into(),
            captured: Vec::new(),
            dns_capture: false,
            dns_mode: DnsMode::Answer(DEFAULT_DNS_ANSWER),
            ipv6: true,
            connect_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            auto_capture: false,
            require_workload_info: true,
        }
    }
}

/// What the stand-in answered to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// `Ack{error: ""}`.
    Ack,
    /// `Ack{error}` with this message.
    Nack(String),
    /// Nothing (the never-ack fault).
    NoAck,
    /// These raw bytes instead of an ack (fault).
    Raw(Vec<u8>),
    /// The connection was dropped instead (protocol error or the disconnect fault).
    Disconnected,
}

/// One packet the agent sent, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZdsRecord {
    /// Which connection (1 = first) it arrived on.
    pub connection: usize,
    /// `None` when the packet did not decode (see `error`).
    pub kind: Option<RequestKind>,
    pub uid: Option<String>,
    /// `AddWorkload.workload_info`.
    pub info: Option<WorkloadInfo>,
    /// `(st_dev, st_ino)` of the fd, when exactly one came along.
    pub netns: Option<(u64, u64)>,
    /// Number of fds received with the packet.
    pub fd_count: usize,
    /// The raw packet.
    pub bytes: Vec<u8>,
    pub outcome: AckOutcome,
    /// Decode / validation error, if any.
    pub error: Option<String>,
}

/// A workload the stand-in currently holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub uid: String,
    pub info: Option<WorkloadInfo>,
    /// `(st_dev, st_ino)` of its netns.
    pub netns: (u64, u64),
    pub dns_capture: bool,
    /// Addresses listened on inside the pod netns (TCP; DNS UDP+TCP on 15053 included once).
    pub listening: Vec<SocketAddr>,
    /// The pod's addresses, read in its netns at Add (not loopback, not IPv6 link-local).
    pub ips: Vec<IpAddr>,
}

/// One connection a workload's listener accepted and what the stand-in did with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodHop {
    pub uid: String,
    /// 15001, 15006 or 15008.
    pub listener_port: u16,
    pub peer: SocketAddr,
    /// `SO_ORIGINAL_DST` (REDIRECT), else the accepted socket's local address.
    pub original_dst: SocketAddr,
    /// 15008 only: target and original client of the `CONNECT` line.
    pub hbone: Option<(SocketAddr, IpAddr)>,
    pub upstream_dst: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    pub error: Option<String>,
}

/// One DNS query a workload's 15053 received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodDnsQuery {
    pub uid: String,
    /// `"udp"` or `"tcp"`.
    pub proto: &'static str,
    pub peer: SocketAddr,
    /// TCP: `SO_ORIGINAL_DST`; UDP: the address the datagram was addressed to after NAT.
    pub original_dst: Option<SocketAddr>,
    pub qname: String,
    pub qtype: u16,
    /// Upstream it was forwarded to ([`DnsMode::Forward`]).
    pub forwarded_to: Option<SocketAddr>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Faults {
    nack: HashMap<String, String>,
    raw_reply: HashMap<String, Vec<u8>>,
    ack_delay: Duration,
    never_ack: bool,
    disconnect_after: Option<usize>,
    hello: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    workloads: HashMap<String, Workload>,
    mentioned: HashSet<String>,
    snapshot_complete: bool,
    conn: Option<Arc<OwnedFd>>,
    records: Vec<ZdsRecord>,
    protocol_errors: Vec<String>,
    last_connect_error: Option<String>,
}

#[derive(Debug)]
struct Shared {
    cfg: InpodZtunnelConfig,
    captured: RwLock<HashSet<IpAddr>>,
    dns_default: AtomicBool,
    dns_per_uid: Mutex<HashMap<String, bool>>,
    faults: Mutex<Faults>,
    state: Mutex<State>,
    connects: AtomicUsize,
    hops: Mutex<Vec<InpodHop>>,
    dns: Mutex<Vec<InpodDnsQuery>>,
    running: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }
}

/// The running stand-in. Dropping it disconnects and closes every workload's listeners.
#[derive(Debug)]
pub struct InpodZtunnelStandIn {
    shared: Arc<Shared>,
    client: Mutex<Option<JoinHandle<()>>>,
}

impl InpodZtunnelStandIn {
    /// Start with defaults, connecting to `socket_path`.
    pub fn start(socket_path: impl Into<PathBuf>) -> Result<Self, TestkitError> {
        Self::start_with(InpodZtunnelConfig::new(socket_path))
    }

    /// Start with `cfg`.
    pub fn start_with(cfg: InpodZtunnelConfig) -> Result<Self, TestkitError> {
        let shared = Arc::new(Shared {
            captured: RwLock::new(cfg.captured.iter().copied().collect()),
            dns_default: AtomicBool::new(cfg.dns_capture),
            cfg,
            dns_per_uid: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            state: Mutex::new(State::default()),
            connects: AtomicUsize::new(0),
            hops: Mutex::new(Vec::new()),
            dns: Mutex::new(Vec::new()),
            running: AtomicBool::new(false),
        });
        let s = InpodZtunnelStandIn {
            shared,
            client: Mutex::new(None),
        };
        s.restart()?;
        Ok(s)
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &InpodZtunnelConfig {
        &self.shared.cfg
    }

    // ---- ZDS state -------------------------------------------------------------------------

    /// Connections established so far (each one sent a hello).
    pub fn connects(&self) -> usize {
        self.shared.connects.load(Ordering::SeqCst)
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.state().conn.is_some()
    }

    /// Whether the current connection has received `SnapshotSent` (ztunnel's readiness).
    pub fn snapshot_complete(&self) -> bool {
        self.shared.state().snapshot_complete
    }

    /// Workloads held now: uid → `WorkloadInfo` (default when the Add carried none).
    pub fn workloads(&self) -> BTreeMap<String, WorkloadInfo> {
        self.shared
            .state()
            .workloads
            .iter()
            .map(|(uid, w)| (uid.clone(), w.info.clone().unwrap_or_default()))
            .collect()
    }

    /// Details of one held workload.
    pub fn workload(&self, uid: &str) -> Option<WorkloadStatus> {
        self.shared.state().workloads.get(uid).map(Workload::status)
    }

    /// Every packet received from the agent, in order, with the answer given.
    pub fn requests(&self) -> Vec<ZdsRecord> {
        self.shared.state().records.clone()
    }

    /// Protocol errors seen (decode failures, truncation, bad fd counts, missing
    /// `workload_info`, failed sends), in order.
    pub fn protocol_errors(&self) -> Vec<String> {
        self.shared.state().protocol_errors.clone()
    }

    /// Why the last connect attempt failed (while the agent's socket is absent).
    pub fn last_connect_error(&self) -> Option<String> {
        self.shared.state().last_connect_error.clone()
    }

    // ---- xDS / DNS knobs -------------------------------------------------------------------

    /// Replace the captured workload IP set (as an xDS update would).
    pub fn set_captured(&self, ips: impl IntoIterator<Item = IpAddr>) {
        if let Ok(mut c) = self.shared.captured.write() {
            *c = ips.into_iter().collect();
        }
    }

    /// Mark one workload IP captured.
    pub fn add_captured(&self, ip: IpAddr) {
        if let Ok(mut c) = self.shared.captured.write() {
            c.insert(ip);
        }
    }

    /// Mark one workload IP uncaptured.
    pub fn remove_captured(&self, ip: IpAddr) {
        if let Ok(mut c) = self.shared.captured.write() {
            c.remove(&ip);
        }
    }

    /// DNS capture default for workloads added from now on.
    pub fn set_default_dns_capture(&self, on: bool) {
        self.shared.dns_default.store(on, Ordering::SeqCst);
    }

    /// DNS capture for `uid` (takes effect at its next Add).
    pub fn set_dns_capture(&self, uid: &str, on: bool) {
        lock(&self.shared.dns_per_uid).insert(uid.to_string(), on);
    }

    // ---- fault knobs -----------------------------------------------------------------------

    /// Nack every Add/Keep for `uid` with `message` (no listeners are opened).
    pub fn nack_uid(&self, uid: &str, message: &str) {
        self.shared
            .faults()
            .nack
            .insert(uid.to_string(), message.to_string());
    }

    /// Stop nacking `uid`.
    pub fn clear_nack(&self, uid: &str) {
        self.shared.faults().nack.remove(uid);
    }

    /// Answer requests naming `uid` with `bytes` instead of an ack.
    pub fn reply_raw_for(&self, uid: &str, bytes: Vec<u8>) {
        self.shared
            .faults()
            .raw_reply
            .insert(uid.to_string(), bytes);
    }

    /// Wait this long before each ack.
    pub fn set_ack_delay(&self, delay: Duration) {
        self.shared.faults().ack_delay = delay;
    }

    /// Never ack (requests are still processed and recorded).
    pub fn set_never_ack(&self, on: bool) {
        self.shared.faults().never_ack = on;
    }

    /// One-shot: on the `n`-th request of the next (or current) connection, drop the connection
    /// without processing or acking it (then reconnect, keeping the workloads).
    pub fn disconnect_after(&self, n: usize) {
        self.shared.faults().disconnect_after = Some(n);
    }

    /// Send `bytes` instead of `08 01` as the hello of later connections (`None` = normal).
    pub fn set_hello_bytes(&self, bytes: Option<Vec<u8>>) {
        self.shared.faults().hello = bytes;
    }

    /// Send one raw packet to the agent on the current connection.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), TestkitError> {
        let conn = self
            .shared
            .state()
            .conn
            .clone()
            .ok_or_else(|| TestkitError::Timeout("ZDS stand-in: not connected".to_string()))?;
        zds_client::send_packet(conn.as_fd(), bytes, &[]).map_err(|e| {
            TestkitError::io(
                format!(
                    "send {} raw bytes to {}",
                    bytes.len(),
                    self.shared.cfg.socket_path.display()
                ),
                e,
            )
        })
    }

    /// Send a packet that is not a valid protobuf message (`ff ff ff`: truncated varint key).
    pub fn send_malformed(&self) -> Result<(), TestkitError> {
        self.send_raw(&[0xff, 0xff, 0xff])
    }

    /// Send a syntactically valid `WorkloadResponse` (an Ack whose error is `len` bytes of `x`)
    /// that is far longer than a ZDS peer's read buffer.
    pub fn send_oversized(&self, len: usize) -> Result<(), TestkitError> {
        self.send_raw(&zds_client::encode_ack(&"x".repeat(len)))
    }

    /// Drop the current connection (the stand-in reconnects with backoff and keeps its
    /// workloads until the next `SnapshotSent`).
    pub fn disconnect(&self) {
        if let Some(conn) = self.shared.state().conn.clone() {
            let _ = nix::sys::socket::shutdown(conn.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }

    /// Kill: disconnect, stop reconnecting, close every workload's listeners (as a crashed
    /// ztunnel's do). Recorded requests/hops are kept.
    pub fn stop(&self) {
        self.shared.running.store(false, Ordering::SeqCst);
        self.disconnect();
        if let Some(t) = lock(&self.client).take() {
            let _ = t.join();
        }
        let workloads: Vec<Workload> = {
            let mut st = self.shared.state();
            st.snapshot_complete = false;
            st.mentioned.clear();
            st.workloads.drain().map(|(_, w)| w).collect()
        };
        drop(workloads);
    }

    /// (Re)start the ZDS client after [`stop`](Self::stop) (a fresh ztunnel: no workloads,
    /// expects the agent to replay the snapshot). No-op while running.
    pub fn restart(&self) -> Result<(), TestkitError> {
        let mut client = lock(&self.client);
        if client.is_some() {
            return Ok(());
        }
        self.shared.running.store(true, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        let t = std::thread::Builder::new()
            .name("mcni-zds-client".to_string())
            .spawn(move || client_loop(&shared))
            .map_err(|e| TestkitError::io("spawn ZDS stand-in client thread", e))?;
        *client = Some(t);
        Ok(())
    }

    // ---- traffic records -------------------------------------------------------------------

    /// Hops recorded so far.
    pub fn hops(&self) -> Vec<InpodHop> {
        lock(&self.shared.hops).clone()
    }

    /// Return and forget the hops recorded so far.
    pub fn take_hops(&self) -> Vec<InpodHop> {
        std::mem::take(&mut *lock(&self.shared.hops))
    }

    /// DNS queries recorded so far.
    pub fn dns_queries(&self) -> Vec<InpodDnsQuery> {
        lock(&self.shared.dns).clone()
    }

    // ---- waiting ---------------------------------------------------------------------------

    /// Poll `cond` every 5 ms until it holds or `timeout` passes; the error names `what`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Timeout(format!(
                    "in-pod ztunnel stand-in: {what} not reached in {timeout:?} (connects {}, \
                     snapshot {}, workloads {:?}, last connect error {:?}, protocol errors {:?})",
                    self.connects(),
                    self.snapshot_complete(),
                    self.workloads().keys().collect::<Vec<_>>(),
                    self.last_connect_error(),
                    self.protocol_errors()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait until at least `n` connections were made.
    pub fn wait_for_connects(&self, n: usize, timeout: Duration) -> Result<(), TestkitError> {
        self.wait_for(&format!("{n} connection(s)"), timeout, |s| {
            s.connects() >= n
        })
    }

    /// Wait until the current connection received `SnapshotSent`.
    pub fn wait_for_snapshot(&self, timeout: Duration) -> Result<(), TestkitError> {
        self.wait_for("snapshot complete", timeout, Self::snapshot_complete)
    }

    /// Wait until at least `n` packets were received; returns all records.
    pub fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ZdsRecord>, TestkitError> {
        self.wait_for(&format!("{n} request(s)"), timeout, |s| {
            s.shared.state().records.len() >= n
        })?;
        Ok(self.requests())
    }

    /// Wait until `uid` is held (listeners open).
    pub fn wait_for_workload(
        &self,
        uid: &str,
        timeout: Duration,
    ) -> Result<WorkloadStatus, TestkitError> {
        let mut found = None;
        self.wait_for(&format!("workload {uid}"), timeout, |s| {
            found = s.workload(uid);
            found.is_some()
        })?;
        found.ok_or_else(|| TestkitError::Timeout(format!("workload {uid} vanished")))
    }

    /// Wait until `uid` is no longer held.
    pub fn wait_for_no_workload(&self, uid: &str, timeout: Duration) -> Result<(), TestkitError> {
        self.wait_for(&format!("workload {uid} gone"), timeout, |s| {
            s.workload(uid).is_none()
        })
    }

    /// Wait until at least `n` hops were recorded; returns them.
    pub fn wait_for_hops(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<InpodHop>, TestkitError> {
        self.wait_for(&format!("{n} hop(s)"), timeout, |s| {
            lock(&s.shared.hops).len() >= n
        })?;
        Ok(self.hops())
    }

    /// Wait until at least `n` DNS queries were recorded; returns them.
    pub fn wait_for_dns_queries(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<InpodDnsQuery>, TestkitError> {
        self.wait_for(&format!("{n} DNS query(ies)"), timeout, |s| {
            lock(&s.shared.dns).len() >= n
        })?;
        Ok(self.dns_queries())
    }
}

impl Drop for InpodZtunnelStandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- ZDS client ----------------------------------------------------------------------------

fn sleep_while_running(shared: &Shared, total: Duration) {
    let deadline = Instant::now() + total;
    while shared.running.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5).min(total));
    }
}

fn client_loop(shared: &Arc<Shared>) {
    let mut backoff = shared.cfg.backoff_min;
    while shared.running.load(Ordering::SeqCst) {
        match zds_client::connect_seqpacket(&shared.cfg.socket_path) {
            Ok(fd) => {
                backoff = shared.cfg.backoff_min;
                serve_connection(shared, Arc::new(fd));
                // Like ztunnel, wait a little before reconnecting after a dropped connection.
                sleep_while_running(shared, backoff);
            }
            Err(e) => {
                shared.state().last_connect_error =
                    Some(format!("connect {}: {e}", shared.cfg.socket_path.display()));
                sleep_while_running(shared, backoff);
                backoff = (backoff * 2).min(shared.cfg.backoff_max);
            }
        }
    }
}

/// What to do after a packet.
enum Next {
    Continue,
    Disconnect,
}

fn serve_connection(shared: &Arc<Shared>, fd: Arc<OwnedFd>) {
    let conn_no = shared.connects.fetch_add(1, Ordering::SeqCst) + 1;
    {
        let mut st = shared.state();
        st.conn = Some(Arc::clone(&fd));
        st.snapshot_complete = false;
        st.mentioned.clear();
        st.last_connect_error = None;
    }
    let hello = shared
        .faults()
        .hello
        .clone()
        .unwrap_or_else(|| HELLO_V1.to_vec());
    let result = (|| -> Result<(), String> {
        zds_client::send_packet(fd.as_fd(), &hello, &[]).map_err(|e| format!("send hello: {e}"))?;
        zds_client::set_recv_timeout(&fd, Duration::from_millis(50))
            .map_err(|e| format!("set receive timeout: {e}"))?;
        let mut count = 0usize;
        while shared.running.load(Ordering::SeqCst) {
            match zds_client::recv_packet(fd.as_fd(), ZDS_READ_BUFFER) {
                Ok(packet) => {
                    count += 1;
                    if let Next::Disconnect = handle_packet(shared, &fd, conn_no, count, packet) {
                        return Ok(());
                    }
                }
                Err(RecvError::TimedOut) => {}
                Err(RecvError::Closed) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })();
    let mut st = shared.state();
    if let Err(e) = result {
        st.protocol_errors
            .push(format!("connection {conn_no}: {e}"));
    }
    st.conn = None;
    st.snapshot_complete = false;
}

fn handle_packet(
    shared: &Arc<Shared>,
    conn: &OwnedFd,
    conn_no: usize,
    count: usize,
    packet: zds_client::Packet,
) -> Next {
    let netns = match packet.fds.as_slice() {
        [one] => nix::sys::stat::fstat(one)
            .ok()
            .map(|st| (st.st_dev, st.st_ino)),
        _ => None,
    };
    let mut record = ZdsRecord {
        connection: conn_no,
        kind: None,
        uid: None,
        info: None,
        netns,
        fd_count: packet.fds.len(),
        bytes: packet.bytes.clone(),
        outcome: AckOutcome::Disconnected,
        error: None,
    };
    let req = match zds_client::decode_request(&packet.bytes) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("connection {conn_no}: request {count}: {e}");
            record.error = Some(e.to_string());
            let mut st = shared.state();
            st.protocol_errors.push(msg);
            st.records.push(record);
            return Next::Disconnect;
        }
    };
    record.kind = Some(req.kind());
    record.uid = req.uid().map(str::to_string);
    if let WorkloadRequest::Add { info, .. } = &req {
        record.info.clone_from(info);
    }
    {
        let mut f = shared.faults();
        if f.disconnect_after == Some(count) {
            f.disconnect_after = None;
            drop(f);
            shared.state().records.push(record);
            return Next::Disconnect;
        }
    }
    let outcome = process(shared, req, packet.fds, &mut record);
    let (delay, final_outcome) = {
        let f = shared.faults();
        let raw = record
            .uid
            .as_ref()
            .and_then(|u| f.raw_reply.get(u))
            .cloned();
        let o = match (outcome, raw) {
            (_, Some(bytes)) => AckOutcome::Raw(bytes),
            (_, None) if f.never_ack => AckOutcome::NoAck,
            (o, None) => o,
        };
        (f.ack_delay, o)
    };
    record.outcome = final_outcome.clone();
    shared.state().records.push(record);
    let bytes = match final_outcome {
        AckOutcome::Ack => zds_client::encode_ack(""),
        AckOutcome::Nack(msg) => zds_client::encode_ack(&msg),
        AckOutcome::Raw(b) => b,
        AckOutcome::NoAck | AckOutcome::Disconnected => return Next::Continue,
    };
    if !delay.is_zero() {
        sleep_while_running(shared, delay);
    }
    match zds_client::send_packet(conn.as_fd(), &bytes, &[]) {
        Ok(()) => Next::Continue,
        Err(e) => {
            shared
                .state()
                .protocol_errors
                .push(format!("connection {conn_no}: send ack: {e}"));
            Next::Disconnect
        }
    }
}

/// Apply one decoded request; returns the ack to give.
fn process(
    shared: &Arc<Shared>,
    req: WorkloadRequest,
    mut fds: Vec<OwnedFd>,
    record: &mut ZdsRecord,
) -> AckOutcome {
    let nack_fault = record
        .uid
        .as_ref()
        .and_then(|u| shared.faults().nack.get(u).cloned());
    let mut fail = |msg: String| {
        shared.state().protocol_errors.push(msg.clone());
        record.error = Some(msg.clone());
        AckOutcome::Nack(msg)
    };
    match req {
        WorkloadRequest::Add { uid, info } => {
            if fds.len() != 1 {
                return fail(format!(
                    "AddWorkload for uid {uid} carried {} netns fd(s), want exactly 1",
                    fds.len()
                ));
            }
            if info.is_none() && shared.cfg.require_workload_info {
                return fail(format!(
                    "AddWorkload for uid {uid} has no workload_info (field 2), which ztunnel \
                     >= 1.30 requires"
                ));
            }
            shared.state().mentioned.insert(uid.clone());
            if let Some(msg) = nack_fault {
                return AckOutcome::Nack(msg);
            }
            let Some(fd) = fds.pop() else {
                return fail(format!("AddWorkload for uid {uid}: fd vanished"));
            };
            let netns = File::from(fd);
            let id = match netns.metadata() {
                Ok(m) => (m.dev(), m.ino()),
                Err(e) => return fail(format!("AddWorkload for uid {uid}: fstat netns fd: {e}")),
            };
            // Same netns as held: keep the listeners (ztunnel treats it as a no-op).
            if shared
                .state()
                .workloads
                .get(&uid)
                .is_some_and(|w| w.netns == id)
            {
                if let Some(w) = shared.state().workloads.get_mut(&uid) {
                    w.info = info;
                }
                return AckOutcome::Ack;
            }
            let old = shared.state().workloads.remove(&uid);
            drop(old);
            let dns = lock(&shared.dns_per_uid)
                .get(&uid)
                .copied()
                .unwrap_or_else(|| shared.dns_default.load(Ordering::SeqCst));
            match Workload::start(shared, uid.clone(), info, netns, id, dns) {
                Ok(w) => {
                    shared.state().workloads.insert(uid, w);
                    AckOutcome::Ack
                }
                Err(e) => fail(format!("AddWorkload for uid {uid}: {e}")),
            }
        }
        other => {
            if !fds.is_empty() {
                return fail(format!(
                    "{:?}{} carried {} unexpected fd(s)",
                    other.kind(),
                    other
                        .uid()
                        .map(|u| format!(" for uid {u}"))
                        .unwrap_or_default(),
                    fds.len()
                ));
            }
            match other {
                WorkloadRequest::Keep { uid } => {
                    shared.state().mentioned.insert(uid);
                    nack_fault.map_or(AckOutcome::Ack, AckOutcome::Nack)
                }
                WorkloadRequest::Del { uid } => {
                    let old = {
                        let mut st = shared.state();
                        st.mentioned.remove(&uid);
                        st.workloads.remove(&uid)
                    };
                    drop(old);
                    nack_fault.map_or(AckOutcome::Ack, AckOutcome::Nack)
                }
                WorkloadRequest::SnapshotSent => {
                    let dropped: Vec<Workload> = {
                        let mut st = shared.state();
                        let keep = st.mentioned.clone();
                        let gone: Vec<String> = st
                            .workloads
                            .keys()
                            .filter(|u| !keep.contains(*u))
                            .cloned()
                            .collect();
                        st.snapshot_complete = true;
                        gone.iter().filter_map(|u| st.workloads.remove(u)).collect()
                    };
                    drop(dropped);
                    AckOutcome::Ack
                }
                WorkloadRequest::Add { .. } => AckOutcome::Ack,
            }
        }
    }
}

// ---- per-workload listeners ----------------------------------------------------------------

/// A workload held by the stand-in: one thread inside its netns runs a `poll` loop over all
/// its listeners (so hundreds of workloads cost one thread each, plus one per live
/// connection); dropping it wakes that loop, which closes the listeners, and closes the
/// netns fd.
#[derive(Debug)]
struct Workload {
    uid: String,
    info: Option<WorkloadInfo>,
    netns: (u64, u64),
    dns: bool,
    listening: Vec<SocketAddr>,
    ips: Vec<IpAddr>,
    /// Dropping (closing) it wakes the poll loop (`POLLHUP` on the other end).
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    _netns_fd: File,
}

/// A listener opened inside the pod netns.
enum Opened {
    Tcp(u16, TcpListener),
    Udp(Arc<UdpSocket>),
}

impl Opened {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Opened::Tcp(_, l) => l.as_fd(),
            Opened::Udp(u) => u.as_fd(),
        }
    }
}

impl Workload {
    fn status(&self) -> WorkloadStatus {
        WorkloadStatus {
            uid: self.uid.clone(),
            info: self.info.clone(),
            netns: self.netns,
            dns_capture: self.dns,
            listening: self.listening.clone(),
            ips: self.ips.clone(),
        }
    }

    fn start(
        shared: &Arc<Shared>,
        uid: String,
        info: Option<WorkloadInfo>,
        netns_fd: File,
        netns: (u64, u64),
        dns: bool,
    ) -> Result<Workload, String> {
        let fd = netns_fd
            .try_clone()
            .map_err(|e| format!("dup netns fd: {e}"))?;
        let (stop_tx, stop_rx) = UnixStream::pair().map_err(|e| format!("stop socketpair: {e}"))?;
        let thread_shared = Arc::clone(shared);
        let thread_uid = uid.clone();
        let ipv6 = shared.cfg.ipv6;
        type Started = Result<(Vec<SocketAddr>, Vec<IpAddr>), String>;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Started>(1);
        // A dedicated thread (never a shared pool) enters the pod netns, opens the listeners
        // and serves them; connection handlers it spawns inherit the netns.
        let thread = std::thread::Builder::new()
            .name(format!(
                "mcni-ztwl-{}",
                uid.chars().take(4).collect::<String>()
            ))
            .spawn(move || {
                let opened = setns(&fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns into the pod netns: {e}"))
                    .and_then(|()| open_listeners(ipv6, dns));
                drop(fd);
                match opened {
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                    Ok(opened) => {
                        let addrs = opened
                            .iter()
                            .filter_map(|o| match o {
                                Opened::Tcp(_, l) => l.local_addr().ok(),
                                Opened::Udp(_) => None,
                            })
                            .collect();
                        let _ = tx.send(Ok((addrs, pod_ips())));
                        serve_workload(&thread_shared, &thread_uid, &opened, &stop_rx);
                    }
                }
            })
            .map_err(|e| format!("spawn netns thread: {e}"))?;
        let (listening, ips) = match rx.recv() {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err("netns thread ended without reporting".to_string());
            }
        };
        Ok(Workload {
            uid,
            info,
            netns,
            dns,
            listening,
            ips,
            stop: Some(stop_tx),
            thread: Some(thread),
            _netns_fd: netns_fd,
        })
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The calling thread's netns addresses, without loopback and IPv6 link-local.
fn pod_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Whether `ip` is reached over HBONE: in the explicit set, or (auto-capture) a held
/// workload's address.
fn is_captured(shared: &Shared, ip: IpAddr) -> bool {
    if shared.captured.read().is_ok_and(|c| c.contains(&ip)) {
        return true;
    }
    shared.cfg.auto_capture
        && shared
            .state()
            .workloads
            .values()
            .any(|w| w.ips.contains(&ip))
}

/// The workload's loop: wait for any listener (or the stop socket) to become readable.
fn serve_workload(shared: &Arc<Shared>, uid: &str, opened: &[Opened], stop: &UnixStream) {
    for o in opened {
        let r = match o {
            Opened::Tcp(_, l) => l.set_nonblocking(true),
            Opened::Udp(u) => u.set_nonblocking(true).and_then(|()| enable_pktinfo(u)),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, uid, "in-pod stand-in: listener setup");
        }
    }
    loop {
        let ready: Vec<usize> = {
            let mut pfds: Vec<PollFd<'_>> = std::iter::once(stop.as_fd())
                .chain(opened.iter().map(Opened::fd))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut pfds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, uid, "in-pod stand-in: poll failed");
                    return;
                }
            }
            if pfds[0].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            pfds.iter()
                .enumerate()
                .skip(1)
                .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
                .map(|(i, _)| i - 1)
                .collect()
        };
        for i in ready {
            match &opened[i] {
                Opened::Tcp(port, l) => accept_ready(shared, uid, *port, l),
                Opened::Udp(u) => dns_udp_ready(shared, uid, u),
            }
        }
    }
}

/// Accept every pending connection; each gets its own thread (spawned from this netns thread,
/// so the sockets it opens are in the pod).
fn accept_ready(shared: &Arc<Shared>, uid: &str, port: u16, l: &TcpListener) {
    loop {
        match l.accept() {
            Ok((stream, peer)) => {
                let shared = Arc::clone(shared);
                let owned_uid = uid.to_string();
                let spawned = std::thread::Builder::new()
                    .name("mcni-ztconn".to_string())
                    .spawn(move || {
                        if stream.set_nonblocking(false).is_err() {
                            return;
                        }
                        if port == DNS_PORT {
                            dns_tcp_conn(&shared, &owned_uid, stream, peer);
                        } else {
                            handle_conn(&shared, &owned_uid, port, stream, peer);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, uid, port, "in-pod stand-in: spawn handler");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(error = %e, uid, port, "in-pod stand-in: accept failed");
                return;
            }
        }
    }
}

fn mark<Fd: AsFd>(fd: &Fd) -> io::Result<()> {
    setsockopt(fd, sockopt::Mark, &ZTUNNEL_MARK).map_err(io::Error::from)
}

/// Whether an IPv6 bind failure means "this netns has no IPv6" (skip) rather than a fault.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// A socket bound to `addr` on the calling thread (inside the pod netns), as ztunnel binds
/// its in-pod listeners: `SO_MARK 0x539`, `SO_REUSEADDR` + `SO_REUSEPORT` (two ztunnels
/// coexist during a rolling restart), `IP_TRANSPARENT` (TPROXY-style rules of 1.21–1.23),
/// IPv6 sockets v6-only.
fn pod_socket(addr: SocketAddr, ty: SockType) -> io::Result<OwnedFd> {
    let fd = marked_socket(addr, ty)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io::Error::from)?;
    setsockopt(&fd, sockopt::ReusePort, &true).map_err(io::Error::from)?;
    match addr {
        SocketAddr::V4(a) => {
            setsockopt(&fd, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
            bind(fd.as_raw_fd(), &SockaddrIn::from(a)).map_err(io::Error::from)?;
        }
        SocketAddr::V6(a) => {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
            crate::sys::set_ipv6_transparent(fd.as_fd())?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a)).map_err(io::Error::from)?;
        }
    }
    if ty == SockType::Stream {
        nix::sys::socket::listen(
            &fd,
            nix::sys::socket::Backlog::new(128).map_err(io::Error::from)?,
        )
        .map_err(io::Error::from)?;
    }
    Ok(fd)
}

/// Open 15001/15006/15008 (+15053 UDP/TCP) on `0.0.0.0` and, where the netns has IPv6,
/// `[::]`, on the calling thread (which is inside the pod netns).
fn open_listeners(ipv6: bool, dns: bool) -> Result<Vec<Opened>, String> {
    let mut out = Vec::new();
    let mut ports = vec![OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];
    if dns {
        ports.push(DNS_PORT);
    }
    let mut v6 = ipv6 && std::path::Path::new("/proc/thread-self/net/if_inet6").exists();
    for port in ports {
        let mut addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
        if v6 {
            addrs.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
        }
        for addr in addrs {
            let l = match pod_socket(addr, SockType::Stream) {
                Ok(l) => TcpListener::from(l),
                Err(e) if addr.is_ipv6() && no_ipv6(&e) => {
                    v6 = false;
                    continue;
                }
                Err(e) => return Err(format!("listen on {addr} in the pod netns: {e}")),
            };
            out.push(Opened::Tcp(port, l));
            if port == DNS_PORT {
                let u = pod_socket(addr, SockType::Datagram)
                    .map_err(|e| format!("bind udp {addr} in the pod netns: {e}"))?;
                out.push(Opened::Udp(Arc::new(UdpSocket::from(u))));
            }
        }
    }
    Ok(out)
}

fn record_hop(shared: &Shared, hop: InpodHop) {
    lock(&shared.hops).push(hop);
}

fn handle_conn(shared: &Shared, uid: &str, port: u16, mut client: TcpStream, peer: SocketAddr) {
    let _ = client.set_nodelay(true);
    let _ = mark(&client);
    let Ok(local) = client.local_addr() else {
        return;
    };
    let original_dst = nat_original_dst(&client).unwrap_or(local);
    let mut hop = InpodHop {
        uid: uid.to_string(),
        listener_port: port,
        peer,
        original_dst,
        hbone: None,
        upstream_dst: None,
        upstream_local: None,
        error: None,
    };
    let plan = match port {
        OUTBOUND_PORT => {
            if is_captured(shared, original_dst.ip()) {
                Ok(Upstream {
                    dst: SocketAddr::new(original_dst.ip(), HBONE_PORT),
                    spoof: None,
                    preamble: Some(format!("CONNECT {original_dst} {}\n", peer.ip())),
                })
            } else {
                Ok(Upstream {
                    dst: original_dst,
                    spoof: None,
                    preamble: None,
                })
            }
        }
        INBOUND_PORT => Ok(Upstream {
            dst: original_dst,
            spoof: Some(peer.ip()),
            preamble: None,
        }),
        HBONE_PORT => {
            let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
            let line = read_line(&mut client).map_err(|e| format!("read CONNECT line: {e}"));
            let _ = client.set_read_timeout(None);
            line.and_then(|l| parse_connect(&l))
                .map(|(target, source)| {
                    hop.hbone = Some((target, source));
                    Upstream {
                        dst: target,
                        spoof: Some(source),
                        preamble: None,
                    }
                })
        }
        other => Err(format!("unexpected listener port {other}")),
    };
    let up = match plan {
        Ok(p) => p,
        Err(e) => {
            hop.error = Some(e);
            record_hop(shared, hop);
            return;
        }
    };
    hop.upstream_dst = Some(up.dst);
    match open_upstream(&up, shared.cfg.connect_timeout) {
        Ok(mut stream) => {
            hop.upstream_local = stream.local_addr().ok();
            if let Some(line) = &up.preamble
                && let Err(e) = stream.write_all(line.as_bytes())
            {
                hop.error = Some(format!("send CONNECT to {}: {e}", up.dst));
                record_hop(shared, hop);
                return;
            }
            record_hop(shared, hop);
            pipe(client, stream);
        }
        Err(e) => {
            hop.error = Some(format!(
                "connect {} → {} failed: {e}",
                up.spoof
                    .map_or_else(|| "(pod)".to_string(), |s| s.to_string()),
                up.dst
            ));
            record_hop(shared, hop);
        }
    }
}

struct Upstream {
    dst: SocketAddr,
    /// Source IP to bind with `IP_TRANSPARENT` (the original client), if any.
    spoof: Option<IpAddr>,
    preamble: Option<String>,
}

fn set_timeout_opt(fd: &OwnedFd, t: Duration) -> io::Result<()> {
    let tv = TimeVal::new(
        i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        i64::from(t.subsec_micros()),
    );
    setsockopt(fd, sockopt::SendTimeout, &tv).map_err(io::Error::from)
}

/// A marked socket of `dst`'s family on the calling thread (inside the pod netns).
fn marked_socket(dst: SocketAddr, ty: SockType) -> io::Result<OwnedFd> {
    let family = match dst {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)?;
    mark(&fd)?;
    Ok(fd)
}

fn open_upstream(up: &Upstream, timeout: Duration) -> io::Result<TcpStream> {
    let fd = marked_socket(up.dst, SockType::Stream)?;
    if let Some(src) = up.spoof {
        match (src, up.dst) {
            (IpAddr::V4(s), SocketAddr::V4(_)) => {
                setsockopt(&fd, sockopt::IpTransparent, &true).map_err(io::Error::from)?;
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn::from(std::net::SocketAddrV4::new(s, 0)),
                )
                .map_err(io::Error::from)?;
            }
            (IpAddr::V6(s), SocketAddr::V6(_)) => {
                crate::sys::set_ipv6_transparent(fd.as_fd())?;
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn6::from(std::net::SocketAddrV6::new(s, 0, 0, 0)),
                )
                .map_err(io::Error::from)?;
            }
            (s, d) => {
                return Err(io::Error::other(format!(
                    "client {s} and destination {d} are of different families"
                )));
            }
        }
    }
    // A blocking connect honours SO_SNDTIMEO.
    set_timeout_opt(&fd, timeout)?;
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

// ---- DNS -----------------------------------------------------------------------------------

/// The stand-in's answer to `query` (`Answer` mode), or `None` if it is not a query.
fn dns_answer(query: &[u8], addr: Ipv4Addr) -> Option<(String, u16, Vec<u8>)> {
    let (qname, end, qtype) = parse_question(query)?;
    let mut reply = Vec::with_capacity(end + 16);
    reply.extend_from_slice(query.get(..2)?);
    reply.push(0x80 | (query.get(2)? & 0x01)); // QR, RD copied
    reply.push(0x80); // RA, NOERROR
    let answers: u16 = u16::from(qtype == 1);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(query.get(12..end)?);
    if answers == 1 {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some((qname, qtype, reply))
}

/// Resolve `query` per the mode; fills the record's name/type/forward/error.
fn resolve(shared: &Shared, query: &[u8], tcp: bool, rec: &mut InpodDnsQuery) -> Option<Vec<u8>> {
    if let Some((name, _, qtype)) = parse_question(query) {
        rec.qname = name;
        rec.qtype = qtype;
    } else {
        rec.error = Some("not a DNS query".to_string());
        return None;
    }
    match &shared.cfg.dns_mode {
        DnsMode::Answer(addr) => dns_answer(query, *addr).map(|(_, _, r)| r),
        DnsMode::Forward(upstream) => {
            rec.forwarded_to = Some(*upstream);
            let r = if tcp {
                forward_tcp(*upstream, query, shared.cfg.connect_timeout)
            } else {
                forward_udp(*upstream, query, shared.cfg.connect_timeout)
            };
            match r {
                Ok(reply) => Some(reply),
                Err(e) => {
                    rec.error = Some(format!("forward to {upstream}: {e}"));
                    None
                }
            }
        }
    }
}

fn forward_udp(upstream: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let fd = marked_socket(upstream, SockType::Datagram)?;
    let sock = UdpSocket::from(fd);
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(upstream)?;
    sock.send(query)?;
    let mut buf = vec![0u8; 4096];
    let n = crate::retry_eintr(|| sock.recv(&mut buf))?;
    buf.truncate(n);
    Ok(buf)
}

fn forward_tcp(upstream: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let mut s = open_upstream(
        &Upstream {
            dst: upstream,
            spoof: None,
            preamble: None,
        },
        timeout,
    )?;
    s.set_read_timeout(Some(timeout))?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too long"))?;
    s.write_all(&len.to_be_bytes())?;
    s.write_all(query)?;
    let mut l = [0u8; 2];
    s.read_exact(&mut l)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(l))];
    s.read_exact(&mut reply)?;
    Ok(reply)
}

fn enable_pktinfo(sock: &UdpSocket) -> io::Result<()> {
    let v4 = sock.local_addr()?.is_ipv4();
    if v4 {
        setsockopt(sock, sockopt::Ipv4PacketInfo, &true)
    } else {
        setsockopt(sock, sockopt::Ipv6RecvPacketInfo, &true)
    }
    .map_err(io::Error::from)
}

/// Drain pending datagrams; each query is resolved on its own thread (forwarding may take a
/// while) and answered from the address it was sent to (`IP_PKTINFO`).
fn dns_udp_ready(shared: &Arc<Shared>, uid: &str, sock: &Arc<UdpSocket>) {
    loop {
        match recv_with_dst(sock) {
            Ok((query, peer, local)) => {
                let shared = Arc::clone(shared);
                let sock = Arc::clone(sock);
                let owned_uid = uid.to_string();
                let spawned = std::thread::Builder::new()
                    .name("mcni-ztdns".to_string())
                    .spawn(move || {
                        let mut rec = InpodDnsQuery {
                            uid: owned_uid,
                            proto: "udp",
                            peer,
                            original_dst: local.map(|ip| SocketAddr::new(ip, DNS_PORT)),
                            qname: String::new(),
                            qtype: 0,
                            forwarded_to: None,
                            error: None,
                        };
                        if let Some(reply) = resolve(&shared, &query, false, &mut rec)
                            && let Err(e) = send_from(&sock, &reply, peer, local)
                        {
                            rec.error = Some(format!("reply to {peer}: {e}"));
                        }
                        lock(&shared.dns).push(rec);
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, uid, "in-pod stand-in: spawn DNS handler");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, uid, "in-pod stand-in: DNS recv failed");
                return;
            }
        }
    }
}

fn dns_tcp_conn(shared: &Shared, uid: &str, mut stream: TcpStream, peer: SocketAddr) {
    let _ = mark(&stream);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut rec = InpodDnsQuery {
        uid: uid.to_string(),
        proto: "tcp",
        peer,
        original_dst: nat_original_dst(&stream),
        qname: String::new(),
        qtype: 0,
        forwarded_to: None,
        error: None,
    };
    let mut len = [0u8; 2];
    if let Err(e) = stream.read_exact(&mut len) {
        rec.error = Some(format!("read length: {e}"));
        lock(&shared.dns).push(rec);
        return;
    }
    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
    if let Err(e) = stream.read_exact(&mut query) {
        rec.error = Some(format!("read query: {e}"));
        lock(&shared.dns).push(rec);
        return;
    }
    if let Some(reply) = resolve(shared, &query, true, &mut rec) {
        let r = u16::try_from(reply.len())
            .map_err(|_| io::Error::other("reply too long"))
            .and_then(|n| {
                stream.write_all(&n.to_be_bytes())?;
                stream.write_all(&reply)
            });
        if let Err(e) = r {
            rec.error = Some(format!("reply to {peer}: {e}"));
        }
    }
    lock(&shared.dns).push(rec);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::dns_query;

    #[test]
    fn dns_answer_carries_the_configured_address() {
        let q = dns_query(7, "a.b");
        let (name, qtype, r) = dns_answer(&q, Ipv4Addr::new(1, 2, 3, 4)).expect("answer");
        assert_eq!((name.as_str(), qtype), ("a.b", 1));
        assert_eq!(&r[..2], &[0, 7]);
        assert_eq!(&r[r.len() - 4..], &[1, 2, 3, 4]);
        assert!(dns_answer(&q[..5], Ipv4Addr::LOCALHOST).is_none());
    }
}
