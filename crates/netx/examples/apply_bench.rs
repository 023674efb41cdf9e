//! Times `Applier::apply_capture` for Istio's `tproxy.golden` (v4 + v6 restore text + 5 routing
//! objects) in fresh network namespaces, per iptables flavor. Needs root.
//!
//! `cargo run -p meshcni-netx --example apply_bench --release -- 20`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meshcni_netx::{
    Applier, ApplyPlan, Backend, IptablesFlavor, IptablesOptions, RoutesPlan, TproxyRouting,
};

fn golden() -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio/istio-iptables-capture/tproxy.golden");
    let text = std::fs::read_to_string(path).expect("read golden");
    let (mut v4, mut v6, mut seen, mut in_v6) = (String::new(), String::new(), Vec::new(), false);
    for line in text.lines().filter(|l| !l.ends_with("tables-save")) {
        if let Some(t) = line.strip_prefix('*') {
            let t = t.trim().to_string();
            in_v6 |= seen.contains(&t);
            seen.push(t);
        }
        let out = if in_v6 { &mut v6 } else { &mut v4 };
        out.push_str(line);
        out.push('\n');
    }
    (v4, v6)
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args:?} failed");
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let (v4, v6) = golden();
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
    for force in [
        None,
        Some(IptablesFlavor::Nft),
        Some(IptablesFlavor::Legacy),
    ] {
        let applier = Applier {
            backend: Backend::Iptables,
            iptables: IptablesOptions {
                force,
                ..IptablesOptions::default()
            },
        };
        let mut times: Vec<Duration> = Vec::new();
        for i in 0..n {
            let name = format!("mcni-bench-{}-{i}", std::process::id());
            ip(&["netns", "add", &name]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            let start = Instant::now();
            let result = applier.apply_capture(Path::new(&format!("/run/netns/{name}")), &plan);
            times.push(start.elapsed());
            ip(&["netns", "del", &name]);
            result.expect("apply");
        }
        times.sort();
        println!(
            "force={force:?}: n={n} min={:?} median={:?} max={:?}",
            times[0],
            times[n / 2],
            times[n - 1]
        );
    }
}
