//! Minimal, blocking, fast-starting Kubernetes access for the `meshcni` CNI plugin.
//!
//! The plugin is a short-lived process started once per pod sandbox; it needs to read one Pod
//! (and sometimes its Namespace) and exit. This crate therefore avoids an async runtime and a
//! full client: it parses a kubeconfig ([`kubeconfig`]), performs plain `GET`s with short
//! timeouts over rustls ([`client`]), decodes only the fields the plugin reads ([`types`]), and
//! offers the same lookups from a directory of JSON files for hosts without Kubernetes
//! ([`source`]). The fake API servers the tests use live in `meshcni-testkit`.

#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod kubeconfig;
pub mod retry;
pub mod selector;
pub mod source;
pub mod types;

pub use client::{ApiClient, ApiPodSource, ClientOptions};
pub use error::{KubeError, ObjectKind};
pub use kubeconfig::{Auth, ClusterAccess, KubeconfigError, TlsTrust};
pub use retry::{RetryOn, RetryPolicy};
pub use selector::{
    EnablementSelector, LabelSelector, LabelSelectorRequirement, SelectorError, SelectorOperator,
};
pub use source::{LocalPodSource, PodSource};
pub use types::{
    Container, EnvVar, Namespace, ObjectMeta, Pod, PodIp, PodSpec, PodStatus, SecurityContext,
};
