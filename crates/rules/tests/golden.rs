//! Golden tests against Istio's own capture goldens (`testdata/istio/istio-{iptables,nftables}-capture`).
//!
//! Every case of each `cases.json` is run: `inputs` overlaid on `defaults` (checked against the
//! case's `effective`), built once, rendered, and compared after trimming, exactly as the case's
//! `compare` rule says.

mod common;

use common::load_cases;
use meshcni_rules::iptables::{self, Family};
use meshcni_rules::nft;
use meshcni_rules::sidecar::{self, CaptureConfig};

/// Line diff (LCS) in a unified-like format: ` ` same, `-` expected only, `+` actual only.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

fn check(corpus: &str, expected_count: usize, render: impl Fn(&CaptureConfig) -> String) {
    let cases = load_cases(corpus);
    assert_eq!(cases.len(), expected_count, "{corpus}: case count");
    let mut failures = Vec::new();
    for case in &cases {
        let actual = render(&case.config);
        if actual.trim() != case.golden.trim() {
            failures.push(format!(
                "=== {corpus}/{} (- golden, + ours)\n{}",
                case.name,
                diff(case.golden.trim(), actual.trim())
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {corpus} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// What Istio's recording stub captures (spec §2.5 HEAD): the two state probes, the v4 restore
/// input, the v6 restore input (IPv6 only), then the final save(s).
fn recorded_iptables(cfg: &CaptureConfig) -> String {
    let rs = sidecar::build(cfg).expect("fixture config is valid");
    let mut out = String::from("iptables-save\nip6tables-save\n");
    out.push_str(&iptables::render_restore(&rs, Family::V4));
    if rs.ipv6 {
        out.push_str(&iptables::render_restore(&rs, Family::V6));
    }
    out.push_str("iptables-save\n");
    if rs.ipv6 {
        out.push_str("ip6tables-save\n");
    }
    out
}

#[test]
fn iptables_capture_goldens() {
    check("istio-iptables-capture", 27, recorded_iptables);
}

#[test]
fn nftables_capture_goldens() {
    check("istio-nftables-capture", 28, |cfg| {
        nft::render(&sidecar::build(cfg).expect("fixture config is valid"))
    });
}
