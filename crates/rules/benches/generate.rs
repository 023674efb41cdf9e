//! Build + render cost of the sidecar capture rules, both backends.
//!
//! `typical`: what the CNI plugin produces for an ordinary injected pod (REDIRECT, all inbound
//! ports, all outbound ranges, the usual status-port exclusions). `largest`: the biggest
//! configuration of the golden corpus (`tproxy`, dual-stack with DNS) plus extra lists.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use meshcni_rules::iptables::{self, Family};
use meshcni_rules::nft;
use meshcni_rules::sidecar::{self, CaptureConfig};

fn typical() -> CaptureConfig {
    CaptureConfig {
        inbound_ports_include: "*".into(),
        inbound_ports_exclude: "15090,15021,15020".into(),
        outbound_ip_ranges_include: "*".into(),
        ..CaptureConfig::default()
    }
}

fn largest() -> CaptureConfig {
    CaptureConfig {
        inbound_interception_mode: "TPROXY".into(),
        inbound_ports_include: "*".into(),
        inbound_ports_exclude: "15090,15021,15020".into(),
        outbound_ports_include: "32000,31000".into(),
        outbound_ports_exclude: "9000,9001".into(),
        outbound_ip_ranges_exclude: "1.1.0.0/16,2001:db8::/32".into(),
        outbound_ip_ranges_include: "9.9.0.0/16,10.0.0.0/8,fd00::/8".into(),
        reroute_virtual_interfaces: "eth1,eth2".into(),
        exclude_interfaces: "not-istio-nic".into(),
        proxy_uid: "3,4".into(),
        proxy_gid: "1,2".into(),
        redirect_dns: true,
        dns_servers_v4: vec!["127.0.0.53".into()],
        dns_servers_v6: vec!["::127.0.0.53".into()],
        drop_invalid: true,
        enable_ipv6: true,
        ..CaptureConfig::default()
    }
}

fn bench(c: &mut Criterion) {
    for (name, cfg) in [("typical", typical()), ("largest", largest())] {
        let rs = sidecar::build(&cfg).expect("bench config is valid");
        eprintln!("{name}: {} rules", rs.rules.len());
        c.bench_function(&format!("{name}/build"), |b| {
            b.iter(|| sidecar::build(black_box(&cfg)))
        });
        c.bench_function(&format!("{name}/build+iptables(v4+v6)"), |b| {
            b.iter(|| {
                let rs = sidecar::build(black_box(&cfg)).expect("valid");
                let v4 = iptables::render_restore(&rs, Family::V4);
                let v6 = iptables::render_restore(&rs, Family::V6);
                (v4, v6)
            })
        });
        c.bench_function(&format!("{name}/build+nft"), |b| {
            b.iter(|| {
                let rs = sidecar::build(black_box(&cfg)).expect("valid");
                nft::render(&rs)
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
