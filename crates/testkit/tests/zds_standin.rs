//! The in-pod ztunnel stand-in against a fake agent written here with hand-written bytes (the
//! contract's field numbers), in real network namespaces. Needs root; fails without it.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use meshcni_testkit::inpod_ztunnel::DnsMode;
use meshcni_testkit::inpod_ztunnel::{AckOutcome, InpodZtunnelConfig, InpodZtunnelStandIn};
use meshcni_testkit::lab::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use meshcni_testkit::proxy::{dns_query, parse_question};
use meshcni_testkit::zds_client::{
    RecvError, RequestKind, WorkloadInfo, accept_seqpacket, listen_seqpacket, recv_packet,
    send_packet, set_recv_timeout,
};
use meshcni_testkit::{
    ConnectOpts, Lab, Netns, ProxyConfig, TcpServer, TransparentProxy, connect_text, udp_exchange,
};

const T: Duration = Duration::from_secs(5);

// ---- the fake agent ------------------------------------------------------------------------

/// A ZDS server socket in a private temp directory.
struct FakeAgent {
    dir: PathBuf,
    path: PathBuf,
    listener: OwnedFd,
}

impl FakeAgent {
    fn new(tag: &str) -> FakeAgent {
        let dir = std::env::temp_dir().join(format!("mcni-zds-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ztunnel.sock");
        let listener = Self::listen(&path);
        FakeAgent {
            dir,
            path,
            listener,
        }
    }

    fn listen(path: &std::path::Path) -> OwnedFd {
        let fd = listen_seqpacket(path).expect("listen");
        set_recv_timeout(&fd, T).expect("accept timeout");
        fd
    }

    /// Accept without reading the hello.
    fn accept_raw(&self) -> OwnedFd {
        let fd = accept_seqpacket(&self.listener).expect("stand-in connects within 5 s");
        set_recv_timeout(&fd, T).expect("recv timeout");
        fd
    }

    /// Accept the stand-in and check its hello is exactly `08 01`.
    fn accept(&self) -> Conn {
        let c = Conn(self.accept_raw());
        assert_eq!(c.recv(), [0x08, 0x01], "ZdsHello{{version: V1}}");
        c
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Conn(OwnedFd);

impl Conn {
    fn send(&self, bytes: &[u8], fds: &[&File]) {
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_packet(self.0.as_fd(), bytes, &raw).expect("send to stand-in");
    }

    fn recv(&self) -> Vec<u8> {
        recv_packet(self.0.as_fd(), 64 * 1024)
            .expect("packet from stand-in")
            .bytes
    }

    fn recv_within(&self, t: Duration) -> Result<Vec<u8>, RecvError> {
        set_recv_timeout(&self.0, t).expect("timeout");
        let r = recv_packet(self.0.as_fd(), 64 * 1024).map(|p| p.bytes);
        set_recv_timeout(&self.0, T).expect("timeout");
        r
    }

    /// Send and expect exactly `0a 00`.
    fn send_expect_ack(&self, bytes: &[u8], fds: &[&File]) {
        self.send(bytes, fds);
        assert_eq!(
            self.recv(),
            [0x0a, 0x00],
            "WorkloadResponse{{ack: Ack{{}}}}"
        );
    }

    /// Send and expect a nack; returns its error text (parsed by hand).
    fn send_expect_nack(&self, bytes: &[u8], fds: &[&File]) -> String {
        self.send(bytes, fds);
        nack_text(&self.recv())
    }
}

/// `0a L 0a l <error>` → error.
fn nack_text(b: &[u8]) -> String {
    assert!(b.len() >= 4, "nack too short: {b:02x?}");
    assert_eq!(
        b[0], 0x0a,
        "WorkloadResponse.ack is field 1, length-delimited"
    );
    assert_eq!(usize::from(b[1]), b.len() - 2, "ack length: {b:02x?}");
    assert_eq!(b[2], 0x0a, "Ack.error is field 1, length-delimited");
    assert_eq!(usize::from(b[3]), b.len() - 4, "error length: {b:02x?}");
    String::from_utf8(b[4..].to_vec()).expect("utf-8")
}

// ---- hand-written requests (field numbers from the contract; lengths < 128) ----------------

fn len_field(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag, u8::try_from(body.len()).expect("short")];
    v.extend_from_slice(body);
    v
}

/// `WorkloadRequest{add(1): AddWorkload{uid(1), workload_info(2): {name(1), namespace(2),
/// service_account(3)}}}`.
fn add(uid: &str, name: &str, ns: &str, sa: &str) -> Vec<u8> {
    let mut info = len_field(0x0a, name.as_bytes());
    info.extend(len_field(0x12, ns.as_bytes()));
    info.extend(len_field(0x1a, sa.as_bytes()));
    let mut body = len_field(0x0a, uid.as_bytes());
    body.extend(len_field(0x12, &info));
    len_field(0x0a, &body)
}

/// `WorkloadRequest{del(2): DelWorkload{uid(2)}}`.
fn del(uid: &str) -> Vec<u8> {
    len_field(0x12, &len_field(0x12, uid.as_bytes()))
}

/// `WorkloadRequest{keep(5): KeepWorkload{uid(1)}}`.
fn keep(uid: &str) -> Vec<u8> {
    len_field(0x2a, &len_field(0x0a, uid.as_bytes()))
}

/// `WorkloadRequest{snapshot_sent(3): SnapshotSent{}}`.
const SNAPSHOT_SENT: [u8; 2] = [0x1a, 0x00];

fn open_ns(ns: &Netns) -> File {
    File::open(ns.path()).expect("open netns")
}

/// How many of this process's open fds refer to `ns` (same nsfs device and inode).
fn fds_on(ns: &Netns) -> usize {
    let want = ns_id(ns);
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| (m.dev(), m.ino()) == want))
        .count()
}

fn ns_id(ns: &Netns) -> (u64, u64) {
    let m = std::fs::metadata(ns.path()).expect("stat netns");
    (m.dev(), m.ino())
}

/// `ss -Hltn` inside `ns`: local addresses of TCP listeners.
fn tcp_listeners(ns: &Netns) -> Vec<String> {
    ns.exec_ok("ss", &["-Hltn"])
        .expect("ss")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

fn udp_listeners(ns: &Netns) -> Vec<String> {
    ns.exec_ok("ss", &["-Hlun"])
        .expect("ss")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

fn standin(agent: &FakeAgent) -> InpodZtunnelStandIn {
    InpodZtunnelStandIn::start(&agent.path).expect("stand-in")
}

// ---- protocol --------------------------------------------------------------------------------

#[test]
fn add_opens_marked_listeners_in_the_pod_netns_and_del_closes_them() {
    let agent = FakeAgent::new("adddel");
    let zt = standin(&agent);
    let conn = agent.accept();
    assert_eq!(zt.connects(), 1);
    assert!(!zt.snapshot_complete());
    let pod = Netns::new("zpod").expect("netns");
    let bytes = add("uid-1", "web", "shop", "web-sa");
    // The exact bytes: WorkloadRequest.add (1) { uid (1) "uid-1", workload_info (2) {
    // name (1) "web", namespace (2) "shop", service_account (3) "web-sa" } }.
    let mut want = vec![0x0a, 0x1c, 0x0a, 0x05];
    want.extend_from_slice(b"uid-1");
    want.extend_from_slice(&[0x12, 0x13, 0x0a, 0x03]);
    want.extend_from_slice(b"web");
    want.extend_from_slice(&[0x12, 0x04]);
    want.extend_from_slice(b"shop");
    want.extend_from_slice(&[0x1a, 0x06]);
    want.extend_from_slice(b"web-sa");
    assert_eq!(bytes, want);
    conn.send_expect_ack(&bytes, &[&open_ns(&pod)]);

    let st = zt.wait_for_workload("uid-1", T).expect("workload held");
    assert_eq!(st.netns, ns_id(&pod));
    assert!(!st.dns_capture);
    let info = WorkloadInfo {
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web-sa".into(),
    };
    assert_eq!(zt.workloads().get("uid-1"), Some(&info));
    let listening = tcp_listeners(&pod);
    for want in [
        "0.0.0.0:15001",
        "0.0.0.0:15006",
        "0.0.0.0:15008",
        "[::]:15001",
        "[::]:15006",
        "[::]:15008",
    ] {
        assert!(
            listening.iter().any(|l| l == want),
            "{want} in {listening:?}"
        );
    }
    assert!(
        !listening.iter().any(|l| l.ends_with(":15053")),
        "no DNS without capture: {listening:?}"
    );
    // Every listener carries the 0x539 mark.
    let ext = pod.exec_ok("ss", &["-Hltne"]).expect("ss -e");
    assert_eq!(
        ext.lines().filter(|l| l.contains("fwmark:0x539")).count(),
        6,
        "marked listeners: {ext}"
    );

    let recs = zt.requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].kind, Some(RequestKind::Add));
    assert_eq!(recs[0].uid.as_deref(), Some("uid-1"));
    assert_eq!(recs[0].info.as_ref(), Some(&info));
    assert_eq!(recs[0].netns, Some(ns_id(&pod)));
    assert_eq!(recs[0].fd_count, 1);
    assert_eq!(recs[0].outcome, AckOutcome::Ack);
    assert_eq!(recs[0].bytes, bytes);

    assert_eq!(fds_on(&pod), 1, "the stand-in holds the netns fd");
    conn.send_expect_ack(&del("uid-1"), &[]);
    zt.wait_for_no_workload("uid-1", T).expect("deleted");
    assert_eq!(fds_on(&pod), 0, "netns fd closed on DelWorkload");
    let listening = tcp_listeners(&pod);
    assert!(
        !listening.iter().any(|l| l.contains(":1500")),
        "listeners closed: {listening:?}"
    );
    assert_eq!(zt.requests()[1].kind, Some(RequestKind::Del));
    assert!(
        zt.protocol_errors().is_empty(),
        "{:?}",
        zt.protocol_errors()
    );
}

#[test]
fn add_with_no_fd_or_two_fds_is_nacked_naming_the_count() {
    let agent = FakeAgent::new("fds");
    let zt = standin(&agent);
    let conn = agent.accept();
    let a = Netns::new("zfa").expect("netns");
    let b = Netns::new("zfb").expect("netns");
    let msg = conn.send_expect_nack(&add("u0", "n", "s", "a"), &[]);
    assert!(msg.contains("u0") && msg.contains("0 netns fd"), "{msg}");
    let msg = conn.send_expect_nack(&add("u2", "n", "s", "a"), &[&open_ns(&a), &open_ns(&b)]);
    assert!(msg.contains("u2") && msg.contains("2 netns fd"), "{msg}");
    // A fd on a Del is also refused.
    let msg = conn.send_expect_nack(&del("u0"), &[&open_ns(&a)]);
    assert!(
        msg.contains("Del for uid u0 carried 1 unexpected fd"),
        "{msg}"
    );
    assert!(zt.workloads().is_empty());
    assert!(tcp_listeners(&a).is_empty() && tcp_listeners(&b).is_empty());
    let recs = zt.requests();
    assert_eq!(recs[1].fd_count, 2);
    assert!(matches!(&recs[1].outcome, AckOutcome::Nack(m) if m.contains("2 netns fd")));
    // The connection is still usable.
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert!(zt.snapshot_complete());
}

#[test]
fn reconnect_snapshot_keeps_mentioned_and_drops_the_rest() {
    let agent = FakeAgent::new("snap");
    let zt = standin(&agent);
    let conn = agent.accept();
    let a = Netns::new("zsa").expect("netns");
    let b = Netns::new("zsb").expect("netns");
    let c = Netns::new("zsc").expect("netns");
    conn.send_expect_ack(&add("ua", "a", "ns", "sa"), &[&open_ns(&a)]);
    conn.send_expect_ack(&add("ub", "b", "ns", "sa"), &[&open_ns(&b)]);
    conn.send_expect_ack(&add("uc", "c", "ns", "sa"), &[&open_ns(&c)]);
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert!(zt.snapshot_complete());
    assert_eq!(zt.workloads().len(), 3);

    // The agent restarts: the stand-in reconnects (keeping its workloads meanwhile).
    drop(conn);
    let conn = agent.accept();
    zt.wait_for_connects(2, T).expect("reconnected");
    assert!(!zt.snapshot_complete(), "not ready until the new snapshot");
    assert_eq!(zt.workloads().len(), 3);
    // Snapshot: a again (same netns: listeners kept), keep c (no fd), b not mentioned.
    conn.send_expect_ack(&add("ua", "a", "ns", "sa"), &[&open_ns(&a)]);
    conn.send_expect_ack(&keep("uc"), &[]);
    assert!(zt.workload("ub").is_some(), "dropped only at SnapshotSent");
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert!(zt.snapshot_complete());
    let held: Vec<String> = zt.workloads().into_keys().collect();
    assert_eq!(held, ["ua", "uc"]);
    assert!(tcp_listeners(&b).is_empty(), "b's listeners closed");
    assert_eq!(fds_on(&b), 0, "b's netns fd closed");
    assert_eq!(fds_on(&a), 1, "a re-added with the same netns: one fd kept");
    assert!(tcp_listeners(&a).iter().any(|l| l == "0.0.0.0:15001"));
    assert!(tcp_listeners(&c).iter().any(|l| l == "0.0.0.0:15001"));
    let recs = zt.requests();
    assert_eq!(recs.len(), 7);
    assert!(recs[4..].iter().all(|r| r.connection == 2));
    assert_eq!(recs[5].kind, Some(RequestKind::Keep));
    assert_eq!(recs[5].fd_count, 0);
}

#[test]
fn malformed_and_oversized_requests_drop_the_connection_then_it_reconnects() {
    let agent = FakeAgent::new("bad");
    let zt = standin(&agent);
    let conn = agent.accept();
    conn.send(&[0xff, 0xff, 0xff], &[]);
    assert!(
        matches!(conn.recv_within(T), Err(RecvError::Closed)),
        "dropped after garbage"
    );
    let conn = agent.accept();
    // Longer than ztunnel's 1024-byte buffer (a valid message otherwise).
    let oversized = {
        let uid = "u".repeat(1100);
        let mut body = vec![0x0a, 0xcc, 0x08];
        body.extend_from_slice(uid.as_bytes());
        let mut v = vec![0x0a, 0xcf, 0x08];
        v.extend(body);
        v
    };
    assert!(oversized.len() > 1024);
    conn.send(&oversized, &[]);
    assert!(matches!(conn.recv_within(T), Err(RecvError::Closed)));
    let _conn = agent.accept();
    zt.wait_for_connects(3, T).expect("three connections");
    let errs = zt.protocol_errors();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("ZDS decode error"), "{errs:?}");
    assert!(errs[1].contains("MSG_TRUNC"), "{errs:?}");
    assert_eq!(zt.requests()[0].kind, None);
    assert_eq!(zt.requests()[0].outcome, AckOutcome::Disconnected);
}

#[test]
fn reconnects_with_backoff_until_the_agent_socket_exists() {
    let dir = std::env::temp_dir().join(format!("mcni-zds-{}-late", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("ztunnel.sock");
    let zt = InpodZtunnelStandIn::start(&path).expect("stand-in");
    zt.wait_for("a failed connect", T, |z| z.last_connect_error().is_some())
        .expect("tries");
    assert_eq!(zt.connects(), 0);
    let err = zt.last_connect_error().expect("error");
    assert!(err.contains(&path.display().to_string()), "{err}");
    let listener = FakeAgent::listen(&path);
    let _conn = accept_seqpacket(&listener).expect("connects once the socket exists");
    zt.wait_for_connects(1, T).expect("connected");
    drop(zt);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fault_knobs_nack_never_ack_delay_disconnect_and_raw_sends() {
    let agent = FakeAgent::new("faults");
    let zt = standin(&agent);
    let conn = agent.accept();
    let pod = Netns::new("zflt").expect("netns");

    zt.nack_uid("bad", "refusing bad on purpose");
    let msg = conn.send_expect_nack(&add("bad", "n", "s", "a"), &[&open_ns(&pod)]);
    assert_eq!(msg, "refusing bad on purpose");
    assert!(zt.workload("bad").is_none());
    assert!(tcp_listeners(&pod).is_empty());
    zt.clear_nack("bad");

    zt.set_never_ack(true);
    conn.send(&keep("k"), &[]);
    assert!(matches!(
        conn.recv_within(Duration::from_millis(300)),
        Err(RecvError::TimedOut)
    ));
    assert_eq!(zt.requests()[1].outcome, AckOutcome::NoAck);
    zt.set_never_ack(false);

    zt.set_ack_delay(Duration::from_millis(200));
    conn.send(&keep("k"), &[]);
    assert!(matches!(
        conn.recv_within(Duration::from_millis(50)),
        Err(RecvError::TimedOut)
    ));
    assert_eq!(conn.recv(), [0x0a, 0x00], "late ack");
    zt.set_ack_delay(Duration::ZERO);

    zt.reply_raw_for("raw", vec![0x01, 0x02]);
    conn.send(&keep("raw"), &[]);
    assert_eq!(conn.recv(), [0x01, 0x02]);

    zt.send_malformed().expect("send");
    assert_eq!(conn.recv(), [0xff, 0xff, 0xff]);
    zt.send_oversized(2000).expect("send");
    let big = conn.recv();
    assert!(big.len() > 2000 && big[0] == 0x0a, "{}", big.len());

    // Drop the connection on the 2nd request of the next connection.
    zt.disconnect();
    let conn = agent.accept();
    zt.disconnect_after(2);
    conn.send_expect_ack(&keep("x"), &[]);
    conn.send(&keep("y"), &[]);
    assert!(matches!(conn.recv_within(T), Err(RecvError::Closed)));
    let conn = agent.accept();
    conn.send_expect_ack(&keep("z"), &[]);

    // Replaced hello.
    zt.set_hello_bytes(Some(vec![0x08, 0x07]));
    zt.disconnect();
    let fd = agent.accept_raw();
    assert_eq!(
        recv_packet(fd.as_fd(), 64).expect("hello").bytes,
        [0x08, 0x07]
    );
    drop(conn);
}

#[test]
fn stop_closes_every_listener_and_restart_expects_a_fresh_snapshot() {
    let agent = FakeAgent::new("restart");
    let zt = standin(&agent);
    let conn = agent.accept();
    let pod = Netns::new("zrst").expect("netns");
    conn.send_expect_ack(&add("u", "n", "s", "a"), &[&open_ns(&pod)]);
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    zt.stop();
    assert!(matches!(conn.recv_within(T), Err(RecvError::Closed)));
    assert!(zt.workloads().is_empty());
    assert!(
        tcp_listeners(&pod).is_empty(),
        "a killed ztunnel's listeners are gone"
    );
    assert!(!zt.snapshot_complete());
    zt.restart().expect("restart");
    let conn = agent.accept();
    assert_eq!(zt.connects(), 2);
    conn.send_expect_ack(&add("u", "n", "s", "a"), &[&open_ns(&pod)]);
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert!(tcp_listeners(&pod).iter().any(|l| l == "0.0.0.0:15008"));
    drop(zt);
    assert!(
        tcp_listeners(&pod).is_empty(),
        "dropping the stand-in closes listeners"
    );
}

// ---- traffic ---------------------------------------------------------------------------------

fn ipt(ns: &Netns, v6: bool, args: &[&str]) {
    ns.exec_ok(if v6 { "ip6tables-nft" } else { "iptables-nft" }, args)
        .expect("iptables");
}

/// A minimal hand-written in-pod rule set (the real one is the agent's): outbound TCP →
/// 15001, inbound TCP except 15008 → 15006, 0x539 exempt, and the connmark 0x111 return path
/// for connections the stand-in makes with a client's source address.
fn minimal_inpod_rules(ns: &Netns) {
    for v6 in [false, true] {
        let lo = if v6 { "::1/128" } else { "127.0.0.1/32" };
        ipt(
            ns,
            v6,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "!",
                "-d",
                lo,
                "-p",
                "tcp",
                "--dport",
                "53",
                "-m",
                "mark",
                "!",
                "--mark",
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15053",
            ],
        );
        ipt(
            ns,
            v6,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "!",
                "-d",
                lo,
                "-p",
                "tcp",
                "-m",
                "mark",
                "!",
                "--mark",
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        );
        ipt(
            ns,
            v6,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "!",
                "-o",
                "lo",
                "-p",
                "udp",
                "--dport",
                "53",
                "-m",
                "mark",
                "!",
                "--mark",
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15053",
            ],
        );
        ipt(
            ns,
            v6,
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "!",
                "-d",
                lo,
                "-p",
                "tcp",
                "!",
                "--dport",
                "15008",
                "-m",
                "mark",
                "!",
                "--mark",
                "0x539/0xfff",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15006",
            ],
        );
        ipt(
            ns,
            v6,
            &[
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-m",
                "mark",
                "--mark",
                "0x539/0xfff",
                "-j",
                "CONNMARK",
                "--set-xmark",
                "0x111/0xfff",
            ],
        );
        ipt(
            ns,
            v6,
            &[
                "-t",
                "mangle",
                "-A",
                "OUTPUT",
                "-m",
                "connmark",
                "--mark",
                "0x111/0xfff",
                "-j",
                "CONNMARK",
                "--restore-mark",
                "--nfmask",
                "0xffffffff",
                "--ctmask",
                "0xffffffff",
            ],
        );
        let fam = if v6 { "-6" } else { "-4" };
        let any = if v6 { "::/0" } else { "0.0.0.0/0" };
        ns.ip(&[
            fam,
            "rule",
            "add",
            "fwmark",
            "0x111/0xfff",
            "pref",
            "32764",
            "lookup",
            "100",
        ])
        .expect("ip rule");
        ns.ip(&[
            fam, "route", "add", "local", any, "dev", "lo", "table", "100",
        ])
        .expect("ip route");
    }
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn traffic_through_both_pods_keeps_the_client_source_direct_and_over_hbone() {
    let lab = Lab::new("zdst").expect("lab");
    minimal_inpod_rules(&lab.client);
    minimal_inpod_rules(&lab.server);
    let _srv4 = TcpServer::start(&lab.server, sa(SERVER_V4, 8080)).expect("server v4");
    let _srv6 = TcpServer::start(&lab.server, sa(SERVER_V6, 8080)).expect("server v6");
    let agent = FakeAgent::new("traffic");
    let zt = standin(&agent);
    let conn = agent.accept();
    conn.send_expect_ack(&add("cli", "client", "ns", "sa"), &[&open_ns(&lab.client)]);
    conn.send_expect_ack(&add("srv", "server", "ns", "sa"), &[&open_ns(&lab.server)]);
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);

    for v6 in [false, true] {
        let (cip, sip) = if v6 {
            (IpAddr::V6(CLIENT_V6), IpAddr::V6(SERVER_V6))
        } else {
            (IpAddr::V4(CLIENT_V4), IpAddr::V4(SERVER_V4))
        };
        let dst = sa(sip, 8080);
        // Server uncaptured (per the xDS set): client 15001 connects directly; the server
        // pod's rules redirect it to its 15006, which connects with the client's address.
        zt.set_captured([]);
        zt.take_hops();
        let got = connect_text(&lab.client, dst, &ConnectOpts::default()).expect("direct");
        assert!(
            got.starts_with(&format!(
                "server:{dst} peer:{}",
                sa(cip, 0).to_string().trim_end_matches(":0")
            )),
            "{got}"
        );
        assert!(got.ends_with("hello\n"), "{got}");
        let hops = zt.wait_for_hops(2, T).expect("hops");
        let out = hops
            .iter()
            .find(|h| h.listener_port == 15001)
            .expect("15001 hop");
        assert_eq!(
            (out.uid.as_str(), out.original_dst, out.upstream_dst),
            ("cli", dst, Some(dst))
        );
        assert_eq!(out.peer.ip(), cip);
        let inb = hops
            .iter()
            .find(|h| h.listener_port == 15006)
            .expect("15006 hop");
        assert_eq!(
            (inb.uid.as_str(), inb.original_dst, inb.peer.ip()),
            ("srv", dst, cip)
        );
        assert_eq!(
            inb.upstream_local.map(|a| a.ip()),
            Some(cip),
            "spoofed source"
        );
        assert!(hops.iter().all(|h| h.error.is_none()), "{hops:?}");

        // Server captured: HBONE to <server>:15008 from the client pod.
        zt.set_captured([sip]);
        zt.take_hops();
        let got = connect_text(&lab.client, dst, &ConnectOpts::default()).expect("hbone");
        assert!(got.contains(&format!("server:{dst} peer:")), "{got}");
        assert!(
            got.contains(&cip.to_string()),
            "client address preserved: {got}"
        );
        let hops = zt.wait_for_hops(2, T).expect("hops");
        let out = hops
            .iter()
            .find(|h| h.listener_port == 15001)
            .expect("15001 hop");
        assert_eq!(out.upstream_dst, Some(sa(sip, 15008)));
        let hb = hops
            .iter()
            .find(|h| h.listener_port == 15008)
            .expect("15008 hop");
        assert_eq!(hb.uid, "srv");
        assert_eq!(hb.hbone, Some((dst, cip)));
        assert_eq!(hb.upstream_local.map(|a| a.ip()), Some(cip));
        assert!(hops.iter().all(|h| h.listener_port != 15006), "{hops:?}");
    }

    // DNS capture is per workload and takes effect at its Add.
    zt.set_dns_capture("cli", true);
    conn.send_expect_ack(&del("cli"), &[]);
    conn.send_expect_ack(&add("cli", "client", "ns", "sa"), &[&open_ns(&lab.client)]);
    assert!(zt.workload("cli").expect("held").dns_capture);
    assert!(
        udp_listeners(&lab.client)
            .iter()
            .any(|l| l == "0.0.0.0:15053")
    );
    assert!(udp_listeners(&lab.server).is_empty());
    let reply = udp_exchange(
        &lab.client,
        sa(std::net::Ipv4Addr::new(10, 96, 0, 10), 53),
        &ConnectOpts {
            payload: dns_query(9, "svc.shop.cluster.local"),
            ..ConnectOpts::default()
        },
    )
    .expect("dns answered by the stand-in");
    let (name, _, _) = parse_question(&reply).expect("reply");
    assert_eq!(name, "svc.shop.cluster.local");
    assert_eq!(&reply[reply.len() - 4..], &[10, 53, 0, 1]);
    let q = zt.wait_for_dns_queries(1, T).expect("recorded");
    assert_eq!(
        (q[0].uid.as_str(), q[0].proto, q[0].qtype),
        ("cli", "udp", 1)
    );
    assert_eq!(q[0].qname, "svc.shop.cluster.local");
}

/// A DNS exchange over TCP from inside `ns` (2-byte length framing).
fn tcp_dns(ns: &Netns, addr: SocketAddr, query: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    ns.run(|| -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(T))?;
        let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(query)?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l)?;
        let mut r = vec![0u8; usize::from(u16::from_be_bytes(l))];
        s.read_exact(&mut r)?;
        Ok(r)
    })
    .expect("netns")
    .expect("tcp dns exchange")
}

#[test]
fn dns_forward_mode_relays_udp_and_tcp_from_inside_the_pod_marked() {
    let lab = Lab::new("zdns").expect("lab");
    minimal_inpod_rules(&lab.client);
    // The upstream resolver lives in the server netns on :53 (answers A 10.53.0.1).
    let upstream = TransparentProxy::start_with(
        &lab.server,
        &ProxyConfig {
            tcp_ports: vec![],
            dns_port: Some(53),
        },
    )
    .expect("upstream dns");
    let agent = FakeAgent::new("dnsfwd");
    let mut cfg = InpodZtunnelConfig::new(&agent.path);
    cfg.dns_capture = true;
    cfg.dns_mode = DnsMode::Forward(sa(SERVER_V4, 53));
    let zt = InpodZtunnelStandIn::start_with(cfg).expect("stand-in");
    let conn = agent.accept();
    conn.send_expect_ack(&add("cli", "client", "ns", "sa"), &[&open_ns(&lab.client)]);
    let st = zt.workload("cli").expect("held");
    assert!(st.dns_capture);
    assert!(
        st.listening
            .contains(&sa(std::net::Ipv4Addr::UNSPECIFIED, 15053))
    );

    let service = sa(std::net::Ipv4Addr::new(10, 96, 0, 10), 53);
    let reply = udp_exchange(
        &lab.client,
        service,
        &ConnectOpts {
            payload: dns_query(1, "udp.example"),
            ..ConnectOpts::default()
        },
    )
    .expect("udp answer");
    assert_eq!(parse_question(&reply).expect("reply").0, "udp.example");
    assert_eq!(&reply[reply.len() - 4..], &[10, 53, 0, 1]);
    let reply = tcp_dns(&lab.client, service, &dns_query(2, "tcp.example"));
    assert_eq!(parse_question(&reply).expect("reply").0, "tcp.example");
    assert_eq!(&reply[reply.len() - 4..], &[10, 53, 0, 1]);

    let q = zt.wait_for_dns_queries(2, T).expect("recorded");
    assert_eq!(q[0].proto, "udp");
    assert_eq!(q[0].qname, "udp.example");
    assert_eq!(q[1].proto, "tcp");
    assert_eq!(q[1].qname, "tcp.example");
    assert_eq!(
        q[1].original_dst,
        Some(service),
        "SO_ORIGINAL_DST of the TCP query"
    );
    assert!(q.iter().all(|x| x.forwarded_to == Some(sa(SERVER_V4, 53))));
    assert!(q.iter().all(|x| x.error.is_none()), "{q:?}");
    // The forwarded queries left the client pod from its own address (and, being marked
    // 0x539, were not captured again by the pod's port-53 rules).
    let seen = upstream.dns_queries();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(|x| x.peer.ip() == IpAddr::V4(CLIENT_V4)),
        "{seen:?}"
    );
}

#[test]
fn add_without_workload_info_is_nacked_unless_configured_like_ztunnel_1_21() {
    let agent = FakeAgent::new("noinfo");
    let zt = standin(&agent);
    let conn = agent.accept();
    let pod = Netns::new("znoi").expect("netns");
    // WorkloadRequest.add (1) { uid (1) "u1" } — no workload_info.
    let uid_only = [0x0a, 0x04, 0x0a, 0x02, b'u', b'1'];
    let msg = conn.send_expect_nack(&uid_only, &[&open_ns(&pod)]);
    assert!(msg.contains("u1") && msg.contains("workload_info"), "{msg}");
    assert!(tcp_listeners(&pod).is_empty());
    // Stop it first (a dropped connection would make it reconnect into our backlog).
    drop(zt);
    drop(conn);

    let mut cfg = InpodZtunnelConfig::new(&agent.path);
    cfg.require_workload_info = false;
    let zt = InpodZtunnelStandIn::start_with(cfg).expect("stand-in");
    let conn = agent.accept();
    conn.send_expect_ack(&uid_only, &[&open_ns(&pod)]);
    assert_eq!(
        zt.workloads().get("u1"),
        Some(&WorkloadInfo::default()),
        "held without info"
    );
    assert_eq!(zt.requests()[0].info, None);
}

#[test]
fn two_standins_hold_the_same_pod_during_a_rolling_restart() {
    let agent = FakeAgent::new("rolling");
    let old = standin(&agent);
    let c_old = agent.accept();
    let new = standin(&agent);
    let c_new = agent.accept();
    let pod = Netns::new("zroll").expect("netns");
    c_old.send_expect_ack(&add("u", "n", "s", "a"), &[&open_ns(&pod)]);
    c_new.send_expect_ack(&add("u", "n", "s", "a"), &[&open_ns(&pod)]);
    let listening = tcp_listeners(&pod);
    assert_eq!(
        listening.iter().filter(|l| *l == "0.0.0.0:15001").count(),
        2,
        "SO_REUSEPORT lets both listen: {listening:?}"
    );
    // The agent broadcasts deletes to every connection.
    c_old.send_expect_ack(&del("u"), &[]);
    c_new.send_expect_ack(&del("u"), &[]);
    assert!(tcp_listeners(&pod).is_empty());
    assert!(old.workloads().is_empty() && new.workloads().is_empty());
}

#[test]
fn forty_workloads_get_their_own_listeners_and_a_partial_snapshot_keeps_half() {
    let agent = FakeAgent::new("many");
    let zt = standin(&agent);
    let conn = agent.accept();
    let pods: Vec<Netns> = (0..40)
        .map(|i| Netns::new(&format!("zm{i}")).expect("netns"))
        .collect();
    for (i, pod) in pods.iter().enumerate() {
        conn.send_expect_ack(&add(&format!("u{i}"), "n", "s", "a"), &[&open_ns(pod)]);
    }
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert_eq!(zt.workloads().len(), 40);
    for (i, pod) in pods.iter().enumerate() {
        let st = zt.workload(&format!("u{i}")).expect("held");
        assert_eq!(st.netns, ns_id(pod));
        assert_eq!(st.listening.len(), 6, "{st:?}");
    }
    drop(conn);
    let conn = agent.accept();
    for (i, pod) in pods.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        conn.send_expect_ack(&add(&format!("u{i}"), "n", "s", "a"), &[&open_ns(pod)]);
    }
    conn.send_expect_ack(&SNAPSHOT_SENT, &[]);
    assert_eq!(zt.workloads().len(), 20);
    for (i, pod) in pods.iter().enumerate() {
        let held = i % 2 == 0;
        assert_eq!(zt.workload(&format!("u{i}")).is_some(), held, "u{i}");
        assert_eq!(fds_on(pod), usize::from(held), "netns fd of u{i}");
    }
    assert!(tcp_listeners(&pods[1]).is_empty());
    assert_eq!(tcp_listeners(&pods[2]).len(), 6);
}

#[test]
fn auto_capture_sends_traffic_between_held_pods_over_hbone() {
    let lab = Lab::new("zauto").expect("lab");
    minimal_inpod_rules(&lab.client);
    let _srv = TcpServer::start(&lab.server, sa(SERVER_V4, 8080)).expect("server");
    let agent = FakeAgent::new("auto");
    let mut cfg = InpodZtunnelConfig::new(&agent.path);
    cfg.auto_capture = true;
    let zt = InpodZtunnelStandIn::start_with(cfg).expect("stand-in");
    let conn = agent.accept();
    conn.send_expect_ack(&add("cli", "client", "ns", "sa"), &[&open_ns(&lab.client)]);
    let ips = zt.workload("cli").expect("held").ips;
    assert_eq!(ips, [IpAddr::V4(CLIENT_V4), IpAddr::V6(CLIENT_V6)]);

    // Server not held yet: direct.
    let dst = sa(SERVER_V4, 8080);
    connect_text(&lab.client, dst, &ConnectOpts::default()).expect("direct");
    let hops = zt.wait_for_hops(1, T).expect("hop");
    assert_eq!(hops[0].upstream_dst, Some(dst), "{hops:?}");
    // Server enrolled (rules + held): its address is captured, so HBONE.
    minimal_inpod_rules(&lab.server);
    conn.send_expect_ack(&add("srv", "server", "ns", "sa"), &[&open_ns(&lab.server)]);
    zt.take_hops();
    let got = connect_text(&lab.client, dst, &ConnectOpts::default()).expect("hbone");
    assert!(got.contains(&format!("peer:{CLIENT_V4}:")), "{got}");
    let hops = zt.wait_for_hops(2, T).expect("hops");
    let out = hops
        .iter()
        .find(|h| h.listener_port == 15001)
        .expect("15001");
    assert_eq!(out.upstream_dst, Some(sa(SERVER_V4, 15008)));
    // Released (held no more, its redirects removed): direct again.
    conn.send_expect_ack(&del("srv"), &[]);
    ipt(&lab.server, false, &["-t", "nat", "-F"]);
    zt.take_hops();
    connect_text(&lab.client, dst, &ConnectOpts::default()).expect("direct again");
    let hops = zt.wait_for_hops(1, T).expect("hop");
    assert_eq!(hops[0].upstream_dst, Some(dst), "{hops:?}");
}
