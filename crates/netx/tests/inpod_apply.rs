//! Ambient in-pod rules applied for real, as root, in network namespaces the tests create:
//! exactly the golden rules in an empty netns (iptables legacy and nft flavors, native
//! nftables; IPv4-only and dual-stack), re-apply runs nothing, drift is repaired once, a failed
//! apply leaves the netns as it was, removal leaves it byte-identical to before, and a
//! `/proc/self/fd/N` netns path works.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use common::{TestNetns, normalize_save, run_in};
use meshcni_netx::iptables::{IptablesFlavor, IptablesOptions};
use meshcni_netx::iptables_state::parse_save;
use meshcni_netx::{InpodApplier, InpodBackend, NetxError};
use meshcni_rules::inpod::{self, InpodConfig, PodOverrides};
use meshcni_rules::model::Family;
use meshcni_rules::save_form;

/// The configuration of the `default` / `default_ipv6` golden cases (Istio's test v6 SNAT).
fn cfg(ipv6: bool) -> InpodConfig {
    InpodConfig {
        redirect_dns: true,
        enable_ipv6: ipv6,
        host_probe_snat_v4: "169.254.7.127".parse().expect("v4"),
        host_probe_snat_v6: "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"
            .parse::<Ipv6Addr>()
            .expect("v6"),
    }
}

fn golden(corpus: &str, ipv6: bool) -> String {
    let file = if ipv6 {
        "default_ipv6.golden"
    } else {
        "default.golden"
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(corpus)
        .join(file);
    std::fs::read_to_string(&path).expect("read golden")
}

/// The golden iptables file split into its v4 and v6 restore inputs.
fn golden_restores(ipv6: bool) -> (String, Option<String>) {
    let text = golden("inpod-iptables", ipv6);
    let body: Vec<&str> = text
        .lines()
        .filter(|l| !l.ends_with("tables-save"))
        .collect();
    // v4 is mangle, nat, raw: three COMMITs.
    let mut commits = 0;
    let split = body
        .iter()
        .position(|l| {
            if *l == "COMMIT" {
                commits += 1;
            }
            commits == 3
        })
        .expect("three v4 tables");
    let v4 = body[..=split].join("\n") + "\n";
    let v6 = body[split + 1..].join("\n");
    (v4, ipv6.then(|| v6 + "\n"))
}

/// `nft list ruleset` with counters zeroed.
fn normalize_nft(text: &str) -> String {
    text.lines()
        .map(|l| {
            let indent = &l[..l.len() - l.trim_start().len()];
            let w: Vec<&str> = l.split_whitespace().collect();
            let mut out: Vec<&str> = Vec::new();
            let mut i = 0;
            while i < w.len() {
                out.push(w[i]);
                if w[i] == "counter" && w.get(i + 1) == Some(&"packets") {
                    out.extend(["packets", "0", "bytes", "0"]);
                    i += 5;
                    continue;
                }
                i += 1;
            }
            format!("{indent}{}\n", out.join(" "))
        })
        .collect()
}

/// Everything the in-pod rules can touch: iptables of both flavors and families, nft, ip rules
/// and every routing table.
fn snapshot(ns: &Path) -> String {
    let mut out = String::new();
    for prog in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        out.push_str(&format!(
            "## {prog}\n{}",
            normalize_save(&run_in(ns, prog, &[], None))
        ));
    }
    out.push_str(&format!(
        "## nft\n{}",
        normalize_nft(&run_in(ns, "nft", &["list", "ruleset"], None))
    ));
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

/// `(table, chain) → rules` of a `-save` text, without built-in chains that have no rules.
fn chain_map(save: &str) -> BTreeMap<(String, String), Vec<String>> {
    let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    let mut map = BTreeMap::new();
    for t in parse_save(save) {
        for c in t.chains {
            if builtin.contains(&c.name.as_str()) && c.rules.is_empty() {
                continue;
            }
            map.insert((t.name.clone(), c.name.clone()), c.rules);
        }
    }
    map
}

fn applier(backend: InpodBackend, flavor: Option<IptablesFlavor>) -> InpodApplier {
    InpodApplier {
        backend,
        iptables: IptablesOptions {
            force: flavor,
            ..IptablesOptions::default()
        },
    }
}

fn save_bin(flavor: IptablesFlavor, v6: bool) -> String {
    let base = if v6 { "ip6tables" } else { "iptables" };
    match flavor {
        IptablesFlavor::Legacy => format!("{base}-legacy-save"),
        IptablesFlavor::Nft => format!("{base}-nft-save"),
        IptablesFlavor::Plain => format!("{base}-save"),
    }
}

fn bin(flavor: IptablesFlavor, v6: bool) -> String {
    save_bin(flavor, v6).trim_end_matches("-save").to_string()
}

/// Foreign state the in-pod rules must leave alone: a chain with a rule and a jump to it in
/// every table the in-pod rules use, both families (iptables flavor or nft table).
fn seed(ns: &Path, backend: InpodBackend, flavor: Option<IptablesFlavor>) {
    match (backend, flavor) {
        (InpodBackend::Iptables, Some(flavor)) => {
            let text = ["mangle", "nat", "raw"]
                .iter()
                .map(|t| {
                    format!(
                        "*{t}\n:KEEP - [0:0]\n-A KEEP -p tcp -m tcp --dport 9 -j RETURN\n-A OUTPUT -j KEEP\nCOMMIT\n"
                    )
                })
                .collect::<String>();
            for v6 in [false, true] {
                let restore = format!("{}-restore", bin(flavor, v6));
                run_in(ns, &restore, &["--noflush"], Some(&text));
            }
        }
        _ => {
            run_in(
                ns,
                "nft",
                &["-f", "-"],
                Some(
                    "add table inet keep\nadd chain inet keep out { type filter hook output priority 0 ; }\nadd rule inet keep out tcp dport 9 counter accept\n",
                ),
            );
        }
    }
    run_in(
        ns,
        "ip",
        &["rule", "add", "fwmark", "0x7", "lookup", "77"],
        None,
    );
}

fn has_inpod_routing(ns: &Path, ipv6: bool) {
    let r4 = run_in(ns, "ip", &["-4", "rule"], None);
    assert!(
        r4.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
        "{r4}"
    );
    let t4 = run_in(ns, "ip", &["-4", "route", "show", "table", "100"], None);
    assert_eq!(t4.trim(), "local default dev lo scope host", "{t4}");
    let r6 = run_in(ns, "ip", &["-6", "rule"], None);
    let t6: String = run_in(ns, "ip", &["-6", "route", "show", "table", "all"], None)
        .lines()
        .filter(|l| l.contains("table 100"))
        .collect();
    if ipv6 {
        assert!(
            r6.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100"),
            "{r6}"
        );
        assert!(t6.starts_with("local default dev lo table 100"), "{t6}");
    } else {
        assert!(!r6.contains("lookup 100"), "{r6}");
        assert!(t6.trim().is_empty(), "{t6}");
    }
}

/// The full lifecycle for one backend/flavor/family setting.
fn lifecycle(backend: InpodBackend, flavor: Option<IptablesFlavor>, ipv6: bool) {
    let cfg = cfg(ipv6);
    let pod = PodOverrides::default();
    let a = applier(backend, flavor);

    // 1. An empty netns gets exactly the golden rules.
    let empty = TestNetns::new();
    let ns = empty.path();
    let applied = a.apply(&ns, &cfg, &pod).expect("apply in an empty netns");
    assert!(applied.changed);
    has_inpod_routing(&ns, ipv6);
    let reference = TestNetns::new();
    match (backend, flavor) {
        (InpodBackend::Iptables, Some(flavor)) => {
            let rs = inpod::pod_rules(&cfg, &pod);
            let (g4, g6) = golden_restores(ipv6);
            run_in(
                &reference.path(),
                &format!("{}-restore", bin(flavor, false)),
                &["--noflush"],
                Some(&g4),
            );
            if let Some(g6) = &g6 {
                run_in(
                    &reference.path(),
                    &format!("{}-restore", bin(flavor, true)),
                    &["--noflush"],
                    Some(g6),
                );
            }
            for (v6, fam) in [(false, Family::V4), (true, Family::V6)] {
                let actual = run_in(&ns, &save_bin(flavor, v6), &[], None);
                let want = run_in(&reference.path(), &save_bin(flavor, v6), &[], None);
                assert_eq!(
                    normalize_save(&actual),
                    normalize_save(&want),
                    "{flavor:?} v6={v6}: the golden restore text applied by hand"
                );
                let predicted = if v6 && !ipv6 {
                    String::new()
                } else {
                    save_form::render(&rs, fam)
                };
                assert_eq!(
                    chain_map(&actual),
                    chain_map(&predicted),
                    "{flavor:?} v6={v6}: -save vs the predicted -save form\n{actual}"
                );
            }
        }
        _ => {
            run_in(
                &reference.path(),
                "nft",
                &["-f", "-"],
                Some(&golden("inpod-nftables", ipv6)),
            );
            let actual = normalize_nft(&run_in(&ns, "nft", &["list", "ruleset"], None));
            let want = normalize_nft(&run_in(
                &reference.path(),
                "nft",
                &["list", "ruleset"],
                None,
            ));
            assert_eq!(actual, want, "nft: the golden transaction applied by hand");
        }
    }
    assert_eq!(
        a.check(&ns, &cfg, &pod).expect("check"),
        Vec::<String>::new()
    );

    // 2. Re-applying runs nothing (rule handles and counters' identity kept) and never
    //    duplicates.
    // Rule handles, without counters: traffic the kernel sends by itself (IPv6 router and
    // multicast listener solicitations) moves them at any time.
    let handles =
        |ns: &Path| without_counters(&run_in(ns, "nft", &["-a", "list", "ruleset"], None));
    let before_reapply = (snapshot(&ns), handles(&ns));
    let again = a.apply(&ns, &cfg, &pod).expect("re-apply");
    assert!(!again.changed, "re-apply must be a no-op");
    assert_eq!((snapshot(&ns), handles(&ns)), before_reapply);

    // 3. Remove: nothing of ours is left.
    a.remove(&ns).expect("remove");
    let after = snapshot(&ns);
    for needle in ["ISTIO_", "istio-ambient", "lookup 100", "table 100"] {
        assert!(
            !after.contains(needle),
            "{needle} left after remove:\n{after}"
        );
    }

    // 4. A netns with foreign state: drift repaired once, failed apply rolled back, removal
    //    byte-identical to before.
    let seeded = TestNetns::new();
    let ns = seeded.path();
    seed(&ns, backend, flavor);
    let before = snapshot(&ns);
    a.apply(&ns, &cfg, &pod).expect("apply on foreign state");
    let fresh = snapshot(&ns);
    assert!(fresh.contains("KEEP") || fresh.contains("table inet keep"));
    match (backend, flavor) {
        (InpodBackend::Iptables, Some(flavor)) => {
            let b = bin(flavor, false);
            run_in(
                &ns,
                &b,
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
                &ns,
                &b,
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
        }
        _ => {
            run_in(
                &ns,
                "nft",
                &[
                    "flush",
                    "chain",
                    "inet",
                    "istio-ambient-nat",
                    "istio-output",
                ],
                None,
            );
            run_in(
                &ns,
                "nft",
                &[
                    "add",
                    "rule",
                    "inet",
                    "istio-ambient-nat",
                    "istio-prerouting",
                    "meta",
                    "l4proto",
                    "udp",
                    "return",
                ],
                None,
            );
        }
    }
    run_in(
        &ns,
        "ip",
        &[
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
    let drifted = snapshot(&ns);
    let problems = a.check(&ns, &cfg, &pod).expect("check drifted");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ip rule (ipv4) fwmark 0x111")),
        "{problems:?}"
    );
    assert!(problems.len() >= 2, "{problems:?}");
    assert_eq!(snapshot(&ns), drifted, "check is read-only");

    // A repair that fails late (lo down: the IPv6 local route cannot be added; an IPv4 one
    // can, so this runs in the dual-stack cases) changes nothing.
    if ipv6 {
        run_in(&ns, "ip", &["link", "set", "lo", "down"], None);
        run_in(&ns, "ip", &["-4", "route", "flush", "table", "100"], None);
        let drifted = snapshot(&ns);
        let err = a.apply(&ns, &cfg, &pod).expect_err("route on a down lo");
        assert!(
            matches!(err.root(), NetxError::Netlink { .. }),
            "unexpected error: {err}"
        );
        assert_eq!(
            snapshot(&ns),
            drifted,
            "a failed apply leaves the netns as it was"
        );
        run_in(&ns, "ip", &["link", "set", "lo", "up"], None);
    }

    let repaired = a.apply(&ns, &cfg, &pod).expect("repair");
    assert!(repaired.changed);
    assert_eq!(
        snapshot(&ns),
        fresh,
        "repaired to the fresh state, foreign state kept"
    );
    assert!(!a.apply(&ns, &cfg, &pod).expect("again").changed);

    a.remove(&ns).expect("remove");
    assert_eq!(snapshot(&ns), before, "remove leaves the netns as before");
    a.remove(&ns).expect("remove is idempotent");
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn iptables_nft_flavor_dual_stack() {
    lifecycle(InpodBackend::Iptables, Some(IptablesFlavor::Nft), true);
}

#[test]
fn iptables_nft_flavor_ipv4_only() {
    lifecycle(InpodBackend::Iptables, Some(IptablesFlavor::Nft), false);
}

#[test]
fn iptables_legacy_flavor_dual_stack() {
    lifecycle(InpodBackend::Iptables, Some(IptablesFlavor::Legacy), true);
}

#[test]
fn iptables_legacy_flavor_ipv4_only() {
    lifecycle(InpodBackend::Iptables, Some(IptablesFlavor::Legacy), false);
}

#[test]
fn nftables_dual_stack() {
    lifecycle(InpodBackend::Nftables, None, true);
}

#[test]
fn nftables_ipv4_only() {
    lifecycle(InpodBackend::Nftables, None, false);
}

/// The agent passes `/proc/self/fd/N` of a netns fd it holds: apply, check and remove work
/// through it with every backend (the legacy restore takes the pod-scoped xtables lock on that
/// file, which the child must be able to open).
fn via_fd(backend: InpodBackend, flavor: Option<IptablesFlavor>) {
    let ns = TestNetns::new();
    let file = std::fs::File::open(ns.path()).expect("open netns");
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let cfg = cfg(true);
    let pod = PodOverrides::default();
    let a = applier(backend, flavor);
    let applied = a
        .apply(&by_fd, &cfg, &pod)
        .expect("apply via /proc/self/fd");
    assert!(applied.changed);
    assert!(!a.apply(&by_fd, &cfg, &pod).expect("again").changed);
    assert_eq!(
        a.check(&by_fd, &cfg, &pod).expect("check"),
        Vec::<String>::new()
    );
    has_inpod_routing(&ns.path(), true);
    a.remove(&by_fd).expect("remove via fd");
    let after = snapshot(&ns.path());
    assert!(
        !after.contains("ISTIO_") && !after.contains("istio-ambient"),
        "{after}"
    );
}

#[test]
fn proc_self_fd_path_iptables_legacy() {
    via_fd(InpodBackend::Iptables, Some(IptablesFlavor::Legacy));
}

#[test]
fn proc_self_fd_path_iptables_nft() {
    via_fd(InpodBackend::Iptables, Some(IptablesFlavor::Nft));
}

#[test]
fn proc_self_fd_path_nftables() {
    via_fd(InpodBackend::Nftables, None);
}

/// Per-pod overrides reach the kernel: ingress mode has no inbound redirect, DNS off has no
/// raw table, a virtual interface gets its redirect.
#[test]
fn pod_overrides_are_applied() {
    let ns = TestNetns::new();
    let pod = PodOverrides {
        ingress_mode: true,
        dns: inpod::DnsOverride::Disabled,
        virtual_interfaces: vec!["net1".into()],
    };
    let a = applier(InpodBackend::Iptables, Some(IptablesFlavor::Nft));
    a.apply(&ns.path(), &cfg(false), &pod).expect("apply");
    let save = run_in(&ns.path(), "iptables-nft-save", &[], None);
    assert!(
        save.contains("-A ISTIO_PRERT -i net1 -p tcp -j REDIRECT --to-ports 15001"),
        "{save}"
    );
    assert!(!save.contains("--to-ports 15006"), "{save}");
    assert!(!save.contains("*raw"), "{save}");
    assert!(!save.contains("15053"), "{save}");
    // Switching the pod back to defaults is a repair, not an addition.
    let d = a
        .apply(&ns.path(), &cfg(false), &PodOverrides::default())
        .expect("defaults");
    assert!(d.changed);
    assert_eq!(
        a.check(&ns.path(), &cfg(false), &PodOverrides::default())
            .expect("check"),
        Vec::<String>::new()
    );
    let save = run_in(&ns.path(), "iptables-nft-save", &[], None);
    assert!(!save.contains("net1"), "{save}");
}

// ----- host probe SNAT ---------------------------------------------------------------------

use meshcni_netx::HostProbe;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const POD_V4: &str = "10.77.0.2";
const POD_V6: &str = "fd77::2";
const APP_PORT: u16 = 8080;

/// A "node" and a "pod" netns joined by a veth, /32 and /128 routes both ways (like the
/// testkit labs), IPv6 DAD off.
fn node_and_pod() -> (TestNetns, TestNetns) {
    let node = TestNetns::new();
    let pod = TestNetns::new();
    for ns in [&node, &pod] {
        for key in [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ] {
            run_in(&ns.path(), "sysctl", &["-qw", key], None);
        }
    }
    node.ip(&[
        "link", "add", "vn", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["addr", "add", "10.77.0.1/32", "dev", "vn"]);
    node.ip(&["-6", "addr", "add", "fd77::1/128", "dev", "vn", "nodad"]);
    node.ip(&["link", "set", "vn", "up"]);
    node.ip(&["route", "add", "10.77.0.2/32", "dev", "vn"]);
    node.ip(&["-6", "route", "add", "fd77::2/128", "dev", "vn"]);
    pod.ip(&["addr", "add", "10.77.0.2/32", "dev", "eth0"]);
    pod.ip(&["-6", "addr", "add", "fd77::2/128", "dev", "eth0", "nodad"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "10.77.0.1", "dev", "eth0"]);
    pod.ip(&["route", "add", "default", "via", "10.77.0.1", "dev", "eth0"]);
    pod.ip(&["-6", "route", "add", "fd77::1", "dev", "eth0"]);
    pod.ip(&[
        "-6", "route", "add", "default", "via", "fd77::1", "dev", "eth0",
    ]);
    (node, pod)
}

/// The pod's app: listens on `APP_PORT` (v4 and v6) inside the pod netns and answers every
/// connection with the peer address it sees.
fn start_app(pod: &TestNetns) {
    let listeners = meshcni_netx::run_in_netns(&pod.path(), || {
        let v4 = TcpListener::bind(("0.0.0.0", APP_PORT)).expect("bind v4");
        let v6 = socket_v6_only(APP_PORT);
        (v4, v6)
    })
    .expect("enter pod netns");
    for l in [listeners.0, listeners.1] {
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { return };
                let peer = conn
                    .peer_addr()
                    .map(|p| p.ip().to_string())
                    .unwrap_or_default();
                let _ = conn.write_all(peer.as_bytes());
            }
        });
    }
}

/// An IPv6-only listener on `[::]:port` (so the v4 listener can share the port).
fn socket_v6_only(port: u16) -> TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::Ipv6V6Only, &true).expect("v6only");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("reuseaddr");
    let addr = SockaddrIn6::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("bind v6");
    listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
    TcpListener::from(fd)
}

/// Connect from a socket created in the node netns; `Ok(peer address the app saw)`.
fn probe_from_node(node: &TestNetns, ip: &str) -> std::io::Result<String> {
    let target = SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), APP_PORT);
    meshcni_netx::run_in_netns(&node.path(), move || {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut seen = String::new();
        s.read_to_string(&mut seen)?;
        Ok(seen)
    })
    .expect("enter node netns")
}

fn node_snapshot(ns: &Path) -> String {
    format!(
        "{}## ipset\n{}",
        snapshot(ns),
        run_in(ns, "ipset", &["list"], None)
    )
}

fn host_probe_traffic(backend: InpodBackend, flavor: Option<IptablesFlavor>) {
    let (node, pod) = node_and_pod();
    // Foreign node state that must survive (kube-proxy style nat rules / an nft table).
    seed(&node.path(), backend, flavor);
    let cfg = InpodConfig::default();
    applier(backend, flavor)
        .apply(&pod.path(), &cfg, &PodOverrides::default())
        .expect("in-pod rules");
    start_app(&pod);

    // Before the host rule: the probe is captured (redirected to 15006, where nothing
    // listens) — the in-pod rules are live.
    for ip in [POD_V4, POD_V6] {
        let e = probe_from_node(&node, ip).expect_err("captured without the probe SNAT");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{ip}: {e}");
    }

    let before = node_snapshot(&node.path());
    let opts = IptablesOptions {
        force: flavor,
        ..IptablesOptions::default()
    };
    // As root the test's own sockets stand in for the kubelet: uid 0.
    let mut hp =
        HostProbe::open_with(&node.path(), &cfg, backend, Some(0), opts).expect("open host probe");
    hp.ensure_rules().expect("ensure rules");
    let installed = node_snapshot(&node.path());
    if let (InpodBackend::Iptables, Some(flavor)) = (backend, flavor) {
        for v6 in [false, true] {
            let save = run_in(&node.path(), &save_bin(flavor, v6), &["-t", "nat"], None);
            let first = save
                .lines()
                .find(|l| l.starts_with("-A POSTROUTING"))
                .unwrap_or_default();
            assert_eq!(first, "-A POSTROUTING -j ISTIO_POSTRT", "{save}");
            let rs = inpod::host_rules_iptables(&cfg);
            let fam = if v6 { Family::V6 } else { Family::V4 };
            let ours: BTreeMap<_, _> = chain_map(&save)
                .into_iter()
                .filter(|((_, c), _)| c == "ISTIO_POSTRT")
                .collect();
            let predicted: BTreeMap<_, _> = chain_map(&save_form::render(&rs, fam))
                .into_iter()
                .filter(|((_, c), _)| c == "ISTIO_POSTRT")
                .collect();
            assert_eq!(ours, predicted, "v6={v6}: the predicted -save form");
        }
    }
    // Rule handles, without counters: traffic the kernel sends by itself (IPv6 router and
    // multicast listener solicitations) moves them at any time.
    let handles =
        |ns: &Path| without_counters(&run_in(ns, "nft", &["-a", "list", "ruleset"], None));
    let h = handles(&node.path());
    hp.ensure_rules().expect("ensure again");
    assert_eq!(
        node_snapshot(&node.path()),
        installed,
        "ensure_rules twice: no change"
    );
    assert_eq!(handles(&node.path()), h, "nothing re-created");

    hp.upsert("uid-1", POD_V4.parse().expect("ip"))
        .expect("upsert v4");
    hp.upsert("uid-1", POD_V6.parse().expect("ip"))
        .expect("upsert v6");
    assert_eq!(
        hp.entries().expect("entries"),
        vec![
            (POD_V4.parse().expect("ip"), "uid-1".to_string()),
            (POD_V6.parse().expect("ip"), "uid-1".to_string()),
        ]
    );
    assert_eq!(
        probe_from_node(&node, POD_V4).expect("v4 probe"),
        "169.254.7.127"
    );
    assert_eq!(
        probe_from_node(&node, POD_V6).expect("v6 probe"),
        "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    );

    // A drifted rule is repaired and the entries survive the repair.
    match (backend, flavor) {
        (InpodBackend::Iptables, Some(flavor)) => {
            run_in(
                &node.path(),
                &bin(flavor, false),
                &["-t", "nat", "-F", "ISTIO_POSTRT"],
                None,
            );
        }
        _ => {
            run_in(
                &node.path(),
                "nft",
                &["flush", "chain", "inet", "istio-ambient-nat", "postrouting"],
                None,
            );
        }
    }
    assert!(
        probe_from_node(&node, POD_V4).is_err(),
        "rule gone: captured"
    );
    hp.ensure_rules().expect("repair");
    assert_eq!(
        probe_from_node(&node, POD_V4).expect("repaired"),
        "169.254.7.127"
    );
    assert_eq!(hp.entries().expect("entries").len(), 2);

    // Upsert replaces the comment; remove only deletes the entry of the named pod.
    hp.upsert("uid-2", POD_V4.parse().expect("ip"))
        .expect("re-upsert");
    hp.remove("uid-1", POD_V4.parse().expect("ip"))
        .expect("remove other uid");
    assert_eq!(
        hp.entries().expect("entries"),
        vec![
            (POD_V4.parse().expect("ip"), "uid-2".to_string()),
            (POD_V6.parse().expect("ip"), "uid-1".to_string()),
        ]
    );
    hp.remove("uid-2", POD_V4.parse().expect("ip"))
        .expect("remove v4");
    hp.remove("uid-1", POD_V6.parse().expect("ip"))
        .expect("remove v6");
    hp.remove("uid-1", POD_V6.parse().expect("ip"))
        .expect("remove twice");
    assert_eq!(hp.entries().expect("entries"), vec![]);
    for ip in [POD_V4, POD_V6] {
        let e = probe_from_node(&node, ip).expect_err("captured after remove");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{ip}: {e}");
    }

    assert!(hp.upsert("bad\"uid", POD_V4.parse().expect("ip")).is_err());

    hp.uninstall().expect("uninstall");
    assert_eq!(node_snapshot(&node.path()), before, "node as before");
    hp.uninstall().expect("uninstall twice");
    assert_eq!(node_snapshot(&node.path()), before);
}

#[test]
fn host_probe_snat_iptables_nft_flavor() {
    host_probe_traffic(InpodBackend::Iptables, Some(IptablesFlavor::Nft));
}

#[test]
fn host_probe_snat_iptables_legacy_flavor() {
    host_probe_traffic(InpodBackend::Iptables, Some(IptablesFlavor::Legacy));
}

#[test]
fn host_probe_snat_nftables() {
    host_probe_traffic(InpodBackend::Nftables, None);
}

#[test]
fn host_probe_nftables_needs_the_kubelet_uid() {
    let node = TestNetns::new();
    let err = HostProbe::open(
        &node.path(),
        &InpodConfig::default(),
        InpodBackend::Nftables,
        None,
    )
    .expect_err("no kubelet uid");
    assert!(err.to_string().contains("kubelet"), "{err}");
}

/// `nft list` text with every `counter packets N bytes M` reduced to `counter`.
fn without_counters(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    for line in listing.lines() {
        let mut words: Vec<&str> = Vec::new();
        let mut it = line.split(' ').peekable();
        while let Some(w) = it.next() {
            if w == "packets" || w == "bytes" {
                it.next();
                continue;
            }
            words.push(w);
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}
