//! Link messages from newer kernels decode without log noise: arrays the kernel extended by
//! appending fields (`IFLA_INET6_CONF` is 240 bytes on Linux 6.x, the decoder knows 236) are cut
//! to the decodable length instead of being decoded with a WARN per link per dump.

mod common;

use std::sync::Mutex;
use std::thread::ThreadId;

use meshcni_netx::netlink::{Netlink, parse_route_message};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, LinkAttribute, LinkMessage};

/// WARN-or-worse log records, with the thread that emitted them (tests run in parallel).
static RECORDS: Mutex<Vec<(ThreadId, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            RECORDS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((std::thread::current().id(), r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

fn install_capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("set logger");
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// Warnings this thread logged so far (and forget them).
fn my_warnings() -> Vec<String> {
    let me = std::thread::current().id();
    let mut all = RECORDS.lock().unwrap_or_else(|e| e.into_inner());
    let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(t, _)| *t == me);
    *all = rest;
    mine.into_iter().map(|(_, m)| m).collect()
}

/// `RTM_NEWLINK` of `lo`, as Linux 6.18 sent it (`ip link` dump of a fresh netns): 1468
/// bytes, with `IFLA_AF_SPEC` → `AF_INET6` → `IFLA_INET6_CONF` of 240 bytes.
fn fixture() -> Vec<u8> {
    let hex = include_str!("fixtures/rtm_newlink_lo_inet6_conf_240.hex").trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Offset and length of the attribute path `path` (types) below the link message's attributes.
fn find_nla(msg: &[u8], path: &[u16]) -> Option<(usize, usize)> {
    let mut start = 32;
    let mut end = msg.len();
    let mut found = None;
    for want in path {
        let mut off = start;
        found = None;
        while off + 4 <= end {
            let len = usize::from(u16::from_ne_bytes([msg[off], msg[off + 1]]));
            let kind = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]) & 0x3fff;
            if len < 4 {
                return None;
            }
            if kind == *want {
                found = Some((off, len));
                start = off + 4;
                end = off + len;
                break;
            }
            off += (len + 3) & !3;
        }
        found?;
    }
    found
}

fn link(msg: NetlinkMessage<RouteNetlinkMessage>) -> LinkMessage {
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => l,
        other => panic!("not a link message: {other:?}"),
    }
}

fn inet6_devconf_mtu(l: &LinkMessage) -> Option<i32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::AfSpecUnspec(specs) => specs.iter().find_map(|s| match s {
            AfSpecUnspec::Inet6(v6) => v6.iter().find_map(|x| match x {
                AfSpecInet6::DevConf(c) => Some(c.mtu6),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

#[test]
fn a_240_byte_inet6_conf_decodes_without_a_warning() {
    install_capture();
    let bytes = fixture();
    assert_eq!(bytes.len(), 1468);
    let (_, conf_len) = find_nla(&bytes, &[26, 10, 2]).expect("IFLA_INET6_CONF in the fixture");
    assert_eq!(conf_len - 4, 240, "the fixture's IFLA_INET6_CONF length");

    // The crate's decoder on its own: decodes, but warns (what the agent logged per link).
    let _ = my_warnings();
    let direct = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).expect("decode");
    let warned = my_warnings();
    assert!(
        warned
            .iter()
            .any(|w| w.contains("IFLA_INET6_CONF") && w.contains("240")),
        "the fixture should trigger the decoder's warning: {warned:?}"
    );

    let msg = parse_route_message(&bytes).expect("decode");
    assert_eq!(
        my_warnings(),
        Vec::<String>::new(),
        "no WARN for a longer array"
    );
    assert_eq!(
        msg.header.length, 1468,
        "the kernel's length, to step through a datagram"
    );
    let tolerant = link(msg);
    let direct = link(direct);
    assert!(
        tolerant
            .attributes
            .contains(&LinkAttribute::IfName("lo".into()))
    );
    // The fields both know decode the same.
    assert_eq!(tolerant, direct);
    assert_eq!(inet6_devconf_mtu(&tolerant), Some(65536));
}

#[test]
fn every_extended_array_is_cut_and_shorter_ones_pass() {
    install_capture();
    let _ = my_warnings();
    let bytes = fixture();
    let reference = link(parse_route_message(&bytes).expect("decode"));
    // Grow IFLA_STATS64 (top level) and IFLA_INET6_STATS (nested twice) by 8 bytes each, as a
    // future kernel appending a counter would, and fix up every enclosing length.
    let mut grown = bytes.clone();
    for path in [&[23u16][..], &[26, 10, 3][..]] {
        let (off, len) = find_nla(&grown, path).expect("attribute");
        grown.splice(off + len..off + len, [0xAB; 8]);
        let bump = |buf: &mut Vec<u8>, at: usize| {
            let l = u16::from_ne_bytes([buf[at], buf[at + 1]]) + 8;
            buf[at..at + 2].copy_from_slice(&l.to_ne_bytes());
        };
        bump(&mut grown, off);
        for depth in 1..path.len() {
            let (outer, _) = find_nla(&grown, &path[..depth]).expect("outer");
            bump(&mut grown, outer);
        }
        let total = u32::from_ne_bytes([grown[0], grown[1], grown[2], grown[3]]) + 8;
        grown[..4].copy_from_slice(&total.to_ne_bytes());
    }
    let msg = parse_route_message(&grown).expect("decode grown");
    assert_eq!(my_warnings(), Vec::<String>::new());
    assert_eq!(msg.header.length as usize, grown.len());
    assert_eq!(link(msg), reference, "appended fields are ignored");
}

#[test]
fn a_live_link_dump_logs_nothing() {
    install_capture();
    let _ = my_warnings();
    let ns = common::TestNetns::new();
    ns.ip(&[
        "link", "add", "mcni-v0", "type", "veth", "peer", "name", "mcni-v1",
    ]);
    let mut nl = Netlink::open(&ns.path()).expect("open");
    // `Netlink::open` decodes on this thread (the socket is used from here).
    let links = nl.links().expect("links");
    assert!(links.iter().any(|l| l.name == "mcni-v0"), "{links:?}");
    assert_eq!(my_warnings(), Vec::<String>::new());
}
