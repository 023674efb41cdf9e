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
    assert!(on(nf).contains(out), "outbound hop on {from}'s node: {out:?}");
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
    assert_eq!(peer.ip(), ip_of(m, from, v6), "server sees the client pod's IP");
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
