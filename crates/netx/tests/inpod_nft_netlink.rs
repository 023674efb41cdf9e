//! The iptables-nft flavor of the in-pod rules written over nf_tables netlink
//! (`meshcni_netx::iptnft`), as root, in network namespaces the tests create:
//! * for every in-pod case of `testdata/istio/inpod-iptables` the kernel objects equal what
//!   `iptables-nft-restore`/`ip6tables-nft-restore` of the generator's text create: the same
//!   `-save` text and the same `nft --debug=netlink list ruleset` (expressions, handles);
//! * re-applying identical state sends nothing (ruleset generation unchanged);
//! * drift (a rule deleted, a third-party rule in our chain, a duplicate jump) is repaired by
//!   exactly one committed batch, foreign state kept;
//! * a batch the kernel refuses leaves the netns byte-identical (rules, handles, ip rules);
//! * the whole apply runs no process: with failing `iptables-*`/`nft` stand-ins first on PATH
//!   (a re-exec of this test binary), install, no-op and repair all succeed.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use common::{TestNetns, normalize_save, run_in};
use meshcni_netx::iptables::{IptablesFlavor, IptablesOptions};
use meshcni_netx::iptnft::ruleset_generation;
use meshcni_netx::{InpodApplier, InpodBackend, NetxError};
use meshcni_rules::inpod::{self, DnsOverride, InpodConfig, PodOverrides};
use meshcni_rules::model::Family;
use serde_json::Value;

fn applier() -> InpodApplier {
    InpodApplier {
        backend: InpodBackend::Iptables,
        iptables: IptablesOptions {
            force: Some(IptablesFlavor::Nft),
            ..IptablesOptions::default()
        },
    }
}

/// Counter values of `nft` listings (`counter pkts N bytes M`, `counter packets N bytes M`)
/// set to 0: traffic the kernel sends by itself moves them.
fn without_counters(text: &str) -> String {
    text.lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            let mut out: Vec<&str> = Vec::new();
            let mut i = 0;
            while i < w.len() {
                out.push(w[i]);
                if w[i] == "counter"
                    && matches!(w.get(i + 1), Some(&"pkts") | Some(&"packets"))
                    && w.get(i + 3) == Some(&"bytes")
                {
                    out.extend([w[i + 1], "0", "bytes", "0"]);
                    i += 5;
                    continue;
                }
                i += 1;
            }
            format!("{}\n", out.join(" "))
        })
        .collect()
}

/// Everything of the netns the in-pod rules touch: both `-save`s, the expression-level nft
/// listing (with handles), `nft -a list ruleset`, ip rules and routes.
fn snapshot(ns: &Path) -> String {
    let mut out = String::new();
    for prog in ["iptables-nft-save", "ip6tables-nft-save"] {
        out.push_str(&format!(
            "## {prog}\n{}",
            normalize_save(&run_in(ns, prog, &[], None))
        ));
    }
    for args in [
        &["--debug=netlink", "list", "ruleset"][..],
        &["-a", "list", "ruleset"],
    ] {
        out.push_str(&format!(
            "## nft {args:?}\n{}",
            without_counters(&run_in(ns, "nft", args, None))
        ));
    }
    for args in [
        &["-4", "rule"][..],
        &["-6", "rule"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        let text: String = run_in(ns, "ip", args, None)
            .lines()
            .filter(|l| !l.contains("fe80::") && !l.contains("ff00::/8"))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&format!("## ip {args:?}\n{text}"));
    }
    out
}

/// The packet-filter part of [`snapshot`] (what the equivalence compares).
fn filter_state(ns: &Path) -> String {
    snapshot(ns)
        .split("## ip ")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The in-pod cases of `testdata/istio/inpod-iptables/cases.json` (name, config, overrides).
fn pod_cases() -> Vec<(String, InpodConfig, PodOverrides)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/istio/inpod-iptables");
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json"),
    )
    .expect("parse cases.json");
    let mut out = Vec::new();
    for c in doc["cases"].as_array().expect("cases") {
        if c["entry"].as_str() != Some("create_inpod_rules") {
            continue;
        }
        let name = c["name"].as_str().expect("name").to_string();
        let e = &c["effective"];
        let b = |k: &str| e[k].as_bool().unwrap_or_else(|| panic!("{name}: {k}"));
        let s = |k: &str| e[k].as_str().unwrap_or_else(|| panic!("{name}: {k}"));
        let cfg = InpodConfig {
            redirect_dns: b("redirect_dns"),
            enable_ipv6: b("enable_ipv6"),
            host_probe_snat_v4: s("host_probe_snat_ipv4").parse::<Ipv4Addr>().expect("v4"),
            host_probe_snat_v6: s("host_probe_snat_ipv6").parse::<Ipv6Addr>().expect("v6"),
        };
        let pod = PodOverrides {
            ingress_mode: b("ingress_mode"),
            dns: match s("dns_proxy_override") {
                "unset" => DnsOverride::Unset,
                "enabled" => DnsOverride::Enabled,
                "disabled" => DnsOverride::Disabled,
                other => panic!("{name}: dns_proxy_override {other}"),
            },
            virtual_interfaces: e["virtual_interfaces"]
                .as_array()
                .expect("virtual_interfaces")
                .iter()
                .map(|v| v.as_str().expect("iface").to_string())
                .collect(),
        };
        // The generator's text is this case's golden (crates/rules/tests/inpod_golden.rs).
        let golden = std::fs::read_to_string(dir.join(c["golden"].as_str().expect("golden")))
            .expect("read golden");
        let rs = inpod::pod_rules(&cfg, &pod);
        let mut text = String::from("iptables-save\nip6tables-save\n");
        text.push_str(&inpod::pod_restore(&rs, Family::V4));
        text.push_str(&inpod::pod_restore(&rs, Family::V6));
        assert_eq!(
            text.trim_end(),
            golden.trim_end(),
            "{name}: generator vs golden"
        );
        out.push((name, cfg, pod));
    }
    assert_eq!(out.len(), 12, "12 in-pod cases");
    out
}

/// The generator's restore texts applied with the real binaries.
fn apply_with_restore(ns: &Path, cfg: &InpodConfig, pod: &PodOverrides) {
    let rs = inpod::pod_rules(cfg, pod);
    run_in(
        ns,
        "iptables-nft-restore",
        &["--noflush"],
        Some(&inpod::pod_restore(&rs, Family::V4)),
    );
    let v6 = inpod::pod_restore(&rs, Family::V6);
    if !v6.is_empty() {
        run_in(ns, "ip6tables-nft-restore", &["--noflush"], Some(&v6));
    }
}

#[test]
fn netlink_objects_equal_iptables_nft_restore_for_every_golden_case() {
    let a = applier();
    for (name, cfg, pod) in pod_cases() {
        let ours = TestNetns::new();
        let reference = TestNetns::new();
        let applied = a.apply(&ours.path(), &cfg, &pod).expect("netlink apply");
        assert!(applied.changed, "{name}");
        apply_with_restore(&reference.path(), &cfg, &pod);
        let (got, want) = (filter_state(&ours.path()), filter_state(&reference.path()));
        assert_eq!(got, want, "{name}: netlink vs iptables-nft-restore");
        assert!(want.contains("ISTIO_OUTPUT"), "{name}: {want}");
        assert_eq!(
            a.check(&ours.path(), &cfg, &pod).expect("check"),
            Vec::<String>::new(),
            "{name}"
        );
        // Identical state: nothing sent.
        let generation = ruleset_generation(&ours.path()).expect("generation");
        let before = snapshot(&ours.path());
        assert!(
            !a.apply(&ours.path(), &cfg, &pod).expect("re-apply").changed,
            "{name}"
        );
        assert_eq!(
            ruleset_generation(&ours.path()).expect("generation"),
            generation
        );
        assert_eq!(
            snapshot(&ours.path()),
            before,
            "{name}: re-apply changed something"
        );
        // And the restore-made state is recognised as ours: nothing to do there either.
        let generation = ruleset_generation(&reference.path()).expect("generation");
        assert_eq!(
            a.check(&reference.path(), &cfg, &pod)
                .expect("check reference")
                .iter()
                .filter(|p| p.starts_with("iptables-nft"))
                .count(),
            0,
            "{name}: restore-made rules are not seen as identical"
        );
        a.apply(&reference.path(), &cfg, &pod)
            .expect("apply on the restore-made state");
        assert_eq!(
            ruleset_generation(&reference.path()).expect("generation"),
            generation,
            "{name}: rules made by iptables-nft-restore were rewritten"
        );
    }
}

/// Foreign state: a chain with a rule and a jump to it in every table, both families.
fn seed(ns: &Path) {
    let text: String = ["mangle", "nat", "raw"]
        .iter()
        .map(|t| {
            format!(
                "*{t}\n:KEEP - [0:0]\n-A KEEP -p tcp -m tcp --dport 9 -j RETURN\n-A OUTPUT -j KEEP\nCOMMIT\n"
            )
        })
        .collect();
    run_in(ns, "iptables-nft-restore", &["--noflush"], Some(&text));
    run_in(ns, "ip6tables-nft-restore", &["--noflush"], Some(&text));
}

#[test]
fn drift_is_repaired_by_one_batch_and_foreign_state_stays() {
    let a = applier();
    let cfg = InpodConfig::default();
    let pod = PodOverrides::default();
    let ns = TestNetns::new();
    let reference = TestNetns::new();
    for n in [&ns, &reference] {
        seed(&n.path());
    }
    a.apply(&ns.path(), &cfg, &pod)
        .expect("apply on foreign state");
    apply_with_restore(&reference.path(), &cfg, &pod);
    assert_eq!(
        filter_state(&ns.path()),
        filter_state(&reference.path()),
        "on foreign state, netlink vs iptables-nft-restore"
    );
    let fresh = snapshot_without_handles(&ns.path());

    // Drift: one of our rules deleted (v4), a third-party rule in our chain (v6), a duplicate
    // jump (v4 mangle).
    let p = ns.path();
    run_in(
        &p,
        "iptables-nft",
        &[
            "-t",
            "nat",
            "-D",
            "ISTIO_OUTPUT",
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            "0x111/0xfff",
            "-j",
            "ACCEPT",
        ],
        None,
    );
    run_in(
        &p,
        "ip6tables-nft",
        &[
            "-t",
            "nat",
            "-A",
            "ISTIO_PRERT",
            "-p",
            "udp",
            "-j",
            "RETURN",
        ],
        None,
    );
    run_in(
        &p,
        "iptables-nft",
        &["-t", "mangle", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"],
        None,
    );
    let problems = a.check(&p, &cfg, &pod).expect("check");
    assert_eq!(problems.len(), 3, "{problems:?}");
    for needle in [
        "ip table nat chain ISTIO_OUTPUT",
        "ip6 table nat chain ISTIO_PRERT",
        "ip table mangle chain OUTPUT",
    ] {
        assert!(
            problems.iter().any(|d| d.contains(needle)),
            "{needle}: {problems:?}"
        );
    }

    let generation = ruleset_generation(&p).expect("generation");
    assert!(a.apply(&p, &cfg, &pod).expect("repair").changed);
    assert_eq!(
        ruleset_generation(&p).expect("generation"),
        generation + 1,
        "the repair is one nf_tables batch"
    );
    assert_eq!(
        snapshot_without_handles(&p),
        fresh,
        "repaired to the fresh state, foreign state kept"
    );
    assert!(snapshot(&p).contains("KEEP"));
    let generation = ruleset_generation(&p).expect("generation");
    assert!(!a.apply(&p, &cfg, &pod).expect("again").changed);
    assert_eq!(ruleset_generation(&p).expect("generation"), generation);
}

/// [`snapshot`] without rule handles (a repair re-adds rules: new handles, same rules): the
/// `-save`s, `nft list ruleset`, ip rules and routes.
fn snapshot_without_handles(ns: &Path) -> String {
    let full = snapshot(ns);
    let saves = full.split("## nft").next().unwrap_or_default().to_string();
    let routing = full
        .split("## ip ")
        .skip(1)
        .collect::<Vec<_>>()
        .join("## ip ");
    format!(
        "{saves}## nft\n{}## ip {routing}",
        without_counters(&run_in(ns, "nft", &["list", "ruleset"], None))
    )
}

#[test]
fn a_refused_batch_leaves_the_netns_byte_identical() {
    let a = applier();
    let pod = PodOverrides::default();
    let dns_on = InpodConfig::default();
    let dns_off = InpodConfig {
        redirect_dns: false,
        ..InpodConfig::default()
    };
    let ns = TestNetns::new();
    let p = ns.path();
    a.apply(&p, &dns_on, &pod).expect("apply with DNS capture");
    // A foreign chain jumps to our raw chain: with DNS capture off the repair must delete that
    // chain, which the kernel refuses (EBUSY) at the end of a batch that has already flushed
    // and refilled chains in other tables. Also an ip rule the apply will create first.
    run_in(&p, "iptables-nft", &["-t", "raw", "-N", "FOO"], None);
    run_in(
        &p,
        "iptables-nft",
        &["-t", "raw", "-A", "FOO", "-j", "ISTIO_PRERT"],
        None,
    );
    run_in(
        &p,
        "iptables-nft",
        &[
            "-t",
            "nat",
            "-D",
            "ISTIO_OUTPUT",
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            "0x111/0xfff",
            "-j",
            "ACCEPT",
        ],
        None,
    );
    run_in(
        &p,
        "ip",
        &[
            "-4",
            "rule",
            "del",
            "fwmark",
            "0x111/0xfff",
            "pref",
            "32764",
            "lookup",
            "100",
        ],
        None,
    );
    let before = snapshot(&p);
    let generation = ruleset_generation(&p).expect("generation");
    let err = a
        .apply(&p, &dns_off, &pod)
        .expect_err("the kernel refuses the batch");
    let text = err.to_string();
    assert!(
        matches!(err.root(), NetxError::Netlink { .. })
            && text.contains("delete chain ip raw ISTIO_PRERT"),
        "{text}"
    );
    assert_eq!(
        ruleset_generation(&p).expect("generation"),
        generation,
        "nothing committed"
    );
    assert_eq!(
        snapshot(&p),
        before,
        "a refused batch leaves the netns as it was"
    );
    // Without the foreign reference the same repair goes through.
    run_in(&p, "iptables-nft", &["-t", "raw", "-F", "FOO"], None);
    assert!(a.apply(&p, &dns_off, &pod).expect("repair").changed);
    assert_eq!(
        a.check(&p, &dns_off, &pod).expect("check"),
        Vec::<String>::new()
    );
}

/// Failing stand-ins for every program the exec path could run.
const STUBS: [&str; 12] = [
    "iptables-nft-restore",
    "ip6tables-nft-restore",
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-restore",
    "iptables-restore",
    "iptables-save",
    "nft",
    "ipset",
];

const CHILD_ENV: &str = "MCNI_NETX_NO_EXEC_CHILD";

/// Install, no-op and repair through the ADD path with every packet-filter program on PATH
/// replaced by one that records its call and fails. The apply runs in a re-exec of this test
/// (PATH is process-wide); the parent checks the kernel state and that no stand-in ran.
#[test]
fn the_apply_runs_no_process() {
    if let Some(netns) = std::env::var_os(CHILD_ENV) {
        // Child: detected flavor (not forced), like the agent's default.
        let a = InpodApplier::new(InpodBackend::Iptables);
        let step = std::env::var("MCNI_NETX_NO_EXEC_STEP").expect("step");
        let applied = a
            .apply(
                Path::new(&netns),
                &InpodConfig::default(),
                &PodOverrides::default(),
            )
            .expect("apply with failing stand-ins on PATH");
        assert_eq!(applied.changed, step != "noop", "step {step}");
        return;
    }
    let ns = TestNetns::new();
    let dir = std::env::temp_dir().join(format!("mcni-nx-stubs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("stub dir");
    let marker = dir.join("ran");
    for stub in STUBS {
        let path = dir.join(stub);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{stub} $*\" >> {}\nexit 1\n",
                marker.display()
            ),
        )
        .expect("write stub");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = |step: &str| {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "the_apply_runs_no_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, ns.path())
            .env("MCNI_NETX_NO_EXEC_STEP", step)
            .env("PATH", &path)
            .output()
            .expect("re-exec the test binary");
        assert!(
            out.status.success(),
            "child step {step} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ran = std::fs::read_to_string(&marker).unwrap_or_default();
        assert!(ran.is_empty(), "step {step} ran: {ran}");
    };
    child("install");
    let reference = TestNetns::new();
    apply_with_restore(
        &reference.path(),
        &InpodConfig::default(),
        &PodOverrides::default(),
    );
    assert_eq!(filter_state(&ns.path()), filter_state(&reference.path()));
    child("noop");
    run_in(
        &ns.path(),
        "iptables-nft",
        &["-t", "nat", "-F", "ISTIO_OUTPUT"],
        None,
    );
    child("repair");
    assert_eq!(
        applier()
            .check(
                &ns.path(),
                &InpodConfig::default(),
                &PodOverrides::default()
            )
            .expect("check"),
        Vec::<String>::new()
    );
    std::fs::remove_dir_all(&dir).expect("remove stubs");
}
