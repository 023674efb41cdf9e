//! Applying `iptables-restore` text inside a network namespace: binary (legacy vs nft)
//! detection per netns, `-save` snapshots, `--noflush` restores and table-level rollback.
//!
//! Cost matters here: a CNI plugin process does one ADD, so nothing can be cached across pods,
//! and every exec costs ≈ 2 ms. On a fresh pod netns the capture transaction execs exactly one
//! `iptables-nft-restore` per family: detection reads `/proc/thread-self/net/ip{,6}_tables_names`
//! and dumps nf_tables tables over netlink instead of running `-save`/probe commands
//! ([`detect_fast_here`]), and the snapshot is skipped for tables the kernel does not have
//! ([`snapshot_here`]).
//!
//! Safety measures applied to every iptables child process:
//! * **Pod-scoped xtables lock**: `XTABLES_LOCKFILE=<netns path>` (honoured by iptables ≥ 1.8.6)
//!   so pods never queue behind the host's `/run/xtables.lock`; legacy restores also get
//!   `--wait=30`. Older iptables ignore the variable and fall back to the global lock, which is
//!   still correct, only slower. The host/node netns instead uses the global lock
//!   ([`IptablesOptions::lock_file`], `/run/xtables.lock` there) so it serialises with
//!   kube-proxy and every other writer of that netns.
//! * **Time limit**: every child is killed after [`IptablesOptions::timeout`].
//! * **No NSS lookups**: `/etc/nsswitch.conf` is bind-mounted to `/dev/null` in a private mount
//!   namespace of the child (see [`crate::sys`]); `-m owner --uid-owner 1337` then resolves
//!   through local files / numeric parsing only.

use std::ffi::OsString;

use crate::exec::{Cmd, find_program};
use crate::netns::InNetns;
use crate::{IpFamily, NetxError, nft};

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
    /// `XTABLES_LOCKFILE` for every command, overriding `pod_scoped_lock`: the host/node netns
    /// must share the lock kube-proxy and every other writer there use (`/run/xtables.lock`).
    pub lock_file: Option<std::path::PathBuf>,
    /// Each iptables child is killed after this long (an error naming it).
    pub timeout: std::time::Duration,
}

impl Default for IptablesOptions {
    fn default() -> Self {
        IptablesOptions {
            force: None,
            isolate_nss: true,
            pod_scoped_lock: true,
            wait_secs: 30,
            lock_file: None,
            timeout: crate::exec::DEFAULT_TIMEOUT,
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
        cmd.timeout = self.timeout;
        if let Some(lock) = &self.lock_file {
            cmd.env
                .push(("XTABLES_LOCKFILE", OsString::from(lock.as_os_str())));
        } else if self.pod_scoped_lock {
            cmd.env.push(("XTABLES_LOCKFILE", lock_path(ns.path())));
        }
        cmd
    }
}

/// The pod-scoped xtables lock file for the netns file `netns`, as a child process must name
/// it: `/proc/self/…` and `/proc/thread-self/…` (e.g. `/proc/self/fd/N` of a namespace fd the
/// caller holds) would resolve to the *child's* fd table, where `N` is closed or another file;
/// `/proc/<our pid>/fd/N` is the same namespace file for every process. (`/proc/self/ns/net`
/// stays: in the child it is the netns the child runs in, the target.)
pub fn lock_path(netns: &std::path::Path) -> OsString {
    for prefix in ["/proc/self/", "/proc/thread-self/"] {
        if let Ok(rest) = netns.strip_prefix(prefix)
            && rest.starts_with("fd")
        {
            return std::path::Path::new("/proc")
                .join(std::process::id().to_string())
                .join(rest)
                .into_os_string();
        }
    }
    netns.as_os_str().to_owned()
}

/// Lines of a `-save` output that are rules (`-A …`).
fn rule_lines(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Minimum number of legacy rules already present for legacy to win (Istio's heuristic: a
/// netns that already has legacy rules was set up by a legacy host; a fresh pod netns has none).
const LEGACY_RULES_THRESHOLD: usize = 3;

/// The result of flavor detection, plus what detection learnt that the snapshot can reuse.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The chosen flavor.
    pub flavor: IptablesFlavor,
    /// nft was chosen because nf_tables answers over netlink and `iptables-nft-restore` exists,
    /// but Istio's add-a-probe-rule check has not run yet: the real restore is the probe. If it
    /// fails, [`nft_probe_ok`] decides whether nft was unusable after all (→ plain).
    pub nft_unverified: bool,
    /// Legacy table names per family (v4, v6) from `/proc/thread-self/net/*_tables_names`;
    /// `None` if unknown (unreadable).
    legacy_tables: [Option<Vec<String>>; 2],
    /// `*-legacy-save` outputs run by detection (v4, v6).
    legacy_saves: [Option<String>; 2],
    /// nf_tables tables of the netns (`None` if not queried or not available).
    nft_tables: Option<Vec<nft::NftTable>>,
}

impl Detection {
    /// A detection result that is just `flavor` (nothing learnt, nothing deferred).
    pub fn only(flavor: IptablesFlavor) -> Self {
        Detection {
            flavor,
            nft_unverified: false,
            legacy_tables: [None, None],
            legacy_saves: [None, None],
            nft_tables: None,
        }
    }
}

fn family_index(family: IpFamily) -> usize {
    match family {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

/// Names of the x_tables (legacy) tables that exist in the netns of the calling thread, read
/// from `/proc/thread-self/net/{ip,ip6}_tables_names` (per *thread*: `/proc/self/net` would show
/// the main thread's netns). A missing file means the x_tables module is not loaded, hence no
/// legacy table anywhere. `None` if the file exists but cannot be read.
pub fn legacy_tables_here(_ns: &InNetns<'_>, family: IpFamily) -> Option<Vec<String>> {
    let file = match family {
        IpFamily::V4 => "/proc/thread-self/net/ip_tables_names",
        IpFamily::V6 => "/proc/thread-self/net/ip6_tables_names",
    };
    match std::fs::read_to_string(file) {
        Ok(text) => Some(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Vec::new()),
        Err(e) => {
            tracing::debug!(error = %e, file, "cannot read legacy table names");
            None
        }
    }
}

/// Choose the iptables flavor for the netns this thread is in (Istio `DetectIptablesVersion`):
/// forced flavor if any; else legacy if `iptables-legacy-save` works and the netns already has
/// ≥ 3 legacy rules (v4 + v6); else nft if usable; else plain `iptables`.
///
/// "Usable nft" = nf_tables can be read here and a probe rule (`-t nat -A INPUT -p 255 -j
/// RETURN`) can be added with `iptables-nft`. Unlike Istio, the probe runs in a throwaway
/// network namespace (so the pod netns is left without a stray empty `nat` table), and its
/// result is cached for the life of the process. See [`detect_fast_here`] for the exec-free
/// variant the capture transaction uses.
pub fn detect_here(ns: &InNetns<'_>, opts: &IptablesOptions) -> Result<IptablesFlavor, NetxError> {
    let detection = detect_fast_here(ns, opts)?;
    if detection.nft_unverified && !nft_probe_ok(opts) {
        return plain_or_none(ns);
    }
    Ok(detection.flavor)
}

/// [`detect_here`] without any exec on a fresh pod netns:
/// * legacy rules are only counted (`*-legacy-save`) when `/proc/thread-self/net/ip{,6}_tables_names`
///   lists a table — a fresh netns has none, so it has fewer than 3 legacy rules;
/// * nft counts as usable when an nf_tables table dump over netlink succeeds here (the kernel
///   side of `iptables-nft-save` working) and `iptables-nft-restore` exists. The probe rule is
///   deferred ([`Detection::nft_unverified`]): the caller's real restore is the probe, and only
///   if it fails is [`nft_probe_ok`] consulted, which keeps Istio's choice rule.
pub fn detect_fast_here(ns: &InNetns<'_>, opts: &IptablesOptions) -> Result<Detection, NetxError> {
    let legacy_tables = [
        legacy_tables_here(ns, IpFamily::V4),
        legacy_tables_here(ns, IpFamily::V6),
    ];
    let mut detection = Detection {
        flavor: IptablesFlavor::Plain,
        nft_unverified: false,
        legacy_tables,
        legacy_saves: [None, None],
        nft_tables: None,
    };
    if let Some(forced) = opts.force {
        detection.flavor = forced;
        if forced == IptablesFlavor::Nft {
            detection.nft_tables = nft::kernel_tables_here(ns).ok();
        }
        return Ok(detection);
    }
    let legacy = IptablesFlavor::Legacy;
    if find_program(&legacy.save_binary(IpFamily::V4)).is_some() {
        let mut rules = 0;
        let mut works = false;
        for family in [IpFamily::V4, IpFamily::V6] {
            let i = family_index(family);
            if detection.legacy_tables[i]
                .as_ref()
                .is_some_and(Vec::is_empty)
            {
                continue; // no legacy table, no legacy rule
            }
            if let Ok(text) = save_here(ns, opts, legacy, family) {
                works = true;
                rules += rule_lines(&text);
                detection.legacy_saves[i] = Some(text);
            }
        }
        if works && rules >= LEGACY_RULES_THRESHOLD {
            detection.flavor = legacy;
            return Ok(detection);
        }
    }
    let nft = IptablesFlavor::Nft;
    if find_program(&nft.restore_binary(IpFamily::V4)).is_some() {
        match nft::kernel_tables_here(ns) {
            Ok(tables) => {
                detection.flavor = nft;
                detection.nft_unverified = true;
                detection.nft_tables = Some(tables);
                return Ok(detection);
            }
            Err(e) => tracing::debug!(error = %e, "nf_tables not usable"),
        }
    }
    plain_or_none(ns).map(|flavor| {
        detection.flavor = flavor;
        detection
    })
}

/// Plain `iptables` if installed (Istio's last resort), else "no usable iptables".
pub fn plain_or_none(ns: &InNetns<'_>) -> Result<IptablesFlavor, NetxError> {
    if find_program(&IptablesFlavor::Plain.restore_binary(IpFamily::V4)).is_some() {
        return Ok(IptablesFlavor::Plain);
    }
    Err(NetxError::NoIptables {
        netns: ns.path().to_path_buf(),
        detail: "none of iptables-legacy (with existing rules), iptables-nft or iptables is usable"
            .to_string(),
    })
}

/// Istio's nft usability probe: add `-t nat -A INPUT -p 255 -j RETURN` with `iptables-nft`, here
/// in a throwaway netns (never the pod's). The rule is not deleted: the scratch netns and its
/// tables go away with the thread, and an nf_tables deletion commit costs ≈ 10 ms (it waits for
/// an RCU grace period). Cached for the life of the process.
pub fn nft_probe_ok(opts: &IptablesOptions) -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let bin = IptablesFlavor::Nft.binary(IpFamily::V4);
        let probe = ["-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"];
        let result = crate::netns::with_scratch_netns(|scratch| {
            let mut cmd = opts.cmd(scratch, &bin);
            cmd.env.clear(); // the scratch netns path is not a lock file
            for a in probe {
                cmd = cmd.arg(a);
            }
            cmd.run(scratch)
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
    restore_inner(ns, opts, flavor, family, text, noflush, false)
}

fn restore_inner(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
    text: &str,
    noflush: bool,
    counters: bool,
) -> Result<(), NetxError> {
    let bin = flavor.restore_binary(family);
    let mut cmd = opts.cmd(ns, &bin);
    if noflush {
        cmd = cmd.arg("--noflush");
    }
    if counters {
        cmd = cmd.arg("--counters");
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

/// Whether any of `tables` exists for `family` with the detected flavor, from what detection
/// learnt without exec'ing anything; `None` when unknown (then `-save` must look).
pub fn any_table_known(detection: &Detection, family: IpFamily, tables: &[String]) -> Option<bool> {
    match detection.flavor {
        IptablesFlavor::Nft => detection.nft_tables.as_ref().map(|kernel| {
            let (fam, _) = nft_family(family);
            kernel
                .iter()
                .any(|k| k.family == fam && tables.contains(&k.name))
        }),
        IptablesFlavor::Legacy => detection.legacy_tables[family_index(family)]
            .as_ref()
            .map(|names| names.iter().any(|n| tables.contains(n))),
        IptablesFlavor::Plain => None,
    }
}

/// `<flavor>-save` of `family` in the current netns, reusing the output detection already has.
pub fn current_save_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    detection: &Detection,
    family: IpFamily,
) -> Result<String, NetxError> {
    if detection.flavor == IptablesFlavor::Legacy
        && let Some(save) = &detection.legacy_saves[family_index(family)]
    {
        return Ok(save.clone());
    }
    save_here(ns, opts, detection.flavor, family)
}

/// What `fresh` restore text looks like in `-save` form with this flavor's binaries: applied in
/// a throwaway network namespace (never the pod's), then saved there. The authority when the
/// predicted `-save` form and a netns disagree.
pub fn canonical_save(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
    fresh: &str,
) -> Result<String, NetxError> {
    // The pod netns file stays the xtables lock (see the module docs); the scratch netns has no
    // path of its own.
    let lock = lock_path(ns.path());
    crate::netns::with_scratch_netns(|scratch| {
        fn with_lock<'c>(mut cmd: Cmd<'c>, lock: &std::ffi::OsStr, scoped: bool) -> Cmd<'c> {
            cmd.env.retain(|(k, _)| *k != "XTABLES_LOCKFILE");
            if scoped {
                cmd.env.push(("XTABLES_LOCKFILE", lock.to_owned()));
            }
            cmd
        }
        // Sets the rules match on (`-m set --match-set NAME`) must exist for the restore to
        // load; empty ones print the same.
        for set in match_sets(fresh) {
            crate::ipset::create_family_here(scratch, &set, family)?;
        }
        let restore_bin = flavor.restore_binary(family);
        let mut restore = with_lock(opts.cmd(scratch, &restore_bin), &lock, opts.pod_scoped_lock)
            .arg("--noflush");
        if flavor == IptablesFlavor::Legacy {
            restore = restore.arg(format!("--wait={}", opts.wait_secs));
        }
        restore.stdin = Some(fresh.as_bytes());
        restore.run(scratch)?;
        let save_bin = flavor.save_binary(family);
        with_lock(opts.cmd(scratch, &save_bin), &lock, opts.pod_scoped_lock)
            .run(scratch)
            .map(|out| strip_comments(&out))
    })?
}

/// The ipset names `-m set --match-set NAME` refers to in restore text, first use first.
pub fn match_sets(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == "--match-set"
                && let Some(name) = words.next()
                && !out.iter().any(|n| n == name)
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// What one family's tables looked like before a transaction touched them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FamilySnapshot {
    /// `-save` output (legacy, plain, or nft without netlink access); empty when the kernel
    /// provably has none of the touched tables. Rolled back by restoring the touched tables'
    /// sections without `--noflush` ([`rollback_here`]).
    Save(String),
    /// iptables-nft: per touched table, its prior state (`None`: it did not exist). Rolled
    /// back in place (see [`nft_rollback_texts`]), so that `nft list ruleset` is unchanged too.
    Nft(Vec<(String, Option<NftPrior>)>),
}

/// An iptables-nft table as it was before the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftPrior {
    /// Its section of `iptables-nft-save -c` (rules with counters).
    pub section: String,
    /// Its chains at the nf_tables level, in kernel order (iptables-nft creates built-in
    /// chains on demand; `-save` shows all of them regardless).
    pub chains: Vec<nft::NftChain>,
}

fn nft_family(family: IpFamily) -> (&'static str, u8) {
    match family {
        IpFamily::V4 => ("ip", nft::NFPROTO_IPV4),
        IpFamily::V6 => ("ip6", nft::NFPROTO_IPV6),
    }
}

/// Snapshot the `tables` of `family` before they are changed, reusing what detection learnt:
/// no exec at all when the netns provably has none of them (a fresh pod netns).
pub fn snapshot_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    detection: &Detection,
    family: IpFamily,
    tables: &[String],
) -> Result<FamilySnapshot, NetxError> {
    let flavor = detection.flavor;
    let i = family_index(family);
    match flavor {
        IptablesFlavor::Nft => {
            let Some(kernel_tables) = detection.nft_tables.as_ref() else {
                return save_here(ns, opts, flavor, family).map(FamilySnapshot::Save);
            };
            let (fam, nfproto) = nft_family(family);
            let exists = |t: &String| {
                kernel_tables
                    .iter()
                    .any(|k| k.family == fam && &k.name == t)
            };
            if !tables.iter().any(exists) {
                return Ok(FamilySnapshot::Nft(
                    tables.iter().map(|t| (t.clone(), None)).collect(),
                ));
            }
            let save = strip_comments(
                &opts
                    .cmd(ns, &flavor.save_binary(family))
                    .arg("-c")
                    .run(ns)?,
            );
            let chains = nft::kernel_chains_here(ns, nfproto)?;
            let mut out = Vec::new();
            for t in tables {
                let prior = exists(t).then(|| NftPrior {
                    section: table_section(&save, t).unwrap_or_else(|| format!("*{t}\nCOMMIT\n")),
                    chains: chains
                        .iter()
                        .filter(|c| c.table.family == fam && &c.table.name == t)
                        .cloned()
                        .collect(),
                });
                out.push((t.clone(), prior));
            }
            Ok(FamilySnapshot::Nft(out))
        }
        IptablesFlavor::Legacy => {
            if let Some(names) = &detection.legacy_tables[i]
                && !tables.iter().any(|t| names.contains(t))
            {
                return Ok(FamilySnapshot::Save(String::new()));
            }
            match &detection.legacy_saves[i] {
                Some(save) => Ok(FamilySnapshot::Save(save.clone())),
                None => save_here(ns, opts, flavor, family).map(FamilySnapshot::Save),
            }
        }
        IptablesFlavor::Plain => save_here(ns, opts, flavor, family).map(FamilySnapshot::Save),
    }
}

/// The two steps that put iptables-nft tables back in place (pure):
/// 1. `nft -f` text: a table that did not exist is deleted; an existing one is flushed (rules
///    only: the table keeps its place in the ruleset and its chains their order) and every
///    chain it has `now` but did not have before is deleted — user chains and built-in chains
///    the failed apply brought into existence alike;
/// 2. `iptables-nft-restore --noflush --counters` text that re-adds the prior rules, re-sets
///    the policies of the built-in chains that existed, and re-creates user chains that are
///    gone. Built-in chains that `-save` shows but nf_tables never had are left out, as are user
///    chains that still exist (already empty).
///
/// Restoring rules through iptables (not `nft -f` of an `nft list table`) keeps them
/// byte-identical in both views: nft cannot re-read xtables-compat expressions (`xt match
/// socket`, `xt target TPROXY`) and does not print `-m comment`.
pub fn nft_rollback_texts(
    family: IpFamily,
    tables: &[(String, Option<NftPrior>)],
    now: &[nft::NftChain],
) -> (String, String) {
    let (fam, _) = nft_family(family);
    let mut nft_text = String::new();
    let mut restore = String::new();
    for (table, prior) in tables {
        let Some(prior) = prior else {
            nft_text.push_str(&format!(
                "add table {fam} {table}\ndelete table {fam} {table}\n"
            ));
            continue;
        };
        nft_text.push_str(&format!(
            "add table {fam} {table}\nflush table {fam} {table}\n"
        ));
        let in_table = |c: &&nft::NftChain| c.table.family == fam && &c.table.name == table;
        for chain in now.iter().filter(in_table) {
            if !prior.chains.iter().any(|p| p.name == chain.name) {
                nft_text.push_str(&format!(
                    "delete chain {fam} {table} handle {}\n",
                    chain.handle
                ));
            }
        }
        restore.push_str(&format!("*{table}\n"));
        for line in prior.section.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                let before = prior.chains.iter().find(|p| p.name == name);
                let exists_now = now.iter().filter(in_table).any(|c| c.name == name);
                let keep = match before {
                    Some(p) => p.base || !exists_now,
                    None => false,
                };
                if keep {
                    restore.push_str(line);
                    restore.push('\n');
                }
            } else if line.starts_with('-') || line.starts_with('[') {
                restore.push_str(line);
                restore.push('\n');
            }
        }
        restore.push_str("COMMIT\n");
    }
    (nft_text, restore)
}

/// Put the snapshotted `tables` back (see [`FamilySnapshot`]).
pub fn rollback_snapshot_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    flavor: IptablesFlavor,
    family: IpFamily,
    snapshot: &FamilySnapshot,
    tables: &[String],
) -> Result<(), NetxError> {
    match snapshot {
        FamilySnapshot::Save(save) => rollback_here(ns, opts, flavor, family, save, tables),
        FamilySnapshot::Nft(prior) => {
            if find_program("nft").is_none() {
                // Without nft, fall back to the iptables-level rollback (same iptables view;
                // nf_tables may keep extra empty built-in chains).
                let save: String = prior
                    .iter()
                    .filter_map(|(_, p)| p.as_ref().map(|p| p.section.clone()))
                    .collect();
                let (text, _) = rollback_text(&save, tables);
                return restore_inner(ns, opts, flavor, family, &text, false, true);
            }
            let (_, nfproto) = nft_family(family);
            let now = if prior.iter().any(|(_, p)| p.is_some()) {
                nft::kernel_chains_here(ns, nfproto)?
            } else {
                Vec::new()
            };
            let (nft_text, restore) = nft_rollback_texts(family, prior, &now);
            if !nft_text.is_empty() {
                nft::apply_here(ns, &nft_text)?;
            }
            if !restore.is_empty() {
                restore_inner(ns, opts, flavor, family, &restore, true, true)?;
            }
            Ok(())
        }
    }
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

    #[test]
    fn match_sets_and_lock_paths() {
        let text = "* nat\n-N ISTIO_POSTRT\n-A ISTIO_POSTRT -m owner --socket-exists -p tcp -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127\n-A X -m set --match-set istio-inpod-probes-v4 src -j RETURN\nCOMMIT\n";
        assert_eq!(match_sets(text), vec!["istio-inpod-probes-v4"]);
        assert!(match_sets("* nat\nCOMMIT\n").is_empty());
        let pid = std::process::id();
        assert_eq!(
            lock_path(std::path::Path::new("/proc/self/fd/7")),
            OsString::from(format!("/proc/{pid}/fd/7"))
        );
        assert_eq!(
            lock_path(std::path::Path::new("/proc/thread-self/fd/9")),
            OsString::from(format!("/proc/{pid}/fd/9"))
        );
        for kept in ["/proc/self/ns/net", "/run/netns/x", "/var/run/netns/cni-1"] {
            assert_eq!(lock_path(std::path::Path::new(kept)), OsString::from(kept));
        }
    }

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

    fn chain(family: &str, table: &str, name: &str, base: bool, handle: u64) -> nft::NftChain {
        nft::NftChain {
            table: nft::NftTable {
                family: family.to_string(),
                name: table.to_string(),
            },
            name: name.to_string(),
            base,
            handle,
        }
    }

    #[test]
    fn nft_rollback_restores_in_place_and_only_existing_chains() {
        let prior = NftPrior {
            section: "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT DROP [3:180]\n:POSTROUTING ACCEPT [0:0]\n:KEEP - [0:0]\n:GONE - [0:0]\n[1:60] -A OUTPUT -j KEEP\n[0:0] -A KEEP -m comment --comment \"x y\" -j RETURN\nCOMMIT\n".to_string(),
            chains: vec![
                chain("ip", "nat", "KEEP", false, 1),
                chain("ip", "nat", "GONE", false, 2),
                chain("ip", "nat", "OUTPUT", true, 3),
            ],
        };
        let now = vec![
            chain("ip", "nat", "KEEP", false, 1),
            chain("ip", "nat", "OUTPUT", true, 3),
            chain("ip", "nat", "ISTIO_OUTPUT", false, 7),
            chain("ip", "nat", "PREROUTING", true, 8),
            chain("ip", "raw", "OUTPUT", true, 9),
            chain("ip6", "nat", "ISTIO_OUTPUT", false, 4),
        ];
        let tables = vec![("nat".to_string(), Some(prior)), ("raw".to_string(), None)];
        let (nft_text, restore) = nft_rollback_texts(IpFamily::V4, &tables, &now);
        assert_eq!(
            nft_text,
            "add table ip nat\nflush table ip nat\ndelete chain ip nat handle 7\ndelete chain ip nat handle 8\nadd table ip raw\ndelete table ip raw\n"
        );
        assert_eq!(
            restore,
            "*nat\n:OUTPUT DROP [3:180]\n:GONE - [0:0]\n[1:60] -A OUTPUT -j KEEP\n[0:0] -A KEEP -m comment --comment \"x y\" -j RETURN\nCOMMIT\n"
        );
        // Nothing existed: only deletions, no restore.
        let (nft_text, restore) =
            nft_rollback_texts(IpFamily::V6, &[("nat".to_string(), None)], &now);
        assert_eq!(nft_text, "add table ip6 nat\ndelete table ip6 nat\n");
        assert_eq!(restore, "");
    }
}
