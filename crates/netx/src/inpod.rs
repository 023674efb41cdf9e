//! Ambient `inpod` mode at the dataplane edge: the in-pod rules applied inside a pod's netns
//! (spec §7.5/§7.6), verified or repaired when re-applied, and removed without a trace.
//!
//! With the iptables-nft flavor (forced, or detected per netns: the default on most nodes) the
//! rules are written over nf_tables netlink with no process at all ([`crate::iptnft`]: the
//! objects `iptables-nft-restore` 1.8.9 creates, verified and repaired in one batch for both
//! families); the routing state goes first there, and is deleted again if the batch is refused.
//! Otherwise it is built on the sidecar path's machinery ([`crate::apply::Applier`]): one
//! `iptables-restore --noflush` per family with rollback (legacy/plain flavor, or a rule set or
//! kernel the netlink writer does not cover) or one `nft -f` transaction, then the netlink state
//! (`ip rule fwmark 0x111/0xfff pref 32764 lookup 100`, `local default dev lo table 100`, v6 too
//! when IPv6 is on and `lo` has IPv6). A failed apply leaves the netns as it was. Removal (off
//! the ADD path) uses `-save`/`-restore` for every flavor.
//!
//! The netns is a path; `/proc/self/fd/N` of a namespace fd the caller holds works (the
//! iptables lock file is the same namespace file, named through `/proc/<pid>/fd/N` so the
//! child process can open it).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meshcni_rules::inpod;
pub use meshcni_rules::inpod::{DnsOverride, InpodConfig, PodOverrides};
use meshcni_rules::model::Family;
use meshcni_rules::save_form;

use crate::apply::{Applier, ApplyPlan, Backend, Ownership, RoutesPlan, RulesOutcome};
use crate::iptables::{self, IptablesFlavor, IptablesOptions};
use crate::netlink::{LocalRouteSpec, Netlink, RuleSpec};
use crate::netns::{InNetns, with_netns};
use crate::{IpFamily, NetxError, iptnft, nft};

/// Which packet-filter API the in-pod rules are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InpodBackend {
    /// `iptables-restore` (legacy or nft flavor, detected per netns like the sidecar path).
    Iptables,
    /// Native nftables (`inet istio-ambient-*` tables).
    Nftables,
}

/// What [`apply_inpod`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InpodApplied {
    /// Something was written (rules installed or repaired, or an ip rule / route created);
    /// `false`: everything was already in place and nothing ran.
    pub changed: bool,
}

/// Apply the in-pod rules for `pod` in `netns` (verify-or-repair: identical → nothing runs;
/// drifted → one atomic repair; never duplicates). Iptables settings from the environment
/// (`FORCE_IPTABLES_BINARY`).
pub fn apply_inpod(
    netns: &Path,
    cfg: &InpodConfig,
    pod: &PodOverrides,
    backend: InpodBackend,
) -> Result<InpodApplied, NetxError> {
    InpodApplier::new(backend).apply(netns, cfg, pod)
}

/// Read-only comparison: the differences between `netns` and what [`apply_inpod`] leaves
/// (each naming the family/table/chain/rule or route); empty = in place.
pub fn check_inpod(
    netns: &Path,
    cfg: &InpodConfig,
    pod: &PodOverrides,
    backend: InpodBackend,
) -> Result<Vec<String>, NetxError> {
    InpodApplier::new(backend).check(netns, cfg, pod)
}

/// Remove every trace of the in-pod rules from `netns`: jumps and chains (iptables, every
/// flavor that has them), the `inet istio-ambient-*` tables, the ip rules and local routes.
/// Idempotent; foreign rules stay. `backend` is the one the rules were applied with; traces of
/// the other one are removed too (a backend switch leaves nothing behind).
pub fn remove_inpod(netns: &Path, backend: InpodBackend) -> Result<(), NetxError> {
    InpodApplier::new(backend).remove(netns)
}

/// [`apply_inpod`] & co. with explicit iptables settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InpodApplier {
    pub backend: InpodBackend,
    pub iptables: IptablesOptions,
}

/// The in-pod `ip rule` of `family`.
pub fn inpod_rule_spec(family: IpFamily) -> RuleSpec {
    let r = inpod::pod_routing(&InpodConfig::default());
    RuleSpec {
        family,
        fwmark: r.fwmark,
        fwmask: Some(r.mask),
        table: r.table,
        priority: Some(r.priority),
    }
}

/// The in-pod local route of `family`.
pub fn inpod_route_spec(family: IpFamily) -> LocalRouteSpec {
    LocalRouteSpec {
        family,
        table: inpod::ROUTE_TABLE,
    }
}

/// Which state is ours in a pod netns.
fn ownership(rs: &inpod::RuleSet, backend: InpodBackend) -> Ownership {
    let iptables = backend == InpodBackend::Iptables;
    Ownership {
        v4_save: if iptables {
            save_form::render(rs, Family::V4)
        } else {
            String::new()
        },
        v6_save: (iptables && rs.ipv6).then(|| save_form::render(rs, Family::V6)),
        iptables_chains: inpod::pod_chain_names(),
        iptables_tables: ["mangle", "nat", "raw"].map(String::from).to_vec(),
        nft_tables: pod_nft_tables(),
    }
}

fn pod_nft_tables() -> Vec<nft::NftTable> {
    inpod::pod_nft_tables()
        .into_iter()
        .map(|name| nft::NftTable {
            family: "inet".to_string(),
            name: name.to_string(),
        })
        .collect()
}

/// The apply plan for a pod (pure). `lo_ipv6`: the netns's `lo` has IPv6 (the v6 local route
/// needs it).
pub fn inpod_plan(
    cfg: &InpodConfig,
    pod: &PodOverrides,
    backend: InpodBackend,
    lo_ipv6: bool,
) -> ApplyPlan {
    let rs = inpod::pod_rules(cfg, pod);
    let iptables = backend == InpodBackend::Iptables;
    let mut routes = RoutesPlan::default();
    routes.rules.push(inpod_rule_spec(IpFamily::V4));
    routes.local_routes.push(inpod_route_spec(IpFamily::V4));
    if cfg.enable_ipv6 {
        routes.rules.push(inpod_rule_spec(IpFamily::V6));
        if lo_ipv6 {
            routes.local_routes.push(inpod_route_spec(IpFamily::V6));
        }
    }
    ApplyPlan {
        v4_restore: if iptables {
            inpod::pod_restore(&rs, Family::V4)
        } else {
            String::new()
        },
        v6_restore: (iptables && rs.ipv6).then(|| inpod::pod_restore(&rs, Family::V6)),
        nft: (!iptables).then(|| inpod::pod_nft(&rs)),
        routes,
        owned: Some(ownership(&rs, backend)),
    }
}

/// Whether `lo` in the current netns has IPv6 (`net.ipv6.conf.lo.disable_ipv6` is 0).
fn lo_has_ipv6_here(ns: &InNetns<'_>) -> Result<bool, NetxError> {
    Ok(crate::sysctl::read_here(ns, "net/ipv6/conf/lo/disable_ipv6")?.as_deref() == Some("0"))
}

impl InpodApplier {
    /// `backend` with iptables settings from the environment.
    pub fn new(backend: InpodBackend) -> Self {
        InpodApplier {
            backend,
            iptables: IptablesOptions::from_env(),
        }
    }

    fn applier(&self) -> Applier {
        Applier {
            backend: match self.backend {
                InpodBackend::Iptables => Backend::Iptables,
                InpodBackend::Nftables => Backend::Nftables,
            },
            iptables: self.iptables.clone(),
        }
    }

    /// See [`apply_inpod`].
    pub fn apply(
        &self,
        netns: &Path,
        cfg: &InpodConfig,
        pod: &PodOverrides,
    ) -> Result<InpodApplied, NetxError> {
        with_netns(netns, |ns| self.apply_here(ns, cfg, pod))?
    }

    /// [`InpodApplier::apply`] on a thread already inside the netns.
    pub fn apply_here(
        &self,
        ns: &InNetns<'_>,
        cfg: &InpodConfig,
        pod: &PodOverrides,
    ) -> Result<InpodApplied, NetxError> {
        let lo_ipv6 = lo_has_ipv6_here(ns)?;
        let plan = inpod_plan(cfg, pod, self.backend, lo_ipv6);
        if let Some((nl_plan, mut sock)) = self.netlink_plan_here(ns, cfg, pod)? {
            return apply_netlink_here(ns, &nl_plan, &mut sock, &plan.routes);
        }
        let applied = self.applier().apply_capture_here(ns, &plan)?;
        Ok(InpodApplied {
            changed: applied.rules != RulesOutcome::Unchanged || applied.routes_created > 0,
        })
    }

    /// The iptables-nft flavor's rules as nf_tables netlink objects ([`crate::iptnft`]), when
    /// that flavor is the one used here (forced or detected) and the rule set and kernel are
    /// covered; `None`: the restore/save path is used.
    fn netlink_plan_here<'n>(
        &self,
        ns: &'n InNetns<'n>,
        cfg: &InpodConfig,
        pod: &PodOverrides,
    ) -> Result<Option<(iptnft::Plan, iptnft::NfSock<'n>)>, NetxError> {
        if self.backend != InpodBackend::Iptables {
            return Ok(None);
        }
        let flavor = match self.iptables.force {
            Some(forced) => forced,
            None => iptables::detect_fast_here(ns, &self.iptables)?.flavor,
        };
        if flavor != IptablesFlavor::Nft {
            return Ok(None);
        }
        let rs = inpod::pod_rules(cfg, pod);
        let plan = match iptnft::Plan::new(&rs, &inpod::pod_chain_names()) {
            Ok(plan) => plan,
            Err(what) => {
                tracing::debug!(%what, "not covered by the nf_tables writer; using iptables-nft-restore");
                return Ok(None);
            }
        };
        let mut sock = iptnft::NfSock::open(ns)?;
        if !plan.compat_supported_here(&mut sock)? {
            return Ok(None);
        }
        Ok(Some((plan, sock)))
    }

    /// See [`check_inpod`].
    pub fn check(
        &self,
        netns: &Path,
        cfg: &InpodConfig,
        pod: &PodOverrides,
    ) -> Result<Vec<String>, NetxError> {
        with_netns(netns, |ns| {
            let plan = inpod_plan(cfg, pod, self.backend, lo_has_ipv6_here(ns)?);
            if let Some((nl_plan, mut sock)) = self.netlink_plan_here(ns, cfg, pod)? {
                let mut problems: Vec<String> = nl_plan
                    .check_here(&mut sock)?
                    .into_iter()
                    .map(|d| format!("iptables-nft (netlink): {d}"))
                    .collect();
                problems.extend(crate::apply::check_routes(ns, &plan.routes)?);
                return Ok(problems);
            }
            self.applier().check_capture_here(ns, &plan)
        })?
    }

    /// See [`remove_inpod`].
    pub fn remove(&self, netns: &Path) -> Result<(), NetxError> {
        with_netns(netns, |ns| self.remove_here(ns))?
    }

    /// [`InpodApplier::remove`] on a thread already inside the netns.
    pub fn remove_here(&self, ns: &InNetns<'_>) -> Result<(), NetxError> {
        // Packet filter first: with the rules gone, the routing state is inert.
        let chains = inpod::pod_chain_names();
        remove_iptables_chains_here(ns, &self.iptables, &chains)?;
        remove_nft_tables_here(ns, &pod_nft_tables())?;
        let mut nl = Netlink::open_here(ns)?;
        for family in [IpFamily::V4, IpFamily::V6] {
            let spec = inpod_rule_spec(family);
            // Every copy (a rule added twice by hand would keep routing marked packets).
            let copies = nl
                .rules(family)?
                .iter()
                .filter(|r| r.matches(&spec))
                .count();
            for _ in 0..copies {
                nl.del_rule(&spec)?;
            }
            let route = inpod_route_spec(family);
            let present = nl
                .routes(family, Some(route.table))?
                .iter()
                .any(|r| r.local && r.dst.is_none_or(|d| d.prefix_len() == 0));
            if present {
                nl.del_local_route(&route)?;
            }
        }
        Ok(())
    }
}

/// The netlink path's transaction: the routing state first (inert without the rules: nothing
/// carries the mark yet), then the rules in one nf_tables batch; if the batch fails (the kernel
/// commits nothing), the routing state created here is deleted again.
fn apply_netlink_here(
    ns: &InNetns<'_>,
    plan: &iptnft::Plan,
    sock: &mut iptnft::NfSock<'_>,
    routes: &RoutesPlan,
) -> Result<InpodApplied, NetxError> {
    let created = crate::apply::apply_routes_tracked(ns, routes)?;
    match plan.apply_here(sock) {
        Ok(applied) => {
            if !applied.drift.is_empty() {
                if applied.repaired {
                    tracing::info!(netns = %ns.path().display(), drift = %applied.drift.join("; "), "repaired drifted in-pod rules (nf_tables netlink)");
                } else {
                    tracing::debug!(netns = %ns.path().display(), "installed in-pod rules (nf_tables netlink)");
                }
            }
            Ok(InpodApplied {
                changed: !applied.drift.is_empty() || !created.is_empty(),
            })
        }
        Err(e) => {
            let rollback = crate::apply::undo_routes(ns, &created).err();
            Err(crate::apply::with_rollback(e, rollback))
        }
    }
}

/// The iptables flavors whose kernel tables exist in the current netns and whose binaries are
/// installed: x_tables (legacy) per `/proc/thread-self/net/*_tables_names`, nf_tables (the
/// `-nft` binaries) per the nf_tables table dump.
fn flavors_present_here(
    ns: &InNetns<'_>,
    family: IpFamily,
) -> Result<Vec<IptablesFlavor>, NetxError> {
    let mut out = Vec::new();
    let legacy = iptables::legacy_tables_here(ns, family);
    let legacy_present = legacy.is_none_or(|t| !t.is_empty());
    if legacy_present
        && crate::exec::find_program(&IptablesFlavor::Legacy.save_binary(family)).is_some()
    {
        out.push(IptablesFlavor::Legacy);
    }
    let fam = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let nft_present = match nft::kernel_tables_here(ns) {
        Ok(tables) => tables.iter().any(|t| t.family == fam),
        Err(_) => true,
    };
    if nft_present && crate::exec::find_program(&IptablesFlavor::Nft.save_binary(family)).is_some()
    {
        out.push(IptablesFlavor::Nft);
    }
    if out.is_empty()
        && (legacy_present || nft_present)
        && crate::exec::find_program(&IptablesFlavor::Plain.save_binary(family)).is_some()
    {
        out.push(IptablesFlavor::Plain);
    }
    Ok(out)
}

/// Remove the owned chains `chains` (flushed, jumps to them deleted, chains deleted) from every
/// iptables flavor and family that has them: one `-restore --noflush` per flavor and family.
pub(crate) fn remove_iptables_chains_here(
    ns: &InNetns<'_>,
    opts: &IptablesOptions,
    chains: &[String],
) -> Result<(), NetxError> {
    for family in [IpFamily::V4, IpFamily::V6] {
        for flavor in flavors_present_here(ns, family)? {
            let actual = iptables::save_here(ns, opts, flavor, family)?;
            let text = crate::iptables_state::repair_text("", &actual, "", chains);
            if text.is_empty() {
                continue;
            }
            tracing::debug!(%family, ?flavor, "removing in-pod iptables chains");
            iptables::restore_here(ns, opts, flavor, family, &text, true)?;
            if flavor == IptablesFlavor::Nft {
                drop_empty_builtins_here(ns, family, &iptables::tables_in(&text))?;
            }
        }
    }
    Ok(())
}

/// iptables-nft creates built-in chains (and their table) on first use and never removes them.
/// After our rules are gone, those of `tables` that are empty with an `accept` policy are
/// deleted (and a table left with nothing at all), so the netns shows what it showed before:
/// such a chain filters nothing, and iptables-nft re-creates it whenever a rule needs it.
fn drop_empty_builtins_here(
    ns: &InNetns<'_>,
    family: IpFamily,
    tables: &[String],
) -> Result<(), NetxError> {
    let fam = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    // One listing of the family (the table blocks we look at are small).
    let listing = crate::exec::Cmd::new("nft")
        .arg("list")
        .arg("ruleset")
        .arg(fam)
        .run(ns)?;
    let blocks = table_texts(&listing);
    let mut text = String::new();
    for name in tables {
        let Some((_, listing)) = blocks.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let (empty, other) = empty_builtin_chains(listing);
        if empty.is_empty() {
            continue;
        }
        if other {
            for c in &empty {
                text.push_str(&format!("delete chain {fam} {name} {c}\n"));
            }
        } else {
            text.push_str(&format!("delete table {fam} {name}\n"));
        }
    }
    if text.is_empty() {
        return Ok(());
    }
    nft::apply_here(ns, &text)
}

/// The `table FAMILY NAME { … }` blocks of an `nft list ruleset` output: (name, block text).
fn table_texts(listing: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut depth = 0usize;
    for line in listing.lines() {
        if depth == 0 {
            let mut words = line.split_whitespace();
            if let (Some("table"), Some(_), Some(name)) = (words.next(), words.next(), words.next())
            {
                out.push((name.to_string(), String::new()));
            }
        }
        if let Some((_, text)) = out.last_mut() {
            text.push_str(line);
            text.push('\n');
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

/// The built-in (upper-case) base chains of an `nft list table` output that have no rules and
/// an `accept` policy, and whether the table holds anything else (other chains, sets, …).
fn empty_builtin_chains(listing: &str) -> (Vec<String>, bool) {
    const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    let mut empty = Vec::new();
    let mut other = false;
    let mut current: Option<(String, Vec<String>)> = None;
    let mut depth = 0usize;
    for raw in listing.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if depth == 1 {
            if let Some(name) = line
                .strip_prefix("chain ")
                .and_then(|r| r.strip_suffix(" {"))
            {
                current = Some((name.to_string(), Vec::new()));
            } else if line != "}" {
                other = true;
            }
        } else if depth == 2
            && line != "}"
            && let Some((_, body)) = current.as_mut()
        {
            body.push(line.to_string());
        } else if depth > 2 {
            other = true;
        }
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if depth == 1
            && let Some((name, body)) = current.take()
        {
            let is_empty = body.len() == 1
                && body[0].starts_with("type ")
                && body[0].ends_with("policy accept;");
            if BUILTIN.contains(&name.as_str()) && is_empty {
                empty.push(name);
            } else {
                other = true;
            }
        }
    }
    (empty, other)
}

/// Delete those of `tables` that exist (one transaction).
pub(crate) fn remove_nft_tables_here(
    ns: &InNetns<'_>,
    tables: &[nft::NftTable],
) -> Result<(), NetxError> {
    let present = match nft::kernel_tables_here(ns) {
        Ok(kernel) => tables
            .iter()
            .filter(|t| kernel.contains(t))
            .cloned()
            .collect(),
        // Without the netlink view, delete unconditionally (`add` first makes it idempotent).
        Err(_) => tables.to_vec(),
    };
    if present.is_empty() {
        return Ok(());
    }
    let mut text = String::new();
    for t in &present {
        text.push_str(&format!("add table {} {}\n", t.family, t.name));
        text.push_str(&format!("delete table {} {}\n", t.family, t.name));
    }
    nft::apply_here(ns, &text)
}

// ----- host probe SNAT (node netns) ---------------------------------------------------------------

/// The kubelet-probe SNAT in the node's netns (spec §7.5 last paragraph, §7.6 host rule):
/// the probe address sets (ipsets `istio-inpod-probes-v4` / `-v6`, or sets in `inet
/// istio-ambient-nat`) holding each enrolled pod's IPs with the pod UID as comment, and the
/// rule that SNATs locally generated TCP to those addresses to 169.254.7.127 (v6: the
/// configured v6 address). iptables: `-I POSTROUTING 1 -j ISTIO_POSTRT` + `-m owner
/// --socket-exists`; nftables: `postrouting` chain matching the kubelet's UID (`skuid`).
#[derive(Debug, Clone)]
pub struct HostProbe {
    netns: PathBuf,
    cfg: InpodConfig,
    backend: InpodBackend,
    kubelet_uid: Option<u32>,
    iptables: IptablesOptions,
}

/// The node netns's xtables lock (shared with kube-proxy and every other writer there).
pub const NODE_XTABLES_LOCK: &str = "/run/xtables.lock";

fn host_nft_table() -> nft::NftTable {
    nft::NftTable {
        family: "inet".to_string(),
        name: inpod::NFT_NAT_TABLE.to_string(),
    }
}

impl HostProbe {
    /// Open on the node netns at `node_netns`. The nftables backend needs the kubelet's UID
    /// (nft has no `--socket-exists`); without one this is an error. Iptables settings from
    /// the environment (`FORCE_IPTABLES_BINARY`), with the node's global xtables lock.
    pub fn open(
        node_netns: &Path,
        cfg: &InpodConfig,
        backend: InpodBackend,
        kubelet_uid: Option<u32>,
    ) -> Result<HostProbe, NetxError> {
        let iptables = IptablesOptions {
            lock_file: Some(PathBuf::from(NODE_XTABLES_LOCK)),
            ..IptablesOptions::from_env()
        };
        Self::open_with(node_netns, cfg, backend, kubelet_uid, iptables)
    }

    /// [`HostProbe::open`] with explicit iptables settings.
    pub fn open_with(
        node_netns: &Path,
        cfg: &InpodConfig,
        backend: InpodBackend,
        kubelet_uid: Option<u32>,
        iptables: IptablesOptions,
    ) -> Result<HostProbe, NetxError> {
        if backend == InpodBackend::Nftables && kubelet_uid.is_none() {
            return Err(NetxError::InvalidPlan {
                netns: node_netns.to_path_buf(),
                detail: "the nftables host-probe rule matches the kubelet's UID (nft has no \
                         --socket-exists) and no kubelet UID was given"
                    .to_string(),
            });
        }
        // Fail early on a path that is not a netns.
        drop(crate::netns::open_netns(node_netns)?);
        Ok(HostProbe {
            netns: node_netns.to_path_buf(),
            cfg: cfg.clone(),
            backend,
            kubelet_uid,
            iptables,
        })
    }

    fn families(&self) -> Vec<IpFamily> {
        if self.cfg.enable_ipv6 {
            vec![IpFamily::V4, IpFamily::V6]
        } else {
            vec![IpFamily::V4]
        }
    }

    fn set_of(ip: &IpAddr) -> &'static str {
        match ip {
            IpAddr::V4(_) => inpod::PROBE_SET_V4,
            IpAddr::V6(_) => inpod::PROBE_SET_V6,
        }
    }

    /// The iptables apply plan of the host rule (pure).
    fn iptables_plan(&self) -> ApplyPlan {
        let rs = inpod::host_rules_iptables(&self.cfg);
        ApplyPlan {
            v4_restore: inpod::host_restore(&rs, Family::V4),
            v6_restore: rs.ipv6.then(|| inpod::host_restore(&rs, Family::V6)),
            nft: None,
            routes: RoutesPlan::default(),
            owned: Some(Ownership {
                v4_save: save_form::render(&rs, Family::V4),
                v6_save: rs.ipv6.then(|| save_form::render(&rs, Family::V6)),
                iptables_chains: inpod::host_chain_names(),
                iptables_tables: vec!["nat".to_string()],
                nft_tables: Vec::new(),
            }),
        }
    }

    /// The nft transaction: our table, the sets (kept with their elements when present:
    /// `flush table` empties chains, not sets), the postrouting chain and its rules.
    fn nft_text(&self) -> Result<String, NetxError> {
        let uid = self.kubelet_uid.ok_or_else(|| NetxError::InvalidPlan {
            netns: self.netns.clone(),
            detail: "no kubelet UID for the nftables host-probe rule".to_string(),
        })?;
        let t = inpod::NFT_NAT_TABLE;
        let mut text = format!("add table inet {t}\n");
        text.push_str(&format!(
            "add set inet {t} {} {{ type ipv4_addr ; }}\n",
            inpod::PROBE_SET_V4
        ));
        if self.cfg.enable_ipv6 {
            text.push_str(&format!(
                "add set inet {t} {} {{ type ipv6_addr ; }}\n",
                inpod::PROBE_SET_V6
            ));
        }
        text.push_str(&inpod::host_nft(&inpod::host_rules_nft(&self.cfg, uid)));
        Ok(text)
    }

    /// Make the sets and the SNAT rule exist exactly once (verify-or-repair: identical → nothing
    /// runs; drifted → one atomic repair). Set entries are kept.
    pub fn ensure_rules(&mut self) -> Result<(), NetxError> {
        with_netns(&self.netns, |ns| self.ensure_rules_here(ns))?
    }

    fn ensure_rules_here(&self, ns: &InNetns<'_>) -> Result<(), NetxError> {
        match self.backend {
            InpodBackend::Iptables => {
                for family in self.families() {
                    let set = match family {
                        IpFamily::V4 => inpod::PROBE_SET_V4,
                        IpFamily::V6 => inpod::PROBE_SET_V6,
                    };
                    crate::ipset::create_family_here(ns, set, family)?;
                }
                let applier = Applier {
                    backend: Backend::Iptables,
                    iptables: self.iptables.clone(),
                };
                applier.apply_capture_here(ns, &self.iptables_plan())?;
                Ok(())
            }
            InpodBackend::Nftables => {
                let fresh = self.nft_text()?;
                let (actual, want, have) = self.nft_compare_here(ns, &fresh)?;
                if actual.is_some() && want == have {
                    return Ok(());
                }
                // Chains of our table the rule set does not have go too.
                let mut text = String::new();
                for chain in chain_names(actual.as_deref().unwrap_or_default()) {
                    if chain != "postrouting" {
                        text.push_str(&format!(
                            "delete chain inet {} {chain}\n",
                            inpod::NFT_NAT_TABLE
                        ));
                    }
                }
                tracing::info!(netns = %ns.path().display(), "installing/repairing the nftables host-probe SNAT rule");
                nft::apply_here(ns, &format!("{fresh}{text}"))
            }
        }
    }

    /// Our nft table as listed in `ns`, and (without set elements) what `fresh` makes of an
    /// empty netns vs what `ns` holds.
    #[allow(clippy::type_complexity)]
    fn nft_compare_here(
        &self,
        ns: &InNetns<'_>,
        fresh: &str,
    ) -> Result<(Option<String>, Vec<String>, Vec<String>), NetxError> {
        let table = host_nft_table();
        let actual = nft::list_table_here(ns, &table)?;
        let desired = crate::netns::with_scratch_netns(|scratch| {
            nft::apply_here(scratch, fresh)?;
            nft::list_table_here(scratch, &table)
        })??;
        let want = without_elements(desired.as_deref().unwrap_or_default());
        let have = without_elements(actual.as_deref().unwrap_or_default());
        Ok((actual, want, have))
    }

    /// Read-only (`doctor`): how the node netns differs from what [`HostProbe::ensure_rules`]
    /// leaves — the probe sets of each family and the SNAT rule, exactly once. Empty: in place.
    pub fn check(&self) -> Result<Vec<String>, NetxError> {
        with_netns(&self.netns, |ns| -> Result<Vec<String>, NetxError> {
            match self.backend {
                InpodBackend::Iptables => {
                    let mut problems = Vec::new();
                    let names = crate::ipset::names_here(ns)?;
                    for family in self.families() {
                        let set = match family {
                            IpFamily::V4 => inpod::PROBE_SET_V4,
                            IpFamily::V6 => inpod::PROBE_SET_V6,
                        };
                        if !names.iter().any(|n| n == set) {
                            problems.push(format!("ipset {set} missing"));
                        }
                    }
                    let applier = Applier {
                        backend: Backend::Iptables,
                        iptables: self.iptables.clone(),
                    };
                    problems.extend(applier.check_capture_here(ns, &self.iptables_plan())?);
                    Ok(problems)
                }
                InpodBackend::Nftables => {
                    let fresh = self.nft_text()?;
                    let (actual, want, have) = self.nft_compare_here(ns, &fresh)?;
                    Ok(match actual {
                        None => vec![format!("nft table inet {} missing", inpod::NFT_NAT_TABLE)],
                        Some(_) if want != have => vec![format!(
                            "nft table inet {} differs from what the agent writes",
                            inpod::NFT_NAT_TABLE
                        )],
                        Some(_) => Vec::new(),
                    })
                }
            }
        })?
    }

    /// Put `ip` in its family's probe set with comment `uid` (an existing entry for the IP is
    /// replaced, whatever its comment). IPv6 addresses are ignored when IPv6 is off.
    pub fn upsert(&mut self, uid: &str, ip: IpAddr) -> Result<(), NetxError> {
        self.check_uid(uid)?;
        if ip.is_ipv6() && !self.cfg.enable_ipv6 {
            tracing::debug!(%ip, uid, "IPv6 is off: no probe SNAT entry");
            return Ok(());
        }
        let set = Self::set_of(&ip);
        match self.backend {
            InpodBackend::Iptables => {
                crate::ipset::IpsetNl::open(&self.netns)?.add_ip(set, ip, Some(uid))
            }
            InpodBackend::Nftables => {
                let t = inpod::NFT_NAT_TABLE;
                // `add` first so the `delete` cannot fail; the final `add` sets the comment.
                let text = format!(
                    "add element inet {t} {set} {{ {ip} }}\ndelete element inet {t} {set} {{ {ip} }}\nadd element inet {t} {set} {{ {ip} comment \"{uid}\" }}\n"
                );
                nft::apply(&self.netns, &text)
            }
        }
    }

    /// Remove `ip` from its probe set, only if its entry carries comment `uid` (another pod
    /// may have the IP by now). A missing entry is fine.
    pub fn remove(&mut self, uid: &str, ip: IpAddr) -> Result<(), NetxError> {
        self.check_uid(uid)?;
        let owned = self
            .entries()?
            .into_iter()
            .any(|(have, comment)| have == ip && comment == uid);
        if !owned {
            return Ok(());
        }
        let set = Self::set_of(&ip);
        match self.backend {
            InpodBackend::Iptables => crate::ipset::IpsetNl::open(&self.netns)?.del_ip(set, ip),
            InpodBackend::Nftables => nft::apply(
                &self.netns,
                &format!(
                    "delete element inet {} {set} {{ {ip} }}\n",
                    inpod::NFT_NAT_TABLE
                ),
            ),
        }
    }

    /// Every entry of the probe sets: (IP, comment — empty when none), sorted.
    pub fn entries(&mut self) -> Result<Vec<(IpAddr, String)>, NetxError> {
        let families = self.families();
        let backend = self.backend;
        with_netns(
            &self.netns,
            |ns| -> Result<Vec<(IpAddr, String)>, NetxError> {
                let mut out = Vec::new();
                for family in families {
                    let set = match family {
                        IpFamily::V4 => inpod::PROBE_SET_V4,
                        IpFamily::V6 => inpod::PROBE_SET_V6,
                    };
                    match backend {
                        InpodBackend::Iptables => {
                            for (ip, c) in crate::ipset::list_ip_here(ns, set)?.unwrap_or_default()
                            {
                                out.push((ip, c.unwrap_or_default()));
                            }
                        }
                        InpodBackend::Nftables => {
                            let listed = crate::exec::Cmd::new("nft")
                                .arg("list")
                                .arg("set")
                                .arg("inet")
                                .arg(inpod::NFT_NAT_TABLE)
                                .arg(set)
                                .run(ns);
                            match listed {
                                Ok(text) => out.extend(parse_nft_elements(&text)),
                                Err(NetxError::Command { stderr, .. })
                                    if stderr.contains("No such file or directory") => {}
                                Err(e) => return Err(e),
                            }
                        }
                    }
                }
                out.sort();
                Ok(out)
            },
        )?
    }

    /// Remove the rule and the sets: the node is as it was before [`HostProbe::ensure_rules`].
    /// Idempotent.
    pub fn uninstall(&mut self) -> Result<(), NetxError> {
        with_netns(&self.netns, |ns| -> Result<(), NetxError> {
            match self.backend {
                InpodBackend::Iptables => {
                    remove_iptables_chains_here(ns, &self.iptables, &inpod::host_chain_names())?;
                    for set in [inpod::PROBE_SET_V4, inpod::PROBE_SET_V6] {
                        crate::ipset::destroy_here(ns, set)?;
                    }
                    Ok(())
                }
                InpodBackend::Nftables => remove_nft_tables_here(ns, &[host_nft_table()]),
            }
        })?
    }

    /// Pod UIDs become comments (ipset / nft quoted strings): Kubernetes UIDs are UUIDs;
    /// anything that could break the quoting is refused.
    fn check_uid(&self, uid: &str) -> Result<(), NetxError> {
        let ok = !uid.is_empty()
            && uid.len() <= 128
            && uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if ok {
            Ok(())
        } else {
            Err(NetxError::InvalidPlan {
                netns: self.netns.clone(),
                detail: format!(
                    "pod uid {uid:?} cannot be a probe-set comment (1-128 of A-Z a-z 0-9 - _ . :)"
                ),
            })
        }
    }
}

/// The UID of the kubelet process, for the nftables host-probe rule (`skuid`): the first
/// process under `proc_root` (the host's `/proc`, e.g. `/host/proc` in the agent's container)
/// whose command (`comm`, or the base name of `argv[0]`) is `kubelet`, `kubelite` (microk8s),
/// `k3s`, `k3s-server` or `k3s-agent` (k3s runs the kubelet in-process). `Ok(None)` when there
/// is none; processes that vanish while being read are skipped.
pub fn find_kubelet_uid(proc_root: &Path) -> Result<Option<u32>, NetxError> {
    const NAMES: [&str; 5] = ["kubelet", "kubelite", "k3s", "k3s-server", "k3s-agent"];
    let entries = std::fs::read_dir(proc_root).map_err(|source| NetxError::Read {
        path: proc_root.to_path_buf(),
        source,
    })?;
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let argv0 = std::fs::read(dir.join("cmdline"))
            .ok()
            .and_then(|c| {
                let first = c.split(|b| *b == 0).next()?.to_vec();
                let first = String::from_utf8(first).ok()?;
                Some(first.rsplit('/').next().unwrap_or_default().to_string())
            })
            .unwrap_or_default();
        if !NAMES.contains(&comm.trim()) && !NAMES.contains(&argv0.as_str()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some() {
            return Ok(uid);
        }
    }
    Ok(None)
}

/// An `nft list table` output's lines without set elements (trimmed, counters dropped).
fn without_elements(listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut skipping = false;
    for (_, lines) in nft::table_blocks(listing) {
        for line in lines {
            if skipping {
                skipping = !line.ends_with('}');
                continue;
            }
            if line.starts_with("elements = {") {
                skipping = !line.ends_with('}');
                continue;
            }
            out.push(line);
        }
    }
    out
}

/// The chain names of an `nft list table` output.
fn chain_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|r| r.strip_suffix(" {"))
        .map(str::to_string)
        .collect()
}

/// The elements of an `nft list set` output: `elements = { 10.0.0.1 comment "uid", ... }`.
fn parse_nft_elements(text: &str) -> Vec<(IpAddr, String)> {
    let Some(start) = text.find("elements = {") else {
        return Vec::new();
    };
    let rest = &text[start + "elements = {".len()..];
    let body = rest.split('}').next().unwrap_or_default();
    body.split(',')
        .filter_map(|item| {
            let mut words = item.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            let comment = match (words.next(), words.next()) {
                (Some("comment"), Some(c)) => c.trim_matches('"').to_string(),
                _ => String::new(),
            };
            Some((ip, comment))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_uid_is_found_by_name() {
        let root = std::env::temp_dir().join(format!("mcni-h9a-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc_entry = |pid: u32, comm: &str, cmdline: &[u8], uid: u32| {
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("comm"), format!("{comm}\n")).expect("comm");
            std::fs::write(d.join("cmdline"), cmdline).expect("cmdline");
            std::fs::write(
                d.join("status"),
                format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
            )
            .expect("status");
        };
        std::fs::create_dir_all(root.join("self")).expect("non-numeric entry");
        proc_entry(1, "systemd", b"/sbin/init\0", 0);
        proc_entry(40, "containerd", b"/usr/bin/containerd\0", 0);
        assert_eq!(find_kubelet_uid(&root).expect("scan"), None);
        // comm is cut to 15 bytes and may differ; argv[0]'s base name counts too.
        proc_entry(77, "worker", b"/usr/local/bin/kubelet\0--config=/x\0", 1234);
        assert_eq!(find_kubelet_uid(&root).expect("scan"), Some(1234));
        proc_entry(12, "kubelite", b"/snap/microk8s/kubelite\0", 500);
        assert_eq!(
            find_kubelet_uid(&root).expect("scan"),
            Some(500),
            "lowest pid first"
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert!(
            find_kubelet_uid(&root).is_err(),
            "a missing proc root is an error"
        );
    }

    #[test]
    fn nft_elements_and_listings_are_parsed() {
        let set = "table inet istio-ambient-nat {\n\tset istio-inpod-probes-v4 {\n\t\ttype ipv4_addr\n\t\telements = { 10.0.0.1 comment \"uid-a\", 10.0.0.2,\n\t\t\t     10.0.0.3 comment \"uid-c\" }\n\t}\n}\n";
        assert_eq!(
            parse_nft_elements(set),
            vec![
                ("10.0.0.1".parse().expect("ip"), "uid-a".to_string()),
                ("10.0.0.2".parse().expect("ip"), String::new()),
                ("10.0.0.3".parse().expect("ip"), "uid-c".to_string()),
            ]
        );
        assert_eq!(
            without_elements(set),
            vec!["set istio-inpod-probes-v4 {", "type ipv4_addr", "}"]
        );
        assert!(parse_nft_elements("table inet t {\n}\n").is_empty());
        assert_eq!(
            chain_names("table inet t {\n\tchain postrouting {\n\t}\n\tchain x {\n\t}\n}\n"),
            vec!["postrouting", "x"]
        );
    }

    #[test]
    fn empty_builtin_chains_are_found_and_other_content_is_noticed() {
        let listing = "table ip nat {\n\tchain KEEP {\n\t\ttcp dport 9 counter packets 0 bytes 0 return\n\t}\n\n\tchain OUTPUT {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tcounter packets 0 bytes 0 jump KEEP\n\t}\n\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n}\n";
        assert_eq!(
            empty_builtin_chains(listing),
            (vec!["PREROUTING".to_string()], true)
        );
        let bare = "table ip raw {\n\tchain OUTPUT {\n\t\ttype filter hook output priority raw; policy accept;\n\t}\n\tchain PREROUTING {\n\t\ttype filter hook prerouting priority raw; policy drop;\n\t}\n}\n";
        assert_eq!(
            empty_builtin_chains(bare),
            (vec!["OUTPUT".to_string()], true)
        );
        let two = format!("{listing}{bare}");
        let blocks = table_texts(&two);
        assert_eq!(blocks.len(), 2);
        assert_eq!((blocks[0].0.as_str(), blocks[1].0.as_str()), ("nat", "raw"));
        assert_eq!(blocks[1].1, bare);
        let all_empty = "table ip raw {\n\tchain OUTPUT {\n\t\ttype filter hook output priority raw; policy accept;\n\t}\n}\n";
        assert_eq!(
            empty_builtin_chains(all_empty),
            (vec!["OUTPUT".to_string()], false)
        );
    }

    #[test]
    fn plan_has_the_routing_state_per_family() {
        let cfg = InpodConfig::default();
        let pod = PodOverrides::default();
        let dual = inpod_plan(&cfg, &pod, InpodBackend::Iptables, true);
        assert_eq!(dual.routes.rules.len(), 2);
        assert_eq!(dual.routes.local_routes.len(), 2);
        assert_eq!(dual.routes.rules[0].fwmask, Some(0xfff));
        assert_eq!(dual.routes.rules[0].priority, Some(32764));
        assert!(dual.v6_restore.is_some() && dual.nft.is_none());
        let no_lo6 = inpod_plan(&cfg, &pod, InpodBackend::Nftables, false);
        assert_eq!(no_lo6.routes.rules.len(), 2);
        assert_eq!(no_lo6.routes.local_routes.len(), 1);
        assert!(no_lo6.v4_restore.is_empty() && no_lo6.nft.is_some());
        let v4 = InpodConfig {
            enable_ipv6: false,
            ..cfg
        };
        let only4 = inpod_plan(&v4, &pod, InpodBackend::Iptables, true);
        assert_eq!(only4.routes.rules.len(), 1);
        assert_eq!(only4.routes.local_routes.len(), 1);
        assert!(only4.v6_restore.is_none());
    }
}
