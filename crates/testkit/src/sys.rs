//! The only `unsafe` in the testkit: per-thread credential switches, `IPV6_TRANSPARENT` and
//! owning descriptors received over `SCM_RIGHTS`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

fn check(ret: libc::c_long, what: &str) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// Change the credentials of the *calling thread only*.
///
/// glibc's `setresuid`/`setresgid`/`setgroups` wrappers broadcast the change to every thread of
/// the process (POSIX semantics); the raw system calls affect one task, which is what a test
/// that connects "as uid 1337" from a throwaway thread needs. Order: supplementary groups and
/// gid first, uid last (after dropping root we could not change the gid any more).
pub(crate) fn set_thread_credentials(uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    if let Some(gid) = gid {
        // SAFETY: raw setgroups(0, NULL) on this thread; no memory is passed.
        let ret =
            unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) };
        check(ret, "setgroups(0)")?;
        // SAFETY: raw setresgid with plain integer arguments.
        let ret = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
        check(ret, "setresgid")?;
    }
    if let Some(uid) = uid {
        // SAFETY: raw setresuid with plain integer arguments.
        let ret = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        check(ret, "setresuid")?;
    }
    Ok(())
}

/// `setsockopt(IPPROTO_IPV6, IPV6_TRANSPARENT, 1)` (nix has only the IPv4 option).
pub(crate) fn set_ipv6_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` outlives the call and its size is passed; `fd` is a valid open socket.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(libc::c_long::from(ret), "setsockopt(IPV6_TRANSPARENT)")
}

/// Take ownership of a file descriptor the kernel just installed in this process (received
/// via `SCM_RIGHTS`), so it is closed exactly once.
pub(crate) fn own_fd(raw: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: `raw` was returned by recvmsg's SCM_RIGHTS: a fresh descriptor owned by nobody
    // else in this process; it is wrapped exactly once.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}
