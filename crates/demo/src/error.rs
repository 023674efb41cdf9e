//! Why the demo stopped: each variant names the command, pod or file involved.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Something the demo needs is missing (root, a tool, the built plugin).
    #[error("demo preconditions not met: {0}")]
    Precondition(String),
    /// Bad command line.
    #[error("usage: {0}")]
    Usage(String),
    /// An external command failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The test kit (namespaces, stand-ins, clients) failed.
    #[error(transparent)]
    Testkit(#[from] meshcni_testkit::TestkitError),
    /// A CNI result or a flow reply did not look as it must.
    #[error("{0}")]
    Unexpected(String),
}

impl DemoError {
    pub fn io(what: impl Into<String>, source: io::Error) -> DemoError {
        DemoError::Io {
            what: what.into(),
            source,
        }
    }
}
