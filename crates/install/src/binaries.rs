//! Copying the plugin binaries into the host's CNI bin directories (spec §5.2 step 1).
//!
//! Each copy goes to a temp file in the target directory, is fsynced with mode 0755 and then
//! renamed over the old binary, so the container runtime never execs a half-written file (a
//! running old binary keeps its inode). Identical targets (same size and content hash) are left
//! alone so the keeper's watch on them does not fire for nothing.

use std::collections::hash_map::DefaultHasher;
use std::fs::{self, File};
use std::hash::Hasher;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fsutil::{ModePolicy, atomic_write_with};

/// Mode of installed binaries.
pub const BIN_MODE: u32 = 0o755;

/// A source binary: its name, path, size and content hash (for change detection, not
/// security: std's SipHash with fixed keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceBinary {
    pub name: String,
    pub path: PathBuf,
    pub len: u64,
    pub hash: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("reading CNI binary source {path}: {source}")]
    Source { path: PathBuf, source: io::Error },
    #[error("CNI binary source dir {dir} contains no regular files")]
    NoSources { dir: PathBuf },
    #[error("installing CNI binary {path}: {source}")]
    Target { path: PathBuf, source: io::Error },
}

/// Content hash of a file (streamed).
pub fn hash_file(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.write(&buf[..n]);
    }
    Ok((len, h.finish()))
}

/// The binaries to install: `names` from `dir`, or (when `names` is empty) every regular file
/// in `dir` like the reference.
pub fn scan_sources(dir: &Path, names: &[String]) -> Result<Vec<SourceBinary>, BinaryError> {
    let err = |path: &Path, source| BinaryError::Source {
        path: path.to_path_buf(),
        source,
    };
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    if names.is_empty() {
        for entry in fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let entry = entry.map_err(|e| err(dir, e))?;
            let path = entry.path();
            let meta = fs::metadata(&path).map_err(|e| err(&path, e))?;
            if meta.is_file() {
                paths.push((entry.file_name().to_string_lossy().into_owned(), path));
            }
        }
        paths.sort();
    } else {
        for n in names {
            paths.push((n.clone(), dir.join(n)));
        }
    }
    if paths.is_empty() {
        return Err(BinaryError::NoSources {
            dir: dir.to_path_buf(),
        });
    }
    paths
        .into_iter()
        .map(|(name, path)| {
            let (len, hash) = hash_file(&path).map_err(|e| err(&path, e))?;
            Ok(SourceBinary {
                name,
                path,
                len,
                hash,
            })
        })
        .collect()
}

/// Is `dir` a directory we may write to? (`access(W_OK)` reports read-only mounts even for
/// root.)
pub fn dir_writable(dir: &Path) -> bool {
    dir.is_dir() && nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Does `target` already hold exactly `src` with the right mode?
pub fn up_to_date(src: &SourceBinary, target: &Path) -> bool {
    let Ok(meta) = fs::metadata(target) else {
        return false;
    };
    if !meta.is_file() || meta.len() != src.len || meta.mode() & 0o7777 != BIN_MODE {
        return false;
    }
    matches!(hash_file(target), Ok((len, hash)) if len == src.len && hash == src.hash)
}

/// Install every source into `target_dir`. Returns the paths actually (re)written.
pub fn install_into(
    sources: &[SourceBinary],
    target_dir: &Path,
) -> Result<Vec<PathBuf>, BinaryError> {
    let mut written = Vec::new();
    for src in sources {
        let target = target_dir.join(&src.name);
        if up_to_date(src, &target) {
            continue;
        }
        atomic_write_with(&target, ModePolicy::Fixed(BIN_MODE), |f| {
            let mut from = File::open(&src.path)?;
            io::copy(&mut from, f)?;
            Ok(())
        })
        .map_err(|source| BinaryError::Target {
            path: target.clone(),
            source,
        })?;
        written.push(target);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_once_and_repairs() {
        let src = tempfile::tempdir().expect("tmp");
        let dst = tempfile::tempdir().expect("tmp");
        fs::write(src.path().join("meshcni"), b"\x7fELF binary").expect("w");
        fs::create_dir(src.path().join("subdir")).expect("mkdir");
        let s = scan_sources(src.path(), &[]).expect("scan");
        assert_eq!(s.len(), 1);
        assert_eq!(install_into(&s, dst.path()).expect("install").len(), 1);
        let t = dst.path().join("meshcni");
        assert_eq!(fs::metadata(&t).expect("stat").mode() & 0o777, 0o755);
        assert!(
            install_into(&s, dst.path()).expect("install").is_empty(),
            "identical: skipped"
        );
        // Same size, different content -> rewritten.
        fs::write(&t, b"\x7fELF BINARY").expect("w");
        fs::set_permissions(&t, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(install_into(&s, dst.path()).expect("install").len(), 1);
        assert_eq!(fs::read(&t).expect("r"), b"\x7fELF binary");
        assert!(dir_writable(dst.path()));
        assert!(!dir_writable(&dst.path().join("missing")));
    }

    #[test]
    fn missing_sources_error() {
        let src = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            scan_sources(src.path(), &[]),
            Err(BinaryError::NoSources { .. })
        ));
        assert!(matches!(
            scan_sources(src.path(), &["meshcni".into()]),
            Err(BinaryError::Source { .. })
        ));
    }
}
