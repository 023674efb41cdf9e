//! Verify-or-repair for iptables capture rules, pure: compare the `-save` form of the rules a
//! plan wants (its *desired* state) with a netns's actual `-save` output, and, when they differ,
//! build the one `iptables-restore --noflush` text that turns the actual state into exactly what
//! a fresh netns gets.
//!
//! Ownership: the caller names the custom chains that are ours (`owned`). In the tables the
//! desired state uses, or that hold one of our chains, our state is
//! * every owned custom chain and its rules, in order;
//! * the rules of the built-in chains that are ours: those the desired state has in that chain
//!   (identical lines) and any rule that jumps to an owned chain.
//!
//! Everything else (foreign chains, foreign rules in built-in chains) is left alone.
//!
//! The repair text, per table: `:CHAIN - [0:0]` for every desired and every present owned
//! chain (with `--noflush` this creates a missing chain and *flushes* an existing one, the
//! kube-proxy idiom), `-D BUILTIN n` for each of our rules in built-in chains (highest position
//! first, so positions stay valid), `-X` for owned chains the plan no longer has, then the
//! fresh restore text's `-A`/`-I` lines. One restore: iptables-nft commits it as one
//! transaction, legacy per table (the caller's snapshot rollback covers a later table failing).

use std::fmt;

const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// One chain of a parsed `-save` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedChain {
    pub name: String,
    /// `-A CHAIN …` lines, counters stripped, whitespace normalised, in order.
    pub rules: Vec<String>,
}

impl SavedChain {
    fn builtin(&self) -> bool {
        BUILTIN.contains(&self.name.as_str())
    }
}

/// One `*table … COMMIT` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<SavedChain>,
}

impl SavedTable {
    fn chain(&self, name: &str) -> Option<&SavedChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// Parse `-save` (or `-save -c`) output: tables, declared chains (`:NAME …`) and rules (`-A`),
/// counters (`[p:b] `) stripped. Comments and unknown lines are ignored.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    let mut current: Option<SavedTable> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix('*') {
            if let Some(t) = current.take() {
                tables.push(t);
            }
            current = Some(SavedTable {
                name: name.trim().to_string(),
                chains: Vec::new(),
            });
            continue;
        }
        let Some(table) = current.as_mut() else {
            continue;
        };
        if line == "COMMIT" {
            if let Some(t) = current.take() {
                tables.push(t);
            }
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if !name.is_empty() && table.chain(name).is_none() {
                table.chains.push(SavedChain {
                    name: name.to_string(),
                    rules: Vec::new(),
                });
            }
            continue;
        }
        let rule = strip_counters(line);
        let mut words = rule.split_whitespace();
        if words.next() != Some("-A") {
            continue;
        }
        let Some(chain) = words.next() else { continue };
        let normalised = rule.split_whitespace().collect::<Vec<_>>().join(" ");
        match table.chains.iter_mut().find(|c| c.name == chain) {
            Some(c) => c.rules.push(normalised),
            None => table.chains.push(SavedChain {
                name: chain.to_string(),
                rules: vec![normalised],
            }),
        }
    }
    if let Some(t) = current.take() {
        tables.push(t);
    }
    tables
}

fn strip_counters(line: &str) -> &str {
    if line.starts_with('[')
        && let Some(end) = line.find("] ")
    {
        return line[end + 2..].trim_start();
    }
    line
}

/// The target of a `-A` line (`-j X` → `X`).
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// One way the actual state differs from the desired one (within one family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    ChainMissing {
        table: String,
        chain: String,
    },
    UnexpectedChain {
        table: String,
        chain: String,
    },
    RuleMissing {
        table: String,
        rule: String,
    },
    UnexpectedRule {
        table: String,
        rule: String,
    },
    RuleDiffers {
        table: String,
        expected: String,
        found: String,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::ChainMissing { table, chain } => {
                write!(f, "chain {chain} missing (table {table})")
            }
            Drift::UnexpectedChain { table, chain } => {
                write!(f, "unexpected chain {chain} (table {table})")
            }
            Drift::RuleMissing { table, rule } => {
                write!(f, "rule `{rule}` missing (table {table})")
            }
            Drift::UnexpectedRule { table, rule } => {
                write!(f, "unexpected rule `{rule}` (table {table})")
            }
            Drift::RuleDiffers {
                table,
                expected,
                found,
            } => write!(
                f,
                "rule differs (table {table}): expected `{expected}`, found `{found}`"
            ),
        }
    }
}

/// Tables to look at: every desired table, then every actual table holding an owned chain or a
/// jump to one.
fn tables_of_interest(
    desired: &[SavedTable],
    actual: &[SavedTable],
    owned: &[String],
) -> Vec<String> {
    let mut names: Vec<String> = desired.iter().map(|t| t.name.clone()).collect();
    for t in actual {
        let ours = t.chains.iter().any(|c| {
            owned.contains(&c.name)
                || c.rules
                    .iter()
                    .any(|r| jump_target(r).is_some_and(|j| owned.iter().any(|o| o == j)))
        });
        if ours && !names.contains(&t.name) {
            names.push(t.name.clone());
        }
    }
    names
}

/// Whether `actual` (a `-save` text) holds any of our state: an owned chain or a jump to one.
/// Without it a netns gets the fresh restore text, exactly as an empty one.
pub fn has_owned(actual: &str, owned: &[String]) -> bool {
    !tables_of_interest(&[], &parse_save(actual), owned).is_empty()
}

/// Our rules of a built-in chain: (1-based position, line).
fn our_builtin_rules<'a>(
    chain: &'a SavedChain,
    desired: Option<&SavedChain>,
    owned: &[String],
) -> Vec<(usize, &'a str)> {
    chain
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            desired.is_some_and(|d| d.rules.contains(r))
                || jump_target(r).is_some_and(|j| owned.iter().any(|o| o == j))
        })
        .map(|(i, r)| (i + 1, r.as_str()))
        .collect()
}

/// The first difference between two rule lists, if any.
fn list_drift(table: &str, want: &[String], have: &[&str]) -> Option<Drift> {
    let n = want.len().max(have.len());
    for i in 0..n {
        match (want.get(i), have.get(i)) {
            (Some(w), Some(h)) if w == h => continue,
            (Some(w), Some(h)) => {
                return Some(if have[i + 1..].contains(&w.as_str()) {
                    Drift::UnexpectedRule {
                        table: table.into(),
                        rule: (*h).to_string(),
                    }
                } else if want[i + 1..].iter().any(|x| x == h) {
                    Drift::RuleMissing {
                        table: table.into(),
                        rule: w.clone(),
                    }
                } else {
                    Drift::RuleDiffers {
                        table: table.into(),
                        expected: w.clone(),
                        found: (*h).to_string(),
                    }
                });
            }
            (Some(w), None) => {
                return Some(Drift::RuleMissing {
                    table: table.into(),
                    rule: w.clone(),
                });
            }
            (None, Some(h)) => {
                return Some(Drift::UnexpectedRule {
                    table: table.into(),
                    rule: (*h).to_string(),
                });
            }
            (None, None) => break,
        }
    }
    None
}

/// How `actual` differs from `desired` (both `-save` texts); empty means identical (our state
/// exactly as a fresh netns gets it). At most one drift per chain.
pub fn diff(desired: &str, actual: &str, owned: &[String]) -> Vec<Drift> {
    let desired = parse_save(desired);
    let actual = parse_save(actual);
    let mut out = Vec::new();
    for name in tables_of_interest(&desired, &actual, owned) {
        let want = desired.iter().find(|t| t.name == name);
        let have = actual.iter().find(|t| t.name == name);
        // Custom chains the plan wants.
        for wc in want.iter().flat_map(|t| &t.chains).filter(|c| !c.builtin()) {
            match have.and_then(|t| t.chain(&wc.name)) {
                None => out.push(Drift::ChainMissing {
                    table: name.clone(),
                    chain: wc.name.clone(),
                }),
                Some(hc) => {
                    let lines: Vec<&str> = hc.rules.iter().map(String::as_str).collect();
                    out.extend(list_drift(&name, &wc.rules, &lines));
                }
            }
        }
        // Owned chains it does not want.
        for hc in have.iter().flat_map(|t| &t.chains) {
            let wanted = want.is_some_and(|t| t.chain(&hc.name).is_some());
            if !hc.builtin() && !wanted && owned.contains(&hc.name) {
                out.push(Drift::UnexpectedChain {
                    table: name.clone(),
                    chain: hc.name.clone(),
                });
            }
        }
        // Built-in chains: our rules, in order, exactly once.
        let mut builtins: Vec<&str> = Vec::new();
        for c in want
            .iter()
            .flat_map(|t| &t.chains)
            .chain(have.iter().flat_map(|t| &t.chains))
        {
            if c.builtin() && !builtins.contains(&c.name.as_str()) {
                builtins.push(&c.name);
            }
        }
        for b in builtins {
            let wc = want.and_then(|t| t.chain(b));
            let wanted: &[String] = wc.map_or(&[], |c| &c.rules);
            let ours: Vec<&str> = have
                .and_then(|t| t.chain(b))
                .map(|hc| {
                    our_builtin_rules(hc, wc, owned)
                        .into_iter()
                        .map(|(_, r)| r)
                        .collect()
                })
                .unwrap_or_default();
            out.extend(list_drift(&name, wanted, &ours));
        }
    }
    out
}

/// The `-restore --noflush` text that turns `actual` into `desired` (see module docs); `fresh`
/// is the restore text a fresh netns gets (its `-N` lines are replaced by the `:` declarations).
pub fn repair_text(desired: &str, actual: &str, fresh: &str, owned: &[String]) -> String {
    let desired_tables = parse_save(desired);
    let actual_tables = parse_save(actual);
    let mut out = String::new();
    for name in tables_of_interest(&desired_tables, &actual_tables, owned) {
        let want = desired_tables.iter().find(|t| t.name == name);
        let have = actual_tables.iter().find(|t| t.name == name);
        out.push_str(&format!("*{name}\n"));
        let mut declared: Vec<&str> = Vec::new();
        for c in want.iter().flat_map(|t| &t.chains).filter(|c| !c.builtin()) {
            declared.push(&c.name);
        }
        let mut stale: Vec<&str> = Vec::new();
        for c in have.iter().flat_map(|t| &t.chains) {
            if !c.builtin() && owned.contains(&c.name) && !declared.contains(&c.name.as_str()) {
                stale.push(&c.name);
            }
        }
        for c in declared.iter().chain(&stale) {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for hc in have.iter().flat_map(|t| &t.chains).filter(|c| c.builtin()) {
            let wc = want.and_then(|t| t.chain(&hc.name));
            for (pos, _) in our_builtin_rules(hc, wc, owned).into_iter().rev() {
                out.push_str(&format!("-D {} {pos}\n", hc.name));
            }
        }
        for c in &stale {
            out.push_str(&format!("-X {c}\n"));
        }
        for line in fresh_section(fresh, &name) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Whether `predicted` (a `-save` form) can stand for `fresh` (restore text): per table, the
/// same custom chains (`-N` vs `:`) and as many rules. A prediction that fails this (stale,
/// empty, from another plan) must not be trusted to say "identical".
pub fn prediction_fits(predicted: &str, fresh: &str) -> bool {
    let predicted = parse_save(predicted);
    let mut fresh_tables: Vec<(String, Vec<String>, usize)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in fresh.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            let name = name.trim().to_string();
            current = Some(match fresh_tables.iter().position(|(n, _, _)| *n == name) {
                Some(i) => i,
                None => {
                    fresh_tables.push((name, Vec::new(), 0));
                    fresh_tables.len() - 1
                }
            });
            continue;
        }
        let Some(i) = current else { continue };
        if let Some(chain) = line.strip_prefix("-N ") {
            fresh_tables[i].1.push(chain.trim().to_string());
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            fresh_tables[i].2 += 1;
        }
    }
    fresh_tables.len() == predicted.len()
        && fresh_tables.iter().all(|(name, chains, rules)| {
            predicted.iter().any(|t| {
                let custom: Vec<&str> = t
                    .chains
                    .iter()
                    .filter(|c| !c.builtin())
                    .map(|c| c.name.as_str())
                    .collect();
                t.name == *name
                    && custom.len() == chains.len()
                    && chains.iter().all(|c| custom.contains(&c.as_str()))
                    && t.chains.iter().map(|c| c.rules.len()).sum::<usize>() == *rules
            })
        })
}

/// The rule lines (`-A`, `-I`, …, not `-N`) of `table`'s section in restore text.
fn fresh_section<'a>(fresh: &'a str, table: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in fresh.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('*') {
            inside = name.trim() == table;
            continue;
        }
        if !inside {
            continue;
        }
        if t == "COMMIT" {
            inside = false;
        } else if t.starts_with('-') && !t.starts_with("-N ") {
            out.push(t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned() -> Vec<String> {
        [
            "ISTIO_OUTPUT",
            "ISTIO_REDIRECT",
            "ISTIO_INBOUND",
            "ISTIO_DIVERT",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    const FRESH: &str = "* nat\n-N ISTIO_OUTPUT\n-N ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
    const DESIRED: &str = "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
    const SAVED: &str = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [3:180]\n:POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n[0:0] -A POSTROUTING -d 192.0.2.0/24 -j RETURN\n[3:180] -A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n# Completed\n";

    #[test]
    fn foreign_state_alone_is_not_ours() {
        assert!(has_owned(SAVED, &owned()));
        assert!(!has_owned(
            "*nat\n:KEEP - [0:0]\n-A OUTPUT -j KEEP\nCOMMIT\n",
            &owned()
        ));
    }

    #[test]
    fn a_prediction_must_fit_the_fresh_text() {
        assert!(prediction_fits(DESIRED, FRESH));
        assert!(!prediction_fits("", FRESH));
        assert!(!prediction_fits(
            &DESIRED.replace("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n", ""),
            FRESH
        ));
        assert!(!prediction_fits(
            &format!("{DESIRED}*raw\n:ISTIO_INBOUND - [0:0]\nCOMMIT\n"),
            FRESH
        ));
    }

    #[test]
    fn identical_state_has_no_drift_and_foreign_rules_are_ignored() {
        assert_eq!(diff(DESIRED, SAVED, &owned()), vec![]);
    }

    #[test]
    fn empty_netns_reports_missing_chains_and_jumps() {
        let d = diff(DESIRED, "", &owned());
        let text: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            vec![
                "chain ISTIO_OUTPUT missing (table nat)",
                "chain ISTIO_REDIRECT missing (table nat)",
                "rule `-A OUTPUT -j ISTIO_OUTPUT` missing (table nat)",
            ]
        );
    }

    #[test]
    fn drift_is_named_and_repaired_in_one_restore() {
        // A duplicated jump, a flushed chain, a stale owned chain with a jump to it.
        let drifted = "*nat\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_DIVERT - [0:0]\n-A POSTROUTING -d 192.0.2.0/24 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -d 192.0.2.1/32 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_DIVERT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
        let text: Vec<String> = diff(DESIRED, drifted, &owned())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "rule `-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001` missing (table nat)",
                "unexpected chain ISTIO_DIVERT (table nat)",
                "unexpected rule `-A OUTPUT -j ISTIO_OUTPUT` (table nat)",
            ]
        );
        assert_eq!(
            repair_text(DESIRED, drifted, FRESH, &owned()),
            "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_DIVERT - [0:0]\n-D OUTPUT 4\n-D OUTPUT 3\n-D OUTPUT 1\n-X ISTIO_DIVERT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n"
        );
    }

    #[test]
    fn a_stale_table_is_cleaned_and_a_changed_rule_is_reported() {
        let saved = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15002\nCOMMIT\n*raw\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n-A OUTPUT -j ISTIO_INBOUND\nCOMMIT\n";
        let text: Vec<String> = diff(DESIRED, saved, &owned())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            vec![
                "rule differs (table nat): expected `-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001`, found `-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15002`",
                "unexpected chain ISTIO_INBOUND (table raw)",
                "unexpected rule `-A OUTPUT -j ISTIO_INBOUND` (table raw)",
            ]
        );
        let repair = repair_text(DESIRED, saved, FRESH, &owned());
        assert!(
            repair
                .ends_with("*raw\n:ISTIO_INBOUND - [0:0]\n-D OUTPUT 1\n-X ISTIO_INBOUND\nCOMMIT\n"),
            "{repair}"
        );
    }
}
