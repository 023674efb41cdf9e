//! The iptables-nft flavor without a process: the kernel objects `iptables-nft-restore` (v1.8.9)
//! creates for a rule set, written directly over nf_tables netlink, and read back the same way
//! for verify-or-repair.
//!
//! What iptables-nft creates (found empirically: the golden restore texts applied with
//! `iptables-nft-restore`/`ip6tables-nft-restore` and the netns dumped over netlink; the
//! equivalence is proven by `tests/inpod_nft_netlink.rs` for every in-pod golden case):
//! * tables `ip|ip6 mangle|nat|raw`, no flags;
//! * custom chains (`-N`) as regular chains, created before the table's rules;
//! * a built-in chain only when a rule is first added to it, as a base chain with iptables'
//!   hook, priority, type (`filter`, `route` for mangle OUTPUT, `nat`) and policy accept;
//! * per rule, in this order: in/out interface (`meta iifname|oifname` + `cmp`, a trailing `+`
//!   is a prefix), protocol (`meta l4proto` + `cmp`), source, destination (`payload` + `cmp`),
//!   then each match in command-line order, a `counter`, and the target. Native translations:
//!   `-m mark` (`meta mark`, `bitwise`, `cmp`), `tcp`/`udp` port matches (`payload` of the
//!   transport header + `cmp`; both single ports with the same negation in one 4-byte load);
//!   a `tcp`/`udp` match without ports stays an xt `match` (rev 0), like `connmark` (rev 1);
//!   `REDIRECT` (rev 0), `CONNMARK` (rev 2) and `CT` (rev 2) are xt `target`s with the
//!   extension's struct bytes; ACCEPT/RETURN/jumps are `immediate` verdicts. Every rule carries
//!   `NFTA_RULE_COMPAT` (protocol, inversion flag), no user data (the rules have no comments).
//!
//! Anything of a rule set outside that (other matches or targets, inserts at a position,
//! partial prefixes, other tables) makes [`Plan::new`] report it as unsupported and the caller
//! keeps the `iptables-nft-restore` path; so does a kernel without the xt revisions used
//! ([`compat_supported_here`]).
//!
//! Verify-or-repair mirrors [`crate::iptables_state`] (same ownership, same result), per table:
//! identical → nothing is sent; otherwise our custom chains are created or flushed and refilled,
//! our rules in built-in chains (identical to a planned one, or jumping to one of our chains)
//! are deleted by handle and re-added, stale chains of ours are deleted — all tables and both
//! families in **one** nf_tables batch, guarded by the ruleset generation the state was read
//! at. The kernel commits a batch entirely or not at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use meshcni_rules::iptables::write_spec;
use meshcni_rules::model::{Chain, Family, Match, Position, Proto, Rule, Table, Target};
use meshcni_rules::sidecar::RuleSet;

use crate::NetxError;
use crate::netns::InNetns;

// ----- netlink constants ---------------------------------------------------------------------

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_SUBSYS_NFT_COMPAT: u16 = 11;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_BATCH_GENID: u16 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_GETGEN: u16 = 16;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_RULE_COMPAT_PROTO: u16 = 1;
const NFTA_RULE_COMPAT_FLAGS: u16 = 2;
const NFT_RULE_COMPAT_F_INV: u32 = 1 << 1;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_GEN_ID: u16 = 1;
const NFTA_COMPAT_NAME: u16 = 1;
const NFTA_COMPAT_REV: u16 = 2;
const NFTA_COMPAT_TYPE: u16 = 3;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;
const ERESTART: i32 = 85;

/// The xtables tables iptables-nft-save shows (tables of interest are looked for among them).
const XT_TABLES: [&str; 5] = ["filter", "mangle", "raw", "security", "nat"];

// ----- expressions ---------------------------------------------------------------------------

/// An nf_tables verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    Other(i32),
}

/// One nf_tables expression, as far as iptables-nft's in-pod rules use them. Read back from
/// the kernel, anything else is [`Expr::Other`] (never equal to a planned expression).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    /// Counter values are never compared.
    Counter,
    Immediate {
        dreg: u32,
        verdict: Verdict,
    },
    Match {
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    Target {
        name: String,
        rev: u32,
        info: Vec<u8>,
    },
    Other(String),
}

// ----- attribute writer ----------------------------------------------------------------------

fn put(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize((buf.len() + 3) & !3, 0);
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut data = s.as_bytes().to_vec();
    data.push(0);
    put(buf, kind, &data);
}

fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put(buf, kind, &v.to_be_bytes());
}

fn nest(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn put_data(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    nest(buf, kind, |b| put(b, NFTA_DATA_VALUE, value));
}

impl Expr {
    /// The `NFTA_LIST_ELEM` of this expression, attributes as libnftnl writes them.
    fn encode(&self, buf: &mut Vec<u8>) {
        let (name, body): (&str, Vec<u8>) = match self {
            Expr::Meta { key, dreg } => {
                let mut b = Vec::new();
                put_u32(&mut b, 2, *key); // NFTA_META_KEY
                put_u32(&mut b, 1, *dreg); // NFTA_META_DREG
                ("meta", b)
            }
            Expr::Cmp { sreg, op, data } => {
                let mut b = Vec::new();
                put_u32(&mut b, 1, *sreg);
                put_u32(&mut b, 2, *op);
                put_data(&mut b, 3, data);
                ("cmp", b)
            }
            Expr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
            } => {
                let mut b = Vec::new();
                put_u32(&mut b, 1, *sreg);
                put_u32(&mut b, 2, *dreg);
                put_u32(&mut b, 3, *len);
                put_data(&mut b, 4, mask);
                put_data(&mut b, 5, xor);
                ("bitwise", b)
            }
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => {
                let mut b = Vec::new();
                put_u32(&mut b, 1, *dreg);
                put_u32(&mut b, 2, *base);
                put_u32(&mut b, 3, *offset);
                put_u32(&mut b, 4, *len);
                ("payload", b)
            }
            Expr::Counter => {
                let mut b = Vec::new();
                put(&mut b, 1, &0u64.to_be_bytes()); // NFTA_COUNTER_BYTES
                put(&mut b, 2, &0u64.to_be_bytes()); // NFTA_COUNTER_PACKETS
                ("counter", b)
            }
            Expr::Immediate { dreg, verdict } => {
                let mut b = Vec::new();
                put_u32(&mut b, 1, *dreg);
                nest(&mut b, 2, |d| {
                    nest(d, NFTA_DATA_VERDICT, |v| {
                        let (code, chain) = verdict.parts();
                        put(v, NFTA_VERDICT_CODE, &code.to_be_bytes());
                        if let Some(chain) = chain {
                            put_str(v, NFTA_VERDICT_CHAIN, chain);
                        }
                    })
                });
                ("immediate", b)
            }
            Expr::Match { name, rev, info } | Expr::Target { name, rev, info } => {
                let mut b = Vec::new();
                put_str(&mut b, 1, name);
                put_u32(&mut b, 2, *rev);
                put(&mut b, 3, info);
                (
                    if matches!(self, Expr::Match { .. }) {
                        "match"
                    } else {
                        "target"
                    },
                    b,
                )
            }
            Expr::Other(name) => (name.as_str(), Vec::new()),
        };
        nest(buf, NFTA_LIST_ELEM, |e| {
            put_str(e, NFTA_EXPR_NAME, name);
            nest(e, NFTA_EXPR_DATA, |d| d.extend_from_slice(&body));
        });
    }

    /// Decode one `NFTA_LIST_ELEM` payload of a rule dump.
    fn decode(elem: &[u8]) -> Result<Expr, String> {
        let attrs = parse_attrs(elem)?;
        let name = attrs
            .iter()
            .find(|(k, _)| *k == NFTA_EXPR_NAME)
            .map(|(_, v)| attr_str(v))
            .ok_or("expression without a name")?;
        let data = attrs
            .iter()
            .find(|(k, _)| *k == NFTA_EXPR_DATA)
            .map_or(&[][..], |(_, v)| *v);
        let a = parse_attrs(data)?;
        let get = |k: u16| a.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
        let u32_of = |k: u16| get(k).and_then(be_u32);
        let value_of = |k: u16| -> Option<Vec<u8>> {
            let nested = parse_attrs(get(k)?).ok()?;
            nested
                .iter()
                .find(|(t, _)| *t == NFTA_DATA_VALUE)
                .map(|(_, v)| v.to_vec())
        };
        let known = |allowed: &[u16]| a.iter().all(|(k, _)| allowed.contains(k));
        let other = || Expr::Other(name.clone());
        Ok(match name.as_str() {
            "meta" if known(&[1, 2]) => match (u32_of(2), u32_of(1)) {
                (Some(key), Some(dreg)) => Expr::Meta { key, dreg },
                _ => other(),
            },
            "cmp" if known(&[1, 2, 3]) => match (u32_of(1), u32_of(2), value_of(3)) {
                (Some(sreg), Some(op), Some(data)) => Expr::Cmp { sreg, op, data },
                _ => other(),
            },
            // NFTA_BITWISE_OP (6) is dumped by newer kernels; 0 is the mask-and-xor form.
            "bitwise" if known(&[1, 2, 3, 4, 5, 6]) && u32_of(6).unwrap_or(0) == 0 => {
                match (u32_of(1), u32_of(2), u32_of(3), value_of(4), value_of(5)) {
                    (Some(sreg), Some(dreg), Some(len), Some(mask), Some(xor)) => Expr::Bitwise {
                        sreg,
                        dreg,
                        len,
                        mask,
                        xor,
                    },
                    _ => other(),
                }
            }
            "payload" if known(&[1, 2, 3, 4]) => {
                match (u32_of(1), u32_of(2), u32_of(3), u32_of(4)) {
                    (Some(dreg), Some(base), Some(offset), Some(len)) => Expr::Payload {
                        dreg,
                        base,
                        offset,
                        len,
                    },
                    _ => other(),
                }
            }
            // Values and the 64-bit padding attribute are not compared.
            "counter" => Expr::Counter,
            "immediate" if known(&[1, 2]) => {
                let verdict = get(2)
                    .and_then(|d| parse_attrs(d).ok())
                    .and_then(|d| {
                        d.iter()
                            .find(|(k, _)| *k == NFTA_DATA_VERDICT)
                            .map(|(_, v)| *v)
                    })
                    .and_then(|v| parse_attrs(v).ok())
                    .and_then(|v| {
                        let code =
                            v.iter()
                                .find(|(k, _)| *k == NFTA_VERDICT_CODE)
                                .and_then(|(_, c)| be_u32(c))? as i32;
                        let chain = v
                            .iter()
                            .find(|(k, _)| *k == NFTA_VERDICT_CHAIN)
                            .map(|(_, c)| attr_str(c));
                        Some(Verdict::from_parts(code, chain))
                    });
                match (u32_of(1), verdict) {
                    (Some(dreg), Some(verdict)) => Expr::Immediate { dreg, verdict },
                    _ => other(),
                }
            }
            "match" | "target" if known(&[1, 2, 3]) => {
                match (get(1).map(attr_str), u32_of(2), get(3)) {
                    (Some(n), Some(rev), Some(info)) => {
                        let info = info.to_vec();
                        if name == "match" {
                            Expr::Match { name: n, rev, info }
                        } else {
                            Expr::Target { name: n, rev, info }
                        }
                    }
                    _ => other(),
                }
            }
            _ => other(),
        })
    }
}

impl Verdict {
    fn parts(&self) -> (i32, Option<&str>) {
        match self {
            Verdict::Accept => (NF_ACCEPT, None),
            Verdict::Drop => (NF_DROP, None),
            Verdict::Return => (NFT_RETURN, None),
            Verdict::Jump(c) => (NFT_JUMP, Some(c)),
            Verdict::Goto(c) => (NFT_GOTO, Some(c)),
            Verdict::Other(code) => (*code, None),
        }
    }

    fn from_parts(code: i32, chain: Option<String>) -> Verdict {
        match (code, chain) {
            (NF_ACCEPT, None) => Verdict::Accept,
            (NF_DROP, None) => Verdict::Drop,
            (NFT_RETURN, None) => Verdict::Return,
            (NFT_JUMP, Some(c)) => Verdict::Jump(c),
            (NFT_GOTO, Some(c)) => Verdict::Goto(c),
            (code, _) => Verdict::Other(code),
        }
    }
}

fn be_u32(v: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes)
}

/// Netlink attributes (type with the NESTED/BYTEORDER flags masked off, payload).
fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return Err(format!("attribute of type {kind} has bad length {len}"));
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

fn attr_str(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

// ----- rule translation ----------------------------------------------------------------------

/// One rule as iptables-nft writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlRule {
    pub chain: String,
    pub exprs: Vec<Expr>,
    /// `NFTA_RULE_COMPAT`: the `-p` protocol number (0: none) and its inversion.
    pub compat_proto: u32,
    pub compat_inv: bool,
    /// The rule's iptables text (`-A CHAIN …`), for messages.
    pub text: String,
}

fn meta(key: u32) -> Expr {
    Expr::Meta {
        key,
        dreg: NFT_REG_1,
    }
}

fn cmp(op: u32, data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: NFT_REG_1,
        op,
        data,
    }
}

fn op_of(negate: bool) -> u32 {
    if negate { NFT_CMP_NEQ } else { NFT_CMP_EQ }
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

/// `-i|-o NAME` (iptables `add_iniface`/`add_outiface`): the name with its NUL, or up to a
/// trailing `+` (a lone `+` only loads the name).
fn iface(out: &mut Vec<Expr>, key: u32, name: &str, negate: bool) {
    out.push(meta(key));
    if let Some(prefix) = name.strip_suffix('+') {
        if !prefix.is_empty() {
            out.push(cmp(op_of(negate), prefix.as_bytes().to_vec()));
        }
    } else {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        out.push(cmp(op_of(negate), data));
    }
}

/// A port module (`tcp`/`udp` match) being assembled: ports as iptables stores them.
#[derive(Debug, Clone, Copy)]
struct PortModule {
    proto: Proto,
    sport: Option<(u16, bool)>,
    dport: Option<(u16, bool)>,
}

impl PortModule {
    /// iptables-nft 1.8.9: a module with no ports stays an xt match; ports become payload
    /// matches (both single ports with the same inversion in one 4-byte load).
    fn exprs(&self) -> Vec<Expr> {
        match (self.sport, self.dport) {
            (None, None) => {
                // struct xt_tcp { u16 spts[2], dpts[2]; u8 option, flg_mask, flg_cmp, invflags }
                // / struct xt_udp { u16 spts[2], dpts[2]; u8 invflags }, XT_ALIGN'ed to 16.
                let mut info = Vec::with_capacity(16);
                for v in [0u16, 0xffff, 0, 0xffff] {
                    info.extend_from_slice(&v.to_ne_bytes());
                }
                info.resize(16, 0);
                vec![Expr::Match {
                    name: self.proto.name().to_string(),
                    rev: 0,
                    info,
                }]
            }
            (Some((s, si)), Some((d, di))) if s != 0 && d != 0 && si == di => {
                let combined = u32::from(d) | (u32::from(s) << 16);
                vec![
                    Expr::Payload {
                        dreg: NFT_REG_1,
                        base: NFT_PAYLOAD_TRANSPORT_HEADER,
                        offset: 0,
                        len: 4,
                    },
                    cmp(op_of(si), combined.to_be_bytes().to_vec()),
                ]
            }
            (s, d) => {
                let mut out = Vec::new();
                for (port, offset) in [(s, 0), (d, 2)] {
                    if let Some((p, negate)) = port {
                        out.push(Expr::Payload {
                            dreg: NFT_REG_1,
                            base: NFT_PAYLOAD_TRANSPORT_HEADER,
                            offset,
                            len: 2,
                        });
                        out.push(cmp(op_of(negate), p.to_be_bytes().to_vec()));
                    }
                }
                out
            }
        }
    }
}

/// The expressions of one matches-section item, in iptables' order.
enum Item {
    Exprs(Vec<Expr>),
    /// Index into the port modules.
    Ports(usize),
}

/// Translate one rule of `family` the way iptables-nft 1.8.9 does, or say what is not
/// supported here.
pub fn translate(rule: &Rule, family: Family) -> Result<NlRule, String> {
    if rule.position != Position::Append {
        return Err("rules inserted at a position".to_string());
    }
    let mut text = format!("-A {} ", rule.chain.iptables_name());
    write_spec(&mut text, rule);
    let unsupported = |what: &str| Err(format!("{what} (in `{text}`)"));
    let proto = rule.protocol();
    // The ip header part (iptables' struct ipt_ip), emitted first.
    let mut in_iface: Option<(&str, bool)> = None;
    let mut out_iface: Option<(&str, bool)> = None;
    let mut src: Option<(&meshcni_rules::model::Cidr, bool)> = None;
    let mut dst: Option<(&meshcni_rules::model::Cidr, bool)> = None;
    let mut items: Vec<Item> = Vec::new();
    let mut modules: Vec<PortModule> = Vec::new();
    let mut current: Option<usize> = None;
    for m in &rule.matches {
        match m {
            Match::Protocol(_) => {}
            Match::InInterface(i) => in_iface = Some((i, false)),
            Match::OutInterface(i) => out_iface = Some((i, false)),
            Match::NotOutInterface(i) => out_iface = Some((i, true)),
            Match::Source { cidr, negate } => src = Some((cidr, *negate)),
            Match::Destination { cidr, negate } => dst = Some((cidr, *negate)),
            Match::ProtoModule => {
                if current.is_some() {
                    return unsupported("a second tcp/udp module");
                }
                let Some(p) = proto else {
                    return unsupported("a tcp/udp module without -p");
                };
                modules.push(PortModule {
                    proto: p,
                    sport: None,
                    dport: None,
                });
                current = Some(modules.len() - 1);
                items.push(Item::Ports(modules.len() - 1));
            }
            Match::DestPort { port, negate } | Match::SourcePort { port, negate } => {
                let Some(p) = proto else {
                    return unsupported("a port match without -p");
                };
                let idx = match current {
                    Some(i) => i,
                    None => {
                        // iptables loads the protocol's module implicitly, here.
                        modules.push(PortModule {
                            proto: p,
                            sport: None,
                            dport: None,
                        });
                        items.push(Item::Ports(modules.len() - 1));
                        current = Some(modules.len() - 1);
                        modules.len() - 1
                    }
                };
                let slot = if matches!(m, Match::DestPort { .. }) {
                    &mut modules[idx].dport
                } else {
                    &mut modules[idx].sport
                };
                if slot.is_some() {
                    return unsupported("the same port option twice");
                }
                *slot = Some((*port, *negate));
            }
            Match::MarkMasked { mark, mask, negate } => {
                let mut e = vec![meta(NFT_META_MARK)];
                if *mask != u32::MAX {
                    e.push(Expr::Bitwise {
                        sreg: NFT_REG_1,
                        dreg: NFT_REG_1,
                        len: 4,
                        mask: mask.to_ne_bytes().to_vec(),
                        xor: vec![0; 4],
                    });
                }
                e.push(cmp(op_of(*negate), mark.to_ne_bytes().to_vec()));
                items.push(Item::Exprs(e));
            }
            Match::ConnMarkMasked { mark, mask } => {
                // struct xt_connmark_mtinfo1 { u32 mark, mask; u8 invert; } (16 bytes)
                let mut info = Vec::with_capacity(16);
                info.extend_from_slice(&mark.to_ne_bytes());
                info.extend_from_slice(&mask.to_ne_bytes());
                info.resize(16, 0);
                items.push(Item::Exprs(vec![Expr::Match {
                    name: "connmark".to_string(),
                    rev: 1,
                    info,
                }]));
            }
            _ => return unsupported("a match the netlink writer does not cover"),
        }
    }
    let mut exprs = Vec::new();
    if let Some((i, negate)) = in_iface {
        iface(&mut exprs, NFT_META_IIFNAME, i, negate);
    }
    if let Some((i, negate)) = out_iface {
        iface(&mut exprs, NFT_META_OIFNAME, i, negate);
    }
    if let Some(p) = proto {
        exprs.push(meta(NFT_META_L4PROTO));
        exprs.push(cmp(NFT_CMP_EQ, vec![proto_number(p)]));
    }
    for (addr, is_src) in [(src, true), (dst, false)] {
        let Some((cidr, negate)) = addr else { continue };
        let net = cidr.net();
        let (bytes, offset): (Vec<u8>, u32) = match (net.addr(), family) {
            (IpAddr::V4(a), Family::V4) => (a.octets().to_vec(), if is_src { 12 } else { 16 }),
            (IpAddr::V6(a), Family::V6) => (a.octets().to_vec(), if is_src { 8 } else { 24 }),
            _ => return unsupported("an address of the other family"),
        };
        if usize::from(net.prefix_len()) != bytes.len() * 8 {
            return unsupported("a prefix shorter than a host address");
        }
        exprs.push(Expr::Payload {
            dreg: NFT_REG_1,
            base: NFT_PAYLOAD_NETWORK_HEADER,
            offset,
            len: bytes.len() as u32,
        });
        exprs.push(cmp(op_of(negate), bytes));
    }
    for item in items {
        match item {
            Item::Exprs(e) => exprs.extend(e),
            Item::Ports(i) => exprs.extend(modules[i].exprs()),
        }
    }
    exprs.push(Expr::Counter);
    let target = match &rule.target {
        Target::Accept => verdict(Verdict::Accept),
        Target::Return => verdict(Verdict::Return),
        Target::Jump(c) => verdict(Verdict::Jump(c.iptables_name().to_string())),
        Target::Redirect { port, .. } => {
            let mut info = Vec::new();
            match family {
                Family::V4 => {
                    // struct nf_nat_ipv4_multi_range_compat { u32 rangesize; struct
                    // nf_nat_ipv4_range { u32 flags; be32 min_ip, max_ip; be16 min, max; } }
                    info.extend_from_slice(&1u32.to_ne_bytes());
                    info.extend_from_slice(&2u32.to_ne_bytes()); // NF_NAT_RANGE_PROTO_SPECIFIED
                    info.extend_from_slice(&[0; 8]);
                    info.extend_from_slice(&port.to_be_bytes());
                    info.extend_from_slice(&port.to_be_bytes());
                    info.resize(24, 0);
                }
                Family::V6 => {
                    // struct nf_nat_range { u32 flags; addr min, max; be16 min_proto, max_proto }
                    info.extend_from_slice(&2u32.to_ne_bytes());
                    info.extend_from_slice(&[0; 32]);
                    info.extend_from_slice(&port.to_be_bytes());
                    info.extend_from_slice(&port.to_be_bytes());
                }
            }
            Expr::Target {
                name: "REDIRECT".to_string(),
                rev: 0,
                info,
            }
        }
        Target::SetConnMark { mark, mask } => connmark_target(*mark, *mask, u32::MAX, 0),
        Target::RestoreMarkMasked { nfmask, ctmask } => connmark_target(0, *ctmask, *nfmask, 2),
        Target::CtZone(zone) => {
            // struct xt_ct_target_info_v1 { u16 flags, zone; u32 ct_events, exp_events;
            // char helper[16], timeout[32]; struct nf_conn *ct; } (72 bytes)
            let mut info = Vec::with_capacity(72);
            info.extend_from_slice(&0u16.to_ne_bytes());
            info.extend_from_slice(&zone.to_ne_bytes());
            info.resize(72, 0);
            Expr::Target {
                name: "CT".to_string(),
                rev: 2,
                info,
            }
        }
        _ => return unsupported("a target the netlink writer does not cover"),
    };
    exprs.push(target);
    Ok(NlRule {
        chain: rule.chain.iptables_name().to_string(),
        exprs,
        compat_proto: proto.map_or(0, |p| u32::from(proto_number(p))),
        compat_inv: false,
        text,
    })
}

fn verdict(v: Verdict) -> Expr {
    Expr::Immediate {
        dreg: NFT_REG_VERDICT,
        verdict: v,
    }
}

/// `CONNMARK` rev 2: struct xt_connmark_tginfo2 { u32 ctmark, ctmask, nfmask; u8 shift_dir,
/// shift_bits, mode; } (16 bytes). Mode 0 = set (`--set-xmark`), 2 = restore.
fn connmark_target(ctmark: u32, ctmask: u32, nfmask: u32, mode: u8) -> Expr {
    let mut info = Vec::with_capacity(16);
    info.extend_from_slice(&ctmark.to_ne_bytes());
    info.extend_from_slice(&ctmask.to_ne_bytes());
    info.extend_from_slice(&nfmask.to_ne_bytes());
    info.extend_from_slice(&[0, 0, mode, 0]);
    Expr::Target {
        name: "CONNMARK".to_string(),
        rev: 2,
        info,
    }
}

/// iptables' built-in chain of `table`: (hook number, priority, chain type).
fn builtin_spec(table: &str, chain: &str) -> Option<(u32, i32, &'static str)> {
    let hook = match chain {
        "PREROUTING" => 0,
        "INPUT" => 1,
        "FORWARD" => 2,
        "OUTPUT" => 3,
        "POSTROUTING" => 4,
        _ => return None,
    };
    match (table, hook) {
        ("mangle", 3) => Some((hook, -150, "route")),
        ("mangle", _) => Some((hook, -150, "filter")),
        ("nat", 0 | 3) => Some((hook, -100, "nat")),
        ("nat", 1 | 4) => Some((hook, 100, "nat")),
        ("raw", 0 | 3) => Some((hook, -300, "filter")),
        _ => None,
    }
}

fn is_builtin(chain: &str) -> bool {
    matches!(
        chain,
        "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
    )
}

// ----- desired state -------------------------------------------------------------------------

/// One family's table as the restore text declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredTable {
    pub name: String,
    /// Custom chains in `-N` order.
    pub chains: Vec<String>,
    pub rules: Vec<NlRule>,
}

/// The rule set per family, in iptables-restore order (see `meshcni_rules::iptables`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub family: Family,
    pub tables: Vec<DesiredTable>,
}

impl Desired {
    /// `family`'s rules of `rs` (the same tables, `-N` order and rule order as
    /// `render_restore`), or what the netlink writer does not support.
    pub fn new(rs: &RuleSet, family: Family) -> Result<Desired, String> {
        let mut tables = Vec::new();
        for table in Table::ALL {
            let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
            if rules.is_empty() {
                continue;
            }
            let mut chains: Vec<Chain> = Vec::new();
            for r in &rules {
                if !r.chain.is_builtin() && !chains.contains(&r.chain) {
                    chains.push(r.chain);
                }
            }
            for r in &rules {
                if let Target::Jump(t) = r.target
                    && !t.is_builtin()
                    && !chains.contains(&t)
                {
                    chains.push(t);
                }
            }
            let mut nl = Vec::new();
            for r in &rules {
                if r.chain.is_builtin()
                    && builtin_spec(table.name(), r.chain.iptables_name()).is_none()
                {
                    return Err(format!(
                        "built-in chain {} of table {}",
                        r.chain.iptables_name(),
                        table.name()
                    ));
                }
                nl.push(translate(r, family)?);
            }
            tables.push(DesiredTable {
                name: table.name().to_string(),
                chains: chains
                    .iter()
                    .map(|c| c.iptables_name().to_string())
                    .collect(),
                rules: nl,
            });
        }
        Ok(Desired { family, tables })
    }

    /// The xt extensions (name, revision, is target) the rules use.
    fn extensions(&self) -> Vec<(String, u32, bool)> {
        let mut out: Vec<(String, u32, bool)> = Vec::new();
        for e in self
            .tables
            .iter()
            .flat_map(|t| &t.rules)
            .flat_map(|r| &r.exprs)
        {
            let item = match e {
                Expr::Match { name, rev, .. } => (name.clone(), *rev, false),
                Expr::Target { name, rev, .. } => (name.clone(), *rev, true),
                _ => continue,
            };
            if !out.contains(&item) {
                out.push(item);
            }
        }
        out
    }
}

// ----- kernel state --------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct KChain {
    table: String,
    name: String,
}

#[derive(Debug, Clone)]
struct KRule {
    table: String,
    chain: String,
    handle: u64,
    exprs: Vec<Expr>,
}

/// One family's xtables tables as the kernel has them.
#[derive(Debug, Clone, Default)]
struct KState {
    tables: Vec<String>,
    chains: Vec<KChain>,
    rules: Vec<KRule>,
}

impl KState {
    fn chain(&self, table: &str, name: &str) -> Option<&KChain> {
        self.chains
            .iter()
            .find(|c| c.table == table && c.name == name)
    }

    fn rules_of<'a>(&'a self, table: &'a str, chain: &'a str) -> impl Iterator<Item = &'a KRule> {
        self.rules
            .iter()
            .filter(move |r| r.table == table && r.chain == chain)
    }

    fn table_chains<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a KChain> {
        self.chains.iter().filter(move |c| c.table == table)
    }
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

fn family_word(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The jump/goto target of a rule's last expression.
fn jump_target(exprs: &[Expr]) -> Option<&str> {
    match exprs.last() {
        Some(Expr::Immediate {
            verdict: Verdict::Jump(c) | Verdict::Goto(c),
            ..
        }) => Some(c),
        _ => None,
    }
}

// ----- the socket ----------------------------------------------------------------------------

/// An nfnetlink socket in the current netns.
pub struct NfSock<'n> {
    socket: netlink_sys::Socket,
    seq: u32,
    ns: &'n InNetns<'n>,
}

/// One reply message: (type, flags-less payload after the netlink header).
struct Reply {
    kind: u16,
    seq: u32,
    payload: Vec<u8>,
}

impl<'n> NfSock<'n> {
    /// Open the socket in the netns of the calling thread.
    pub fn open(ns: &'n InNetns<'n>) -> Result<Self, NetxError> {
        let socket = crate::nft::nfnetlink_socket(ns, "nf_tables socket")?;
        Ok(NfSock { socket, seq: 0, ns })
    }

    fn io(&self, op: &str, source: std::io::Error) -> NetxError {
        NetxError::Netlink {
            netns: self.ns.path().to_path_buf(),
            op: op.to_string(),
            source,
        }
    }

    fn protocol(&self, op: &str, detail: String) -> NetxError {
        NetxError::NetlinkProtocol {
            netns: self.ns.path().to_path_buf(),
            op: op.to_string(),
            detail,
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn recv(&mut self, op: &str) -> Result<Vec<Reply>, NetxError> {
        let (buf, _) = crate::netlink::recv_full(&self.socket).map_err(|e| self.io(op, e))?;
        if buf.is_empty() {
            return Err(self.protocol(op, "empty datagram".to_string()));
        }
        let mut out = Vec::new();
        let mut rest = &buf[..];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                return Err(self.protocol(op, format!("message has bad length {len}")));
            }
            out.push(Reply {
                kind: u16::from_ne_bytes([rest[4], rest[5]]),
                seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
                payload: rest[16..len].to_vec(),
            });
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
        Ok(out)
    }

    /// One message: header + nfgenmsg + `attrs`.
    fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.push(family);
        m.push(0);
        m.extend_from_slice(&res_id.to_be_bytes());
        m.extend_from_slice(attrs);
        m
    }

    /// A request answered by objects and/or an ack/error: the object payloads.
    fn request(
        &mut self,
        op: &str,
        kind: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
    ) -> Result<Vec<Vec<u8>>, NetxError> {
        let seq = self.next_seq();
        let msg = Self::message(kind, NLM_F_REQUEST | flags, seq, family, 0, attrs);
        self.socket.send(&msg, 0).map_err(|e| self.io(op, e))?;
        let mut objects = Vec::new();
        loop {
            for r in self.recv(op)? {
                if r.seq != seq {
                    continue;
                }
                match r.kind {
                    NLMSG_DONE => return Ok(objects),
                    NLMSG_ERROR => {
                        let code = r
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| self.protocol(op, "truncated error".to_string()))?;
                        if code == 0 {
                            return Ok(objects);
                        }
                        return Err(self.io(op, std::io::Error::from_raw_os_error(-code)));
                    }
                    _ => {
                        objects.push(r.payload);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(objects);
                        }
                    }
                }
            }
        }
    }

    /// The nf_tables ruleset generation.
    fn generation(&mut self) -> Result<u32, NetxError> {
        let op = "nf_tables generation";
        let replies = self.request(op, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, 0, 0, &[])?;
        let payload = replies
            .first()
            .ok_or_else(|| self.protocol(op, "no reply".to_string()))?;
        let attrs =
            parse_attrs(payload.get(4..).unwrap_or_default()).map_err(|d| self.protocol(op, d))?;
        attrs
            .iter()
            .find(|(k, _)| *k == NFTA_GEN_ID)
            .and_then(|(_, v)| be_u32(v))
            .ok_or_else(|| self.protocol(op, "no generation id".to_string()))
    }

    fn dump(&mut self, op: &str, msg: u16, family: u8) -> Result<Vec<Vec<u8>>, NetxError> {
        self.request(
            op,
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_DUMP,
            family,
            &[],
        )
    }

    /// Whether the kernel has xt extension `name` at revision `rev` for `family`.
    fn compat_has(
        &mut self,
        family: u8,
        name: &str,
        rev: u32,
        target: bool,
    ) -> Result<bool, NetxError> {
        let mut attrs = Vec::new();
        put_str(&mut attrs, NFTA_COMPAT_NAME, name);
        put_u32(&mut attrs, NFTA_COMPAT_REV, rev);
        put_u32(&mut attrs, NFTA_COMPAT_TYPE, u32::from(target));
        let op = format!("xt revision query {name} rev {rev}");
        match self.request(&op, NFNL_SUBSYS_NFT_COMPAT << 8, NLM_F_ACK, family, &attrs) {
            Ok(_) => Ok(true),
            Err(NetxError::Netlink { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOENT | libc::EPROTONOSUPPORT | libc::EOPNOTSUPP)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The xtables tables, chains and rules of `family`.
    fn state(&mut self, family: Family) -> Result<KState, NetxError> {
        let fam = nfproto(family);
        let word = family_word(family);
        let mut st = KState::default();
        for obj in self.dump(
            &format!("nf_tables {word} table dump"),
            NFT_MSG_GETTABLE,
            fam,
        )? {
            if obj.first() != Some(&fam) {
                continue;
            }
            let attrs = parse_attrs(&obj[4..]).map_err(|d| self.protocol("table dump", d))?;
            if let Some((_, n)) = attrs.iter().find(|(k, _)| *k == NFTA_TABLE_NAME) {
                let n = attr_str(n);
                if XT_TABLES.contains(&n.as_str()) {
                    st.tables.push(n);
                }
            }
        }
        if st.tables.is_empty() {
            return Ok(st);
        }
        for obj in self.dump(
            &format!("nf_tables {word} chain dump"),
            NFT_MSG_GETCHAIN,
            fam,
        )? {
            if obj.first() != Some(&fam) {
                continue;
            }
            let attrs = parse_attrs(&obj[4..]).map_err(|d| self.protocol("chain dump", d))?;
            let get = |k| attrs.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
            if let (Some(t), Some(n)) = (get(NFTA_CHAIN_TABLE), get(NFTA_CHAIN_NAME)) {
                let table = attr_str(t);
                if st.tables.contains(&table) {
                    st.chains.push(KChain {
                        table,
                        name: attr_str(n),
                    });
                }
            }
        }
        for obj in self.dump(&format!("nf_tables {word} rule dump"), NFT_MSG_GETRULE, fam)? {
            if obj.first() != Some(&fam) {
                continue;
            }
            let attrs = parse_attrs(&obj[4..]).map_err(|d| self.protocol("rule dump", d))?;
            let get = |k| attrs.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
            let (Some(t), Some(c)) = (get(NFTA_RULE_TABLE), get(NFTA_RULE_CHAIN)) else {
                continue;
            };
            let table = attr_str(t);
            if !st.tables.contains(&table) {
                continue;
            }
            let mut exprs = Vec::new();
            if let Some(list) = get(NFTA_RULE_EXPRESSIONS) {
                for (_, elem) in parse_attrs(list).map_err(|d| self.protocol("rule dump", d))? {
                    exprs.push(Expr::decode(elem).map_err(|d| self.protocol("rule dump", d))?);
                }
            }
            st.rules.push(KRule {
                table,
                chain: attr_str(c),
                handle: get(NFTA_RULE_HANDLE)
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes),
                exprs,
            });
        }
        Ok(st)
    }

    /// Send `ops` as one batch (guarded by `genid`) and wait for every message's answer.
    fn batch(&mut self, genid: u32, ops: &[Op]) -> Result<(), BatchError> {
        let mut buf = Vec::new();
        let begin_seq = self.next_seq();
        let mut gen_attr = Vec::new();
        put_u32(&mut gen_attr, NFNL_BATCH_GENID, genid);
        buf.extend(Self::message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &gen_attr,
        ));
        let first = begin_seq.wrapping_add(1);
        for op in ops {
            let seq = self.next_seq();
            let (kind, flags, family, attrs) = op.encode();
            buf.extend(Self::message(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                NLM_F_REQUEST | NLM_F_ACK | flags,
                seq,
                family,
                0,
                &attrs,
            ));
        }
        let last = self.seq;
        let end_seq = self.next_seq();
        buf.extend(Self::message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        ));
        let op = "nf_tables batch";
        self.socket
            .send(&buf, 0)
            .map_err(|e| BatchError::Netx(self.io(op, e)))?;
        let mut failure: Option<(u32, i32)> = None;
        let mut acked = 0usize;
        loop {
            let replies = match self.recv(op) {
                Ok(r) => r,
                Err(e) if failure.is_some() => {
                    tracing::debug!(error = %e, "after a batch error");
                    break;
                }
                Err(e) => return Err(BatchError::Netx(e)),
            };
            let mut done = false;
            for r in replies {
                if r.kind != NLMSG_ERROR {
                    continue;
                }
                let code = r
                    .payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if code != 0 && failure.is_none() {
                    failure = Some((r.seq, -code));
                    // The rest of the answers are already queued: read them without waiting.
                    let _ = self.socket.set_non_blocking(true);
                }
                if r.seq == begin_seq && code != 0 {
                    done = true;
                }
                if (first..=last).contains(&r.seq) {
                    acked += 1;
                }
                if r.seq == last {
                    done = true;
                }
            }
            if done || acked >= ops.len() {
                break;
            }
        }
        let _ = self.socket.set_non_blocking(false);
        match failure {
            None => Ok(()),
            Some((_, ERESTART)) => Err(BatchError::Generation),
            Some((seq, errno)) => {
                let what = seq
                    .checked_sub(first)
                    .and_then(|i| ops.get(i as usize))
                    .map_or_else(|| "batch".to_string(), Op::describe);
                Err(BatchError::Netx(self.io(
                    &format!("nf_tables batch: {what}"),
                    std::io::Error::from_raw_os_error(errno),
                )))
            }
        }
    }
}

enum BatchError {
    /// The ruleset changed since it was read (`ERESTART`): read again.
    Generation,
    Netx(NetxError),
}

// ----- operations ----------------------------------------------------------------------------

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    NewTable {
        family: Family,
        table: String,
    },
    NewChain {
        family: Family,
        table: String,
        chain: String,
    },
    NewBaseChain {
        family: Family,
        table: String,
        chain: String,
    },
    FlushChain {
        family: Family,
        table: String,
        chain: String,
    },
    DelRule {
        family: Family,
        table: String,
        chain: String,
        handle: u64,
    },
    DelChain {
        family: Family,
        table: String,
        chain: String,
    },
    NewRule {
        family: Family,
        table: String,
        rule: NlRule,
    },
}

impl Op {
    fn encode(&self) -> (u16, u16, u8, Vec<u8>) {
        let mut a = Vec::new();
        match self {
            Op::NewTable { family, table } => {
                put_str(&mut a, NFTA_TABLE_NAME, table);
                (NFT_MSG_NEWTABLE, NLM_F_CREATE, nfproto(*family), a)
            }
            Op::NewChain {
                family,
                table,
                chain,
            } => {
                put_str(&mut a, NFTA_CHAIN_TABLE, table);
                put_str(&mut a, NFTA_CHAIN_NAME, chain);
                (
                    NFT_MSG_NEWCHAIN,
                    NLM_F_CREATE | NLM_F_EXCL,
                    nfproto(*family),
                    a,
                )
            }
            Op::NewBaseChain {
                family,
                table,
                chain,
            } => {
                put_str(&mut a, NFTA_CHAIN_TABLE, table);
                put_str(&mut a, NFTA_CHAIN_NAME, chain);
                // Checked when the plan was made.
                let (hook, prio, kind) = builtin_spec(table, chain).unwrap_or((0, 0, "filter"));
                nest(&mut a, NFTA_CHAIN_HOOK, |h| {
                    put_u32(h, NFTA_HOOK_HOOKNUM, hook);
                    put(h, NFTA_HOOK_PRIORITY, &prio.to_be_bytes());
                });
                put_u32(&mut a, NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
                put_str(&mut a, NFTA_CHAIN_TYPE, kind);
                (NFT_MSG_NEWCHAIN, NLM_F_CREATE, nfproto(*family), a)
            }
            Op::FlushChain {
                family,
                table,
                chain,
            } => {
                put_str(&mut a, NFTA_RULE_TABLE, table);
                put_str(&mut a, NFTA_RULE_CHAIN, chain);
                (NFT_MSG_DELRULE, 0, nfproto(*family), a)
            }
            Op::DelRule {
                family,
                table,
                chain,
                handle,
            } => {
                put_str(&mut a, NFTA_RULE_TABLE, table);
                put_str(&mut a, NFTA_RULE_CHAIN, chain);
                put(&mut a, NFTA_RULE_HANDLE, &handle.to_be_bytes());
                (NFT_MSG_DELRULE, 0, nfproto(*family), a)
            }
            Op::DelChain {
                family,
                table,
                chain,
            } => {
                put_str(&mut a, NFTA_CHAIN_TABLE, table);
                put_str(&mut a, NFTA_CHAIN_NAME, chain);
                (NFT_MSG_DELCHAIN, 0, nfproto(*family), a)
            }
            Op::NewRule {
                family,
                table,
                rule,
            } => {
                put_str(&mut a, NFTA_RULE_TABLE, table);
                put_str(&mut a, NFTA_RULE_CHAIN, &rule.chain);
                nest(&mut a, NFTA_RULE_EXPRESSIONS, |l| {
                    for e in &rule.exprs {
                        e.encode(l);
                    }
                });
                nest(&mut a, NFTA_RULE_COMPAT, |c| {
                    put_u32(c, NFTA_RULE_COMPAT_PROTO, rule.compat_proto);
                    put_u32(
                        c,
                        NFTA_RULE_COMPAT_FLAGS,
                        if rule.compat_inv {
                            NFT_RULE_COMPAT_F_INV
                        } else {
                            0
                        },
                    );
                });
                (
                    NFT_MSG_NEWRULE,
                    NLM_F_CREATE | NLM_F_APPEND,
                    nfproto(*family),
                    a,
                )
            }
        }
    }

    /// What the message does, for errors.
    pub fn describe(&self) -> String {
        match self {
            Op::NewTable { family, table } => {
                format!("add table {} {table}", family_word(*family))
            }
            Op::NewChain {
                family,
                table,
                chain,
            } => {
                format!("add chain {} {table} {chain}", family_word(*family))
            }
            Op::NewBaseChain {
                family,
                table,
                chain,
            } => {
                format!("add base chain {} {table} {chain}", family_word(*family))
            }
            Op::FlushChain {
                family,
                table,
                chain,
            } => {
                format!("flush chain {} {table} {chain}", family_word(*family))
            }
            Op::DelRule {
                family,
                table,
                chain,
                handle,
            } => format!(
                "delete rule {} {table} {chain} handle {handle}",
                family_word(*family)
            ),
            Op::DelChain {
                family,
                table,
                chain,
            } => {
                format!("delete chain {} {table} {chain}", family_word(*family))
            }
            Op::NewRule {
                family,
                table,
                rule,
            } => format!("add rule {} {table}: {}", family_word(*family), rule.text),
        }
    }
}

// ----- planning ------------------------------------------------------------------------------

/// Compare one family's kernel state with the desired one: the drift found (empty = identical)
/// and the operations that repair it (see the module docs).
fn plan_family(desired: &Desired, st: &KState, owned: &[String]) -> (Vec<String>, Vec<Op>) {
    let family = desired.family;
    let fw = family_word(family);
    let mut drift = Vec::new();
    let mut ops = Vec::new();
    // Tables of interest: the desired ones, then existing ones with an owned chain or a jump
    // to one.
    let mut names: Vec<String> = desired.tables.iter().map(|t| t.name.clone()).collect();
    for t in &st.tables {
        let ours = st.table_chains(t).any(|c| owned.contains(&c.name))
            || st.rules.iter().any(|r| {
                &r.table == t && jump_target(&r.exprs).is_some_and(|j| owned.iter().any(|o| o == j))
            });
        if ours && !names.contains(t) {
            names.push(t.clone());
        }
    }
    for name in names {
        let want = desired.tables.iter().find(|t| t.name == name);
        let table_exists = st.tables.contains(&name);
        let mut table_drift = Vec::new();
        // Custom chains the plan wants.
        for c in want.iter().flat_map(|t| &t.chains) {
            if st.chain(&name, c).is_none() {
                table_drift.push(format!("{fw} table {name}: chain {c} missing"));
                continue;
            }
            let want_rules: Vec<&NlRule> = want
                .iter()
                .flat_map(|t| &t.rules)
                .filter(|r| &r.chain == c)
                .collect();
            let have: Vec<&KRule> = st.rules_of(&name, c).collect();
            if let Some(d) = list_drift(&want_rules, &have) {
                table_drift.push(format!("{fw} table {name} chain {c}: {d}"));
            }
        }
        // Owned chains it does not want.
        let stale: Vec<&KChain> = st
            .table_chains(&name)
            .filter(|c| {
                !is_builtin(&c.name)
                    && owned.contains(&c.name)
                    && !want.is_some_and(|t| t.chains.contains(&c.name))
            })
            .collect();
        for c in &stale {
            table_drift.push(format!("{fw} table {name}: unexpected chain {}", c.name));
        }
        // Built-in chains: our rules, in order, exactly once.
        let mut builtins: Vec<String> = Vec::new();
        for r in want.iter().flat_map(|t| &t.rules) {
            if is_builtin(&r.chain) && !builtins.contains(&r.chain) {
                builtins.push(r.chain.clone());
            }
        }
        for c in st.table_chains(&name) {
            if is_builtin(&c.name) && !builtins.contains(&c.name) {
                builtins.push(c.name.clone());
            }
        }
        let mut ours_in_builtins: Vec<&KRule> = Vec::new();
        for b in &builtins {
            let want_rules: Vec<&NlRule> = want
                .iter()
                .flat_map(|t| &t.rules)
                .filter(|r| &r.chain == b)
                .collect();
            let ours: Vec<&KRule> = st
                .rules_of(&name, b)
                .filter(|r| {
                    want_rules.iter().any(|w| w.exprs == r.exprs)
                        || jump_target(&r.exprs).is_some_and(|j| owned.iter().any(|o| o == j))
                })
                .collect();
            if let Some(d) = list_drift(&want_rules, &ours) {
                table_drift.push(format!("{fw} table {name} chain {b}: {d}"));
            }
            ours_in_builtins.extend(ours);
        }
        if table_drift.is_empty() {
            continue;
        }
        drift.extend(table_drift);
        // The repair (or the fresh install) of this table.
        if !table_exists {
            ops.push(Op::NewTable {
                family,
                table: name.clone(),
            });
        }
        for c in want.iter().flat_map(|t| &t.chains) {
            if st.chain(&name, c).is_some() {
                ops.push(Op::FlushChain {
                    family,
                    table: name.clone(),
                    chain: c.clone(),
                });
            } else {
                ops.push(Op::NewChain {
                    family,
                    table: name.clone(),
                    chain: c.clone(),
                });
            }
        }
        for c in &stale {
            ops.push(Op::FlushChain {
                family,
                table: name.clone(),
                chain: c.name.clone(),
            });
        }
        for r in &ours_in_builtins {
            ops.push(Op::DelRule {
                family,
                table: name.clone(),
                chain: r.chain.clone(),
                handle: r.handle,
            });
        }
        for c in &stale {
            ops.push(Op::DelChain {
                family,
                table: name.clone(),
                chain: c.name.clone(),
            });
        }
        let mut created: Vec<&str> = Vec::new();
        for r in want.iter().flat_map(|t| &t.rules) {
            if is_builtin(&r.chain)
                && st.chain(&name, &r.chain).is_none()
                && !created.contains(&r.chain.as_str())
            {
                ops.push(Op::NewBaseChain {
                    family,
                    table: name.clone(),
                    chain: r.chain.clone(),
                });
                created.push(&r.chain);
            }
            ops.push(Op::NewRule {
                family,
                table: name.clone(),
                rule: r.clone(),
            });
        }
    }
    (drift, ops)
}

/// The first difference between a planned and an actual rule list.
fn list_drift(want: &[&NlRule], have: &[&KRule]) -> Option<String> {
    for i in 0..want.len().max(have.len()) {
        match (want.get(i), have.get(i)) {
            (Some(w), Some(h)) if w.exprs == h.exprs => {}
            (Some(w), Some(h)) => {
                return Some(format!(
                    "rule {} differs from `{}` (handle {})",
                    i + 1,
                    w.text,
                    h.handle
                ));
            }
            (Some(w), None) => return Some(format!("rule `{}` missing", w.text)),
            (None, Some(h)) => {
                return Some(format!("unexpected rule (handle {})", h.handle));
            }
            (None, None) => break,
        }
    }
    None
}

/// The in-pod rule set of both families, ready for the kernel.
#[derive(Debug, Clone)]
pub struct Plan {
    families: Vec<Desired>,
    owned: Vec<String>,
}

/// What [`Plan::apply_here`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlApplied {
    /// The drift found (empty: everything was in place and nothing was sent).
    pub drift: Vec<String>,
    /// Whether our tables had anything of ours before (a repair rather than an install).
    pub repaired: bool,
}

/// Per-process cache of the xt revisions the kernel has (modules are global).
/// (nfproto, extension name, revision, is a target) → the kernel has it.
type CompatKey = (u8, String, u32, bool);

static COMPAT: Mutex<Option<HashMap<CompatKey, bool>>> = Mutex::new(None);

impl Plan {
    /// `rs` for v4 (and v6 when it has IPv6); `Err` names what the netlink writer does not
    /// cover (the caller uses iptables-nft-restore then).
    pub fn new(rs: &RuleSet, owned: &[String]) -> Result<Plan, String> {
        let mut families = vec![Desired::new(rs, Family::V4)?];
        if rs.ipv6 {
            families.push(Desired::new(rs, Family::V6)?);
        }
        Ok(Plan {
            families,
            owned: owned.to_vec(),
        })
    }

    /// The desired tables per family (for tests and benchmarks).
    pub fn desired(&self) -> &[Desired] {
        &self.families
    }

    /// Whether the kernel has every xt extension revision the rules use (cached per process).
    pub fn compat_supported_here(&self, sock: &mut NfSock<'_>) -> Result<bool, NetxError> {
        for d in &self.families {
            let fam = nfproto(d.family);
            for (name, rev, target) in d.extensions() {
                let key = (fam, name.clone(), rev, target);
                let cached = COMPAT
                    .lock()
                    .ok()
                    .and_then(|c| c.as_ref().and_then(|m| m.get(&key).copied()));
                let has = match cached {
                    Some(h) => h,
                    None => {
                        let h = sock.compat_has(fam, &name, rev, target)?;
                        if let Ok(mut c) = COMPAT.lock() {
                            c.get_or_insert_with(HashMap::new).insert(key, h);
                        }
                        h
                    }
                };
                if !has {
                    tracing::info!(
                        name,
                        rev,
                        "the kernel lacks this xt revision; using iptables-nft-restore"
                    );
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Read the state, compare, and (unless identical) send one batch for both families.
    /// The ruleset generation guards the batch: a concurrent change makes it read again.
    pub fn apply_here(&self, sock: &mut NfSock<'_>) -> Result<NlApplied, NetxError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let genid = sock.generation()?;
            let (drift, ops, repaired) = self.compare(sock)?;
            if ops.is_empty() {
                return Ok(NlApplied { drift, repaired });
            }
            match sock.batch(genid, &ops) {
                Ok(()) => return Ok(NlApplied { drift, repaired }),
                Err(BatchError::Generation) if attempts < 5 => {
                    tracing::debug!("nf_tables ruleset changed while planning; reading it again");
                }
                Err(BatchError::Generation) => {
                    return Err(NetxError::Netlink {
                        netns: sock.ns.path().to_path_buf(),
                        op: "nf_tables batch (the ruleset kept changing)".to_string(),
                        source: std::io::Error::from_raw_os_error(ERESTART),
                    });
                }
                Err(BatchError::Netx(e)) => return Err(e),
            }
        }
    }

    /// Read-only: the drift (empty = identical).
    pub fn check_here(&self, sock: &mut NfSock<'_>) -> Result<Vec<String>, NetxError> {
        Ok(self.compare(sock)?.0)
    }

    /// (drift, repair operations, whether anything of ours was there).
    fn compare(&self, sock: &mut NfSock<'_>) -> Result<(Vec<String>, Vec<Op>, bool), NetxError> {
        let mut drift = Vec::new();
        let mut ops = Vec::new();
        let mut repaired = false;
        for d in &self.families {
            let st = sock.state(d.family)?;
            repaired |= st.chains.iter().any(|c| self.owned.contains(&c.name))
                || st.rules.iter().any(|r| {
                    jump_target(&r.exprs).is_some_and(|j| self.owned.iter().any(|o| o == j))
                });
            let (dr, op) = plan_family(d, &st, &self.owned);
            drift.extend(dr);
            ops.extend(op);
        }
        Ok((drift, ops, repaired))
    }

    /// The operations a fresh netns gets (for tests: the batch's shape).
    pub fn fresh_ops(&self) -> Vec<Op> {
        self.families
            .iter()
            .flat_map(|d| plan_family(d, &KState::default(), &self.owned).1)
            .collect()
    }
}

/// The nf_tables ruleset generation of `netns` (every committed batch adds one).
pub fn ruleset_generation(netns: &std::path::Path) -> Result<u32, NetxError> {
    crate::netns::with_netns(netns, |ns| NfSock::open(ns)?.generation())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcni_rules::inpod::{self, InpodConfig, PodOverrides};

    /// The fresh batch, written back as restore text, is the generator's restore text: same
    /// tables, `-N` order and rule order.
    #[test]
    fn fresh_ops_follow_the_restore_text() {
        for (dns, ipv6, vifs) in [
            (true, true, vec![]),
            (false, false, vec!["net1".to_string()]),
        ] {
            let cfg = InpodConfig {
                redirect_dns: dns,
                enable_ipv6: ipv6,
                ..InpodConfig::default()
            };
            let pod = PodOverrides {
                virtual_interfaces: vifs,
                ..PodOverrides::default()
            };
            let rs = inpod::pod_rules(&cfg, &pod);
            let plan = Plan::new(&rs, &inpod::pod_chain_names()).expect("supported");
            let mut text: HashMap<Family, String> = HashMap::new();
            for op in plan.fresh_ops() {
                match op {
                    Op::NewTable { family, table } => {
                        let t = text.entry(family).or_default();
                        if !t.is_empty() {
                            t.push_str("COMMIT\n");
                        }
                        t.push_str(&format!("* {table}\n"));
                    }
                    Op::NewChain { family, chain, .. } => {
                        text.entry(family)
                            .or_default()
                            .push_str(&format!("-N {chain}\n"));
                    }
                    Op::NewRule { family, rule, .. } => {
                        text.entry(family)
                            .or_default()
                            .push_str(&format!("{}\n", rule.text));
                    }
                    Op::NewBaseChain { .. } => {}
                    other => panic!("a fresh netns needs no {other:?}"),
                }
            }
            for family in [Family::V4, Family::V6] {
                let want = inpod::pod_restore(&rs, family);
                let got = text
                    .remove(&family)
                    .map(|t| t + "COMMIT\n")
                    .unwrap_or_default();
                assert_eq!(got, want, "{family:?}");
            }
        }
    }

    #[test]
    fn expressions_round_trip_through_the_dump_decoder() {
        let rs = inpod::pod_rules(
            &InpodConfig {
                redirect_dns: true,
                enable_ipv6: true,
                ..InpodConfig::default()
            },
            &PodOverrides::default(),
        );
        let plan = Plan::new(&rs, &inpod::pod_chain_names()).expect("supported");
        for d in plan.desired() {
            for r in d.tables.iter().flat_map(|t| &t.rules) {
                let mut list = Vec::new();
                for e in &r.exprs {
                    e.encode(&mut list);
                }
                let decoded: Vec<Expr> = parse_attrs(&list)
                    .expect("list")
                    .iter()
                    .map(|(_, elem)| Expr::decode(elem).expect("expr"))
                    .collect();
                assert_eq!(decoded, r.exprs, "{}", r.text);
            }
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The attributes of two `NFT_MSG_NEWRULE` messages as `iptables-nft-restore` v1.8.9 sent
    /// them (`strace -e sendmsg -xx` of the `default_ipv6` golden's v4 half): ours are the
    /// same bytes.
    #[test]
    fn rule_messages_are_byte_identical_to_iptables_nft_restores() {
        let rs = inpod::pod_rules(&InpodConfig::default(), &PodOverrides::default());
        let plan = Plan::new(&rs, &inpod::pod_chain_names()).expect("supported");
        let v4 = &plan.desired()[0];
        let rule = |table: &str, chain: &str| -> Op {
            let t = v4.tables.iter().find(|t| t.name == table).expect("table");
            Op::NewRule {
                family: Family::V4,
                table: table.to_string(),
                rule: t
                    .rules
                    .iter()
                    .find(|r| r.chain == chain)
                    .expect("rule")
                    .clone(),
            }
        };
        // -A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
        let mangle = "0b0001006d616e676c65000010000200495354494f5f5052455254000401048024000180090001006d657461000000001400028008000200000000030800010000000001440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100ff0f00000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c00038008000100390500002c0001800c000100636f756e746572001c0002800c00010000000000000000000c0002000000000000000000400001800b0001007461726765740000300002800d000100434f4e4e4d41524b0000000008000200000000021400030011010000ff0f0000ffffffff000000001400058008000100000000000800020000000000";
        // -A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
        let nat = "080001006e61740010000200495354494f5f5052455254004801048024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c00018008000100636d700020000280080001000000000108000200000000000c00038008000100a9fe077f380001800a0001006d617463680000002800028008000100746370000800020000000000140003000000ffff0000ffff00000000000000002c0001800c000100636f756e746572001c0002800c00010000000000000000000c0002000000000000000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000011400058008000100000000060800020000000000";
        for (op, want) in [
            (rule("mangle", "ISTIO_PRERT"), mangle),
            (rule("nat", "ISTIO_PRERT"), nat),
        ] {
            let (kind, flags, family, attrs) = op.encode();
            assert_eq!(
                (kind, flags, family),
                (NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, NFPROTO_IPV4)
            );
            assert_eq!(attrs, hex(want), "{}", op.describe());
        }
    }

    #[test]
    fn what_is_not_covered_is_named() {
        let host = inpod::host_rules_iptables(&InpodConfig::default());
        let err = Plan::new(&host, &inpod::host_chain_names()).expect_err("host rules");
        assert!(err.contains("inserted at a position"), "{err}");
    }
}
