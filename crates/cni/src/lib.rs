//! `meshcni-cni`: a CNI plugin library (spec 0.1.0 – 1.1.0) that knows nothing about meshes.
//!
//! * [`env`]: `CNI_COMMAND` and the per-command environment, `CNI_ARGS`.
//! * [`conf`]: the network configuration on stdin ([`NetConf`]) and runtime-config conventions.
//! * [`result`]: the typed ADD result and lossless conversion between spec versions.
//! * [`version`]: supported versions and the `VERSION` answer.
//! * [`error`]: [`CniError`] and the spec's error codes.
//! * [`skel`]: the entry loop ([`run`], [`main_with`]) driving a [`Plugin`].
//!
//! Supported: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0. CHECK needs 0.4.0+, STATUS and
//! GC need 1.1.0+ (older configs get error code 1, as libcni's `skel` answers).
//!
//! A chained plugin that changes nothing (see `examples/passthrough.rs`):
//!
//! ```no_run
//! use meshcni_cni::{CniError, Context, Plugin, main_with};
//! use serde_json::Value;
//!
//! struct PassThrough;
//! impl Plugin for PassThrough {
//!     fn add(&self, ctx: &Context) -> Result<Value, CniError> { ctx.pass_through() }
//!     fn del(&self, _: &Context) -> Result<(), CniError> { Ok(()) }
//!     fn check(&self, _: &Context) -> Result<(), CniError> { Ok(()) }
//!     fn status(&self, _: &Context) -> Result<(), CniError> { Ok(()) }
//!     fn gc(&self, _: &Context) -> Result<(), CniError> { Ok(()) }
//! }
//!
//! fn main() { main_with(&PassThrough) }
//! ```
#![forbid(unsafe_code)]

pub mod conf;
pub mod env;
pub mod error;
pub mod result;
pub mod skel;
pub mod version;

pub use conf::{Attachment, NetConf, PortMapping, normalize_port_mappings};
pub use env::{CniArgs, Command, Environment};
pub use error::CniError;
pub use result::{CniResult, Dns, Interface, IpConfig, Route, convert_result, empty_result};
pub use skel::{Context, Plugin, Request, main_with, parse_request, run};
pub use version::{CniVersion, SUPPORTED_VERSIONS, version_response};
