//! Demo section "sidecar mode": bookinfo-style pods started through the plugin, the rules it
//! wrote (shown as Istio's docs show them), and a table of flows with where each was captured.
//!
//! Pods (namespace `bookinfo`):
//! * `productpage` — injected, defaults (REDIRECT), DNS capture on (`ISTIO_META_DNS_CAPTURE`);
//! * `reviews` — injected, `interceptionMode: TPROXY`, `excludeOutboundPorts: 5432`;
//! * `legacy` — not injected (no `sidecar.istio.io/status`): the plugin leaves it alone;
//! * `db` — not injected; a "database" on 5432 and a DNS server on 53.

use crate::error::DemoError;
use crate::flows::{Expect, Flow, Mesh, PROXY_ID, Proto, Row, table};
use crate::node::{Node, PodDef, exec_in};
use crate::{heading, indent};

const APP_PORT: u16 = 9080;
const DB_PORT: u16 = 5432;

/// The section's pods.
pub fn pods() -> Vec<PodDef> {
    vec![
        PodDef::injected("productpage", "injected, REDIRECT, DNS capture on")
            .env("ISTIO_META_DNS_CAPTURE", "true"),
        PodDef::injected("reviews", "injected, TPROXY, excludeOutboundPorts 5432")
            .annotate("sidecar.istio.io/interceptionMode", "TPROXY")
            .annotate(
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                DB_PORT.to_string(),
            ),
        PodDef::plain("legacy", "not injected"),
        PodDef::plain("db", "not injected; tcp/5432 + dns/53"),
    ]
}

/// The flows and where each must land.
pub fn flows() -> Vec<Flow> {
    let tcp = |name, from, uid, to, port, expect| Flow {
        name,
        from,
        uid,
        to,
        port,
        proto: Proto::Tcp,
        expect,
    };
    let sidecar = |pod, port| Expect::Sidecar { pod, port };
    vec![
        tcp(
            "app→service",
            "productpage",
            None,
            "reviews",
            APP_PORT,
            sidecar("productpage", 15001),
        ),
        tcp(
            "app→db",
            "productpage",
            None,
            "db",
            DB_PORT,
            sidecar("productpage", 15001),
        ),
        tcp(
            "app→excluded port",
            "reviews",
            None,
            "db",
            DB_PORT,
            Expect::Server,
        ),
        tcp(
            "proxy→service (mesh hop)",
            "productpage",
            Some(PROXY_ID),
            "reviews",
            APP_PORT,
            sidecar("reviews", 15006),
        ),
        tcp(
            "proxy→db",
            "productpage",
            Some(PROXY_ID),
            "db",
            DB_PORT,
            Expect::Server,
        ),
        tcp(
            "inbound to app",
            "legacy",
            None,
            "productpage",
            APP_PORT,
            sidecar("productpage", 15006),
        ),
        tcp("legacy→db", "legacy", None, "db", DB_PORT, Expect::Server),
        Flow {
            name: "app DNS lookup",
            from: "productpage",
            uid: None,
            to: "db",
            port: 53,
            proto: Proto::DnsUdp("reviews.bookinfo.svc.cluster.local"),
            expect: sidecar("productpage", 15053),
        },
        Flow {
            name: "legacy DNS lookup",
            from: "legacy",
            uid: None,
            to: "db",
            port: 53,
            proto: Proto::DnsUdp("db.bookinfo.svc.cluster.local"),
            expect: Expect::Server,
        },
    ]
}

/// Run the section on `node`; returns the flow rows.
pub fn run(node: &mut Node) -> Result<Vec<Row>, DemoError> {
    heading(
        "1. pods started through the plugin (cnitool add; conflist: bridge+host-local → portmap → meshcni)",
    );
    println!(
        "{:<12} {:<14} {:<11} {:<6} {:<44} meshcni decision (from its log)",
        "pod", "ip", "gateway", "cni", "what it is"
    );
    for def in pods() {
        let pod = node.start_pod(def)?;
        println!(
            "{:<12} {:<14} {:<11} {:<6} {:<44} {}",
            pod.def.name, pod.cidr, pod.gateway, pod.cni_version, pod.def.note, pod.decision
        );
    }

    let productpage = node.pod("productpage")?;
    heading(&format!(
        "2. rules meshcni installed in productpage (netns {}): iptables-save -t nat",
        productpage.ns.name()
    ));
    indent(&saved_table(node, "productpage", "nat")?);
    println!(
        "\n   reviews (TPROXY inbound): iptables-save -t mangle; ip rule; ip route show table 133"
    );
    indent(&saved_table(node, "reviews", "mangle")?);
    let reviews = node.pod("reviews")?;
    indent(&exec_in(&reviews.ns, "ip", &["rule", "show"])?);
    indent(&exec_in(
        &reviews.ns,
        "ip",
        &["route", "show", "table", "133"],
    )?);
    let legacy = node.pod("legacy")?;
    let legacy_rules = all_saves(node, "legacy")?;
    println!(
        "   legacy (not injected): {}",
        if legacy_rules.contains("ISTIO") {
            "UNEXPECTED: has ISTIO rules".to_string()
        } else {
            format!("no rules in netns {}", legacy.ns.name())
        }
    );

    let mut mesh = Mesh::default();
    for name in ["productpage", "reviews"] {
        let pod = node.pod(name)?;
        mesh.start_sidecar(pod)?;
        mesh.start_server(pod, APP_PORT)?;
    }
    let db = node.pod("db")?;
    mesh.start_server(db, DB_PORT)?;
    mesh.start_dns_server(db)?;

    heading(
        "3. flows (sidecar stand-ins run as uid 1337 on 15001/15006/15053 and record original destinations)",
    );
    let mut rows = Vec::new();
    for flow in flows() {
        rows.push(mesh.run(node, &flow)?);
    }
    print!("{}", table(&rows));
    Ok(rows)
}

/// `iptables-save -t <table>` of `pod` from whichever iptables flavor holds the capture.
fn saved_table(node: &Node, pod: &str, table: &str) -> Result<String, DemoError> {
    let pod = node.pod(pod)?;
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let text = exec_in(&pod.ns, save, &["-t", table])?;
        if text.contains("ISTIO") {
            return Ok(text);
        }
    }
    Err(DemoError::Unexpected(format!(
        "no ISTIO rules in the {table} table of {} (netns {})",
        pod.def.name,
        pod.ns.name()
    )))
}

fn all_saves(node: &Node, pod: &str) -> Result<String, DemoError> {
    let pod = node.pod(pod)?;
    let mut all = String::new();
    for save in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        all.push_str(&exec_in(&pod.ns, save, &[])?);
    }
    all.push_str(&exec_in(&pod.ns, "nft", &["list", "ruleset"])?);
    Ok(all)
}
