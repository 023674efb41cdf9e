//! `--force-iptables-binary` / `FORCE_IPTABLES_BINARY` accept `legacy`, `nft` or empty (detect);
//! any other value stops the agent at start-up and fails `check-config`, naming the flag and the
//! value (it used to be ignored silently for the flag, with only a warning for the env var).
//!
//! The agent runs inside a lab netns (`nsenter --net`) with every host path in a temp dir, so
//! even a build that wrongly started could not touch the host. Needs root; fails without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshcni_testkit::Netns;
use meshcni_testkit::stack::{AgentDirs, agent_args};

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshcni-agent"))
}

fn plugin_bin() -> PathBuf {
    agent_bin().with_file_name("meshcni")
}

/// Run the agent with the lab flags plus `extra` (and `env`) inside `netns`; kill it if it is
/// still running after `limit` (a correct build exits at once on a bad value).
fn run(netns: &Path, dirs: &AgentDirs, extra: &[&str], env: &[(&str, &str)]) -> (Output, bool) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(agent_bin())
        .args(agent_args(dirs))
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NODE_NAME", "node1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn nsenter … meshcni-agent");
    let limit = Duration::from_secs(15);
    let started = Instant::now();
    let mut killed = false;
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().expect("output"), killed)
}

fn assert_refused(what: &str, (out, killed): (Output, bool), dirs: &AgentDirs) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !killed,
        "{what}: the agent kept running with a bogus flavour:\n{stderr}"
    );
    assert!(!out.status.success(), "{what}: exit status {}", out.status);
    assert!(
        stderr.contains("--force-iptables-binary")
            && stderr.contains("bogus")
            && stderr.contains("expected `legacy`, `nft`"),
        "{what}: the error must name the flag, the value and what is accepted:\n{stderr}"
    );
    let installed = std::fs::read_dir(&dirs.bin)
        .map(|d| d.count())
        .unwrap_or_default();
    assert_eq!(installed, 0, "{what}: nothing may be installed");
}

#[test]
fn a_bogus_forced_flavour_is_refused_at_start_up_and_by_check_config() {
    let node = Netns::new("flavor").expect("lab netns (needs root)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = AgentDirs::create(tmp.path(), &plugin_bin()).expect("agent dirs");

    for (what, extra, env) in [
        (
            "check-config, flag",
            vec!["--force-iptables-binary=bogus", "check-config"],
            vec![],
        ),
        (
            "check-config, env",
            vec!["check-config"],
            vec![("FORCE_IPTABLES_BINARY", "bogus")],
        ),
        (
            "start-up, flag",
            vec!["--force-iptables-binary=bogus"],
            vec![],
        ),
        (
            "start-up, env",
            vec![],
            vec![("FORCE_IPTABLES_BINARY", "bogus")],
        ),
    ] {
        assert_refused(what, run(node.path(), &dirs, &extra, &env), &dirs);
    }

    // The accepted values (and the empty default) pass check-config and are reported as set.
    for value in ["legacy", "nft", ""] {
        let flag = format!("--force-iptables-binary={value}");
        let (out, killed) = run(node.path(), &dirs, &[&flag, "check-config"], &[]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !killed && out.status.success(),
            "check-config with {flag}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("force_iptables_binary: {value:?}")),
            "{flag}: {stdout}"
        );
    }
}
