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
    /// IPv4 `iptables-restore` text (may be empty).
    pub v4_restore: String,
    /// IPv6 `ip6tables-restore` text, when IPv6 is enabled.
    pub v6_restore: Option<String>,
    /// `nft -f` text, used when the backend is [`Backend::Nftables`].
    pub nft: Option<String>,
    pub routes: RoutesPlan,
}

/// What an apply did (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub backend: Backend,
    /// The iptables flavor used (iptables backend only).
    pub flavor: Option<IptablesFlavor>,
    /// How many addresses/rules/routes were newly created (the rest already existed).
    pub routes_created: usize,
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
enum Created {
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
        let mut work: Vec<(IpFamily, &str)> = Vec::new();
        if !plan.v4_restore.trim().is_empty() {
            work.push((IpFamily::V4, &plan.v4_restore));
        }
        if let Some(v6) = plan.v6_restore.as_deref().filter(|t| !t.trim().is_empty()) {
            work.push((IpFamily::V6, v6));
        }
        // Snapshot every family before changing anything.
        let mut snapshots = Vec::new();
        for &(family, text) in &work {
            let tables = iptables::tables_in(text);
            let snapshot = iptables::snapshot_here(ns, opts, detection, family, &tables)?;
            snapshots.push(Touched {
                family,
                snapshot,
                tables,
            });
        }
        let mut touched: Vec<Touched> = Vec::new();
        for ((family, text), snap) in work.into_iter().zip(snapshots) {
            // Recorded before the restore: a restore that fails on its second table may already
            // have committed the first.
            touched.push(snap);
            if let Err(e) = iptables::restore_here(ns, opts, flavor, family, text, true) {
                return Err(self.rollback_iptables(ns, flavor, &touched, e));
            }
        }
        match apply_routes(ns, &plan.routes) {
            Ok(routes_created) => Ok(Applied {
                backend: Backend::Iptables,
                flavor: Some(flavor),
                routes_created,
            }),
            Err(e) => Err(self.rollback_iptables(ns, flavor, &touched, e)),
        }
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
        let text = plan.nft.as_deref().ok_or_else(|| NetxError::InvalidPlan {
            netns: ns.path().to_path_buf(),
            detail: "backend is nftables but the plan has no nft text".to_string(),
        })?;
        let snapshot = nft::snapshot_here(ns, text)?;
        nft::apply_here(ns, text)?;
        match apply_routes(ns, &plan.routes) {
            Ok(routes_created) => Ok(Applied {
                backend: Backend::Nftables,
                flavor: None,
                routes_created,
            }),
            Err(e) => Err(with_rollback(e, nft::restore_here(ns, &snapshot).err())),
        }
    }
}

fn with_rollback(original: NetxError, rollback: Option<NetxError>) -> NetxError {
    match rollback {
        None => original,
        Some(rollback) => NetxError::RollbackFailed {
            original: Box::new(original),
            rollback: Box::new(rollback),
        },
    }
}

/// Add addresses, rules, routes; on failure delete what was created here and return the error.
fn apply_routes(ns: &InNetns<'_>, routes: &RoutesPlan) -> Result<usize, NetxError> {
    if routes.is_empty() {
        return Ok(0);
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
        Ok(()) => Ok(created.len()),
        Err(e) => {
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
            Err(with_rollback(e, failure))
        }
    }
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
