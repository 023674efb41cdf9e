//! Proves each testkit piece works against the real kernel. Needs root; fails without it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use meshcni_testkit::lab::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use meshcni_testkit::proxy::{DNS_ANSWER_V4, dns_query, parse_question};
use meshcni_testkit::{
    ConnectOpts, Lab, Netns, ProxyConfig, TcpServer, TransparentProxy, connect_text, udp_exchange,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read host sysctl")
}

#[test]
fn netns_is_created_with_lo_up_and_deleted_on_drop() {
    let ns = Netns::new("smoke").expect("create netns");
    assert!(
        ns.name()
            .starts_with(&format!("mcni-{}-", std::process::id()))
    );
    assert!(ns.path().exists());
    assert!(ns.ip(&["link", "show", "lo"]).expect("ip").contains("UP"));
    let out = ns.exec_ok("ip", &["-o", "link"]).expect("exec");
    assert_eq!(out.lines().count(), 1, "fresh netns has only lo: {out}");
    let inode = ns
        .run(meshcni_netx::netns::current_netns_inode)
        .expect("run")
        .expect("inode");
    assert_eq!(
        inode,
        meshcni_netx::netns::netns_inode(ns.path()).expect("inode")
    );
    let err = ns
        .exec_ok("ip", &["link", "show", "nope0"])
        .expect_err("must fail");
    assert!(err.to_string().contains(ns.name()), "{err}");
    let path = ns.path().to_path_buf();
    drop(ns);
    assert!(!path.exists(), "netns must be deleted on drop");
}

#[test]
fn lab_routes_v4_and_v6_between_pods_and_server_reports_peer() {
    let before = host_ip_forward();
    let lab = Lab::new("lab").expect("lab");
    assert_eq!(
        lab.node.read_sysctl("net.ipv4.ip_forward").expect("sysctl"),
        "1"
    );
    assert_eq!(
        lab.client
            .read_sysctl("net.ipv4.ip_forward")
            .expect("sysctl"),
        before.trim()
    );
    assert_eq!(host_ip_forward(), before, "host sysctl untouched");
    let _v4 = TcpServer::start(&lab.server, sa(SERVER_V4, 8080)).expect("server v4");
    let v6 = TcpServer::start(&lab.server, sa(SERVER_V6, 8080)).expect("server v6");
    let got = connect_text(&lab.client, sa(SERVER_V4, 8080), &ConnectOpts::default())
        .expect("connect v4");
    assert!(
        got.starts_with(&format!("server:{SERVER_V4}:8080 peer:{CLIENT_V4}:")),
        "{got}"
    );
    assert!(got.ends_with("hello\n"), "echo: {got}");
    let got = connect_text(&lab.client, sa(SERVER_V6, 8080), &ConnectOpts::default())
        .expect("connect v6");
    assert!(
        got.starts_with(&format!("server:[{SERVER_V6}]:8080 peer:[{CLIENT_V6}]:")),
        "{got}"
    );
    assert_eq!(v6.accepted().len(), 1);
}

#[test]
fn redirect_is_seen_as_so_original_dst_v4_and_v6() {
    let lab = Lab::new("redir").expect("lab");
    let proxy = TransparentProxy::start(&lab.client).expect("proxy");
    for (bin, _) in [("iptables-nft", 4), ("ip6tables-nft", 6)] {
        lab.client
            .exec_ok(
                bin,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    "8080",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15001",
                ],
            )
            .expect("add REDIRECT");
    }
    let got = connect_text(&lab.client, sa(SERVER_V4, 8080), &ConnectOpts::default()).expect("v4");
    assert_eq!(
        got,
        format!("proxied-by:15001 orig:{SERVER_V4}:8080\nhello\n")
    );
    let got = connect_text(&lab.client, sa(SERVER_V6, 8080), &ConnectOpts::default()).expect("v6");
    assert_eq!(
        got,
        format!("proxied-by:15001 orig:[{SERVER_V6}]:8080\nhello\n")
    );
    let conns = proxy
        .wait_for_connections(2, Duration::from_secs(2))
        .expect("recorded");
    assert_eq!(conns[0].listener_port, 15001);
    assert_eq!(conns[0].original_dst, sa(SERVER_V4, 8080));
    assert_eq!(conns[0].nat_original_dst, Some(sa(SERVER_V4, 8080)));
    assert_eq!(conns[0].peer.ip(), IpAddr::V4(CLIENT_V4));
    assert_eq!(conns[1].original_dst, sa(SERVER_V6, 8080));
    assert_eq!(conns[1].peer.ip(), IpAddr::V6(CLIENT_V6));
}

#[test]
fn tproxy_delivers_with_the_original_destination_as_local_address() {
    let lab = Lab::new("tproxy").expect("lab");
    let server = &lab.server;
    let proxy = TransparentProxy::start_with(
        server,
        &ProxyConfig {
            tcp_ports: vec![15006],
            dns_port: None,
        },
    )
    .expect("proxy");
    for (bin, fam) in [("iptables-nft", "-4"), ("ip6tables-nft", "-6")] {
        server
            .exec_ok(
                bin,
                &[
                    "-t",
                    "mangle",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "--dport",
                    "9090",
                    "-j",
                    "TPROXY",
                    "--on-port",
                    "15006",
                    "--tproxy-mark",
                    "0x539/0xffffffff",
                ],
            )
            .expect("add TPROXY");
        server
            .ip(&[fam, "rule", "add", "fwmark", "0x539", "lookup", "133"])
            .expect("rule");
        server
            .ip(&[
                fam, "route", "add", "local", "default", "dev", "lo", "table", "133",
            ])
            .expect("route");
    }
    // Nothing listens on 9090: only TPROXY can make this connection succeed.
    let got = connect_text(&lab.client, sa(SERVER_V4, 9090), &ConnectOpts::default()).expect("v4");
    assert_eq!(
        got,
        format!("proxied-by:15006 orig:{SERVER_V4}:9090\nhello\n")
    );
    let got = connect_text(&lab.client, sa(SERVER_V6, 9090), &ConnectOpts::default()).expect("v6");
    assert_eq!(
        got,
        format!("proxied-by:15006 orig:[{SERVER_V6}]:9090\nhello\n")
    );
    let conns = proxy
        .wait_for_connections(2, Duration::from_secs(2))
        .expect("recorded");
    assert_eq!(
        conns[0].local,
        sa(SERVER_V4, 9090),
        "TPROXY: local address is the original dst"
    );
    assert_eq!(
        conns[0].peer.ip(),
        IpAddr::V4(CLIENT_V4),
        "source preserved"
    );
    assert_eq!(conns[1].local, sa(SERVER_V6, 9090));
    assert_eq!(conns[1].peer.ip(), IpAddr::V6(CLIENT_V6));
}

#[test]
fn uid_and_gid_switched_clients_are_told_apart_by_owner_match() {
    let lab = Lab::new("uid").expect("lab");
    let _server = TcpServer::start(&lab.server, sa(SERVER_V4, 8080)).expect("server");
    let _proxy = TransparentProxy::start(&lab.client).expect("proxy");
    for rule in [
        vec![
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            "1337",
            "-j",
            "RETURN",
        ],
        vec![
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-m",
            "owner",
            "--gid-owner",
            "1338",
            "-j",
            "RETURN",
        ],
        vec![
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ],
    ] {
        lab.client.exec_ok("iptables-nft", &rule).expect("rule");
    }
    let to = sa(SERVER_V4, 8080);
    let as_root = connect_text(&lab.client, to, &ConnectOpts::default()).expect("root");
    assert!(as_root.starts_with("proxied-by:15001"), "{as_root}");
    let as_proxy = connect_text(
        &lab.client,
        to,
        &ConnectOpts {
            uid: Some(1337),
            ..ConnectOpts::default()
        },
    )
    .expect("uid 1337");
    assert!(
        as_proxy.starts_with("server:"),
        "uid 1337 bypasses capture: {as_proxy}"
    );
    let as_app = connect_text(
        &lab.client,
        to,
        &ConnectOpts {
            uid: Some(1000),
            gid: Some(1000),
            ..ConnectOpts::default()
        },
    )
    .expect("uid 1000");
    assert!(as_app.starts_with("proxied-by:15001"), "{as_app}");
    let by_gid = connect_text(
        &lab.client,
        to,
        &ConnectOpts {
            uid: Some(1000),
            gid: Some(1338),
            ..ConnectOpts::default()
        },
    )
    .expect("gid 1338");
    assert!(
        by_gid.starts_with("server:"),
        "gid 1338 bypasses capture: {by_gid}"
    );
    // The test process itself kept its credentials (switches were per thread).
    assert_eq!(nix::unistd::getuid().as_raw(), 0);
    assert_eq!(nix::unistd::getgid().as_raw(), 0);
}

#[test]
fn dns_stand_in_answers_redirected_udp_and_tcp_queries() {
    let lab = Lab::new("dns").expect("lab");
    let proxy = TransparentProxy::start(&lab.client).expect("proxy");
    lab.client
        .exec_ok(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-port",
                "15053",
            ],
        )
        .expect("udp rule");
    lab.client
        .exec_ok(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--dport",
                "53",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15053",
            ],
        )
        .expect("tcp rule");
    let query = dns_query(7, "svc.mesh.local");
    let reply = udp_exchange(
        &lab.client,
        sa(SERVER_V4, 53),
        &ConnectOpts {
            payload: query.clone(),
            ..ConnectOpts::default()
        },
    )
    .expect("udp dns");
    assert_eq!(&reply[..2], &[0, 7]);
    assert_eq!(
        parse_question(&reply).expect("question").0,
        "svc.mesh.local"
    );
    assert_eq!(&reply[reply.len() - 4..], &DNS_ANSWER_V4.octets());
    let mut framed = u16::try_from(query.len())
        .expect("len")
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&query);
    let tcp = meshcni_testkit::connect(
        &lab.client,
        sa(SERVER_V4, 53),
        &ConnectOpts {
            payload: framed,
            ..ConnectOpts::default()
        },
    )
    .expect("tcp dns");
    assert_eq!(&tcp[2..4], &[0, 7]);
    let queries = proxy.dns_queries();
    assert_eq!(queries.len(), 2, "{queries:?}");
    assert_eq!(queries[0].proto, "udp");
    assert_eq!(queries[0].qname, "svc.mesh.local");
    assert_eq!(queries[0].peer.ip(), IpAddr::V4(CLIENT_V4));
    assert_eq!(queries[1].proto, "tcp");
    assert_eq!(queries[1].original_dst, Some(sa(SERVER_V4, 53)));
}

/// The netns snapshot is stable on an idle namespace and sees a changed sysctl, rule and route.
#[test]
fn netns_snapshot_is_stable_and_sees_changes() {
    use meshcni_testkit::NetnsSnapshot;
    let ns = meshcni_testkit::Netns::new("snap").expect("netns");
    let peer = meshcni_testkit::Netns::new("snapp").expect("netns");
    meshcni_testkit::veth(&ns, "d0", &peer, "eth0").expect("veth");
    let a = NetnsSnapshot::capture(ns.path()).expect("snapshot");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let b = NetnsSnapshot::capture(ns.path()).expect("snapshot");
    assert!(
        a.diff(&b).is_empty(),
        "idle netns changed:\n{}",
        a.diff(&b).join("\n")
    );
    assert_eq!(a.residue_bytes(&b), 0);
    ns.sysctl("net.ipv4.conf.d0.rp_filter", "2")
        .expect("sysctl");
    ns.ip(&["rule", "add", "priority", "77", "lookup", "77"])
        .expect("rule");
    ns.exec_ok("nft", &["add", "table", "ip", "mangle"])
        .expect("nft");
    let c = NetnsSnapshot::capture(ns.path()).expect("snapshot");
    let d = a.diff(&c).join("\n");
    assert!(d.contains("/proc/sys/net/ipv4/conf/d0/rp_filter=2"), "{d}");
    assert!(d.contains("77:"), "{d}");
    assert!(d.contains("table ip mangle"), "{d}");
    assert!(a.residue_bytes(&c) > 0);
}
