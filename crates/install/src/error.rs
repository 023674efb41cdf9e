//! The installer's error type. Messages say what failed and on which file.

use std::io;
use std::path::PathBuf;

use crate::binaries::BinaryError;
use crate::conflist::ConfigError;
use crate::kubeconfig::KubeconfigError;

/// Result label of one install pass (`istio_cni_installs_total{result=…}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallResult {
    Success,
    CopyBinariesFailure,
    CreateKubeconfigFailure,
    CreateCniConfigFailure,
}

impl InstallResult {
    pub const ALL: [InstallResult; 4] = [
        InstallResult::Success,
        InstallResult::CopyBinariesFailure,
        InstallResult::CreateKubeconfigFailure,
        InstallResult::CreateCniConfigFailure,
    ];

    /// The Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            InstallResult::Success => "SUCCESS",
            InstallResult::CopyBinariesFailure => "COPY_BINARIES_FAILURE",
            InstallResult::CreateKubeconfigFailure => "CREATE_KUBECONFIG_FAILURE",
            InstallResult::CreateCniConfigFailure => "CREATE_CNI_CONFIG_FAILURE",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("CNI config {path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("plugin config: {0}")]
    PluginConfig(ConfigError),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(
        "no valid CNI config file (.conf with \"type\", .conflist with \"name\" and \"plugins\") in {dir}"
    )]
    NoValidConfig { dir: PathBuf },
    #[error("timed out waiting for {what}")]
    Timeout { what: String },
    #[error("cancelled while waiting for {what}")]
    Cancelled { what: String },
    #[error("CNI config file {path} preempted by {first}")]
    Preempted { path: PathBuf, first: PathBuf },
    #[error("CNI config file removed: {path}")]
    Removed { path: PathBuf },
    #[error("{plugin_type} entry missing from CNI config file {path}")]
    EntryMissing { path: PathBuf, plugin_type: String },
    #[error("standalone CNI config file {path} modified: top-level type is not {plugin_type}")]
    StandaloneModified { path: PathBuf, plugin_type: String },
    #[error("owned CNI config {owned} lacks plugin types {missing:?} of the primary {primary}")]
    OwnedStale {
        owned: PathBuf,
        primary: PathBuf,
        missing: Vec<String>,
    },
    #[error("CNI config file {path} kept changing while being rewritten")]
    Contended { path: PathBuf },
}

impl InstallError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        InstallError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Is this the waiting having been cancelled (shutdown)?
    pub fn is_cancelled(&self) -> bool {
        matches!(self, InstallError::Cancelled { .. })
    }
}
