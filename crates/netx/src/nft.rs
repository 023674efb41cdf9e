//! Native nftables: apply `nft -f -` text inside a network namespace (one kernel transaction,
//! atomic by nature), list rules, and snapshot/restore the tables a transaction touches.
//!
//! Also a minimal in-process nf_tables reader over `NETLINK_NETFILTER` ([`kernel_tables_here`],
//! [`kernel_chains_here`]): which tables and chains exist in the current netns. The CNI ADD path
//! uses it instead of exec'ing `nft`/`iptables-nft-save` to learn that a fresh pod netns is empty
//! (≈ 2 ms per avoided exec), and the iptables-nft rollback uses it to restore chains in place.

use std::path::Path;

use crate::NetxError;
use crate::exec::Cmd;
use crate::netns::{InNetns, with_netns};

/// An nftables table identity: (`family`, `name`), e.g. (`inet`, `istio-ambient-nat`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NftTable {
    pub family: String,
    pub name: String,
}

const FAMILIES: [&str; 6] = ["ip", "ip6", "inet", "arp", "bridge", "netdev"];
const OBJECTS: [&str; 8] = [
    "table",
    "chain",
    "rule",
    "set",
    "map",
    "element",
    "flowtable",
    "counter",
];
const VERBS: [&str; 6] = ["add", "create", "insert", "replace", "flush", "delete"];

/// Apply `text` with `nft -f -` in the current netns (all-or-nothing).
pub fn apply_here(ns: &InNetns<'_>, text: &str) -> Result<(), NetxError> {
    let mut cmd = Cmd::new("nft").arg("-f").arg("-");
    cmd.stdin = Some(text.as_bytes());
    cmd.run(ns).map(|_| ())
}

/// [`apply_here`] from any thread.
pub fn apply(netns: &Path, text: &str) -> Result<(), NetxError> {
    with_netns(netns, |ns| apply_here(ns, text))?
}

/// `nft list ruleset` in the current netns.
pub fn list_ruleset_here(ns: &InNetns<'_>) -> Result<String, NetxError> {
    Cmd::new("nft").arg("list").arg("ruleset").run(ns)
}

/// [`list_ruleset_here`] from any thread.
pub fn list_ruleset(netns: &Path) -> Result<String, NetxError> {
    with_netns(netns, list_ruleset_here)?
}

/// `nft list table FAMILY NAME`, `None` if the table does not exist.
pub fn list_table_here(ns: &InNetns<'_>, table: &NftTable) -> Result<Option<String>, NetxError> {
    let listed = Cmd::new("nft")
        .arg("list")
        .arg("table")
        .arg(table.family.clone())
        .arg(table.name.clone())
        .run(ns);
    match listed {
        Ok(text) => Ok(Some(text)),
        Err(NetxError::Command { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Tables referenced by nft text, in order of first appearance: both the command form
/// (`add table inet t`, `add rule inet t chain …`) and the block form (`table inet t {`).
/// An omitted family means `ip`, as in nft.
pub fn tables_in(text: &str) -> Vec<NftTable> {
    let mut tables: Vec<NftTable> = Vec::new();
    // Only top-level statements name tables; `chain x {` inside a `table … {` block does not.
    let mut depth: usize = 0;
    for line in text.lines() {
        let at_top = depth == 0;
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if !at_top {
            continue;
        }
        let mut words = line.split_whitespace().peekable();
        if words.peek().is_some_and(|w| VERBS.contains(w)) {
            words.next();
        }
        let Some(object) = words.next() else { continue };
        if !OBJECTS.contains(&object) {
            continue;
        }
        let (Some(first), second) = (words.next(), words.next()) else {
            continue;
        };
        let table = if FAMILIES.contains(&first) {
            match second {
                Some(name) => NftTable {
                    family: first.to_string(),
                    name: name.trim_end_matches('{').to_string(),
                },
                None => continue,
            }
        } else {
            NftTable {
                family: "ip".to_string(),
                name: first.trim_end_matches('{').to_string(),
            }
        };
        if table.name.is_empty() || table.name == "{" {
            continue;
        }
        if !tables.contains(&table) {
            tables.push(table);
        }
    }
    tables
}

/// Snapshot of some tables taken before a transaction (`None` = the table did not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSnapshot {
    pub tables: Vec<(NftTable, Option<String>)>,
}

/// Snapshot the tables that `text` touches. Tables that the kernel reports absent (netlink
/// table dump, no exec) need no `nft list table`; a fresh pod netns needs no exec at all.
pub fn snapshot_here(ns: &InNetns<'_>, text: &str) -> Result<NftSnapshot, NetxError> {
    let existing = kernel_tables_here(ns)
        .map_err(|e| tracing::debug!(error = %e, "nf_tables table dump failed; listing each table"))
        .ok();
    let mut tables = Vec::new();
    for table in tables_in(text) {
        let listing = match &existing {
            Some(existing) if !existing.contains(&table) => None,
            _ => list_table_here(ns, &table)?,
        };
        tables.push((table, listing));
    }
    Ok(NftSnapshot { tables })
}

/// The single transaction that puts the snapshotted tables back: each table is (re)created
/// empty-then-deleted (so deletion cannot fail on a missing table), then re-added from its
/// listing if it existed.
pub fn restore_text(snapshot: &NftSnapshot) -> String {
    let mut text = String::new();
    for (table, listing) in &snapshot.tables {
        text.push_str(&format!("add table {} {}\n", table.family, table.name));
        text.push_str(&format!("delete table {} {}\n", table.family, table.name));
        if let Some(listing) = listing {
            text.push_str(listing);
            if !listing.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    text
}

/// Put the snapshotted tables back (one transaction).
pub fn restore_here(ns: &InNetns<'_>, snapshot: &NftSnapshot) -> Result<(), NetxError> {
    if snapshot.tables.is_empty() {
        return Ok(());
    }
    apply_here(ns, &restore_text(snapshot))
}

/// The `table FAMILY NAME { … }` blocks of an `nft list ruleset` output, each as its lines
/// (trimmed, blank lines and `#` comments dropped, `counter packets N bytes M` → `counter`), so
/// that two listings of the same rules compare equal whatever their counters.
pub fn table_blocks(listing: &str) -> Vec<(NftTable, Vec<String>)> {
    let mut out: Vec<(NftTable, Vec<String>)> = Vec::new();
    let mut depth: usize = 0;
    for raw in listing.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if depth == 0 {
            let mut words = line.split_whitespace();
            if let (Some("table"), Some(family), Some(name)) =
                (words.next(), words.next(), words.next())
            {
                out.push((
                    NftTable {
                        family: family.to_string(),
                        name: name.to_string(),
                    },
                    Vec::new(),
                ));
            }
        } else if let Some((_, lines)) = out.last_mut()
            && !(depth == 1 && line == "}")
        {
            lines.push(normalise_counters(line));
        }
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    out
}

/// `counter packets 12 bytes 720` → `counter`.
fn normalise_counters(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        out.push(words[i]);
        if words[i] == "counter"
            && words.get(i + 1) == Some(&"packets")
            && words.get(i + 3) == Some(&"bytes")
        {
            i += 5;
        } else {
            i += 1;
        }
    }
    out.join(" ")
}

/// How the `owned` tables of `actual` (an `nft list ruleset`) differ from `desired` (the listing
/// a fresh netns shows after the capture transaction); empty when identical.
pub fn drift(desired: &str, actual: &str, owned: &[NftTable]) -> Vec<String> {
    let want = table_blocks(desired);
    let have = table_blocks(actual);
    let mut out = Vec::new();
    for table in owned {
        let w = want.iter().find(|(t, _)| t == table).map(|(_, l)| l);
        let h = have.iter().find(|(t, _)| t == table).map(|(_, l)| l);
        let id = format!("nft table {} {}", table.family, table.name);
        match (w, h) {
            (None, None) => {}
            (Some(_), None) => out.push(format!("{id} missing")),
            (None, Some(_)) => out.push(format!("unexpected {id}")),
            (Some(w), Some(h)) if w == h => {}
            (Some(w), Some(h)) => {
                let (want, have) = (chains_of(w), chains_of(h));
                for (name, lines) in &want {
                    let at = format!("{id} chain {name}");
                    let Some((_, found)) = have.iter().find(|(n, _)| n == name) else {
                        out.push(format!("{at} missing"));
                        continue;
                    };
                    let n = lines.len().max(found.len());
                    for i in 0..n {
                        match (lines.get(i), found.get(i)) {
                            (Some(a), Some(b)) if a == b => continue,
                            (Some(a), Some(b)) => {
                                out.push(if found[i + 1..].contains(a) {
                                    format!("{at}: unexpected `{b}`")
                                } else if lines[i + 1..].contains(b) {
                                    format!("{at}: `{a}` missing")
                                } else {
                                    format!("{at}: rule differs: expected `{a}`, found `{b}`")
                                });
                            }
                            (Some(a), None) => out.push(format!("{at}: `{a}` missing")),
                            (None, Some(b)) => out.push(format!("{at}: unexpected `{b}`")),
                            (None, None) => {}
                        }
                        break;
                    }
                }
                for (name, _) in &have {
                    if !want.iter().any(|(n, _)| n == name) {
                        out.push(format!("unexpected {id} chain {name}"));
                    }
                }
                if out.is_empty() {
                    // Same chains and rules, different table-level lines (sets, flags, …).
                    out.push(format!("{id} differs"));
                }
            }
        }
    }
    out
}

/// The chains of a table block (see [`table_blocks`]): name and body lines (without the
/// closing brace).
fn chains_of(lines: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut inside = false;
    for line in lines {
        if let Some(rest) = line.strip_prefix("chain ") {
            out.push((rest.trim_end_matches('{').trim().to_string(), Vec::new()));
            inside = true;
        } else if line == "}" {
            inside = false;
        } else if inside && let Some((_, body)) = out.last_mut() {
            body.push(line.clone());
        }
    }
    out
}

/// The repair transaction: every owned table is removed (`add` first, so the deletion cannot
/// fail on a missing table) and `fresh` rebuilds the ones the plan wants — one `nft -f`, so the
/// netns never shows a half-built table.
pub fn replace_text(owned: &[NftTable], fresh: &str) -> String {
    let mut text = String::new();
    for t in owned {
        text.push_str(&format!("add table {} {}\n", t.family, t.name));
        text.push_str(&format!("delete table {} {}\n", t.family, t.name));
    }
    text.push_str(fresh);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

// ----- nf_tables over netlink -------------------------------------------------------------------

/// `NETLINK_NETFILTER` socket protocol.
const NETLINK_NETFILTER: isize = 12;
/// nfnetlink subsystem id of nf_tables (`NFNL_SUBSYS_NFTABLES`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_HANDLE: u16 = 2;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// `NFPROTO_UNSPEC`: a dump of every family.
pub const NFPROTO_UNSPEC: u8 = 0;
/// `NFPROTO_IPV4` (nft family `ip`).
pub const NFPROTO_IPV4: u8 = 2;
/// `NFPROTO_IPV6` (nft family `ip6`).
pub const NFPROTO_IPV6: u8 = 10;

/// nft family keyword of an `NFPROTO_*` value.
pub fn family_name(nfproto: u8) -> Option<&'static str> {
    Some(match nfproto {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        _ => return None,
    })
}

/// One nf_tables chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NftChain {
    pub table: NftTable,
    pub name: String,
    /// A base chain (attached to a netfilter hook), e.g. iptables-nft's `OUTPUT`.
    pub base: bool,
    /// The kernel's handle (`nft delete chain ip nat handle N` needs no name quoting).
    pub handle: u64,
}

/// The bytes of an nf_tables dump request: `nlmsghdr` (type `NFNL_SUBSYS_NFTABLES << 8 | msg`,
/// flags `NLM_F_REQUEST | NLM_F_DUMP`) followed by `nfgenmsg` (family, `NFNETLINK_V0`, res_id 0).
pub fn encode_dump_request(msg: u16, family: u8, seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    let mut buf = Vec::with_capacity(len as usize);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&0u16.to_be_bytes()); // res_id (big endian, unused)
    buf
}

/// One decoded reply message of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DumpPart<'a> {
    /// An object message: (nfproto family, netlink attributes (type, payload)).
    Object(u16, u8, Vec<(u16, &'a [u8])>),
    Done,
    /// `NLMSG_ERROR` with a non-zero errno (positive).
    Error(i32),
}

/// Netlink attributes of `buf` (type with the NESTED/BYTEORDER flags masked off, payload).
fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return Err(format!("attribute of type {kind} has bad length {len}"));
        }
        out.push((kind, &buf[4..len]));
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
    }
    Ok(out)
}

/// Split one datagram into reply messages that belong to request `seq`.
fn decode_datagram(datagram: &[u8], seq: u32) -> Result<Vec<DumpPart<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(format!("message has bad length {len}"));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => parts.push(DumpPart::Done),
            NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or("truncated NLMSG_ERROR")?;
                if errno == 0 {
                    parts.push(DumpPart::Done);
                } else {
                    parts.push(DumpPart::Error(-errno));
                }
            }
            k if k >> 8 == NFNL_SUBSYS_NFTABLES => {
                if payload.len() < NFGENMSG_LEN {
                    return Err("truncated nfgenmsg".to_string());
                }
                parts.push(DumpPart::Object(
                    k & 0xff,
                    payload[0],
                    parse_attrs(&payload[NFGENMSG_LEN..])?,
                ));
            }
            _ => {}
        }
    }
    Ok(parts)
}

/// A NUL-terminated string attribute.
fn attr_str(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// Tables from the object messages of a `GETTABLE` dump.
fn tables_from(parts: &[DumpPart<'_>]) -> Vec<NftTable> {
    let mut out = Vec::new();
    for part in parts {
        if let DumpPart::Object(NFT_MSG_NEWTABLE, family, attrs) = part {
            let name = attrs.iter().find(|(k, _)| *k == NFTA_TABLE_NAME);
            if let (Some(family), Some((_, name))) = (family_name(*family), name) {
                out.push(NftTable {
                    family: family.to_string(),
                    name: attr_str(name),
                });
            }
        }
    }
    out
}

/// Chains from the object messages of a `GETCHAIN` dump.
fn chains_from(parts: &[DumpPart<'_>]) -> Vec<NftChain> {
    let mut out = Vec::new();
    for part in parts {
        if let DumpPart::Object(NFT_MSG_NEWCHAIN, family, attrs) = part {
            let get = |kind| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
            if let (Some(family), Some(table), Some(name)) = (
                family_name(*family),
                get(NFTA_CHAIN_TABLE),
                get(NFTA_CHAIN_NAME),
            ) {
                out.push(NftChain {
                    table: NftTable {
                        family: family.to_string(),
                        name: attr_str(table),
                    },
                    name: attr_str(name),
                    base: get(NFTA_CHAIN_HOOK).is_some(),
                    handle: get(NFTA_CHAIN_HANDLE)
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map_or(0, u64::from_be_bytes),
                });
            }
        }
    }
    out
}

/// A NETLINK_NETFILTER socket in the netns of the calling thread, bound and connected to the
/// kernel, with a 5 s receive timeout (the kernel always answers; a timeout turns a protocol
/// bug into an error, not a hang). Errors name `op` and the netns.
pub(crate) fn nfnetlink_socket(
    ns: &InNetns<'_>,
    op: &str,
) -> Result<netlink_sys::Socket, NetxError> {
    use netlink_sys::{Socket, SocketAddr};
    let err = |source| NetxError::Netlink {
        netns: ns.path().to_path_buf(),
        op: op.to_string(),
        source,
    };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .map_err(|e| err(e.into()))?;
    Ok(socket)
}

/// Run one nf_tables dump in the netns of the calling thread and hand every reply message to
/// `collect` (which keeps what it needs: the datagrams are not kept).
fn dump_here<T>(
    ns: &InNetns<'_>,
    op: &str,
    msg: u16,
    family: u8,
    collect: impl Fn(&[DumpPart<'_>]) -> Vec<T>,
) -> Result<Vec<T>, NetxError> {
    let err = |source| NetxError::Netlink {
        netns: ns.path().to_path_buf(),
        op: op.to_string(),
        source,
    };
    let protocol = |detail: String| NetxError::NetlinkProtocol {
        netns: ns.path().to_path_buf(),
        op: op.to_string(),
        detail,
    };
    let socket = nfnetlink_socket(ns, op)?;
    let seq = 1;
    socket
        .send(&encode_dump_request(msg, family, seq), 0)
        .map_err(err)?;
    let mut out = Vec::new();
    loop {
        let (datagram, _) = crate::netlink::recv_full(&socket).map_err(err)?;
        if datagram.is_empty() {
            return Err(protocol("empty datagram before NLMSG_DONE".to_string()));
        }
        let parts = decode_datagram(&datagram, seq).map_err(protocol)?;
        out.extend(collect(&parts));
        for part in &parts {
            match part {
                DumpPart::Done => return Ok(out),
                DumpPart::Error(errno) => {
                    return Err(err(std::io::Error::from_raw_os_error(*errno)));
                }
                DumpPart::Object(..) => {}
            }
        }
    }
}

/// Every nf_tables table in the netns of the calling thread (all families), in kernel order.
/// An error means nf_tables is not usable here (no kernel support, no permission).
pub fn kernel_tables_here(ns: &InNetns<'_>) -> Result<Vec<NftTable>, NetxError> {
    dump_here(
        ns,
        "nf_tables table dump",
        NFT_MSG_GETTABLE,
        NFPROTO_UNSPEC,
        tables_from,
    )
}

/// Every nf_tables chain of family `nfproto` ([`NFPROTO_IPV4`], …; [`NFPROTO_UNSPEC`] = all) in
/// the netns of the calling thread, in kernel order.
pub fn kernel_chains_here(ns: &InNetns<'_>, nfproto: u8) -> Result<Vec<NftChain>, NetxError> {
    dump_here(
        ns,
        "nf_tables chain dump",
        NFT_MSG_GETCHAIN,
        nfproto,
        chains_from,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(family: &str, name: &str) -> NftTable {
        NftTable {
            family: family.to_string(),
            name: name.to_string(),
        }
    }

    #[test]
    fn tables_from_command_and_block_forms() {
        let text = "add table inet istio-ambient-nat\nflush table inet istio-ambient-nat\nadd chain inet istio-ambient-nat prerouting { type nat hook prerouting priority -100 ; }\nadd rule inet istio-ambient-mangle output counter\ntable ip filter {\n\tchain input {\n\t}\n}\nadd table plain\n";
        assert_eq!(
            tables_in(text),
            vec![
                t("inet", "istio-ambient-nat"),
                t("inet", "istio-ambient-mangle"),
                t("ip", "filter"),
                t("ip", "plain"),
            ]
        );
    }

    #[test]
    fn restore_text_recreates_or_removes() {
        let snap = NftSnapshot {
            tables: vec![
                (t("inet", "a"), Some("table inet a {\n}".to_string())),
                (t("inet", "b"), None),
            ],
        };
        assert_eq!(
            restore_text(&snap),
            "add table inet a\ndelete table inet a\ntable inet a {\n}\nadd table inet b\ndelete table inet b\n"
        );
    }

    #[test]
    fn listings_compare_without_counters_and_name_the_difference() {
        let fresh = "table inet istio-proxy-nat {\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tcounter packets 0 bytes 0 jump istio-output\n\t}\n\n\tchain istio-output {\n\t\tmeta l4proto tcp counter packets 0 bytes 0 redirect to :15001\n\t}\n}\n";
        let used = fresh.replace("packets 0 bytes 0 jump", "packets 9 bytes 540 jump");
        let owned = vec![t("inet", "istio-proxy-nat"), t("inet", "istio-proxy-raw")];
        let ruleset = format!(
            "# Warning: table ip nat is managed by iptables-nft\ntable ip nat {{\n}}\n{used}"
        );
        assert_eq!(drift(fresh, &ruleset, &owned), Vec::<String>::new());
        assert_eq!(
            table_blocks(fresh)[0].1,
            vec![
                "chain output {",
                "type nat hook output priority -100; policy accept;",
                "counter jump istio-output",
                "}",
                "chain istio-output {",
                "meta l4proto tcp counter redirect to :15001",
                "}",
            ]
        );
        let flushed = fresh.replace(
            "\t\tmeta l4proto tcp counter packets 0 bytes 0 redirect to :15001\n",
            "",
        );
        assert_eq!(
            drift(fresh, &flushed, &owned),
            vec![
                "nft table inet istio-proxy-nat chain istio-output: `meta l4proto tcp counter redirect to :15001` missing"
            ]
        );
        let extra_jump = fresh.replace(
            "jump istio-output\n",
            "jump istio-output\n\t\tcounter packets 0 bytes 0 jump istio-output\n",
        );
        assert_eq!(
            drift(
                fresh,
                &extra_jump.replace("redirect to :15001", "redirect to :15002"),
                &owned
            ),
            vec![
                "nft table inet istio-proxy-nat chain output: unexpected `counter jump istio-output`",
                "nft table inet istio-proxy-nat chain istio-output: rule differs: expected `meta l4proto tcp counter redirect to :15001`, found `meta l4proto tcp counter redirect to :15002`",
            ]
        );
        let extra = format!("{fresh}table inet istio-proxy-raw {{\n}}\n");
        assert_eq!(
            drift(fresh, &extra, &owned),
            vec!["unexpected nft table inet istio-proxy-raw"]
        );
        assert_eq!(
            drift(fresh, "", &owned),
            vec!["nft table inet istio-proxy-nat missing"]
        );
        assert_eq!(
            replace_text(&owned, "add table inet istio-proxy-nat"),
            "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\nadd table inet istio-proxy-raw\ndelete table inet istio-proxy-raw\nadd table inet istio-proxy-nat\n"
        );
    }

    #[test]
    fn dump_request_bytes() {
        let buf = encode_dump_request(NFT_MSG_GETTABLE, NFPROTO_UNSPEC, 7);
        let mut want = Vec::new();
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&0x0a01u16.to_ne_bytes());
        want.extend_from_slice(&0x0301u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(buf, want);
        let chains = encode_dump_request(NFT_MSG_GETCHAIN, NFPROTO_IPV6, 1);
        assert_eq!(u16::from_ne_bytes([chains[4], chains[5]]), 0x0a04);
        assert_eq!(chains[16], 10);
    }

    /// Builds a reply message the way the kernel lays it out.
    fn reply(kind: u16, seq: u32, family: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (k, v) in attrs {
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&k.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize((body.len() + 3) & !3, 0);
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&20u32.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&2u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&[0; 8]);
        msg
    }

    #[test]
    fn table_and_chain_dumps_decode() {
        let mut dgram = reply(
            0x0a00,
            1,
            NFPROTO_IPV4,
            &[(1, b"nat\0"), (3, &[0, 0, 0, 1])],
        );
        dgram.extend(reply(0x0a00, 9, NFPROTO_IPV4, &[(1, b"other-seq\0")]));
        dgram.extend(reply(0x0a00, 1, 1, &[(1, b"istio-ambient-nat\0")]));
        dgram.extend(done(1));
        let parts = decode_datagram(&dgram, 1).expect("decode");
        assert_eq!(parts.last(), Some(&DumpPart::Done));
        assert_eq!(
            tables_from(&parts),
            vec![t("ip", "nat"), t("inet", "istio-ambient-nat")]
        );
        let hook: &[u8] = &[8, 0, 1, 0, 0, 0, 0, 3]; // nested NFTA_HOOK_HOOKNUM
        let mut dgram = reply(
            0x0a03,
            4,
            NFPROTO_IPV6,
            &[
                (1, b"nat\0"),
                (2, &7u64.to_be_bytes()),
                (3, b"OUTPUT\0"),
                (4 | 0x8000, hook),
            ],
        );
        dgram.extend(reply(
            0x0a03,
            4,
            NFPROTO_IPV6,
            &[(1, b"nat\0"), (3, b"ISTIO_OUTPUT\0")],
        ));
        let parts = decode_datagram(&dgram, 4).expect("decode");
        let chains = chains_from(&parts);
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].table, t("ip6", "nat"));
        assert_eq!((chains[0].name.as_str(), chains[0].base), ("OUTPUT", true));
        assert_eq!(chains[0].handle, 7);
        assert_eq!(
            (chains[1].name.as_str(), chains[1].base),
            ("ISTIO_OUTPUT", false)
        );
    }

    #[test]
    fn errors_and_garbage_are_reported() {
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&0u16.to_ne_bytes());
        err.extend_from_slice(&3u32.to_ne_bytes());
        err.extend_from_slice(&0u32.to_ne_bytes());
        err.extend_from_slice(&(-95i32).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(
            decode_datagram(&err, 3).expect("decode"),
            vec![DumpPart::Error(95)]
        );
        let mut bad = done(1);
        bad[0] = 200;
        assert!(decode_datagram(&bad, 1).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert_eq!(family_name(NFPROTO_IPV6), Some("ip6"));
        assert_eq!(family_name(4), None);
    }
}
