//! A small synchronous rtnetlink client: links, addresses, policy-routing rules and routes in
//! one network namespace. A netlink socket belongs to the namespace it was created in, so
//! [`Netlink::open`] creates it on a thread inside the target netns and the socket can then be
//! used from any thread.
//!
//! Every mutating call is idempotent and reports whether it changed anything: "already exists"
//! on add and "no such object" on delete are [`Change::Unchanged`], not errors. New object kinds
//! (veth, vxlan, …) are added as a message builder plus a method that calls [`Netlink::ack`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns::{InNetns, run_in_netns};
use crate::{IpFamily, NetxError};

/// Whether a mutating call changed the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The object was created / deleted.
    Applied,
    /// It already existed (add) or was already absent (delete).
    Unchanged,
}

/// `ip rule add fwmark MARK[/MASK] lookup TABLE [pref PRIORITY]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub family: IpFamily,
    pub fwmark: u32,
    pub fwmask: Option<u32>,
    pub table: u32,
    pub priority: Option<u32>,
}

/// `ip route add local default dev lo table TABLE` (or `0.0.0.0/0` / `::/0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRouteSpec {
    pub family: IpFamily,
    pub table: u32,
}

/// An address on an interface, e.g. `::6/128` on `lo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressSpec {
    pub ifname: String,
    pub addr: IpNet,
}

/// A link as seen by `ip link`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub loopback: bool,
}

/// An interface address as seen by `ip addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A policy-routing rule as listed by the kernel (only the fields this crate manages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub family: IpFamily,
    pub priority: Option<u32>,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    pub table: u32,
}

impl RuleInfo {
    /// Whether this listed rule is the one `spec` describes (any priority if `spec` has none).
    pub fn matches(&self, spec: &RuleSpec) -> bool {
        self.family == spec.family
            && self.fwmark == Some(spec.fwmark)
            && self.fwmask.unwrap_or(u32::MAX) == spec.fwmask.unwrap_or(u32::MAX)
            && self.table == spec.table
            && spec.priority.is_none_or(|p| self.priority == Some(p))
    }
}

/// A route as listed by the kernel (the fields this crate manages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub family: IpFamily,
    pub table: u32,
    pub local: bool,
    pub dst: Option<IpNet>,
    pub oif: Option<u32>,
}

/// Upper bound on waiting for a kernel reply.
const RECV_TIMEOUT_SECS: i64 = 10;

/// Kernel "table id fits in the header" limit; larger ids go in RTA_TABLE/FRA_TABLE only.
const RT_TABLE_COMPAT: u8 = 252;

fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RT_TABLE_COMPAT)
}

fn af(family: IpFamily) -> AddressFamily {
    match family {
        IpFamily::V4 => AddressFamily::Inet,
        IpFamily::V6 => AddressFamily::Inet6,
    }
}

fn family_of(af: AddressFamily) -> Option<IpFamily> {
    match af {
        AddressFamily::Inet => Some(IpFamily::V4),
        AddressFamily::Inet6 => Some(IpFamily::V6),
        _ => None,
    }
}

/// A blocking rtnetlink socket bound to one network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    netns: PathBuf,
    dumps: u64,
}

/// One whole datagram from a netlink socket (`recv_from_full`), resuming a wait that a signal
/// interrupted: our sockets carry `SO_RCVTIMEO`, and such a wait returns `EINTR` even under
/// `SA_RESTART`, or after a SIGSTOP/SIGCONT with no handler at all (signal(7)). Nothing is
/// consumed by an interrupted peek or receive, so resuming is exact.
pub(crate) fn recv_full(socket: &Socket) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    loop {
        match socket.recv_from_full() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

impl Netlink {
    /// Open a socket in the network namespace of the calling thread.
    pub fn open_here(ns: &InNetns<'_>) -> Result<Self, NetxError> {
        Self::open_current(ns.path())
    }

    /// Open a socket inside `netns` (created on a short-lived thread that entered it).
    pub fn open(netns: &Path) -> Result<Self, NetxError> {
        run_in_netns(netns, || Self::open_current(netns))?
    }

    fn open_current(label: &Path) -> Result<Self, NetxError> {
        let err = |op: &str, source| NetxError::Netlink {
            netns: label.to_path_buf(),
            op: op.to_string(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| err("socket", e))?;
        socket.bind_auto().map_err(|e| err("bind", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| err("connect", e))?;
        // The kernel always answers; a timeout turns a protocol bug into an error, not a hang.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|e| err("set receive timeout", e.into()))?;
        Ok(Netlink {
            socket,
            seq: 0,
            netns: label.to_path_buf(),
            dumps: 0,
        })
    }

    /// The netns this socket talks to (as given when opening it).
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    fn send(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, NetxError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|source| NetxError::Netlink {
                netns: self.netns.clone(),
                op: op.to_string(),
                source,
            })?;
        Ok(self.seq)
    }

    /// Receive replies to request `seq` until the ack (or DONE for dumps). Kernel errors come
    /// back as `Err(errno)` in the inner result so callers can decide what is idempotent.
    fn receive(
        &mut self,
        op: &str,
        seq: u32,
    ) -> Result<Result<Vec<RouteNetlinkMessage>, i32>, NetxError> {
        let mut out = Vec::new();
        Ok(self.receive_each(op, seq, |m| out.push(m))?.map(|()| out))
    }

    /// [`Self::receive`], handing each reply to `f` as it is parsed instead of collecting
    /// them: a dump of thousands of links or routes is never held whole in memory.
    fn receive_each(
        &mut self,
        op: &str,
        seq: u32,
        mut f: impl FnMut(RouteNetlinkMessage),
    ) -> Result<Result<(), i32>, NetxError> {
        loop {
            let (datagram, _) = recv_full(&self.socket).map_err(|source| NetxError::Netlink {
                netns: self.netns.clone(),
                op: op.to_string(),
                source,
            })?;
            let mut offset = 0;
            while offset < datagram.len() {
                let bytes = &datagram[offset..];
                let msg =
                    parse_route_message(bytes).map_err(|detail| NetxError::NetlinkProtocol {
                        netns: self.netns.clone(),
                        op: op.to_string(),
                        detail,
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NetxError::NetlinkProtocol {
                        netns: self.netns.clone(),
                        op: op.to_string(),
                        detail: "zero-length message".to_string(),
                    });
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(Ok(())),
                    NetlinkPayload::Error(e) => {
                        return Ok(match e.code {
                            None => Ok(()),
                            Some(code) => Err(-code.get()),
                        });
                    }
                    NetlinkPayload::InnerMessage(inner) => f(inner),
                    _ => {}
                }
            }
        }
    }

    /// Send a request that expects an ack. Returns the kernel's errno on a NACK.
    pub fn ack(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Result<(), i32>, NetxError> {
        let seq = self.send(op, msg, flags | NLM_F_REQUEST | NLM_F_ACK)?;
        Ok(self.receive(op, seq)?.map(|_| ()))
    }

    /// Send a request that expects replies and an ack (e.g. a `GET` of one object) and return
    /// the replies, or the kernel's errno on a NACK.
    pub fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Result<Vec<RouteNetlinkMessage>, i32>, NetxError> {
        let seq = self.send(op, msg, flags | NLM_F_REQUEST | NLM_F_ACK)?;
        self.receive(op, seq)
    }

    /// Send a dump request and collect every reply message (for modules that decode
    /// attributes this client does not model, e.g. tunnel links and gatewayed routes).
    pub fn dump(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetxError> {
        let seq = self.send(op, msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        self.dumps += 1;
        self.receive(op, seq)?
            .map_err(|errno| self.errno(op, errno))
    }

    /// Send a dump request and hand every reply message to `f` as it arrives (nothing is
    /// collected: memory stays bounded by one datagram whatever the size of the dump).
    pub fn dump_each(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        f: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetxError> {
        let seq = self.send(op, msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        self.dumps += 1;
        self.receive_each(op, seq, f)?
            .map_err(|errno| self.errno(op, errno))
    }

    /// How many dump requests this handle has sent (a cost counter for tests: an idle or
    /// per-pod path must not dump).
    pub fn dumps(&self) -> u64 {
        self.dumps
    }

    fn errno(&self, op: &str, errno: i32) -> NetxError {
        NetxError::Netlink {
            netns: self.netns.clone(),
            op: op.to_string(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Map an ack to Change: `benign` errnos mean "nothing to do".
    /// Sends one request and maps the kernel's answer: `Applied` on success, `Unchanged` for
    /// an errno in `benign` (e.g. `EEXIST` on create, `ENOENT` on delete), else an error that
    /// names `op`.
    pub fn request_change(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
        benign: &[i32],
    ) -> Result<Change, NetxError> {
        let result = self.ack(op, msg, flags)?;
        self.change(op, result, benign)
    }

    fn change(
        &self,
        op: &str,
        result: Result<(), i32>,
        benign: &[i32],
    ) -> Result<Change, NetxError> {
        match result {
            Ok(()) => Ok(Change::Applied),
            Err(errno) if benign.contains(&errno) => Ok(Change::Unchanged),
            Err(errno) => Err(self.errno(op, errno)),
        }
    }

    // ----- links -----------------------------------------------------------------------------

    /// All links.
    pub fn links(&mut self) -> Result<Vec<LinkInfo>, NetxError> {
        let mut out = Vec::new();
        self.dump_each(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            |m| {
                if let RouteNetlinkMessage::NewLink(link) = m {
                    out.push(link_info(&link));
                }
            },
        )?;
        Ok(out)
    }

    /// Index of the link called `name`, `None` if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetxError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let op = format!("get link {name}");
        // NLM_F_ACK: a plain GET gets one reply and no DONE; the ack marks the end.
        let seq = self.send(
            &op,
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_REQUEST | NLM_F_ACK,
        )?;
        match self.receive(&op, seq)? {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(errno) if errno == libc::ENODEV => Ok(None),
            Err(errno) => Err(self.errno(&op, errno)),
        }
    }

    fn require_link(&mut self, name: &str) -> Result<u32, NetxError> {
        self.link_index(name)?.ok_or_else(|| NetxError::Netlink {
            netns: self.netns.clone(),
            op: format!("get link {name}"),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    /// `ip link set NAME up`.
    pub fn set_link_up(&mut self, name: &str) -> Result<(), NetxError> {
        let index = self.require_link(name)?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        let op = format!("set link {name} up");
        let result = self.ack(&op, RouteNetlinkMessage::SetLink(msg), 0)?;
        result.map_err(|errno| self.errno(&op, errno))
    }

    // ----- namespace ids ---------------------------------------------------------------------

    /// The id this socket's netns has given the netns open at `netns_fd` (`RTM_GETNSID` with
    /// `NETNSA_FD`, like `ip netns identify` by id): the value `IFLA_LINK_NETNSID` of a link
    /// shows when its peer lives there. `None` when that netns has no id here (no link of this
    /// netns points into it). The fd is resolved in the calling process.
    pub fn netns_id(
        &mut self,
        netns_fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Option<i32>, NetxError> {
        use std::os::fd::AsRawFd;
        let fd = u32::try_from(netns_fd.as_raw_fd()).map_err(|_| NetxError::NetlinkProtocol {
            netns: self.netns.clone(),
            op: "get netns id".into(),
            detail: format!("invalid fd {}", netns_fd.as_raw_fd()),
        })?;
        let mut msg = NsidMessage::default();
        msg.attributes.push(NsidAttribute::Fd(fd));
        let op = format!("get netns id of fd {fd}");
        let replies = self
            .request(&op, RouteNetlinkMessage::GetNsId(msg), 0)?
            .map_err(|errno| self.errno(&op, errno))?;
        let id = replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) => Some(*id),
                _ => None,
            }),
            _ => None,
        });
        // NETNSA_NSID_NOT_ASSIGNED (-1): no id.
        Ok(id.filter(|id| *id >= 0))
    }

    // ----- addresses -------------------------------------------------------------------------

    /// All addresses of all links, in kernel dump order (IPv4 first, then IPv6).
    pub fn addresses(&mut self) -> Result<Vec<AddressInfo>, NetxError> {
        let replies = self.dump(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_info(&a),
                _ => None,
            })
            .collect())
    }

    fn address_message(index: u32, addr: &IpNet) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = af(IpFamily::of(&addr.addr()));
        msg.header.prefix_len = addr.prefix_len();
        msg.header.index = index;
        msg.header.scope = if addr.addr().is_loopback() {
            AddressScope::Host
        } else {
            AddressScope::Universe
        };
        if addr.addr().is_ipv6() {
            // No duplicate-address detection: the address is usable immediately (same as
            // `ip addr add … nodad`); DAD makes no sense on lo and only delays pods.
            msg.header.flags = AddressHeaderFlags::Nodad;
        }
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        msg
    }

    /// `ip addr add ADDR dev IFNAME`; an existing address is `Unchanged`.
    pub fn add_address(&mut self, spec: &AddressSpec) -> Result<Change, NetxError> {
        let index = self.require_link(&spec.ifname)?;
        let op = format!("add address {} dev {}", spec.addr, spec.ifname);
        let msg = Self::address_message(index, &spec.addr);
        let result = self.ack(
            &op,
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.change(&op, result, &[libc::EEXIST])
    }

    /// `ip addr del ADDR dev IFNAME`; an absent address (or link) is `Unchanged`.
    pub fn del_address(&mut self, spec: &AddressSpec) -> Result<Change, NetxError> {
        let Some(index) = self.link_index(&spec.ifname)? else {
            return Ok(Change::Unchanged);
        };
        let op = format!("delete address {} dev {}", spec.addr, spec.ifname);
        let msg = Self::address_message(index, &spec.addr);
        let result = self.ack(&op, RouteNetlinkMessage::DelAddress(msg), 0)?;
        self.change(&op, result, &[libc::EADDRNOTAVAIL, libc::ENOENT])
    }

    // ----- rules -----------------------------------------------------------------------------

    fn rule_message(spec: &RuleSpec) -> RuleMessage {
        let mut msg = RuleMessage::default();
        msg.header.family = af(spec.family);
        msg.header.table = header_table(spec.table);
        msg.header.action = RuleAction::ToTable;
        msg.attributes.push(RuleAttribute::Table(spec.table));
        msg.attributes.push(RuleAttribute::FwMark(spec.fwmark));
        if let Some(mask) = spec.fwmask {
            msg.attributes.push(RuleAttribute::FwMask(mask));
        }
        if let Some(priority) = spec.priority {
            msg.attributes.push(RuleAttribute::Priority(priority));
        }
        msg
    }

    fn rule_op(verb: &str, spec: &RuleSpec) -> String {
        let mut s = format!("{verb} rule ({}) fwmark {:#x}", spec.family, spec.fwmark);
        if let Some(mask) = spec.fwmask {
            s.push_str(&format!("/{mask:#x}"));
        }
        if let Some(p) = spec.priority {
            s.push_str(&format!(" pref {p}"));
        }
        s.push_str(&format!(" lookup {}", spec.table));
        s
    }

    /// `ip rule add fwmark M[/MASK] lookup T [pref P]`; an identical rule is `Unchanged`.
    pub fn add_rule(&mut self, spec: &RuleSpec) -> Result<Change, NetxError> {
        let op = Self::rule_op("add", spec);
        // Without an explicit priority the kernel picks a fresh one, so NLM_F_EXCL cannot see
        // the duplicate: look for an equal rule (any priority) first.
        if spec.priority.is_none() && self.rules(spec.family)?.iter().any(|r| r.matches(spec)) {
            return Ok(Change::Unchanged);
        }
        let result = self.ack(
            &op,
            RouteNetlinkMessage::NewRule(Self::rule_message(spec)),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.change(&op, result, &[libc::EEXIST])
    }

    /// `ip rule del …`; a missing rule is `Unchanged`.
    pub fn del_rule(&mut self, spec: &RuleSpec) -> Result<Change, NetxError> {
        let op = Self::rule_op("delete", spec);
        let result = self.ack(
            &op,
            RouteNetlinkMessage::DelRule(Self::rule_message(spec)),
            0,
        )?;
        self.change(&op, result, &[libc::ENOENT])
    }

    /// Policy-routing rules of one family.
    pub fn rules(&mut self, family: IpFamily) -> Result<Vec<RuleInfo>, NetxError> {
        let mut req = RuleMessage::default();
        req.header.family = af(family);
        let replies = self.dump(
            &format!("list rules ({family})"),
            RouteNetlinkMessage::GetRule(req),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(rule_info(family, &r)),
                _ => None,
            })
            .collect())
    }

    // ----- routes ----------------------------------------------------------------------------

    fn local_route_message(
        &mut self,
        spec: &LocalRouteSpec,
        delete: bool,
    ) -> Result<RouteMessage, NetxError> {
        let lo = self.require_link("lo")?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = af(spec.family);
        msg.header.destination_prefix_length = 0;
        msg.header.table = header_table(spec.table);
        msg.header.kind = RouteType::Local;
        if delete {
            msg.header.scope = RouteScope::NoWhere;
            msg.header.protocol = RouteProtocol::Unspec;
        } else {
            msg.header.scope = RouteScope::Host;
            msg.header.protocol = RouteProtocol::Boot;
        }
        msg.attributes.push(RouteAttribute::Table(spec.table));
        msg.attributes.push(RouteAttribute::Oif(lo));
        Ok(msg)
    }

    /// `ip route add local default dev lo table T`; an existing route is `Unchanged`.
    pub fn add_local_route(&mut self, spec: &LocalRouteSpec) -> Result<Change, NetxError> {
        let op = format!(
            "add route ({}) local default dev lo table {}",
            spec.family, spec.table
        );
        let msg = self.local_route_message(spec, false)?;
        let result = self.ack(
            &op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.change(&op, result, &[libc::EEXIST])
    }

    /// `ip route replace local default dev lo table T` (always `Applied`).
    pub fn replace_local_route(&mut self, spec: &LocalRouteSpec) -> Result<Change, NetxError> {
        let op = format!(
            "replace route ({}) local default dev lo table {}",
            spec.family, spec.table
        );
        let msg = self.local_route_message(spec, false)?;
        let result = self.ack(
            &op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        self.change(&op, result, &[])
    }

    /// `ip route del local default dev lo table T`; a missing route is `Unchanged`.
    pub fn del_local_route(&mut self, spec: &LocalRouteSpec) -> Result<Change, NetxError> {
        let op = format!(
            "delete route ({}) local default dev lo table {}",
            spec.family, spec.table
        );
        let msg = self.local_route_message(spec, true)?;
        let result = self.ack(&op, RouteNetlinkMessage::DelRoute(msg), 0)?;
        self.change(&op, result, &[libc::ESRCH, libc::ENOENT])
    }

    /// Routes of one family in `table` (all tables if `None`).
    pub fn routes(
        &mut self,
        family: IpFamily,
        table: Option<u32>,
    ) -> Result<Vec<RouteInfo>, NetxError> {
        let mut req = RouteMessage::default();
        req.header.address_family = af(family);
        let replies = self.dump(
            &format!("list routes ({family})"),
            RouteNetlinkMessage::GetRoute(req),
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(route_info(family, &r)),
                _ => None,
            })
            .filter(|r| table.is_none_or(|t| r.table == t))
            .collect())
    }
}

// ----- tolerant decoding ---------------------------------------------------------------------

/// `RTM_NEWLINK`.
const RTM_NEWLINK: u16 = 16;
/// `sizeof(struct nlmsghdr)` and `sizeof(struct ifinfomsg)`.
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
/// `NLA_TYPE_MASK`: the type without the NESTED / NET_BYTEORDER flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
const IFLA_STATS: u16 = 7;
const IFLA_STATS64: u16 = 23;
const IFLA_AF_SPEC: u16 = 26;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IFLA_INET_CONF: u16 = 1;
const IFLA_INET6_CONF: u16 = 2;
const IFLA_INET6_STATS: u16 = 3;
const IFLA_INET6_ICMP6STATS: u16 = 6;

/// The fixed-size arrays of a link message that kernels grow by appending fields, with the
/// length `netlink-packet-route` decodes (`struct rtnl_link_stats` = 24 × u32, `rtnl_link_stats64`
/// = 25 × u64, `IPV4_DEVCONF_MAX` = 33 and `DEVCONF_MAX` = 59 × s32, `__IPSTATS_MIB_MAX` = 38 and
/// `__ICMP6_MIB_MAX` = 7 × u64). The crate decodes a longer array correctly but logs a WARN per
/// attribute ("IFLA_INET6_CONF … expecting 236, got 240" on 6.x kernels: one line per link per
/// dump), which an operator can do nothing about; a shorter one it pads with zeros silently.
const LINK_STATS_LEN: usize = 96;
const LINK_STATS64_LEN: usize = 200;
const INET_DEVCONF_LEN: usize = 33 * 4;
const INET6_DEVCONF_LEN: usize = 59 * 4;
const INET6_STATS_LEN: usize = 38 * 8;
const ICMP6_STATS_LEN: usize = 7 * 8;

/// Where an attribute sits in a link message, for [`known_len`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum NlaLevel {
    Link,
    AfSpec,
    AfInet,
    AfInet6,
}

/// The decodable length of an array attribute at `level` (`None`: not a fixed array, keep).
fn known_len(level: NlaLevel, kind: u16) -> Option<usize> {
    match (level, kind) {
        (NlaLevel::Link, IFLA_STATS) => Some(LINK_STATS_LEN),
        (NlaLevel::Link, IFLA_STATS64) => Some(LINK_STATS64_LEN),
        (NlaLevel::AfInet, IFLA_INET_CONF) => Some(INET_DEVCONF_LEN),
        (NlaLevel::AfInet6, IFLA_INET6_CONF) => Some(INET6_DEVCONF_LEN),
        (NlaLevel::AfInet6, IFLA_INET6_STATS) => Some(INET6_STATS_LEN),
        (NlaLevel::AfInet6, IFLA_INET6_ICMP6STATS) => Some(ICMP6_STATS_LEN),
        _ => None,
    }
}

/// The attributes nested in an attribute of `kind` at `level`, if it is one we descend into.
fn nested_level(level: NlaLevel, kind: u16) -> Option<NlaLevel> {
    match (level, kind) {
        (NlaLevel::Link, IFLA_AF_SPEC) => Some(NlaLevel::AfSpec),
        (NlaLevel::AfSpec, AF_INET) => Some(NlaLevel::AfInet),
        (NlaLevel::AfSpec, AF_INET6) => Some(NlaLevel::AfInet6),
        _ => None,
    }
}

/// Whether any array under `attrs` (attributes at `level`) is longer than decoded. `None` on a
/// malformed attribute (the decoder then reports it).
fn needs_trim(attrs: &[u8], level: NlaLevel) -> Option<bool> {
    let mut off = 0;
    while off + 4 <= attrs.len() {
        let len = usize::from(u16::from_ne_bytes([attrs[off], attrs[off + 1]]));
        let kind = u16::from_ne_bytes([attrs[off + 2], attrs[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > attrs.len() {
            return None;
        }
        let payload = &attrs[off + 4..off + len];
        if known_len(level, kind).is_some_and(|n| payload.len() > n) {
            return Some(true);
        }
        if let Some(inner) = nested_level(level, kind)
            && needs_trim(payload, inner)?
        {
            return Some(true);
        }
        off += (len + 3) & !3;
    }
    Some(false)
}

/// Copy `attrs` (attributes at `level`) into `out`, cutting arrays to their decodable length
/// (the fields a newer kernel appended are not decoded anyway). `None` on a malformed attribute.
fn trim_attrs(attrs: &[u8], level: NlaLevel, out: &mut Vec<u8>) -> Option<()> {
    let mut off = 0;
    while off + 4 <= attrs.len() {
        let len = usize::from(u16::from_ne_bytes([attrs[off], attrs[off + 1]]));
        let raw_kind = u16::from_ne_bytes([attrs[off + 2], attrs[off + 3]]);
        let kind = raw_kind & NLA_TYPE_MASK;
        if len < 4 || off + len > attrs.len() {
            return None;
        }
        let payload = &attrs[off + 4..off + len];
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&raw_kind.to_ne_bytes());
        match (known_len(level, kind), nested_level(level, kind)) {
            (Some(n), _) if payload.len() > n => out.extend_from_slice(&payload[..n]),
            (_, Some(inner)) => trim_attrs(payload, inner, out)?,
            _ => out.extend_from_slice(payload),
        }
        let new_len = u16::try_from(out.len() - start).ok()?;
        out[start..start + 2].copy_from_slice(&new_len.to_ne_bytes());
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        off += (len + 3) & !3;
    }
    Some(())
}

/// An `RTM_NEWLINK` message with its over-long arrays cut to the decodable length, `None` when
/// there is nothing to cut (or it is not a well-formed link message: decoded as it is).
fn trim_link_message(msg: &[u8]) -> Option<Vec<u8>> {
    let len = usize::try_from(u32::from_ne_bytes(msg.get(..4)?.try_into().ok()?)).ok()?;
    let kind = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    let body_start = NLMSG_HDR_LEN + IFINFOMSG_LEN;
    if kind != RTM_NEWLINK || len < body_start || len > msg.len() {
        return None;
    }
    // Only an AF_UNSPEC link message nests per-family (inet, inet6) data in IFLA_AF_SPEC.
    if msg[NLMSG_HDR_LEN] != 0 {
        return None;
    }
    let attrs = &msg[body_start..len];
    if !needs_trim(attrs, NlaLevel::Link)? {
        return None;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&msg[..body_start]);
    trim_attrs(attrs, NlaLevel::Link, &mut out)?;
    let new_len = u32::try_from(out.len()).ok()?;
    out[..4].copy_from_slice(&new_len.to_ne_bytes());
    Some(out)
}

/// Decode one route-netlink message (the first in `bytes`). Link messages are decoded tolerant
/// of a newer kernel: arrays it extended (`IFLA_INET6_CONF`, `IFLA_STATS64`, …) are cut to the
/// fields this decoder knows before decoding, so a link dump logs nothing an operator cannot act
/// on. The reported header length stays the kernel's (callers step through a datagram by it).
pub fn parse_route_message(bytes: &[u8]) -> Result<NetlinkMessage<RouteNetlinkMessage>, String> {
    match trim_link_message(bytes) {
        Some(trimmed) => {
            let mut msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&trimmed)
                .map_err(|e| e.to_string())?;
            msg.header.length = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            Ok(msg)
        }
        None => {
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| e.to_string())
        }
    }
}

/// The identity of the network namespace a netns file (`/proc/<pid>/ns/net`, a bind mount under
/// `/run/netns`, or a symlink to either) refers to: the nsfs `(st_dev, st_ino)`. Two paths name
/// the same netns iff their identities are equal, whatever the paths look like.
pub fn netns_identity(path: &Path) -> Result<(u64, u64), NetxError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| NetxError::NetnsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((m.dev(), m.ino()))
}

fn link_info(link: &LinkMessage) -> LinkInfo {
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default();
    LinkInfo {
        index: link.header.index,
        name,
        up: link.header.flags.contains(LinkFlags::Up),
        loopback: link.header.flags.contains(LinkFlags::Loopback),
    }
}

fn address_info(a: &AddressMessage) -> Option<AddressInfo> {
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
    let local = a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(AddressInfo {
        index: a.header.index,
        addr: local.or(address)?,
        prefix_len: a.header.prefix_len,
    })
}

fn rule_info(family: IpFamily, r: &RuleMessage) -> RuleInfo {
    let mut info = RuleInfo {
        family,
        priority: None,
        fwmark: None,
        fwmask: None,
        table: u32::from(r.header.table),
    };
    for attr in &r.attributes {
        match attr {
            RuleAttribute::Priority(p) => info.priority = Some(*p),
            RuleAttribute::FwMark(m) => info.fwmark = Some(*m),
            RuleAttribute::FwMask(m) => info.fwmask = Some(*m),
            RuleAttribute::Table(t) => info.table = *t,
            _ => {}
        }
    }
    info
}

fn route_info(family: IpFamily, r: &RouteMessage) -> RouteInfo {
    let mut info = RouteInfo {
        family: family_of(r.header.address_family).unwrap_or(family),
        table: u32::from(r.header.table),
        local: r.header.kind == RouteType::Local,
        dst: None,
        oif: None,
    };
    let mut dst: Option<IpAddr> = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => info.table = *t,
            RouteAttribute::Oif(o) => info.oif = Some(*o),
            RouteAttribute::Destination(d) => {
                dst = match d {
                    netlink_packet_route::route::RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    netlink_packet_route::route::RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    let unspecified = match info.family {
        IpFamily::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    info.dst = IpNet::new(
        dst.unwrap_or(unspecified),
        r.header.destination_prefix_length,
    )
    .ok();
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn ignore_signal(_: libc::c_int) {}

    /// A signal landing on a thread that waits for the kernel's netlink answer must not fail
    /// the operation (it did: "Interrupted system call" surfaced as a netlink error).
    #[test]
    #[allow(unsafe_code)]
    fn a_signal_during_a_netlink_wait_does_not_fail_it() {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        let action = SigAction::new(
            SigHandler::Handler(ignore_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing (async-signal-safe); nothing else in this test
        // binary uses SIGUSR2.
        unsafe { sigaction(Signal::SIGUSR2, &action) }.expect("sigaction");
        // A read-only socket in this thread's netns: the request below is a GET of `lo`.
        let mut socket = Socket::new(NETLINK_ROUTE).expect("socket");
        socket.bind_auto().expect("bind");
        socket.connect(&SocketAddr::new(0, 0)).expect("connect");
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(20, 0),
        )
        .expect("SO_RCVTIMEO");
        let socket = std::sync::Arc::new(socket);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let receiver = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tid_tx.send(unsafe { libc::pthread_self() }).expect("tid");
                recv_full(&socket)
            })
        };
        let tid = tid_rx.recv().expect("tid");
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: the receiver thread lives until it has the answer to the request below.
            assert_eq!(unsafe { libc::pthread_kill(tid, libc::SIGUSR2) }, 0);
        }
        let mut link = LinkMessage::default();
        link.header.index = 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = 7;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(link)),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0).expect("send");
        let (datagram, _) = receiver
            .join()
            .expect("join")
            .expect("the wait outlives the signals");
        let reply = parse_route_message(&datagram).expect("parse");
        assert_eq!(reply.header.sequence_number, 7);
    }
}
