//! `meshcni-testkit`: test-only helpers (a dev-dependency, never shipped). Uniquely named
//! network namespaces that delete themselves, veth labs, a transparent-proxy stand-in that
//! records original destinations (REDIRECT and TPROXY), a DNS stand-in, a TCP server that
//! reports what it saw, and clients that connect from inside a namespace as any uid/gid.
//!
//! Everything needs root. Only namespaces created here are touched; names are
//! `mcni-<pid>-<counter>-<tag>`; traffic stays inside them.

#![deny(unsafe_code)]

pub mod ambient_bench;
mod error;
pub mod inpod_ztunnel;
pub mod kube_api;
pub mod kube_cluster;
pub mod lab;
pub mod multinode;
mod netns;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod snapshot;
mod sockets;
pub mod stack;
mod sys;
pub mod zds_client;
pub mod ztunnel;

pub use error::TestkitError;
pub use inpod_ztunnel::{
    AckOutcome, DnsMode, InpodDnsQuery, InpodHop, InpodZtunnelConfig, InpodZtunnelStandIn,
    WorkloadStatus, ZdsRecord,
};
pub use lab::Lab;
pub use multinode::{LabNode, LabPod, MultiNodeLab};
pub use netns::{Netns, veth};
pub use proxy::{DnsQuery, ProxiedConn, ProxyConfig, TransparentProxy};
pub use server::{ConnectOpts, TcpServer, connect, connect_text, udp_exchange};
pub use snapshot::{NetnsSnapshot, assert_netns_unchanged};
pub use sockets::nat_original_dst;
pub use ztunnel::{ZtunnelConfig, ZtunnelHop, ZtunnelStandIn};
