//! iptables / nft application and the transaction's rollback, in real namespaces. Needs root.

mod common;

use std::path::Path;

use common::TestNetns;
use meshcni_netx::iptables::{self, IptablesFlavor, IptablesOptions};
use meshcni_netx::netlink::{LocalRouteSpec, RuleSpec};
use meshcni_netx::{
    Applier, ApplyPlan, Backend, IpFamily, NetxError, Ownership, RoutesPlan, RulesOutcome,
    TproxyRouting, nft, with_netns,
};

/// Istio's HEAD golden for `ipv6-dns-uid-gid`: v4 and v6 restore text (uses `-m owner`).
fn golden_v4_v6() -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio/istio-iptables-capture/ipv6-dns-uid-gid.golden");
    let text = std::fs::read_to_string(&path).expect("read golden fixture");
    let body: Vec<&str> = text
        .lines()
        .filter(|l| !l.ends_with("tables-save"))
        .collect();
    let split = body
        .iter()
        .position(|l| *l == "COMMIT")
        .expect("v4 section ends with COMMIT");
    let v4 = body[..=split].join("\n") + "\n";
    let v6 = body[split + 1..].join("\n") + "\n";
    (v4, v6)
}

fn applier(flavor: IptablesFlavor) -> Applier {
    Applier {
        backend: Backend::Iptables,
        iptables: IptablesOptions {
            force: Some(flavor),
            ..IptablesOptions::default()
        },
    }
}

fn save(ns: &TestNetns, flavor: IptablesFlavor, family: IpFamily) -> String {
    iptables::save(&ns.path(), flavor, family).expect("save")
}

fn apply_golden_and_read_back(flavor: IptablesFlavor) {
    let ns = TestNetns::new();
    let (v4, v6) = golden_v4_v6();
    let plan = ApplyPlan {
        v4_restore: v4,
        v6_restore: Some(v6),
        ..ApplyPlan::default()
    };
    let applied = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect("apply golden");
    assert_eq!(applied.flavor, Some(flavor));
    let s4 = save(&ns, flavor, IpFamily::V4);
    let s6 = save(&ns, flavor, IpFamily::V6);
    for want in [
        ":ISTIO_OUTPUT - [0:0]",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN",
        "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 2 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(
            s4.contains(want),
            "{flavor:?} v4 save lacks `{want}`:\n{s4}"
        );
    }
    assert!(
        s6.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
        "{s6}"
    );
    assert!(!s4.contains("# Generated"), "comments are stripped");
    // The other flavor sees nothing: rules went to the chosen kernel API only.
    let other = match flavor {
        IptablesFlavor::Legacy => IptablesFlavor::Nft,
        _ => IptablesFlavor::Legacy,
    };
    assert!(!save(&ns, other, IpFamily::V4).contains("ISTIO_OUTPUT"));
}

#[test]
fn golden_restore_text_applies_with_legacy() {
    apply_golden_and_read_back(IptablesFlavor::Legacy);
}

#[test]
fn golden_restore_text_applies_with_nft() {
    apply_golden_and_read_back(IptablesFlavor::Nft);
}

#[test]
fn detection_picks_nft_for_a_fresh_netns_and_legacy_when_it_has_rules() {
    let ns = TestNetns::new();
    let opts = IptablesOptions::default();
    let fresh = with_netns(&ns.path(), |here| iptables::detect_here(here, &opts)).expect("enter");
    assert_eq!(fresh.expect("detect"), IptablesFlavor::Nft);
    // Detection must not leave anything behind in the pod netns.
    assert_eq!(nft::list_ruleset(&ns.path()).expect("list").trim(), "");
    let legacy_rules =
        "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j ACCEPT\n-A OUTPUT -j ACCEPT\nCOMMIT\n";
    let forced = IptablesOptions {
        force: Some(IptablesFlavor::Legacy),
        ..IptablesOptions::default()
    };
    with_netns(&ns.path(), |here| {
        iptables::restore_here(
            here,
            &forced,
            IptablesFlavor::Legacy,
            IpFamily::V4,
            legacy_rules,
            true,
        )
    })
    .expect("enter")
    .expect("seed legacy rules");
    let detected =
        with_netns(&ns.path(), |here| iptables::detect_here(here, &opts)).expect("enter");
    assert_eq!(detected.expect("detect"), IptablesFlavor::Legacy);
    let forced_nft = IptablesOptions {
        force: Some(IptablesFlavor::Nft),
        ..IptablesOptions::default()
    };
    let detected =
        with_netns(&ns.path(), |here| iptables::detect_here(here, &forced_nft)).expect("enter");
    assert_eq!(detected.expect("detect"), IptablesFlavor::Nft);
}

/// Pre-existing state in nat and mangle; the plan touches nat (existing) and raw (absent).
const EXISTING_V4: &str = "*nat\n:KEEP - [0:0]\n-A OUTPUT -j KEEP\n-A KEEP -p tcp --dport 9 -j RETURN\nCOMMIT\n*mangle\n-A PREROUTING -j RETURN\nCOMMIT\n";
const EXISTING_V6: &str = "*nat\n-A OUTPUT -p udp -j RETURN\nCOMMIT\n";
const PLAN_V4: &str = "*nat\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\nCOMMIT\n*raw\n-N ISTIO_OUTPUT_DNS\n-A OUTPUT -j ISTIO_OUTPUT_DNS\nCOMMIT\n";
const BAD_V6: &str = "*nat\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j NO_SUCH_CHAIN_MCNI\nCOMMIT\n";

/// Legacy (x_tables) cannot unregister a table from a netns, so a table the failed plan brought
/// into existence stays (empty). To compare byte for byte, the legacy scenario pre-creates `raw`;
/// the nft scenario leaves it absent and checks that the rollback deletes it again.
const EXISTING_V4_LEGACY_RAW: &str = "*raw\n-A PREROUTING -j RETURN\nCOMMIT\n";

fn seed(ns: &TestNetns, flavor: IptablesFlavor) {
    let opts = IptablesOptions {
        force: Some(flavor),
        ..IptablesOptions::default()
    };
    with_netns(&ns.path(), |here| {
        iptables::restore_here(here, &opts, flavor, IpFamily::V4, EXISTING_V4, true)?;
        if flavor == IptablesFlavor::Legacy {
            iptables::restore_here(
                here,
                &opts,
                flavor,
                IpFamily::V4,
                EXISTING_V4_LEGACY_RAW,
                true,
            )?;
        }
        iptables::restore_here(here, &opts, flavor, IpFamily::V6, EXISTING_V6, true)
    })
    .expect("enter")
    .expect("seed existing rules");
}

fn failed_v6_leaves_v4_untouched(flavor: IptablesFlavor) {
    let ns = TestNetns::new();
    seed(&ns, flavor);
    let before4 = save(&ns, flavor, IpFamily::V4);
    let before6 = save(&ns, flavor, IpFamily::V6);
    let plan = ApplyPlan {
        v4_restore: PLAN_V4.to_string(),
        v6_restore: Some(BAD_V6.to_string()),
        ..ApplyPlan::default()
    };
    let err = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect_err("v6 must fail");
    let msg = err.to_string();
    assert!(
        matches!(err, NetxError::Command { .. }),
        "original error expected: {err:?}"
    );
    assert!(
        msg.contains(&flavor.restore_binary(IpFamily::V6)),
        "names the command: {msg}"
    );
    assert!(
        msg.contains(&ns.path().display().to_string()),
        "names the netns: {msg}"
    );
    assert!(msg.contains("line"), "carries stderr: {msg}");
    assert_eq!(
        save(&ns, flavor, IpFamily::V4),
        before4,
        "{flavor:?} v4 must be byte-identical"
    );
    assert_eq!(
        save(&ns, flavor, IpFamily::V6),
        before6,
        "{flavor:?} v6 must be byte-identical"
    );
    if flavor == IptablesFlavor::Nft {
        // The `raw` table did not exist before; the rollback removed it again.
        let ruleset = nft::list_ruleset(&ns.path()).expect("nft list");
        assert!(!ruleset.contains("table ip raw"), "{ruleset}");
        assert!(!ruleset.contains("ISTIO"), "{ruleset}");
    }
    // And the same plan with a good v6 goes through afterwards.
    let good = ApplyPlan {
        v6_restore: Some(PLAN_V4.replace("*raw", "*mangle")),
        ..plan
    };
    applier(flavor)
        .apply_capture(&ns.path(), &good)
        .expect("good plan");
    assert!(
        save(&ns, flavor, IpFamily::V4)
            .contains("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN")
    );
    assert!(save(&ns, flavor, IpFamily::V4).contains("-A KEEP -p tcp -m tcp --dport 9 -j RETURN"));
}

#[test]
fn failed_v6_restore_rolls_back_v4_legacy() {
    failed_v6_leaves_v4_untouched(IptablesFlavor::Legacy);
}

#[test]
fn failed_v6_restore_rolls_back_v4_nft() {
    failed_v6_leaves_v4_untouched(IptablesFlavor::Nft);
}

#[test]
fn failed_routes_roll_back_rules_and_created_routing() {
    // lo is down: IPv4 rules and local routes work, the IPv6 local route is refused
    // ("Nexthop device is not up"), which is the late failure we want.
    let ns = TestNetns::new_lo_down();
    let flavor = IptablesFlavor::Nft;
    seed(&ns, flavor);
    let before4 = save(&ns, flavor, IpFamily::V4);
    let before6 = save(&ns, flavor, IpFamily::V6);
    let rules_before = ns.ip(&["rule", "show"]);
    let mut routes = RoutesPlan::sidecar(
        false,
        Some(TproxyRouting {
            mark: 1337,
            table: 133,
        }),
    );
    routes.local_routes.push(LocalRouteSpec {
        family: IpFamily::V6,
        table: 133,
    });
    let plan = ApplyPlan {
        v4_restore: PLAN_V4.to_string(),
        v6_restore: Some(PLAN_V4.replace("*raw", "*mangle")),
        routes,
        ..ApplyPlan::default()
    };
    let err = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect_err("v6 route must fail");
    assert!(matches!(err, NetxError::Netlink { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("add route (ipv6) local default dev lo table 133"),
        "{err}"
    );
    assert_eq!(save(&ns, flavor, IpFamily::V4), before4);
    assert_eq!(save(&ns, flavor, IpFamily::V6), before6);
    assert_eq!(
        ns.ip(&["rule", "show"]),
        rules_before,
        "created ip rule must be removed"
    );
    assert_eq!(
        ns.ip(&["route", "show", "table", "133"]).trim(),
        "",
        "created route must be removed"
    );
}

#[test]
fn sidecar_tproxy_routes_are_applied_and_reapplying_is_idempotent() {
    let ns = TestNetns::new();
    let plan = ApplyPlan {
        v4_restore: PLAN_V4.to_string(),
        v6_restore: None,
        routes: RoutesPlan::sidecar(
            true,
            Some(TproxyRouting {
                mark: 1337,
                table: 133,
            }),
        ),
        ..ApplyPlan::default()
    };
    let first = applier(IptablesFlavor::Nft)
        .apply_capture(&ns.path(), &plan)
        .expect("apply");
    assert_eq!(first.routes_created, 5);
    assert!(ns.ip(&["rule", "show"]).contains("fwmark 0x539 lookup 133"));
    assert!(
        ns.ip(&["-6", "rule", "show"])
            .contains("fwmark 0x539 lookup 133")
    );
    assert!(
        ns.ip(&["route", "show", "table", "133"])
            .contains("local default dev lo")
    );
    assert!(
        ns.ip(&["-6", "route", "show", "table", "133"])
            .contains("local default dev lo")
    );
    assert!(
        ns.ip(&["-6", "addr", "show", "dev", "lo"])
            .contains("::6/128")
    );
    // Routing is idempotent; the rule text itself is the caller's to reconcile.
    let again = ApplyPlan {
        v4_restore: String::new(),
        ..plan
    };
    let second = applier(IptablesFlavor::Nft)
        .apply_capture(&ns.path(), &again)
        .expect("re-apply");
    assert_eq!(second.routes_created, 0);
    assert_eq!(ns.ip(&["rule", "show"]).matches("fwmark 0x539").count(), 1);
}

const NFT_TEXT: &str = "add table inet mcni-test-nat
flush table inet mcni-test-nat
add chain inet mcni-test-nat output { type nat hook output priority -100 ; }
add chain inet mcni-test-nat istio-output
add rule inet mcni-test-nat output counter jump istio-output
add rule inet mcni-test-nat istio-output meta l4proto tcp ip daddr != 127.0.0.1/32 mark and 0xfff != 0x539 counter redirect to :15001
";

#[test]
fn nft_apply_lists_and_rolls_back_on_route_failure() {
    let ns = TestNetns::new();
    nft::apply(&ns.path(), NFT_TEXT).expect("nft apply");
    let listed = nft::list_ruleset(&ns.path()).expect("list");
    assert!(listed.contains("table inet mcni-test-nat"), "{listed}");
    assert!(listed.contains("redirect to :15001"), "{listed}");
    // Invalid text: one transaction, nothing applied, stderr in the error.
    let err = nft::apply(
        &ns.path(),
        "add table inet mcni-x\nadd rule inet mcni-x nochain drop\n",
    )
    .expect_err("bad nft");
    assert!(err.to_string().contains("nft -f -"), "{err}");
    assert!(
        !nft::list_ruleset(&ns.path())
            .expect("list")
            .contains("mcni-x")
    );

    // Transaction with the nft backend: the route fails (lo down for v6) → table restored.
    let down = TestNetns::new_lo_down();
    nft::apply(&down.path(), NFT_TEXT).expect("seed");
    let before = nft::list_ruleset(&down.path()).expect("list");
    let changed = NFT_TEXT.replace("15001", "15999");
    let plan = ApplyPlan {
        nft: Some(changed.clone()),
        routes: RoutesPlan {
            local_routes: vec![LocalRouteSpec {
                family: IpFamily::V6,
                table: 100,
            }],
            ..RoutesPlan::default()
        },
        ..ApplyPlan::default()
    };
    let nft_applier = Applier {
        backend: Backend::Nftables,
        iptables: IptablesOptions::default(),
    };
    nft_applier
        .apply_capture(&down.path(), &plan)
        .expect_err("route must fail");
    assert_eq!(nft::list_ruleset(&down.path()).expect("list"), before);
    // Plan without nft text is rejected up front.
    let err = nft_applier
        .apply_capture(&down.path(), &ApplyPlan::default())
        .expect_err("no text");
    assert!(matches!(err, NetxError::InvalidPlan { .. }));
    // Success path.
    let ok = ApplyPlan {
        nft: Some(changed),
        ..ApplyPlan::default()
    };
    nft_applier.apply_capture(&down.path(), &ok).expect("apply");
    assert!(
        nft::list_ruleset(&down.path())
            .expect("list")
            .contains("redirect to :15999")
    );
}

#[test]
fn rule_specs_with_mask_and_priority() {
    let ns = TestNetns::new();
    let spec = RuleSpec {
        family: IpFamily::V4,
        fwmark: 0x111,
        fwmask: Some(0xfff),
        table: 100,
        priority: Some(32764),
    };
    let plan = ApplyPlan {
        routes: RoutesPlan {
            rules: vec![spec],
            ..RoutesPlan::default()
        },
        ..ApplyPlan::default()
    };
    applier(IptablesFlavor::Nft)
        .apply_capture(&ns.path(), &plan)
        .expect("apply");
    assert!(
        ns.ip(&["rule", "show"])
            .contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
        "{}",
        ns.ip(&["rule", "show"])
    );
}

/// `ip netns exec NAME prog args…`, asserting success.
fn run_in(ns: &TestNetns, prog: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, prog])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{prog} {args:?} in {} failed: {}",
        ns.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The three views a rollback must leave unchanged (timestamps stripped).
fn all_views(ns: &TestNetns) -> String {
    let strip = |s: String| -> String {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    format!(
        "## iptables-nft-save\n{}## ip6tables-nft-save\n{}## nft list ruleset\n{}",
        strip(run_in(ns, "iptables-nft-save", &["-c"])),
        strip(run_in(ns, "ip6tables-nft-save", &["-c"])),
        run_in(ns, "nft", &["list", "ruleset"])
    )
}

/// H8's defect: with pre-existing iptables-nft rules, a rolled-back apply must leave `nft list
/// ruleset` byte-identical too (no extra built-in chains, tables keep their place), including
/// rules nft itself cannot re-read (xtables-compat `socket`/`TPROXY`) and comments. The flavor
/// is detected (exec-free path), not forced.
#[test]
fn nft_flavor_rollback_is_byte_identical_in_iptables_and_nft_views() {
    let ns = TestNetns::new_lo_down(); // lo down: the IPv6 local route fails late
    for args in [
        &["-t", "nat", "-N", "PRE_EXISTING"][..],
        &["-t", "nat", "-A", "PRE_EXISTING", "-j", "RETURN"],
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "10.1.2.3/32",
            "-j",
            "PRE_EXISTING",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-m",
            "socket",
            "--transparent",
            "-m",
            "comment",
            "--comment",
            "keep me",
            "-j",
            "MARK",
            "--set-mark",
            "5",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            "0x539/0xfff",
            "-j",
            "TPROXY",
            "--on-port",
            "15006",
            "--tproxy-mark",
            "0x539/0xffffffff",
        ],
    ] {
        run_in(&ns, "iptables-nft", args);
    }
    run_in(
        &ns,
        "ip6tables-nft",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "fd00::9/128",
            "-j",
            "RETURN",
        ],
    );
    run_in(
        &ns,
        "ip6tables-nft",
        &[
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "fd00::9/128",
            "-j",
            "ACCEPT",
        ],
    );
    let before = all_views(&ns);
    assert!(
        before.contains("xt match socket") || before.contains("socket"),
        "{before}"
    );
    let v4 = format!(
        "{PLAN_V4}*mangle\n-N ISTIO_DIVERT\n-A PREROUTING -p tcp -j ISTIO_DIVERT\n-A OUTPUT -j ISTIO_DIVERT\n-A ISTIO_DIVERT -j MARK --set-mark 1337\nCOMMIT\n"
    );
    let plan = ApplyPlan {
        v4_restore: v4,
        v6_restore: Some(PLAN_V4.replace("*raw", "*mangle")),
        routes: RoutesPlan {
            local_routes: vec![LocalRouteSpec {
                family: IpFamily::V6,
                table: 133,
            }],
            ..RoutesPlan::default()
        },
        ..ApplyPlan::default()
    };
    let err = Applier::default()
        .apply_capture(&ns.path(), &plan)
        .expect_err("v6 route must fail");
    assert!(matches!(err, NetxError::Netlink { .. }), "{err:?}");
    assert_eq!(all_views(&ns), before, "rollback changed the netns");
    // The same plan without the failing route applies, with the detected nft flavor.
    let ok = ApplyPlan {
        routes: RoutesPlan::default(),
        ..plan
    };
    let applied = Applier::default()
        .apply_capture(&ns.path(), &ok)
        .expect("apply");
    assert_eq!(applied.flavor, Some(IptablesFlavor::Nft));
    assert!(all_views(&ns).contains("ISTIO_DIVERT"));
}

/// The exec-free readers agree with the tools: nf_tables tables/chains over netlink, and the
/// legacy table names of the *thread's* netns (not the process's).
#[test]
fn netlink_and_proc_readers_see_the_threads_netns() {
    let ns = TestNetns::new();
    let fresh = with_netns(&ns.path(), |here| {
        (
            nft::kernel_tables_here(here).expect("table dump"),
            iptables::legacy_tables_here(here, IpFamily::V4),
            iptables::legacy_tables_here(here, IpFamily::V6),
        )
    })
    .expect("enter");
    assert_eq!(fresh, (vec![], Some(vec![]), Some(vec![])));
    run_in(
        &ns,
        "iptables-nft",
        &["-t", "nat", "-A", "OUTPUT", "-j", "RETURN"],
    );
    run_in(&ns, "nft", &["add", "table", "inet", "mcni-x"]);
    run_in(&ns, "nft", &["add", "chain", "inet", "mcni-x", "c"]);
    run_in(
        &ns,
        "iptables-legacy",
        &["-t", "mangle", "-A", "OUTPUT", "-j", "RETURN"],
    );
    let (tables, v4_chains, all_chains, legacy4, legacy6) = with_netns(&ns.path(), |here| {
        (
            nft::kernel_tables_here(here).expect("table dump"),
            nft::kernel_chains_here(here, nft::NFPROTO_IPV4).expect("chain dump"),
            nft::kernel_chains_here(here, nft::NFPROTO_UNSPEC).expect("chain dump"),
            iptables::legacy_tables_here(here, IpFamily::V4),
            iptables::legacy_tables_here(here, IpFamily::V6),
        )
    })
    .expect("enter");
    let t = |family: &str, name: &str| nft::NftTable {
        family: family.to_string(),
        name: name.to_string(),
    };
    assert_eq!(tables, vec![t("ip", "nat"), t("inet", "mcni-x")]);
    assert_eq!(v4_chains.len(), 1, "{v4_chains:?}");
    assert_eq!(
        (
            v4_chains[0].table.clone(),
            v4_chains[0].name.as_str(),
            v4_chains[0].base
        ),
        (t("ip", "nat"), "OUTPUT", true)
    );
    assert!(
        all_chains
            .iter()
            .any(|c| c.table == t("inet", "mcni-x") && c.name == "c" && !c.base)
    );
    let handles = run_in(&ns, "nft", &["-a", "list", "chain", "inet", "mcni-x", "c"]);
    let c = all_chains.iter().find(|c| c.name == "c").expect("chain c");
    assert!(
        handles.contains(&format!("# handle {}", c.handle)),
        "{handles}"
    );
    assert_eq!(legacy4, Some(vec!["mangle".to_string()]));
    assert_eq!(legacy6, Some(vec![]));
    // Another netns entered by another thread of this process does not see them.
    let other = TestNetns::new();
    let elsewhere = with_netns(&other.path(), |here| {
        (
            nft::kernel_tables_here(here).expect("table dump"),
            iptables::legacy_tables_here(here, IpFamily::V4),
        )
    })
    .expect("enter");
    assert_eq!(elsewhere, (vec![], Some(vec![])));
}

/// Ownership of the `PLAN_V4` chains, with a deliberately empty predicted `-save` form: every
/// comparison then goes through the authoritative path (the plan applied and saved in a scratch
/// netns), which must reach the same verdicts.
fn plan_v4_ownership() -> Ownership {
    Ownership {
        v4_save: String::new(),
        v6_save: None,
        iptables_chains: vec!["ISTIO_OUTPUT".into(), "ISTIO_OUTPUT_DNS".into()],
        iptables_tables: vec!["nat".into(), "mangle".into(), "raw".into()],
        nft_tables: Vec::new(),
    }
}

/// Issue 7 item 1 at the netx level: re-applying is `Unchanged`; a drifted netns (flushed chain,
/// extra jump) whose repair fails late (IPv6 local route with `lo` down) is left exactly as it
/// was; the repair then goes through and yields the fresh state, with foreign rules kept.
fn failed_repair_leaves_the_drifted_netns(flavor: IptablesFlavor) {
    let ns = TestNetns::new_lo_down();
    seed(&ns, flavor);
    let plan = ApplyPlan {
        v4_restore: PLAN_V4.to_string(),
        owned: Some(plan_v4_ownership()),
        ..ApplyPlan::default()
    };
    let first = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect("first apply");
    assert_eq!(first.rules, RulesOutcome::Installed);
    let fresh = save(&ns, flavor, IpFamily::V4);
    let again = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect("second apply");
    assert_eq!(again.rules, RulesOutcome::Unchanged);
    assert_eq!(save(&ns, flavor, IpFamily::V4), fresh);

    let bin = flavor.binary(IpFamily::V4);
    run_in(&ns, &bin, &["-t", "nat", "-F", "ISTIO_OUTPUT"]);
    run_in(
        &ns,
        &bin,
        &["-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"],
    );
    let drifted = save(&ns, flavor, IpFamily::V4);
    assert_ne!(drifted, fresh);
    let problems = applier(flavor)
        .check_capture(&ns.path(), &plan)
        .expect("check");
    assert_eq!(
        problems,
        vec![
            format!(
                "{bin}: rule `-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN` missing (table nat)"
            ),
            format!("{bin}: unexpected rule `-A OUTPUT -j ISTIO_OUTPUT` (table nat)"),
        ]
    );
    assert_eq!(
        save(&ns, flavor, IpFamily::V4),
        drifted,
        "check is read-only"
    );

    let failing = ApplyPlan {
        routes: RoutesPlan {
            local_routes: vec![LocalRouteSpec {
                family: IpFamily::V6,
                table: 133,
            }],
            ..RoutesPlan::default()
        },
        ..plan.clone()
    };
    applier(flavor)
        .apply_capture(&ns.path(), &failing)
        .expect_err("the IPv6 route must fail");
    assert_eq!(
        save(&ns, flavor, IpFamily::V4),
        drifted,
        "{flavor:?}: a failed repair leaves the netns as it was"
    );
    let repaired = applier(flavor)
        .apply_capture(&ns.path(), &plan)
        .expect("repair");
    assert_eq!(repaired.rules, RulesOutcome::Repaired);
    assert_eq!(save(&ns, flavor, IpFamily::V4), fresh, "{flavor:?}");
    assert!(fresh.contains("-A KEEP -p tcp -m tcp --dport 9 -j RETURN"));
}

#[test]
fn failed_repair_leaves_the_drifted_netns_nft() {
    failed_repair_leaves_the_drifted_netns(IptablesFlavor::Nft);
}

#[test]
fn failed_repair_leaves_the_drifted_netns_legacy() {
    failed_repair_leaves_the_drifted_netns(IptablesFlavor::Legacy);
}

/// The native nftables backend: re-applying is `Unchanged` (rule handles kept), a drifted
/// table whose repair fails late is left as it was, and the repair rebuilds it in one
/// transaction (a stray chain in our table goes too).
#[test]
fn nft_backend_verifies_and_repairs_in_one_transaction() {
    let ns = TestNetns::new_lo_down();
    let owned = Ownership {
        nft_tables: vec![nft::NftTable {
            family: "inet".into(),
            name: "mcni-test-nat".into(),
        }],
        ..Ownership::default()
    };
    let plan = ApplyPlan {
        nft: Some(NFT_TEXT.to_string()),
        owned: Some(owned),
        ..ApplyPlan::default()
    };
    let nft_applier = Applier {
        backend: Backend::Nftables,
        iptables: IptablesOptions::default(),
    };
    let handles = |ns: &TestNetns| run_in(ns, "nft", &["-a", "list", "ruleset"]);
    let first = nft_applier.apply_capture(&ns.path(), &plan).expect("apply");
    assert_eq!(first.rules, RulesOutcome::Installed);
    let fresh = handles(&ns);
    let again = nft_applier.apply_capture(&ns.path(), &plan).expect("again");
    assert_eq!(again.rules, RulesOutcome::Unchanged);
    assert_eq!(handles(&ns), fresh, "nothing re-created");

    run_in(
        &ns,
        "nft",
        &["flush", "chain", "inet", "mcni-test-nat", "istio-output"],
    );
    run_in(
        &ns,
        "nft",
        &["add", "chain", "inet", "mcni-test-nat", "stray"],
    );
    let drifted = handles(&ns);
    let problems = nft_applier.check_capture(&ns.path(), &plan).expect("check");
    assert_eq!(
        problems,
        vec![
            "nft table inet mcni-test-nat chain istio-output: `meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0x00000fff != 0x00000539 counter redirect to :15001` missing",
            "unexpected nft table inet mcni-test-nat chain stray",
        ]
    );
    let failing = ApplyPlan {
        routes: RoutesPlan {
            local_routes: vec![LocalRouteSpec {
                family: IpFamily::V6,
                table: 100,
            }],
            ..RoutesPlan::default()
        },
        ..plan.clone()
    };
    nft_applier
        .apply_capture(&ns.path(), &failing)
        .expect_err("route must fail");
    assert_eq!(
        strip_handles(&handles(&ns)),
        strip_handles(&drifted),
        "a failed repair leaves the table as it was"
    );
    let repaired = nft_applier
        .apply_capture(&ns.path(), &plan)
        .expect("repair");
    assert_eq!(repaired.rules, RulesOutcome::Repaired);
    assert_eq!(strip_handles(&handles(&ns)), strip_handles(&fresh));
}

/// `# handle N` comments removed (a restored table gets new handles).
fn strip_handles(listing: &str) -> String {
    listing
        .lines()
        .map(|l| match l.find(" # handle ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}
