//! The node-agent (server) side of ztunnel's ZDS protocol.
//!
//! ztunnel (≥ 1.21 in-pod mode, the only mode from 1.23) connects to a `SOCK_SEQPACKET` unix
//! socket served by the node agent, says `ZdsHello`, and receives every ambient pod as an
//! `AddWorkload` carrying the pod's netns fd (SCM_RIGHTS), then `SnapshotSent`, then incremental
//! adds and deletes. [`proto`] holds the messages, [`server`] the socket server.
//!
//! Blocking std threads only (no async runtime): one accept thread plus one thread per ztunnel
//! connection.

#![forbid(unsafe_code)]

pub mod proto;
pub mod server;

pub use proto::WorkloadInfo;
pub use server::{DEFAULT_SOCKET_PATH, MAX_MESSAGE_LEN, ZdsError, ZdsEvent, ZdsOptions, ZdsServer};
