//! Ambient node-level redirect modes (`iptables` and `ebpf`, the same scenarios run in each),
//! end to end: real TCP between pods of a two-node lab,
//! redirected by the mode's driver (run against each node netns) into a ztunnel stand-in
//! per node that behaves like node-level ztunnel (transparent listeners 15001/15006/15008,
//! upstream connects with the client's source address, HBONE emulated by a CONNECT line).
//! Each scenario asserts the bytes echoed, what the stand-ins recorded (listener, original
//! destination, upstream source) and the peer address the server saw.
//!
//! Needs root; fails (never skips) without it. See `ambient_mesh/mod.rs` for the lab layout.

mod ambient_mesh;

use std::net::{IpAddr, SocketAddr};

use ambient_mesh::{Mesh, Mode, PORT, T};
use meshcni_testkit::multinode::{open_stream, ping, read_line};
use meshcni_testkit::ztunnel::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};

/// The lab tag of a scenario in `mode` (netns names stay distinct per mode).
fn tag(mode: Mode, scenario: &str) -> String {
    match mode {
        Mode::Iptables => format!("at-{scenario}"),
        Mode::Ebpf => format!("eb-{scenario}"),
    }
}

fn ip(m: &Mesh, pod: &str) -> IpAddr {
    IpAddr::V4(m.pod(pod).ip)
}

fn addr(m: &Mesh, pod: &str, port: u16) -> SocketAddr {
    m.pod(pod).addr(port)
}

fn captured_to_uncaptured_same_node_and_across_nodes(mode: Mode) {
    let m = Mesh::new_in(&tag(mode, "c2u"), mode);
    // Same node: a (captured) → b (plain).
    m.clear_hops();
    let peer = m.exchange("a", "b");
    let (h1, h2) = m.hops(1);
    assert_eq!(h1.len(), 1, "exactly one hop on node 1: {h1:?}");
    assert!(h2.is_empty(), "{h2:?}");
    let hop = &h1[0];
    assert_eq!(hop.listener_port, OUTBOUND_PORT, "{hop:?}");
    assert_eq!(hop.peer.ip(), ip(&m, "a"), "{hop:?}");
    assert_eq!(hop.original_dst, addr(&m, "b", PORT), "{hop:?}");
    assert_eq!(hop.upstream_dst, Some(addr(&m, "b", PORT)), "{hop:?}");
    assert_eq!(
        hop.upstream_local,
        Some(peer),
        "server saw the stand-in's spoofed socket"
    );

    // Across nodes: a → e (plain, node 2).
    m.clear_hops();
    let peer = m.exchange("a", "e");
    let (h1, h2) = m.hops(1);
    assert_eq!(h1.len(), 1, "{h1:?}");
    assert!(h2.is_empty(), "e is not captured: no inbound hop: {h2:?}");
    assert_eq!(h1[0].listener_port, OUTBOUND_PORT);
    assert_eq!(h1[0].original_dst, addr(&m, "e", PORT));
    assert_eq!(h1[0].upstream_local, Some(peer));
}

fn uncaptured_to_captured_same_node_and_across_nodes(mode: Mode) {
    let m = Mesh::new_in(&tag(mode, "u2c"), mode);
    for (from, node_of_from) in [("b", 1u8), ("e", 2u8)] {
        m.clear_hops();
        let peer = m.exchange(from, "a");
        let (h1, h2) = m.hops(1);
        assert_eq!(
            h1.len(),
            1,
            "{from} → a: one inbound hop on a's node: {h1:?}"
        );
        assert!(h2.is_empty(), "{from} → a: nothing on node 2: {h2:?}");
        let hop = &h1[0];
        assert_eq!(hop.listener_port, INBOUND_PORT, "{hop:?}");
        assert_eq!(hop.peer.ip(), ip(&m, from), "{hop:?}");
        assert_eq!(hop.original_dst, addr(&m, "a", PORT), "{hop:?}");
        assert_eq!(hop.upstream_local, Some(peer), "{hop:?}");
        let _ = node_of_from;
    }
}

fn captured_to_captured_across_nodes_goes_through_hbone(mode: Mode) {
    let m = Mesh::new_in(&tag(mode, "c2cx"), mode);
    m.clear_hops();
    let peer = m.exchange("a", "c");
    let (h1, h2) = m.hops(2);
    assert_eq!(h1.len(), 1, "{h1:?}");
    assert_eq!(h2.len(), 1, "{h2:?}");
    let out = &h1[0];
    assert_eq!(out.listener_port, OUTBOUND_PORT, "{out:?}");
    assert_eq!(out.original_dst, addr(&m, "c", PORT), "{out:?}");
    assert_eq!(out.upstream_dst, Some(addr(&m, "c", HBONE_PORT)), "{out:?}");
    assert_eq!(
        out.upstream_local.map(|l| l.ip()),
        Some(IpAddr::V4(m.lab.node(1).ztunnel.ip)),
        "HBONE leaves from ztunnel's own IP: {out:?}"
    );
    let inb = &h2[0];
    assert_eq!(inb.listener_port, HBONE_PORT, "{inb:?}");
    assert_eq!(inb.original_dst, addr(&m, "c", HBONE_PORT), "{inb:?}");
    assert_eq!(inb.peer, out.upstream_local.expect("local"), "{inb:?}");
    assert_eq!(
        inb.hbone,
        Some((addr(&m, "c", PORT), ip(&m, "a"))),
        "{inb:?}"
    );
    assert_eq!(inb.upstream_local, Some(peer), "{inb:?}");
}

fn captured_to_captured_on_the_same_node_goes_through_hbone(mode: Mode) {
    let m = Mesh::new_in(&tag(mode, "c2cs"), mode);
    m.clear_hops();
    let peer = m.exchange("a", "d");
    let (h1, h2) = m.hops(2);
    assert!(h2.is_empty(), "{h2:?}");
    assert_eq!(
        h1.len(),
        2,
        "outbound + inbound HBONE hop on node 1: {h1:?}"
    );
    let out = h1
        .iter()
        .find(|h| h.listener_port == OUTBOUND_PORT)
        .expect("15001 hop");
    let inb = h1
        .iter()
        .find(|h| h.listener_port == HBONE_PORT)
        .expect("15008 hop");
    assert_eq!(out.original_dst, addr(&m, "d", PORT), "{out:?}");
    assert_eq!(out.upstream_dst, Some(addr(&m, "d", HBONE_PORT)), "{out:?}");
    assert_eq!(inb.original_dst, addr(&m, "d", HBONE_PORT), "{inb:?}");
    assert_eq!(inb.peer, out.upstream_local.expect("local"), "{inb:?}");
    assert_eq!(
        inb.hbone,
        Some((addr(&m, "d", PORT), ip(&m, "a"))),
        "{inb:?}"
    );
    assert_eq!(inb.upstream_local, Some(peer), "{inb:?}");
}

fn non_ambient_and_opt_out_pods_are_untouched(mode: Mode) {
    let m = Mesh::new_in(&tag(mode, "none"), mode);
    m.clear_hops();
    // plain ↔ plain, same node and across nodes; the opt-out pod o (in the ambient namespace)
    // to and from plain pods. No stand-in hop anywhere, and the server sees the client's IP
    // on the very socket the client opened (direct path).
    for (from, to) in [
        ("b", "e"),
        ("e", "b"),
        ("o", "b"),
        ("b", "o"),
        ("o", "e"),
        ("e", "o"),
    ] {
        m.exchange(from, to);
    }
    // No hop in between: the server's peer is exactly the client's own socket.
    for (from, to) in [("b", "e"), ("o", "b"), ("e", "o")] {
        let mut s = open_stream(&m.pod(from).netns, addr(&m, to, PORT), T).expect("open");
        let banner = read_line(&mut s).expect("banner");
        let local = s.local_addr().expect("local");
        assert_eq!(
            banner,
            format!("server:{} peer:{local}\n", addr(&m, to, PORT)),
            "{from} → {to} must be direct"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(m.zt(1).hops().is_empty(), "{:?}", m.zt(1).hops());
    assert!(m.zt(2).hops().is_empty(), "{:?}", m.zt(2).hops());
    // The opt-out pod is not enrolled; its namespace neighbours are.
    let enrolled = m.enrolled();
    for (pod, want) in [
        ("a", true),
        ("d", true),
        ("c", true),
        ("o", false),
        ("b", false),
    ] {
        assert_eq!(
            enrolled.iter().any(|e| e == pod),
            want,
            "{pod} enrolled? {enrolled:?}"
        );
    }
}

/// Counters of the kernel's TCP stack in a netns (`nstat -az`), for failure messages.
fn tcp_counters(ns: &meshcni_testkit::Netns) -> String {
    ns.exec_ok(
        "nstat",
        &[
            "-az",
            "TcpOutRsts",
            "TcpEstabResets",
            "TcpInSegs",
            "TcpOutSegs",
        ],
    )
    .unwrap_or_else(|e| e.to_string())
    .lines()
    .filter(|l| !l.starts_with('#'))
    .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
    .collect::<Vec<_>>()
    .join(" ")
}

fn enrolling_a_running_pod_keeps_its_open_connection_and_captures_new_ones(mode: Mode) {
    let mut m = Mesh::new_in(&tag(mode, "enr"), mode);
    m.clear_hops();
    // b (plain) holds a connection to e (plain, node 2) open across its enrollment.
    let mut live = open_stream(&m.pod("b").netns, addr(&m, "e", PORT), T).expect("open");
    let banner = read_line(&mut live).expect("banner");
    assert!(
        banner.contains(&format!("peer:{}:", m.pod("b").ip)),
        "{banner}"
    );
    ping(&mut live, "before enroll").expect("direct connection works");
    // ...and e holds one to b (inbound for b).
    let mut live_in = open_stream(&m.pod("e").netns, addr(&m, "b", PORT), T).expect("open in");
    read_line(&mut live_in).expect("banner in");
    ping(&mut live_in, "before enroll (inbound)").expect("direct connection works");

    m.set_label("b", ambient_mesh::DATAPLANE_MODE, Some("ambient"));
    m.reconcile();
    // New connections go through ztunnel...
    let peer = m.exchange("b", "e");
    let (h1, h2) = m.hops(1);
    assert_eq!(h1.len(), 1, "a new connection goes through ztunnel: {h1:?}");
    assert!(h2.is_empty(), "{h2:?}");
    assert_eq!(h1[0].listener_port, OUTBOUND_PORT);
    assert_eq!(h1[0].original_dst, addr(&m, "e", PORT));
    assert_eq!(h1[0].upstream_local, Some(peer));
    // ...while the one opened before enrollment keeps working, untouched by ztunnel.
    let result = ping(&mut live, "after enroll");
    assert!(
        result.is_ok(),
        "connection opened before enrollment must survive it: {result:?}; \
         ztunnel-1 netns TCP counters: {}; pod b: {}; hops: {:?}",
        tcp_counters(&m.lab.node(1).ztunnel.netns),
        tcp_counters(&m.pod("b").netns),
        m.zt(1).hops()
    );
    let result = ping(&mut live_in, "after enroll (inbound)");
    assert!(
        result.is_ok(),
        "inbound connection opened before enrollment must survive it: {result:?}; \
         ztunnel-1 netns TCP counters: {}; pod e: {}",
        tcp_counters(&m.lab.node(1).ztunnel.netns),
        tcp_counters(&m.pod("e").netns),
    );
    assert_eq!(
        m.zt(1).hops().len(),
        1,
        "the open connections must not move"
    );
}

fn releasing_a_running_pod_keeps_its_open_connection_and_new_ones_go_direct(mode: Mode) {
    let mut m = Mesh::new_in(&tag(mode, "rel"), mode);
    m.set_label("b", ambient_mesh::DATAPLANE_MODE, Some("ambient"));
    m.reconcile();
    m.clear_hops();
    // A connection opened while b is enrolled runs through the stand-in.
    let mut live = open_stream(&m.pod("b").netns, addr(&m, "e", PORT), T).expect("open");
    let banner = read_line(&mut live).expect("banner");
    assert!(
        banner.contains(&format!("peer:{}:", m.pod("b").ip)),
        "{banner}"
    );
    ping(&mut live, "while enrolled").expect("captured connection works");
    let mut live_in = open_stream(&m.pod("e").netns, addr(&m, "b", PORT), T).expect("open in");
    read_line(&mut live_in).expect("banner in");
    ping(&mut live_in, "while enrolled (inbound)").expect("captured connection works");
    let hops = m.zt(1).hops();
    assert_eq!(hops.len(), 2, "{hops:?}");
    assert_eq!(
        (hops[0].listener_port, hops[1].listener_port),
        (OUTBOUND_PORT, INBOUND_PORT),
        "{hops:?}"
    );

    m.set_label("b", ambient_mesh::DATAPLANE_MODE, None);
    m.reconcile();
    m.clear_hops();
    // New connections are direct again (no hop)...
    m.exchange("b", "e");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        m.zt(1).hops().is_empty(),
        "released: direct again: {:?}",
        m.zt(1).hops()
    );
    if mode == Mode::Ebpf {
        // The ebpf datapath keeps no per-connection state in the node netns: once the pod's
        // addresses leave the map, a connection ztunnel terminated is no longer steered to it
        // and fails with a reset (as in the reference), never hanging or leaking half-open.
        let out = ping(&mut live, "after release");
        let inb = ping(&mut live_in, "after release (inbound)");
        assert!(
            out.as_ref().is_err_and(|e| e.contains("reset")),
            "ebpf: a connection terminated by ztunnel is reset on release: {out:?}"
        );
        assert!(
            inb.as_ref().is_err_and(|e| e.contains("reset")),
            "ebpf: an inbound connection terminated by ztunnel is reset on release: {inb:?}"
        );
        return;
    }
    // ...while the one opened through ztunnel keeps working.
    let result = ping(&mut live, "after release");
    assert!(
        result.is_ok(),
        "connection opened while enrolled must survive the release: {result:?}; \
         pod b TCP counters: {}; pod e: {}",
        tcp_counters(&m.pod("b").netns),
        tcp_counters(&m.pod("e").netns),
    );
    let result = ping(&mut live_in, "after release (inbound)");
    assert!(
        result.is_ok(),
        "inbound connection opened while enrolled must survive the release: {result:?}"
    );
}

/// The scenarios in redirect mode `iptables`.
mod iptables {
    #[test]
    fn captured_to_uncaptured_same_node_and_across_nodes() {
        super::captured_to_uncaptured_same_node_and_across_nodes(super::Mode::Iptables);
    }

    #[test]
    fn uncaptured_to_captured_same_node_and_across_nodes() {
        super::uncaptured_to_captured_same_node_and_across_nodes(super::Mode::Iptables);
    }

    #[test]
    fn captured_to_captured_across_nodes_goes_through_hbone() {
        super::captured_to_captured_across_nodes_goes_through_hbone(super::Mode::Iptables);
    }

    #[test]
    fn captured_to_captured_on_the_same_node_goes_through_hbone() {
        super::captured_to_captured_on_the_same_node_goes_through_hbone(super::Mode::Iptables);
    }

    #[test]
    fn non_ambient_and_opt_out_pods_are_untouched() {
        super::non_ambient_and_opt_out_pods_are_untouched(super::Mode::Iptables);
    }

    #[test]
    fn enrolling_a_running_pod_keeps_its_open_connection_and_captures_new_ones() {
        super::enrolling_a_running_pod_keeps_its_open_connection_and_captures_new_ones(
            super::Mode::Iptables,
        );
    }

    #[test]
    fn releasing_a_running_pod_keeps_its_open_connection_and_new_ones_go_direct() {
        super::releasing_a_running_pod_keeps_its_open_connection_and_new_ones_go_direct(
            super::Mode::Iptables,
        );
    }
}

/// The very same scenarios in redirect mode `ebpf`, each also asserting that the node netns
/// holds no iptables/nft rule, ipset or policy rule.
mod ebpf {
    #[test]
    fn captured_to_uncaptured_same_node_and_across_nodes() {
        super::captured_to_uncaptured_same_node_and_across_nodes(super::Mode::Ebpf);
    }

    #[test]
    fn uncaptured_to_captured_same_node_and_across_nodes() {
        super::uncaptured_to_captured_same_node_and_across_nodes(super::Mode::Ebpf);
    }

    #[test]
    fn captured_to_captured_across_nodes_goes_through_hbone() {
        super::captured_to_captured_across_nodes_goes_through_hbone(super::Mode::Ebpf);
    }

    #[test]
    fn captured_to_captured_on_the_same_node_goes_through_hbone() {
        super::captured_to_captured_on_the_same_node_goes_through_hbone(super::Mode::Ebpf);
    }

    #[test]
    fn non_ambient_and_opt_out_pods_are_untouched() {
        super::non_ambient_and_opt_out_pods_are_untouched(super::Mode::Ebpf);
    }

    #[test]
    fn enrolling_a_running_pod_keeps_its_open_connection_and_captures_new_ones() {
        super::enrolling_a_running_pod_keeps_its_open_connection_and_captures_new_ones(
            super::Mode::Ebpf,
        );
    }

    #[test]
    /// Differs from the iptables mode by design (see the scenario): connections through
    /// ztunnel are reset on release.
    fn releasing_a_running_pod_resets_connections_through_ztunnel_and_new_ones_go_direct() {
        super::releasing_a_running_pod_keeps_its_open_connection_and_new_ones_go_direct(
            super::Mode::Ebpf,
        );
    }
}
