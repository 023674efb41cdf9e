//! Removing sidecar capture from a netns (init-container mode `--cleanup-only` / `--reconcile`).
//!
//! The exact inverse of the configured rules is tried first (one all-or-nothing restore per
//! family, or deleting the three nft tables). If the netns has drifted from that configuration,
//! a fallback rewrites every table that holds `ISTIO_*` chains without them and without any jump
//! into them — still one atomic restore per family.

use std::path::Path;

use meshcni_netx::netlink::Netlink;
use meshcni_netx::{
    Applier, Backend, IpFamily, RoutesPlan, TproxyRouting, iptables as ipt, with_netns,
};
use meshcni_rules::iptables::{self, Family};
use meshcni_rules::nft;
use meshcni_rules::sidecar::RuleSet;

/// Removes everything `rs` installs (rules, TPROXY routing, the `::6` address).
pub fn remove_sidecar_capture(applier: &Applier, netns: &Path, rs: &RuleSet) -> Result<(), String> {
    with_netns(netns, |ns| -> Result<(), String> {
        match applier.backend {
            Backend::Nftables => {
                meshcni_netx::nft::apply_here(ns, &nft::render_delete())
                    .map_err(|e| e.to_string())?;
            }
            _ => {
                let flavor = ipt::detect_here(ns, &applier.iptables).map_err(|e| e.to_string())?;
                for (family, fam) in [(Family::V4, IpFamily::V4), (Family::V6, IpFamily::V6)] {
                    if family == Family::V6 && !rs.ipv6 {
                        continue;
                    }
                    let exact = iptables::render_cleanup(rs, family);
                    if exact.is_empty()
                        || ipt::restore_here(ns, &applier.iptables, flavor, fam, &exact, true)
                            .is_ok()
                    {
                        continue;
                    }
                    let save = ipt::save_here(ns, &applier.iptables, flavor, fam)
                        .map_err(|e| e.to_string())?;
                    let filtered = without_istio_chains(&save);
                    if !filtered.is_empty() {
                        ipt::restore_here(ns, &applier.iptables, flavor, fam, &filtered, false)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        let tproxy = rs.tproxy_routing.as_ref().map(|t| TproxyRouting {
            mark: t.mark,
            table: t.table,
        });
        let routes = RoutesPlan::sidecar(rs.ipv6, tproxy);
        let mut nl = Netlink::open_here(ns).map_err(|e| e.to_string())?;
        for r in &routes.local_routes {
            nl.del_local_route(r).map_err(|e| e.to_string())?;
        }
        for r in &routes.rules {
            nl.del_rule(r).map_err(|e| e.to_string())?;
        }
        for a in &routes.addresses {
            nl.del_address(a).map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

/// Restore text (for use *without* `--noflush`) re-creating each table of an `iptables-save`
/// output that mentions an `ISTIO_*` chain, minus those chains and every rule jumping into
/// them. Tables without Istio chains are left out (untouched). Pure.
pub fn without_istio_chains(save: &str) -> String {
    let mut out = String::new();
    let mut table = String::new();
    let mut touched = false;
    for line in save.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.starts_with('*') {
            table.clear();
            touched = false;
        }
        let istio = line.starts_with(":ISTIO_")
            || line.starts_with("-A ISTIO_")
            || line
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with("ISTIO_"));
        if istio {
            touched = true;
            continue;
        }
        table.push_str(line);
        table.push('\n');
        if line == "COMMIT" {
            if touched {
                out.push_str(&table);
            }
            table.clear();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_drops_istio_chains_and_jumps_only_in_touched_tables() {
        let save = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:KEEP - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j KEEP\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n";
        assert_eq!(
            without_istio_chains(save),
            "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KEEP - [0:0]\n-A OUTPUT -j KEEP\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_to_do_without_istio() {
        assert_eq!(
            without_istio_chains("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            ""
        );
    }
}
