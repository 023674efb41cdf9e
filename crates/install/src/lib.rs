//! meshcni-install: puts the meshcni plugin on a node and keeps it there (spec §5).
//!
//! * [`conflist`] — pure: our plugin entry, merge into / removal from the primary CNI's config,
//!   kubelet-style validity; output byte-identical to Istio's installer (Go `MarshalIndent`).
//! * [`kubeconfig`] — pure: the plugin kubeconfig (sigs.k8s.io/yaml layout).
//! * [`binaries`], [`fsutil`] — atomic copies/writes, directory lock, temp-file sweep.
//! * [`cniconfig`] — the config-directory edge: choose, wait for, check, write, clean up.
//! * [`backup`] — what uninstall needs to give the primary's config back byte for byte.
//! * [`Installer`] — one install pass, readiness check, uninstall.
//! * [`keeper`] — the watch + resync loop keeping everything installed, with status.
//!
//! Typical use (the agent):
//! ```no_run
//! use std::sync::Arc;
//! use meshcni_install::{InstallConfig, InstallStatus, Installer, Shutdown};
//! let installer = Arc::new(Installer::new(InstallConfig::default())?);
//! let status = Arc::new(InstallStatus::new());
//! let shutdown = Shutdown::new();
//! let keeper = installer.spawn_keeper(status.clone(), shutdown.clone())?;
//! // … serve status.ready() on /readyz …
//! shutdown.trigger();
//! let _ = keeper.join();
//! installer.uninstall()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod agent_settings;
pub mod backup;
pub mod binaries;
pub mod cniconfig;
pub mod config;
pub mod conflist;
pub mod error;
pub mod fsutil;
pub mod gojson;
pub mod installer;
pub mod keeper;
pub mod kubeconfig;

pub use cniconfig::{
    ConfigWrite, Wait, check_valid_cni_config, cleanup_cni_config, get_config_filenames,
    resolve_config_path, write_cni_config,
};
pub use config::{InstallConfig, KeeperTuning};
pub use conflist::{ConfigError, OwnedTypes, PluginConfig};
pub use error::{InstallError, InstallResult};
pub use installer::{InstallOutcome, Installer, RepairOutcome, RepairStep};
pub use keeper::{InstallStatus, Shutdown};
