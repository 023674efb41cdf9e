//! Native nftables renderer for the rule model (`nft -f` transaction text).
//!
//! Owns the nft spelling of rules as Istio's nftables backend writes them (spec §2.5 HEAD,
//! `istio-nftables` goldens): one `inet` table per iptables table (`istio-proxy-nat`,
//! `istio-proxy-mangle`, `istio-proxy-raw`), each added and flushed, then its chains from a fixed
//! list (base chains with their hook), then the rules in emission order. IPv4 and IPv6 variants
//! share the table, so every rule of the set is rendered once (addresses pick `ip`/`ip6`).

use std::fmt::Write as _;

use crate::model::{
    Chain, Family, Match, NftMarkWording, NftSpelling, OwnerKind, Position, Proto, Rule, Scope,
    Table, Target,
};
use crate::sidecar::RuleSet;

/// One chain of an nft table layout; `base` = `(type, hook, priority)` for hooked chains.
#[derive(Debug, Clone, Copy)]
pub struct NftChain {
    pub chain: Chain,
    pub base: Option<(&'static str, &'static str, i32)>,
}

/// Table names and chain lists of one nft layout (the sidecar's; in-pod uses other names).
#[derive(Debug, Clone, Copy)]
pub struct NftLayout {
    /// `(table, nft table name, chains in declaration order)`, in emission order.
    pub tables: &'static [(Table, &'static str, &'static [NftChain])],
}

const fn base(chain: Chain, ty: &'static str, hook: &'static str, prio: i32) -> NftChain {
    NftChain {
        chain,
        base: Some((ty, hook, prio)),
    }
}

const fn regular(chain: Chain) -> NftChain {
    NftChain { chain, base: None }
}

/// The sidecar capture layout (Istio `istio-nftables` constants).
pub const SIDECAR_LAYOUT: NftLayout = NftLayout {
    tables: &[
        (
            Table::Nat,
            "istio-proxy-nat",
            &[
                base(Chain::Prerouting, "nat", "prerouting", -100),
                base(Chain::Output, "nat", "output", -100),
                regular(Chain::IstioInbound),
                regular(Chain::IstioRedirect),
                regular(Chain::IstioInRedirect),
                regular(Chain::IstioOutput),
                regular(Chain::IstioOutputDns),
            ],
        ),
        (
            Table::Mangle,
            "istio-proxy-mangle",
            &[
                base(Chain::Prerouting, "filter", "prerouting", -150),
                base(Chain::Output, "route", "output", -150),
                regular(Chain::IstioDivert),
                regular(Chain::IstioTproxy),
                regular(Chain::IstioInbound),
                regular(Chain::IstioDrop),
            ],
        ),
        (
            Table::Raw,
            "istio-proxy-raw",
            &[
                base(Chain::Prerouting, "filter", "prerouting", -300),
                base(Chain::Output, "filter", "output", -300),
                regular(Chain::IstioInbound),
                regular(Chain::IstioOutputDns),
            ],
        ),
    ],
};

/// The sidecar capture transaction for `rs` (tables `inet istio-proxy-*`).
pub fn render(rs: &RuleSet) -> String {
    render_with(rs, &SIDECAR_LAYOUT)
}

/// A transaction deleting the sidecar tables. Each table is added first so the deletion
/// succeeds whether or not it exists (idempotent uninstall / `--cleanup-only`).
pub fn render_delete() -> String {
    render_delete_with(&SIDECAR_LAYOUT)
}

/// [`render_delete`] for any layout.
pub fn render_delete_with(layout: &NftLayout) -> String {
    let mut out = String::new();
    for (_, name, _) in layout.tables {
        let _ = writeln!(out, "add table inet {name}");
        let _ = writeln!(out, "delete table inet {name}");
    }
    out
}

/// [`render`] for any layout.
///
/// Chains are declared when they have a rule or are a jump target (a jump to an undeclared
/// chain would fail the whole transaction); chains missing from the layout's list follow in
/// first-use order. A positional insert becomes a plain `add` when the chain has no rule yet
/// or the index is past its end (nft refuses such inserts; iptables appends).
pub fn render_with(rs: &RuleSet, layout: &NftLayout) -> String {
    let mut out = String::with_capacity(rs.rules.len() * 96 + 512);
    let rules = || {
        rs.rules
            .iter()
            .filter(|r| rs.ipv6 || r.scope.includes(Family::V4))
    };
    for (table, name, chain_list) in layout.tables {
        let trules: Vec<&Rule> = rules().filter(|r| r.table == *table).collect();
        if trules.is_empty() {
            continue;
        }
        let _ = writeln!(out, "add table inet {name}");
        let _ = writeln!(out, "flush table inet {name}");

        let used = |c: Chain| {
            trules
                .iter()
                .any(|r| r.chain == c || r.target == Target::Jump(c))
        };
        for nc in chain_list.iter().filter(|nc| used(nc.chain)) {
            let _ = write!(out, "add chain inet {name} {}", nc.chain.nft_name());
            if let Some((ty, hook, prio)) = nc.base {
                let _ = write!(out, " {{ type {ty} hook {hook} priority {prio} ; }}");
            }
            out.push('\n');
        }
        let mut extra: Vec<Chain> = Vec::new();
        for r in &trules {
            let jump = match r.target {
                Target::Jump(c) => Some(c),
                _ => None,
            };
            for c in std::iter::once(r.chain).chain(jump) {
                if !chain_list.iter().any(|nc| nc.chain == c) && !extra.contains(&c) {
                    extra.push(c);
                }
            }
        }
        for c in extra {
            let _ = writeln!(out, "add chain inet {name} {}", c.nft_name());
        }

        let mut counts: Vec<(Chain, u32)> = Vec::new();
        for r in trules {
            let count = match counts.iter_mut().find(|(c, _)| *c == r.chain) {
                Some((_, n)) => n,
                None => {
                    counts.push((r.chain, 0));
                    &mut counts.last_mut().expect("just pushed").1
                }
            };
            match r.position {
                Position::Insert(pos) if *count > 0 && pos.saturating_sub(1) < *count => {
                    let _ = write!(
                        out,
                        "insert rule inet {name} {} index {} ",
                        r.chain.nft_name(),
                        pos.saturating_sub(1)
                    );
                }
                _ => {
                    let _ = write!(out, "add rule inet {name} {} ", r.chain.nft_name());
                }
            }
            *count += 1;
            write_rule(&mut out, r);
            out.push('\n');
        }
    }
    out
}

/// Sort key of a match in nft canonical order; ports and addresses swap with
/// [`crate::model::NftSpelling::ports_before_addresses`], marks move before ports with
/// [`crate::model::NftSpelling::mark_before_ports`].
fn rank(m: &Match, sp: NftSpelling) -> u8 {
    let (addr, port) = if sp.ports_before_addresses {
        (40, 30)
    } else {
        (30, 40)
    };
    let mark = if sp.mark_before_ports { 35 } else { 60 };
    match m {
        Match::InInterface(_) | Match::OutInterface(_) | Match::NotOutInterface(_) => 0,
        Match::Protocol(_) | Match::ProtoModule => 10,
        Match::CtState(_) => 20,
        Match::Source { .. } | Match::Destination { .. } => addr,
        Match::DestPort { .. } | Match::SourcePort { .. } | Match::DestPorts { .. } => port,
        Match::Owner { .. } | Match::SocketExists => 50,
        Match::DestSet(_) => 55,
        Match::Mark { .. } | Match::MarkMasked { .. } => mark,
        Match::ConnMark { .. } | Match::ConnMarkMasked { .. } => 70,
    }
}

fn neq(negate: bool) -> &'static str {
    if negate { "!= " } else { "" }
}

/// nft interface name: iptables' `eth+` prefix wildcard is nft's quoted `"eth*"`. Names that
/// are not plain nft identifiers (Linux allows e.g. `1eth`, `a#b`, `a;b`) are quoted too:
/// unquoted, `#` would comment out the rest of the rule and `;` would end it.
fn ifname(i: &str) -> String {
    let plain = i.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && i.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    match i.strip_suffix('+') {
        Some(prefix) => format!("\"{prefix}*\""),
        None if plain => i.to_owned(),
        None => format!("\"{i}\""),
    }
}

/// Append the rule body (matches, counter, statement/verdict).
pub fn write_rule(out: &mut String, rule: &Rule) {
    let sp = rule.nft;
    // The nft reference restricts some rules to TCP although the iptables twin doesn't.
    let synthetic_tcp = Match::Protocol(Proto::Tcp);
    let mut ms: Vec<&Match> = rule.matches.iter().collect();
    let proto = match rule.protocol() {
        None if sp.tcp_only => {
            ms.push(&synthetic_tcp);
            Some(Proto::Tcp)
        }
        p => p,
    };
    let has_port = ms.iter().any(|m| {
        matches!(
            m,
            Match::DestPort { .. } | Match::SourcePort { .. } | Match::DestPorts { .. }
        )
    });
    // Port matches need a protocol keyword; `th` (transport header) if the rule has none.
    let l4 = proto.map_or("th", Proto::name);
    ms.sort_by_key(|m| rank(m, sp));

    let mut toks: Vec<String> = Vec::with_capacity(ms.len() + 3);
    for m in ms {
        match m {
            Match::InInterface(i) => toks.push(format!("iifname {}", ifname(i))),
            Match::OutInterface(i) => toks.push(format!("oifname {}", ifname(i))),
            Match::Protocol(p) => {
                if !(sp.fold_protocol && has_port) {
                    toks.push(format!("meta l4proto {}", p.name()));
                }
            }
            Match::CtState(states) => {
                let list: Vec<&str> = states.iter().map(|s| s.nft_name()).collect();
                toks.push(format!("ct state {}", list.join(",")));
            }
            Match::Source { cidr, negate } | Match::Destination { cidr, negate } => {
                let fam = match cidr.family() {
                    Family::V4 => "ip",
                    Family::V6 => "ip6",
                };
                let dir = if matches!(m, Match::Source { .. }) {
                    "saddr"
                } else {
                    "daddr"
                };
                toks.push(format!("{fam} {dir} {}{cidr}", neq(*negate)));
            }
            Match::DestPort { port, negate } => {
                toks.push(format!("{l4} dport {}{port}", neq(*negate)));
            }
            Match::SourcePort { port, negate } => {
                toks.push(format!("{l4} sport {}{port}", neq(*negate)));
            }
            Match::DestPorts { ports, negate } => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                toks.push(format!(
                    "{l4} dport {}{{ {} }}",
                    neq(*negate),
                    list.join(", ")
                ));
            }
            Match::Owner { kind, id, negate } => {
                let key = match kind {
                    OwnerKind::Uid => "skuid",
                    OwnerKind::Gid => "skgid",
                };
                let meta = if sp.meta_owner { "meta " } else { "" };
                toks.push(format!("{meta}{key} {}{id}", neq(*negate)));
            }
            Match::Mark { mark, negate } => toks.push(format!("mark {}{mark}", neq(*negate))),
            Match::ConnMark { mark } => toks.push(format!("ct mark {mark}")),
            Match::NotOutInterface(i) => toks.push(format!("oifname != {}", ifname(i))),
            Match::MarkMasked { mark, mask, negate } => {
                let op = if *negate { "!=" } else { "==" };
                toks.push(match sp.mark {
                    NftMarkWording::And => format!("mark and {mask:#x} {op} {mark:#x}"),
                    NftMarkWording::AndDoubleSpace => {
                        format!("mark and {mask:#x}  {op} {mark:#x}")
                    }
                    NftMarkWording::MetaAnd => format!("meta mark and {mask:#x} {op} {mark:#x}"),
                    NftMarkWording::MetaAmp => format!("meta mark & {mask:#x} {op} {mark:#x}"),
                });
            }
            Match::ConnMarkMasked { mark, mask } => {
                toks.push(format!("ct mark and {mask:#x} == {mark:#x}"));
            }
            // The explicit match module is implied by the protocol in nft.
            Match::ProtoModule => {}
            // nft has no `--socket-exists`; generators give nft a `skuid` match instead. A rule
            // that still carries it must not silently match more: this token makes `nft`
            // reject the transaction.
            Match::SocketExists => toks.push("socket-exists-has-no-nft-equivalent".into()),
            Match::DestSet(set) => {
                let fam = if rule.scope == Scope::V6 { "ip6" } else { "ip" };
                toks.push(format!("{fam} daddr @{set}"));
            }
        }
    }

    let verdict = match &rule.target {
        Target::Tproxy { port, mark, .. } => {
            // nft needs the family of the tproxy statement in an inet table.
            let fam = match rule.scope {
                Scope::V4 => "ip ",
                Scope::V6 => "ip6 ",
                Scope::Both => "",
            };
            toks.push(format!("tproxy {fam}to :{port} meta mark set {mark}"));
            "accept".to_owned()
        }
        Target::Jump(c) => format!("jump {}", c.nft_name()),
        Target::Return => "return".into(),
        Target::Accept => "accept".into(),
        Target::Drop => "drop".into(),
        Target::Redirect { port, .. } => format!("redirect to :{port}"),
        Target::SetMark(m) => format!("meta mark set {m}"),
        Target::SaveMark => "ct mark set mark".into(),
        Target::RestoreMark => "meta mark set ct mark".into(),
        Target::CtZone(z) => format!("ct zone set {z}"),
        // Istio's builder joins `ct mark & <mask> | ` and the mark with a space: two spaces.
        Target::SetConnMark { mark, mask } => {
            format!("ct mark set ct mark & {:#x} |  {mark:#x}", !mask)
        }
        Target::RestoreMarkMasked { .. } => "meta mark set ct mark".into(),
        Target::Snat(addr) => format!("snat to {addr}"),
    };
    if !sp.no_counter {
        toks.push("counter".into());
    }
    toks.push(verdict);
    out.push_str(&toks.join(" "));
}
