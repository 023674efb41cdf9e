//! `scripts/demo.sh` rejects what it does not know before doing anything (no root check, no
//! set-up, no build): an unknown option or ambient mode exits 2 with the usage on stderr.

use std::path::Path;
use std::process::Command;

fn demo_sh(args: &[&str]) -> (Option<i32>, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("SKIP_SETUP", "1")
        .output()
        .unwrap_or_else(|e| panic!("run bash {}: {e}", script.display()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_option_is_an_error_with_usage() {
    let (code, err) = demo_sh(&["--ambient_mode", "inpod"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown argument: --ambient_mode"), "{err}");
    assert!(
        err.contains("usage: scripts/demo.sh [--ambient-mode inpod|iptables|ebpf]"),
        "{err}"
    );
}

#[test]
fn unknown_ambient_mode_is_an_error_with_usage() {
    for args in [&["--ambient-mode", "bpf"][..], &["--ambient-mode=bpf"][..]] {
        let (code, err) = demo_sh(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("unknown ambient mode: bpf (known: inpod, iptables, ebpf)"),
            "{args:?}: {err}"
        );
        assert!(err.contains("usage:"), "{args:?}: {err}");
    }
    let (code, err) = demo_sh(&["--ambient-mode"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ambient-mode needs a value"), "{err}");
}

#[test]
fn help_prints_usage() {
    let (code, err) = demo_sh(&["--help"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("usage: scripts/demo.sh"), "{err}");
}
