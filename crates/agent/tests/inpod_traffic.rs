//! Ambient `inpod` redirect mode, end to end through the **real** stack: per lab node the
//! `meshcni-agent` binary (inpod mode, in the node netns), the `meshcni` plugin binary for every
//! pod's CNI ADD, and an in-pod ztunnel stand-in that is a real ZDS client (it receives each
//! pod's netns fd, acks, and listens inside the pod on 15001/15006/15008, and 15053 with DNS
//! capture, its sockets marked 0x539). Real TCP/UDP between pods of a two-node lab; each
//! scenario asserts the bytes echoed, the hops the stand-ins recorded (workload uid, listener
//! port, original destination, upstream) and the peer address the server saw.
//!
//! Needs root; fails (never skips) without it. Lab layout: `inpod_mesh/mod.rs`.

mod inpod_mesh;

use std::net::{IpAddr, SocketAddr};

use inpod_mesh::{Mesh, Opts, PORT, uid};
use meshcni_testkit::InpodHop;
use meshcni_testkit::multinode::{open_stream, read_line};
use meshcni_testkit::ztunnel::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};

fn ip_of(m: &Mesh, pod: &str, v6: bool) -> IpAddr {
    let p = m.pod(pod);
    if v6 {
        IpAddr::V6(p.ip6.expect("ipv6"))
    } else {
        IpAddr::V4(p.ip)
    }
}

fn addr_of(m: &Mesh, pod: &str, port: u16, v6: bool) -> SocketAddr {
    SocketAddr::new(ip_of(m, pod, v6), port)
}

/// `from` (captured) → `to` (not captured): one hop, on `from`'s 15001 inside `from`'s netns,
/// relayed straight to the original destination from the pod's own address.
fn assert_captured_to_uncaptured(m: &Mesh, from: &str, to: &str, v6: bool) {
    m.clear_hops();
    let peer = m.exchange(from, to, v6);
    let node = m.pod(from).node;
    let (h1, h2) = m.hops(usize::from(node == 1), usize::from(node == 2));
    let hop = h1.first().or(h2.first()).expect("hop");
    assert_eq!(hop.uid, uid(from), "{hop:?}");
    assert_eq!(hop.listener_port, OUTBOUND_PORT, "{hop:?}");
    assert_eq!(hop.peer.ip(), ip_of(m, from, v6), "{hop:?}");
    assert_eq!(hop.original_dst, addr_of(m, to, PORT, v6), "{hop:?}");
    assert_eq!(hop.upstream_dst, Some(addr_of(m, to, PORT, v6)), "{hop:?}");
    assert_eq!(hop.hbone, None, "{hop:?}");
    assert_eq!(hop.error, None, "{hop:?}");
    assert_eq!(
        hop.upstream_local,
        Some(peer),
        "the server's peer is the stand-in's upstream socket: {hop:?}"
    );
}

/// `from` (not captured) → `to` (captured): one hop, on `to`'s 15006, whose upstream carries the
/// client's own IP (the server sees the real client).
fn assert_uncaptured_to_captured(m: &Mesh, from: &str, to: &str, v6: bool) {
    m.clear_hops();
    let peer = m.exchange(from, to, v6);
    let node = m.pod(to).node;
    let (h1, h2) = m.hops(usize::from(node == 1), usize::from(node == 2));
    let hop = h1.first().or(h2.first()).expect("hop");
    assert_eq!(hop.uid, uid(to), "{hop:?}");
    assert_eq!(hop.listener_port, INBOUND_PORT, "{hop:?}");
    assert_eq!(hop.peer.ip(), ip_of(m, from, v6), "{hop:?}");
    assert_eq!(hop.original_dst, addr_of(m, to, PORT, v6), "{hop:?}");
    assert_eq!(hop.upstream_dst, Some(addr_of(m, to, PORT, v6)), "{hop:?}");
    assert_eq!(hop.error, None, "{hop:?}");
    assert_eq!(hop.upstream_local, Some(peer), "{hop:?}");
    assert_eq!(peer.ip(), ip_of(m, from, v6), "server sees the client's IP");
}

/// `from` → `to`, both captured: `from`'s 15001 sends HBONE to `to`:15008, `to`'s 15008 relays
/// to the app with `from`'s IP as source.
fn assert_captured_to_captured(m: &Mesh, from: &str, to: &str, v6: bool) {
    m.clear_hops();
    let peer = m.exchange(from, to, v6);
    let (nf, nt) = (m.pod(from).node, m.pod(to).node);
    let count = |n: u8| usize::from(nf == n) + usize::from(nt == n);
    let (h1, h2) = m.hops(count(1), count(2));
    let all: Vec<&InpodHop> = h1.iter().chain(h2.iter()).collect();
    let out = all
        .iter()
        .find(|h| h.listener_port == OUTBOUND_PORT)
        .expect("15001 hop");
    let inb = all
        .iter()
        .find(|h| h.listener_port == HBONE_PORT)
        .expect("15008 hop");
    let on = |n: u8| if n == 1 { &h1 } else { &h2 };
    assert!(
        on(nf).contains(out),
        "outbound hop on {from}'s node: {out:?}"
    );
    assert!(on(nt).contains(inb), "HBONE hop on {to}'s node: {inb:?}");
    assert_eq!(out.uid, uid(from), "{out:?}");
    assert_eq!(out.peer.ip(), ip_of(m, from, v6), "{out:?}");
    assert_eq!(out.original_dst, addr_of(m, to, PORT, v6), "{out:?}");
    assert_eq!(
        out.upstream_dst,
        Some(addr_of(m, to, HBONE_PORT, v6)),
        "{out:?}"
    );
    assert_eq!(out.error, None, "{out:?}");
    assert_eq!(
        out.upstream_local.map(|l| l.ip()),
        Some(ip_of(m, from, v6)),
        "HBONE leaves from inside the client pod, with its address: {out:?}"
    );
    assert_eq!(inb.uid, uid(to), "{inb:?}");
    assert_eq!(
        inb.original_dst,
        addr_of(m, to, HBONE_PORT, v6),
        "15008 is not redirected: {inb:?}"
    );
    assert_eq!(Some(inb.peer), out.upstream_local, "{inb:?}");
    assert_eq!(
        inb.hbone,
        Some((addr_of(m, to, PORT, v6), ip_of(m, from, v6))),
        "{inb:?}"
    );
    assert_eq!(inb.error, None, "{inb:?}");
    assert_eq!(inb.upstream_local, Some(peer), "{inb:?}");
    assert_eq!(
        peer.ip(),
        ip_of(m, from, v6),
        "server sees the client pod's IP"
    );
}

#[test]
fn captured_to_uncaptured_same_node_and_across_nodes() {
    let m = Mesh::new("it-c2u", Opts::default());
    assert_captured_to_uncaptured(&m, "a", "b", false);
    assert_captured_to_uncaptured(&m, "a", "e", false);
    assert_captured_to_uncaptured(&m, "c", "b", false);
}

#[test]
fn uncaptured_to_captured_arrives_on_15006_and_the_server_sees_the_client() {
    let m = Mesh::new("it-u2c", Opts::default());
    assert_uncaptured_to_captured(&m, "b", "a", false);
    assert_uncaptured_to_captured(&m, "e", "a", false);
    assert_uncaptured_to_captured(&m, "b", "c", false);
}

#[test]
fn captured_to_captured_same_node_and_across_nodes_goes_over_hbone() {
    let m = Mesh::new("it-c2c", Opts::default());
    assert_captured_to_captured(&m, "a", "d", false);
    assert_captured_to_captured(&m, "a", "c", false);
    assert_captured_to_captured(&m, "c", "d", false);
}

#[test]
fn dual_stack_pods_get_rules_for_both_families_and_ipv6_traffic_is_captured() {
    let m = Mesh::new(
        "it-v6",
        Opts {
            dual_stack: true,
            ..Opts::default()
        },
    );
    // The stand-in was handed each ambient pod with both addresses and listens on both
    // families inside the pod; the pod has IPv4 and IPv6 redirects.
    for pod in ["a", "d", "c"] {
        let node = m.pod(pod).node;
        let w = m.zt(node).workload(&uid(pod)).expect("held");
        let mut want = m.pod(pod).ips();
        want.sort();
        let mut got = w.ips.clone();
        got.sort();
        assert_eq!(got, want, "{pod}: {w:?}");
        for port in [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT] {
            for any in ["0.0.0.0", "[::]"] {
                let a: SocketAddr = format!("{any}:{port}").parse().expect("addr");
                assert!(w.listening.contains(&a), "{pod}: {a} in {:?}", w.listening);
            }
        }
        let rules = inpod_mesh::netns_rules(&m.pod(pod).netns);
        assert!(
            inpod_mesh::family_has_redirects(&rules, false),
            "{pod} v4:\n{rules}"
        );
        assert!(
            inpod_mesh::family_has_redirects(&rules, true),
            "{pod} v6:\n{rules}"
        );
    }
    for v6 in [true, false] {
        assert_captured_to_uncaptured(&m, "a", "b", v6);
        assert_captured_to_uncaptured(&m, "a", "e", v6);
        assert_uncaptured_to_captured(&m, "b", "a", v6);
        assert_uncaptured_to_captured(&m, "e", "a", v6);
        assert_captured_to_captured(&m, "a", "d", v6);
        assert_captured_to_captured(&m, "a", "c", v6);
        assert_captured_to_captured(&m, "c", "a", v6);
        m.assert_direct("b", "e", v6);
    }
}

#[test]
fn dns_capture_on_answers_udp_and_tcp_queries_to_any_resolver_and_off_leaves_dns_alone() {
    use meshcni_rules::inpod::ANNOTATION_DNS_CAPTURE;
    use meshcni_testkit::inpod_ztunnel::DEFAULT_DNS_ANSWER;
    use meshcni_testkit::proxy::dns_query;
    // Node 1: --ambient-dns-capture on (stand-in DNS proxy on 15053); node 2: off.
    // Per-pod overrides: d (node 1) opts out, f (node 2) opts in.
    let m = Mesh::new(
        "it-dns",
        Opts {
            dns_capture: [true, false],
            dual_stack: true,
            annotations: &[
                ("d", ANNOTATION_DNS_CAPTURE, "false"),
                ("f", ANNOTATION_DNS_CAPTURE, "true"),
            ],
            ..Opts::default()
        },
    );
    // A real resolver in pod e (node 2, not captured), answering something else.
    let real_answer = std::net::Ipv4Addr::new(10, 99, 0, 53);
    let resolver =
        inpod_mesh::Resolver::start(&m.pod("e").netns, addr_of(&m, "e", 53, false), real_answer);
    let nowhere: SocketAddr = "10.96.0.10:53".parse().expect("addr");
    let nowhere6: SocketAddr = "[fd00:96::10]:53".parse().expect("addr");
    // Captured pod a on node 1: UDP and TCP to any resolver IP (a real one, and ones that
    // do not exist, IPv4 and IPv6) are answered by the stand-in's 15053 inside the pod.
    let mut id = 0x4a00u16;
    for to in [resolver.addr, nowhere, nowhere6] {
        for tcp in [false, true] {
            id += 1;
            let name = format!("q{id}.mesh.test");
            let q = dns_query(id, &name);
            let before = m.zt(1).dns_queries().len();
            let reply = if tcp {
                inpod_mesh::dns_tcp(&m.pod("a").netns, to, &q)
            } else {
                inpod_mesh::dns_udp(&m.pod("a").netns, to, &q)
            }
            .unwrap_or_else(|e| panic!("a: {e}"));
            assert_eq!(
                inpod_mesh::answer_of(&reply, id),
                Some(DEFAULT_DNS_ANSWER),
                "a → {to} (tcp {tcp}) answered by the stand-in"
            );
            let qs = m
                .zt(1)
                .wait_for_dns_queries(before + 1, inpod_mesh::T)
                .expect("recorded");
            let rec = qs.last().expect("query");
            assert_eq!(rec.uid, uid("a"), "{rec:?}");
            assert_eq!(rec.proto, if tcp { "tcp" } else { "udp" }, "{rec:?}");
            assert_eq!(rec.qname, name, "{rec:?}");
            assert_eq!(rec.peer.ip(), ip_of(&m, "a", to.is_ipv6()), "{rec:?}");
            assert_eq!(rec.error, None, "{rec:?}");
            if tcp {
                assert_eq!(rec.original_dst, Some(to), "{rec:?}");
            }
        }
    }
    assert!(
        resolver.queries().is_empty(),
        "captured DNS never reached the real resolver"
    );
    let w = m.zt(1).workload(&uid("a")).expect("held");
    assert!(w.dns_capture, "{w:?}");
    let rules = inpod_mesh::netns_rules(&m.pod("a").netns);
    assert!(
        rules.contains("--to-ports 15053") || rules.contains("--to-port 15053"),
        "{rules}"
    );
    // Uncaptured pod b on node 1 (DNS capture on): its DNS is its own.
    let q = dns_query(0x6201, "plain.b.test");
    let reply = inpod_mesh::dns_udp(&m.pod("b").netns, resolver.addr, &q).expect("b udp");
    assert_eq!(inpod_mesh::answer_of(&reply, 0x6201), Some(real_answer));
    // Captured pod d on node 1 with `ambient.istio.io/dns-capture: "false"`: no DNS redirect.
    let w = m.zt(1).workload(&uid("d")).expect("held");
    assert!(!w.dns_capture, "{w:?}");
    let rules = inpod_mesh::netns_rules(&m.pod("d").netns);
    assert!(inpod_mesh::family_has_redirects(&rules, false), "{rules}");
    assert!(
        !rules.contains("15053"),
        "d opted out of DNS capture:\n{rules}"
    );
    let q = dns_query(0x6202, "optout.d.test");
    let reply = inpod_mesh::dns_udp(&m.pod("d").netns, resolver.addr, &q).expect("d udp");
    assert_eq!(inpod_mesh::answer_of(&reply, 0x6202), Some(real_answer));
    let zt1_queries = m.zt(1).dns_queries();
    assert!(
        zt1_queries.iter().all(|q| q.uid == uid("a")),
        "{zt1_queries:?}"
    );

    // Captured pod c on node 2, DNS capture off: UDP and TCP go to the real resolver, the
    // stand-in records nothing and has no 15053 in c, and c's rules have no DNS redirect.
    let zt2 = m.zt(2);
    let w = zt2.workload(&uid("c")).expect("held");
    assert!(!w.dns_capture, "{w:?}");
    assert!(
        !w.listening.iter().any(|a| a.port() == 15053),
        "{:?}",
        w.listening
    );
    let rules = inpod_mesh::netns_rules(&m.pod("c").netns);
    assert!(inpod_mesh::family_has_redirects(&rules, false), "{rules}");
    assert!(
        !rules.contains("15053"),
        "no DNS redirect with capture off:\n{rules}"
    );
    let q = dns_query(0x6301, "off.c.test");
    let reply = inpod_mesh::dns_udp(&m.pod("c").netns, resolver.addr, &q).expect("c udp");
    assert_eq!(inpod_mesh::answer_of(&reply, 0x6301), Some(real_answer));
    let q = dns_query(0x6302, "off-tcp.c.test");
    let before = zt2.hops().len();
    let reply = inpod_mesh::dns_tcp(&m.pod("c").netns, resolver.addr, &q).expect("c tcp");
    assert_eq!(inpod_mesh::answer_of(&reply, 0x6302), Some(real_answer));
    // TCP/53 is ordinary outbound TCP for a captured pod without DNS capture: 15001, relayed
    // to the resolver unchanged.
    let hops = zt2.hops();
    assert_eq!(hops.len(), before + 1, "{hops:?}");
    assert_eq!(hops[before].listener_port, OUTBOUND_PORT, "{hops:?}");
    assert_eq!(hops[before].original_dst, resolver.addr, "{hops:?}");
    assert!(zt2.dns_queries().is_empty(), "{:?}", zt2.dns_queries());
    // Captured pod f on node 2 with `ambient.istio.io/dns-capture: "true"`: captured.
    let w = zt2.workload(&uid("f")).expect("held");
    assert!(w.dns_capture, "{w:?}");
    let rules = inpod_mesh::netns_rules(&m.pod("f").netns);
    assert!(
        rules.contains("15053"),
        "f opted in to DNS capture:\n{rules}"
    );
    for (tcp, id) in [(false, 0x6401u16), (true, 0x6402)] {
        let name = format!("optin{id}.f.test");
        let q = dns_query(id, &name);
        let reply = if tcp {
            inpod_mesh::dns_tcp(&m.pod("f").netns, nowhere, &q)
        } else {
            inpod_mesh::dns_udp(&m.pod("f").netns, nowhere, &q)
        }
        .unwrap_or_else(|e| panic!("f: {e}"));
        assert_eq!(inpod_mesh::answer_of(&reply, id), Some(DEFAULT_DNS_ANSWER));
        let qs = zt2
            .wait_for_dns_queries(if tcp { 2 } else { 1 }, inpod_mesh::T)
            .expect("recorded");
        let rec = qs.last().expect("query");
        assert_eq!((rec.uid.clone(), rec.qname.clone()), (uid("f"), name));
    }
    let seen = resolver.queries();
    let names: Vec<(&str, String)> = seen.iter().map(|(p, _, n)| (*p, n.clone())).collect();
    assert_eq!(
        names,
        vec![
            ("udp", "plain.b.test".to_string()),
            ("udp", "optout.d.test".to_string()),
            ("udp", "off.c.test".to_string()),
            ("tcp", "off-tcp.c.test".to_string())
        ]
    );
    assert_eq!(
        seen[2].1.ip(),
        ip_of(&m, "c", false),
        "the resolver saw c itself"
    );
}

#[test]
fn probes_from_the_node_reach_the_app_from_the_snat_address_while_pod_traffic_is_captured() {
    let m = Mesh::new(
        "it-probe",
        Opts {
            dual_stack: true,
            ..Opts::default()
        },
    );
    for (v6, snat) in [
        (false, inpod_mesh::PROBE_SNAT_V4),
        (true, inpod_mesh::PROBE_SNAT_V6),
    ] {
        let snat: IpAddr = snat.parse().expect("snat");
        for pod in ["a", "d"] {
            m.clear_hops();
            // A socket in the node netns (the kubelet's): straight to the app, SNATed.
            let peer = m.exchange_ns(&m.lab.node(1).netns, snat, addr_of(&m, pod, PORT, v6));
            assert_eq!(peer.ip(), snat);
            assert!(
                m.zt(1).hops().is_empty(),
                "probe bypasses ztunnel: {:?}",
                m.zt(1).hops()
            );
            // Another pod to the same port is still captured (15006).
            assert_uncaptured_to_captured(&m, "b", pod, v6);
        }
    }
}

#[test]
fn non_ambient_pods_are_untouched() {
    let m = Mesh::new(
        "it-none",
        Opts {
            dual_stack: true,
            ..Opts::default()
        },
    );
    // Not handed to ztunnel, no rules of any kind in their netns.
    for (pod, node) in [("b", 1u8), ("o", 1), ("r", 1), ("e", 2)] {
        assert!(m.zt(node).workload(&uid(pod)).is_none(), "{pod}");
        let rules = inpod_mesh::netns_rules(&m.pod(pod).netns);
        assert!(!inpod_mesh::has_inpod_rules(&rules), "{pod}:\n{rules}");
    }
    // Direct both ways, same node and across nodes, both families; the opt-out pod o too.
    for v6 in [false, true] {
        for (from, to) in [
            ("b", "e"),
            ("e", "b"),
            ("o", "b"),
            ("b", "o"),
            ("o", "e"),
            ("e", "o"),
            ("r", "b"),
        ] {
            m.assert_direct(from, to, v6);
        }
    }
    assert!(m.zt(1).hops().is_empty(), "{:?}", m.zt(1).hops());
    assert!(m.zt(2).hops().is_empty(), "{:?}", m.zt(2).hops());
}

#[test]
fn namespace_label_flip_enrolls_and_releases_a_running_pod_without_restart() {
    let m = Mesh::new(
        "it-flip",
        Opts {
            dual_stack: true,
            ..Opts::default()
        },
    );
    let pid1 = m.node(1).agent.pid();
    let r_ns = m.pod("r").netns.path().to_path_buf();
    let node1 = &m.lab.node(1).netns;
    let underlay = IpAddr::V4(m.lab.node(1).underlay_ip);
    assert!(!inpod_mesh::has_inpod_rules(&inpod_mesh::netns_rules(
        &m.pod("r").netns
    )));
    m.assert_direct("r", "b", false);
    // Before: a node-netns connection to r is not SNATed (r is not in the probe sets).
    assert_eq!(
        m.exchange_ns(node1, underlay, addr_of(&m, "r", PORT, false))
            .ip(),
        underlay
    );
    // A connection r opened before it is enrolled (to e, across nodes; see below).
    let mut live = open_stream(
        &m.pod("r").netns,
        addr_of(&m, "e", PORT, false),
        inpod_mesh::T,
    )
    .expect("open r → e");
    let banner = read_line(&mut live).expect("banner");
    assert!(
        banner.contains(&format!("peer:{}:", m.pod("r").ip)),
        "{banner}"
    );
    inpod_mesh::ping(&mut live, "before enroll").expect("direct connection works");
    // r's namespace is labelled: no CNI event, the agent finds r's netns itself (its private
    // --netns-dir holds links to every pod netns of the node; the IP picks r's).
    m.set_ns_label(
        "late",
        meshcni_testkit::stack::DATAPLANE_MODE,
        Some("ambient"),
    );
    let w = m
        .zt(1)
        .wait_for_workload(&uid("r"), inpod_mesh::WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", m.node(1).agent.log()));
    let want = {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&r_ns).expect("stat");
        (md.dev(), md.ino())
    };
    assert_eq!(w.netns, want, "the stand-in got r's own netns");
    assert_eq!(w.info.as_ref().map(|i| i.namespace.as_str()), Some("late"));
    m.sync_captured();
    let rules = inpod_mesh::netns_rules(&m.pod("r").netns);
    assert!(inpod_mesh::family_has_redirects(&rules, false), "{rules}");
    assert!(inpod_mesh::family_has_redirects(&rules, true), "{rules}");
    for v6 in [false, true] {
        assert_captured_to_uncaptured(&m, "r", "b", v6);
        assert_uncaptured_to_captured(&m, "e", "r", v6);
        assert_captured_to_captured(&m, "r", "a", v6);
        assert_captured_to_captured(&m, "c", "r", v6);
    }
    // r's addresses joined the node's probe sets: probes reach r's app from the SNAT address.
    let sets = node1.exec_ok("ipset", &["list"]).expect("ipset list");
    for ip in m.pod("r").ips() {
        assert!(
            sets.contains(&ip.to_string()),
            "{ip} in the probe sets:\n{sets}"
        );
    }
    m.clear_hops();
    for (v6, snat) in [
        (false, inpod_mesh::PROBE_SNAT_V4),
        (true, inpod_mesh::PROBE_SNAT_V6),
    ] {
        let snat: IpAddr = snat.parse().expect("snat");
        assert_eq!(
            m.exchange_ns(node1, snat, addr_of(&m, "r", PORT, v6)).ip(),
            snat
        );
    }
    assert!(m.zt(1).hops().is_empty(), "{:?}", m.zt(1).hops());
    // The connection opened before enrollment is reset by its next packet, as upstream does
    // (istio/istio#48876, "enrolling apps for the first time in ambient will reset existing
    // connections"): the pod netns did not track it before the in-pod nat rules existed, so
    // conntrack picks it up mid-stream as new and REDIRECTs it to 15001, where no socket
    // knows it. The rule text is Istio's byte for byte; new connections are captured (above).
    let r = inpod_mesh::ping(&mut live, "after enroll");
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("reset") || e.contains("EOF")),
        "pre-enrollment connection: {r:?}"
    );
    assert!(m.zt(1).hops().is_empty(), "{:?}", m.zt(1).hops());
    // Unlabelled: released in place — ztunnel drops it, the rules leave the pod.
    m.set_ns_label("late", meshcni_testkit::stack::DATAPLANE_MODE, None);
    m.zt(1)
        .wait_for_no_workload(&uid("r"), inpod_mesh::WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", m.node(1).agent.log()));
    m.wait_for("r's in-pod rules removed", || {
        !inpod_mesh::has_inpod_rules(&inpod_mesh::netns_rules(&m.pod("r").netns))
    });
    m.sync_captured();
    m.wait_for("r's addresses leave the probe sets", || {
        let sets = node1.exec_ok("ipset", &["list"]).expect("ipset list");
        m.pod("r")
            .ips()
            .iter()
            .all(|ip| !sets.contains(&ip.to_string()))
    });
    assert_eq!(
        m.exchange_ns(node1, underlay, addr_of(&m, "r", PORT, false))
            .ip(),
        underlay
    );
    for v6 in [false, true] {
        m.assert_direct("r", "b", v6);
        m.assert_direct("b", "r", v6);
        m.assert_direct("r", "e", v6);
        m.assert_direct("e", "r", v6);
    }
    // The other pods stayed in the mesh, and it all happened in the same agent process.
    assert_captured_to_captured(&m, "a", "c", false);
    assert_eq!(m.node(1).agent.pid(), pid1, "no restart");
}

#[test]
fn an_ipv6_only_pod_is_captured_in_every_direction() {
    let m = Mesh::new(
        "it-v6only",
        Opts {
            dual_stack: true,
            ipv6_only_s: true,
            ..Opts::default()
        },
    );
    let s6 = IpAddr::V6(m.pod("s").ip6.expect("ipv6"));
    let w = m.zt(1).workload(&uid("s")).expect("s held by ztunnel-1");
    assert_eq!(w.ips, vec![s6], "{w:?}");
    let rules = inpod_mesh::netns_rules(&m.pod("s").netns);
    assert!(inpod_mesh::family_has_redirects(&rules, true), "{rules}");
    let sets = m
        .lab
        .node(1)
        .netns
        .exec_ok("ipset", &["list"])
        .expect("ipset list");
    assert!(sets.contains(&s6.to_string()), "{sets}");
    assert_captured_to_uncaptured(&m, "s", "b", true);
    assert_captured_to_uncaptured(&m, "s", "e", true);
    assert_uncaptured_to_captured(&m, "b", "s", true);
    assert_uncaptured_to_captured(&m, "e", "s", true);
    assert_captured_to_captured(&m, "s", "a", true);
    assert_captured_to_captured(&m, "a", "s", true);
    assert_captured_to_captured(&m, "s", "c", true);
    assert_captured_to_captured(&m, "c", "s", true);
    // Node probe over IPv6: SNATed, straight to the app.
    m.clear_hops();
    let snat: IpAddr = inpod_mesh::PROBE_SNAT_V6.parse().expect("snat");
    let peer = m.exchange_ns(&m.lab.node(1).netns, snat, addr_of(&m, "s", PORT, true));
    assert_eq!(peer.ip(), snat);
    assert!(m.zt(1).hops().is_empty(), "{:?}", m.zt(1).hops());
}

/// Wait until `pod` (on node 1) is held by ztunnel-1 with its own netns and its rules are in
/// place (`true`), or is gone from ztunnel-1 and every trace of the rules left its netns.
fn wait_enrolled(m: &Mesh, pod: &str, enrolled: bool) {
    let zt = m.zt(1);
    if enrolled {
        let w = zt
            .wait_for_workload(&uid(pod), inpod_mesh::WAIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", m.node(1).agent.log()));
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(m.pod(pod).netns.path()).expect("stat");
        assert_eq!(w.netns, (md.dev(), md.ino()), "{pod}: its own netns");
        let rules = inpod_mesh::netns_rules(&m.pod(pod).netns);
        assert!(inpod_mesh::family_has_redirects(&rules, false), "{rules}");
    } else {
        zt.wait_for_no_workload(&uid(pod), inpod_mesh::WAIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", m.node(1).agent.log()));
        m.wait_for(&format!("{pod}'s in-pod rules removed"), || {
            !inpod_mesh::has_inpod_rules(&inpod_mesh::netns_rules(&m.pod(pod).netns))
        });
    }
    m.sync_captured();
}

#[test]
fn pod_label_opt_in_and_opt_out_of_running_pods_without_restart() {
    use meshcni_testkit::stack::DATAPLANE_MODE;
    let m = Mesh::new("it-podlbl", Opts::default());
    let pid1 = m.node(1).agent.pid();
    // A running pod of a plain namespace opts in by its own label.
    m.set_pod_label("b", DATAPLANE_MODE, Some("ambient"));
    wait_enrolled(&m, "b", true);
    assert_captured_to_uncaptured(&m, "b", "e", false);
    assert_uncaptured_to_captured(&m, "e", "b", false);
    assert_captured_to_captured(&m, "b", "c", false);
    // An enrolled pod (it came in through its CNI ADD) opts out: released in place...
    m.set_pod_label("a", DATAPLANE_MODE, Some("none"));
    wait_enrolled(&m, "a", false);
    m.assert_direct("a", "e", false);
    m.assert_direct("e", "a", false);
    assert_captured_to_uncaptured(&m, "b", "a", false);
    // ...and back in when the opt-out label goes: no CNI event this time, its netns is found
    // again in the agent's netns dir.
    m.set_pod_label("a", DATAPLANE_MODE, None);
    wait_enrolled(&m, "a", true);
    assert_captured_to_captured(&m, "a", "c", false);
    assert_captured_to_captured(&m, "b", "a", false);
    assert_uncaptured_to_captured(&m, "e", "a", false);
    // b leaves again.
    m.set_pod_label("b", DATAPLANE_MODE, None);
    wait_enrolled(&m, "b", false);
    m.assert_direct("b", "e", false);
    assert_eq!(m.node(1).agent.pid(), pid1, "no restart");
}

/// Regression: releasing a pod told ztunnel first and removed the pod's rules only after
/// ztunnel's ack, so between ztunnel dropping the pod (its listeners in the pod closed) and the
/// rules going, every new connection of the pod was REDIRECTed to a port nobody listened on
/// and refused. Upstream (`RemovePodFromMesh`) removes the in-pod rules first, then tells
/// ztunnel. A slow ack (1.5 s) makes the window observable: the moment ztunnel has dropped the
/// pod, its rules must already be gone and new connections go direct.
#[test]
fn release_removes_the_rules_before_ztunnel_drops_the_pod_so_new_connections_never_fail() {
    use meshcni_testkit::stack::DATAPLANE_MODE;
    let m = Mesh::new("it-relord", Opts::default());
    m.set_ns_label("late", DATAPLANE_MODE, Some("ambient"));
    wait_enrolled(&m, "r", true);
    assert_captured_to_uncaptured(&m, "r", "b", false);
    m.zt(1)
        .set_ack_delay(std::time::Duration::from_millis(1500));
    m.set_ns_label("late", DATAPLANE_MODE, None);
    m.zt(1)
        .wait_for_no_workload(&uid("r"), inpod_mesh::WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    // ztunnel has dropped r (its ack is still on the way): r's traffic must not be redirected
    // to listeners that are gone.
    let rules = inpod_mesh::netns_rules(&m.pod("r").netns);
    assert!(
        !inpod_mesh::has_inpod_rules(&rules),
        "r's rules outlived ztunnel's hold on r:\n{rules}"
    );
    m.assert_direct("r", "b", false);
    m.assert_direct("e", "r", false);
    m.zt(1).set_ack_delay(std::time::Duration::ZERO);
}
