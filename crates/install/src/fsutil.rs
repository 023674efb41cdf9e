//! File-system edges: crash-safe writes (temp file in the same directory + fsync + rename +
//! directory fsync), the inter-process lock that serialises installers sharing a CNI config
//! directory, and the sweep of temp files a killed installer left behind.
//!
//! Readers (kubelet, containerd, a polling test) only ever see the old or the new complete file:
//! `rename(2)` within one directory is atomic. Temp names never end in `.conf`/`.conflist`/
//! `.json`, so runtimes scanning the directory ignore them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

const TMP_MARKER: &str = ".meshcni-tmp-";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_path_for(path: &Path) -> io::Result<PathBuf> {
    let dir = parent_dir(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", path.display()),
            )
        })?
        .to_string_lossy();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!(".{name}{TMP_MARKER}{}-{n}", std::process::id())))
}

fn parent_dir(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        _ => Ok(Path::new(".")),
    }
}

/// fsync a directory so a rename/unlink in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How the mode/owner of the written file is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModePolicy {
    /// Always this mode (files we own: kubeconfig, standalone/istio-owned config, binaries).
    Fixed(u32),
    /// Keep the existing file's mode and owner (editing the primary CNI's file); this mode if
    /// the file does not exist.
    PreserveOr(u32),
    /// This mode and owner (giving the primary CNI's file back as it was).
    Exact { mode: u32, uid: u32, gid: u32 },
}

/// Write `data` to `path` atomically. Any failure leaves `path` untouched and removes the
/// temp file.
pub fn atomic_write(path: &Path, data: &[u8], policy: ModePolicy) -> io::Result<()> {
    atomic_write_with(path, policy, |f| f.write_all(data))
}

/// Like [`atomic_write`], with the content produced by `fill` (used to stream binaries).
pub fn atomic_write_with(
    path: &Path,
    policy: ModePolicy,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let existing = match policy {
        ModePolicy::PreserveOr(_) => fs::metadata(path).ok(),
        ModePolicy::Fixed(_) | ModePolicy::Exact { .. } => None,
    };
    let mode = match (policy, &existing) {
        (ModePolicy::PreserveOr(_), Some(m)) => m.mode() & 0o7777,
        (ModePolicy::PreserveOr(m), None) | (ModePolicy::Fixed(m), _) => m,
        (ModePolicy::Exact { mode, .. }, _) => mode,
    };
    let owner = match (policy, &existing) {
        (ModePolicy::Exact { uid, gid, .. }, _) => Some((uid, gid)),
        (_, Some(m)) => Some((m.uid(), m.gid())),
        _ => None,
    };
    let tmp = temp_path_for(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        fill(&mut f)?;
        // Set mode explicitly: the open() mode is filtered by the umask.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            let m = f.metadata()?;
            if (m.uid(), m.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
        }
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        sync_dir(parent_dir(path)?)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write only when the content differs. Returns whether a write happened.
pub fn write_if_changed(path: &Path, data: &[u8], policy: ModePolicy) -> io::Result<bool> {
    if let Ok(current) = fs::read(path)
        && current == data
    {
        if let ModePolicy::Fixed(mode) = policy {
            // Same content: still repair a changed mode.
            let meta = fs::metadata(path)?;
            if meta.mode() & 0o7777 != mode {
                fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            }
        }
        return Ok(false);
    }
    atomic_write(path, data, policy)?;
    Ok(true)
}

/// Remove a file, treating "already gone" as success; fsync the directory after.
pub fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent_dir(path)?)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove temp files left by installer processes that no longer exist (e.g. `kill -9` between
/// creating the temp file and the rename). Temp files of live processes are left alone.
pub fn sweep_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some((_, rest)) = name.rsplit_once(TMP_MARKER) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if pid == std::process::id() {
            // Our own temp files are only alive inside atomic_write, which never runs
            // concurrently with a sweep of the same directory (both under the install lock).
            continue;
        }
        if fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Exclusive `flock(2)` on a directory, held until drop. Serialises installer passes of every
/// process that uses the same CNI config directory; no lock file is created, so nothing of ours
/// is left in the directory and no runtime ever sees it.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let f = File::open(dir)?;
        let lock =
            Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))?;
        Ok(DirLock { _lock: lock })
    }
}

/// Read a whole file into memory, with the path in the error.
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_preserves_mode_and_cleans_up() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.conflist");
        fs::write(&p, b"old").expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        atomic_write(&p, b"new", ModePolicy::PreserveOr(0o600)).expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"new");
        assert_eq!(fs::metadata(&p).expect("stat").mode() & 0o777, 0o644);
        let q = d.path().join("b");
        atomic_write(&q, b"x", ModePolicy::PreserveOr(0o640)).expect("write");
        assert_eq!(fs::metadata(&q).expect("stat").mode() & 0o777, 0o640);
        assert!(!write_if_changed(&q, b"x", ModePolicy::Fixed(0o600)).expect("w"));
        assert_eq!(fs::metadata(&q).expect("stat").mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(d.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn failed_write_leaves_target_untouched() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a");
        fs::write(&p, b"old").expect("write");
        let r = atomic_write_with(&p, ModePolicy::Fixed(0o600), |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&p).expect("read"), b"old");
        assert_eq!(fs::read_dir(d.path()).expect("ls").count(), 1);
    }

    #[test]
    fn sweep_removes_dead_pids_only() {
        let d = tempfile::tempdir().expect("tempdir");
        // pid 0x7fffffff cannot exist (above pid_max).
        let dead = d
            .path()
            .join(format!(".x.conflist{TMP_MARKER}2147483647-0"));
        let live = d.path().join(format!(".x.conflist{TMP_MARKER}1-0"));
        fs::write(&dead, b"").expect("w");
        fs::write(&live, b"").expect("w");
        assert_eq!(sweep_stale_temps(d.path()).expect("sweep"), 1);
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
