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
