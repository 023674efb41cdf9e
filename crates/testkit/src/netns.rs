//! Uniquely named network namespaces that clean up after themselves, and veth/address/route
//! helpers (shelling out to `ip -n`, which is fine for tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::TestkitError;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run a command, returning stdout on success.
pub(crate) fn run_ok(program: &str, args: &[&str]) -> Result<String, TestkitError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| TestkitError::io(format!("spawn `{program} {}`", args.join(" ")), e))?;
    check(program, args, out)
}

fn check(program: &str, args: &[&str], out: Output) -> Result<String, TestkitError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestkitError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A network namespace named `mcni-<pid>-<counter>-<tag>` (created with `ip netns add`, so it
/// lives at `/run/netns/<name>`), with `lo` up. Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Create the namespace and bring `lo` up.
    pub fn new(tag: &str) -> Result<Netns, TestkitError> {
        let ns = Self::new_lo_down(tag)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Create the namespace, leaving `lo` down.
    pub fn new_lo_down(tag: &str) -> Result<Netns, TestkitError> {
        let name = format!(
            "mcni-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            tag
        );
        run_ok("ip", &["netns", "add", &name])?;
        let path = PathBuf::from(format!("/run/netns/{name}"));
        let ns = Netns { name, path };
        // No IPv6 duplicate address detection in lab namespaces: interfaces created later get
        // usable link-local addresses at once. With DAD, neighbour discovery over a new veth
        // waits for the link-local to leave "tentative" (≥ 1 s, far longer on a loaded
        // machine), and the first IPv6 connections of a test time out.
        ns.run(|| {
            for key in ["default", "all"] {
                let file = format!("/proc/sys/net/ipv6/conf/{key}/accept_dad");
                match std::fs::write(&file, "0") {
                    Ok(()) => {}
                    // Kernel without IPv6: nothing to disable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?
        .map_err(|e| TestkitError::io(format!("disable IPv6 DAD in {}", ns.name), e))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ip -n <name> args…`; stdout on success.
    pub fn ip(&self, args: &[&str]) -> Result<String, TestkitError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// Run `program args…` inside the namespace (spawned from a thread that entered it) and
    /// return its raw output, whatever the exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, TestkitError> {
        let what = format!("spawn `{program} {}` in {}", args.join(" "), self.name);
        meshcni_netx::run_in_netns(&self.path, || Command::new(program).args(args).output())?
            .map_err(|e| TestkitError::io(what, e))
    }

    /// Like [`Netns::exec`] but fails unless the exit status is 0; returns stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String, TestkitError> {
        let out = self.exec(program, args)?;
        check(program, args, out).map_err(|e| match e {
            TestkitError::Command {
                command,
                status,
                stderr,
            } => TestkitError::Command {
                command: format!("{command} (in netns {})", self.name),
                status,
                stderr,
            },
            other => other,
        })
    }

    /// Run `f` on a thread inside the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, TestkitError> {
        Ok(meshcni_netx::run_in_netns(&self.path, f)?)
    }

    /// Write a `net.*` sysctl of this namespace, e.g. `("net.ipv4.ip_forward", "1")`. The write
    /// happens on a thread inside the namespace, so `/proc/sys/net` is this namespace's.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestkitError> {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let what = format!("write {file} = {value} in {}", self.name);
        self.run(|| std::fs::write(&file, value))?
            .map_err(|e| TestkitError::io(what, e))
    }

    /// Read a `net.*` sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> Result<String, TestkitError> {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        let what = format!("read {file} in {}", self.name);
        self.run(|| std::fs::read_to_string(&file))?
            .map(|s| s.trim().to_string())
            .map_err(|e| TestkitError::io(what, e))
    }

    /// Add an address (`10.0.0.1/24`, `fd00::1/64`) to `ifname`; IPv6 without DAD.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<(), TestkitError> {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", ifname, "nodad"])?;
        } else {
            self.ip(&["addr", "add", cidr, "dev", ifname])?;
        }
        Ok(())
    }

    /// `ip [-6] route add default via GW`.
    pub fn add_default_route(&self, gateway: &str) -> Result<(), TestkitError> {
        if gateway.contains(':') {
            self.ip(&["-6", "route", "add", "default", "via", gateway])?;
        } else {
            self.ip(&["route", "add", "default", "via", gateway])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ok("ip", &["netns", "del", &self.name]) {
            tracing::warn!(netns = self.name, error = %e, "could not delete test netns");
        }
    }
}

/// Create a veth pair `a_if` (in `a`) ↔ `b_if` (in `b`), both up. Interface names must be at
/// most 15 bytes.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<(), TestkitError> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
