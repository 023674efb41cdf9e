//! Validation errors and structural properties of the sidecar generator and its renderers.

use super::*;
use crate::iptables::{self, RuleOp};
use crate::model::Position;
use crate::nft;

fn cfg() -> CaptureConfig {
    CaptureConfig::default()
}

fn err(c: CaptureConfig) -> ConfigError {
    let e = c.validate().expect_err("config must be rejected");
    // `build` must reject exactly the same way.
    assert_eq!(build(&c).expect_err("build must reject too"), e);
    e
}

#[test]
fn defaults_are_valid() {
    cfg().validate().expect("defaults valid");
}

#[test]
fn bad_cidr_names_field_and_value() {
    let e = err(CaptureConfig {
        outbound_ip_ranges_include: "10.0.0.0/8,x".into(),
        ..cfg()
    });
    assert!(
        matches!(&e, ConfigError::BadCidr { field: "outbound_ip_ranges_include", value, .. } if value == "x"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("bad CIDR `x` in outbound_ip_ranges_include")
    );
}

#[test]
fn port_out_of_range() {
    let e = err(CaptureConfig {
        inbound_ports_include: "80,70000".into(),
        ..cfg()
    });
    assert_eq!(
        e.to_string(),
        "port `70000` out of range (1-65535) in inbound_ports_include"
    );
    let e = err(CaptureConfig {
        outbound_ports_exclude: "http".into(),
        ..cfg()
    });
    assert_eq!(
        e.to_string(),
        "port `http` is not a number in outbound_ports_exclude"
    );
    let e = err(CaptureConfig {
        proxy_port: "0".into(),
        ..cfg()
    });
    assert!(
        matches!(
            e,
            ConfigError::BadPort {
                field: "proxy_port",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_interception_mode() {
    let e = err(CaptureConfig {
        inbound_interception_mode: "FOO".into(),
        ..cfg()
    });
    assert_eq!(e, ConfigError::UnknownInterceptionMode("FOO".into()));
    assert!(e.to_string().contains("`FOO`"));
    for ok in ["", "REDIRECT", "TPROXY"] {
        CaptureConfig {
            inbound_interception_mode: ok.into(),
            ..cfg()
        }
        .validate()
        .expect("known mode");
    }
}

#[test]
fn exclude_wildcard_rejected() {
    let e = err(CaptureConfig {
        outbound_ip_ranges_exclude: "*".into(),
        ..cfg()
    });
    assert_eq!(
        e,
        ConfigError::WildcardNotAllowed {
            field: "outbound_ip_ranges_exclude"
        }
    );
    assert_eq!(
        e.to_string(),
        "wildcard `*` not allowed in outbound_ip_ranges_exclude"
    );
    // `*` inside an include list is not the wildcard either.
    let e = err(CaptureConfig {
        outbound_ip_ranges_include: "10.0.0.0/8,*".into(),
        ..cfg()
    });
    assert!(matches!(e, ConfigError::BadCidr { .. }), "{e:?}");
    let e = err(CaptureConfig {
        inbound_ports_exclude: "*".into(),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::WildcardNotAllowed {
            field: "inbound_ports_exclude"
        }
    ));
}

#[test]
fn bad_interface_names() {
    for bad in [
        "eth0/1",
        "averyveryverylongname",
        "a b",
        "..",
        "!eth0",
        "et+h0",
        "eth:0",
    ] {
        let e = err(CaptureConfig {
            exclude_interfaces: format!("eth0,{bad}"),
            ..cfg()
        });
        assert!(
            matches!(&e, ConfigError::BadInterface { field: "exclude_interfaces", value, .. } if value == bad.trim()),
            "{bad}: {e:?}"
        );
    }
    let e = err(CaptureConfig {
        reroute_virtual_interfaces: "x/y".into(),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadInterface {
            field: "reroute_virtual_interfaces",
            ..
        }
    ));
    CaptureConfig {
        exclude_interfaces: "eth0,veth+,net1.100,br-x_y".into(),
        ..cfg()
    }
    .validate()
    .expect("valid interface names");
}

#[test]
fn bad_ids_marks_tables() {
    let e = err(CaptureConfig {
        proxy_uid: "abc".into(),
        ..cfg()
    });
    assert!(
        matches!(&e, ConfigError::BadOwner { field: "proxy_uid", what: "uid", value, .. } if value == "abc")
    );
    let e = err(CaptureConfig {
        proxy_gid: "-1".into(),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadOwner {
            field: "proxy_gid",
            ..
        }
    ));
    let e = err(CaptureConfig {
        proxy_uid: "4294967296".into(),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadOwner {
            field: "proxy_uid",
            ..
        }
    ));
    let e = err(CaptureConfig {
        proxy_uid: " ".into(),
        ..cfg()
    });
    assert_eq!(
        e,
        ConfigError::Empty {
            field: "proxy_uid",
            what: "uid"
        }
    );
    let e = err(CaptureConfig {
        owner_groups_include: "java,bad group".into(),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadOwner {
            field: "owner_groups_include",
            what: "group",
            ..
        }
    ));
    let e = err(CaptureConfig {
        owner_groups_exclude: (0..65).map(|i| i.to_string()).collect::<Vec<_>>().join(","),
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::TooManyOwnerGroups { count: 65, .. }
    ));

    for (mark, ok) in [
        ("1337", true),
        ("0x539", true),
        ("0", false),
        ("x", false),
        ("4294967296", false),
    ] {
        let r = CaptureConfig {
            inbound_tproxy_mark: mark.into(),
            ..cfg()
        }
        .validate();
        assert_eq!(r.is_ok(), ok, "mark {mark}: {r:?}");
        if let Err(e) = r {
            assert!(matches!(
                e,
                ConfigError::BadMark {
                    field: "inbound_tproxy_mark",
                    ..
                }
            ));
        }
    }
    for (table, ok) in [("133", true), ("0", false), ("254", false), ("main", false)] {
        let r = CaptureConfig {
            inbound_tproxy_route_table: table.into(),
            ..cfg()
        }
        .validate();
        assert_eq!(r.is_ok(), ok, "table {table}: {r:?}");
        if let Err(e) = r {
            assert!(matches!(e, ConfigError::BadRouteTable { .. }));
        }
    }
}

#[test]
fn dns_servers_and_loopback_cidr() {
    let e = err(CaptureConfig {
        dns_servers_v4: vec!["::1".into()],
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadDnsServer {
            field: "dns_servers_v4",
            expected: "IPv4",
            ..
        }
    ));
    let e = err(CaptureConfig {
        dns_servers_v6: vec!["10.0.0.10".into()],
        ..cfg()
    });
    assert!(matches!(
        e,
        ConfigError::BadDnsServer {
            field: "dns_servers_v6",
            ..
        }
    ));
    for bad in ["10.0.0.0/8", "127.0.0.1/4", "::1/128", "127.0.0.1"] {
        let e = err(CaptureConfig {
            host_ipv4_loopback_cidr: bad.into(),
            ..cfg()
        });
        assert!(
            matches!(
                e,
                ConfigError::BadCidr {
                    field: "host_ipv4_loopback_cidr",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn istio_list_quirks_accepted() {
    let c = CaptureConfig {
        inbound_ports_include: "4000, 5000,".into(),
        inbound_ports_exclude: "6000,7000,".into(),
        outbound_ports_include: ",80".into(),
        ..cfg()
    };
    let rs = build(&c).expect("trailing/leading commas are fine");
    let v4 = iptables::render_restore(&rs, Family::V4);
    assert!(v4.contains("-A ISTIO_INBOUND -p tcp --dport 5000 -j ISTIO_IN_REDIRECT\n"));
    assert!(v4.contains("-A ISTIO_OUTPUT -p tcp --dport 80 -j ISTIO_REDIRECT\n"));
    // Empty gid copies the uid list.
    let rs = build(&CaptureConfig {
        proxy_uid: "7".into(),
        proxy_gid: String::new(),
        ..cfg()
    })
    .expect("valid");
    assert!(iptables::render_restore(&rs, Family::V4).contains("-m owner --gid-owner 7 -j RETURN"));
}

fn configs() -> Vec<CaptureConfig> {
    let tproxy_all = CaptureConfig {
        inbound_interception_mode: "TPROXY".into(),
        inbound_ports_include: "*".into(),
        inbound_ports_exclude: "15020,15021".into(),
        outbound_ports_exclude: "9000".into(),
        outbound_ip_ranges_include: "*".into(),
        outbound_ip_ranges_exclude: "10.96.0.0/12,fd00::/8".into(),
        reroute_virtual_interfaces: "eth1".into(),
        exclude_interfaces: "eth9".into(),
        redirect_dns: true,
        capture_all_dns: true,
        drop_invalid: true,
        enable_ipv6: true,
        ..cfg()
    };
    vec![
        cfg(),
        tproxy_all.clone(),
        CaptureConfig {
            enable_ipv6: false,
            ..tproxy_all
        },
        CaptureConfig {
            inbound_ports_include: "80,443".into(),
            outbound_ip_ranges_include: "10.0.0.0/8,fd00::/8".into(),
            reroute_virtual_interfaces: "eth1,eth2".into(),
            redirect_dns: true,
            dns_servers_v6: vec!["fd00::10".into()],
            enable_ipv6: true,
            ..cfg()
        },
    ]
}

#[test]
fn every_jump_target_is_declared_and_populated() {
    for c in configs() {
        let rs = build(&c).expect("valid");
        for fam in [Family::V4, Family::V6] {
            let text = iptables::render_restore(&rs, fam);
            for r in rs.rules_for(fam) {
                if let Target::Jump(t) = r.target {
                    assert!(
                        rs.rules_for(fam)
                            .any(|x| x.table == r.table && x.chain == t),
                        "{fam:?} {:?}: jump to {t:?} which has no rules",
                        r.table
                    );
                    assert!(text.contains(&format!("-N {}\n", t.iptables_name())));
                }
            }
        }
    }
}

#[test]
fn families_are_separated() {
    for c in configs() {
        let rs = build(&c).expect("valid");
        let v4 = iptables::render_restore(&rs, Family::V4);
        let v6 = iptables::render_restore(&rs, Family::V6);
        assert!(!v4.contains("::"), "v6 address in v4 text:\n{v4}");
        assert!(!v6.contains("127.0.0."), "v4 address in v6 text:\n{v6}");
        if !rs.ipv6 {
            assert_eq!(v6, "");
            assert!(rs.rules.iter().all(|r| r.scope != Scope::V6));
            assert!(!nft::render(&rs).contains("ip6 "));
            assert_eq!(rs.lo_ipv6_address, None);
        } else {
            assert!(!v6.is_empty());
            assert_eq!(
                rs.lo_ipv6_address,
                Some("::6/128".parse().expect("literal"))
            );
        }
    }
}

#[test]
fn tproxy_routing_only_with_tproxy_inbound_capture() {
    let none = build(&CaptureConfig {
        inbound_interception_mode: "TPROXY".into(),
        ..cfg()
    })
    .expect("valid");
    assert_eq!(none.tproxy_routing, None, "no inbound capture, no routing");
    let redirect = build(&CaptureConfig {
        inbound_ports_include: "*".into(),
        ..cfg()
    })
    .expect("valid");
    assert_eq!(redirect.tproxy_routing, None);
    let rs = build(&CaptureConfig {
        inbound_interception_mode: "TPROXY".into(),
        inbound_ports_include: "*".into(),
        inbound_tproxy_mark: "0x10".into(),
        inbound_tproxy_route_table: "100".into(),
        enable_ipv6: true,
        ..cfg()
    })
    .expect("valid");
    let rt = rs.tproxy_routing.expect("tproxy routing");
    assert_eq!(
        rt,
        TproxyRouting {
            mark: 16,
            table: 100,
            ipv6: true
        }
    );
    assert_eq!(rt.families(), vec![Family::V4, Family::V6]);
    assert_eq!(
        rt.ip_rule_add_args(Family::V4).join(" "),
        "-4 rule add fwmark 16 lookup 100"
    );
    assert_eq!(
        rt.ip_rule_del_args(Family::V6).join(" "),
        "-6 rule del fwmark 16 lookup 100"
    );
    assert_eq!(
        rt.ip_route_add_args(Family::V6).join(" "),
        "-6 route add local default dev lo table 100"
    );
    assert_eq!(
        rt.ip_route_del_args(Family::V4).join(" "),
        "-4 route del local default dev lo table 100"
    );
    assert!(iptables::render_restore(&rs, Family::V4).contains("--tproxy-mark 16/0xffffffff"));
}

#[test]
fn capture_all_dns_and_outbound_port_exclusion() {
    let rs = build(&CaptureConfig {
        redirect_dns: true,
        capture_all_dns: true,
        outbound_ports_exclude: "9000".into(),
        enable_ipv6: true,
        ..cfg()
    })
    .expect("valid");
    for fam in [Family::V4, Family::V6] {
        let t = iptables::render_restore(&rs, fam);
        for line in [
            "-A ISTIO_OUTPUT -p tcp --dport 9000 -j RETURN\n",
            "-A ISTIO_OUTPUT -p udp --dport 9000 -j RETURN\n",
            "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS\n",
            "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053\n",
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053\n",
            "-A PREROUTING -j ISTIO_INBOUND\n",
            "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2\n",
            "-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1\n",
        ] {
            assert!(t.contains(line), "{fam:?} missing {line:?} in\n{t}");
        }
    }
    let n = nft::render(&rs);
    // Family-independent DNS rules appear once in the inet table.
    assert_eq!(
        n.matches("istio-output-dns udp dport 53 counter redirect to :15053")
            .count(),
        1
    );
    assert!(
        n.contains("add rule inet istio-proxy-nat istio-output tcp dport 9000 counter return\n")
    );
    assert!(n.contains(
        "add rule inet istio-proxy-raw istio-inbound udp sport 53 counter ct zone set 1\n"
    ));
}

#[test]
fn wildcard_include_is_emitted_once_for_both_families() {
    let rs = build(&CaptureConfig {
        outbound_ip_ranges_include: "*".into(),
        reroute_virtual_interfaces: "eth1".into(),
        enable_ipv6: true,
        ..cfg()
    })
    .expect("valid");
    for fam in [Family::V4, Family::V6] {
        let t = iptables::render_restore(&rs, fam);
        assert_eq!(
            t.matches("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n").count(),
            1,
            "{fam:?}"
        );
        assert_eq!(
            t.matches("-I PREROUTING 1 -i eth1 -j ISTIO_REDIRECT\n")
                .count(),
            1
        );
    }
    let n = nft::render(&rs);
    assert_eq!(
        n.matches("istio-output counter jump istio-redirect\n")
            .count(),
        1
    );
}

#[test]
fn nft_insert_becomes_add_on_short_chains() {
    let rs = build(&CaptureConfig {
        reroute_virtual_interfaces: "a,b".into(),
        ..cfg()
    })
    .expect("valid");
    let n = nft::render(&rs);
    assert!(n.contains("add rule inet istio-proxy-nat prerouting iifname a counter return\n"));
    assert!(n.contains(
        "insert rule inet istio-proxy-nat prerouting index 0 iifname b counter return\n"
    ));
    let positions: Vec<_> = rs
        .rules
        .iter()
        .filter(|r| r.chain == Chain::Prerouting)
        .map(|r| r.position)
        .collect();
    assert_eq!(positions, vec![Position::Insert(1), Position::Insert(1)]);
}

#[test]
fn nft_interface_wildcard_is_quoted_glob() {
    let rs = build(&CaptureConfig {
        exclude_interfaces: "veth+".into(),
        ..cfg()
    })
    .expect("valid");
    assert!(nft::render(&rs).contains("prerouting iifname \"veth*\" counter return\n"));
    assert!(
        iptables::render_restore(&rs, Family::V4).contains("-A PREROUTING -i veth+ -j RETURN\n")
    );
}

#[test]
fn cleanup_mirrors_restore() {
    for c in configs() {
        let rs = build(&c).expect("valid");
        for fam in [Family::V4, Family::V6] {
            let add = iptables::render_restore(&rs, fam);
            let del = iptables::render_cleanup(&rs, fam);
            if add.is_empty() {
                assert_eq!(del, "");
                continue;
            }
            let tables = |t: &str| {
                t.lines()
                    .filter(|l| l.starts_with("* "))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            assert_eq!(tables(&add), tables(&del));
            let declared: Vec<String> = add
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .map(str::to_owned)
                .collect();
            let flushed: Vec<String> = del
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .map(|l| l.trim_end_matches(" - [0:0]").to_owned())
                .collect();
            let deleted: Vec<String> = del
                .lines()
                .filter_map(|l| l.strip_prefix("-X "))
                .map(str::to_owned)
                .collect();
            assert_eq!(declared, flushed);
            assert_eq!(declared, deleted);
            // Every built-in-chain rule is deleted, with the same spec.
            let builtin_rules = rs.rules_for(fam).filter(|r| r.chain.is_builtin()).count();
            assert_eq!(
                del.lines().filter(|l| l.starts_with("-D ")).count(),
                builtin_rules
            );
            for r in rs.rules_for(fam).filter(|r| r.chain.is_builtin()) {
                let spec = iptables::rule_spec(r).join(" ");
                assert!(
                    del.contains(&format!("-D {} {spec}\n", r.chain.iptables_name())),
                    "{spec}"
                );
            }

            let cmds = iptables::cleanup_commands(&rs, fam);
            let n_rules = rs.rules_for(fam).count();
            assert_eq!(cmds.len(), n_rules + 2 * declared.len());
            assert!(cmds[..n_rules].iter().all(|c| c[2] == "-D"));
            assert!(
                cmds[n_rules..n_rules + declared.len()]
                    .iter()
                    .all(|c| c[2] == "-F")
            );
            assert!(
                cmds[n_rules + declared.len()..]
                    .iter()
                    .all(|c| c[2] == "-X")
            );
        }
    }
}

#[test]
fn rule_args_forms() {
    let rs = build(&CaptureConfig {
        reroute_virtual_interfaces: "eth1".into(),
        ..cfg()
    })
    .expect("valid");
    let insert = rs
        .rules
        .iter()
        .find(|r| r.position == Position::Insert(1))
        .expect("insert rule");
    assert_eq!(
        iptables::rule_args(insert, RuleOp::Add).join(" "),
        "-t nat -I PREROUTING 1 -i eth1 -j RETURN"
    );
    assert_eq!(
        iptables::rule_args(insert, RuleOp::Check).join(" "),
        "-t nat -C PREROUTING -i eth1 -j RETURN"
    );
    assert_eq!(
        iptables::rule_args(insert, RuleOp::Delete).join(" "),
        "-t nat -D PREROUTING -i eth1 -j RETURN"
    );
}

#[test]
fn nft_delete_is_idempotent_text() {
    assert_eq!(
        nft::render_delete(),
        "add table inet istio-proxy-nat\ndelete table inet istio-proxy-nat\n\
         add table inet istio-proxy-mangle\ndelete table inet istio-proxy-mangle\n\
         add table inet istio-proxy-raw\ndelete table inet istio-proxy-raw\n"
    );
}

#[test]
fn config_deserializes_from_cases_json_keys() {
    let c: CaptureConfig = serde_json::from_str(
        r#"{"inbound_ports_include":"*","enable_ipv6":true,"dry_run":true,"dns_servers_v4":["10.0.0.10"]}"#,
    )
    .expect("deserialize; unknown keys like dry_run are ignored");
    assert_eq!(c.inbound_ports_include, "*");
    assert!(c.enable_ipv6);
    assert_eq!(c.proxy_port, "15001", "missing keys take the defaults");
}

#[test]
fn address_matches_agree_with_rule_scope() {
    for c in configs() {
        let rs = build(&c).expect("valid");
        for r in &rs.rules {
            for m in &r.matches {
                if let Match::Source { cidr, .. } | Match::Destination { cidr, .. } = m {
                    assert_eq!(r.scope, Scope::from(cidr.family()), "{r:?}");
                }
            }
            if let Target::Tproxy { .. } = r.target {
                assert_ne!(r.scope, Scope::Both, "tproxy needs a family: {r:?}");
            }
        }
    }
}
