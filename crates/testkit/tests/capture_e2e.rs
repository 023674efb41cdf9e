//! End to end through both crates: Istio's own TPROXY golden rules applied by
//! `meshcni_netx::Applier` (with the §2.3 step 20 routes) inside a "sidecar pod" netns, then
//! real TCP from another pod lands on the proxy stand-in with the original destination intact.
//! Needs root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use meshcni_netx::iptables::{self, IptablesFlavor, IptablesOptions};
use meshcni_netx::{Applier, ApplyPlan, Backend, IpFamily, RoutesPlan, TproxyRouting};
use meshcni_testkit::lab::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};
use meshcni_testkit::{ConnectOpts, Lab, TransparentProxy, connect_text};

/// Split a HEAD golden into (v4, v6) restore text: v6 starts when a table repeats.
fn golden(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio/istio-iptables-capture")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read golden");
    let (mut v4, mut v6) = (String::new(), String::new());
    let mut seen: Vec<String> = Vec::new();
    let mut in_v6 = false;
    for line in text.lines().filter(|l| !l.ends_with("tables-save")) {
        if let Some(table) = line.strip_prefix('*') {
            let table = table.trim().to_string();
            if seen.contains(&table) {
                in_v6 = true;
            }
            seen.push(table);
        }
        let out = if in_v6 { &mut v6 } else { &mut v4 };
        out.push_str(line);
        out.push('\n');
    }
    (v4, v6)
}

#[test]
fn istio_tproxy_golden_captures_inbound_and_outbound() {
    let lab = Lab::new("e2e").expect("lab");
    let pod = &lab.server;
    let proxy = TransparentProxy::start(pod).expect("proxy");
    let (v4, v6) = golden("tproxy.golden");
    let plan = ApplyPlan {
        v4_restore: v4,
        v6_restore: Some(v6),
        nft: None,
        routes: RoutesPlan::sidecar(
            true,
            Some(TproxyRouting {
                mark: 1337,
                table: 133,
            }),
        ),
        owned: None,
    };
    let applier = Applier {
        backend: Backend::Iptables,
        iptables: IptablesOptions::default(),
    };
    let started = Instant::now();
    let applied = applier
        .apply_capture(pod.path(), &plan)
        .expect("apply capture");
    let took = started.elapsed();
    eprintln!("apply_capture(tproxy golden, v4+v6, 5 routing objects): {took:?}");
    assert_eq!(
        applied.flavor,
        Some(IptablesFlavor::Nft),
        "fresh netns → nft"
    );
    assert_eq!(applied.routes_created, 5);
    let saved = iptables::save(pod.path(), IptablesFlavor::Nft, IpFamily::V4).expect("save");
    assert!(saved.contains("-j TPROXY --on-port 15006"), "{saved}");

    // Inbound: nothing listens on 8080 in the pod; TPROXY hands it to 15006 with the original
    // destination as local address and the client's address as peer.
    let got = connect_text(
        &lab.client,
        SocketAddr::new(SERVER_V4.into(), 8080),
        &ConnectOpts::default(),
    )
    .expect("inbound v4");
    assert_eq!(
        got,
        format!("proxied-by:15006 orig:{SERVER_V4}:8080\nhello\n")
    );
    let got = connect_text(
        &lab.client,
        SocketAddr::new(SERVER_V6.into(), 8080),
        &ConnectOpts::default(),
    )
    .expect("inbound v6");
    assert_eq!(
        got,
        format!("proxied-by:15006 orig:[{SERVER_V6}]:8080\nhello\n")
    );

    // Outbound: 9.9.0.0/16 is captured to 15001 (REDIRECT → SO_ORIGINAL_DST).
    let outside = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(9, 9, 1, 1)), 80);
    let got = connect_text(pod, outside, &ConnectOpts::default()).expect("outbound");
    assert_eq!(got, "proxied-by:15001 orig:9.9.1.1:80\nhello\n");
    // The proxy's own uid is not captured: the connection really goes out (and, with nobody
    // at 9.9.1.1, times out instead of reaching the proxy).
    let as_proxy = ConnectOpts {
        uid: Some(1337),
        timeout: Duration::from_millis(300),
        ..ConnectOpts::default()
    };
    assert!(
        connect_text(pod, outside, &as_proxy).is_err(),
        "uid 1337 must bypass capture"
    );

    let conns = proxy
        .wait_for_connections(3, Duration::from_secs(2))
        .expect("recorded");
    assert_eq!(conns.len(), 3, "{conns:?}");
    assert_eq!(
        (conns[0].listener_port, conns[0].peer.ip()),
        (15006, IpAddr::V4(CLIENT_V4))
    );
    assert_eq!(
        (conns[1].listener_port, conns[1].peer.ip()),
        (15006, IpAddr::V6(CLIENT_V6))
    );
    assert_eq!(conns[2].listener_port, 15001);
    assert_eq!(conns[2].nat_original_dst, Some(outside));
}
