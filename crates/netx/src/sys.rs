//! The only `unsafe` in this crate: a `pre_exec` hook that isolates name-service lookups of
//! child processes. Everything here runs in the forked child before `exec`, so it may only make
//! async-signal-safe system calls on data prepared before the fork.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make `/etc/nsswitch.conf` read as empty for the child, in a private mount namespace.
///
/// Why: `iptables -m owner --uid-owner 1337` calls `getpwnam("1337")` before falling back to
/// numeric parsing, which goes through NSS (`systemd`, `sss`, `ldap` modules…) and can block
/// or fail inside a pod's network namespace. With an empty `nsswitch.conf` glibc uses its
/// built-in defaults (`files`), so lookups only read local files. This is what Istio does.
///
/// How: in the child, `unshare(CLONE_NEWNS)`, mark every mount private (so nothing propagates
/// back to the host), then bind-mount `/dev/null` over `/etc/nsswitch.conf`. The mount
/// namespace dies with the child. Best effort: if any step fails (no CAP_SYS_ADMIN, no
/// `/etc/nsswitch.conf`), the child runs unisolated; the private-propagation step must succeed
/// before the bind mount is attempted, so a failure can never leak a mount to the host.
pub(crate) fn isolate_nss(cmd: &mut Command) {
    let (Ok(root), Ok(devnull), Ok(nsswitch)) = (
        CString::new("/"),
        CString::new("/dev/null"),
        CString::new("/etc/nsswitch.conf"),
    ) else {
        return;
    };
    let hook = move || -> std::io::Result<()> {
        // SAFETY: unshare/mount are async-signal-safe raw system calls; all pointers refer to
        // NUL-terminated strings owned by this closure, allocated before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Ok(());
            }
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Ok(());
            }
            libc::mount(
                devnull.as_ptr(),
                nsswitch.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            );
        }
        Ok(())
    };
    // SAFETY: the hook only performs async-signal-safe system calls (see above) and does not
    // allocate or take locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}
