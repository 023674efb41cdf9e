//! Deterministic crash points for crash-consistency tests.
//!
//! `MESHCNI_CRASH_AT=<point>:<n>` makes the process kill itself with SIGKILL (no destructors,
//! no flushing: exactly what an OOM kill or a node reboot does to the agent) the `n`-th time
//! (1-based) execution reaches the named point. Points sit between the steps whose order
//! matters for recovery (see [`crate::modes::iptables`]), e.g. `enroll-after-ipset`,
//! `enroll-after-route`, `sysctl-after-save`, `sysctl-before-write`, `uninstall-mid-sysctls`;
//! in the inpod mode ([`crate::modes::inpod`]) `inpod-after-rules`, `inpod-after-probe`,
//! `inpod-after-ack` (ztunnel holds the pod, the state file does not yet) and
//! `inpod-release-mid` (between a release's DelWorkload and its rules' removal).
//!
//! Compiled in debug builds (tests) and with the `crash-points` cargo feature only; in a
//! release build without the feature [`point`] is an empty inline function and the variable
//! is ignored.

/// The environment variable naming the crash point.
pub const CRASH_AT_ENV: &str = "MESHCNI_CRASH_AT";

/// Every named point (the crash tests iterate over these).
pub const POINTS: &[&str] = &[
    "state-before-rename",
    "install-after-chains",
    "install-after-tunnels",
    "install-before-ztunnel-netns",
    "ztunnel-after-tables-saved",
    "enroll-after-ipset",
    "enroll-after-route",
    "sysctl-after-save",
    "sysctl-before-write",
    "sysctl-after-write",
    "release-after-route",
    "uninstall-after-ztunnel-netns",
    "uninstall-after-chains",
    "uninstall-after-links",
    "uninstall-mid-sysctls",
    "uninstall-before-state-remove",
    "inpod-after-rules",
    "inpod-after-probe",
    "inpod-after-ack",
    "inpod-release-mid",
];

#[cfg(any(debug_assertions, feature = "crash-points"))]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn target() -> Option<&'static (String, u64)> {
        TARGET
            .get_or_init(|| {
                let v = std::env::var(super::CRASH_AT_ENV).ok()?;
                let (name, n) = v.rsplit_once(':').unwrap_or((v.as_str(), "1"));
                let n: u64 = n.trim().parse().ok().filter(|n| *n >= 1)?;
                Some((name.trim().to_string(), n))
            })
            .as_ref()
    }

    pub fn point(name: &str) {
        let Some((want, n)) = target() else {
            return;
        };
        if want != name {
            return;
        }
        let hit = HITS.fetch_add(1, Ordering::SeqCst) + 1;
        if hit == *n {
            eprintln!("meshcni crash point {name} #{hit}: SIGKILL");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            // SIGKILL cannot be caught; should it somehow return, never continue past the point.
            std::process::abort();
        }
    }
}

/// Die here if `MESHCNI_CRASH_AT` names this point and this is its `n`-th hit.
#[cfg(any(debug_assertions, feature = "crash-points"))]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown crash point {name}");
    imp::point(name);
}

/// Crash points are compiled out of this build.
#[cfg(not(any(debug_assertions, feature = "crash-points")))]
#[inline(always)]
pub fn point(_name: &str) {}
