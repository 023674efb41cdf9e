use serde_json::json;

use super::*;

fn parse(v: &Value) -> Result<NetConf, CniError> {
    NetConf::parse(v.to_string().as_bytes())
}

/// What containerd's CRI (go-cni/libcni) hands the 4th plugin of an Istio-style chain.
fn chained_conf() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "meshcni",
        "capabilities": {"portMappings": true, "bandwidth": false},
        "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
        "dns": {"nameservers": ["10.96.0.10"]},
        "ipam": {},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.2/16"}]},
        "cni_agent_run_dir": "/var/run/meshcni",
        "ambient_enabled": true,
        "exclude_namespaces": null
    })
}

#[test]
fn well_known_keys_are_parsed_and_raw_is_kept() {
    let c = parse(&chained_conf()).expect("valid");
    assert_eq!(c.cni_version, CniVersion::V1_0_0);
    assert_eq!(c.name, "k8s-pod-network");
    assert_eq!(c.plugin_type, "meshcni");
    assert!(c.capability("portMappings"));
    assert!(!c.capability("bandwidth"));
    assert!(!c.capability("ips"));
    assert_eq!(
        c.dns.as_ref().map(|d| d.nameservers.clone()),
        Some(vec!["10.96.0.10".to_owned()])
    );
    assert_eq!(c.ipam, Some(json!({})));
    assert_eq!(c.prev_result, Some(chained_conf()["prevResult"].clone()));
    assert_eq!(Value::Object(c.raw.clone()), chained_conf());
    let prev = c.prev_result_typed().expect("typed").expect("present");
    assert_eq!(prev.ips.len(), 1);
}

#[test]
fn plugin_reads_its_own_fields_from_raw() {
    #[derive(serde::Deserialize)]
    struct Mine {
        cni_agent_run_dir: String,
        ambient_enabled: bool,
        exclude_namespaces: Option<Vec<String>>,
    }
    let c = parse(&chained_conf()).expect("valid");
    let mine: Mine = c.plugin_config().expect("decodes");
    assert_eq!(mine.cni_agent_run_dir, "/var/run/meshcni");
    assert!(mine.ambient_enabled);
    assert_eq!(mine.exclude_namespaces, None);

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Wrong {
        ambient_enabled: String,
    }
    let e = c.plugin_config::<Wrong>().expect_err("type mismatch");
    assert_eq!(e.code, CniError::DECODING_FAILURE);
    assert!(
        e.msg.contains("k8s-pod-network") && e.msg.contains("invalid type"),
        "{e}"
    );
}

#[test]
fn malformed_json_is_code_6_with_line_and_column() {
    for bad in [
        &b"{\"cniVersion\": \"1.0.0\",\n \"name\": }"[..],
        b"",
        b"{",
        b"nul",
        b"{\"a\":1}x",
    ] {
        let e = NetConf::parse(bad).expect_err("malformed");
        assert_eq!(e.code, CniError::DECODING_FAILURE);
        assert!(
            e.msg.starts_with("failed to decode network config: "),
            "{e}"
        );
        assert!(e.msg.contains("line "), "{e}");
        assert!(e.msg.contains("column "), "{e}");
    }
    let e = NetConf::parse(b"{\"cniVersion\": \"1.0.0\",\n \"name\": }").expect_err("malformed");
    assert!(e.msg.contains("line 2 column 10"), "{e}");
    let e = NetConf::parse(b"[1,2]").expect_err("not an object");
    assert_eq!(e.code, 6);
    assert!(e.msg.contains("not a JSON object"));
}

#[test]
fn missing_or_empty_cni_version_is_code_7() {
    for v in [
        json!({"name": "n"}),
        json!({"name": "n", "cniVersion": null}),
        json!({"name": "n", "cniVersion": ""}),
    ] {
        let e = parse(&v).expect_err("no version");
        assert_eq!(e.code, CniError::INVALID_NETWORK_CONFIG, "{v}");
        assert!(e.msg.contains("cniVersion"), "{e}");
    }
}

#[test]
fn unsupported_cni_version_is_code_1_naming_it_and_the_supported_list() {
    for bad in ["0.5.0", "1.0", "2.0.0", "v1.0.0", "1.0.0 "] {
        let e = parse(&json!({"cniVersion": bad, "name": "n"})).expect_err(bad);
        assert_eq!(e.code, CniError::INCOMPATIBLE_VERSION);
        assert_eq!(e.msg, "incompatible CNI version");
        assert_eq!(
            e.details,
            format!(
                "config is {bad:?}, plugin supports [\"0.1.0\", \"0.2.0\", \"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]"
            )
        );
    }
    let e = parse(&json!({"cniVersion": 1.0, "name": "n"})).expect_err("number");
    assert_eq!(e.code, 6);
    assert!(e.details.contains("cniVersion=1.0"), "{e}");
}

#[test]
fn every_supported_version_parses() {
    for v in crate::SUPPORTED_VERSIONS {
        let c = parse(&json!({"cniVersion": v.as_str(), "name": "n"})).expect("supported");
        assert_eq!(c.cni_version, v);
        assert_eq!(c.plugin_type, "");
        assert_eq!(c.prev_result, None);
    }
}

#[test]
fn network_name_rules_are_code_7() {
    let e = parse(&json!({"cniVersion": "1.0.0"})).expect_err("no name");
    assert_eq!(e.code, 7);
    assert!(e.msg.contains("missing network name"), "{e}");
    for bad in ["", "-net", "a b", "a/b", "ñ"] {
        let e = parse(&json!({"cniVersion": "1.0.0", "name": bad})).expect_err(bad);
        assert_eq!(e.code, 7, "{bad}");
    }
    for ok in ["k8s-pod-network", "cbr0", "a.b_c-1"] {
        assert!(
            parse(&json!({"cniVersion": "1.0.0", "name": ok})).is_ok(),
            "{ok}"
        );
    }
}

#[test]
fn well_known_keys_of_the_wrong_type_are_code_6() {
    for (key, val) in [
        ("name", json!(5)),
        ("type", json!(["x"])),
        ("capabilities", json!("portMappings")),
        ("dns", json!({"nameservers": "10.0.0.1"})),
        ("dns", json!(7)),
    ] {
        let mut v = json!({"cniVersion": "1.0.0", "name": "n"});
        v[key] = val;
        let e = parse(&v).expect_err(key);
        assert_eq!(e.code, CniError::DECODING_FAILURE, "{key}: {e}");
    }
}

#[test]
fn null_optional_keys_are_absent() {
    let c = parse(
        &json!({"cniVersion": "0.4.0", "name": "n", "type": null, "prevResult": null,
        "runtimeConfig": null, "ipam": null, "dns": null, "capabilities": null}),
    )
    .expect("valid");
    assert_eq!(
        (
            c.prev_result,
            c.runtime_config,
            c.ipam,
            c.dns,
            c.capabilities
        ),
        (None, None, None, None, None)
    );
}

#[test]
fn port_mappings_accept_any_key_case() {
    let c = parse(
        &json!({"cniVersion": "1.0.0", "name": "n", "RuntimeConfig": {},
        "runtimeConfig": {"PortMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"HostPort": 5353, "ContainerPort": 53, "Protocol": "UDP", "HostIP": "127.0.0.1"},
            {"hostport": 9000, "containerport": 9000, "hostIp": ""},
            {"hostPort": 3868, "containerPort": 3868, "protocol": "sctp", "hostIP": "::1"}
        ]}}),
    )
    .expect("valid");
    assert_eq!(
        c.port_mappings().expect("valid mappings"),
        vec![
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: None
            },
            PortMapping {
                host_port: 5353,
                container_port: 53,
                protocol: "udp".into(),
                host_ip: Some("127.0.0.1".into())
            },
            PortMapping {
                host_port: 9000,
                container_port: 9000,
                protocol: "tcp".into(),
                host_ip: None
            },
            PortMapping {
                host_port: 3868,
                container_port: 3868,
                protocol: "sctp".into(),
                host_ip: Some("::1".into())
            },
        ]
    );
    // exact-case key wins over a case-folded one
    let c = parse(&json!({"cniVersion": "1.0.0", "name": "n",
        "runtimeConfig": {"portmappings": "ignored", "portMappings": []}}))
    .expect("valid");
    assert_eq!(c.port_mappings().expect("exact key"), vec![]);
    let none = parse(&json!({"cniVersion": "1.0.0", "name": "n"})).expect("valid");
    assert_eq!(none.port_mappings().expect("absent"), vec![]);
    assert_eq!(none.runtime_config_field("portMappings"), None);
}

#[test]
fn bad_port_mappings_are_code_7_naming_the_entry() {
    for (pm, needle) in [
        (json!({"hostPort": 1}), "not an array"),
        (json!([5]), "portMappings[0]: not an object"),
        (
            json!([{"containerPort": 80}]),
            "portMappings[0]: hostPort is missing",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80}, {"hostPort": 70000, "containerPort": 80}]),
            "portMappings[1]: hostPort 70000",
        ),
        (
            json!([{"hostPort": -1, "containerPort": 80}]),
            "hostPort -1",
        ),
        (
            json!([{"hostPort": "80", "containerPort": 80}]),
            "hostPort \"80\"",
        ),
        (
            json!([{"hostPort": 80.5, "containerPort": 80}]),
            "hostPort 80.5",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "protocol": 6}]),
            "protocol 6 is not a string",
        ),
    ] {
        let e = normalize_port_mappings(&pm).expect_err(needle);
        assert_eq!(e.code, CniError::INVALID_NETWORK_CONFIG);
        assert!(e.msg.contains(needle), "{pm}: {e}");
    }
}

#[test]
fn gc_valid_attachments() {
    let c = parse(
        &json!({"cniVersion": "1.1.0", "name": "n", "cni.dev/valid-attachments": [
        {"containerID": "a1", "ifname": "eth0"}, {"containerID": "b2", "ifname": "net1"}]}),
    )
    .expect("valid");
    assert_eq!(
        c.valid_attachments().expect("decodes"),
        Some(vec![
            Attachment {
                container_id: "a1".into(),
                ifname: "eth0".into()
            },
            Attachment {
                container_id: "b2".into(),
                ifname: "net1".into()
            },
        ])
    );
    let c = parse(&json!({"cniVersion": "1.1.0", "name": "n"})).expect("valid");
    assert_eq!(c.valid_attachments().expect("absent"), None);
    let c = parse(&json!({"cniVersion": "1.1.0", "name": "n", "cni.dev/valid-attachments": [{"ifname": "eth0"}]}))
        .expect("valid");
    let e = c.valid_attachments().expect_err("no containerID");
    assert_eq!(e.code, 6);
    assert!(e.msg.contains("containerID"), "{e}");
}
