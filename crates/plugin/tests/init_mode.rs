//! Init-container mode with the exact argument vectors Istio's injector gives its init
//! containers (`istio-init`, and `istio-validation` when the CNI is on), run as root in
//! namespaces the test creates. Needs root, iproute2, iptables and setpriv; fails without them.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Netns, require_root};

fn meshcni_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshcni"))
}

/// `ip netns exec <ns> [setpriv --reuid U --regid U --clear-groups] meshcni iptables args…`.
fn run_init(ns: &Netns, as_uid: Option<&str>, args: &[&str]) -> Output {
    let mut prefix = Vec::new();
    if let Some(uid) = as_uid {
        prefix.extend_from_slice(&["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
    }
    run_init_with(ns, &prefix, args, &[])
}

/// `ip netns exec <ns> <prefix…> meshcni iptables args…` with extra environment.
fn run_init_with(ns: &Netns, prefix: &[&str], args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = meshcni_bin().to_str().expect("utf-8 path");
    let mut full = vec!["netns", "exec", ns.name.as_str()];
    full.extend_from_slice(prefix);
    full.extend_from_slice(&[bin, "iptables"]);
    full.extend_from_slice(args);
    Command::new("ip")
        .args(&full)
        .env_remove("ENVOY_PORT")
        .envs(env.iter().copied())
        .output()
        .expect("spawn ip netns exec")
}

/// The capabilities Istio's injector gives istio-init: `drop: [ALL]`, `add: [NET_ADMIN,
/// NET_RAW]`, running as root.
const ISTIO_INIT_CAPS: [&str; 5] = [
    "setpriv",
    "--bounding-set=-all,+net_admin,+net_raw",
    "--inh-caps=-all,+net_admin,+net_raw",
    "--ambient-caps=-all,+net_admin,+net_raw",
    "--",
];

/// The args of Istio's injected `istio-init` container (sidecar template).
const ISTIO_INIT_ARGS: [&str; 17] = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
    "--log_output_level=default:info",
];

/// The rules without nft packet/byte counters (the probe's own packets bump them).
fn rules_without_counters(ns: &Netns) -> String {
    ns.rules()
        .lines()
        .map(|l| match l.find("counter packets ") {
            Some(i) => {
                let rest = &l[i + "counter packets ".len()..];
                let after = rest
                    .split_once(" bytes ")
                    .and_then(|(_, b)| b.split_once(' '))
                    .map_or("", |(_, tail)| tail);
                format!("{}counter {after}\n", &l[..i])
            }
            None => format!("{l}\n"),
        })
        .collect()
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The injector's istio-init args (with `--log_output_level`, `--log_as_json`) must apply the
/// capture; then the istio-validation args (`--run-validation --skip-rule-apply`), run as the
/// proxy UID like that container, must pass without touching the rules.
#[test]
fn injector_init_and_validation_args_work() {
    require_root(&["ip", "iptables", "setpriv"]);
    let ns = Netns::new("initargs");
    let mut init = ISTIO_INIT_ARGS.to_vec();
    init.push("--log_as_json");
    let out = run_init(&ns, None, &init);
    assert!(out.status.success(), "istio-init args: {}", describe(&out));
    let applied = rules_without_counters(&ns);
    assert!(applied.contains("-A OUTPUT -j ISTIO_OUTPUT"), "{applied}");

    let mut validation = ISTIO_INIT_ARGS.to_vec();
    validation.extend_from_slice(&["--run-validation", "--skip-rule-apply"]);
    let out = run_init(&ns, Some("1337"), &validation);
    assert!(
        out.status.success(),
        "istio-validation args: {}",
        describe(&out)
    );
    assert_eq!(
        rules_without_counters(&ns),
        applied,
        "--skip-rule-apply must not touch rules"
    );
}

/// Without capture, validation fails with Istio's exit code 126 within the probe timeout and
/// says why; `--skip-rule-apply` applies nothing.
#[test]
fn validation_without_capture_exits_126_and_applies_nothing() {
    require_root(&["ip", "iptables", "setpriv"]);
    let ns = Netns::new("novalid");
    let before = ns.rules();
    let mut args = ISTIO_INIT_ARGS.to_vec();
    args.extend_from_slice(&[
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout=1s",
    ]);
    let start = std::time::Instant::now();
    let out = run_init(&ns, Some("1337"), &args);
    assert_eq!(out.status.code(), Some(126), "{}", describe(&out));
    assert!(start.elapsed() < std::time::Duration::from_secs(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("127.0.0.6:15002") && stderr.contains("not in place"),
        "{stderr}"
    );
    assert_eq!(ns.rules(), before, "--skip-rule-apply must not touch rules");
}

/// Init-container mode must work with istio-init's capabilities (no CAP_SYS_ADMIN, so no
/// `setns` and no mount namespace) for every iptables flavor, on a dual-stack pod (`::6` on
/// `lo`, ip6tables) and with TPROXY (policy routing).
#[test]
fn works_with_istio_init_capabilities_only() {
    require_root(&["ip", "iptables", "setpriv"]);
    for (flavor, mode) in [
        ("nft", "REDIRECT"),
        ("legacy", "REDIRECT"),
        ("nft", "TPROXY"),
    ] {
        let ns = Netns::pod("initcaps", true);
        let mut args = ISTIO_INIT_ARGS.to_vec();
        args[7] = mode;
        let out = run_init_with(
            &ns,
            &ISTIO_INIT_CAPS,
            &args,
            &[("FORCE_IPTABLES_BINARY", flavor)],
        );
        assert!(out.status.success(), "{flavor} {mode}: {}", describe(&out));
        for family in ["iptables", "ip6tables"] {
            let save = ns.exec(&format!("{family}-{flavor}-save"), &[]);
            assert!(
                save.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
                "{flavor} {mode} {family}: {save}"
            );
        }
        assert!(
            ns.ip(&["-6", "addr", "show", "dev", "lo"])
                .contains("::6/128")
        );
        if mode == "TPROXY" {
            let rules = ns.ip(&["rule"]);
            assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
        }
    }
}
