//! The capture transaction the CNI plugin runs for a sidecar pod: iptables (v4, then v6) or
//! native nftables, then policy routing — all inside the pod netns, on one thread, with "a
//! failed apply leaves the netns exactly as before" semantics:
//!
//! 1. detect the iptables flavor (or use the forced one) without exec'ing anything on a fresh
//!    netns ([`iptables::detect_fast_here`]);
//! 2. snapshot every family that will be touched: nothing to exec when the netns provably has
//!    none of the touched tables, else `-save` (plus, for iptables-nft, the nf_tables chains);
//! 3. `-restore --noflush` v4, then v6;
//! 4. add addresses, ip rules and routes over netlink (existing ones are left alone and are not
//!    considered ours);
//! 5. on any failure: delete what step 4 created (reverse order), then replace every table
//!    touched in step 3 with its snapshot (iptables-nft: in place, see
//!    [`iptables::nft_rollback_texts`]; legacy: `-restore` without `--noflush`, only those
//!    tables), and report the original error (or both errors if the rollback fails too).
//!
//! Verify-or-repair (a repeated ADD, a drifted netns): when the plan says which state is ours
//! ([`Ownership`]) and the netns already has tables of the touched kind, step 3 first compares:
//! * iptables: the family's `-save` output against the plan's predicted `-save` form
//!   ([`crate::iptables_state::diff`]). Identical → no restore at all. Different → the expected
//!   form is confirmed with the real binary in a scratch netns ([`iptables::canonical_save`]) and
//!   the restore is the repair text ([`crate::iptables_state::repair_text`]): our chains flushed
//!   and refilled, our rules in built-in chains deleted and re-added, stale chains of ours gone —
//!   one restore, snapshotted and rolled back like a fresh one;
//! * nftables: the listing of our tables against the listing the fresh text gives in a scratch
//!   netns. Identical → nothing applied. Different → one transaction deletes our tables and
//!   rebuilds them ([`nft::replace_text`]).
//!
//! Addresses, ip rules and routes that already exist are left as they are (never duplicated).
//! [`Applier::check_capture`] runs the same comparisons read-only and reports what differs.
//!
//! With a detected (not forced) nft flavor, the restore of step 3 doubles as Istio's nft
//! usability probe: if it fails and the probe confirms nft is unusable, the transaction is
//! rolled back and run again with plain `iptables`.

use std::path::Path;

use crate::iptables::{self, IptablesFlavor, IptablesOptions};
use crate::netlink::{AddressSpec, Change, LocalRouteSpec, Netlink, RuleSpec};
use crate::netns::{InNetns, with_netns};
use crate::{IpFamily, NetxError, nft};

/// Which packet-filter API the rules are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` text (`ApplyPlan::v4_restore` / `v6_restore`).
    Iptables,
    /// `nft -f` text (`ApplyPlan::nft`).
    Nftables,
}

/// Routing state that goes with the rules (§2.3 step 20, §7.5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutesPlan {
    /// Addresses to add first, e.g. `::6/128` on `lo`.
    pub addresses: Vec<AddressSpec>,
    /// `ip rule add fwmark …` entries.
    pub rules: Vec<RuleSpec>,
    /// `ip route add local default dev lo table …` entries.
    pub local_routes: Vec<LocalRouteSpec>,
}

/// TPROXY policy routing: packets marked `mark` are delivered locally via table `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
}

impl RoutesPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.rules.is_empty() && self.local_routes.is_empty()
    }

    /// Istio sidecar routes (§2.3 step 20): with IPv6, `::6/128` on `lo`; with inbound TPROXY,
    /// `ip rule add fwmark MARK lookup TABLE` and `ip route add local default dev lo table
    /// TABLE` for v4 (and v6 when IPv6 is enabled).
    pub fn sidecar(ipv6: bool, tproxy: Option<TproxyRouting>) -> Self {
        let mut plan = RoutesPlan::default();
        if ipv6 {
            plan.addresses.push(AddressSpec {
                ifname: "lo".to_string(),
                addr: ipnet::IpNet::V6(ipnet::Ipv6Net::from(std::net::Ipv6Addr::new(
                    0, 0, 0, 0, 0, 0, 0, 6,
                ))),
            });
        }
        if let Some(tp) = tproxy {
            let families: &[IpFamily] = if ipv6 {
                &[IpFamily::V4, IpFamily::V6]
            } else {
                &[IpFamily::V4]
            };
            for &family in families {
                plan.rules.push(RuleSpec {
                    family,
                    fwmark: tp.mark,
                    fwmask: None,
                    table: tp.table,
                    priority: None,
                });
                plan.local_routes.push(LocalRouteSpec {
                    family,
                    table: tp.table,
                });
            }
        }
        plan
    }
}

/// Everything the plugin hands over for one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyPlan {
    /// IPv4 `iptables-restore` text (may be empty): what a fresh netns gets.
    pub v4_restore: String,
    /// IPv6 `ip6tables-restore` text, when IPv6 is enabled.
    pub v6_restore: Option<String>,
    /// `nft -f` text, used when the backend is [`Backend::Nftables`].
    pub nft: Option<String>,
    pub routes: RoutesPlan,
    /// Which existing state is ours, for verify-or-repair. `None`: the texts are applied as
    /// they are (`--noflush` on top of whatever exists).
    pub owned: Option<Ownership>,
}

/// The state a capture plan owns in a netns (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// The predicted `iptables-save` form of `v4_restore` once applied (our chains only).
    pub v4_save: String,
    /// Same for `v6_restore`.
    pub v6_save: Option<String>,
    /// Custom iptables chains that are ours (all the generator may create, not only this plan's).
    pub iptables_chains: Vec<String>,
    /// iptables tables that may hold them.
    pub iptables_tables: Vec<String>,
    /// nftables tables that are ours.
    pub nft_tables: Vec<nft::NftTable>,
}

/// What happened to the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesOutcome {
    /// Applied on a netns that had none of our rules.
    Installed,
    /// Already exactly as planned: nothing was applied.
    Unchanged,
    /// Drifted or partial rules were replaced.
    Repaired,
}

/// What an apply did (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub backend: Backend,
    /// The iptables flavor used (iptables backend only).
    pub flavor: Option<IptablesFlavor>,
    /// How many addresses/rules/routes were newly created (the rest already existed).
    pub routes_created: usize,
    pub rules: RulesOutcome,
}

/// One family's step of an iptables transaction.
enum Step {
    /// Apply the fresh text.
    Fresh,
    /// Nothing to do.
    Unchanged,
    /// Apply this repair text instead.
    Repair(String),
}

/// Applies capture plans with fixed settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applier {
    pub backend: Backend,
    pub iptables: IptablesOptions,
}

impl Default for Applier {
    fn default() -> Self {
        Applier {
            backend: Backend::Iptables,
            iptables: IptablesOptions::default(),
        }
    }
}

/// A netlink object created by this transaction (undone on failure).
pub(crate) enum Created {
    Address(AddressSpec),
    Rule(RuleSpec),
    Route(LocalRouteSpec),
}

/// iptables state to put back on failure.
struct Touched {
    family: IpFamily,
    snapshot: iptables::FamilySnapshot,
    tables: Vec<String>,
}

impl Applier {
    /// iptables backend (or nft if `native_nftables`), `FORCE_IPTABLES_BINARY` from the env.
    pub fn from_env(native_nftables: bool) -> Self {
        Applier {
            backend: if native_nftables {
                Backend::Nftables
            } else {
                Backend::Iptables
            },
            iptables: IptablesOptions::from_env(),
        }
    }

    /// Apply `plan` inside `netns` as one transaction (see module docs).
    pub fn apply_capture(&self, netns: &Path, plan: &ApplyPlan) -> Result<Applied, NetxError> {
        with_netns(netns, |ns| self.apply_capture_here(ns, plan))?
    }

    /// [`Applier::apply_capture`] on a thread that is already inside the netns.
    pub fn apply_capture_here(
        &self,
        ns: &InNetns<'_>,
        plan: &ApplyPlan,
    ) -> Result<Applied, NetxError> {
        match self.backend {
            Backend::Iptables => self.apply_iptables(ns, plan),
            Backend::Nftables => self.apply_nft(ns, plan),
        }
    }

    fn apply_iptables(&self, ns: &InNetns<'_>, plan: &ApplyPlan) -> Result<Applied, NetxError> {
        let opts = &self.iptables;
        let detection = iptables::detect_fast_here(ns, opts)?;
        match self.apply_iptables_with(ns, plan, &detection) {
            // nft was chosen without Istio's probe (see `detect_fast_here`). The failed restore
            // has been rolled back; if the probe confirms that iptables-nft cannot work here,
            // Istio would have picked plain `iptables`: do that.
            Err(NetxError::Command { ref command, .. })
                if detection.nft_unverified
                    && command.contains("tables-nft-restore")
                    && !iptables::nft_probe_ok(opts) =>
            {
                let plain = iptables::Detection::only(iptables::plain_or_none(ns)?);
                self.apply_iptables_with(ns, plan, &plain)
            }
            other => other,
        }
    }

    fn apply_iptables_with(
        &self,
        ns: &InNetns<'_>,
        plan: &ApplyPlan,
        detection: &iptables::Detection,
    ) -> Result<Applied, NetxError> {
        let opts = &self.iptables;
        let flavor = detection.flavor;
        let mut work: Vec<(IpFamily, String)> = Vec::new();
        let mut outcome = RulesOutcome::Unchanged;
        for (family, fresh) in iptables_work(plan) {
            let text = match self.iptables_step(ns, plan, detection, family, fresh)? {
                Step::Unchanged => continue,
                Step::Fresh => {
                    if outcome == RulesOutcome::Unchanged {
                        outcome = RulesOutcome::Installed;
                    }
                    fresh.to_string()
                }
                Step::Repair(text) => {
                    outcome = RulesOutcome::Repaired;
                    text
                }
            };
            work.push((family, text));
        }
        // Snapshot every family before changing anything.
        let mut snapshots = Vec::new();
        for (family, text) in &work {
            let tables = iptables::tables_in(text);
            let snapshot = iptables::snapshot_here(ns, opts, detection, *family, &tables)?;
            snapshots.push(Touched {
                family: *family,
                snapshot,
                tables,
            });
        }
        let mut touched: Vec<Touched> = Vec::new();
        for ((family, text), snap) in work.into_iter().zip(snapshots) {
            // Recorded before the restore: a restore that fails on its second table may already
            // have committed the first.
            touched.push(snap);
            if let Err(e) = iptables::restore_here(ns, opts, flavor, family, &text, true) {
                return Err(self.rollback_iptables(ns, flavor, &touched, e));
            }
        }
        match apply_routes(ns, &plan.routes) {
            Ok(routes_created) => Ok(Applied {
                backend: Backend::Iptables,
                flavor: Some(flavor),
                routes_created,
                rules: outcome,
            }),
            Err(e) => Err(self.rollback_iptables(ns, flavor, &touched, e)),
        }
    }

    /// Verify-or-repair decision for one family (see the module docs).
    fn iptables_step(
        &self,
        ns: &InNetns<'_>,
        plan: &ApplyPlan,
        detection: &iptables::Detection,
        family: IpFamily,
        fresh: &str,
    ) -> Result<Step, NetxError> {
        let Some(owned) = &plan.owned else {
            return Ok(Step::Fresh);
        };
        if iptables::any_table_known(detection, family, &owned.iptables_tables) == Some(false) {
            return Ok(Step::Fresh);
        }
        let actual = iptables::current_save_here(ns, &self.iptables, detection, family)?;
        if !crate::iptables_state::has_owned(&actual, &owned.iptables_chains) {
            return Ok(Step::Fresh);
        }
        if predicted_identical(owned, family, fresh, &actual) {
            return Ok(Step::Unchanged);
        }
        let canonical =
            iptables::canonical_save(ns, &self.iptables, detection.flavor, family, fresh)?;
        let drift = crate::iptables_state::diff(&canonical, &actual, &owned.iptables_chains);
        if drift.is_empty() {
            tracing::debug!(%family, "capture rules already in place (the predicted -save form differs from this iptables' spelling)");
            return Ok(Step::Unchanged);
        }
        tracing::info!(%family, drift = %join(&drift), "repairing drifted capture rules");
        Ok(Step::Repair(crate::iptables_state::repair_text(
            &canonical,
            &actual,
            fresh,
            &owned.iptables_chains,
        )))
    }

    fn rollback_iptables(
        &self,
        ns: &InNetns<'_>,
        flavor: IptablesFlavor,
        touched: &[Touched],
        original: NetxError,
    ) -> NetxError {
        let mut failure = None;
        for t in touched.iter().rev() {
            let restored = iptables::rollback_snapshot_here(
                ns,
                &self.iptables,
                flavor,
                t.family,
                &t.snapshot,
                &t.tables,
            );
            if let Err(e) = restored {
                failure.get_or_insert(e);
            }
        }
        with_rollback(original, failure)
    }

    fn apply_nft(&self, ns: &InNetns<'_>, plan: &ApplyPlan) -> Result<Applied, NetxError> {
        let fresh = plan.nft.as_deref().ok_or_else(|| NetxError::InvalidPlan {
            netns: ns.path().to_path_buf(),
            detail: "backend is nftables but the plan has no nft text".to_string(),
        })?;
        let (text, outcome) = match nft_step(ns, plan, fresh)? {
            Step::Fresh => (fresh.to_string(), RulesOutcome::Installed),
            Step::Unchanged => (String::new(), RulesOutcome::Unchanged),
            Step::Repair(text) => (text, RulesOutcome::Repaired),
        };
        let snapshot = if text.is_empty() {
            None
        } else {
            let snapshot = nft::snapshot_here(ns, &text)?;
            nft::apply_here(ns, &text)?;
            Some(snapshot)
        };
        match apply_routes(ns, &plan.routes) {
            Ok(routes_created) => Ok(Applied {
                backend: Backend::Nftables,
                flavor: None,
                routes_created,
                rules: outcome,
            }),
            Err(e) => {
                let rollback = snapshot.and_then(|s| nft::restore_here(ns, &s).err());
                Err(with_rollback(e, rollback))
            }
        }
    }

    /// Compare the netns's capture state with `plan` without changing anything: the problems
    /// found (each naming the family/table/chain/rule or route), empty when the netns holds
    /// exactly what [`Applier::apply_capture`] would leave. Needs [`ApplyPlan::owned`].
    pub fn check_capture(&self, netns: &Path, plan: &ApplyPlan) -> Result<Vec<String>, NetxError> {
        with_netns(netns, |ns| self.check_capture_here(ns, plan))?
    }

    /// [`Applier::check_capture`] on a thread that is already inside the netns.
    pub fn check_capture_here(
        &self,
        ns: &InNetns<'_>,
        plan: &ApplyPlan,
    ) -> Result<Vec<String>, NetxError> {
        let owned = plan.owned.as_ref().ok_or_else(|| NetxError::InvalidPlan {
            netns: ns.path().to_path_buf(),
            detail: "checking needs the plan's ownership data".to_string(),
        })?;
        let mut problems = Vec::new();
        match self.backend {
            Backend::Iptables => {
                let detection = iptables::detect_fast_here(ns, &self.iptables)?;
                for (family, fresh) in iptables_work(plan) {
                    let known =
                        iptables::any_table_known(&detection, family, &owned.iptables_tables);
                    let actual = if known == Some(false) {
                        String::new()
                    } else {
                        iptables::current_save_here(ns, &self.iptables, &detection, family)?
                    };
                    let chains = &owned.iptables_chains;
                    let predicted = owned.save(family);
                    let trusted = crate::iptables_state::prediction_fits(predicted, fresh);
                    let mut drift = crate::iptables_state::diff(predicted, &actual, chains);
                    if !trusted || (!drift.is_empty() && !actual.is_empty()) {
                        let canonical = iptables::canonical_save(
                            ns,
                            &self.iptables,
                            detection.flavor,
                            family,
                            fresh,
                        )?;
                        drift = crate::iptables_state::diff(&canonical, &actual, chains);
                    }
                    let flavor = detection.flavor.binary(family);
                    problems.extend(drift.iter().map(|d| format!("{flavor}: {d}")));
                }
            }
            Backend::Nftables => {
                let fresh = plan.nft.as_deref().unwrap_or_default();
                let present = owned_nft_tables_here(ns, owned)?;
                if present.is_empty() {
                    for t in nft::tables_in(fresh) {
                        problems.push(format!("nft table {} {} missing", t.family, t.name));
                    }
                } else {
                    let actual = nft::list_ruleset_here(ns)?;
                    let desired = nft_canonical_listing(fresh)?;
                    problems.extend(nft::drift(&desired, &actual, &owned.nft_tables));
                }
            }
        }
        problems.extend(check_routes(ns, &plan.routes)?);
        Ok(problems)
    }
}

/// The (family, fresh restore text) pairs of a plan that have rules.
fn iptables_work(plan: &ApplyPlan) -> Vec<(IpFamily, &str)> {
    let mut work: Vec<(IpFamily, &str)> = Vec::new();
    if !plan.v4_restore.trim().is_empty() {
        work.push((IpFamily::V4, &plan.v4_restore));
    }
    if let Some(v6) = plan.v6_restore.as_deref().filter(|t| !t.trim().is_empty()) {
        work.push((IpFamily::V6, v6));
    }
    work
}

impl Ownership {
    /// The predicted `-save` form for `family`.
    fn save(&self, family: IpFamily) -> &str {
        match family {
            IpFamily::V4 => &self.v4_save,
            IpFamily::V6 => self.v6_save.as_deref().unwrap_or_default(),
        }
    }
}

/// The fast path: the plan's predicted `-save` form fits its restore text and matches `actual`.
fn predicted_identical(owned: &Ownership, family: IpFamily, fresh: &str, actual: &str) -> bool {
    let predicted = owned.save(family);
    crate::iptables_state::prediction_fits(predicted, fresh)
        && crate::iptables_state::diff(predicted, actual, &owned.iptables_chains).is_empty()
}

fn join(items: &[impl std::fmt::Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Our nft tables that exist in the netns (netlink table dump, no exec).
fn owned_nft_tables_here(
    ns: &InNetns<'_>,
    owned: &Ownership,
) -> Result<Vec<nft::NftTable>, NetxError> {
    let kernel = nft::kernel_tables_here(ns)?;
    Ok(owned
        .nft_tables
        .iter()
        .filter(|t| kernel.contains(t))
        .cloned()
        .collect())
}

/// What `nft list ruleset` shows after `fresh` on an empty netns (a scratch one).
fn nft_canonical_listing(fresh: &str) -> Result<String, NetxError> {
    crate::netns::with_scratch_netns(|scratch| {
        nft::apply_here(scratch, fresh)?;
        nft::list_ruleset_here(scratch)
    })?
}

/// Verify-or-repair decision for the native nftables backend (see the module docs).
fn nft_step(ns: &InNetns<'_>, plan: &ApplyPlan, fresh: &str) -> Result<Step, NetxError> {
    let Some(owned) = &plan.owned else {
        return Ok(Step::Fresh);
    };
    let present = match owned_nft_tables_here(ns, owned) {
        Ok(present) => present,
        // Without a netlink view, `nft` itself decides below.
        Err(e) => {
            tracing::debug!(error = %e, "nf_tables table dump failed; listing the ruleset");
            owned.nft_tables.clone()
        }
    };
    if present.is_empty() {
        return Ok(Step::Fresh);
    }
    let actual = nft::list_ruleset_here(ns)?;
    let desired = nft_canonical_listing(fresh)?;
    let drift = nft::drift(&desired, &actual, &owned.nft_tables);
    if drift.is_empty() {
        return Ok(Step::Unchanged);
    }
    tracing::info!(drift = %join(&drift), "repairing drifted nftables capture rules");
    Ok(Step::Repair(nft::replace_text(&owned.nft_tables, fresh)))
}

/// Addresses, ip rules and local routes of `routes` that the netns lacks.
pub(crate) fn check_routes(
    ns: &InNetns<'_>,
    routes: &RoutesPlan,
) -> Result<Vec<String>, NetxError> {
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let mut nl = Netlink::open_here(ns)?;
    let mut problems = Vec::new();
    if !routes.addresses.is_empty() {
        let have = nl.addresses()?;
        for a in &routes.addresses {
            let index = nl.link_index(&a.ifname)?;
            let found = have.iter().any(|h| {
                Some(h.index) == index
                    && h.addr == a.addr.addr()
                    && h.prefix_len == a.addr.prefix_len()
            });
            if !found {
                problems.push(format!("address {} on {} missing", a.addr, a.ifname));
            }
        }
    }
    for r in &routes.rules {
        let rules = nl.rules(r.family)?;
        match rules.iter().filter(|h| h.matches(r)).count() {
            0 => problems.push(format!(
                "ip rule ({}) fwmark {:#x} lookup {} missing",
                r.family, r.fwmark, r.table
            )),
            1 => {}
            n => problems.push(format!(
                "ip rule ({}) fwmark {:#x} lookup {} present {n} times",
                r.family, r.fwmark, r.table
            )),
        }
    }
    for r in &routes.local_routes {
        let lo = nl.link_index("lo")?;
        let found = nl.routes(r.family, Some(r.table))?.iter().any(|h| {
            h.local && h.dst.is_none_or(|d| d.prefix_len() == 0) && (lo.is_none() || h.oif == lo)
        });
        if !found {
            problems.push(format!(
                "route ({}) local default dev lo table {} missing",
                r.family, r.table
            ));
        }
    }
    Ok(problems)
}

pub(crate) fn with_rollback(original: NetxError, rollback: Option<NetxError>) -> NetxError {
    match rollback {
        None => original,
        Some(rollback) => NetxError::RollbackFailed {
            original: Box::new(original),
            rollback: Box::new(rollback),
        },
    }
}

/// Add addresses, rules, routes (existing ones are kept, duplicated ip rules reduced to one); on
/// failure delete what was created here and return the error.
fn apply_routes(ns: &InNetns<'_>, routes: &RoutesPlan) -> Result<usize, NetxError> {
    apply_routes_tracked(ns, routes).map(|created| created.len())
}

/// [`apply_routes`], returning what it created (for [`undo_routes`] when a later step fails).
pub(crate) fn apply_routes_tracked(
    ns: &InNetns<'_>,
    routes: &RoutesPlan,
) -> Result<Vec<Created>, NetxError> {
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let mut nl = Netlink::open_here(ns)?;
    let mut created: Vec<Created> = Vec::new();
    let result = (|| -> Result<(), NetxError> {
        for a in &routes.addresses {
            if nl.add_address(a)? == Change::Applied {
                created.push(Created::Address(a.clone()));
            }
        }
        for r in &routes.rules {
            if nl.add_rule(r)? == Change::Applied {
                created.push(Created::Rule(r.clone()));
            }
        }
        for r in &routes.local_routes {
            if nl.add_local_route(r)? == Change::Applied {
                created.push(Created::Route(r.clone()));
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            // Last, when nothing else can fail: extra copies of our ip rules (a rule without a
            // priority can be added twice) go, the first one stays. Removing a duplicate does
            // not change routing, so it needs no rollback.
            for r in routes.rules.iter().filter(|r| r.priority.is_none()) {
                let copies = nl.rules(r.family)?.iter().filter(|h| h.matches(r)).count();
                for _ in 1..copies {
                    nl.del_rule(r)?;
                }
            }
            Ok(created)
        }
        Err(e) => {
            let failure = undo_with(&mut nl, &created).err();
            Err(with_rollback(e, failure))
        }
    }
}

/// Delete what [`apply_routes_tracked`] created (newest first).
pub(crate) fn undo_routes(ns: &InNetns<'_>, created: &[Created]) -> Result<(), NetxError> {
    if created.is_empty() {
        return Ok(());
    }
    let mut nl = Netlink::open_here(ns)?;
    undo_with(&mut nl, created)
}

fn undo_with(nl: &mut Netlink, created: &[Created]) -> Result<(), NetxError> {
    let mut failure = None;
    for c in created.iter().rev() {
        let undone = match c {
            Created::Address(a) => nl.del_address(a),
            Created::Rule(r) => nl.del_rule(r),
            Created::Route(r) => nl.del_local_route(r),
        };
        if let Err(err) = undone {
            failure.get_or_insert(err);
        }
    }
    failure.map_or(Ok(()), Err)
}

/// [`Applier::apply_capture`] with the iptables backend and settings from the environment.
pub fn apply_capture(netns: &Path, plan: &ApplyPlan) -> Result<(), NetxError> {
    Applier::from_env(false)
        .apply_capture(netns, plan)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_routes_match_istio_step_20() {
        assert!(RoutesPlan::sidecar(false, None).is_empty());
        let plan = RoutesPlan::sidecar(
            true,
            Some(TproxyRouting {
                mark: 1337,
                table: 133,
            }),
        );
        assert_eq!(plan.addresses.len(), 1);
        assert_eq!(plan.addresses[0].ifname, "lo");
        assert_eq!(plan.addresses[0].addr.to_string(), "::6/128");
        assert_eq!(
            plan.rules
                .iter()
                .map(|r| (r.family, r.fwmark, r.table))
                .collect::<Vec<_>>(),
            vec![(IpFamily::V4, 1337, 133), (IpFamily::V6, 1337, 133)]
        );
        assert_eq!(plan.local_routes.len(), 2);
        let v4only = RoutesPlan::sidecar(
            false,
            Some(TproxyRouting {
                mark: 1337,
                table: 133,
            }),
        );
        assert!(v4only.addresses.is_empty());
        assert_eq!(v4only.rules.len(), 1);
    }
}
