//! Byte-for-byte snapshots of a network namespace, for "uninstall leaves it exactly as it
//! was" assertions: iptables of both flavours and both families, `nft list ruleset`, every
//! per-netns IPv4/IPv6 sysctl (`/proc/sys/net/ipv4/*`, `/proc/sys/net/ipv{4,6}/conf/*/*`), ip
//! rules, every routing table, links and ipsets.
//!
//! Only values that change on their own are normalised: `iptables-save` comment lines (they
//! carry timestamps) and counters, nft rule counters, and IPv6 link-local / multicast routes
//! (they appear a moment after a link comes up). Anything else that differs is a difference.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One snapshot: section name → normalised text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsSnapshot {
    pub sections: BTreeMap<String, String>,
}

/// Top-level `/proc/sys/net/ipv4` entries that change without anyone touching them.
const VOLATILE: &[&str] = &["tcp_fastopen_key"];

impl NetnsSnapshot {
    /// Snapshot the netns at `netns` (every command and `/proc/sys` read runs inside it).
    pub fn capture(netns: &Path) -> Result<NetnsSnapshot, String> {
        let mut sections = BTreeMap::new();
        for prog in [
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
        ] {
            sections.insert(prog.to_string(), normalize_save(&run(netns, prog, &[])?));
        }
        sections.insert(
            "nft list ruleset".into(),
            normalize_nft(&run(netns, "nft", &["list", "ruleset"])?),
        );
        for (name, args) in [
            ("ip -4 rule", vec!["-4", "rule"]),
            ("ip -6 rule", vec!["-6", "rule"]),
            (
                "ip -4 route show table all",
                vec!["-4", "route", "show", "table", "all"],
            ),
            (
                "ip -6 route show table all",
                vec!["-6", "route", "show", "table", "all"],
            ),
            // One line per link (`-o`), so a link's whole entry can be told apart.
            ("ip -o -d link", vec!["-o", "-d", "link", "show"]),
        ] {
            let text = run(netns, "ip", &args)?;
            let text = if name.contains("route") {
                text.lines()
                    .filter(|l| !l.contains("fe80::") && !l.contains("ff00::/8"))
                    .map(|l| format!("{l}\n"))
                    .collect()
            } else {
                text
            };
            sections.insert(name.to_string(), text);
        }
        sections.insert("ipset list".into(), run(netns, "ipset", &["list"])?);
        sections.insert("sysctls".into(), sysctls(netns)?);
        Ok(NetnsSnapshot { sections })
    }

    /// This snapshot without the lines containing `needle` (e.g. a pod veth the test
    /// deleted on purpose, with its routes and sysctls).
    pub fn without(&self, needle: &str) -> NetnsSnapshot {
        NetnsSnapshot {
            sections: self
                .sections
                .iter()
                .map(|(k, v)| {
                    let kept: String = v
                        .lines()
                        .filter(|l| !l.contains(needle))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    (k.clone(), kept)
                })
                .collect(),
        }
    }

    /// Section-by-section differences (`name:` then the differing lines), empty when equal.
    pub fn diff(&self, after: &NetnsSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            self.sections.keys().chain(after.sections.keys()).collect();
        for name in names {
            let (a, b) = (
                self.sections.get(name).map(String::as_str).unwrap_or(""),
                after.sections.get(name).map(String::as_str).unwrap_or(""),
            );
            if a == b {
                continue;
            }
            let al: Vec<&str> = a.lines().collect();
            let bl: Vec<&str> = b.lines().collect();
            let mut d = format!("{name}:\n");
            for l in al.iter().filter(|l| !bl.contains(l)) {
                d.push_str(&format!("- {l}\n"));
            }
            for l in bl.iter().filter(|l| !al.contains(l)) {
                d.push_str(&format!("+ {l}\n"));
            }
            if d.lines().count() == 1 {
                d.push_str("  (same lines, different order or repetition)\n");
            }
            out.push(d);
        }
        out
    }

    /// Bytes that differ: the total length of differing lines (0 = identical).
    pub fn residue_bytes(&self, after: &NetnsSnapshot) -> usize {
        self.diff(after)
            .iter()
            .flat_map(|d| d.lines().skip(1))
            .filter(|l| l.starts_with("- ") || l.starts_with("+ "))
            .map(|l| l.len() - 2 + 1)
            .sum()
    }

    /// Panic with the differences unless `after` equals this snapshot.
    pub fn assert_same(&self, after: &NetnsSnapshot, what: &str) {
        let d = self.diff(after);
        assert!(
            d.is_empty(),
            "{what}: the netns differs from its snapshot:\n{}",
            d.join("\n")
        );
    }
}

/// Snapshot `netns` and assert it equals `before` (the test helper every installing test
/// ends with).
pub fn assert_netns_unchanged(netns: &Path, before: &NetnsSnapshot, what: &str) {
    let after = NetnsSnapshot::capture(netns)
        .unwrap_or_else(|e| panic!("{what}: snapshot of {}: {e}", netns.display()));
    before.assert_same(&after, what);
}

fn run(netns: &Path, program: &str, args: &[&str]) -> Result<String, String> {
    let out = meshcni_netx::run_in_netns(netns, || Command::new(program).args(args).output())
        .map_err(|e| format!("enter {}: {e}", netns.display()))?
        .map_err(|e| format!("spawn `{program} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` in {} failed ({}): {}",
            args.join(" "),
            netns.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables-save` output without comment lines and with counters zeroed.
pub fn normalize_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .map(|l| l + "\n")
        .collect()
}

/// `nft list ruleset` with rule counters zeroed.
pub fn normalize_nft(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut fixed: Vec<&str> = Vec::with_capacity(words.len());
        let mut i = 0;
        while i < words.len() {
            fixed.push(words[i]);
            if words[i] == "counter"
                && words.get(i + 1) == Some(&"packets")
                && words.get(i + 3) == Some(&"bytes")
            {
                fixed.extend(["packets", "0", "bytes", "0"]);
                i += 5;
                continue;
            }
            i += 1;
        }
        out.push_str(indent);
        out.push_str(&fixed.join(" "));
        out.push('\n');
    }
    out
}

/// Every readable per-netns IPv4/IPv6 sysctl: the files directly in `/proc/sys/net/ipv4` and
/// all of `/proc/sys/net/ipv{4,6}/conf/<iface>/`, as `path=value` lines.
fn sysctls(netns: &Path) -> Result<String, String> {
    meshcni_netx::run_in_netns(netns, || {
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        let list = |dir: &Path| -> Vec<std::path::PathBuf> {
            let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        for p in list(Path::new("/proc/sys/net/ipv4")) {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_file() && !VOLATILE.contains(&name) {
                files.push(p);
            }
        }
        for fam in ["ipv4", "ipv6"] {
            for iface in list(&Path::new("/proc/sys/net").join(fam).join("conf")) {
                files.extend(list(&iface).into_iter().filter(|p| p.is_file()));
            }
        }
        let mut out = String::new();
        for f in files {
            // Write-only or privileged entries (e.g. `stable_secret` when unset) are skipped.
            if let Ok(v) = std::fs::read_to_string(&f) {
                out.push_str(&format!("{}={}\n", f.display(), v.trim_end()));
            }
        }
        out
    })
    .map_err(|e| format!("enter {}: {e}", netns.display()))
}
