//! A ztunnel restart seen on the dataplane (issue 7): the real agent binary in a lab node netns
//! (`iptables` mode), pods `a` (ambient) and `n` (plain) probing each other with a new TCP
//! connection every millisecond in both directions while the ztunnel pod is replaced (old
//! stand-in stopped, new pod with a new netns, IP and veth in the workloads file). Every probe
//! that got an answer must have gone through a ztunnel stand-in (old or new): escaped == 0.
//! The gap (how long new connections could not get through promptly) is printed: it is a
//! benchmark figure (`scripts/bench-ambient.sh`), not asserted.
//!
//! Needs root; fails (never skips) without it. Lab netns are deleted on success and failure.

use std::path::PathBuf;
use std::time::Duration;

use meshcni_testkit::ambient_bench::AmbientBenchLab;

#[test]
fn no_connection_escapes_capture_during_a_ztunnel_restart() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, iptables)"
    );
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"));
    let plugin = agent.with_file_name("meshcni");
    let mut lab = AmbientBenchLab::start(&agent, &plugin, "zrs", 0).expect("lab");
    let interval = Duration::from_millis(1);
    let report = lab
        .restart_ztunnel(
            interval,
            Duration::from_millis(300),
            Duration::from_millis(700),
        )
        .expect("restart");
    assert!(
        report.agent_switch.is_some(),
        "the agent never switched to the new ztunnel; log:\n{}",
        lab.agent.log()
    );
    for d in &report.directions {
        if std::env::var_os("MESHCNI_PROBE_TIMELINE").is_some() {
            let mut buckets: std::collections::BTreeMap<i128, (u32, u32, u32)> = Default::default();
            for p in &d.probes {
                let rel = p.started.as_millis() as i128 - d.restart_at.as_millis() as i128;
                let b = buckets.entry(rel.div_euclid(50) * 50).or_default();
                match (&p.reply, p.took) {
                    (Err(_), _) => b.2 += 1,
                    (Ok(_), Some(t)) if t > Duration::from_millis(500) => b.1 += 1,
                    _ => b.0 += 1,
                }
            }
            for (ms, (ok, delayed, failed)) in buckets {
                eprintln!(
                    "  {ms:>6} ms after restart: ok {ok:>3} delayed {delayed:>3} failed {failed:>3}"
                );
            }
        }
        eprintln!(
            "{}: {} probes (spacing p99 {:?}, max {:?}), via old {}, via new {}, failed {} ({} in the gap), delayed {} ({} in the gap), escaped {}, gap {:?}; agent switch after {:?}",
            d.name,
            d.probes.len(),
            d.p99_spacing,
            d.max_spacing,
            d.via_old,
            d.via_new,
            d.failed,
            d.failed_in_gap,
            d.delayed,
            d.delayed_in_gap,
            d.escaped.len(),
            d.gap,
            report.agent_switch
        );
        assert!(
            d.escaped.is_empty(),
            "{}: {} connections escaped capture: {:?}",
            d.name,
            d.escaped.len(),
            &d.escaped[..d.escaped.len().min(5)]
        );
        // The probes covered the restart: answered through the old ztunnel before it and
        // through the new one after it.
        assert!(d.via_old > 0 && d.via_new > 0, "{}: {d:?}", d.name);
    }
}
