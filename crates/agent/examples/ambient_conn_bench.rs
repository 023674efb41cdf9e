//! Connection setup rate and added latency of the ambient `iptables` redirect mode, measured
//! in the two-node traffic lab (`tests/ambient_mesh`): N sequential exchanges (connect, send
//! a line, half-close, read the reply to EOF) from one thread inside the client pod, for a
//! direct path and the same path captured through the ztunnel stand-in; plus the stand-in's
//! own floor (a CONNECT to the stand-in on loopback inside the ztunnel netns vs a direct
//! loopback connection).
//!
//! Run as root: `cargo run -p meshcni-agent --example ambient_conn_bench --release -- [N]`
//! (default N = 500).

#[path = "../tests/ambient_mesh/mod.rs"]
mod ambient_mesh;

use std::net::SocketAddr;
use std::time::Duration;

use ambient_mesh::Mesh;
use meshcni_testkit::Netns;
use meshcni_testkit::multinode::{EchoServer, timed_exchanges};

/// Port of the bench servers ([`EchoServer`]: blocking accept, so no polling interval is
/// measured; the harness's `TcpServer`s on 8080 poll accept every 5 ms).
const BENCH_PORT: u16 = 8090;

struct Stats {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn stats(mut times: Vec<Duration>) -> Stats {
    let total: Duration = times.iter().sum();
    times.sort();
    let pick = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times[i.min(times.len() - 1)]
    };
    Stats {
        rate: times.len() as f64 / total.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

fn run(ns: &Netns, to: SocketAddr, n: usize, payload: &[u8]) -> Stats {
    // Warm-up (ARP, neighbour entries, first-thread costs), not counted.
    timed_exchanges(ns, to, 20, payload, 2).expect("warm-up");
    stats(timed_exchanges(ns, to, n, payload, 2).expect("exchanges"))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(name: &str, s: &Stats, base: Option<&Stats>) {
    let added = base.map_or(String::from("-"), |b| {
        format!(
            "{:+.0} / {:+.0}",
            us(s.p50) - us(b.p50),
            us(s.p99) - us(b.p99)
        )
    });
    println!(
        "| {name} | {:.0} | {:.0} | {:.0} | {added} |",
        s.rate,
        us(s.p50),
        us(s.p99)
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number"))
        .unwrap_or(500);
    let m = Mesh::new("bench");
    let payload = b"ping\n";
    let _servers: Vec<EchoServer> = ["o", "d", "e", "c"]
        .iter()
        .map(|p| EchoServer::start(&m.pod(p).netns, m.pod(p).addr(BENCH_PORT)).expect("server"))
        .collect();
    let to = |pod: &str| m.pod(pod).addr(BENCH_PORT);

    // Same node: b → o is direct (neither enrolled), a → o is captured (15001 hop, spoofed
    // upstream), a → d is captured → captured (15001 → HBONE hairpin → 15008).
    let direct_same = run(&m.pod("b").netns, to("o"), n, payload);
    let capt_same = run(&m.pod("a").netns, to("o"), n, payload);
    let c2c_same = run(&m.pod("a").netns, to("d"), n, payload);
    // Across nodes: b → e direct, a → e captured, a → c captured → captured (two stand-ins).
    let direct_x = run(&m.pod("b").netns, to("e"), n, payload);
    let capt_x = run(&m.pod("a").netns, to("e"), n, payload);
    let c2c_x = run(&m.pod("a").netns, to("c"), n, payload);

    // The stand-in's own floor, on loopback inside ztunnel pod 1.
    let zt = &m.lab.node(1).ztunnel.netns;
    let target: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
    let _target = EchoServer::start(zt, target).expect("loopback target");
    let lo_direct = run(zt, target, n, payload);
    let hbone: SocketAddr = "127.0.0.1:15008".parse().expect("addr");
    let lo_standin = run(zt, hbone, n, b"CONNECT 127.0.0.1:9000 127.0.0.2\nping\n");

    println!("N = {n} sequential exchanges per row (connect + 5 bytes + half-close + read to EOF)");
    println!();
    println!("| path | conn/s | p50 µs | p99 µs | added p50 / p99 µs |");
    println!("|---|---|---|---|---|");
    row("same node, direct (b→o)", &direct_same, None);
    row(
        "same node, captured→plain (a→o)",
        &capt_same,
        Some(&direct_same),
    );
    row(
        "same node, captured→captured (a→d)",
        &c2c_same,
        Some(&direct_same),
    );
    row("cross node, direct (b→e)", &direct_x, None);
    row("cross node, captured→plain (a→e)", &capt_x, Some(&direct_x));
    row(
        "cross node, captured→captured (a→c)",
        &c2c_x,
        Some(&direct_x),
    );
    row("ztunnel netns loopback, direct", &lo_direct, None);
    row(
        "ztunnel netns loopback, via stand-in 15008",
        &lo_standin,
        Some(&lo_direct),
    );
}
