//! The rendered text is accepted by the real tools and the cleanup text removes all of it.
//!
//! Needs root, iproute2, iptables (legacy and nft variants) and nft. Each backend gets its own
//! network namespace named `mcni-rules-<pid>-<n>`, deleted on drop; nothing touches the host
//! netns. Every fixture configuration (plus a few extra ones) is applied, checked, and removed
//! again in the same namespace, so leftovers from one case would break the next.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use meshcni_rules::iptables::{self, Family};
use meshcni_rules::nft;
use meshcni_rules::sidecar::{self, CaptureConfig, RuleSet};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "mcni-rules-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add (needs iproute2)");
        assert!(st.success(), "ip netns add {name} failed (needs root)");
        Netns(name)
    }

    /// Run `prog args` inside the namespace with `stdin`; returns (success, stdout, stderr).
    fn run(&self, prog: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, prog])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, prog: &str, args: &[&str], stdin: &str, what: &str) -> String {
        let (ok, out, err) = self.run(prog, args, stdin);
        assert!(ok, "{what}: {prog} {args:?} failed: {err}\ninput:\n{stdin}");
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn configs() -> Vec<(String, CaptureConfig)> {
    let mut v: Vec<(String, CaptureConfig)> = common::load_cases("istio-nftables-capture")
        .into_iter()
        .map(|c| (c.name, numeric_groups(c.config)))
        .collect();
    v.push((
        "everything".into(),
        CaptureConfig {
            inbound_interception_mode: "TPROXY".into(),
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15020,15021".into(),
            outbound_ports_include: "8080".into(),
            outbound_ports_exclude: "9000".into(),
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: "10.96.0.0/12,fd00::/8".into(),
            reroute_virtual_interfaces: "eth1".into(),
            exclude_interfaces: "eth9,veth+".into(),
            owner_groups_exclude: "0".into(),
            redirect_dns: true,
            capture_all_dns: true,
            drop_invalid: true,
            enable_ipv6: true,
            ..CaptureConfig::default()
        },
    ));
    // Interface names Linux allows but nft only takes quoted: unquoted, `#` comments out the
    // rest of the rule (silently dropping its verdict) and `;` ends it.
    v.push((
        "unusual interface names".into(),
        CaptureConfig {
            inbound_interception_mode: "TPROXY".into(),
            inbound_ports_include: "*".into(),
            outbound_ip_ranges_include: "10.0.0.0/8".into(),
            reroute_virtual_interfaces: "2vm,v#m".into(),
            exclude_interfaces: "1eth,a#b,a;b,x{y,p@q".into(),
            ..CaptureConfig::default()
        },
    ));
    v
}

/// Group names (`java`, `ftp` in Istio's fixtures) are resolved through NSS when the rule is
/// loaded and need not exist on this host; swap them for numeric gids, which never need NSS.
fn numeric_groups(mut cfg: CaptureConfig) -> CaptureConfig {
    let fix = |list: &str| {
        list.split(',')
            .enumerate()
            .map(|(i, g)| {
                if g.bytes().all(|b| b.is_ascii_digit()) {
                    g.to_owned()
                } else {
                    (60000 + i).to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    if cfg.owner_groups_include != "*" {
        cfg.owner_groups_include = fix(&cfg.owner_groups_include);
    }
    cfg.owner_groups_exclude = fix(&cfg.owner_groups_exclude);
    cfg
}

struct Tools {
    restore: [&'static str; 2],
    save: [&'static str; 2],
    cmd: [&'static str; 2],
    extra: &'static [&'static str],
}

fn fam_idx(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn rule_lines(save: &str) -> Vec<&str> {
    save.lines().filter(|l| l.starts_with("-A ")).collect()
}

fn check_iptables(tools: &Tools) {
    let ns = Netns::new();
    for (name, cfg) in configs() {
        let rs: RuleSet = sidecar::build(&cfg).expect("valid config");
        for fam in [Family::V4, Family::V6] {
            let i = fam_idx(fam);
            let mut restore_args = vec!["--noflush"];
            restore_args.extend_from_slice(tools.extra);
            let add = iptables::render_restore(&rs, fam);
            if add.is_empty() {
                continue;
            }
            ns.ok(
                tools.restore[i],
                &restore_args,
                &add,
                &format!("{name} {fam:?} apply"),
            );
            let save = ns.ok(tools.save[i], &[], "", "save");
            assert_eq!(
                rule_lines(&save).len(),
                rs.rules_for(fam).count(),
                "{name} {fam:?}: rule count after apply\n{save}"
            );
            // The individual-rule form matches what was applied.
            for r in rs.rules_for(fam) {
                let args = iptables::rule_args(r, iptables::RuleOp::Check);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ns.ok(tools.cmd[i], &args, "", &format!("{name} {fam:?} -C"));
            }
            let del = iptables::render_cleanup(&rs, fam);
            ns.ok(
                tools.restore[i],
                &restore_args,
                &del,
                &format!("{name} {fam:?} cleanup"),
            );
            let save = ns.ok(tools.save[i], &[], "", "save");
            assert!(
                rule_lines(&save).is_empty() && !save.contains("ISTIO"),
                "{name} {fam:?}: leftovers after cleanup\n{save}"
            );

            // Best-effort per-command cleanup also leaves nothing, and tolerates absence.
            ns.ok(tools.restore[i], &restore_args, &add, "re-apply");
            for _ in 0..2 {
                for cmd in iptables::cleanup_commands(&rs, fam) {
                    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                    let _ = ns.run(tools.cmd[i], &args, "");
                }
            }
            let save = ns.ok(tools.save[i], &[], "", "save");
            assert!(
                rule_lines(&save).is_empty() && !save.contains("ISTIO"),
                "{name} {fam:?}: leftovers after cleanup_commands\n{save}"
            );
        }
    }
}

#[test]
fn iptables_legacy_accepts_and_cleans_up() {
    check_iptables(&Tools {
        restore: ["iptables-legacy-restore", "ip6tables-legacy-restore"],
        save: ["iptables-legacy-save", "ip6tables-legacy-save"],
        cmd: ["iptables-legacy", "ip6tables-legacy"],
        extra: &["--wait=30"],
    });
}

#[test]
fn iptables_nft_accepts_and_cleans_up() {
    check_iptables(&Tools {
        restore: ["iptables-nft-restore", "ip6tables-nft-restore"],
        save: ["iptables-nft-save", "ip6tables-nft-save"],
        cmd: ["iptables-nft", "ip6tables-nft"],
        extra: &[],
    });
}

#[test]
fn nft_accepts_reapplies_and_deletes() {
    let ns = Netns::new();
    // Deleting absent tables is fine.
    ns.ok(
        "nft",
        &["-f", "-"],
        &nft::render_delete(),
        "delete on empty netns",
    );
    for (name, cfg) in configs() {
        let rs = sidecar::build(&cfg).expect("valid config");
        let text = nft::render(&rs);
        ns.ok("nft", &["-f", "-"], &text, &format!("{name} apply"));
        let first = ns.ok("nft", &["list", "ruleset"], "", "list");
        let n_rules = text.lines().filter(|l| l.contains(" rule ")).count();
        assert_eq!(
            first
                .lines()
                .filter(|l| l.contains("counter packets"))
                .count(),
            n_rules,
            "{name}: rule count\n{first}"
        );
        // add+flush makes re-applying converge to the same state.
        ns.ok("nft", &["-f", "-"], &text, &format!("{name} re-apply"));
        let second = ns.ok("nft", &["list", "ruleset"], "", "list");
        assert_eq!(first, second, "{name}: re-apply changed the ruleset");
        ns.ok(
            "nft",
            &["-f", "-"],
            &nft::render_delete(),
            &format!("{name} delete"),
        );
        let after = ns.ok("nft", &["list", "ruleset"], "", "list");
        assert_eq!(after.trim(), "", "{name}: leftovers after delete\n{after}");
    }
}
