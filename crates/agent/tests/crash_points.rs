//! Crash consistency of the ambient `iptables` redirect mode (issue 8 items 1–4): the real
//! `meshcni-agent` is killed (SIGKILL, via `MESHCNI_CRASH_AT=<point>:<n>`, compiled into debug
//! builds) at every named point between the steps of install, enrollment, sysctl bookkeeping,
//! release and uninstall. After each kill:
//!
//! * install / enroll / release points: a restarted agent converges — every ambient pod has its
//!   ipset entry, its table-100 route and `rp_filter=0` on its veth, no other pod has any —
//!   inbound traffic to the real ambient pods goes through the ztunnel stand-in, and an
//!   uninstall leaves the node and ztunnel netns byte-identical to before the agent first ran
//!   (the operator's non-default sysctls included);
//! * uninstall points: `meshcni-agent uninstall` finishes the job with the same 0-byte result.
//!
//! Needs root; fails (never skips) without it. See `crash_lab/mod.rs` for the lab.

mod crash_lab;

use std::path::Path;
use std::time::Duration;

use crash_lab::{CrashLab, binaries_near, killed};

const T: Duration = Duration::from_secs(30);

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Restart, converge, check traffic, uninstall, check residue.
fn recover_and_uninstall(lab: &CrashLab, point: &str, ambient: &[String]) {
    let mut agent = lab.start(None);
    agent
        .wait_ready(T)
        .unwrap_or_else(|e| panic!("{point}: restarted agent not ready: {e}"));
    if let Err(v) = lab.converge(ambient, T) {
        panic!(
            "{point}: not converged after restart:\n{}\nlog:\n{}",
            v.join("\n"),
            agent.log()
        );
    }
    for real in crash_lab::REAL {
        if ambient.iter().any(|a| a == real) {
            lab.inbound_captured(real)
                .unwrap_or_else(|e| panic!("{point}: {e}"));
        }
    }
    lab.uninstall_marker();
    let status = agent.terminate(T).expect("SIGTERM");
    assert!(
        status.success(),
        "{point}: uninstall exit {status:?}\n{}",
        agent.log()
    );
    let (bytes, diff) = lab.residue();
    assert_eq!(bytes, 0, "{point}: uninstall left residue:\n{diff}");
    assert!(
        !lab.dirs.run.join("iptables-mode.json").exists(),
        "{point}: state file left"
    );
}

fn expect_killed(agent: &mut meshcni_testkit::stack::Agent, point: &str) {
    match agent.wait_exit(T).expect("wait") {
        Some(s) if killed(&s) => {}
        Some(s) => panic!(
            "{point}: agent exited ({s:?}) without reaching the point\n{}",
            agent.log()
        ),
        None => panic!(
            "{point}: crash point never reached within {T:?}\n{}",
            agent.log()
        ),
    }
}

#[test]
fn killed_at_every_crash_point_the_agent_recovers_and_uninstalls_without_residue() {
    let (agent_bin, plugin) = binaries_near(Path::new(env!("CARGO_BIN_EXE_meshcni-agent")));
    let mut lab = CrashLab::new("crp", agent_bin, plugin, 4);
    let initial = names(&["a", "s0", "s1", "s2"]);
    let changed = names(&["a", "b", "s0", "s3"]); // s1, s2 released; b, s3 enrolled

    // First start: install + initial enrollment.
    for point in [
        "state-before-rename:1",
        "install-after-chains:1",
        "install-after-tunnels:1",
        "install-before-ztunnel-netns:1",
        "ztunnel-after-tables-saved:1",
        "sysctl-after-save:1",
        "sysctl-after-save:2",
        "sysctl-after-save:3",
        "sysctl-before-write:1",
        "sysctl-after-write:1",
        "sysctl-before-write:12",
        "enroll-after-ipset:1",
        "enroll-after-ipset:3",
        "enroll-after-route:1",
        "enroll-after-route:4",
        "sysctl-after-write:14",
    ] {
        lab.next_round();
        lab.write_workloads(&initial);
        let mut agent = lab.start(Some(point));
        expect_killed(&mut agent, point);
        recover_and_uninstall(&lab, point, &initial);
    }

    // A running node whose pods change while the agent is down: releases and enrollments.
    for point in [
        "release-after-route:1",
        "release-after-route:2",
        "enroll-after-ipset:1",
        "enroll-after-route:2",
        "sysctl-before-write:1",
        "state-before-rename:1",
    ] {
        lab.next_round();
        lab.write_workloads(&initial);
        let mut agent = lab.start(None);
        agent.wait_ready(T).expect("ready");
        lab.converge(&initial, T)
            .unwrap_or_else(|v| panic!("{point}: {}", v.join("\n")));
        assert!(agent.terminate(T).expect("SIGTERM").success());
        lab.write_workloads(&changed);
        let mut agent = lab.start(Some(point));
        expect_killed(&mut agent, point);
        recover_and_uninstall(&lab, point, &changed);
    }

    // Uninstall cut short: `meshcni-agent uninstall` completes it.
    for point in [
        "uninstall-after-ztunnel-netns:1",
        "uninstall-after-chains:1",
        "uninstall-after-links:1",
        "uninstall-mid-sysctls:1",
        "uninstall-mid-sysctls:2",
        "uninstall-before-state-remove:1",
    ] {
        lab.next_round();
        lab.write_workloads(&initial);
        let mut agent = lab.start(Some(point));
        agent.wait_ready(T).expect("ready");
        lab.converge(&initial, T)
            .unwrap_or_else(|v| panic!("{point}: {}", v.join("\n")));
        lab.uninstall_marker();
        let status = agent.terminate(T).expect("SIGTERM");
        assert!(
            killed(&status),
            "{point}: uninstall not killed: {status:?}\n{}",
            agent.log()
        );
        let (bytes, _) = lab.residue();
        if point.starts_with("uninstall-before-state-remove") {
            // The dataplane is clean already; only the state file is left to remove.
            assert!(lab.dirs.run.join("iptables-mode.json").exists(), "{point}");
        } else {
            assert!(
                bytes > 0,
                "{point}: the kill should have left something to clean"
            );
        }
        let log = lab
            .run_uninstall()
            .unwrap_or_else(|e| panic!("{point}: uninstall after the kill: {e}"));
        let (bytes, diff) = lab.residue();
        assert_eq!(
            bytes, 0,
            "{point}: residue after `meshcni-agent uninstall`:\n{diff}\n{log}"
        );
        assert!(
            !lab.dirs.run.join("iptables-mode.json").exists(),
            "{point}: state file left"
        );
    }
}
