//! The ambient config file (`<ambient-config-dir>/config.json`) that tells the node's ambient
//! components whether ztunnel is ready and which redirect mode the agent runs.
//!
//! Format (Istio G1, `cni/pkg/ambient/server.go@1.20.0`): compact JSON with the fields in this
//! order — `{"ztunnelReady":false,"redirectMode":"iptables"}`. Extra fields that later modes need
//! are appended after these two so existing readers keep working. The file is written atomically
//! (temp file in the same dir + rename, mode 0644) and only when its content would change.
//! Like Istio it is not rewritten or removed on shutdown: the last known state stays visible.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// File name inside the ambient config dir.
pub const AMBIENT_CONFIG_FILE: &str = "config.json";

/// How ambient traffic reaches ztunnel on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedirectMode {
    /// G1 node-level iptables + GENEVE tunnels.
    Iptables,
    /// G1 node-level tc eBPF.
    Ebpf,
    /// G2/G3 in-pod rules + ZDS (Istio's current design).
    Inpod,
}

impl RedirectMode {
    /// The string written into `redirectMode`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectMode::Iptables => "iptables",
            RedirectMode::Ebpf => "ebpf",
            RedirectMode::Inpod => "inpod",
        }
    }
}

impl std::fmt::Display for RedirectMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The file's content. Field order is the wire order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AmbientConfig {
    #[serde(rename = "ztunnelReady")]
    pub ztunnel_ready: bool,
    #[serde(rename = "redirectMode")]
    pub redirect_mode: RedirectMode,
}

impl AmbientConfig {
    /// Compact JSON in wire order, no trailing newline (Go `json.Marshal` output).
    pub fn render(&self) -> String {
        // Serializing two plain fields cannot fail; fall back to a hand-built string anyway so
        // this stays total.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                "{{\"ztunnelReady\":{},\"redirectMode\":\"{}\"}}",
                self.ztunnel_ready, self.redirect_mode
            )
        })
    }
}

/// Errors writing the ambient config file.
#[derive(Debug, thiserror::Error)]
pub enum AmbientConfigError {
    #[error("creating ambient config dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing ambient config temp file {path}: {source}")]
    WriteTemp {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// Owns `config.json`: keeps the last written state and rewrites only on change.
#[derive(Debug)]
pub struct AmbientConfigWriter {
    path: PathBuf,
    state: Mutex<Option<AmbientConfig>>,
    redirect_mode: RedirectMode,
}

impl AmbientConfigWriter {
    /// A writer for `<dir>/config.json`. Nothing is written until [`Self::write_initial`] or a
    /// state change.
    pub fn new(dir: &Path, redirect_mode: RedirectMode) -> Self {
        AmbientConfigWriter {
            path: dir.join(AMBIENT_CONFIG_FILE),
            state: Mutex::new(None),
            redirect_mode,
        }
    }

    /// Full path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the start-up state (`ztunnelReady: false`) unconditionally, replacing whatever a
    /// previous agent left: ztunnel readiness is unknown until the agent has observed it.
    pub fn write_initial(&self) -> Result<(), AmbientConfigError> {
        let cfg = AmbientConfig {
            ztunnel_ready: false,
            redirect_mode: self.redirect_mode,
        };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        write_atomic(&self.path, cfg.render().as_bytes())?;
        *guard = Some(cfg);
        Ok(())
    }

    /// Record ztunnel readiness; rewrites the file only if the content changes.
    /// Returns whether the file was rewritten.
    pub fn set_ztunnel_ready(&self, ready: bool) -> Result<bool, AmbientConfigError> {
        let cfg = AmbientConfig {
            ztunnel_ready: ready,
            redirect_mode: self.redirect_mode,
        };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref() == Some(&cfg) {
            return Ok(false);
        }
        write_atomic(&self.path, cfg.render().as_bytes())?;
        *guard = Some(cfg);
        Ok(true)
    }

    /// The last state written by this writer.
    pub fn current(&self) -> Option<AmbientConfig> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Write `data` to `path` atomically with mode 0644: temp file in the same directory, fsync,
/// rename over the target.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AmbientConfigError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir).map_err(|source| AmbientConfigError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| AMBIENT_CONFIG_FILE.to_string());
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        // The umask may have narrowed the create mode; readers on the host need 0644.
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.write_all(data)?;
        f.sync_all()
    };
    if let Err(source) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(AmbientConfigError::WriteTemp { path: tmp, source });
    }
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        AmbientConfigError::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_compact_in_field_order() {
        let c = AmbientConfig {
            ztunnel_ready: true,
            redirect_mode: RedirectMode::Iptables,
        };
        assert_eq!(
            c.render(),
            r#"{"ztunnelReady":true,"redirectMode":"iptables"}"#
        );
        let c = AmbientConfig {
            ztunnel_ready: false,
            redirect_mode: RedirectMode::Ebpf,
        };
        assert_eq!(
            c.render(),
            r#"{"ztunnelReady":false,"redirectMode":"ebpf"}"#
        );
    }

    #[test]
    fn writes_atomically_0644_and_only_on_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("ambient-config");
        let w = AmbientConfigWriter::new(&sub, RedirectMode::Inpod);
        w.write_initial().expect("initial");
        let p = sub.join("config.json");
        assert_eq!(
            fs::read_to_string(&p).expect("read"),
            r#"{"ztunnelReady":false,"redirectMode":"inpod"}"#
        );
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);

        assert!(!w.set_ztunnel_ready(false).expect("same"));
        // Prove "no rewrite": a rewrite would replace the inode.
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&p).expect("meta").ino();
        assert!(!w.set_ztunnel_ready(false).expect("same"));
        assert_eq!(fs::metadata(&p).expect("meta").ino(), ino);

        assert!(w.set_ztunnel_ready(true).expect("change"));
        assert_eq!(
            fs::read_to_string(&p).expect("read"),
            r#"{"ztunnelReady":true,"redirectMode":"inpod"}"#
        );
        assert_ne!(fs::metadata(&p).expect("meta").ino(), ino);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&sub)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("config.json")]);
    }
}
