//! Running external programs (iptables-restore, nft, …) from a thread that is inside a network
//! namespace. fork happens on the calling thread, so the child inherits that thread's netns.
//! Programs get argument vectors, never a shell.
//!
//! Every child has a time limit ([`DEFAULT_TIMEOUT`] unless the caller sets another): past it
//! the child is killed (SIGKILL) and the call fails with [`NetxError::Timeout`] naming the
//! command, so a wedged `iptables-restore`, `nft` or `ipset` cannot hang the caller forever.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::NetxError;
use crate::netns::InNetns;

/// Directories searched after `$PATH`: CNI plugins are often exec'd with a minimal PATH.
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Find `name` on `$PATH` or in the usual sbin/bin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Largest stdin written without a helper thread: one page, the capacity every pipe has even
/// when the user is over `/proc/sys/fs/pipe-user-pages-soft` (then new pipes get one page, not
/// the default 64 KiB), so the write never blocks. Saves a thread per restore of small text.
const INLINE_STDIN_MAX: usize = 4096;

/// How long a child may run unless the caller says otherwise: well above legacy iptables'
/// `--wait=30` for the xtables lock.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One external command.
#[derive(Debug, Clone)]
pub(crate) struct Cmd<'a> {
    pub program: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, OsString)>,
    pub stdin: Option<&'a [u8]>,
    pub isolate_nss: bool,
    /// Kill the child (SIGKILL) and fail with [`NetxError::Timeout`] after this long.
    pub timeout: Duration,
}

/// The watchdog's view of a running child.
#[derive(Default)]
struct Watch {
    /// The child has exited (not yet reaped): the watchdog must not signal its pid any more.
    exited: bool,
    killed: bool,
}

impl<'a> Cmd<'a> {
    pub fn new(program: &'a str) -> Self {
        Cmd {
            program,
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            isolate_nss: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn display(&self) -> String {
        let mut s = self.program.to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Run to completion in the caller's netns; Ok(stdout) on exit status 0.
    pub fn run(&self, ns: &InNetns<'_>) -> Result<String, NetxError> {
        let program = find_program(self.program).unwrap_or_else(|| PathBuf::from(self.program));
        let mut command = Command::new(&program);
        command
            .args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        if self.isolate_nss {
            crate::sys::isolate_nss(&mut command);
        }
        let spawn_err = |source| NetxError::Spawn {
            netns: ns.path().to_path_buf(),
            command: self.display(),
            source,
        };
        let mut child = command.spawn().map_err(spawn_err)?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let watch = (Mutex::new(Watch::default()), Condvar::new());
        let (status, stdout, stderr) = std::thread::scope(|scope| {
            // Watchdog: SIGKILL at the deadline unless the child has exited. The child is only
            // reaped after `exited` is set under the same lock, so the pid signalled is always
            // still ours (never a recycled one).
            scope.spawn(|| {
                let deadline = Instant::now() + self.timeout;
                let (lock, cvar) = &watch;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !w.exited {
                    let now = Instant::now();
                    if now >= deadline {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        w.killed = true;
                        break;
                    }
                    w = cvar
                        .wait_timeout(w, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            });
            if let (Some(input), Some(mut stdin)) = (self.stdin, child.stdin.take()) {
                // Input that surely fits in the pipe buffer is written inline (the write cannot block,
                // whatever the child does); larger input gets a writer thread, which avoids a
                // pipe deadlock should the child write a lot before reading all of its input.
                // A write error means the child exited early; its exit status and stderr tell
                // the real story. Dropping `stdin` closes the pipe (EOF for the child).
                if input.len() <= INLINE_STDIN_MAX {
                    let _ = stdin.write_all(input);
                } else {
                    scope.spawn(move || {
                        let _ = stdin.write_all(input);
                    });
                }
            }
            let err_pipe = child.stderr.take();
            let err_reader = scope.spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut e) = err_pipe {
                    let _ = e.read_to_end(&mut buf);
                }
                buf
            });
            let mut stdout = Vec::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_end(&mut stdout);
            }
            // Wait for the exit without reaping (see the watchdog), then tell the watchdog.
            while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitid(
                nix::sys::wait::Id::Pid(pid),
                nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT,
            ) {}
            let killed = {
                let (lock, cvar) = &watch;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                w.exited = true;
                cvar.notify_all();
                w.killed
            };
            let status = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            (status.map(|s| (s, killed)), stdout, stderr)
        });
        let (status, killed) = status.map_err(spawn_err)?;
        if killed {
            return Err(NetxError::Timeout {
                netns: ns.path().to_path_buf(),
                command: self.display(),
                after: self.timeout,
            });
        }
        let output = std::process::Output {
            status,
            stdout,
            stderr,
        };
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            if stderr.is_empty() {
                stderr = String::from_utf8_lossy(&output.stdout).trim().to_string();
            }
            Err(NetxError::Command {
                netns: ns.path().to_path_buf(),
                command: self.display(),
                status: output.status.to_string(),
                stderr,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_sbin_even_without_path() {
        assert!(find_program("ip").is_some(), "iproute2 is required");
        assert!(find_program("mcni-no-such-program").is_none());
    }

    /// Needs root (unshare of net and mount namespaces).
    #[test]
    fn nss_isolation_hides_nsswitch_from_the_child_only() {
        let host = std::fs::read("/etc/nsswitch.conf").expect("host has /etc/nsswitch.conf");
        assert!(!host.is_empty());
        let (isolated, plain) = crate::netns::with_scratch_netns(|ns| {
            let mut cmd = Cmd::new("cat").arg("/etc/nsswitch.conf");
            let plain = cmd.run(ns).expect("cat");
            cmd.isolate_nss = true;
            (cmd.run(ns).expect("cat isolated"), plain)
        })
        .expect("scratch netns");
        assert_eq!(isolated, "", "child must see an empty nsswitch.conf");
        assert_eq!(plain.as_bytes(), host.as_slice());
        assert_eq!(
            std::fs::read("/etc/nsswitch.conf").expect("reread"),
            host,
            "host untouched"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mounts.contains("nsswitch"),
            "no mount leaked to our mount namespace"
        );
    }

    #[test]
    fn a_child_past_its_timeout_is_killed_with_an_error_naming_it() {
        let err = crate::netns::with_scratch_netns(|ns| {
            let mut cmd = Cmd::new("sleep").arg("30");
            cmd.timeout = Duration::from_millis(300);
            cmd.run(ns)
        })
        .expect("scratch")
        .expect_err("must time out");
        let msg = err.to_string();
        assert!(matches!(err, NetxError::Timeout { .. }), "{msg} ({err:?})");
        assert!(msg.contains("`sleep 30`"), "{msg}");
        assert!(msg.contains("timed out after 300ms"), "{msg}");
    }

    #[test]
    fn output_of_a_quick_child_is_complete() {
        let big =
            crate::netns::with_scratch_netns(|ns| Cmd::new("seq").arg("1").arg("200000").run(ns))
                .expect("scratch")
                .expect("seq");
        assert_eq!(big.lines().count(), 200_000);
        assert!(big.ends_with("200000\n"));
    }

    #[test]
    fn failures_name_command_netns_and_stderr() {
        let err = crate::netns::with_scratch_netns(|ns| {
            Cmd::new("ip")
                .arg("link")
                .arg("show")
                .arg("mcni-nope0")
                .run(ns)
        })
        .expect("scratch")
        .expect_err("missing link");
        let msg = err.to_string();
        assert!(msg.contains("`ip link show mcni-nope0`"), "{msg}");
        assert!(msg.contains("<scratch netns>"), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }
}
