//! rtnetlink client: idempotent add/delete of rules, local routes and addresses; listing;
//! IPv6 detection. Needs root.

mod common;

use common::TestNetns;
use meshcni_netx::detect::ipv6_enabled;
use meshcni_netx::netlink::{AddressSpec, Change, LocalRouteSpec, Netlink, RuleSpec};
use meshcni_netx::{IpFamily, NetxError};

#[test]
fn links_and_indexes() {
    let ns = TestNetns::new_lo_down();
    let mut nl = Netlink::open(&ns.path()).expect("open");
    assert_eq!(nl.link_index("lo").expect("lo"), Some(1));
    assert_eq!(nl.link_index("mcni-nope0").expect("missing"), None);
    let links = nl.links().expect("links");
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(links[0].loopback && !links[0].up);
    nl.set_link_up("lo").expect("up");
    assert!(nl.links().expect("links")[0].up);
    assert!(ns.ip(&["link", "show", "lo"]).contains("UP"));
    let err = nl.set_link_up("mcni-nope0").expect_err("missing link");
    assert!(err.to_string().contains("get link mcni-nope0"), "{err}");
    assert!(
        err.to_string().contains(&ns.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn rules_are_idempotent_both_families() {
    let ns = TestNetns::new();
    let mut nl = Netlink::open(&ns.path()).expect("open");
    for family in [IpFamily::V4, IpFamily::V6] {
        for priority in [None, Some(32764)] {
            let spec = RuleSpec {
                family,
                fwmark: 0x539,
                fwmask: None,
                table: 133,
                priority,
            };
            assert_eq!(
                nl.add_rule(&spec).expect("add"),
                Change::Applied,
                "{spec:?}"
            );
            assert_eq!(
                nl.add_rule(&spec).expect("add again"),
                Change::Unchanged,
                "{spec:?}"
            );
            let listed: Vec<_> = nl
                .rules(family)
                .expect("list")
                .into_iter()
                .filter(|r| r.matches(&spec))
                .collect();
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(nl.del_rule(&spec).expect("del"), Change::Applied);
            assert_eq!(nl.del_rule(&spec).expect("del again"), Change::Unchanged);
            assert!(
                !nl.rules(family)
                    .expect("list")
                    .iter()
                    .any(|r| r.matches(&spec))
            );
        }
    }
    // Large table ids (> 255) go through FRA_TABLE.
    let big = RuleSpec {
        family: IpFamily::V4,
        fwmark: 1,
        fwmask: Some(0xff),
        table: 1000,
        priority: Some(100),
    };
    assert_eq!(nl.add_rule(&big).expect("add"), Change::Applied);
    assert!(
        ns.ip(&["rule", "show"])
            .contains("100:\tfrom all fwmark 0x1/0xff lookup 1000")
    );
    assert_eq!(nl.del_rule(&big).expect("del"), Change::Applied);
}

#[test]
fn local_routes_are_idempotent_both_families() {
    let ns = TestNetns::new();
    let mut nl = Netlink::open(&ns.path()).expect("open");
    for family in [IpFamily::V4, IpFamily::V6] {
        let spec = LocalRouteSpec { family, table: 133 };
        assert_eq!(nl.add_local_route(&spec).expect("add"), Change::Applied);
        assert_eq!(nl.add_local_route(&spec).expect("again"), Change::Unchanged);
        assert_eq!(
            nl.replace_local_route(&spec).expect("replace"),
            Change::Applied
        );
        let routes = nl.routes(family, Some(133)).expect("list");
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert!(routes[0].local);
        assert_eq!(routes[0].oif, Some(1));
        assert_eq!(routes[0].dst.expect("dst").prefix_len(), 0);
        assert_eq!(nl.del_local_route(&spec).expect("del"), Change::Applied);
        assert_eq!(
            nl.del_local_route(&spec).expect("del again"),
            Change::Unchanged
        );
        assert!(nl.routes(family, Some(133)).expect("list").is_empty());
    }
    assert_eq!(ns.ip(&["-6", "route", "show", "table", "133"]).trim(), "");
    assert_eq!(ns.ip(&["-4", "route", "show", "table", "133"]).trim(), "");
}

#[test]
fn addresses_are_idempotent_and_listed() {
    let ns = TestNetns::new();
    let mut nl = Netlink::open(&ns.path()).expect("open");
    for addr in ["::6/128", "127.0.0.6/32"] {
        let spec = AddressSpec {
            ifname: "lo".to_string(),
            addr: addr.parse().expect("net"),
        };
        assert_eq!(nl.add_address(&spec).expect("add"), Change::Applied);
        assert_eq!(nl.add_address(&spec).expect("again"), Change::Unchanged);
        let host = spec.addr.addr();
        assert!(
            nl.addresses()
                .expect("list")
                .iter()
                .any(|a| a.addr == host && a.index == 1)
        );
        assert!(ns.ip(&["addr", "show", "dev", "lo"]).contains(addr));
        assert_eq!(nl.del_address(&spec).expect("del"), Change::Applied);
        assert_eq!(nl.del_address(&spec).expect("del again"), Change::Unchanged);
        assert!(!nl.addresses().expect("list").iter().any(|a| a.addr == host));
    }
    let missing = AddressSpec {
        ifname: "mcni-nope0".to_string(),
        addr: "10.9.9.9/32".parse().expect("net"),
    };
    let err = nl.add_address(&missing).expect_err("no such link");
    assert!(matches!(err, NetxError::Netlink { .. }));
    assert!(err.to_string().contains("mcni-nope0"), "{err}");
    assert_eq!(
        nl.del_address(&missing).expect("absent link"),
        Change::Unchanged
    );
}

#[test]
fn ipv6_detection_follows_first_global_address() {
    let ns = TestNetns::new();
    assert!(!ipv6_enabled(&ns.path(), false).expect("lo only"));
    assert!(!ipv6_enabled(&ns.path(), true).expect("lo only"));
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d0p"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["addr", "add", "fd00:7::5/64", "dev", "d0", "nodad"]);
    assert!(ipv6_enabled(&ns.path(), false).expect("v6 only"));
    ns.ip(&["link", "add", "d1", "type", "veth", "peer", "name", "d1p"]);
    ns.ip(&["addr", "add", "10.7.0.5/24", "dev", "d1"]);
    // d0 (lower index) has the v6 address: still IPv6 by interface order.
    assert!(ipv6_enabled(&ns.path(), false).expect("v6 first"));
    ns.ip(&["addr", "add", "10.7.1.5/24", "dev", "d0"]);
    // Now d0's first address is IPv4 (kernel lists IPv4 before IPv6 per interface).
    assert!(!ipv6_enabled(&ns.path(), false).expect("v4 first"));
    assert!(ipv6_enabled(&ns.path(), true).expect("dual stack"));
}

/// `host_route_oif` answers from the main table even when a policy rule sends the address to
/// another table first (the ambient mode's `lookup 100` once a pod is enrolled): the kernel's
/// `GETROUTE` follows the rules, so a naive lookup returns the other table's device.
#[test]
fn host_route_oif_reads_the_main_table_behind_policy_rules() {
    use meshcni_netx::route::host_route_oif;
    let ns = TestNetns::new();
    let peer = TestNetns::new();
    for (a, b) in [("va", "pa"), ("vb", "pb")] {
        ns.ip(&[
            "link", "add", a, "type", "veth", "peer", "name", b, "netns", &peer.name,
        ]);
        ns.ip(&["link", "set", a, "up"]);
    }
    ns.ip(&["route", "add", "10.9.0.10/32", "dev", "va", "scope", "link"]);
    let mut nl = Netlink::open(&ns.path()).expect("open");
    let va = nl.link_index("va").expect("va").expect("va exists");
    assert_eq!(
        host_route_oif(&mut nl, "10.9.0.10".parse().expect("ip")).expect("lookup"),
        Some(va)
    );
    // Another table wins for this address through a rule.
    ns.ip(&["route", "add", "10.9.0.10/32", "dev", "vb", "table", "100"]);
    ns.ip(&["rule", "add", "priority", "103", "lookup", "100"]);
    assert_eq!(
        host_route_oif(&mut nl, "10.9.0.10".parse().expect("ip")).expect("lookup"),
        Some(va),
        "the main-table route's device, not table 100's"
    );
    // Not in main at all (only a covering /24 in main, and the /32 in table 100): none.
    ns.ip(&["route", "add", "10.9.1.0/24", "dev", "va"]);
    ns.ip(&["route", "add", "10.9.1.7/32", "dev", "vb", "table", "100"]);
    assert_eq!(
        host_route_oif(&mut nl, "10.9.1.7".parse().expect("ip")).expect("lookup"),
        None
    );
}
