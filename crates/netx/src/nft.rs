//! Native nftables: apply `nft -f -` text inside a network namespace (one kernel transaction,
//! atomic by nature), list rules, and snapshot/restore the tables a transaction touches.

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

/// Snapshot the tables that `text` touches.
pub fn snapshot_here(ns: &InNetns<'_>, text: &str) -> Result<NftSnapshot, NetxError> {
    let mut tables = Vec::new();
    for table in tables_in(text) {
        let listing = list_table_here(ns, &table)?;
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
}
