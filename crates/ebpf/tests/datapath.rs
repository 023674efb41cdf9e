//! The eBPF datapath for real, as root, in namespaces these tests create (a `MultiNodeLab`
//! node with dual-stack pods and a ztunnel pod running the ztunnel stand-in) and a private
//! bpffs mounted on a temporary directory (the host's `/sys/fs/bpf` is never used).
//! Needs root, clang-built programs (build.rs), `ip`, `tc`, `bpftool`, `iptables-save`,
//! `ip6tables-save` and `nft`: a missing one fails the test.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshcni_ebpf::{
    AttachKind, AttachMode, Datapath, DatapathConfig, EbpfError, Hook, PodEntry, ZtunnelEntry,
    features, ifindex_in, mac_in, uninstall,
};
use meshcni_testkit::multinode::{EchoServer, ZTUNNEL_HOST_VETH, open_stream, read_line};
use meshcni_testkit::ztunnel::ZtunnelStandIn;
use meshcni_testkit::{LabPod, MultiNodeLab, Netns};

const TIMEOUT: Duration = Duration::from_secs(5);
const PORT: u16 = 8080;

/// A bpffs instance of our own on a temporary directory; unmounted on drop.
struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    fn mount() -> PrivateBpffs {
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

    fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("meshcni")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn config(bpffs: &PrivateBpffs, attach: AttachMode) -> DatapathConfig {
    DatapathConfig {
        pin_dir: bpffs.pin_dir(),
        pod_capacity: meshcni_ebpf::DEFAULT_POD_CAPACITY,
        attach,
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} {args:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns.name(), program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// The lab: one node, pods `client` and `server` (dual stack), the ztunnel pod (IPv4, plus an
/// IPv6 default route so it can reach IPv6 pods with their own addresses as sources).
fn lab(tag: &str) -> MultiNodeLab {
    let lab = MultiNodeLab::new_dual_stack(tag, &[&["client", "server"]]).expect("lab");
    let node = lab.node(1);
    node.netns
        .ip(&["addr", "add", "fe80::1/64", "dev", ZTUNNEL_HOST_VETH])
        .expect("fe80::1 on the ztunnel veth");
    node.ztunnel
        .netns
        .ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ])
        .expect("ztunnel IPv6 default route");
    lab
}

/// Attach the ztunnel side and publish the ztunnel in the map.
fn attach_ztunnel(dp: &Datapath, lab: &MultiNodeLab) {
    let node = lab.node(1);
    dp.attach(node.netns.path(), ZTUNNEL_HOST_VETH, Hook::ZtunnelHost)
        .expect("attach ztunnel host program");
    dp.attach_ztunnel_netns(node.ztunnel.netns.path(), "eth0")
        .expect("attach ztunnel netns program");
    dp.set_ztunnel(Some(ZtunnelEntry {
        host_ifindex: ifindex_in(node.netns.path(), ZTUNNEL_HOST_VETH).expect("vzt ifindex"),
        mac: mac_in(node.ztunnel.netns.path(), "eth0").expect("ztunnel MAC"),
        host_mac: mac_in(node.netns.path(), ZTUNNEL_HOST_VETH).expect("vzt MAC"),
        ip4: Some(node.ztunnel.ip),
        ip6: None,
    }))
    .expect("ztunnel map");
}

/// Enroll a pod: programs on its host veth, every IP in the map.
fn enroll(dp: &Datapath, lab: &MultiNodeLab, pod: &LabPod) {
    enroll_with(dp, lab, pod, false);
}

fn enroll_with(dp: &Datapath, lab: &MultiNodeLab, pod: &LabPod, dns_capture: bool) {
    let node = lab.node_of(pod);
    dp.attach_pod(node.netns.path(), &pod.host_veth)
        .expect("attach pod programs");
    let entry = PodEntry {
        host_ifindex: ifindex_in(node.netns.path(), &pod.host_veth).expect("pod veth ifindex"),
        mac: mac_in(pod.netns.path(), "eth0").expect("pod MAC"),
        dns_capture,
    };
    for ip in pod.ips() {
        dp.set_pod(ip, entry).expect("pod map");
    }
}

/// One exchange from `from` to `to`; returns the server's greeting (`server:<local> peer:<peer>`).
fn exchange(from: &Netns, to: SocketAddr) -> String {
    let mut stream: TcpStream = open_stream(from, to, TIMEOUT).expect("connect");
    let greeting = read_line(&mut stream).expect("greeting");
    stream.write_all(b"ping\n").expect("write");
    let mut reader = BufReader::new(stream);
    let mut echoed = String::new();
    reader.read_line(&mut echoed).expect("echo");
    assert_eq!(echoed, "ping\n", "echo through {to}");
    greeting
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// No iptables/ip6tables rule (either flavour), no nft ruleset, no policy rule beyond the
/// kernel's defaults in `ns`. `ztunnel` allows our one fwmark rule per family there.
fn assert_no_rules(ns: &Netns, ztunnel: bool) {
    for save in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        let out = run_in(ns, save, &[]);
        let rules: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        assert!(rules.is_empty(), "{save} in {} shows {rules:?}", ns.name());
    }
    let nft = run_in(ns, "nft", &["list", "ruleset"]);
    assert!(nft.trim().is_empty(), "nft ruleset in {}: {nft}", ns.name());
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
                "ip {family} rule in the ztunnel netns"
            );
        } else {
            assert!(
                extra.is_empty(),
                "ip {family} rule in {}: {extra:?}",
                ns.name()
            );
        }
    }
}

#[test]
fn captured_pod_outbound_reaches_ztunnel_by_sk_assign_ipv4_and_ipv6_without_any_rule() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebo");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    assert_eq!(dp.attach_kind(), AttachKind::Tcx);
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let servers = echo_servers(server);
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);

    for (i, (src, dst)) in client.ips().into_iter().zip(server.ips()).enumerate() {
        let greeting = exchange(&client.netns, addr(dst, PORT));
        // The server saw the client's own address: ztunnel spoofed it, as the real one does.
        let peer: SocketAddr = greeting
            .trim_end()
            .rsplit_once(" peer:")
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("greeting {greeting:?}"));
        assert_eq!(peer.ip(), src, "greeting {greeting:?}");
        let hops = zt.wait_for_hops(i + 1, TIMEOUT).expect("hop");
        let hop = &hops[i];
        assert_eq!(hop.listener_port, 15001, "{hop:?}");
        assert_eq!(hop.original_dst, addr(dst, PORT), "{hop:?}");
        assert_eq!(hop.peer.ip(), src, "{hop:?}");
        assert_eq!(hop.upstream_local.map(|a| a.ip()), Some(src), "{hop:?}");
        assert_eq!(hop.error, None);
    }
    assert_eq!(servers.iter().map(EchoServer::accepted).sum::<usize>(), 2);
    assert_no_rules(&node.netns, false);
    assert_no_rules(&node.ztunnel.netns, true);

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn traffic_to_a_captured_pod_reaches_ztunnel_inbound_ipv4_and_ipv6() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebi");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let _servers = echo_servers(server);
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, server);

    for (i, (src, dst)) in client.ips().into_iter().zip(server.ips()).enumerate() {
        exchange(&client.netns, addr(dst, PORT));
        let hops = zt.wait_for_hops(i + 1, TIMEOUT).expect("hop");
        let hop = &hops[i];
        assert_eq!(hop.listener_port, 15006, "{hop:?}");
        assert_eq!(hop.original_dst, addr(dst, PORT), "{hop:?}");
        assert_eq!(hop.peer.ip(), src, "{hop:?}");
        assert_eq!(hop.upstream_local.map(|a| a.ip()), Some(src), "{hop:?}");
    }
    assert_no_rules(&node.netns, false);
    assert_no_rules(&node.ztunnel.netns, true);

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn same_node_captured_to_captured_goes_through_ztunnel_hbone_and_back() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebh");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    zt.set_captured([IpAddr::V4(server.ip)]);
    let _server = EchoServer::start(&server.netns, server.addr(PORT)).expect("echo server");
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);
    enroll(&dp, &lab, server);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        exchange(&client.netns, server.addr(PORT))
    }));
    assert!(
        result.is_ok(),
        "exchange failed; ztunnel hops: {:#?}",
        zt.hops()
    );
    let hops = zt.wait_for_hops(2, TIMEOUT).expect("two hops");
    let outbound = hops
        .iter()
        .find(|h| h.listener_port == 15001)
        .expect("15001 hop");
    let hbone = hops
        .iter()
        .find(|h| h.listener_port == 15008)
        .expect("15008 hop");
    assert_eq!(
        outbound.upstream_dst,
        Some(SocketAddr::new(IpAddr::V4(server.ip), 15008))
    );
    assert_eq!(
        hbone.hbone,
        Some((server.addr(PORT), IpAddr::V4(client.ip)))
    );
    assert_eq!(
        hbone.upstream_local.map(|a| a.ip()),
        Some(IpAddr::V4(client.ip))
    );
    assert_eq!(hbone.error, None);

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

/// Send a line on an open connection and read it back.
/// An echo server on PORT at every IP of `pod`.
fn echo_servers(pod: &meshcni_testkit::LabPod) -> Vec<EchoServer> {
    pod.ips()
        .into_iter()
        .map(|ip| EchoServer::start(&pod.netns, addr(ip, PORT)).expect("echo server"))
        .collect()
}

fn echo_again(stream: &mut TcpStream, what: &str) {
    stream.write_all(b"again\n").expect("write");
    let line = read_line(stream).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(line, "again\n", "{what}");
}

#[test]
fn connections_open_before_enrollment_keep_flowing_directly_new_ones_are_captured() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebe");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let servers = echo_servers(server);
    attach_ztunnel(&dp, &lab);
    // Open v4 and v6 connections while neither pod is enrolled.
    let mut open: Vec<TcpStream> = server
        .ips()
        .into_iter()
        .map(|ip| {
            let mut s = open_stream(&client.netns, addr(ip, PORT), TIMEOUT).expect("connect");
            read_line(&mut s).expect("greeting");
            s
        })
        .collect();
    // Enroll the client (outbound side), then the server too (inbound side).
    enroll(&dp, &lab, client);
    for s in &mut open {
        echo_again(s, "open connection after the client's enrollment");
    }
    enroll(&dp, &lab, server);
    for s in &mut open {
        echo_again(s, "open connection after the server's enrollment");
    }
    assert!(
        zt.hops().is_empty(),
        "old connections went to ztunnel: {:?}",
        zt.hops()
    );
    // A new connection is captured.
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(1, TIMEOUT).expect("hop")[0].listener_port,
        15001
    );
    assert_eq!(servers.iter().map(EchoServer::accepted).sum::<usize>(), 3);
    drop(open);

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

/// A socket in `ns` bound to `addr` with `IP_TRANSPARENT`/`IPV6_TRANSPARENT` (IPv6: v6-only),
/// listening if it is a stream socket — what ztunnel's DNS proxy and listeners use.
fn transparent_socket(ns: &Netns, addr: SocketAddr, stream: bool) -> OwnedFd {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen,
        setsockopt, socket, sockopt,
    };
    ns.run(move || {
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let ty = if stream {
            SockType::Stream
        } else {
            SockType::Datagram
        };
        let fd = socket(family, ty, SockFlag::SOCK_CLOEXEC, None).expect("socket");
        setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
        match addr {
            SocketAddr::V4(v4) => {
                setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
                bind(fd.as_raw_fd(), &SockaddrIn::from(v4)).expect("bind");
            }
            SocketAddr::V6(v6) => {
                setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("IPV6_V6ONLY");
                let one: libc::c_int = 1;
                // SAFETY: valid fd and option value.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_IPV6,
                        libc::IPV6_TRANSPARENT,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "IPV6_TRANSPARENT");
                bind(fd.as_raw_fd(), &SockaddrIn6::from(v6)).expect("bind");
            }
        }
        if stream {
            listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
        }
        fd
    })
    .expect("netns")
}

fn udp_in(ns: &Netns, local: SocketAddr) -> std::net::UdpSocket {
    let sock = ns
        .run(move || std::net::UdpSocket::bind(local))
        .expect("netns")
        .expect("bind udp");
    sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    sock
}

#[test]
fn dns_of_a_dns_captured_pod_reaches_ztunnels_dns_port_udp_and_tcp_ipv4_and_ipv6() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebd");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let ztns = &node.ztunnel.netns;
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    attach_ztunnel(&dp, &lab);
    enroll_with(&dp, &lab, client, true);

    for (src, dns) in client.ips().into_iter().zip(server.ips()) {
        let dns_addr = addr(dns, 53);
        let unspecified: IpAddr = if dns.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        // UDP: the query lands on ztunnel's 15053 socket with the client's source; the answer,
        // sent from the DNS server's address (transparent), reaches the client.
        let proxy =
            std::net::UdpSocket::from(transparent_socket(ztns, addr(unspecified, 15053), false));
        proxy.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let cli = udp_in(&client.netns, addr(unspecified, 0));
        cli.send_to(b"query", dns_addr).expect("send query");
        let mut buf = [0u8; 64];
        let (n, from) = meshcni_testkit::retry_eintr(|| proxy.recv_from(&mut buf))
            .expect("query at ztunnel's 15053");
        assert_eq!(&buf[..n], b"query");
        assert_eq!(from.ip(), src);
        let answer = std::net::UdpSocket::from(transparent_socket(ztns, dns_addr, false));
        answer.send_to(b"answer", from).expect("send answer");
        let (n, from) =
            meshcni_testkit::retry_eintr(|| cli.recv_from(&mut buf)).expect("answer at the client");
        assert_eq!((&buf[..n], from), (&b"answer"[..], dns_addr));
        // TCP: to 15053 as well.
        let listener =
            std::net::TcpListener::from(transparent_socket(ztns, addr(unspecified, 15053), true));
        let mut conn = open_stream(&client.netns, dns_addr, TIMEOUT).expect("tcp dns connect");
        let (mut accepted, peer) = listener.accept().expect("accept at 15053");
        assert_eq!(peer.ip(), src);
        assert_eq!(accepted.local_addr().expect("local"), dns_addr);
        accepted.write_all(b"tcp-answer\n").expect("write");
        assert_eq!(read_line(&mut conn).expect("read"), "tcp-answer\n");
    }

    // DNS capture off for the pod: its DNS goes to the server itself.
    enroll_with(&dp, &lab, client, false);
    let srv = udp_in(&server.netns, server.addr(53));
    let cli = udp_in(&client.netns, client.addr(0));
    cli.send_to(b"direct", server.addr(53)).expect("send");
    let mut buf = [0u8; 64];
    let (n, from) =
        meshcni_testkit::retry_eintr(|| srv.recv_from(&mut buf)).expect("query at the server");
    assert_eq!(
        (&buf[..n], from.ip()),
        (&b"direct"[..], IpAddr::V4(client.ip))
    );
    assert_no_rules(&node.netns, false);
    assert_no_rules(ztns, true);

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path(), ztns.path()]).expect("uninstall");
}

#[test]
fn without_ztunnel_captured_pods_fail_closed_and_flow_again_when_it_is_back() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebc");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let srv = EchoServer::start(&server.netns, server.addr(PORT)).expect("echo server");
    // Uncaptured: direct.
    exchange(&client.netns, server.addr(PORT));
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);
    dp.set_ztunnel(None).expect("no ztunnel");
    let refused = open_stream(&client.netns, server.addr(PORT), Duration::from_millis(500));
    assert!(
        refused.is_err(),
        "captured pod reached the server without ztunnel"
    );
    assert_eq!(srv.accepted(), 1);
    // The other direction too: the server cannot reach the captured client.
    let _cli_srv = EchoServer::start(&client.netns, client.addr(PORT)).expect("echo server");
    let refused = open_stream(&server.netns, client.addr(PORT), Duration::from_millis(500));
    assert!(
        refused.is_err(),
        "server reached the captured pod without ztunnel"
    );
    // ztunnel back (a restart publishes the new one): captured traffic flows through it.
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    attach_ztunnel(&dp, &lab);
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(1, TIMEOUT).expect("hop")[0].listener_port,
        15001
    );

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn node_addresses_reach_captured_pods_directly_kubelet_probes() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebp");
    let features = features::probe().expect("probe");
    assert!(features.tcx, "this kernel (6.6+) has tcx: {features:?}");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Auto)).expect("load datapath");
    assert_eq!(
        dp.attach_kind(),
        AttachKind::Tcx,
        "auto picks tcx where it exists"
    );
    let node = lab.node(1);
    let server = lab.pod("server");
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let _servers = echo_servers(server);
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, server);
    let host_ips: Vec<IpAddr> = [
        Some(IpAddr::V4(node.underlay_ip)),
        node.underlay_ip6.map(IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(host_ips.len(), 2);
    // Without the node's addresses in the map, the node's connection is captured (15006)...
    exchange(&node.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(1, TIMEOUT).expect("hop")[0].listener_port,
        15006
    );
    // ...with them, the node (kubelet probes) reaches the pod directly, both families.
    dp.set_host_ips(&host_ips).expect("host ips");
    for ip in server.ips() {
        let greeting = exchange(&node.netns, addr(ip, PORT));
        assert!(greeting.contains("peer:"), "{greeting}");
    }
    assert_eq!(
        zt.hops().len(),
        1,
        "node traffic went to ztunnel: {:?}",
        zt.hops()
    );
    // Replacing the set drops stale entries.
    dp.set_host_ips(&[]).expect("no host ips");
    exchange(&node.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(2, TIMEOUT).expect("hop")[1].listener_port,
        15006
    );

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn a_deleted_pod_veth_leaves_a_defunct_link_that_detach_removes() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebx");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    let node = lab.node(1);
    let client = lab.pod("client");
    enroll(&dp, &lab, client);
    let ifindex = ifindex_in(node.netns.path(), &client.host_veth).expect("ifindex");
    node.netns
        .ip(&["link", "del", &client.host_veth])
        .expect("delete the pod veth");
    assert_eq!(
        std::fs::read_dir(bpffs.pin_dir().join("links"))
            .expect("links")
            .count(),
        2,
        "pins of the deleted veth's links"
    );
    dp.detach_pod(node.netns.path(), ifindex)
        .expect("detach a gone pod");
    for ip in client.ips() {
        dp.remove_pod(ip).expect("remove pod");
        dp.remove_pod(ip).expect("removing twice is fine");
    }
    assert_eq!(
        std::fs::read_dir(bpffs.pin_dir().join("links"))
            .expect("links")
            .count(),
        0
    );
    assert!(dp.pods().expect("pods").is_empty());

    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn a_full_pod_map_is_an_error_naming_the_map_and_address() {
    let bpffs = PrivateBpffs::mount();
    let cfg = DatapathConfig {
        pod_capacity: 2,
        ..config(&bpffs, AttachMode::Tcx)
    };
    let dp = Datapath::load(&cfg).expect("load datapath");
    let entry = PodEntry {
        host_ifindex: 1,
        mac: [2, 0, 0, 0, 0, 1],
        dns_capture: false,
    };
    let ips: Vec<IpAddr> = ["10.1.0.1", "fd00::1", "10.1.0.2"]
        .iter()
        .map(|s| s.parse().expect("literal"))
        .collect();
    dp.set_pod(ips[0], entry).expect("first");
    dp.set_pod(ips[1], entry).expect("second");
    dp.set_pod(ips[1], entry)
        .expect("an update of an existing address fits");
    let err = dp.set_pod(ips[2], entry).expect_err("third must not fit");
    let text = err.to_string();
    assert!(
        text.contains("meshcni_pods") && text.contains("10.1.0.2"),
        "{text}"
    );
    drop(dp);
    uninstall(&bpffs.pin_dir(), &[]).expect("uninstall");
}

/// A foreign tcx program, attached in `ns` to `ifname` (ingress) by "someone else".
fn foreign_tcx(ns: &Netns, ifname: &str) -> OwnedFd {
    let prog = features::trivial_sched_cls_program("foreign_tcx").expect("foreign program");
    let ifindex = ifindex_in(ns.path(), ifname).expect("ifindex");
    let raw = prog.as_raw_fd();
    let link = ns
        .run(move || {
            let opts = libbpf_sys::bpf_link_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as libbpf_sys::size_t,
                ..Default::default()
            };
            // SAFETY: valid program fd and options.
            unsafe {
                libbpf_sys::bpf_link_create(raw, ifindex as i32, libbpf_sys::BPF_TCX_INGRESS, &opts)
            }
        })
        .expect("netns");
    assert!(
        link >= 0,
        "foreign tcx attach: {}",
        std::io::Error::from_raw_os_error(-link)
    );
    // SAFETY: new fd owned by the test.
    unsafe { OwnedFd::from_raw_fd(link) }
}

fn link_ifindex(link: &OwnedFd) -> u32 {
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: valid fd and out struct.
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
    assert_eq!(rc, 0, "link info");
    // SAFETY: tcx member of the union for a tcx link.
    unsafe { info.__bindgen_anon_1.tcx.ifindex }
}

fn tc_filters(ns: &Netns, ifname: &str, dir: &str) -> String {
    ns.exec_ok("tc", &["filter", "show", "dev", ifname, dir])
        .expect("tc filter show")
}

fn foreign_coexistence(attach: AttachMode, tag: &str) {
    let bpffs = PrivateBpffs::mount();
    let lab = lab(tag);
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let veth = client.host_veth.clone();
    // Someone else's tc users on the pod veth: a tcx program and a clsact qdisc with a filter.
    let foreign = foreign_tcx(&node.netns, &veth);
    node.netns
        .exec_ok("tc", &["qdisc", "add", "dev", &veth, "clsact"])
        .expect("foreign clsact");
    node.netns
        .exec_ok(
            "tc",
            &[
                "filter", "add", "dev", &veth, "ingress", "prio", "7", "u32", "match", "u32", "0",
                "0", "classid", "1:1",
            ],
        )
        .expect("foreign filter");
    let ifindex = ifindex_in(node.netns.path(), &veth).expect("ifindex");

    let dp = Datapath::load(&config(&bpffs, attach)).expect("load datapath");
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let _server = EchoServer::start(&server.netns, server.addr(PORT)).expect("echo server");
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(1, TIMEOUT).expect("hop")[0].listener_port,
        15001
    );
    assert_eq!(
        link_ifindex(&foreign),
        ifindex,
        "foreign tcx link after our attach"
    );
    assert!(tc_filters(&node.netns, &veth, "ingress").contains("u32"));

    dp.detach_pod(node.netns.path(), ifindex)
        .expect("detach pod");
    assert_eq!(
        link_ifindex(&foreign),
        ifindex,
        "foreign tcx link after our detach"
    );
    let ingress = tc_filters(&node.netns, &veth, "ingress");
    assert!(
        ingress.contains("u32"),
        "foreign filter after detach: {ingress}"
    );
    assert!(!ingress.contains("meshcni"), "our filter left: {ingress}");
    assert!(!tc_filters(&node.netns, &veth, "egress").contains("meshcni"));
    let qdiscs = node
        .netns
        .exec_ok("tc", &["qdisc", "show", "dev", &veth])
        .expect("qdiscs");
    assert!(
        qdiscs.contains("clsact"),
        "foreign clsact qdisc deleted: {qdiscs}"
    );
    // Not enrolled any more: direct again.
    for ip in client.ips() {
        dp.remove_pod(ip).expect("remove pod");
    }
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(zt.hops().len(), 1, "traffic still steered after detach");

    drop(dp);
    uninstall(
        &bpffs.pin_dir(),
        &[node.netns.path(), node.ztunnel.netns.path()],
    )
    .expect("uninstall");
    assert_eq!(
        link_ifindex(&foreign),
        ifindex,
        "foreign tcx link after uninstall"
    );
}

#[test]
fn foreign_tc_users_on_a_pod_veth_survive_our_tcx_attach_and_detach() {
    foreign_coexistence(AttachMode::Tcx, "ebf");
}

#[test]
fn foreign_tc_users_on_a_pod_veth_survive_our_clsact_attach_and_detach() {
    foreign_coexistence(AttachMode::Clsact, "ebk");
}

fn bpftool_ids(what: &str) -> String {
    run("bpftool", &[what, "show"])
}

fn assert_gone(progs: &[u32], maps: &[u32]) {
    // The kernel frees a map only after the programs that used it passed an RCU grace
    // period: wait (bounded) until the ids are gone before asserting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let list = bpftool_ids("map");
        if !maps
            .iter()
            .any(|id| list.lines().any(|l| l.starts_with(&format!("{id}: "))))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let prog_list = bpftool_ids("prog");
    for id in progs {
        assert!(
            !prog_list.lines().any(|l| l.starts_with(&format!("{id}: "))),
            "program {id} still loaded:\n{prog_list}"
        );
    }
    let map_list = bpftool_ids("map");
    for id in maps {
        assert!(
            !map_list.lines().any(|l| l.starts_with(&format!("{id}: "))),
            "map {id} still exists:\n{map_list}"
        );
    }
    let links = bpftool_ids("link");
    for id in progs {
        assert!(
            !links.contains(&format!("prog {id}\n")) && !links.contains(&format!("prog {id} ")),
            "a link still holds program {id}:\n{links}"
        );
    }
}

fn uninstall_leaves_nothing(attach: AttachMode, tag: &str) {
    let bpffs = PrivateBpffs::mount();
    let lab = lab(tag);
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let dp = Datapath::load(&config(&bpffs, attach)).expect("load datapath");
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);
    enroll(&dp, &lab, server);
    let (progs, maps) = dp.ids().expect("ids");
    assert_eq!(progs.len(), 4);
    // The agent stops (its program fds close): the pinned links keep everything attached.
    drop(dp);
    let prog_list = bpftool_ids("prog");
    for id in &progs {
        assert!(
            prog_list.lines().any(|l| l.starts_with(&format!("{id}: "))),
            "{id} gone early"
        );
    }
    let report = uninstall(
        &bpffs.pin_dir(),
        &[node.netns.path(), node.ztunnel.netns.path()],
    )
    .expect("uninstall");
    assert_eq!(report.maps, 3);
    match attach {
        AttachMode::Clsact => assert_eq!((report.links, report.filters), (0, 6)),
        _ => assert_eq!((report.links, report.filters), (6, 0)),
    }
    assert!(!bpffs.pin_dir().exists(), "pin dir left");
    assert_gone(&progs, &maps);
    for (ns, ifname) in [
        (&node.netns, client.host_veth.as_str()),
        (&node.netns, server.host_veth.as_str()),
        (&node.netns, ZTUNNEL_HOST_VETH),
        (&node.ztunnel.netns, "eth0"),
    ] {
        for dir in ["ingress", "egress"] {
            let f = ns
                .exec("tc", &["filter", "show", "dev", ifname, dir])
                .expect("tc");
            assert!(
                String::from_utf8_lossy(&f.stdout).trim().is_empty(),
                "tc filters left on {ifname} {dir}"
            );
        }
        let q = ns
            .exec_ok("tc", &["qdisc", "show", "dev", ifname])
            .expect("tc qdisc");
        assert!(
            !q.contains("clsact"),
            "our clsact qdisc left on {ifname}: {q}"
        );
    }
}

#[test]
fn uninstall_after_the_agent_stopped_leaves_no_program_map_link_or_pin_tcx() {
    uninstall_leaves_nothing(AttachMode::Tcx, "ebu");
}

#[test]
fn uninstall_after_the_agent_stopped_leaves_no_program_map_filter_or_pin_clsact() {
    uninstall_leaves_nothing(AttachMode::Clsact, "ebv");
}

#[test]
fn ztunnel_netns_routing_is_removed_on_detach() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebr");
    let node = lab.node(1);
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    attach_ztunnel(&dp, &lab);
    assert_no_rules(&node.ztunnel.netns, true);
    dp.detach_ztunnel_netns(node.ztunnel.netns.path(), "eth0")
        .expect("detach ztunnel netns");
    assert_no_rules(&node.ztunnel.netns, false);
    for family in ["-4", "-6"] {
        let t = node
            .ztunnel
            .netns
            .ip(&[family, "route", "show", "table", "100"])
            .expect("table 100");
        assert!(t.trim().is_empty(), "table 100 ({family}) left: {t}");
    }
    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn restarted_loader_reuses_pinned_maps_and_links_without_detaching() {
    let bpffs = PrivateBpffs::mount();
    let lab = lab("ebs");
    let node = lab.node(1);
    let (client, server) = (lab.pod("client"), lab.pod("server"));
    let zt = ZtunnelStandIn::start(&node.ztunnel.netns, IpAddr::V4(node.ztunnel.ip))
        .expect("ztunnel stand-in");
    let _server = EchoServer::start(&server.netns, server.addr(PORT)).expect("echo server");
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("load datapath");
    attach_ztunnel(&dp, &lab);
    enroll(&dp, &lab, client);
    drop(dp);
    // "Agent down": programs stay attached through the pinned links, maps through their pins.
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(1, TIMEOUT).expect("hop")[0].listener_port,
        15001
    );
    // "Agent up": same pins, the maps still hold the pod; re-attach switches links in place.
    let dp = Datapath::load(&config(&bpffs, AttachMode::Tcx)).expect("reload datapath");
    let pods = dp.pods().expect("pods");
    assert_eq!(pods.len(), 2, "{pods:?}");
    enroll(&dp, &lab, client);
    attach_ztunnel(&dp, &lab);
    let links = std::fs::read_dir(bpffs.pin_dir().join("links"))
        .expect("links dir")
        .count();
    assert_eq!(links, 4, "one pinned link per hook, no duplicates");
    let (progs, _) = dp.ids().expect("ids");
    let listed = dp.links().expect("links");
    assert_eq!(listed.len(), 4, "{listed:?}");
    for (hook, _, ifindex, prog) in &listed {
        assert_ne!(*ifindex, 0, "{hook:?} link is defunct");
        assert!(
            progs.contains(prog),
            "{hook:?} still runs the old program {prog}"
        );
    }
    exchange(&client.netns, server.addr(PORT));
    assert_eq!(
        zt.wait_for_hops(2, TIMEOUT).expect("hop")[1].listener_port,
        15001
    );
    let other = DatapathConfig {
        pod_capacity: 1000,
        ..config(&bpffs, AttachMode::Tcx)
    };
    match Datapath::load(&other) {
        Err(EbpfError::CapacityMismatch { found, wanted, .. }) => {
            assert_eq!((found, wanted), (meshcni_ebpf::DEFAULT_POD_CAPACITY, 1000));
        }
        other => panic!("capacity change accepted: {other:?}"),
    }
    drop(dp);
    uninstall(&bpffs.pin_dir(), &[node.netns.path()]).expect("uninstall");
}

#[test]
fn a_pin_dir_outside_bpffs_is_refused_naming_the_path() {
    let dir = tempfile::Builder::new()
        .prefix("mcni-notbpf-")
        .tempdir()
        .expect("tempdir");
    let cfg = DatapathConfig {
        pin_dir: dir.path().join("meshcni"),
        pod_capacity: 16,
        attach: AttachMode::Tcx,
    };
    match Datapath::load(&cfg) {
        Err(EbpfError::NotBpffs { path }) => assert_eq!(path, dir.path()),
        other => panic!("loaded outside bpffs: {other:?}"),
    }
    assert!(
        !dir.path().join("meshcni").exists(),
        "created a pin dir outside bpffs"
    );
}

#[test]
fn a_verifier_rejection_surfaces_the_verifier_log() {
    let bpffs = PrivateBpffs::mount();
    let broken: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/broken.bpf.o"));
    let err = Datapath::load_object(&config(&bpffs, AttachMode::Tcx), broken)
        .expect_err("the verifier must reject the broken program");
    match &err {
        EbpfError::Verifier { program, log, .. } => {
            assert_eq!(program, "meshcni_broken");
            assert!(log.contains("invalid access to packet"), "log: {log}");
        }
        other => panic!("not a verifier error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("--- verifier log ---") && text.contains("invalid access to packet"));
    uninstall(&bpffs.pin_dir(), &[]).expect("uninstall");
    assert!(!Path::new(&bpffs.pin_dir()).exists());
}
