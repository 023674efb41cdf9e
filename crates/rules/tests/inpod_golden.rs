//! Golden tests of the ambient in-pod generator against Istio's own goldens
//! (`testdata/istio/inpod-iptables`, `testdata/istio/inpod-nftables`, 14 cases each).
//!
//! Every case of each `cases.json` runs: `inputs` overlaid on `defaults` must equal the case's
//! `effective` (every key understood), the entry (`create_inpod_rules` / `create_host_rules`)
//! is rendered and compared with the `.golden` file:
//! * nftables: byte for byte (the transaction text, `\n` after every command, as the file);
//! * iptables: byte for byte except the final `\n` — Istio's recorder output is trimmed before
//!   comparing (`cases.json` `compare`: "Strip leading/trailing whitespace") and the golden
//!   files are stored without it; our text is the recorded command lines each ending in `\n`.
//!
//! The test fails if a `.golden` file of the directory is not used by a case, or a case names a
//! file that is missing.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use meshcni_rules::inpod::{self, DnsOverride, InpodConfig, PodOverrides};
use meshcni_rules::model::Family;
use serde_json::{Map, Value};

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(name)
}

enum Entry {
    Pod,
    Host,
}

struct Case {
    name: String,
    golden_file: String,
    golden: String,
    entry: Entry,
    cfg: InpodConfig,
    pod: PodOverrides,
    kubelet_uid: Option<u32>,
}

fn str_of<'a>(m: &'a Map<String, Value>, k: &str, case: &str) -> &'a str {
    m.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{case}: `{k}` must be a string"))
}

fn bool_of(m: &Map<String, Value>, k: &str, case: &str) -> bool {
    m.get(k)
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("{case}: `{k}` must be a bool"))
}

fn load(corpus: &str) -> Vec<Case> {
    let dir = corpus_dir(corpus);
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    let doc: Value = serde_json::from_str(&text).expect("parse cases.json");
    let defaults = doc["defaults"]
        .as_object()
        .expect("defaults object")
        .clone();
    let mut cases = Vec::new();
    for c in doc["cases"].as_array().expect("cases array") {
        let name = c["name"].as_str().expect("case name").to_owned();
        let mut merged = defaults.clone();
        for (k, v) in c["inputs"].as_object().expect("inputs object") {
            merged.insert(k.clone(), v.clone());
        }
        assert_eq!(
            Value::Object(merged.clone()),
            c["effective"],
            "{corpus}/{name}: defaults+inputs differ from `effective`"
        );
        // Every key of the effective config is understood: what it sets is used below, and
        // the Go-only switches must be at their neutral values.
        let known = [
            "enable_ipv6",
            "redirect_dns",
            "host_probe_snat_ipv4",
            "host_probe_snat_ipv6",
            "reconcile",
            "cleanup_only",
            "force_apply",
            "virtual_interfaces",
            "ingress_mode",
            "dns_proxy_override",
            "kubelet_uid",
        ];
        for k in merged.keys() {
            assert!(
                known.contains(&k.as_str()),
                "{corpus}/{name}: unknown key `{k}`"
            );
        }
        for k in ["reconcile", "cleanup_only", "force_apply"] {
            assert!(!bool_of(&merged, k, &name), "{corpus}/{name}: `{k}` set");
        }
        let cfg = InpodConfig {
            redirect_dns: bool_of(&merged, "redirect_dns", &name),
            enable_ipv6: bool_of(&merged, "enable_ipv6", &name),
            host_probe_snat_v4: str_of(&merged, "host_probe_snat_ipv4", &name)
                .parse::<Ipv4Addr>()
                .expect("v4 snat"),
            host_probe_snat_v6: str_of(&merged, "host_probe_snat_ipv6", &name)
                .parse::<Ipv6Addr>()
                .expect("v6 snat"),
        };
        let pod = PodOverrides {
            ingress_mode: bool_of(&merged, "ingress_mode", &name),
            dns: match str_of(&merged, "dns_proxy_override", &name) {
                "unset" => DnsOverride::Unset,
                "enabled" => DnsOverride::Enabled,
                "disabled" => DnsOverride::Disabled,
                other => panic!("{corpus}/{name}: dns_proxy_override {other:?}"),
            },
            virtual_interfaces: merged["virtual_interfaces"]
                .as_array()
                .expect("virtual_interfaces array")
                .iter()
                .map(|v| v.as_str().expect("iface string").to_owned())
                .collect(),
        };
        let kubelet_uid = merged
            .get("kubelet_uid")
            .map(|v| v.as_str().expect("uid string").parse::<u32>().expect("uid"));
        let entry = match c["entry"].as_str().expect("entry") {
            "create_inpod_rules" => Entry::Pod,
            "create_host_rules" => Entry::Host,
            other => panic!("{corpus}/{name}: unknown entry {other:?}"),
        };
        let golden_file = c["golden"].as_str().expect("golden file name").to_owned();
        let golden = std::fs::read_to_string(dir.join(&golden_file))
            .unwrap_or_else(|e| panic!("{corpus}/{name}: read {golden_file}: {e}"));
        cases.push(Case {
            name,
            golden_file,
            golden,
            entry,
            cfg,
            pod,
            kubelet_uid,
        });
    }
    // Every golden of the directory is used by exactly one case.
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("read corpus dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".golden"))
        .collect();
    let used: Vec<String> = cases.iter().map(|c| c.golden_file.clone()).collect();
    let used_set: BTreeSet<String> = used.iter().cloned().collect();
    assert_eq!(
        used.len(),
        used_set.len(),
        "{corpus}: a golden is used twice"
    );
    assert_eq!(
        on_disk, used_set,
        "{corpus}: goldens on disk vs used by cases"
    );
    cases
}

/// Line diff for failure messages.
fn diff(expected: &str, actual: &str) -> String {
    let mut out = String::new();
    let (a, b): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => out.push_str(&format!("  {x}\n")),
            (x, y) => {
                if let Some(x) = x {
                    out.push_str(&format!("- {x:?}\n"));
                }
                if let Some(y) = y {
                    out.push_str(&format!("+ {y:?}\n"));
                }
            }
        }
    }
    out
}

fn run(corpus: &str, render: impl Fn(&Case) -> String, exact: impl Fn(&str) -> &str) {
    let cases = load(corpus);
    assert_eq!(cases.len(), 14, "{corpus}: case count");
    let mut failures = Vec::new();
    for case in &cases {
        let ours = render(case);
        if exact(&ours) != case.golden {
            failures.push(format!(
                "=== {corpus}/{} ({}; - golden, + ours)\n{}",
                case.name,
                case.golden_file,
                diff(&case.golden, exact(&ours))
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {corpus} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// What Istio's recorder captures: the two state probes, then the v4 restore input, then the
/// v6 restore input when IPv6 is on.
fn recorded_iptables(case: &Case) -> String {
    let rs = match case.entry {
        Entry::Pod => inpod::pod_rules(&case.cfg, &case.pod),
        Entry::Host => inpod::host_rules_iptables(&case.cfg),
    };
    let mut out = String::from("iptables-save\nip6tables-save\n");
    out.push_str(&inpod::pod_restore(&rs, Family::V4));
    if case.cfg.enable_ipv6 {
        out.push_str(&inpod::pod_restore(&rs, Family::V6));
    }
    out
}

#[test]
fn inpod_iptables_goldens() {
    // Only the final newline is dropped (Istio trims; the files are stored without it).
    run("inpod-iptables", recorded_iptables, |s| {
        s.strip_suffix('\n').unwrap_or(s)
    });
}

#[test]
fn inpod_nftables_goldens() {
    run(
        "inpod-nftables",
        |case| match case.entry {
            Entry::Pod => inpod::pod_nft(&inpod::pod_rules(&case.cfg, &case.pod)),
            Entry::Host => inpod::host_nft(&inpod::host_rules_nft(
                &case.cfg,
                case.kubelet_uid.expect("nft cases carry the kubelet uid"),
            )),
        },
        |s| s,
    );
}

/// Rendering is deterministic (Istio's "invoked twice is idempotent" check).
#[test]
fn rendering_twice_gives_the_same_text() {
    for case in load("inpod-iptables") {
        assert_eq!(
            recorded_iptables(&case),
            recorded_iptables(&case),
            "{}",
            case.name
        );
    }
}
