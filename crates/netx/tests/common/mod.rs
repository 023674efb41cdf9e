//! Minimal netns fixture for netx's own tests (testkit depends on netx, so netx cannot use it).
//! Names are unique per process and test (`mcni-nx-<pid>-<n>`); the namespace is deleted on drop.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    /// A fresh netns with `lo` up.
    pub fn new() -> Self {
        let ns = Self::new_lo_down();
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A fresh netns with `lo` left down.
    pub fn new_lo_down() -> Self {
        let name = format!(
            "mcni-nx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run `ip netns add` (tests need root and iproute2)");
        assert!(
            status.success(),
            "`ip netns add {name}` failed: tests need root"
        );
        TestNetns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME args…`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ----- running tools in a test netns ---------------------------------------------------

/// A program's absolute path, found on PATH now (the no-exec test changes PATH for a child).
pub fn which(prog: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{prog}` is needed on PATH for this test"))
}

pub fn run_in(ns: &std::path::Path, prog: &str, args: &[&str], stdin: Option<&str>) -> String {
    try_run_in(ns, prog, args, stdin).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_run_in(
    ns: &std::path::Path,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    use std::io::Write;
    let name = ns
        .file_name()
        .expect("netns name")
        .to_string_lossy()
        .into_owned();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(which(prog))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ip netns exec");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    if !out.status.success() {
        return Err(format!(
            "{prog} {args:?} in {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `-save` output without `#` lines and counters.
pub fn normalize_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]\n", &l[..i]),
            _ => format!("{l}\n"),
        })
        .collect()
}
