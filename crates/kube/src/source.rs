//! Where pod metadata comes from: the API server, or a local directory of JSON files.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{KubeError, ObjectKind, check_name};
use crate::types::{Namespace, Pod};

/// Lookups the plugin needs, independent of where the objects live.
pub trait PodSource {
    /// The pod `namespace/name`.
    fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError>;
    /// The namespace `name`.
    fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError>;
}

impl<T: PodSource + ?Sized> PodSource for &T {
    fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        (**self).get_pod(namespace, name)
    }
    fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError> {
        (**self).get_namespace(name)
    }
}

impl<T: PodSource + ?Sized> PodSource for Box<T> {
    fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        (**self).get_pod(namespace, name)
    }
    fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError> {
        (**self).get_namespace(name)
    }
}

/// Pod metadata from files, for hosts without Kubernetes and for demos/tests.
///
/// Layout: `<root>/pods/<namespace>/<name>.json` (a Pod in API JSON) and
/// `<root>/namespaces/<name>.json` (a Namespace). A missing file is
/// [`KubeError::MissingFile`] (like a 404 from the API, [`KubeError::is_not_found`], but naming
/// the file that was looked for); a file that exists but cannot be read or parsed is an error
/// naming its path.
#[derive(Debug, Clone)]
pub struct LocalPodSource {
    root: PathBuf,
}

impl LocalPodSource {
    pub fn new(root: impl Into<PathBuf>) -> LocalPodSource {
        LocalPodSource { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the file holding pod `namespace/name`.
    pub fn pod_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.root
            .join("pods")
            .join(namespace)
            .join(format!("{name}.json"))
    }

    /// Path of the file holding namespace `name`.
    pub fn namespace_path(&self, name: &str) -> PathBuf {
        self.root.join("namespaces").join(format!("{name}.json"))
    }

    fn read<T: DeserializeOwned>(
        path: PathBuf,
        kind: ObjectKind,
        display_name: String,
    ) -> Result<T, KubeError> {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KubeError::MissingFile {
                    kind,
                    name: display_name,
                    path,
                });
            }
            Err(source) => return Err(KubeError::LocalRead { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| KubeError::LocalParse { path, source })
    }
}

impl PodSource for LocalPodSource {
    fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        check_name("namespace", namespace)?;
        check_name("pod", name)?;
        let mut pod: Pod = Self::read(
            self.pod_path(namespace, name),
            ObjectKind::Pod,
            format!("{namespace}/{name}"),
        )?;
        // Hand-written files often omit these; the location states them.
        if pod.metadata.namespace.is_empty() {
            pod.metadata.namespace = namespace.to_string();
        }
        if pod.metadata.name.is_empty() {
            pod.metadata.name = name.to_string();
        }
        Ok(pod)
    }

    fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError> {
        check_name("namespace", name)?;
        let mut ns: Namespace = Self::read(
            self.namespace_path(name),
            ObjectKind::Namespace,
            name.to_string(),
        )?;
        if ns.metadata.name.is_empty() {
            ns.metadata.name = name.to_string();
        }
        Ok(ns)
    }
}
