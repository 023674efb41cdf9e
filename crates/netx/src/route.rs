//! Generic IPv4 routes and policy-routing rules over [`Netlink`]: routes in any table with
//! gateway / device / preferred source / onlink / scope / `local` type, rules with optional
//! fwmark and `lookup` or `goto` actions, and listings detailed enough to tell our objects from
//! somebody else's. Idempotent like the rest of [`crate::netlink`].

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::NetxError;
use crate::netlink::{Change, Netlink};

/// An IPv4 route (`ip route add [table T] [local] DST [via GW] dev DEV [src S] [scope link]
/// [onlink]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route4 {
    pub table: u32,
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub dev: String,
    pub src: Option<Ipv4Addr>,
    pub onlink: bool,
    pub scope_link: bool,
    pub local: bool,
}

impl std::fmt::Display for Route4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "table {} ", self.table)?;
        if self.local {
            f.write_str("local ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        write!(f, " dev {}", self.dev)?;
        if let Some(s) = self.src {
            write!(f, " src {s}")?;
        }
        if self.scope_link {
            f.write_str(" scope link")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// A listed IPv4 route (raw fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub table: u32,
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub src: Option<Ipv4Addr>,
    /// Route type `unicast` (not local/broadcast/blackhole/…).
    pub unicast: bool,
}

/// An IPv4 rule: `priority P [fwmark M/MASK] (lookup T | goto G)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule4 {
    pub priority: u32,
    pub fwmark: Option<(u32, u32)>,
    pub action: RuleTarget,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleTarget {
    Lookup(u32),
    Goto(u32),
    /// Anything else (listing only: blackhole, unreachable, nop, …).
    Other,
}

impl std::fmt::Display for Rule4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "priority {}", self.priority)?;
        if let Some((m, mask)) = self.fwmark {
            write!(f, " fwmark {m:#x}/{mask:#x}")?;
        }
        match self.action {
            RuleTarget::Lookup(t) => write!(f, " lookup {t}"),
            RuleTarget::Goto(g) => write!(f, " goto {g}"),
            RuleTarget::Other => f.write_str(" (other action)"),
        }
    }
}

fn require_link(nl: &mut Netlink, name: &str) -> Result<u32, NetxError> {
    nl.link_index(name)?.ok_or_else(|| NetxError::Netlink {
        netns: nl.netns().to_path_buf(),
        op: format!("get link {name}"),
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })
}

fn errno(nl: &Netlink, op: &str, errno: i32) -> NetxError {
    NetxError::Netlink {
        netns: nl.netns().to_path_buf(),
        op: op.to_string(),
        source: std::io::Error::from_raw_os_error(errno),
    }
}

fn route_message(index: u32, r: &Route4, delete: bool) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = r.dst.prefix_len();
    msg.header.table = u8::try_from(r.table).unwrap_or(252);
    msg.header.kind = if r.local {
        RouteType::Local
    } else {
        RouteType::Unicast
    };
    msg.header.protocol = if delete {
        RouteProtocol::Unspec
    } else {
        RouteProtocol::Boot
    };
    msg.header.scope = if delete {
        RouteScope::NoWhere
    } else if r.local {
        RouteScope::Host
    } else if r.scope_link {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if r.onlink {
        msg.header.flags = RouteFlags::Onlink;
    }
    msg.attributes.push(RouteAttribute::Table(r.table));
    if r.dst.prefix_len() > 0 || !r.dst.addr().is_unspecified() {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                r.dst.addr(),
            )));
    }
    if let Some(g) = r.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
    }
    if let Some(s) = r.src {
        msg.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet(s)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// `ip route add ROUTE`; an existing route is `Unchanged`.
pub fn add_route(nl: &mut Netlink, r: &Route4) -> Result<Change, NetxError> {
    let op = format!("add route {r}");
    let index = require_link(nl, &r.dev)?;
    let msg = route_message(index, r, false);
    nl.request_change(
        &op,
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_EXCL,
        &[libc::EEXIST],
    )
}

/// `ip route replace ROUTE`: creates it, or atomically replaces the route with the same
/// table/destination (e.g. a default route whose gateway changed). Always `Applied`.
pub fn replace_route(nl: &mut Netlink, r: &Route4) -> Result<Change, NetxError> {
    let op = format!("replace route {r}");
    let index = require_link(nl, &r.dev)?;
    let msg = route_message(index, r, false);
    nl.request_change(
        &op,
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
        &[],
    )
}

/// [`replace_route`] with the output device given by index (`r.dev` is only used in
/// messages): saves the name lookup on hot paths that already know the index.
pub fn replace_route_oif(nl: &mut Netlink, r: &Route4, oif: u32) -> Result<Change, NetxError> {
    let op = format!("replace route {r}");
    let msg = route_message(oif, r, false);
    nl.request_change(
        &op,
        RouteNetlinkMessage::NewRoute(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
        &[],
    )
}

/// `ip route del ROUTE`; an absent route (or device) is `Unchanged`.
pub fn del_route(nl: &mut Netlink, r: &Route4) -> Result<Change, NetxError> {
    let op = format!("delete route {r}");
    let Some(index) = nl.link_index(&r.dev)? else {
        return Ok(Change::Unchanged);
    };
    let msg = route_message(index, r, true);
    nl.request_change(
        &op,
        RouteNetlinkMessage::DelRoute(msg),
        0,
        &[libc::ESRCH, libc::ENOENT],
    )
}

fn v4(addr: &RouteAddress) -> Option<Ipv4Addr> {
    match addr {
        RouteAddress::Inet(a) => Some(*a),
        _ => None,
    }
}

/// IPv4 routes of `table` (every table if `None`), all route types.
pub fn list_routes(nl: &mut Netlink, table: Option<u32>) -> Result<Vec<RouteEntry>, NetxError> {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    let mut out = Vec::new();
    // Each reply is reduced as it arrives (a node with thousands of pods has thousands of
    // routes in two tables; the parsed dump is never held whole).
    nl.dump_each(
        "list routes (ipv4)",
        RouteNetlinkMessage::GetRoute(req),
        |m| {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                return;
            };
            let mut e = RouteEntry {
                table: u32::from(r.header.table),
                dst: Ipv4Net::default(),
                gateway: None,
                oif: None,
                src: None,
                unicast: r.header.kind == RouteType::Unicast,
            };
            let mut dst = Ipv4Addr::UNSPECIFIED;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => e.table = *t,
                    RouteAttribute::Destination(d) => dst = v4(d).unwrap_or(dst),
                    RouteAttribute::Gateway(g) => e.gateway = v4(g),
                    RouteAttribute::PrefSource(s) => e.src = v4(s),
                    RouteAttribute::Oif(o) => e.oif = Some(*o),
                    _ => {}
                }
            }
            e.dst = Ipv4Net::new(dst, r.header.destination_prefix_length).unwrap_or_default();
            if table.is_none_or(|t| t == e.table) {
                out.push(e);
            }
        },
    )?;
    Ok(out)
}

/// The output interface index of the main-table route to exactly `ip/32` (how the reference
/// finds a pod's or ztunnel's host veth), `None` when there is no such route. One
/// `RTM_GETROUTE` with `RTM_F_FIB_MATCH` (the matching FIB entry itself, not a dump).
///
/// The kernel resolves a `GETROUTE` through the policy rules (`RTA_TABLE` in the request does
/// not select the table), so once an ip rule sends `ip` to another table (the ambient mode's
/// `lookup 100` for an enrolled pod) the answer is that table's route. `RTM_F_LOOKUP_TABLE`
/// makes the reply name the table actually used; when it is not `main`, the main table is
/// read with a dump instead.
pub fn host_route_oif(nl: &mut Netlink, ip: Ipv4Addr) -> Result<Option<u32>, NetxError> {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    req.header.destination_prefix_length = 32;
    req.header.flags = RouteFlags::FibMatch | RouteFlags::LookupTable;
    req.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
    let op = format!("get route {ip}");
    let replies = match nl.request(&op, RouteNetlinkMessage::GetRoute(req), 0)? {
        Ok(r) => r,
        // No route at all (ENETUNREACH) / nothing matching.
        Err(e) if e == libc::ENETUNREACH || e == libc::ESRCH || e == libc::EHOSTUNREACH => {
            return Ok(None);
        }
        Err(e) => return Err(errno(nl, &op, e)),
    };
    for m in replies {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        let mut table = u32::from(r.header.table);
        let mut oif = None;
        let mut dst = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(o) => oif = Some(*o),
                RouteAttribute::Destination(d) => dst = v4(d),
                _ => {}
            }
        }
        if table != 254 {
            // Resolved through another table: read the main table itself.
            return Ok(list_routes(nl, Some(254))?
                .into_iter()
                .find(|e| e.unicast && e.dst.prefix_len() == 32 && e.dst.addr() == ip)
                .and_then(|e| e.oif));
        }
        if r.header.destination_prefix_length == 32
            && dst == Some(ip)
            && r.header.kind == RouteType::Unicast
        {
            return Ok(oif);
        }
    }
    Ok(None)
}

fn rule_message(r: &Rule4) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.attributes.push(RuleAttribute::Priority(r.priority));
    if let Some((m, mask)) = r.fwmark {
        msg.attributes.push(RuleAttribute::FwMark(m));
        msg.attributes.push(RuleAttribute::FwMask(mask));
    }
    match r.action {
        RuleTarget::Lookup(t) => {
            msg.header.action = RuleAction::ToTable;
            msg.header.table = u8::try_from(t).unwrap_or(252);
            msg.attributes.push(RuleAttribute::Table(t));
        }
        RuleTarget::Goto(g) => {
            msg.header.action = RuleAction::Goto;
            msg.attributes.push(RuleAttribute::Goto(g));
        }
        RuleTarget::Other => {}
    }
    msg
}

/// `ip rule add RULE`; an identical rule is `Unchanged`.
pub fn add_rule(nl: &mut Netlink, r: &Rule4) -> Result<Change, NetxError> {
    let op = format!("add rule {r}");
    if list_rules(nl)?.contains(r) {
        return Ok(Change::Unchanged);
    }
    nl.request_change(
        &op,
        RouteNetlinkMessage::NewRule(rule_message(r)),
        NLM_F_CREATE | NLM_F_EXCL,
        &[libc::EEXIST],
    )
}

/// `ip rule del RULE`; an absent rule is `Unchanged`.
pub fn del_rule(nl: &mut Netlink, r: &Rule4) -> Result<Change, NetxError> {
    let op = format!("delete rule {r}");
    nl.request_change(
        &op,
        RouteNetlinkMessage::DelRule(rule_message(r)),
        0,
        &[libc::ENOENT],
    )
}

/// IPv4 policy-routing rules.
pub fn list_rules(nl: &mut Netlink) -> Result<Vec<Rule4>, NetxError> {
    let mut req = RuleMessage::default();
    req.header.family = AddressFamily::Inet;
    let replies = nl.dump("list rules (ipv4)", RouteNetlinkMessage::GetRule(req))?;
    let mut out = Vec::new();
    for m in replies {
        let RouteNetlinkMessage::NewRule(r) = m else {
            continue;
        };
        let mut priority = 0;
        let mut mark = None;
        let mut mask = None;
        let mut table = u32::from(r.header.table);
        let mut goto = None;
        for a in &r.attributes {
            match a {
                RuleAttribute::Priority(p) => priority = *p,
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Goto(g) => goto = Some(*g),
                _ => {}
            }
        }
        let action = match r.header.action {
            RuleAction::ToTable => RuleTarget::Lookup(table),
            RuleAction::Goto => RuleTarget::Goto(goto.unwrap_or(0)),
            _ => RuleTarget::Other,
        };
        out.push(Rule4 {
            priority,
            fwmark: mark.map(|m| (m, mask.unwrap_or(u32::MAX))),
            action,
        });
    }
    Ok(out)
}

/// The local address the kernel would use to reach `dst` (the reference's `GetHostIPByRoute`:
/// a UDP "connect", no packet sent). Must be called on a thread inside the netns.
pub fn source_for_here(ns: &crate::InNetns<'_>, dst: Ipv4Addr) -> Result<Ipv4Addr, NetxError> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect((dst, 80)).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|source| NetxError::Netlink {
            netns: ns.path().to_path_buf(),
            op: format!("find the source address towards {dst} (UDP connect)"),
            source,
        })?;
    match sock.ip() {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(NetxError::NetlinkProtocol {
            netns: ns.path().to_path_buf(),
            op: format!("find the source address towards {dst}"),
            detail: "got an IPv6 source".to_string(),
        }),
    }
}
