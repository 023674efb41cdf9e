//! Applying `iptables-restore` text inside a network namespace: binary (legacy vs nft)
//! detection per netns, `-save` snapshots, `--noflush` restores and table-level rollback.
//!
//! Safety measures applied to every iptables child process:
//! * **Pod-scoped xtables lock**: `XTABLES_LOCKFILE=<netns path>` (honoured by iptables ≥ 1.8.6)
//!   so pods never queue behind the host's `/run/xtables.lock`; legacy restores also get
//!   `--wait=30`. Older iptables ignore the variable and fall back to the global lock, which is
//!   still correct, only slower.
//! * **No NSS lookups**: `/etc/nsswitch.conf` is bind-mounted to `/dev/null` in a private mount
//!   namespace of the child (see [`crate::sys`]); `-m owner --uid-owner 1337` then resolves
//!   through local files / numeric parsing only.

use std::ffi::OsString;

use crate::exec::{Cmd, find_program};
use crate::netns::InNetns;
use crate::{IpFamily, NetxError};

/// Which iptables binary family to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IptablesFlavor {
    /// `iptables-legacy*` (x_tables kernel API).
    Legacy,
    /// `iptables-nft*` (nf_tables kernel API).
    Nft,
    /// Plain `iptables*`, whatever the distribution's alternative points at.
    Plain,
}

impl IptablesFlavor {
    /// Parse the `FORCE_IPTABLES_BINARY` value: `legacy` or `nft`.
    pub fn parse_forced(value: &str) -> Option<Self> {
        match value.trim() {
            "legacy" => Some(IptablesFlavor::Legacy),
            "nft" => Some(IptablesFlavor::Nft),
            _ => None,
        }
    }

    /// The `FORCE_IPTABLES_BINARY` override from the environment, if set to a known value.
    pub fn forced_from_env() -> Option<Self> {
        let value = std::env::var("FORCE_IPTABLES_BINARY").ok()?;
        let parsed = Self::parse_forced(&value);
        if parsed.is_none() && !value.trim().is_empty() {
            tracing::warn!(
                value,
                "ignoring FORCE_IPTABLES_BINARY: expected `legacy` or `nft`"
            );
        }
        parsed
    }

    fn suffix(self) -> &'static str {
        match self {
            IptablesFlavor::Legacy => "-legacy",
            IptablesFlavor::Nft => "-nft",
            IptablesFlavor::Plain => "",
        }
    }

    /// `iptables-legacy`, `ip6tables-nft`, `iptables`, …
    pub fn binary(self, family: IpFamily) -> String {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        format!("{base}{}", self.suffix())
    }

    /// `<binary>-save`.
    pub fn save_binary(self, family: IpFamily) -> String {
        format!("{}-save", self.binary(family))
    }

    /// `<binary>-restore`.
    pub fn restore_binary(self, family: IpFamily) -> String {
        format!("{}-restore", self.binary(family))
    }
}

/// Knobs for running iptables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesOptions {
    /// Skip detection and use this flavor (`FORCE_IPTABLES_BINARY`).
    pub force: Option<IptablesFlavor>,
    /// Bind-mount `/dev/null` over `/etc/nsswitch.conf` for the child (default true).
    pub isolate_nss: bool,
    /// Point `XTABLES_LOCKFILE` at the netns file (default true).
    pub pod_scoped_lock: bool,
    /// `--wait` seconds for legacy restores (default 30).
    pub wait_secs: u32,
}

impl Default for IptablesOptions {
    fn default() -> Self {
        IptablesOptions {
            force: None,
            isolate_nss: true,
            pod_scoped_lock: true,
            wait_secs: 30,
        }
    }
}

impl IptablesOptions {
    /// Defaults plus `FORCE_IPTABLES_BINARY` from the environment.
    pub fn from_env() -> Self {
        IptablesOptions {
            force: IptablesFlavor::forced_from_env(),
            ..Self::default()
        }
    }

    fn cmd<'a>(&self, ns: &InNetns<'_>, program: &'a str) -> Cmd<'a> {
        let mut cmd = Cmd::new(program);
        cmd.isolate_nss = self.isolate_nss;
        if self.pod_scoped_lock {
            cmd.env
                .push(("XTABLES_LOCKFILE", OsString::from(ns.path().as_os_str())));
        }
        cmd
    }
}

/// Lines of a `-save` output that are rules (`-A …`).
fn rule_lines(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Minimum number of legacy rules already present for legacy to win (Istio's heuristic: a
/// netns that already has legacy rules was set up by a legacy host; a fresh pod netns has none).
const LEGACY_RULES_THRESHOLD: usize = 3;

/// Choose the iptables flavor for the netns this thread is in (Istio `DetectIptablesVersion`):
/// forced flavor if any; else legacy if `iptables-legacy-save` works and the netns already has
/// ≥ 3 legacy rules (v4 + v6); else nft if usable; else plain `iptables`.
///
/// "Usable nft" = `iptables-nft-save` runs here and a probe rule (`-t nat -A INPUT -p 255 -j
/// RETURN`, then `-D`) can be added and deleted. Unlike Istio, the probe runs in a throwaway
/// network namespace (so the pod netns is left without a stray empty `nat` table), and its
/// result is cached for the life of the process.
pub fn detect_here(ns: &InNetns<'_>, opts: &IptablesOptions) -> Result<IptablesFlavor, NetxError> {
    if let Some(forced) = opts.force {
        return Ok(forced);
    }
    let legacy = IptablesFlavor::Legacy;
    if find_program(&legacy.save_binary(IpFamily::V4)).is_some() {
        let mut rules = 0;
        let mut works = false;
        for family in [IpFamily::V4, IpFamily::V6] {
            if let Ok(text) = save_here(ns, opts, legacy, family) {
                works = true;
                rules += rule_lines(&text);
            }
        }
        if works && rules >= LEGACY_RULES_THRESHOLD {
            return Ok(legacy);
        }
    }
    let nft = IptablesFlavor::Nft;
    if find_program(&nft.save_binary(IpFamily::V4)).is_some()
        && save_here(ns, opts, nft, IpFamily::V4).is_ok()
        && nft_probe_ok(opts)
    {
        return Ok(nft);
    }
    if find_program(&IptablesFlavor::Plain.restore_binary(IpFamily::V4)).is_some() {
        return Ok(IptablesFlavor::Plain);
    }
    Err(NetxError::NoIptables {
        netns: ns.path().to_path_buf(),
        detail: "none of iptables-legacy (with existing rules), iptables-nft or iptables is usable"
            .to_string(),
    })
}

fn nft_probe_ok(opts: &IptablesOptions) -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let bin = IptablesFlavor::Nft.binary(IpFamily::V4);
        let probe = ["-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"];
        let result = crate::netns::with_scratch_netns(|scratch| {
            let run = |op: &str| {
                let mut cmd = opts.cmd(scratch, &bin);
                cmd.env.clear(); // the scratch netns path is not a lock file
                for (i, a) in probe.iter().enumerate() {
                    cmd = cmd.arg(if i == 2 { op } else { a });
                }
                cmd.run(scratch)
            };
            run("-A").and_then(|_| run("-D"))
        });
        match result {
            Ok(Ok(_)) => true,
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(error = %e, "iptables-nft probe failed");
                false
            }
        }
    })
}

/// `<flavor>-save` for one family in the current netns, with the `# Generated/Completed`
/// comment lines (which carry timestamps) removed so that outputs compare byte for byte.
pub fn save_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
) -> Result<String, NetxError> {
    let bin = flavor.save_binary(family);
    let out = opts.cmd(ns, &bin).run(ns)?;
    Ok(strip_comments(&out))
}

/// [`save_here`] from any thread.
pub fn save(
    netns: &std::path::Path,
    flavor: IptablesFlavor,
    family: IpFamily,
) -> Result<String, NetxError> {
    crate::netns::with_netns(netns, |ns| {
        save_here(ns, &IptablesOptions::default(), flavor, family)
    })?
}

fn strip_comments(save: &str) -> String {
    let mut out = String::with_capacity(save.len());
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Feed `text` to `<flavor>-restore` in the current netns. `noflush` keeps existing rules of
/// the tables named in `text` (the apply path); without it those tables are replaced wholesale
/// (the rollback path).
pub fn restore_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
    text: &str,
    noflush: bool,
) -> Result<(), NetxError> {
    let bin = flavor.restore_binary(family);
    let mut cmd = opts.cmd(ns, &bin);
    if noflush {
        cmd = cmd.arg("--noflush");
    }
    if flavor == IptablesFlavor::Legacy {
        cmd = cmd.arg(format!("--wait={}", opts.wait_secs));
    }
    cmd.stdin = Some(text.as_bytes());
    cmd.run(ns).map(|_| ())
}

/// [`restore_here`] with `--noflush` from any thread, flavor detected per [`detect_here`].
pub fn apply(
    netns: &std::path::Path,
    family: IpFamily,
    text: &str,
) -> Result<IptablesFlavor, NetxError> {
    crate::netns::with_netns(netns, |ns| {
        let opts = IptablesOptions::from_env();
        let flavor = detect_here(ns, &opts)?;
        restore_here(ns, &opts, flavor, family, text, true)?;
        Ok(flavor)
    })?
}

/// Tables named in restore text (`*nat` → `nat`), in order of appearance, deduplicated.
pub fn tables_in(restore: &str) -> Vec<String> {
    let mut tables: Vec<String> = Vec::new();
    for line in restore.lines() {
        if let Some(name) = line.trim().strip_prefix('*') {
            let name = name.trim().to_string();
            if !name.is_empty() && !tables.contains(&name) {
                tables.push(name);
            }
        }
    }
    tables
}

/// The `*table … COMMIT` section of `-save` output for `table`, if present.
pub fn table_section(save: &str, table: &str) -> Option<String> {
    let mut out = String::new();
    let mut inside = false;
    for line in save.lines() {
        if !inside {
            if line.trim().strip_prefix('*').map(str::trim) == Some(table) {
                inside = true;
                out.push_str(line);
                out.push('\n');
            }
        } else {
            out.push_str(line);
            out.push('\n');
            if line.trim() == "COMMIT" {
                return Some(out);
            }
        }
    }
    None
}

/// Restore text that puts `tables` back exactly as in `snapshot` when applied *without*
/// `--noflush`. A table missing from the snapshot becomes an empty section, i.e. it is flushed
/// and its user chains deleted. Returns the text and the tables that were absent.
pub fn rollback_text(snapshot: &str, tables: &[String]) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut absent = Vec::new();
    for table in tables {
        match table_section(snapshot, table) {
            Some(section) => text.push_str(&section),
            None => {
                text.push_str(&format!("*{table}\nCOMMIT\n"));
                absent.push(table.clone());
            }
        }
    }
    (text, absent)
}

/// Put `tables` back as they were in `snapshot` (a [`save_here`] output). For the nft flavor,
/// tables that did not exist before are deleted with `nft delete table` afterwards (best
/// effort), so that `-save` output matches the snapshot byte for byte.
pub fn rollback_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
    snapshot: &str,
    tables: &[String],
) -> Result<(), NetxError> {
    if tables.is_empty() {
        return Ok(());
    }
    let (text, absent) = rollback_text(snapshot, tables);
    restore_here(ns, opts, flavor, family, &text, false)?;
    if flavor == IptablesFlavor::Nft && find_program("nft").is_some() {
        let nft_family = match family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        for table in absent {
            let deleted = Cmd::new("nft")
                .arg("delete")
                .arg("table")
                .arg(nft_family)
                .arg(table.clone())
                .run(ns);
            if let Err(e) = deleted {
                tracing::debug!(error = %e, table, "could not delete table created by a failed apply");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j RETURN\nCOMMIT\n*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n";

    #[test]
    fn binaries_per_flavor_and_family() {
        assert_eq!(
            IptablesFlavor::Legacy.restore_binary(IpFamily::V6),
            "ip6tables-legacy-restore"
        );
        assert_eq!(
            IptablesFlavor::Nft.save_binary(IpFamily::V4),
            "iptables-nft-save"
        );
        assert_eq!(IptablesFlavor::Plain.binary(IpFamily::V4), "iptables");
    }

    #[test]
    fn forced_flavor_parsing() {
        assert_eq!(
            IptablesFlavor::parse_forced("legacy"),
            Some(IptablesFlavor::Legacy)
        );
        assert_eq!(
            IptablesFlavor::parse_forced(" nft "),
            Some(IptablesFlavor::Nft)
        );
        assert_eq!(IptablesFlavor::parse_forced("auto"), None);
    }

    #[test]
    fn tables_are_listed_once_in_order() {
        let text = "* nat\n-A OUTPUT -j RETURN\nCOMMIT\n*mangle\nCOMMIT\n*nat\nCOMMIT\n";
        assert_eq!(
            tables_in(text),
            vec!["nat".to_string(), "mangle".to_string()]
        );
    }

    #[test]
    fn sections_are_cut_from_save_output() {
        assert_eq!(
            table_section(SAVE, "nat").as_deref(),
            Some(
                "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
            )
        );
        assert_eq!(table_section(SAVE, "raw"), None);
    }

    #[test]
    fn rollback_restores_present_tables_and_flushes_absent_ones() {
        let (text, absent) = rollback_text(SAVE, &["nat".to_string(), "raw".to_string()]);
        assert_eq!(
            text,
            "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n*raw\nCOMMIT\n"
        );
        assert_eq!(absent, vec!["raw".to_string()]);
    }

    #[test]
    fn comments_are_stripped_and_rules_counted() {
        let raw = "# Generated by iptables-save v1.8.9 on Thu\n*nat\n-A OUTPUT -j RETURN\n-A OUTPUT -j RETURN\nCOMMIT\n# Completed on Thu\n";
        assert_eq!(
            strip_comments(raw),
            "*nat\n-A OUTPUT -j RETURN\n-A OUTPUT -j RETURN\nCOMMIT\n"
        );
        assert_eq!(rule_lines(raw), 2);
    }
}
