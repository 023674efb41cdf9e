//! Entering network namespaces. A network namespace is a per-*thread* attribute on Linux, so we
//! never `setns` the caller's thread: every entry spawns a dedicated thread, moves it into the
//! namespace, runs the closure there and joins it. Child processes spawned from that thread
//! (fork/clone happen on the calling thread) and sockets created on it belong to the namespace;
//! a socket stays in the namespace it was created in even after it is moved to another thread.

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

use crate::NetxError;

/// Proof that the current thread has entered the network namespace at [`InNetns::path`].
///
/// Only [`with_netns`] and [`spawn_in_netns`] create it, and it is `!Send`, so it cannot escape
/// the thread that entered the namespace. Functions that act "here" take it as a parameter.
#[derive(Debug)]
pub struct InNetns<'a> {
    path: &'a Path,
    _not_send: PhantomData<*const ()>,
}

impl InNetns<'_> {
    /// The netns file this thread entered (used in error messages and as the xtables lock).
    pub fn path(&self) -> &Path {
        self.path
    }
}

/// Open `path` and check that it is a namespace file (nsfs). The namespace *type* is checked
/// by `setns(CLONE_NEWNET)` itself (EINVAL for other namespace types).
pub fn open_netns(path: &Path) -> Result<File, NetxError> {
    let file = File::open(path).map_err(|source| NetxError::NetnsOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let fs = fstatfs(&file).map_err(|e| NetxError::NetnsOpen {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(NetxError::NotANetns {
            path: path.to_path_buf(),
            detail: format!(
                "it is a regular file on a filesystem of type {:#x}, not an nsfs namespace file",
                fs.filesystem_type().0
            ),
        });
    }
    Ok(file)
}

/// Whether `file` is the network namespace the calling thread is already in (same nsfs device
/// and inode).
fn is_current_netns(file: &File) -> bool {
    match (
        file.metadata(),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(target), Ok(current)) => target.dev() == current.dev() && target.ino() == current.ino(),
        _ => false,
    }
}

fn enter(file: &File, path: &Path) -> Result<(), NetxError> {
    // `setns` needs CAP_SYS_ADMIN even into the namespace the thread is already in; an
    // init container (`meshcni iptables`, netns `/proc/self/ns/net`) has only NET_ADMIN and
    // NET_RAW, and a new thread already shares its creator's netns.
    if is_current_netns(file) {
        return Ok(());
    }
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| {
        if source == Errno::EINVAL {
            NetxError::NotANetns {
                path: path.to_path_buf(),
                detail:
                    "setns(CLONE_NEWNET) rejected it (EINVAL): it is a namespace of another type"
                        .to_string(),
            }
        } else {
            NetxError::Setns {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Run `f` on a fresh thread inside the network namespace `netns` and return its result.
///
/// A panic in `f` is propagated to the caller unchanged.
pub fn run_in_netns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> Result<R, NetxError> {
    with_netns(netns, |_| f())
}

/// Like [`run_in_netns`], but hands `f` the [`InNetns`] token so it can call the "here"
/// functions of this crate (several operations, one thread).
pub fn with_netns<R: Send>(
    netns: &Path,
    f: impl for<'a> FnOnce(&InNetns<'a>) -> R + Send,
) -> Result<R, NetxError> {
    let file = open_netns(netns)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netx-netns".to_string())
            .spawn_scoped(scope, move || -> Result<R, NetxError> {
                enter(&file, netns)?;
                drop(file);
                let token = InNetns {
                    path: netns,
                    _not_send: PhantomData,
                };
                Ok(f(&token))
            })
            .map_err(|source| NetxError::ThreadSpawn {
                path: netns.to_path_buf(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Spawn a long-lived thread inside `netns` running `f`. Returns once the thread has entered
/// the namespace (so entry errors are reported here, not through the join handle).
pub fn spawn_in_netns<R, F>(netns: &Path, name: &str, f: F) -> Result<JoinHandle<R>, NetxError>
where
    R: Send + 'static,
    F: for<'a> FnOnce(&InNetns<'a>) -> R + Send + 'static,
{
    let file = open_netns(netns)?;
    let path: PathBuf = netns.to_path_buf();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), NetxError>>(1);
    let thread_path = path.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || -> R {
            let entered = enter(&file, &thread_path);
            drop(file);
            let ok = entered.is_ok();
            // The receiver only disappears if the spawner panicked; nothing to report then.
            let _ = tx.send(entered);
            if !ok {
                // Never run `f` outside the namespace; park until the handle is dropped.
                // `spawn_in_netns` returned the error, and the handle was never handed out.
                std::panic::resume_unwind(Box::new("netns entry failed"));
            }
            let token = InNetns {
                path: &thread_path,
                _not_send: PhantomData,
            };
            f(&token)
        })
        .map_err(|source| NetxError::ThreadSpawn {
            path: path.clone(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(NetxError::ThreadSpawn {
                path,
                source: std::io::Error::other("netns thread exited before entering the namespace"),
            })
        }
    }
}

/// Inode of a namespace file: two paths name the same network namespace iff their inodes (and
/// nsfs device) match.
pub fn netns_inode(path: &Path) -> Result<u64, NetxError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| NetxError::NetnsOpen {
            path: path.to_path_buf(),
            source,
        })
}

/// Inode of the network namespace of the calling thread.
pub fn current_netns_inode() -> Result<u64, NetxError> {
    netns_inode(Path::new("/proc/thread-self/ns/net"))
}

/// Run `f` on a fresh thread in a brand-new, empty network namespace (`unshare(CLONE_NEWNET)`),
/// which disappears when the thread ends. Used to probe binaries without touching real
/// namespaces.
pub(crate) fn with_scratch_netns<R: Send>(
    f: impl for<'a> FnOnce(&InNetns<'a>) -> R + Send,
) -> Result<R, NetxError> {
    let label = Path::new("<scratch netns>");
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netx-scratch".to_string())
            .spawn_scoped(scope, move || -> Result<R, NetxError> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetxError::Setns {
                        path: label.to_path_buf(),
                        source,
                    }
                })?;
                let token = InNetns {
                    path: label,
                    _not_send: PhantomData,
                };
                Ok(f(&token))
            })
            .map_err(|source| NetxError::ThreadSpawn {
                path: label.to_path_buf(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
