//! `hash:ip` ipsets (IPv4, and IPv6 through the `*_ip` functions) with per-entry comments, in
//! one network namespace.
//!
//! Set lifecycle (create / destroy / save-listing) runs the `ipset` program once per call;
//! entries are added and deleted over nfnetlink (`NFNL_SUBSYS_IPSET`) directly, so enrolling
//! a pod costs one kernel round trip instead of a fork+exec. Adds and deletes are idempotent
//! (no `NLM_F_EXCL`: the kernel treats an existing entry on add / a missing one on delete as
//! success, which is what `ipset -exist` does).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use netlink_sys::{Socket, SocketAddr};

use crate::NetxError;
use crate::exec::Cmd;
use crate::netns::{InNetns, run_in_netns};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
const IPSET_PROTOCOL: u8 = 7;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;
const IPSET_ATTR_COMMENT: u16 = 26;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
/// Kernel limit for ipset comments (`IPSET_MAX_COMMENT_SIZE`).
pub const MAX_COMMENT: usize = 255;

/// `c` cut to at most [`MAX_COMMENT`] bytes, at a character boundary (a byte cut inside a
/// multi-byte character would panic).
pub fn truncate_comment(c: &str) -> &str {
    let mut end = c.len().min(MAX_COMMENT);
    while !c.is_char_boundary(end) {
        end -= 1;
    }
    &c[..end]
}

/// One entry of a set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpsetEntry {
    pub ip: Ipv4Addr,
    pub comment: Option<String>,
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The nfnetlink message for `ipset add|del SET IP [comment C]` (public for byte tests).
pub fn entry_message(
    add: bool,
    set: &str,
    ip: Ipv4Addr,
    comment: Option<&str>,
    seq: u32,
) -> Vec<u8> {
    entry_message_ip(add, set, IpAddr::V4(ip), comment, seq)
}

/// [`entry_message`] for either family (an IPv6 address needs a `family inet6` set).
pub fn entry_message_ip(
    add: bool,
    set: &str,
    ip: IpAddr,
    comment: Option<&str>,
    seq: u32,
) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    push_attr(&mut attrs, IPSET_ATTR_SETNAME, &nul_terminated(set));
    let mut ipattr = Vec::new();
    let family = match ip {
        IpAddr::V4(a) => {
            push_attr(
                &mut ipattr,
                IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
                &a.octets(),
            );
            libc::AF_INET as u8
        }
        IpAddr::V6(a) => {
            push_attr(
                &mut ipattr,
                IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
                &a.octets(),
            );
            libc::AF_INET6 as u8
        }
    };
    let mut data = Vec::new();
    push_attr(&mut data, IPSET_ATTR_IP | NLA_F_NESTED, &ipattr);
    if let Some(c) = comment {
        push_attr(&mut data, IPSET_ATTR_COMMENT, &nul_terminated(c));
    }
    push_attr(&mut attrs, IPSET_ATTR_DATA | NLA_F_NESTED, &data);

    let cmd = if add { IPSET_CMD_ADD } else { IPSET_CMD_DEL };
    let total = 16 + 4 + attrs.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | cmd).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET/AF_INET6, version NFNETLINK_V0, res_id 0 (big endian)
    msg.push(family);
    msg.push(0);
    msg.extend_from_slice(&0u16.to_be_bytes());
    msg.extend_from_slice(&attrs);
    msg
}

/// An nfnetlink socket for ipset entry changes, bound to one netns.
#[derive(Debug)]
pub struct IpsetNl {
    socket: Socket,
    seq: u32,
    netns: PathBuf,
}

impl IpsetNl {
    /// Open the socket inside `netns`.
    pub fn open(netns: &Path) -> Result<IpsetNl, NetxError> {
        run_in_netns(netns, || Self::open_current(netns))?
    }

    fn open_current(netns: &Path) -> Result<IpsetNl, NetxError> {
        let err = |op: &str, source| NetxError::Netlink {
            netns: netns.to_path_buf(),
            op: format!("ipset {op}"),
            source,
        };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| err("socket", e))?;
        socket.bind_auto().map_err(|e| err("bind", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| err("connect", e))?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(10, 0),
        )
        .map_err(|e| err("set receive timeout", e.into()))?;
        Ok(IpsetNl {
            socket,
            seq: 0,
            netns: netns.to_path_buf(),
        })
    }

    fn request(
        &mut self,
        op: String,
        add: bool,
        set: &str,
        ip: IpAddr,
        comment: Option<&str>,
    ) -> Result<(), NetxError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = entry_message_ip(add, set, ip, comment, self.seq);
        let io = |source| NetxError::Netlink {
            netns: self.netns.clone(),
            op: op.clone(),
            source,
        };
        self.socket.send(&msg, 0).map_err(io)?;
        loop {
            let (buf, _) = crate::netlink::recv_full(&self.socket).map_err(io)?;
            let mut off = 0;
            while off + 16 <= buf.len() {
                let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                    as usize;
                let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq =
                    u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
                if len < 16 || off + len > buf.len() {
                    return Err(NetxError::NetlinkProtocol {
                        netns: self.netns.clone(),
                        op,
                        detail: format!("malformed reply of {} bytes", buf.len()),
                    });
                }
                if kind == NLMSG_ERROR && seq == self.seq && len >= 20 {
                    let code = i32::from_ne_bytes([
                        buf[off + 16],
                        buf[off + 17],
                        buf[off + 18],
                        buf[off + 19],
                    ]);
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(NetxError::Netlink {
                        netns: self.netns.clone(),
                        op: format!("{op} ({})", ipset_error(-code)),
                        source: std::io::Error::from_raw_os_error(-code),
                    });
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// `ipset add -exist SET IP comment "C"`.
    pub fn add(&mut self, set: &str, ip: Ipv4Addr, comment: Option<&str>) -> Result<(), NetxError> {
        self.add_ip(set, IpAddr::V4(ip), comment)
    }

    /// `ipset del -exist SET IP`.
    pub fn del(&mut self, set: &str, ip: Ipv4Addr) -> Result<(), NetxError> {
        self.del_ip(set, IpAddr::V4(ip))
    }

    /// [`IpsetNl::add`] for either family; an existing entry gets the new comment.
    pub fn add_ip(
        &mut self,
        set: &str,
        ip: IpAddr,
        comment: Option<&str>,
    ) -> Result<(), NetxError> {
        let comment = comment.map(truncate_comment);
        self.request(format!("ipset add {set} {ip}"), true, set, ip, comment)
    }

    /// [`IpsetNl::del`] for either family.
    pub fn del_ip(&mut self, set: &str, ip: IpAddr) -> Result<(), NetxError> {
        self.request(format!("ipset del {set} {ip}"), false, set, ip, None)
    }
}

/// ipset's private error codes (`IPSET_ERR_*`) in words.
fn ipset_error(code: i32) -> &'static str {
    match code {
        4097 => "protocol error",
        4098 => "set does not exist",
        4099 => "set exists with different type",
        4100 => "set exists with different parameters",
        4101 => "element already exists",
        4102 => "element does not exist",
        4107 => "set is full",
        c if c == libc::ENOENT => "set does not exist",
        c if c == libc::ENOMSG => "malformed request",
        _ => "kernel refused",
    }
}

/// `ipset create -exist NAME hash:ip comment` here.
pub fn create_here(ns: &InNetns<'_>, name: &str) -> Result<(), NetxError> {
    Cmd::new("ipset")
        .arg("create")
        .arg("-exist")
        .arg(name)
        .arg("hash:ip")
        .arg("comment")
        .run(ns)
        .map(|_| ())
}

/// `ipset create -exist NAME hash:ip family inet|inet6 comment` here.
pub fn create_family_here(
    ns: &InNetns<'_>,
    name: &str,
    family: crate::IpFamily,
) -> Result<(), NetxError> {
    Cmd::new("ipset")
        .arg("create")
        .arg("-exist")
        .arg(name)
        .arg("hash:ip")
        .arg("family")
        .arg(match family {
            crate::IpFamily::V4 => "inet",
            crate::IpFamily::V6 => "inet6",
        })
        .arg("comment")
        .run(ns)
        .map(|_| ())
}

/// The entries of set `name` (either family) here, `None` if the set does not exist.
pub fn list_ip_here(ns: &InNetns<'_>, name: &str) -> Result<Option<Vec<IpsetIpEntry>>, NetxError> {
    match Cmd::new("ipset").arg("save").arg(name).run(ns) {
        Ok(text) => Ok(Some(parse_save_ip(&text, name))),
        Err(NetxError::Command { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

/// One entry of a set of either family: address and comment.
pub type IpsetIpEntry = (IpAddr, Option<String>);

/// [`parse_save`] for either family.
pub fn parse_save_ip(text: &str, name: &str) -> Vec<IpsetIpEntry> {
    let prefix = format!("add {name} ");
    let mut out: Vec<IpsetIpEntry> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (ip, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let ip: IpAddr = ip.parse().ok()?;
            let comment = tail
                .split_once("comment \"")
                .and_then(|(_, c)| c.rsplit_once('"'))
                .map(|(c, _)| c.to_string());
            Some((ip, comment))
        })
        .collect();
    out.sort();
    out
}

/// `ipset destroy NAME` here; an absent set is fine. Returns whether it existed.
pub fn destroy_here(ns: &InNetns<'_>, name: &str) -> Result<bool, NetxError> {
    if list_here(ns, name)?.is_none() {
        return Ok(false);
    }
    Cmd::new("ipset")
        .arg("destroy")
        .arg(name)
        .run(ns)
        .map(|_| true)
}

/// The entries of set `name` here (`ipset save NAME`), `None` if the set does not exist.
pub fn list_here(ns: &InNetns<'_>, name: &str) -> Result<Option<Vec<IpsetEntry>>, NetxError> {
    match Cmd::new("ipset").arg("save").arg(name).run(ns) {
        Ok(text) => Ok(Some(parse_save(&text, name))),
        Err(NetxError::Command { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Names of every set here (`ipset list -n`).
pub fn names_here(ns: &InNetns<'_>) -> Result<Vec<String>, NetxError> {
    let text = Cmd::new("ipset").arg("list").arg("-n").run(ns)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Parse `ipset save` output: `add NAME IP [comment "C"]` lines of set `name`.
pub fn parse_save(text: &str, name: &str) -> Vec<IpsetEntry> {
    let prefix = format!("add {name} ");
    let mut out: Vec<IpsetEntry> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (ip, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let ip: Ipv4Addr = ip.parse().ok()?;
            let comment = tail
                .split_once("comment \"")
                .and_then(|(_, c)| c.rsplit_once('"'))
                .map(|(c, _)| c.to_string());
            Some(IpsetEntry { ip, comment })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_cut_at_a_char_boundary() {
        // 254 ASCII bytes + a 2-byte char straddling the 255-byte limit: no panic, the char
        // is dropped whole.
        let long = format!("{}é", "a".repeat(254));
        assert_eq!(truncate_comment(&long), "a".repeat(254));
        let exact = "b".repeat(MAX_COMMENT + 10);
        assert_eq!(truncate_comment(&exact).len(), MAX_COMMENT);
        assert_eq!(truncate_comment("uid-1"), "uid-1");
        assert_eq!(truncate_comment(&"é".repeat(200)).len(), 254);
    }

    #[test]
    fn save_output_is_parsed_with_comments() {
        let text = "create ztunnel-pods-ips hash:ip family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1\nadd ztunnel-pods-ips 10.0.0.11 comment \"uid-b\"\nadd ztunnel-pods-ips 10.0.0.10 comment \"uid-a\"\nadd ztunnel-pods-ips 10.0.0.12\nadd other 10.0.0.1\n";
        let e = parse_save(text, "ztunnel-pods-ips");
        assert_eq!(
            e,
            vec![
                IpsetEntry {
                    ip: "10.0.0.10".parse().expect("ip"),
                    comment: Some("uid-a".into())
                },
                IpsetEntry {
                    ip: "10.0.0.11".parse().expect("ip"),
                    comment: Some("uid-b".into())
                },
                IpsetEntry {
                    ip: "10.0.0.12".parse().expect("ip"),
                    comment: None
                },
            ]
        );
    }

    #[test]
    fn add_message_layout() {
        let m = entry_message(true, "s", Ipv4Addr::new(10, 0, 0, 1), Some("u"), 7);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (6 << 8) | 9);
        assert_eq!(m[16], libc::AF_INET as u8);
        // protocol attr right after nfgenmsg: len 5, type 1, value 7
        assert_eq!(&m[20..25], &[5, 0, 1, 0, 7]);
        // the IPv4 address appears in network order inside the nested data
        let ip_pos = m
            .windows(4)
            .position(|w| w == [10, 0, 0, 1])
            .expect("ip bytes");
        assert_eq!(
            u16::from_ne_bytes([m[ip_pos - 2], m[ip_pos - 1]]),
            1 | 0x4000
        );
        assert!(m.ends_with(&[26, 0, b'u', 0, 0, 0]));
    }

    #[test]
    fn ipv6_entries_are_encoded_and_parsed() {
        let ip: std::net::Ipv6Addr = "fd77::2".parse().expect("v6");
        let m = entry_message_ip(false, "s6", IpAddr::V6(ip), None, 3);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (6 << 8) | 10);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        let pos = m
            .windows(16)
            .position(|w| w == ip.octets())
            .expect("ip bytes");
        // IPSET_ATTR_IPADDR_IPV6 (2), network byte order flag.
        assert_eq!(u16::from_ne_bytes([m[pos - 2], m[pos - 1]]), 2 | 0x4000);
        assert_eq!(u16::from_ne_bytes([m[pos - 4], m[pos - 3]]), 20);
        let text = "create p6 hash:ip family inet6 hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1\nadd p6 fd77::2 comment \"uid-1\"\nadd p6 fd77::3\n";
        assert_eq!(
            parse_save_ip(text, "p6"),
            vec![
                (IpAddr::V6(ip), Some("uid-1".to_string())),
                ("fd77::3".parse().expect("v6"), None),
            ]
        );
    }
}
