//! The error type of every Kubernetes lookup, with retryability.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::kubeconfig::KubeconfigError;

/// Which kind of object a lookup was for (used in messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Pod,
    Namespace,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Pod => "pod",
            ObjectKind::Namespace => "namespace",
        })
    }
}

/// A failed Kubernetes lookup. Messages name the server/URL/file and the cause.
///
/// [`KubeError::is_retryable`] says whether repeating the same request may succeed
/// (transport failures, timeouts, 429 and 5xx) or not (404, 401/403, bad data, bad config).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Connection refused, DNS failure, reset, TLS-less connect failure, ...
    #[error("kubernetes API server {server} unreachable: {reason}")]
    Unreachable { server: String, reason: String },
    /// The connect or the whole request exceeded its timeout.
    #[error(
        "request {url} to kubernetes API server timed out (connect timeout {connect:?}, total {total:?})"
    )]
    Timeout {
        url: String,
        connect: Duration,
        total: Duration,
    },
    /// TLS handshake failure (unknown CA, bad certificate, ...). Not retryable: needs new config.
    #[error("TLS handshake with kubernetes API server {server} failed: {reason}")]
    Tls { server: String, reason: String },
    /// HTTP 404.
    #[error("{kind} {name} not found")]
    NotFound { kind: ObjectKind, name: String },
    /// The local metadata file of the object does not exist (a [`crate::LocalPodSource`]
    /// lookup); names the file that was looked for.
    #[error("{kind} {name} not found: no metadata file {path}")]
    MissingFile {
        kind: ObjectKind,
        name: String,
        path: PathBuf,
    },
    /// HTTP 401.
    #[error("kubernetes API rejected the credentials for GET {url} (401 Unauthorized): {message}")]
    Unauthorized { url: String, message: String },
    /// HTTP 403.
    #[error("kubernetes API denied GET {url} (403 Forbidden): {message}")]
    Forbidden { url: String, message: String },
    /// Any other non-2xx answer.
    #[error("kubernetes API answered HTTP {status} to GET {url}: {message}")]
    Api {
        url: String,
        status: u16,
        message: String,
    },
    /// A 2xx answer whose body is not the expected object.
    #[error("invalid response from kubernetes API for GET {url}: {reason}")]
    BadResponse { url: String, reason: String },
    /// The name/namespace cannot be a Kubernetes object name (never sent to the server).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
    /// A local metadata file exists but cannot be read.
    #[error("reading {path}: {source}")]
    LocalRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A local metadata file is not a valid object.
    #[error("parsing {path}: {source}")]
    LocalParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The kubeconfig (or a file it references) is unusable.
    #[error(transparent)]
    Config(#[from] KubeconfigError),
}

impl KubeError {
    /// Whether repeating the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            KubeError::Unreachable { .. } | KubeError::Timeout { .. } => true,
            KubeError::Api { status, .. } => *status == 429 || *status >= 500,
            KubeError::Tls { .. }
            | KubeError::NotFound { .. }
            | KubeError::MissingFile { .. }
            | KubeError::Unauthorized { .. }
            | KubeError::Forbidden { .. }
            | KubeError::BadResponse { .. }
            | KubeError::InvalidName { .. }
            | KubeError::LocalRead { .. }
            | KubeError::LocalParse { .. }
            | KubeError::Config(_) => false,
        }
    }

    /// Whether the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            KubeError::NotFound { .. } | KubeError::MissingFile { .. }
        )
    }
}

/// Reject names that cannot be Kubernetes object names before they reach a URL or a path
/// (they come from `CNI_ARGS`, i.e. from the runtime, and must not escape `pods/<ns>/`).
pub(crate) fn check_name(kind: &'static str, name: &str) -> Result<(), KubeError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 253 {
        Some("longer than 253 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("only lowercase letters, digits, '-' and '.' are allowed")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not names")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KubeError::InvalidName {
            kind,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}
