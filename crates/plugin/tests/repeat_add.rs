//! Issue 7 items 1 and 2, through the real `meshcni` binary, as root, in namespaces the test
//! creates: a repeated ADD leaves exactly one copy of the capture (iptables-nft,
//! iptables-legacy, native nftables; REDIRECT and TPROXY; IPv4-only and dual-stack pods), a
//! drifted netns is repaired by ADD to exactly the fresh state, and CHECK compares the netns with
//! what ADD installs without changing it.
//!
//! Also, in-process: for every Istio golden case and every backend, the plan applied to a fresh
//! netns is recognised as "already in place" (the predicted `-save` form matches what the real
//! binaries print, so a repeated ADD execs no restore).
//!
//! Needs root, iproute2, iptables (nft + legacy) and nft; fails (never skips) without them.

mod capture_support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use capture_support::*;
use meshcni_netx::{Applier, Backend, IptablesFlavor, IptablesOptions, RulesOutcome};
use meshcni_plugin::config::RuleBackend as ConfBackend;
use meshcni_plugin::flow::{codes, plan_for};
use meshcni_testkit::{Lab, Netns, TcpServer, TransparentProxy};

const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 8080;
const ANN_INTERCEPTION: &str = "sidecar.istio.io/interceptionMode";

/// A pod with its sidecar stand-in, an app server in the pod and a remote server.
struct World {
    lab: Lab,
    env: PluginEnv,
    sidecar: TransparentProxy,
    app: Vec<(bool, TcpServer)>,
    remote: Vec<(bool, TcpServer)>,
    /// The pod has a global IPv6 address (dual-stack); else IPv4 only.
    dual: bool,
}

impl World {
    fn new(tag: &str, dual: bool) -> World {
        let lab = Lab::new(tag).expect("lab");
        if !dual {
            // No global IPv6 address: the plugin installs IPv4 rules only.
            lab.client
                .ip(&[
                    "-6",
                    "addr",
                    "del",
                    &format!("{}/64", lab.client_ip(true)),
                    "dev",
                    "eth0",
                ])
                .expect("drop the pod's IPv6 address");
        }
        let sidecar = TransparentProxy::start(&lab.client).expect("sidecar stand-in");
        let mut app = Vec::new();
        let mut remote = Vec::new();
        for v6 in [false, true] {
            let any: IpAddr = if v6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            app.push((
                v6,
                TcpServer::start(&lab.client, sa(any, APP_PORT)).expect("app"),
            ));
            remote.push((
                v6,
                TcpServer::start(&lab.server, sa(any, SVC_PORT)).expect("svc"),
            ));
        }
        World {
            lab,
            env: PluginEnv::new(),
            sidecar,
            app,
            remote,
            dual,
        }
    }

    fn pod(&self) -> &Netns {
        &self.lab.client
    }

    fn ips(&self) -> Vec<String> {
        let mut ips = vec![format!("{}/24", self.lab.client_ip(false))];
        if self.dual {
            ips.push(format!("{}/64", self.lab.client_ip(true)));
        }
        ips
    }

    fn add(&self, pod: &PodSpec, backend: RuleBackend) -> String {
        self.env.cni_add(pod, self.pod(), backend, &self.ips())
    }

    fn check(&self, pod: &PodSpec, backend: RuleBackend) -> CniRun {
        self.env.cni("CHECK", pod, self.pod(), backend, &self.ips())
    }

    fn families(&self) -> Vec<bool> {
        if self.dual {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// Outbound app→svc and inbound remote→app are captured, per family of the pod.
    fn assert_captured(&self, what: &str) {
        for v6 in self.families() {
            let f = if v6 { "v6" } else { "v4" };
            let remote = self.remote.iter().find(|(x, _)| *x == v6).map(|(_, s)| s);
            let app = self.app.iter().find(|(x, _)| *x == v6).map(|(_, s)| s);
            let (Some(remote), Some(app)) = (remote, app) else {
                panic!("servers for {f}");
            };
            let dst = sa(self.lab.server_ip(v6), SVC_PORT);
            let rec = expect_captured(
                &format!("{what}: {f} app→svc"),
                self.pod(),
                None,
                dst,
                &self.sidecar,
                15001,
                remote,
            );
            assert_eq!(rec.peer.ip(), self.lab.client_ip(v6), "{what}: {rec:?}");
            let dst = sa(self.lab.client_ip(v6), APP_PORT);
            let rec = expect_captured(
                &format!("{what}: {f} remote→app"),
                &self.lab.server,
                None,
                dst,
                &self.sidecar,
                15006,
                app,
            );
            assert_eq!(rec.peer.ip(), self.lab.server_ip(v6), "{what}: {rec:?}");
        }
    }
}

/// Counters (`[p:b]`, `packets N bytes M`) zeroed.
fn zero_counters(text: &str) -> String {
    let mut out = String::new();
    for line in canonical_save(text).lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let mut kept: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < words.len() {
            if words[i] == "packets" && words.get(i + 2) == Some(&"bytes") {
                kept.extend(["packets", "0", "bytes", "0"]);
                i += 4;
            } else {
                kept.push(words[i]);
                i += 1;
            }
        }
        out.push_str(&kept.join(" "));
        out.push('\n');
    }
    out
}

/// Every piece of state ADD may write: iptables (both flavors, both families), the nft ruleset
/// (`with_handles`: with rule handles, which change when a rule is re-created), ip rules,
/// routes of every table, and `lo`'s addresses. Counters are zeroed.
fn state(ns: &Netns, with_handles: bool) -> String {
    let mut out = zero_counters(&all_rules(ns));
    if with_handles {
        out.push_str("# nft -a\n");
        out.push_str(&zero_counters(
            &ns.exec_ok("nft", &["-a", "list", "ruleset"])
                .expect("nft -a"),
        ));
    }
    for args in [
        &["-4", "rule", "show"][..],
        &["-6", "rule", "show"][..],
        &["-4", "route", "show", "table", "all"][..],
        &["-6", "route", "show", "table", "all"][..],
        &["addr", "show", "dev", "lo"][..],
    ] {
        out.push_str(&format!("# ip {}\n", args.join(" ")));
        out.push_str(&ns.ip(args).expect("ip"));
    }
    out
}

fn pod_for(tproxy: bool) -> PodSpec {
    let pod = PodSpec::injected(if tproxy { "reviews-tp" } else { "reviews" });
    if tproxy {
        pod.annotate(ANN_INTERCEPTION, "TPROXY")
    } else {
        pod
    }
}

/// The plugin's log says what the apply did.
fn assert_logged(log: &str, what: &str) {
    assert!(
        log.contains(what),
        "the plugin should have logged `{what}`:\n{log}"
    );
}

/// ADD twice: the second succeeds, changes nothing (state byte-identical, nft handles
/// included), and traffic is still captured — for REDIRECT and TPROXY, IPv4-only and
/// dual-stack.
fn repeated_add(backend: RuleBackend, tag: &str) {
    for tproxy in [false, true] {
        for dual in [false, true] {
            let case = format!(
                "{backend:?} {} {}",
                if tproxy { "TPROXY" } else { "REDIRECT" },
                if dual { "dual-stack" } else { "IPv4" }
            );
            let w = World::new(
                &format!("{tag}{}{}", u8::from(tproxy), u8::from(dual)),
                dual,
            );
            let pod = pod_for(tproxy);
            let first_log = w.add(&pod, backend);
            assert_logged(&first_log, "sidecar capture applied");
            let once = state(w.pod(), true);
            assert!(once.contains("15001"), "{case}: rules installed:\n{once}");
            let second_log = w.add(&pod, backend);
            assert_logged(&second_log, "sidecar capture already in place");
            let twice = state(w.pod(), true);
            assert_eq!(
                twice, once,
                "{case}: a repeated ADD must leave exactly the state of the first"
            );
            w.assert_captured(&case);
            let check = w.check(&pod, backend);
            assert!(check.ok, "{case}: CHECK after ADD must pass: {check:?}");
        }
    }
}

#[test]
fn repeated_add_is_a_no_op_iptables_nft() {
    repeated_add(RuleBackend::Iptables, "rpn");
}

#[test]
fn repeated_add_is_a_no_op_iptables_legacy() {
    repeated_add(RuleBackend::IptablesLegacy, "rpl");
}

#[test]
fn repeated_add_is_a_no_op_nftables() {
    repeated_add(RuleBackend::Nftables, "rpf");
}

/// Deletes one rule, flushes one chain, adds an extra jump from a built-in chain (and, for
/// TPROXY, removes the IPv4 policy rule and duplicates the IPv6 one): what an operator or a
/// crashed tool might leave.
fn drift(ns: &Netns, backend: RuleBackend, dual: bool, tproxy: bool) {
    let run = |prog: &str, args: &[&str]| {
        ns.exec_ok(prog, args)
            .unwrap_or_else(|e| panic!("drift `{prog} {}`: {e}", args.join(" ")));
    };
    match backend {
        RuleBackend::Iptables | RuleBackend::IptablesLegacy => {
            let flavor = if backend == RuleBackend::Iptables {
                "nft"
            } else {
                "legacy"
            };
            let mut bins = vec![format!("iptables-{flavor}")];
            if dual {
                bins.push(format!("ip6tables-{flavor}"));
            }
            for bin in &bins {
                run(
                    bin,
                    &[
                        "-t",
                        "nat",
                        "-D",
                        "ISTIO_INBOUND",
                        "-p",
                        "tcp",
                        "--dport",
                        "15008",
                        "-j",
                        "RETURN",
                    ],
                );
                run(bin, &["-t", "nat", "-F", "ISTIO_REDIRECT"]);
                run(bin, &["-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"]);
                // Into the PREROUTING that jumps to ISTIO_INBOUND on a fresh netns (nat for
                // REDIRECT, mangle for TPROXY): iptables-nft would otherwise create an extra,
                // empty nf_tables base chain that no repair of *our* rules removes.
                let table = if tproxy { "mangle" } else { "nat" };
                run(
                    bin,
                    &[
                        "-t",
                        table,
                        "-I",
                        "PREROUTING",
                        "1",
                        "-p",
                        "tcp",
                        "-j",
                        "ISTIO_INBOUND",
                    ],
                );
            }
        }
        RuleBackend::Nftables => {
            let listing = ns
                .exec_ok(
                    "nft",
                    &[
                        "-a",
                        "list",
                        "chain",
                        "inet",
                        "istio-proxy-nat",
                        "istio-inbound",
                    ],
                )
                .expect("list chain");
            let handle = listing
                .lines()
                .find(|l| l.contains("dport 15008"))
                .and_then(|l| l.rsplit("# handle ").next())
                .map(|h| h.trim().to_string())
                .expect("handle of the 15008 rule");
            run(
                "nft",
                &[
                    "delete",
                    "rule",
                    "inet",
                    "istio-proxy-nat",
                    "istio-inbound",
                    "handle",
                    &handle,
                ],
            );
            run(
                "nft",
                &[
                    "flush",
                    "chain",
                    "inet",
                    "istio-proxy-nat",
                    "istio-redirect",
                ],
            );
            run(
                "nft",
                &[
                    "add",
                    "rule",
                    "inet",
                    "istio-proxy-nat",
                    "output",
                    "counter",
                    "jump",
                    "istio-output",
                ],
            );
        }
    }
    if tproxy {
        run(
            "ip",
            &["-4", "rule", "del", "fwmark", "1337", "lookup", "133"],
        );
        if dual {
            run(
                "ip",
                &["-6", "rule", "add", "fwmark", "1337", "lookup", "133"],
            );
        }
    }
}

/// A drifted netns: CHECK fails naming the difference and changes nothing; ADD repairs it to
/// exactly the fresh state (one copy of every rule); CHECK then passes and traffic is captured.
fn drift_repaired(backend: RuleBackend, tag: &str) {
    for tproxy in [false, true] {
        let dual = true;
        let case = format!("{backend:?} {}", if tproxy { "TPROXY" } else { "REDIRECT" });
        let w = World::new(&format!("{tag}{}", u8::from(tproxy)), dual);
        let pod = pod_for(tproxy);
        w.add(&pod, backend);
        let fresh = state(w.pod(), false);
        drift(w.pod(), backend, dual, tproxy);
        let drifted = state(w.pod(), true);
        assert_ne!(zero_counters(&drifted), fresh, "{case}: drift took effect");

        let check = w.check(&pod, backend);
        let err = check.error();
        assert_eq!(err["code"], codes::CAPTURE_MISMATCH, "{case}: {err}");
        let text = format!("{} {}", err["msg"], err["details"]);
        let expect: &[&str] = match backend {
            RuleBackend::Nftables => &[
                "nft table inet istio-proxy-nat chain istio-inbound",
                "dport 15008",
            ],
            _ => &["-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN` missing"],
        };
        for e in expect {
            assert!(text.contains(e), "{case}: CHECK must name `{e}`: {text}");
        }
        if tproxy {
            assert!(
                text.contains("ip rule (ipv4) fwmark 0x539 lookup 133 missing")
                    && text.contains("ip rule (ipv6) fwmark 0x539 lookup 133 present 2 times"),
                "{case}: CHECK must name the missing and the duplicated ip rule: {text}"
            );
        }
        assert_eq!(
            state(w.pod(), true),
            drifted,
            "{case}: CHECK must not change the netns"
        );

        let log = w.add(&pod, backend);
        assert_logged(&log, "sidecar capture repaired");
        assert_eq!(
            state(w.pod(), false),
            fresh,
            "{case}: ADD must repair the netns to exactly the fresh state"
        );
        let check = w.check(&pod, backend);
        assert!(check.ok, "{case}: CHECK after the repair: {check:?}");
        w.assert_captured(&case);
        // And once more: nothing left to repair.
        let log = w.add(&pod, backend);
        assert_logged(&log, "sidecar capture already in place");
    }
}

#[test]
fn drifted_rules_are_repaired_by_add_iptables_nft() {
    drift_repaired(RuleBackend::Iptables, "drn");
}

#[test]
fn drifted_rules_are_repaired_by_add_iptables_legacy() {
    drift_repaired(RuleBackend::IptablesLegacy, "drl");
}

#[test]
fn drifted_rules_are_repaired_by_add_nftables() {
    drift_repaired(RuleBackend::Nftables, "drf");
}

/// CHECK on an injected pod whose netns has no capture at all fails with a message naming
/// what is missing, and leaves the netns untouched; a non-mesh pod passes.
#[test]
fn check_fails_on_an_empty_netns_and_passes_for_non_mesh_pods() {
    let w = World::new("chk", true);
    for backend in [
        RuleBackend::Iptables,
        RuleBackend::IptablesLegacy,
        RuleBackend::Nftables,
    ] {
        for tproxy in [false, true] {
            let before = state(w.pod(), true);
            let run = w.check(&pod_for(tproxy), backend);
            let err = run.error();
            assert_eq!(err["code"], codes::CAPTURE_MISMATCH, "{backend:?}: {err}");
            let msg = err["msg"].as_str().unwrap_or_default();
            let want = match backend {
                RuleBackend::Nftables => "nft table inet istio-proxy-",
                _ => "chain ISTIO_",
            };
            assert!(
                msg.contains(want) && msg.contains("missing"),
                "{backend:?}: CHECK must name what is missing: {err}"
            );
            assert!(
                msg.contains(if tproxy { "reviews-tp" } else { "reviews" }),
                "{backend:?}: CHECK must name the pod: {err}"
            );
            if tproxy {
                let details = err["details"].as_str().unwrap_or_default();
                assert!(
                    details.contains("route (ipv6) local default dev lo table 133 missing")
                        && details.contains("address ::6/128 on lo missing"),
                    "{backend:?}: {details}"
                );
            }
            assert_eq!(
                state(w.pod(), true),
                before,
                "{backend:?}: CHECK must not change the netns"
            );
        }
        let plain = w.check(&PodSpec::plain("legacy"), backend);
        assert!(plain.ok, "a non-mesh pod passes CHECK: {plain:?}");
    }
}

/// CHECK passes without looking at the netns for pods ADD leaves alone or hands to the agent:
/// an injected pod in an excluded namespace, an opted-out pod, and an ambient pod (the agent
/// programs it; CHECK neither inspects it nor needs the agent's socket). The netns is empty and
/// stays so.
#[test]
fn check_passes_for_pods_add_does_not_capture() {
    let w = World::new("chs", true);
    let before = state(w.pod(), true);
    let excluded = w.env.cni_with(
        "CHECK",
        &pod_for(false),
        w.pod(),
        serde_json::json!({"exclude_namespaces": ["demo"]}),
        &w.ips(),
    );
    assert!(excluded.ok, "excluded namespace: {excluded:?}");
    let opted_out = w.check(
        &pod_for(false).annotate("sidecar.istio.io/inject", "false"),
        RuleBackend::Iptables,
    );
    assert!(opted_out.ok, "opted-out pod: {opted_out:?}");
    let ambient = w.env.cni_with(
        "CHECK",
        &PodSpec::plain("ratings-ambient").label("istio.io/dataplane-mode", "ambient"),
        w.pod(),
        serde_json::json!({"ambient_enabled": true}),
        &w.ips(),
    );
    assert!(ambient.ok, "ambient pod: {ambient:?}");
    // The same injected pod, with none of the above, fails: the passes were not by accident.
    let plain_check = w.check(&pod_for(false), RuleBackend::Iptables);
    assert_eq!(plain_check.error()["code"], codes::CAPTURE_MISMATCH);
    assert_eq!(
        state(w.pod(), true),
        before,
        "CHECK must not change the netns"
    );
}

/// Every Istio golden case, every backend: applied to a fresh netns, a second apply of the same
/// plan is `Unchanged` (iptables: the predicted `-save` form matches the real binaries' output,
/// so no restore is exec'd) and the read-only check finds nothing.
#[test]
fn every_golden_case_is_recognised_as_in_place() {
    let mut failures = Vec::new();
    for (corpus, backends) in [
        (
            "istio-iptables-capture",
            &[
                (ConfBackend::Iptables, Some(IptablesFlavor::Nft)),
                (ConfBackend::Iptables, Some(IptablesFlavor::Legacy)),
            ][..],
        ),
        (
            "istio-nftables-capture",
            &[(ConfBackend::Nftables, None)][..],
        ),
    ] {
        for case in golden_cases(corpus) {
            for &(backend, flavor) in backends {
                let plan = plan_for(&case.1, backend).expect("plan");
                let applier = Applier {
                    backend: if flavor.is_some() {
                        Backend::Iptables
                    } else {
                        Backend::Nftables
                    },
                    iptables: IptablesOptions {
                        force: flavor,
                        ..IptablesOptions::default()
                    },
                };
                let ns = Netns::new("gold").expect("netns");
                let label = format!("{corpus}/{} {flavor:?}", case.0);
                let first = applier.apply_capture(ns.path(), &plan);
                let second = applier.apply_capture(ns.path(), &plan);
                let check = applier.check_capture(ns.path(), &plan);
                match (first, second, check) {
                    (Ok(a), Ok(b), Ok(problems)) => {
                        if a.rules != RulesOutcome::Installed
                            || b.rules != RulesOutcome::Unchanged
                            || !problems.is_empty()
                        {
                            failures.push(format!(
                                "{label}: first {:?}, second {:?}, check {problems:?}",
                                a.rules, b.rules
                            ));
                        }
                    }
                    (a, b, c) => failures.push(format!("{label}: {a:?} / {b:?} / {c:?}")),
                }
                if flavor.is_some() {
                    // The fast path: the prediction alone recognises the state.
                    let plan_owned = plan.owned.as_ref().expect("owned");
                    for (fam, predicted, prog) in [
                        (false, &plan_owned.v4_save, "iptables"),
                        (
                            true,
                            plan_owned.v6_save.as_ref().unwrap_or(&String::new()),
                            "ip6tables",
                        ),
                    ] {
                        if fam && plan_owned.v6_save.is_none() {
                            continue;
                        }
                        let f = match flavor {
                            Some(IptablesFlavor::Legacy) => "legacy",
                            _ => "nft",
                        };
                        let actual = ns.exec_ok(&format!("{prog}-{f}-save"), &[]).expect("save");
                        let d = meshcni_netx::iptables_state::diff(
                            predicted,
                            &actual,
                            &plan_owned.iptables_chains,
                        );
                        if !d.is_empty() {
                            failures.push(format!("{label} {prog}: prediction differs: {d:?}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// (name, config) of every case of a `testdata/istio` corpus. Group *names* in the owner-group
/// cases (`java`, `ftp`) do not exist on a test host and are not resolved in the plugin's
/// NSS-isolated children, so they are replaced by numeric ids (same rule shapes).
fn golden_cases(corpus: &str) -> Vec<(String, meshcni_rules::sidecar::CaptureConfig)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(corpus);
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("cases.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("cases.json parses");
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("name").to_string();
            let mut effective = c["effective"].clone();
            for key in ["owner_groups_include", "owner_groups_exclude"] {
                if let Some(list) = effective[key].as_str() {
                    let numeric: Vec<String> = list
                        .split(',')
                        .enumerate()
                        .map(|(i, g)| {
                            if g.trim().parse::<u32>().is_ok() || g.trim() == "*" {
                                g.to_string()
                            } else {
                                (3000 + i).to_string()
                            }
                        })
                        .collect();
                    effective[key] = serde_json::Value::String(numeric.join(","));
                }
            }
            let cfg = serde_json::from_value(effective).expect("config");
            (name, cfg)
        })
        .collect()
}
