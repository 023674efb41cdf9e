//! Errors of the test harness: each names the namespace, command or socket involved.

use std::io;

/// What went wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// An external command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Entering a namespace failed.
    #[error(transparent)]
    Netx(#[from] meshcni_netx::NetxError),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl TestkitError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        TestkitError::Io {
            what: what.into(),
            source,
        }
    }
}
