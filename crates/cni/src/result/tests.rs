use serde_json::json;

use super::*;
use crate::SUPPORTED_VERSIONS;

/// Results produced by the reference `bridge` + `host-local` plugins (dual-stack from 0.3.0 on),
/// captured by `testdata/bridge-host-local/regen.sh`.
fn fixture(version: &str) -> Value {
    let path = format!(
        "{}/testdata/bridge-host-local/{version}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

const MODERN: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const FIXTURES: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// What a modern result must look like in `to`: same content, `cniVersion` = `to`, and
/// `ips[].version` present exactly for 0.3.x/0.4.0.
fn expected_in(v: &Value, to: &str) -> Value {
    let mut out = v.clone();
    out["cniVersion"] = json!(to);
    let with_version = to.starts_with("0.");
    if let Some(ips) = out.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips {
            let o = ip.as_object_mut().expect("ip object");
            let fam = if o["address"].as_str().expect("address").contains(':') {
                "6"
            } else {
                "4"
            };
            o.remove("version");
            if with_version {
                o.insert("version".into(), json!(fam));
            }
        }
    }
    out
}

#[test]
fn fixtures_are_what_bridge_really_produces() {
    // guard against someone hand-editing the captured data into something convenient
    let r = fixture("0.4.0");
    assert_eq!(r["ips"][0]["version"], "4");
    assert_eq!(r["ips"][1]["version"], "6");
    assert_eq!(r["interfaces"].as_array().map(Vec::len), Some(3));
    assert!(fixture("1.0.0")["ips"][0].get("version").is_none());
    assert!(fixture("0.2.0").get("ip4").is_some());
}

#[test]
fn every_fixture_converts_to_every_modern_version() {
    for from in FIXTURES {
        let input = fixture(from);
        for to in MODERN {
            let got = convert_result(&input, to).expect("convert");
            assert_eq!(got, expected_in(&input, to), "{from} -> {to}");
        }
    }
}

#[test]
fn modern_round_trips_are_identity() {
    for from in FIXTURES {
        let input = fixture(from);
        for via in SUPPORTED_VERSIONS.iter().filter(|v| !v.is_legacy_result()) {
            let there = convert_result(&input, via.as_str()).expect("there");
            let back = convert_result(&there, from).expect("back");
            assert_eq!(back, input, "{from} -> {via} -> {from}");
        }
    }
}

#[test]
fn parsed_fixture_is_typed_correctly() {
    let (r, v) = CniResult::from_value(&fixture("0.4.0"), CniVersion::V1_0_0).expect("parse");
    assert_eq!(v, CniVersion::V0_4_0, "the result's own cniVersion wins");
    assert_eq!(r.interfaces[2].name, "eth0");
    assert!(
        r.interfaces[2]
            .sandbox
            .as_deref()
            .is_some_and(|s| s.starts_with("/run/netns/"))
    );
    assert_eq!(
        r.ips[0].address,
        "10.88.0.5/16".parse::<IpNet>().expect("net")
    );
    assert_eq!(r.ips[0].gateway, Some("10.88.0.1".parse().expect("ip")));
    assert_eq!(
        r.ips[1].address,
        "fd00:88::4/64".parse::<IpNet>().expect("net")
    );
    assert_eq!(r.ips[1].interface, Some(2));
    assert!(
        r.ips.iter().all(|ip| ip.extra.is_empty()),
        "version is not kept as data"
    );
    assert_eq!(r.routes.len(), 2);
    assert_eq!(r.dns.nameservers, ["10.96.0.10"]);
    assert_eq!(r.dns.domain.as_deref(), Some("cluster.local"));
    assert_eq!(r.dns.options, ["ndots:5"]);
    let on_eth0: Vec<String> = r
        .ips_on_interface("eth0")
        .map(|ip| ip.address.to_string())
        .collect();
    assert_eq!(on_eth0, ["10.88.0.5/16", "fd00:88::4/64"]);
    assert_eq!(r.ips_on_interface("net1").count(), 0);
}

#[test]
fn ips_without_interface_index_belong_to_any_interface() {
    let v = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
        "ips":[{"address":"10.0.0.2/24"},{"interface":0,"address":"10.0.0.3/24"},{"interface":7,"address":"10.0.0.4/24"}]});
    let (r, _) = CniResult::from_value(&v, CniVersion::V1_0_0).expect("parse");
    let got: Vec<String> = r
        .ips_on_interface("eth0")
        .map(|ip| ip.address.to_string())
        .collect();
    assert_eq!(got, ["10.0.0.2/24", "10.0.0.3/24"]);
}

fn full_1_1() -> Value {
    json!({
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "cni0", "mac": "00:11:22:33:44:55", "mtu": 1500},
            {"name": "net1", "mac": "00:11:22:33:44:66", "mtu": 9000, "sandbox": "/run/netns/x",
             "socketPath": "/run/vhost/net1.sock", "pciID": "0000:3b:00.1", "x-vendor": {"a": 1}}
        ],
        "ips": [
            {"interface": 1, "address": "192.168.1.5/24", "gateway": "192.168.1.1", "x-ip": true},
            {"interface": 1, "address": "2001:db8::5/64"}
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "192.168.1.1", "mtu": 1400, "advmss": 1360, "priority": 100,
             "table": 200, "scope": 0},
            {"dst": "2001:db8:1::/48", "gw": "2001:db8::1", "x-route": "kept"}
        ],
        "dns": {"nameservers": ["192.168.1.53"], "domain": "example.test", "search": ["example.test"],
                "options": ["ndots:2", "rotate"], "x-dns": 1},
        "x-top": ["unknown", "top-level", "key"]
    })
}

#[test]
fn version_1_1_fields_and_unknown_keys_survive_every_modern_conversion() {
    let input = full_1_1();
    for to in MODERN {
        let there = convert_result(&input, to).expect("there");
        assert_eq!(there, expected_in(&input, to), "1.1.0 -> {to}");
        assert_eq!(
            convert_result(&there, "1.1.0").expect("back"),
            input,
            "1.1.0 -> {to} -> 1.1.0"
        );
    }
}

#[test]
fn output_key_order_matches_libcni() {
    let out = convert_result(&full_1_1(), "0.4.0").expect("convert");
    let keys: Vec<&str> = out
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["cniVersion", "interfaces", "ips", "routes", "dns", "x-top"]
    );
    let ip_keys: Vec<&str> = out["ips"][0]
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ip_keys,
        ["version", "interface", "address", "gateway", "x-ip"]
    );
    let itf: Vec<&str> = out["interfaces"][1]
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        itf,
        [
            "name",
            "mac",
            "mtu",
            "sandbox",
            "socketPath",
            "pciID",
            "x-vendor"
        ]
    );
    let rt: Vec<&str> = out["routes"][0]
        .as_object()
        .expect("obj")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        rt,
        ["dst", "gw", "mtu", "advmss", "priority", "table", "scope"]
    );
}

#[test]
fn legacy_0_2_0_result_converts_up_and_back() {
    let input = fixture("0.2.0");
    let up = convert_result(&input, "1.0.0").expect("up");
    assert_eq!(
        up,
        json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": input["ip4"]["ip"], "gateway": "10.88.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": input["dns"],
        })
    );
    let v04 = convert_result(&input, "0.4.0").expect("0.4.0");
    assert_eq!(v04["ips"][0]["version"], "4");
    assert_eq!(convert_result(&up, "0.2.0").expect("down"), input);
    assert_eq!(
        convert_result(&input, "0.1.0").expect("0.1.0")["ip4"],
        input["ip4"]
    );
}

#[test]
fn dual_stack_to_legacy_keeps_first_address_per_family_and_splits_routes() {
    let mut input = fixture("0.4.0");
    // a second IPv4 address: 0.2.0 can only carry one
    input["ips"]
        .as_array_mut()
        .expect("ips")
        .push(json!({"version":"4","interface":2,"address":"10.88.9.9/16"}));
    let got = convert_result(&input, "0.2.0").expect("down");
    assert_eq!(
        got,
        json!({
            "cniVersion": "0.2.0",
            "ip4": {"ip": input["ips"][0]["address"], "gateway": "10.88.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "ip6": {"ip": input["ips"][1]["address"], "gateway": "fd00:88::1", "routes": [{"dst": "::/0"}]},
            "dns": input["dns"],
        })
    );
}

#[test]
fn legacy_drops_routes_of_a_family_without_address() {
    let v = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}],
        "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}]});
    let got = convert_result(&v, "0.2.0").expect("down");
    assert_eq!(
        got,
        json!({"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.2/24","routes":[{"dst":"0.0.0.0/0"}]},"dns":{}})
    );
}

#[test]
fn prev_result_without_version_is_read_in_the_target_version() {
    let v = json!({"ips":[{"version":"4","address":"10.0.0.2/24"}]});
    assert_eq!(
        convert_result(&v, "0.4.0").expect("convert"),
        json!({"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}],"dns":{}})
    );
    assert_eq!(
        convert_result(&v, "1.0.0").expect("convert"),
        json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}],"dns":{}})
    );
}

#[test]
fn empty_result_in_every_version() {
    for v in SUPPORTED_VERSIONS {
        assert_eq!(
            empty_result(v.as_str()).expect("supported"),
            json!({"cniVersion": v.as_str(), "dns": {}})
        );
    }
    assert_eq!(empty_result("0.5.0").expect_err("unsupported").code, 1);
    // an empty prevResult object converts to the same thing
    assert_eq!(
        convert_result(&json!({}), "1.1.0").expect("empty"),
        json!({"cniVersion":"1.1.0","dns":{}})
    );
}

#[test]
fn conversion_errors_name_the_problem() {
    let e = convert_result(&fixture("1.0.0"), "1.2.0").expect_err("unsupported target");
    assert_eq!(e.code, CniError::INCOMPATIBLE_VERSION);
    assert!(e.details.contains("\"1.2.0\""), "{e}");
    assert!(e.details.contains("\"1.1.0\""), "{e}");

    let e =
        convert_result(&json!({"cniVersion":"7.0.0"}), "1.0.0").expect_err("unsupported source");
    assert_eq!(e.code, 1);
    assert!(e.details.contains("result is \"7.0.0\""), "{e}");

    for (bad, needle) in [
        (
            json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.300/24"}]}),
            "ips[0].address \"10.0.0.300/24\"",
        ),
        (
            json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3"}]}),
            "ips[0].address \"10.0.0.3\"",
        ),
        (
            json!({"cniVersion":"1.0.0","ips":[{"gateway":"10.0.0.1"}]}),
            "ips[0].address is missing",
        ),
        (
            json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3/24","gateway":"x"}]}),
            "ips[0].gateway \"x\"",
        ),
        (
            json!({"cniVersion":"1.0.0","routes":[{"dst":"default"}]}),
            "routes[0].dst \"default\"",
        ),
        (
            json!({"cniVersion":"1.0.0","routes":[{"dst":"0.0.0.0/0","gw":"nope"}]}),
            "routes[0].gw \"nope\"",
        ),
        (
            json!({"cniVersion":"0.2.0","ip4":{"gateway":"10.0.0.1"}}),
            "ip4.ip is missing",
        ),
        (
            json!({"cniVersion":"0.2.0","ip6":{"ip":"fd00::1/64","routes":[{"dst":"x"}]}}),
            "ip6.routes[0].dst",
        ),
        (
            json!({"cniVersion":"1.0.0","ips":"not-a-list"}),
            "invalid type",
        ),
        (
            json!({"cniVersion":"1.0.0","ips":[{"interface":-1,"address":"10.0.0.3/24"}]}),
            "invalid value",
        ),
        (
            json!({"cniVersion":"1.0.0","dns":{"nameservers":"8.8.8.8"}}),
            "invalid type",
        ),
        (json!({"cniVersion":1}), "cniVersion is not a string"),
        (json!(["not", "an", "object"]), "not a JSON object"),
        (json!("1.0.0"), "not a JSON object"),
    ] {
        let e = convert_result(&bad, "1.0.0").expect_err(needle);
        assert_eq!(e.code, CniError::DECODING_FAILURE, "{bad}: {e}");
        assert!(e.msg.contains(needle), "{bad}: {e}");
    }
}

#[test]
fn empty_gateway_string_means_no_gateway() {
    let v = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3/24","gateway":""}]});
    assert_eq!(
        convert_result(&v, "1.0.0").expect("ok"),
        json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.3/24"}],"dns":{}})
    );
}

#[test]
fn dns_to_value_omits_empty_fields() {
    assert_eq!(Dns::default().to_value(), json!({}));
    assert!(Dns::default().is_empty());
    let d = Dns::from_value(&json!({"domain":"x","nameservers":[]}), "dns").expect("dns");
    assert_eq!(d.to_value(), json!({"domain":"x"}));
    assert!(!d.is_empty());
}
