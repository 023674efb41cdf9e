//! Times the ambient in-pod apply (product defaults: dual-stack, DNS capture) in fresh network
//! namespaces per backend: the first apply, the repeated apply (verified, nothing run), the
//! removal; and the host-probe entry upsert. Needs root. Prints median / p90 in ms.
//!
//! `cargo run -p meshcni-netx --example inpod_rules_bench --release -- 50`

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshcni_netx::iptables::IptablesOptions;
use meshcni_netx::{HostProbe, InpodApplier, InpodBackend, IptablesFlavor};
use meshcni_rules::inpod::{InpodConfig, PodOverrides};

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args:?} failed");
}

struct Ns(String);

impl Ns {
    fn new(tag: &str, i: usize) -> Ns {
        let name = format!("mcni-ipb-{}-{tag}-{i}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!("{:.2} / {:.2}", ms(p(0.5)), ms(p(0.9)))
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let cfg = InpodConfig::default();
    let pod = PodOverrides::default();
    println!("| backend | first apply | repeated apply | remove | host-probe upsert |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, backend, force) in [
        (
            "iptables (nft flavor)",
            InpodBackend::Iptables,
            Some(IptablesFlavor::Nft),
        ),
        (
            "iptables (detected: nft here)",
            InpodBackend::Iptables,
            None,
        ),
        (
            "iptables (legacy flavor)",
            InpodBackend::Iptables,
            Some(IptablesFlavor::Legacy),
        ),
        ("native nftables", InpodBackend::Nftables, None),
    ] {
        let a = InpodApplier {
            backend,
            iptables: IptablesOptions {
                force,
                ..IptablesOptions::default()
            },
        };
        if force.is_none() && backend == InpodBackend::Iptables {
            // The detected row is the agent's default; it only means something if nft is what
            // detection picks here.
            let ns = Ns::new("detect", 0);
            let flavor = meshcni_netx::with_netns(&ns.path(), |h| {
                meshcni_netx::iptables::detect_fast_here(h, &IptablesOptions::default())
                    .map(|d| d.flavor)
            })
            .expect("enter netns")
            .expect("detect");
            assert_eq!(
                flavor,
                IptablesFlavor::Nft,
                "detection does not pick nft here"
            );
        }
        let (mut first, mut again, mut remove) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let ns = Ns::new("pod", i);
            let (d, r) = time(|| a.apply(&ns.path(), &cfg, &pod));
            assert!(r.expect("apply").changed);
            first.push(d);
            let (d, r) = time(|| a.apply(&ns.path(), &cfg, &pod));
            assert!(!r.expect("re-apply").changed);
            again.push(d);
            let (d, r) = time(|| a.remove(&ns.path()));
            r.expect("remove");
            remove.push(d);
        }
        let node = Ns::new("node", 0);
        let mut hp = HostProbe::open_with(
            Path::new(&node.path()),
            &cfg,
            backend,
            Some(0),
            IptablesOptions {
                force,
                ..IptablesOptions::default()
            },
        )
        .expect("host probe");
        hp.ensure_rules().expect("host rules");
        let mut upsert = Vec::new();
        for i in 0..n {
            let addr: IpAddr = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .expect("ip");
            let (d, r) = time(|| hp.upsert(&format!("uid-{i}"), addr));
            r.expect("upsert");
            upsert.push(d);
        }
        hp.uninstall().expect("uninstall");
        println!(
            "| {label} | {} | {} | {} | {} |",
            stats(first),
            stats(again),
            stats(remove),
            stats(upsert)
        );
    }
}
