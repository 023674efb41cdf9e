//! `iptables-restore` renderer for the rule model.
//!
//! Owns the iptables spelling of rules (spec §2.4 HEAD `buildRestore`): per family, for each
//! table with rules in name order, `* <table>`, `-N` for custom chains that have rules
//! (first-use order) and then for custom jump targets not yet declared, the rules as
//! `-A <chain> ...` / `-I <chain> <n> ...`, and `COMMIT`. Meant for `iptables-restore --noflush`.
//! Also renders the removal counterpart used by reconcile, uninstall and `--cleanup-only`.

use std::fmt::Write as _;

pub use crate::model::Family;
use crate::model::{Chain, Match, OwnerKind, Position, Rule, Table, Target};
use crate::sidecar::RuleSet;

/// Built-in chains and non-chain targets are never declared (`-N`) nor deleted.
fn is_custom(chain: Chain) -> bool {
    !chain.is_builtin()
}

/// Append the rule's matches and target (everything after `-A <chain>` / `-I <chain> <n>`).
pub fn write_spec(out: &mut String, rule: &Rule) {
    let mut first = true;
    let mut tok = |out: &mut String, t: &str| {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(t);
    };
    for m in &rule.matches {
        match m {
            Match::Protocol(p) => {
                tok(out, "-p");
                tok(out, p.name());
            }
            Match::Source { cidr, negate } => {
                if *negate {
                    tok(out, "!");
                }
                tok(out, "-s");
                tok(out, cidr.as_str());
            }
            Match::Destination { cidr, negate } => {
                if *negate {
                    tok(out, "!");
                }
                tok(out, "-d");
                tok(out, cidr.as_str());
            }
            Match::InInterface(i) => {
                tok(out, "-i");
                tok(out, i);
            }
            Match::OutInterface(i) => {
                tok(out, "-o");
                tok(out, i);
            }
            Match::DestPort { port, negate } => {
                if *negate {
                    tok(out, "!");
                }
                tok(out, "--dport");
                tok(out, &port.to_string());
            }
            Match::SourcePort { port, negate } => {
                if *negate {
                    tok(out, "!");
                }
                tok(out, "--sport");
                tok(out, &port.to_string());
            }
            Match::DestPorts { ports, negate } => {
                tok(out, "-m");
                tok(out, "multiport");
                if *negate {
                    tok(out, "!");
                }
                tok(out, "--dports");
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                tok(out, &list.join(","));
            }
            Match::Owner { kind, id, negate } => {
                tok(out, "-m");
                tok(out, "owner");
                if *negate {
                    tok(out, "!");
                }
                tok(
                    out,
                    match kind {
                        OwnerKind::Uid => "--uid-owner",
                        OwnerKind::Gid => "--gid-owner",
                    },
                );
                tok(out, id);
            }
            Match::Mark { mark, negate } => {
                tok(out, "-m");
                tok(out, "mark");
                if *negate {
                    tok(out, "!");
                }
                tok(out, "--mark");
                tok(out, &mark.to_string());
            }
            Match::ConnMark { mark } => {
                tok(out, "-m");
                tok(out, "connmark");
                tok(out, "--mark");
                tok(out, &mark.to_string());
            }
            Match::CtState(states) => {
                tok(out, "-m");
                tok(out, "conntrack");
                tok(out, "--ctstate");
                let list: Vec<&str> = states.iter().map(|s| s.iptables_name()).collect();
                tok(out, &list.join(","));
            }
            Match::NotOutInterface(i) => {
                tok(out, "!");
                tok(out, "-o");
                tok(out, i);
            }
            Match::MarkMasked { mark, mask, negate } => {
                tok(out, "-m");
                tok(out, "mark");
                if *negate {
                    tok(out, "!");
                }
                tok(out, "--mark");
                tok(out, &format!("{mark:#x}/{mask:#x}"));
            }
            Match::ConnMarkMasked { mark, mask } => {
                tok(out, "-m");
                tok(out, "connmark");
                tok(out, "--mark");
                tok(out, &format!("{mark:#x}/{mask:#x}"));
            }
            Match::ProtoModule => {
                tok(out, "-m");
                tok(out, rule.protocol().map_or("tcp", |p| p.name()));
            }
            Match::SocketExists => {
                tok(out, "-m");
                tok(out, "owner");
                tok(out, "--socket-exists");
            }
            Match::DestSet(set) => {
                tok(out, "-m");
                tok(out, "set");
                tok(out, "--match-set");
                tok(out, set);
                tok(out, "dst");
            }
        }
    }
    tok(out, "-j");
    match &rule.target {
        Target::Jump(c) => tok(out, c.iptables_name()),
        Target::Return => tok(out, "RETURN"),
        Target::Accept => tok(out, "ACCEPT"),
        Target::Drop => tok(out, "DROP"),
        Target::Redirect { port, singular } => {
            tok(out, "REDIRECT");
            tok(out, if *singular { "--to-port" } else { "--to-ports" });
            tok(out, &port.to_string());
        }
        Target::Tproxy { port, mark, mask } => {
            tok(out, "TPROXY");
            tok(out, "--tproxy-mark");
            tok(out, &format!("{mark}/{mask:#x}"));
            tok(out, "--on-port");
            tok(out, &port.to_string());
        }
        Target::SetMark(m) => {
            tok(out, "MARK");
            tok(out, "--set-mark");
            tok(out, &m.to_string());
        }
        Target::SaveMark => {
            tok(out, "CONNMARK");
            tok(out, "--save-mark");
        }
        Target::RestoreMark => {
            tok(out, "CONNMARK");
            tok(out, "--restore-mark");
        }
        Target::CtZone(z) => {
            tok(out, "CT");
            tok(out, "--zone");
            tok(out, &z.to_string());
        }
        Target::SetConnMark { mark, mask } => {
            tok(out, "CONNMARK");
            tok(out, "--set-xmark");
            tok(out, &format!("{mark:#x}/{mask:#x}"));
        }
        Target::RestoreMarkMasked { nfmask, ctmask } => {
            tok(out, "CONNMARK");
            tok(out, "--restore-mark");
            tok(out, "--nfmask");
            tok(out, &format!("{nfmask:#x}"));
            tok(out, "--ctmask");
            tok(out, &format!("{ctmask:#x}"));
        }
        Target::Snat(addr) => {
            tok(out, "SNAT");
            tok(out, "--to-source");
            tok(out, &addr.to_string());
        }
    }
}

/// The rule's matches and target as an argument vector (for `iptables -C/-D ...`).
pub fn rule_spec(rule: &Rule) -> Vec<String> {
    let mut s = String::new();
    write_spec(&mut s, rule);
    // Tokens never contain spaces: interface names, ids and CIDRs are validated.
    s.split(' ').map(str::to_owned).collect()
}

/// The full argument vector of one rule for a single `iptables`/`ip6tables` call, with the
/// given operation: `-t <table> -A|-I <chain> [<n>] <spec>` for [`RuleOp::Add`],
/// `-t <table> -C <chain> <spec>` for [`RuleOp::Check`], `-t <table> -D <chain> <spec>` for
/// [`RuleOp::Delete`].
pub fn rule_args(rule: &Rule, op: RuleOp) -> Vec<String> {
    let mut v = vec!["-t".to_owned(), rule.table.name().to_owned()];
    match (op, rule.position) {
        (RuleOp::Add, Position::Append) => v.push("-A".into()),
        (RuleOp::Add, Position::Insert(_)) => v.push("-I".into()),
        (RuleOp::Check, _) => v.push("-C".into()),
        (RuleOp::Delete, _) => v.push("-D".into()),
    }
    v.push(rule.chain.iptables_name().to_owned());
    if let (RuleOp::Add, Position::Insert(n)) = (op, rule.position) {
        v.push(n.to_string());
    }
    v.extend(rule_spec(rule));
    v
}

/// Operation for [`rule_args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOp {
    Add,
    Check,
    Delete,
}

/// Per-table view of one family's rules: the rules and the custom chains to declare.
struct TableView<'a> {
    table: Table,
    rules: Vec<&'a Rule>,
    /// Custom chains that have rules (first-use order), then custom jump targets.
    chains: Vec<Chain>,
}

fn tables<'a>(rs: &'a RuleSet, family: Family) -> Vec<TableView<'a>> {
    Table::ALL
        .iter()
        .filter_map(|&table| {
            let rules: Vec<&Rule> = rs.rules_for(family).filter(|r| r.table == table).collect();
            if rules.is_empty() {
                return None;
            }
            let mut chains: Vec<Chain> = Vec::new();
            for r in &rules {
                if is_custom(r.chain) && !chains.contains(&r.chain) {
                    chains.push(r.chain);
                }
            }
            for r in &rules {
                if let Target::Jump(t) = r.target
                    && is_custom(t)
                    && !chains.contains(&t)
                {
                    chains.push(t);
                }
            }
            Some(TableView {
                table,
                rules,
                chains,
            })
        })
        .collect()
}

/// `iptables-restore --noflush` input adding `family`'s rules; empty when the family has none
/// (including v6 with IPv6 off).
pub fn render_restore(rs: &RuleSet, family: Family) -> String {
    let mut out = String::with_capacity(rs.rules.len() * 64 + 256);
    for view in tables(rs, family) {
        let _ = writeln!(out, "* {}", view.table.name());
        for c in &view.chains {
            let _ = writeln!(out, "-N {}", c.iptables_name());
        }
        for r in &view.rules {
            match r.position {
                Position::Append => {
                    let _ = write!(out, "-A {} ", r.chain.iptables_name());
                }
                Position::Insert(n) => {
                    let _ = write!(out, "-I {} {} ", r.chain.iptables_name(), n);
                }
            }
            write_spec(&mut out, r);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// `iptables-restore --noflush` input removing everything [`render_restore`] adds for
/// `family`: the rules in built-in chains are deleted (newest first), the custom chains are
/// flushed and deleted. Empty when the family has no rules.
///
/// A `:<chain> - [0:0]` line creates the chain if missing and flushes it if present, so the
/// flush/delete part never fails. The `-D` lines need the rule to exist: the transaction is
/// atomic, so on a partially-applied or foreign state it fails as a whole and changes nothing.
/// Use [`cleanup_commands`] for best-effort, one-rule-at-a-time removal in that case.
pub fn render_cleanup(rs: &RuleSet, family: Family) -> String {
    let mut out = String::new();
    for view in tables(rs, family) {
        let _ = writeln!(out, "* {}", view.table.name());
        for c in &view.chains {
            let _ = writeln!(out, ":{} - [0:0]", c.iptables_name());
        }
        for r in view.rules.iter().rev().filter(|r| r.chain.is_builtin()) {
            let _ = write!(out, "-D {} ", r.chain.iptables_name());
            write_spec(&mut out, r);
            out.push('\n');
        }
        for c in &view.chains {
            let _ = writeln!(out, "-X {}", c.iptables_name());
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Istio's cleanup as individual `iptables`/`ip6tables` argument vectors (program excluded):
/// every planned rule deleted in reverse order (`-t T -D ...`), then `-t T -F C` for every
/// custom chain, then `-t T -X C`. Run them all and ignore "does not exist" failures
/// (spec §2.4: that is what makes the removal best-effort and idempotent).
pub fn cleanup_commands(rs: &RuleSet, family: Family) -> Vec<Vec<String>> {
    let views = tables(rs, family);
    let mut cmds: Vec<Vec<String>> = rs
        .rules_for(family)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|r| rule_args(r, RuleOp::Delete))
        .collect();
    for flag in ["-F", "-X"] {
        for v in &views {
            for c in &v.chains {
                cmds.push(vec![
                    "-t".into(),
                    v.table.name().into(),
                    flag.into(),
                    c.iptables_name().into(),
                ]);
            }
        }
    }
    cmds
}
