//! UDP tunnel links (GENEVE, VXLAN) and link introspection via netlink: create a point-to-point
//! tunnel to one remote, delete links, read a link's kind / peer ifindex / peer netns id /
//! tunnel parameters, detect whether the kernel has GENEVE (probed in a throwaway netns), and
//! pick a free UDP port.
//!
//! The ambient `iptables` redirect mode uses GENEVE like the reference; kernels without the
//! `geneve` module get VXLAN with the same VNIs (the inner frames are identical Ethernet, only
//! the 8-byte header differs, so nothing above the link notices).

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{
    InfoData, InfoGeneve, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};

use crate::NetxError;
use crate::netlink::{Change, Netlink};

/// Which encapsulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelKind {
    Geneve,
    Vxlan,
}

impl TunnelKind {
    pub fn name(self) -> &'static str {
        match self {
            TunnelKind::Geneve => "geneve",
            TunnelKind::Vxlan => "vxlan",
        }
    }

    /// The IANA port of the encapsulation (GENEVE 6081, VXLAN 4789): where a free-port search
    /// starts.
    pub fn default_port(self) -> u16 {
        match self {
            TunnelKind::Geneve => 6081,
            TunnelKind::Vxlan => 4789,
        }
    }
}

/// `ip link add NAME type geneve|vxlan id VNI remote REMOTE dstport PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub name: String,
    pub kind: TunnelKind,
    pub vni: u32,
    pub remote: Ipv4Addr,
    pub port: u16,
    /// Fixed MAC address. A tunnel peer that is re-created (ztunnel restart) then keeps its
    /// MAC, so the other side's neighbour entry stays valid and traffic resumes at once.
    pub mac: Option<[u8; 6]>,
}

impl std::fmt::Display for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} type {} id {} remote {} dstport {}",
            self.name,
            self.kind.name(),
            self.vni,
            self.remote,
            self.port
        )
    }
}

/// A link's details, as far as this mode needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDetails {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `vxlan`, `geneve`, …); empty for kind-less links (lo).
    pub kind: String,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's netns).
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the peer's netns id as seen from this netns.
    pub link_netnsid: Option<i32>,
    pub up: bool,
    /// Tunnel VNI / remote / UDP port, when the link is a vxlan or geneve.
    pub vni: Option<u32>,
    pub remote: Option<Ipv4Addr>,
    pub port: Option<u16>,
}

/// The `RTM_NEWLINK` message creating `spec` (public for byte-level tests).
pub fn tunnel_message(spec: &TunnelSpec) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes
        .push(LinkAttribute::IfName(spec.name.clone()));
    if let Some(mac) = spec.mac {
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    let (kind, data) = match spec.kind {
        TunnelKind::Geneve => (
            InfoKind::Geneve,
            InfoData::Geneve(vec![
                InfoGeneve::Id(spec.vni),
                InfoGeneve::Remote(spec.remote),
                InfoGeneve::Port(spec.port),
            ]),
        ),
        TunnelKind::Vxlan => (
            InfoKind::Vxlan,
            // No learning: every frame goes to the one remote; a learnt per-MAC entry would
            // keep pointing at a previous ztunnel after the remote changes.
            InfoData::Vxlan(vec![
                InfoVxlan::Id(spec.vni),
                InfoVxlan::Group(spec.remote),
                InfoVxlan::Port(spec.port),
                InfoVxlan::Learning(false),
            ]),
        ),
    };
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(kind),
        LinkInfo::Data(data),
    ]));
    msg
}

/// Create the tunnel link (down). An existing link with the same name is `Unchanged` only if
/// it has the same kind, VNI, remote and port; otherwise it is an error naming the difference.
pub fn add_tunnel(nl: &mut Netlink, spec: &TunnelSpec) -> Result<Change, NetxError> {
    let op = format!("add link {spec}");
    let result = nl.ack(
        &op,
        RouteNetlinkMessage::NewLink(tunnel_message(spec)),
        NLM_F_CREATE | NLM_F_EXCL,
    )?;
    match result {
        Ok(()) => Ok(Change::Applied),
        Err(e) if e == libc::EEXIST => {
            let have = link_details(nl, &spec.name)?;
            let same = have.as_ref().is_some_and(|d| {
                d.kind == spec.kind.name()
                    && d.vni == Some(spec.vni)
                    && d.remote == Some(spec.remote)
                    && d.port == Some(spec.port)
            });
            if same {
                Ok(Change::Unchanged)
            } else {
                Err(NetxError::NetlinkProtocol {
                    netns: nl.netns().to_path_buf(),
                    op,
                    detail: format!("a different link with that name already exists: {have:?}"),
                })
            }
        }
        Err(e) => Err(NetxError::Netlink {
            netns: nl.netns().to_path_buf(),
            op,
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// `ip link set NAME type KIND remote R` (changelink; VNI and port cannot change in place).
/// `Ok(false)` when the kernel refuses or the remote did not change, so the caller can
/// re-create the link instead.
pub fn change_remote(nl: &mut Netlink, spec: &TunnelSpec) -> Result<bool, NetxError> {
    let Some(index) = nl.link_index(&spec.name)? else {
        return Ok(false);
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let (kind, data) = match spec.kind {
        TunnelKind::Geneve => (
            InfoKind::Geneve,
            InfoData::Geneve(vec![InfoGeneve::Remote(spec.remote)]),
        ),
        TunnelKind::Vxlan => (
            InfoKind::Vxlan,
            InfoData::Vxlan(vec![InfoVxlan::Group(spec.remote)]),
        ),
    };
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(kind),
        LinkInfo::Data(data),
    ]));
    let op = format!("change remote of {} to {}", spec.name, spec.remote);
    match nl.ack(&op, RouteNetlinkMessage::NewLink(msg), 0)? {
        Ok(()) => Ok(link_details(nl, &spec.name)?.is_some_and(|d| d.remote == Some(spec.remote))),
        Err(errno) => {
            tracing::info!(op, errno, "changelink refused");
            Ok(false)
        }
    }
}

/// `ip link del NAME`; an absent link is `Unchanged`.
pub fn del_link(nl: &mut Netlink, name: &str) -> Result<Change, NetxError> {
    let Some(index) = nl.link_index(name)? else {
        return Ok(Change::Unchanged);
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let op = format!("delete link {name}");
    match nl.ack(&op, RouteNetlinkMessage::DelLink(msg), 0)? {
        Ok(()) => Ok(Change::Applied),
        Err(e) if e == libc::ENODEV => Ok(Change::Unchanged),
        Err(e) => Err(NetxError::Netlink {
            netns: nl.netns().to_path_buf(),
            op,
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

fn details(link: &LinkMessage) -> LinkDetails {
    let mut d = LinkDetails {
        index: link.header.index,
        name: String::new(),
        kind: String::new(),
        link: None,
        link_netnsid: None,
        up: link
            .header
            .flags
            .contains(netlink_packet_route::link::LinkFlags::Up),
        vni: None,
        remote: None,
        port: None,
    };
    for a in &link.attributes {
        match a {
            LinkAttribute::IfName(n) => d.name = n.clone(),
            LinkAttribute::Link(l) => d.link = Some(*l),
            LinkAttribute::LinkNetNsId(n) => d.link_netnsid = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => d.kind = k.to_string(),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => d.vni = Some(*id),
                                    InfoVxlan::Group(g) => d.remote = Some(*g),
                                    InfoVxlan::Port(p) => d.port = Some(*p),
                                    _ => {}
                                }
                            }
                        }
                        LinkInfo::Data(InfoData::Geneve(v)) => {
                            for x in v {
                                match x {
                                    InfoGeneve::Id(id) => d.vni = Some(*id),
                                    InfoGeneve::Remote(g) => d.remote = Some(*g),
                                    InfoGeneve::Port(p) => d.port = Some(*p),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    d
}

/// Every link with its details.
pub fn list_links(nl: &mut Netlink) -> Result<Vec<LinkDetails>, NetxError> {
    let mut out = Vec::new();
    // Each reply is reduced to its details as it arrives: a node with thousands of pod
    // veths never has the whole parsed dump (stats, per-family config, …) in memory.
    nl.dump_each(
        "list links",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                out.push(details(&l));
            }
        },
    )?;
    Ok(out)
}

/// Details of the link called `name`, `None` if absent: one `RTM_GETLINK` by name, not a dump
/// (its cost does not grow with the number of pod veths on the node).
pub fn link_details(nl: &mut Netlink, name: &str) -> Result<Option<LinkDetails>, NetxError> {
    // No link can have a longer name (IFNAMSIZ with its NUL); the kernel would refuse the
    // request with EINVAL rather than say "no such device".
    if name.is_empty() || name.len() >= 16 {
        return Ok(None);
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let op = format!("get link {name}");
    match nl.request(&op, RouteNetlinkMessage::GetLink(msg), 0)? {
        Ok(replies) => Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(details(l)),
            _ => None,
        })),
        Err(errno) if errno == libc::ENODEV => Ok(None),
        Err(errno) => Err(NetxError::Netlink {
            netns: nl.netns().to_path_buf(),
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Details of the link with `index`, `None` if absent (one `RTM_GETLINK`, no dump).
pub fn link_by_index(nl: &mut Netlink, index: u32) -> Result<Option<LinkDetails>, NetxError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let op = format!("get link #{index}");
    match nl.request(&op, RouteNetlinkMessage::GetLink(msg), 0)? {
        Ok(replies) => Ok(replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(details(l)),
            _ => None,
        })),
        Err(e) if e == libc::ENODEV => Ok(None),
        Err(e) => Err(NetxError::Netlink {
            netns: nl.netns().to_path_buf(),
            op,
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
}

/// The name of interface `index` in the calling thread's netns (`if_indextoname`: one ioctl,
/// much cheaper than a netlink `GETLINK` whose full reply must be parsed).
pub fn link_name_here(ns: &crate::InNetns<'_>, index: u32) -> Result<String, NetxError> {
    nix::net::if_::if_indextoname(index)
        .map(|c| c.to_string_lossy().into_owned())
        .map_err(|e| NetxError::Netlink {
            netns: ns.path().to_path_buf(),
            op: format!("if_indextoname({index})"),
            source: e.into(),
        })
}

/// Whether the kernel can create GENEVE links: one probe in a throwaway netns per process.
pub fn geneve_supported() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let result = crate::netns::with_scratch_netns(|ns| -> Result<Change, NetxError> {
            let mut nl = Netlink::open_here(ns)?;
            add_tunnel(
                &mut nl,
                &TunnelSpec {
                    name: "mcniprobe0".to_string(),
                    kind: TunnelKind::Geneve,
                    vni: 1,
                    remote: Ipv4Addr::new(192, 0, 2, 1),
                    port: 6081,
                    mac: None,
                },
            )
        });
        match result {
            Ok(Ok(_)) => true,
            Ok(Err(e)) | Err(e) => {
                tracing::info!(error = %e, "GENEVE links are not available in this kernel");
                false
            }
        }
    })
}

/// GENEVE when the kernel has it, else VXLAN (logged).
pub fn detect_kind() -> TunnelKind {
    if geneve_supported() {
        TunnelKind::Geneve
    } else {
        tracing::warn!("kernel lacks GENEVE: ambient tunnels use VXLAN with the same VNIs");
        TunnelKind::Vxlan
    }
}

/// The first UDP port ≥ `start` that no other tunnel link of `links` (except `ours`) uses and
/// that is not in `bound` (locally bound UDP ports). Spec §3.1 `determineDstPortForGeneveLink`
/// generalised to VXLAN.
pub fn pick_port(start: u16, links: &[LinkDetails], ours: &[&str], bound: &[u16]) -> u16 {
    let used: Vec<u16> = links
        .iter()
        .filter(|l| !ours.contains(&l.name.as_str()))
        .filter_map(|l| l.port)
        .collect();
    (start..=u16::MAX)
        .find(|p| !used.contains(p) && !bound.contains(p))
        .unwrap_or(start)
}

/// Locally bound UDP ports of the calling thread's netns (`/proc/net/udp`, read from a thread
/// inside the netns, so it is that netns's table).
pub fn bound_udp_ports_here(_ns: &crate::InNetns<'_>) -> Vec<u16> {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/udp") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let local = l.split_whitespace().nth(1)?;
            let port = local.split(':').nth(1)?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_utils_free::find_attr;

    mod netlink_packet_utils_free {
        /// Find the payload of attribute `kind` in a flat run of netlink attributes.
        pub fn find_attr(mut buf: &[u8], kind: u16) -> Option<&[u8]> {
            while buf.len() >= 4 {
                let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
                let k = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
                if len < 4 || len > buf.len() {
                    return None;
                }
                if k == kind {
                    return Some(&buf[4..len]);
                }
                buf = &buf[((len + 3) & !3).min(buf.len())..];
            }
            None
        }
    }

    fn bytes(spec: &TunnelSpec) -> Vec<u8> {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(tunnel_message(spec))),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_INFO_DATA: u16 = 2;

    #[test]
    fn geneve_message_carries_kind_vni_remote_and_big_endian_port() {
        let spec = TunnelSpec {
            name: "istioin".into(),
            kind: TunnelKind::Geneve,
            vni: 1000,
            remote: Ipv4Addr::new(10, 244, 1, 5),
            port: 6081,
            mac: Some([2, 0x6d, 0x63, 0x6e, 1, 2]),
        };
        let buf = bytes(&spec);
        // nlmsghdr (16) + ifinfomsg (16), then attributes.
        let attrs = &buf[32..];
        assert_eq!(find_attr(attrs, IFLA_IFNAME), Some(&b"istioin\0"[..]));
        // IFLA_ADDRESS = 1: the fixed MAC.
        assert_eq!(find_attr(attrs, 1), Some(&[2, 0x6d, 0x63, 0x6e, 1, 2][..]));
        let info = find_attr(attrs, IFLA_LINKINFO).expect("IFLA_LINKINFO");
        assert_eq!(find_attr(info, IFLA_INFO_KIND), Some(&b"geneve\0"[..]));
        let data = find_attr(info, IFLA_INFO_DATA).expect("IFLA_INFO_DATA");
        // IFLA_GENEVE_ID = 1 (u32 native), IFLA_GENEVE_REMOTE = 2 (4 bytes),
        // IFLA_GENEVE_PORT = 5 (u16 network order).
        assert_eq!(find_attr(data, 1), Some(&1000u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(data, 2), Some(&[10, 244, 1, 5][..]));
        assert_eq!(find_attr(data, 5), Some(&6081u16.to_be_bytes()[..]));
    }

    #[test]
    fn vxlan_message_uses_group_as_unicast_remote() {
        let spec = TunnelSpec {
            name: "istioout".into(),
            kind: TunnelKind::Vxlan,
            vni: 1001,
            remote: Ipv4Addr::new(10, 244, 1, 5),
            port: 4789,
            mac: None,
        };
        let buf = bytes(&spec);
        let info = find_attr(&buf[32..], IFLA_LINKINFO).expect("linkinfo");
        assert_eq!(find_attr(info, IFLA_INFO_KIND), Some(&b"vxlan\0"[..]));
        let data = find_attr(info, IFLA_INFO_DATA).expect("data");
        // IFLA_VXLAN_ID = 1, IFLA_VXLAN_GROUP = 2, IFLA_VXLAN_PORT = 15 (network order).
        assert_eq!(find_attr(data, 1), Some(&1001u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(data, 2), Some(&[10, 244, 1, 5][..]));
        assert_eq!(find_attr(data, 15), Some(&4789u16.to_be_bytes()[..]));
    }

    #[test]
    fn port_picking_skips_foreign_tunnels_and_bound_sockets() {
        let link = |name: &str, port| LinkDetails {
            index: 1,
            name: name.into(),
            kind: "vxlan".into(),
            link: None,
            link_netnsid: None,
            up: true,
            vni: Some(1),
            remote: None,
            port: Some(port),
        };
        let links = vec![link("flannel.1", 4789), link("istioin", 4790)];
        assert_eq!(pick_port(4789, &links, &["istioin", "istioout"], &[]), 4790);
        assert_eq!(pick_port(4789, &links, &["istioin"], &[4790]), 4791);
        assert_eq!(pick_port(6081, &[], &[], &[]), 6081);
    }
}
