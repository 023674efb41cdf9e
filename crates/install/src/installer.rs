//! `Installer`: one install pass (binaries → kubeconfig → CNI config, spec §5.2 step 1), the
//! validity check behind readiness, and uninstall (spec §5.5).
//!
//! Concurrency: every config write/remove happens while holding an exclusive `flock` on the
//! CNI config directory itself ([`DirLock`]), so several installer processes (an old and a new
//! agent during a rollout, or two instances by mistake) serialise their read-modify-write of
//! the primary's file and never interleave. Waiting for the primary file to appear happens
//! outside the lock. Every write is atomic (temp + fsync + rename + dir fsync), so a `kill -9`
//! at any point leaves either the old or the new complete file; stale temp files of dead
//! processes are swept under the lock.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::backup;
use crate::binaries::{self, SourceBinary};
use crate::cniconfig::{self, Wait};
use crate::config::InstallConfig;
use crate::error::{InstallError, InstallResult};
use crate::fsutil::{self, DirLock, ModePolicy};
use crate::kubeconfig::{self, KubeconfigInputs};

/// What one install pass changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The CNI config file holding our entry.
    pub config_path: PathBuf,
    /// Whether the CNI config was (re)written in this pass.
    pub config_written: bool,
    /// Whether the kubeconfig was (re)written (first install or token/CA/host change).
    pub kubeconfig_written: bool,
    /// Binaries copied in this pass.
    pub binaries_written: Vec<PathBuf>,
}

/// What [`Installer::verify_and_repair`] found for one part of the installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairOutcome {
    /// In place and correct.
    Intact,
    /// Missing or different; written again.
    Repaired,
    /// Could not be verified or repaired (the message says why).
    Failed(String),
}

/// One part of the installation checked by [`Installer::verify_and_repair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairStep {
    /// `plugin binary`, `kubeconfig`, `CNI config entry` or `installation check`.
    pub what: &'static str,
    pub path: PathBuf,
    pub outcome: RepairOutcome,
}

type BinVersion = (u64, u64, i64, i64, i64);

#[derive(Debug, Default)]
struct State {
    config_path: Option<PathBuf>,
    sources: Option<Vec<SourceBinary>>,
    /// Metadata of target binaries verified identical to the source, to skip re-hashing.
    verified: HashMap<PathBuf, BinVersion>,
}

/// The installer. Cheap to share behind an `Arc`; passes are serialised internally.
#[derive(Debug)]
pub struct Installer {
    cfg: InstallConfig,
    state: Mutex<State>,
}

fn bin_version(p: &Path) -> Option<BinVersion> {
    let m = fs::metadata(p).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime_nsec() ^ m.ctime(),
    ))
}

impl InstallError {
    /// The metrics label of a failed pass.
    pub fn install_result(&self) -> InstallResult {
        match self {
            InstallError::Binary(_) => InstallResult::CopyBinariesFailure,
            InstallError::Kubeconfig { .. } => InstallResult::CreateKubeconfigFailure,
            InstallError::Io { op, .. }
                if op.contains("kubeconfig") || op.contains("service-account") =>
            {
                InstallResult::CreateKubeconfigFailure
            }
            _ => InstallResult::CreateCniConfigFailure,
        }
    }
}

impl Installer {
    /// Validate the configuration (plugin config renders, selector YAML parses).
    pub fn new(cfg: InstallConfig) -> Result<Installer, InstallError> {
        cniconfig::plugin_config_bytes(&cfg)?;
        Ok(Installer {
            cfg,
            state: Mutex::new(State::default()),
        })
    }

    pub fn config(&self) -> &InstallConfig {
        &self.cfg
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only caches behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The config file our entry was last written to.
    pub fn installed_config_path(&self) -> Option<PathBuf> {
        self.state().config_path.clone()
    }

    /// Tell the installer which file holds our entry (e.g. recorded by a previous run), so
    /// [`Installer::uninstall`] and [`Installer::check`] use it.
    pub fn adopt_installed_config(&self, path: PathBuf) {
        self.state().config_path = Some(path);
    }

    fn sources(&self) -> Result<Vec<SourceBinary>, InstallError> {
        let mut st = self.state();
        if let Some(s) = &st.sources {
            return Ok(s.clone());
        }
        let s = binaries::scan_sources(&self.cfg.cni_bin_source_dir, &self.cfg.cni_bin_names)?;
        st.sources = Some(s.clone());
        Ok(s)
    }

    /// Copy binaries into every writable target dir; returns the paths written.
    pub fn install_binaries(&self) -> Result<Vec<PathBuf>, InstallError> {
        let sources = self.sources()?;
        let mut written = Vec::new();
        for dir in &self.cfg.cni_bin_target_dirs {
            if !binaries::dir_writable(dir) {
                tracing::info!(dir = %dir.display(), "CNI bin directory is not writable, skipping");
                continue;
            }
            let targets: Vec<PathBuf> = sources.iter().map(|s| dir.join(&s.name)).collect();
            {
                let st = self.state();
                if targets
                    .iter()
                    .all(|t| bin_version(t).is_some_and(|v| st.verified.get(t) == Some(&v)))
                {
                    continue;
                }
            }
            let _ = fsutil::sweep_stale_temps(dir);
            written.extend(binaries::install_into(&sources, dir)?);
            // Remember a target as verified only if its content is the source's and its
            // metadata did not move while we looked: a write racing with ours (a tamper right
            // after our rename) must not be cached as good.
            for (t, src) in targets.into_iter().zip(&sources) {
                let before = bin_version(&t);
                if before.is_some()
                    && binaries::up_to_date(src, &t)
                    && bin_version(&t) == before
                    && let Some(v) = before
                {
                    self.state().verified.insert(t, v);
                }
            }
        }
        Ok(written)
    }

    /// Render the kubeconfig from the service-account files (pure inputs read here).
    pub fn render_kubeconfig(&self) -> Result<String, InstallError> {
        let c = &self.cfg;
        let path = c.kubeconfig_path();
        // Settings errors first (like the reference), before touching the files.
        let settings_err = if c.k8s_service_host.is_empty() {
            Some(kubeconfig::KubeconfigError::HostNotSet)
        } else if c.k8s_service_port.is_empty() {
            Some(kubeconfig::KubeconfigError::PortNotSet)
        } else {
            None
        };
        if let Some(source) = settings_err {
            return Err(InstallError::Kubeconfig { path, source });
        }
        let token_path = c.service_account_dir.join("token");
        let token = fs::read_to_string(&token_path)
            .map_err(|e| InstallError::io("reading service-account token", &token_path, e))?;
        let ca = if c.skip_tls_verify {
            None
        } else {
            let ca_path = c
                .kube_ca_file
                .clone()
                .unwrap_or_else(|| c.service_account_dir.join("ca.crt"));
            Some(
                fs::read(&ca_path)
                    .map_err(|e| InstallError::io("reading service-account CA", &ca_path, e))?,
            )
        };
        kubeconfig::render(&KubeconfigInputs {
            protocol: &c.k8s_service_protocol,
            host: &c.k8s_service_host,
            port: &c.k8s_service_port,
            ca: ca.as_deref(),
            skip_tls_verify: c.skip_tls_verify,
            token: &token,
        })
        .map_err(|source| InstallError::Kubeconfig { path, source })
    }

    /// Write the kubeconfig if its content changed (token rotation). Returns whether written.
    pub fn write_kubeconfig(&self) -> Result<bool, InstallError> {
        let y = self.render_kubeconfig()?;
        let path = self.cfg.kubeconfig_path();
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| InstallError::io("creating kubeconfig dir", dir, e))?;
            let _ = fsutil::sweep_stale_temps(dir);
        }
        fsutil::write_if_changed(
            &path,
            y.as_bytes(),
            ModePolicy::Fixed(self.cfg.kubeconfig_mode),
        )
        .map_err(|e| InstallError::io("writing kubeconfig", &path, e))
    }

    /// Write our CNI config entry: wait (per `wait`) for the primary outside the lock, then
    /// merge and write under the directory lock.
    pub fn write_cni_config(&self, wait: &Wait) -> Result<cniconfig::ConfigWrite, InstallError> {
        let c = &self.cfg;
        if c.chained_cni_plugin {
            let exclude = c.owned_mode().then(|| c.owned_file_name());
            cniconfig::resolve_primary(c, exclude.as_deref(), wait)?;
        }
        let dir = &c.mounted_cni_net_dir;
        let _lock = DirLock::acquire(dir)
            .map_err(|e| InstallError::io("locking CNI config dir", dir, e))?;
        let _ = fsutil::sweep_stale_temps(dir);
        let w = cniconfig::write_cni_config_observed(c, &Wait::no_wait(), &mut |edit| {
            self.record_edit(edit)
        })?;
        self.state().config_path = Some(w.path.clone());
        Ok(w)
    }

    /// Before an in-place edit of the primary's file: update the uninstall record (called
    /// under the directory lock). A record that cannot be written costs only the byte-exact
    /// restore at uninstall, never the install: it is logged and the edit goes ahead.
    fn record_edit(&self, edit: &cniconfig::PrimaryEdit<'_>) {
        let Some(path) = self.cfg.backup_path() else {
            return;
        };
        let owned = self.cfg.owned_types();
        let previous = backup::load(&path).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable uninstall record; starting a new one");
            None
        });
        let original = if !backup::has_owned_entry(edit.existing, &owned) {
            // The primary's own version: what uninstall gives back.
            match backup::original_of(edit.path, edit.existing) {
                Ok(o) => Some(o),
                Err(e) => {
                    tracing::warn!(path = %edit.path.display(), error = %e, "cannot stat the primary CNI config; uninstall will only remove our entry");
                    None
                }
            }
        } else {
            // Our own earlier write (keep what it replaced), or an entry we did not write
            // (migration, lost record): no restorable original.
            previous
                .filter(|p| {
                    p.written_name == backup::file_name(edit.path) && p.written == edit.existing
                })
                .and_then(|p| p.original)
        };
        let rec = backup::Backup {
            version: 1,
            written_name: backup::file_name(edit.target),
            written: edit.new.to_vec(),
            original,
        };
        if let Err(e) = backup::save(&path, &rec) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the uninstall record; uninstall will only remove our entry");
        }
    }

    /// Give the primary's config back per the uninstall record ([`backup`] module docs).
    /// Returns false if there is no record (the caller falls back to cutting our entry out).
    fn restore_from_record(&self) -> Result<bool, InstallError> {
        let c = &self.cfg;
        let Some(path) = c.backup_path() else {
            return Ok(false);
        };
        let rec = match backup::load(&path) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable uninstall record; removing only our entry");
                return Ok(false);
            }
        };
        let dir = &c.mounted_cni_net_dir;
        let written = dir.join(&rec.written_name);
        let current = match fs::read(&written) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(InstallError::io("reading CNI config", &written, e)),
        };
        let original_exists = rec
            .original
            .as_ref()
            .is_some_and(|o| dir.join(&o.name).exists());
        match backup::plan(&rec, current.as_deref(), original_exists, &c.owned_types()) {
            backup::Plan::Restore(o) => {
                let target = dir.join(&o.name);
                fsutil::atomic_write(
                    &target,
                    &o.content,
                    ModePolicy::Exact {
                        mode: o.mode,
                        uid: o.uid,
                        gid: o.gid,
                    },
                )
                .map_err(|e| InstallError::io("restoring the original CNI config", &target, e))?;
                if target != written {
                    fsutil::remove_if_exists(&written).map_err(|e| {
                        InstallError::io("removing the CNI config converted from", &written, e)
                    })?;
                }
                tracing::info!(path = %target.display(), bytes = o.content.len(), "restored the primary CNI config byte for byte");
            }
            backup::Plan::RemoveEntry => {
                cniconfig::cleanup_cni_config(c, &written)?;
                tracing::info!(path = %written.display(), "removed our entry from the CNI config (the primary changed the file since we edited it; its bytes are kept)");
            }
            backup::Plan::RemoveWritten => {
                fsutil::remove_if_exists(&written)
                    .map_err(|e| InstallError::io("removing CNI config", &written, e))?;
                tracing::info!(path = %written.display(), "removed the conflist we converted from a .conf the primary has written again");
            }
            backup::Plan::Nothing => {
                tracing::info!(path = %written.display(), "the CNI config we edited is gone; nothing to restore");
            }
        }
        Ok(true)
    }

    /// One full pass: binaries, kubeconfig, CNI config (in the reference's order; the first
    /// failure ends the pass).
    pub fn install_once(&self, wait: &Wait) -> Result<InstallOutcome, InstallError> {
        let binaries_written = self.install_binaries()?;
        let kubeconfig_written = self.cfg.needs_kubeconfig() && self.write_kubeconfig()?;
        let w = self.write_cni_config(wait)?;
        Ok(InstallOutcome {
            config_path: w.path,
            config_written: w.written,
            kubeconfig_written,
            binaries_written,
        })
    }

    /// A last verify-and-reinsert pass (the agent runs it when it stops without uninstalling,
    /// after the keeper has stopped): every binary is hashed against its source (no cached
    /// verification), the kubeconfig re-rendered, our CNI config entry checked — each step on
    /// its own, so one failure does not skip the others — then the readiness check. Nothing
    /// waits: a missing primary config is reported, not waited for.
    pub fn verify_and_repair(&self) -> Vec<RepairStep> {
        let c = &self.cfg;
        let mut out = Vec::new();
        self.state().verified.clear();
        let bin_dirs: Vec<&PathBuf> = c
            .cni_bin_target_dirs
            .iter()
            .filter(|d| binaries::dir_writable(d))
            .collect();
        match self.install_binaries() {
            Ok(written) => {
                let sources = self.state().sources.clone().unwrap_or_default();
                for dir in &bin_dirs {
                    for src in &sources {
                        let path = dir.join(&src.name);
                        let outcome = if written.contains(&path) {
                            RepairOutcome::Repaired
                        } else {
                            RepairOutcome::Intact
                        };
                        out.push(RepairStep {
                            what: "plugin binary",
                            path,
                            outcome,
                        });
                    }
                }
            }
            Err(e) => out.push(RepairStep {
                what: "plugin binary",
                path: bin_dirs
                    .first()
                    .map_or_else(|| c.cni_bin_source_dir.clone(), |d| (*d).clone()),
                outcome: RepairOutcome::Failed(e.to_string()),
            }),
        }
        out.push(RepairStep {
            what: "kubeconfig",
            path: c.kubeconfig_path(),
            outcome: match self.write_kubeconfig() {
                Ok(true) => RepairOutcome::Repaired,
                Ok(false) => RepairOutcome::Intact,
                Err(e) => RepairOutcome::Failed(e.to_string()),
            },
        });
        out.push(match self.write_cni_config(&Wait::no_wait()) {
            Ok(w) => RepairStep {
                what: "CNI config entry",
                path: w.path,
                outcome: if w.written {
                    RepairOutcome::Repaired
                } else {
                    RepairOutcome::Intact
                },
            },
            Err(e) => RepairStep {
                what: "CNI config entry",
                path: self
                    .installed_config_path()
                    .unwrap_or_else(|| c.mounted_cni_net_dir.clone()),
                outcome: RepairOutcome::Failed(e.to_string()),
            },
        });
        if let Err(e) = self.check() {
            out.push(RepairStep {
                what: "installation check",
                path: c.mounted_cni_net_dir.clone(),
                outcome: RepairOutcome::Failed(e.to_string()),
            });
        }
        out
    }

    /// Readiness check of the current installation: the reference validity check on the file
    /// we wrote, plus the binaries and kubeconfig still being in place.
    pub fn check(&self) -> Result<(), InstallError> {
        let path = self
            .installed_config_path()
            .ok_or_else(|| InstallError::Removed {
                path: self.cfg.mounted_cni_net_dir.clone(),
            })?;
        cniconfig::check_valid_cni_config(&self.cfg, &path)?;
        let kc = self.cfg.kubeconfig_path();
        if self.cfg.needs_kubeconfig() && !kc.exists() {
            return Err(InstallError::Removed { path: kc });
        }
        if let Some(sources) = self.state().sources.clone() {
            for dir in self
                .cfg
                .cni_bin_target_dirs
                .iter()
                .filter(|d| binaries::dir_writable(d))
            {
                for s in &sources {
                    let t = dir.join(&s.name);
                    if !t.exists() {
                        return Err(InstallError::Removed { path: t });
                    }
                }
            }
        }
        Ok(())
    }

    /// The config file to clean up: the one we wrote, else where we would have written.
    fn cleanup_target(&self) -> Option<PathBuf> {
        if let Some(p) = self.installed_config_path() {
            // A .conf we converted lives on as .conflist.
            return Some(p);
        }
        let c = &self.cfg;
        if c.owned_mode() {
            return Some(c.mounted_cni_net_dir.join(c.owned_file_name()));
        }
        cniconfig::resolve_config_path(c, &Wait::no_wait()).ok()
    }

    /// Remove everything we installed: our entry (or standalone/owned file), the kubeconfig and
    /// our binaries from every target dir. Everything else is left as it is. Errors are
    /// collected; the first one is returned after trying all steps.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let c = &self.cfg;
        let mut first_err: Option<InstallError> = None;
        if let Some(path) = self.cleanup_target() {
            let dir = &c.mounted_cni_net_dir;
            let res = DirLock::acquire(dir)
                .map_err(|e| InstallError::io("locking CNI config dir", dir, e))
                .and_then(|_lock| {
                    let _ = fsutil::sweep_stale_temps(dir);
                    if c.chained_cni_plugin && !c.owned_mode() && self.restore_from_record()? {
                        return Ok(());
                    }
                    let path = if path.exists() {
                        path
                    } else {
                        cniconfig::resolve_config_path(c, &Wait::no_wait()).unwrap_or(path)
                    };
                    cniconfig::cleanup_cni_config(c, &path)
                });
            if let Err(e) = res {
                first_err.get_or_insert(e);
            }
        }
        if first_err.is_none()
            && let Some(p) = c.backup_path()
            && let Err(e) = fsutil::remove_if_exists(&p)
        {
            first_err.get_or_insert(InstallError::io("removing the uninstall record", p, e));
        }
        let kc = c.kubeconfig_path();
        if let Err(e) = fsutil::remove_if_exists(&kc) {
            first_err.get_or_insert(InstallError::io("removing kubeconfig", kc, e));
        }
        let names: Vec<String> = match self.state().sources.clone() {
            Some(s) => s.into_iter().map(|s| s.name).collect(),
            None if !c.cni_bin_names.is_empty() => c.cni_bin_names.clone(),
            None => binaries::scan_sources(&c.cni_bin_source_dir, &[])
                .map(|s| s.into_iter().map(|s| s.name).collect())
                .unwrap_or_default(),
        };
        for dir in &c.cni_bin_target_dirs {
            for n in &names {
                let p = dir.join(n);
                if let Err(e) = fsutil::remove_if_exists(&p) {
                    first_err.get_or_insert(InstallError::io("removing CNI binary", p, e));
                }
            }
        }
        let mut st = self.state();
        st.config_path = None;
        st.verified.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
