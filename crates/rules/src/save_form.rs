//! The `iptables-save` spelling of a rule set: what `iptables-save` prints for our chains once
//! [`crate::iptables::render_restore`]'s text has been applied to a fresh netns. The apply layer
//! compares it with the netns's actual `-save` output to decide "identical → nothing to do"
//! without exec'ing a restore (verify-or-repair, see `meshcni_netx::iptables_state`).
//!
//! The spelling follows iptables ≥ 1.8 (legacy and nft flavors print the same): basic matches
//! first in `-s -d -i -o -p` order, the implicit `-m tcp`/`-m udp` of port matches, marks in
//! hex, `MARK --set-xmark`, `CONNMARK … --nfmask/--ctmask`, `TPROXY --on-port --on-ip
//! --tproxy-mark`, rules grouped per chain in their final order (`-I` resolved). It is a
//! prediction: where another iptables version prints differently, the comparison reports a
//! difference and the apply layer falls back to asking the real binary (a scratch netns), so a
//! wrong prediction costs time, never correctness.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{
    Chain, CtState, Family, Match, OwnerKind, Position, Proto, Rule, Table, Target,
};
use crate::sidecar::RuleSet;

/// Every custom chain the sidecar generator can create (iptables names). Chains with these
/// names in the tables the sidecar uses are ours: a repair flushes them, deletes the ones the
/// plan no longer has, and removes jumps to them from the built-in chains.
pub const SIDECAR_CHAINS: [Chain; 8] = [
    Chain::IstioInbound,
    Chain::IstioRedirect,
    Chain::IstioInRedirect,
    Chain::IstioOutput,
    Chain::IstioOutputDns,
    Chain::IstioDivert,
    Chain::IstioTproxy,
    Chain::IstioDrop,
];

/// The iptables names of [`SIDECAR_CHAINS`].
pub fn sidecar_chain_names() -> Vec<String> {
    SIDECAR_CHAINS
        .iter()
        .map(|c| c.iptables_name().to_string())
        .collect()
}

/// Tables the sidecar generator may write to (iptables names).
pub fn sidecar_table_names() -> Vec<String> {
    Table::ALL.iter().map(|t| t.name().to_string()).collect()
}

/// `-save`-style sections (`*table`, `:CHAIN - [0:0]` for our custom chains, `-A` lines per
/// chain in final order, `COMMIT`) of `family`'s rules; empty when the family has none.
pub fn render(rs: &RuleSet, family: Family) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
        if rules.is_empty() {
            continue;
        }
        // Chains in first-use order (rules' chains, then custom jump targets), each with its
        // rules after resolving `-I n` positions the way iptables does.
        let mut chains: Vec<(Chain, Vec<String>)> = Vec::new();
        let slot = |chains: &mut Vec<(Chain, Vec<String>)>, c: Chain| -> usize {
            match chains.iter().position(|(x, _)| *x == c) {
                Some(i) => i,
                None => {
                    chains.push((c, Vec::new()));
                    chains.len() - 1
                }
            }
        };
        for r in &rules {
            let i = slot(&mut chains, r.chain);
            let line = rule_line(r, family);
            let list = &mut chains[i].1;
            match r.position {
                Position::Append => list.push(line),
                Position::Insert(n) => {
                    let at = (n.max(1) as usize - 1).min(list.len());
                    list.insert(at, line);
                }
            }
        }
        for r in &rules {
            if let Target::Jump(t) = r.target {
                slot(&mut chains, t);
            }
        }
        let _ = writeln!(out, "*{}", table.name());
        for (c, _) in chains.iter().filter(|(c, _)| !c.is_builtin()) {
            let _ = writeln!(out, ":{} - [0:0]", c.iptables_name());
        }
        for (_, lines) in &chains {
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// One rule as `iptables-save` prints it: `-A CHAIN <matches> -j <target>`.
pub fn rule_line(rule: &Rule, family: Family) -> String {
    let mut toks: Vec<String> = vec!["-A".into(), rule.chain.iptables_name().into()];
    let not = |toks: &mut Vec<String>, negate: bool| {
        if negate {
            toks.push("!".into());
        }
    };
    // Basic matches in iptables' print order.
    for m in &rule.matches {
        if let Match::Source { cidr, negate } = m {
            not(&mut toks, *negate);
            toks.push("-s".into());
            toks.push(prefix(cidr.net()));
        }
    }
    for m in &rule.matches {
        if let Match::Destination { cidr, negate } = m {
            not(&mut toks, *negate);
            toks.push("-d".into());
            toks.push(prefix(cidr.net()));
        }
    }
    for m in &rule.matches {
        if let Match::InInterface(i) = m {
            toks.push("-i".into());
            toks.push(i.clone());
        }
    }
    for m in &rule.matches {
        match m {
            Match::OutInterface(i) => {
                toks.push("-o".into());
                toks.push(i.clone());
            }
            Match::NotOutInterface(i) => {
                toks.extend(["!".into(), "-o".into(), i.clone()]);
            }
            _ => {}
        }
    }
    let proto = rule.protocol();
    if let Some(p) = proto {
        toks.push("-p".into());
        toks.push(p.name().into());
    }
    // Match modules in the order they were given; port matches share the implicit module of
    // the protocol (`-m tcp`), printed where the first of them appears, source port first.
    let mut ports_done = false;
    for m in &rule.matches {
        match m {
            Match::DestPort { .. } | Match::SourcePort { .. } | Match::ProtoModule
                if !ports_done =>
            {
                ports_done = true;
                toks.push("-m".into());
                toks.push(proto.unwrap_or(Proto::Tcp).name().into());
                for pm in &rule.matches {
                    if let Match::SourcePort { port, negate } = pm {
                        not(&mut toks, *negate);
                        toks.push("--sport".into());
                        toks.push(port.to_string());
                    }
                }
                for pm in &rule.matches {
                    if let Match::DestPort { port, negate } = pm {
                        not(&mut toks, *negate);
                        toks.push("--dport".into());
                        toks.push(port.to_string());
                    }
                }
            }
            Match::DestPorts { ports, negate } => {
                toks.push("-m".into());
                toks.push("multiport".into());
                not(&mut toks, *negate);
                toks.push("--dports".into());
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                toks.push(list.join(","));
            }
            Match::Owner { kind, id, negate } => {
                toks.push("-m".into());
                toks.push("owner".into());
                not(&mut toks, *negate);
                toks.push(
                    match kind {
                        OwnerKind::Uid => "--uid-owner",
                        OwnerKind::Gid => "--gid-owner",
                    }
                    .into(),
                );
                toks.push(id.clone());
            }
            Match::Mark { mark, negate } => {
                toks.push("-m".into());
                toks.push("mark".into());
                not(&mut toks, *negate);
                toks.push("--mark".into());
                toks.push(format!("{mark:#x}"));
            }
            Match::ConnMark { mark } => {
                toks.push("-m".into());
                toks.push("connmark".into());
                toks.push("--mark".into());
                toks.push(format!("{mark:#x}"));
            }
            Match::CtState(states) => {
                toks.push("-m".into());
                toks.push("conntrack".into());
                toks.push("--ctstate".into());
                let order = [
                    CtState::Invalid,
                    CtState::New,
                    CtState::Related,
                    CtState::Established,
                ];
                let list: Vec<&str> = order
                    .iter()
                    .filter(|s| states.contains(s))
                    .map(|s| s.iptables_name())
                    .collect();
                toks.push(list.join(","));
            }
            Match::MarkMasked { mark, mask, negate } => {
                toks.push("-m".into());
                toks.push("mark".into());
                not(&mut toks, *negate);
                toks.push("--mark".into());
                toks.push(format!("{mark:#x}/{mask:#x}"));
            }
            Match::ConnMarkMasked { mark, mask } => {
                toks.extend(["-m".into(), "connmark".into(), "--mark".into()]);
                toks.push(format!("{mark:#x}/{mask:#x}"));
            }
            Match::SocketExists => {
                toks.extend(["-m".into(), "owner".into(), "--socket-exists".into()]);
            }
            Match::DestSet(set) => {
                toks.extend(["-m".into(), "set".into(), "--match-set".into()]);
                toks.push(set.clone());
                toks.push("dst".into());
            }
            _ => {}
        }
    }
    toks.push("-j".into());
    match &rule.target {
        Target::Jump(c) => toks.push(c.iptables_name().into()),
        Target::Return => toks.push("RETURN".into()),
        Target::Accept => toks.push("ACCEPT".into()),
        Target::Drop => toks.push("DROP".into()),
        Target::Redirect { port, .. } => {
            toks.extend(["REDIRECT".into(), "--to-ports".into(), port.to_string()]);
        }
        Target::Tproxy { port, mark, mask } => {
            let any = match family {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            };
            toks.extend([
                "TPROXY".into(),
                "--on-port".into(),
                port.to_string(),
                "--on-ip".into(),
                any.into(),
                "--tproxy-mark".into(),
                format!("{mark:#x}/{mask:#x}"),
            ]);
        }
        Target::SetMark(m) => {
            toks.extend([
                "MARK".into(),
                "--set-xmark".into(),
                format!("{m:#x}/0xffffffff"),
            ]);
        }
        Target::SaveMark | Target::RestoreMark => {
            let op = if rule.target == Target::SaveMark {
                "--save-mark"
            } else {
                "--restore-mark"
            };
            toks.extend([
                "CONNMARK".into(),
                op.into(),
                "--nfmask".into(),
                "0xffffffff".into(),
                "--ctmask".into(),
                "0xffffffff".into(),
            ]);
        }
        Target::CtZone(z) => toks.extend(["CT".into(), "--zone".into(), z.to_string()]),
        Target::SetConnMark { mark, mask } => {
            toks.extend([
                "CONNMARK".into(),
                "--set-xmark".into(),
                format!("{mark:#x}/{mask:#x}"),
            ]);
        }
        Target::RestoreMarkMasked { nfmask, ctmask } => {
            toks.extend([
                "CONNMARK".into(),
                "--restore-mark".into(),
                "--nfmask".into(),
                format!("{nfmask:#x}"),
                "--ctmask".into(),
                format!("{ctmask:#x}"),
            ]);
        }
        Target::Snat(addr) => {
            toks.extend(["SNAT".into(), "--to-source".into(), addr.to_string()]);
        }
    }
    toks.join(" ")
}

/// A prefix as iptables prints it: host bits cleared; IPv6 like glibc's `inet_ntop` (exactly 96
/// leading zero bits keep a dotted IPv4 tail: `::127.0.0.53`, but `::6`).
fn prefix(net: ipnet::IpNet) -> String {
    let net = net.trunc();
    let addr = match net.addr() {
        IpAddr::V6(a) => {
            let s = a.segments();
            if s[..6] == [0; 6] && s[6] != 0 {
                let o = a.octets();
                format!("::{}.{}.{}.{}", o[12], o[13], o[14], o[15])
            } else {
                a.to_string()
            }
        }
        a @ IpAddr::V4(_) => a.to_string(),
    };
    format!("{addr}/{}", net.prefix_len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cidr, Scope};

    #[test]
    fn rules_are_spelled_as_iptables_save_prints_them() {
        let lo = Cidr::new("127.0.0.1/32".parse().expect("cidr"));
        let r = Rule::append(Table::Nat, Chain::IstioOutput)
            .out_iface("lo")
            .not_dst(&lo)
            .proto(Proto::Tcp)
            .not_dport(15008)
            .owner(OwnerKind::Gid, "1337", false)
            .jump(Chain::IstioInRedirect);
        assert_eq!(
            rule_line(&r, Family::V4),
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT"
        );
        let t = Rule::append(Table::Mangle, Chain::IstioTproxy)
            .scope(Scope::V6)
            .proto(Proto::Tcp)
            .to(Target::Tproxy {
                port: 15006,
                mark: 1337,
                mask: 0xffff_ffff,
            });
        assert_eq!(
            rule_line(&t, Family::V6),
            "-A ISTIO_TPROXY -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff"
        );
        assert_eq!(
            prefix("::127.0.0.53/128".parse().expect("v6")),
            "::127.0.0.53/128"
        );
        assert_eq!(prefix("::1/128".parse().expect("v6")), "::1/128");
        assert_eq!(prefix("::6/128".parse().expect("v6")), "::6/128");
        assert_eq!(prefix("10.1.2.3/8".parse().expect("v4")), "10.0.0.0/8");
    }
}
