//! Root tests of the ambient building blocks against the kernel, each in its own throwaway
//! netns: tunnel links (create, idempotent re-create, retarget in place, delete), GENEVE
//! detection, routes and rules with gateway/onlink/src/goto, nfnetlink ipset entries, sysctls.

mod common;

use std::net::Ipv4Addr;

use common::TestNetns;
use meshcni_netx::netlink::{Change, Netlink};
use meshcni_netx::route::{self, Route4, Rule4, RuleTarget};
use meshcni_netx::tunnel::{self, TunnelKind, TunnelSpec};
use meshcni_netx::{ipset, sysctl, with_netns};

fn kind() -> TunnelKind {
    if tunnel::geneve_supported() {
        TunnelKind::Geneve
    } else {
        TunnelKind::Vxlan
    }
}

#[test]
fn tunnel_links_are_created_idempotently_retargeted_and_deleted() {
    let ns = TestNetns::new();
    let mut nl = Netlink::open(&ns.path()).expect("netlink");
    let k = kind();
    eprintln!("kernel tunnel kind: {}", k.name());
    let spec = TunnelSpec {
        name: "istioin".into(),
        kind: k,
        vni: 1000,
        remote: Ipv4Addr::new(10, 0, 0, 5),
        port: k.default_port(),
        mac: None,
    };
    assert_eq!(
        tunnel::add_tunnel(&mut nl, &spec).expect("add"),
        Change::Applied
    );
    assert_eq!(
        tunnel::add_tunnel(&mut nl, &spec).expect("re-add"),
        Change::Unchanged
    );
    let shown = ns.ip(&["-d", "link", "show", "istioin"]);
    assert!(
        shown.contains(&format!("{} id 1000 remote 10.0.0.5", k.name())),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("dstport {}", k.default_port())),
        "{shown}"
    );
    let d = tunnel::link_details(&mut nl, "istioin")
        .expect("details")
        .expect("present");
    assert_eq!(
        (d.vni, d.remote, d.port),
        (Some(1000), Some(spec.remote), Some(spec.port))
    );

    // A same-name link with other parameters is an error, not silently reused.
    let other = TunnelSpec {
        vni: 7,
        ..spec.clone()
    };
    assert!(tunnel::add_tunnel(&mut nl, &other).is_err());

    // Retarget in place.
    let moved = TunnelSpec {
        remote: Ipv4Addr::new(10, 0, 0, 6),
        ..spec.clone()
    };
    assert!(tunnel::change_remote(&mut nl, &moved).expect("changelink"));
    assert!(
        ns.ip(&["-d", "link", "show", "istioin"])
            .contains("remote 10.0.0.6")
    );

    assert_eq!(
        tunnel::del_link(&mut nl, "istioin").expect("del"),
        Change::Applied
    );
    assert_eq!(
        tunnel::del_link(&mut nl, "istioin").expect("del again"),
        Change::Unchanged
    );
}

#[test]
fn geneve_creation_fails_cleanly_or_works_matching_detection() {
    let ns = TestNetns::new();
    let mut nl = Netlink::open(&ns.path()).expect("netlink");
    let r = tunnel::add_tunnel(
        &mut nl,
        &TunnelSpec {
            name: "gen0".into(),
            kind: TunnelKind::Geneve,
            vni: 1,
            remote: Ipv4Addr::new(10, 0, 0, 1),
            port: 6081,
            mac: None,
        },
    );
    assert_eq!(r.is_ok(), tunnel::geneve_supported(), "{r:?}");
    if let Err(e) = r {
        assert!(e.to_string().contains("add link gen0 type geneve"), "{e}");
    }
}

#[test]
fn routes_and_rules_with_gateway_onlink_src_and_goto() {
    let ns = TestNetns::new();
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ns.ip(&["link", "set", "d1", "up"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["addr", "add", "10.1.0.1/24", "dev", "d0"]);
    let mut nl = Netlink::open(&ns.path()).expect("netlink");
    let via = Route4 {
        table: 100,
        dst: "10.9.0.10/32".parse().expect("net"),
        gateway: Some(Ipv4Addr::new(10, 1, 0, 2)),
        dev: "d0".into(),
        src: Some(Ipv4Addr::new(10, 1, 0, 1)),
        onlink: false,
        scope_link: false,
        local: false,
    };
    let onlink = Route4 {
        table: 102,
        dst: "0.0.0.0/0".parse().expect("net"),
        gateway: Some(Ipv4Addr::new(10, 7, 7, 7)),
        dev: "d0".into(),
        src: None,
        onlink: true,
        scope_link: false,
        local: false,
    };
    let local = Route4 {
        table: 101,
        dst: "0.0.0.0/0".parse().expect("net"),
        gateway: None,
        dev: "lo".into(),
        src: None,
        onlink: false,
        scope_link: false,
        local: true,
    };
    for r in [&via, &onlink, &local] {
        assert_eq!(
            route::add_route(&mut nl, r).expect("add"),
            Change::Applied,
            "{r}"
        );
        assert_eq!(
            route::add_route(&mut nl, r).expect("re-add"),
            Change::Unchanged,
            "{r}"
        );
    }
    let all = ns.ip(&["route", "show", "table", "all"]);
    assert!(
        all.contains("10.9.0.10 via 10.1.0.2 dev d0 table 100 src 10.1.0.1"),
        "{all}"
    );
    assert!(
        all.contains("default via 10.7.7.7 dev d0 table 102 onlink"),
        "{all}"
    );
    assert!(
        all.contains("local default dev lo table 101 scope host"),
        "{all}"
    );
    // Replace swaps the gateway atomically.
    let swapped = Route4 {
        gateway: Some(Ipv4Addr::new(10, 8, 8, 8)),
        ..onlink.clone()
    };
    route::replace_route(&mut nl, &swapped).expect("replace");
    let t102 = ns.ip(&["route", "show", "table", "102"]);
    assert!(
        t102.contains("via 10.8.8.8") && !t102.contains("10.7.7.7"),
        "{t102}"
    );
    assert_eq!(
        route::list_routes(&mut nl, Some(100)).expect("list").len(),
        1
    );
    for r in [&via, &swapped, &local] {
        assert_eq!(
            route::del_route(&mut nl, r).expect("del"),
            Change::Applied,
            "{r}"
        );
        assert_eq!(
            route::del_route(&mut nl, r).expect("del"),
            Change::Unchanged,
            "{r}"
        );
    }

    let goto = Rule4 {
        priority: 100,
        fwmark: Some((0x200, 0x200)),
        action: RuleTarget::Goto(32766),
    };
    let lookup = Rule4 {
        priority: 103,
        fwmark: None,
        action: RuleTarget::Lookup(100),
    };
    for r in [&goto, &lookup] {
        assert_eq!(route::add_rule(&mut nl, r).expect("add"), Change::Applied);
        assert_eq!(
            route::add_rule(&mut nl, r).expect("re-add"),
            Change::Unchanged
        );
    }
    let rules = ns.ip(&["rule"]);
    assert!(
        rules.contains("100:\tfrom all fwmark 0x200/0x200 goto 32766"),
        "{rules}"
    );
    assert!(rules.contains("103:\tfrom all lookup 100"), "{rules}");
    let listed = route::list_rules(&mut nl).expect("rules");
    assert!(
        listed.contains(&goto) && listed.contains(&lookup),
        "{listed:?}"
    );
    for r in [&goto, &lookup] {
        assert_eq!(route::del_rule(&mut nl, r).expect("del"), Change::Applied);
        assert_eq!(route::del_rule(&mut nl, r).expect("del"), Change::Unchanged);
    }
}

#[test]
fn ipset_entries_over_nfnetlink_with_comments() {
    let ns = TestNetns::new();
    let path = ns.path();
    with_netns(&path, |h| ipset::create_here(h, "mcni-set"))
        .expect("enter")
        .expect("create");
    let mut nl = ipset::IpsetNl::open(&path).expect("nfnetlink");
    nl.add("mcni-set", Ipv4Addr::new(10, 0, 0, 1), Some("uid-a"))
        .expect("add");
    nl.add("mcni-set", Ipv4Addr::new(10, 0, 0, 1), Some("uid-a"))
        .expect("idempotent add");
    nl.add("mcni-set", Ipv4Addr::new(10, 0, 0, 2), Some("uid-b"))
        .expect("add");
    let listed = with_netns(&path, |h| ipset::list_here(h, "mcni-set"))
        .expect("enter")
        .expect("list")
        .expect("set exists");
    assert_eq!(
        listed,
        vec![
            ipset::IpsetEntry {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                comment: Some("uid-a".into())
            },
            ipset::IpsetEntry {
                ip: Ipv4Addr::new(10, 0, 0, 2),
                comment: Some("uid-b".into())
            },
        ]
    );
    nl.del("mcni-set", Ipv4Addr::new(10, 0, 0, 1)).expect("del");
    nl.del("mcni-set", Ipv4Addr::new(10, 0, 0, 1))
        .expect("idempotent del");
    let err = nl
        .add("mcni-nope", Ipv4Addr::new(10, 0, 0, 1), None)
        .expect_err("no such set");
    assert!(err.to_string().contains("mcni-nope"), "{err}");
    assert!(
        with_netns(&path, |h| ipset::destroy_here(h, "mcni-set"))
            .expect("enter")
            .expect("destroy")
    );
    assert!(
        with_netns(&path, |h| ipset::list_here(h, "mcni-set"))
            .expect("enter")
            .expect("list")
            .is_none()
    );
}

#[test]
fn sysctls_are_per_netns_and_return_the_previous_value() {
    let ns = TestNetns::new();
    let path = ns.path();
    let host_before =
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").expect("host");
    let (prev, again, now) = with_netns(&path, |h| {
        sysctl::write_here(h, "net/ipv4/conf/all/rp_filter", "1").expect("write");
        let prev = sysctl::write_here(h, "net/ipv4/conf/all/rp_filter", "2").expect("write");
        let again = sysctl::write_here(h, "net/ipv4/conf/all/rp_filter", "2").expect("write");
        let now = sysctl::read_here(h, "net/ipv4/conf/all/rp_filter").expect("read");
        (prev, again, now)
    })
    .expect("enter");
    assert_eq!(prev.as_deref(), Some("1"));
    assert_eq!(again, None, "unchanged write reports no previous value");
    assert_eq!(now.as_deref(), Some("2"));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").expect("host"),
        host_before,
        "host netns untouched"
    );
    let missing = with_netns(&path, |h| {
        sysctl::read_here(h, "net/ipv4/conf/nope0/rp_filter")
    })
    .expect("enter")
    .expect("read");
    assert_eq!(missing, None);
}

/// Issue 8 (scale): looking a tunnel up by name dumped every link of the netns and parsed it
/// whole — four link dumps per ztunnel switch (≈ 0.4 s and tens of MiB with 1,000–5,000 pod
/// veths). A lookup, re-add and retarget must send no dump, whatever the number of links; a
/// listing is one dump and sees every link.
#[test]
fn tunnel_lookup_and_retarget_send_no_link_dump() {
    let ns = TestNetns::new();
    for i in 0..20 {
        let (a, b) = (format!("fillera{i}"), format!("fillerb{i}"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    }
    let mut nl = Netlink::open(&ns.path()).expect("netlink");
    let k = kind();
    let spec = TunnelSpec {
        name: "istioout".into(),
        kind: k,
        vni: 1001,
        remote: Ipv4Addr::new(10, 0, 0, 5),
        port: k.default_port(),
        mac: None,
    };
    assert_eq!(
        tunnel::add_tunnel(&mut nl, &spec).expect("add"),
        Change::Applied
    );
    let before = nl.dumps();
    let d = tunnel::link_details(&mut nl, "istioout")
        .expect("details")
        .expect("present");
    assert_eq!(
        (d.kind.as_str(), d.vni, d.remote, d.port),
        (k.name(), Some(1001), Some(spec.remote), Some(spec.port))
    );
    assert_eq!(
        tunnel::link_details(&mut nl, "nosuchlink").expect("absent"),
        None
    );
    assert_eq!(
        tunnel::link_details(&mut nl, "a-name-longer-than-ifnamsiz").expect("too long"),
        None
    );
    // EEXIST on re-add is checked by looking the link up.
    assert_eq!(
        tunnel::add_tunnel(&mut nl, &spec).expect("re-add"),
        Change::Unchanged
    );
    let moved = TunnelSpec {
        remote: Ipv4Addr::new(10, 0, 0, 6),
        ..spec.clone()
    };
    assert!(tunnel::change_remote(&mut nl, &moved).expect("changelink"));
    assert_eq!(
        nl.dumps(),
        before,
        "a lookup by name must not dump the links"
    );

    let all = tunnel::list_links(&mut nl).expect("list");
    assert_eq!(nl.dumps(), before + 1);
    assert!(all.len() >= 42, "{} links listed", all.len());
    assert!(all.iter().any(|l| l.name == "fillerb19"));
    assert!(
        all.iter()
            .any(|l| l.name == "istioout" && l.remote == Some(moved.remote))
    );
}
