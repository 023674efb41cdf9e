//! Workloads from a local file, for hosts without Kubernetes, demos and tests.
//!
//! The file holds `{"namespaces": [<Namespace>...], "pods": [<Pod>...]}` with objects in the
//! Kubernetes JSON shape (what `kubectl get -o json` prints; unknown fields are ignored), as
//! JSON or YAML. Pods whose `spec.nodeName` names another node are ignored; pods without one
//! count as on this node. It is re-read when it changes (inotify on its directory, so atomic
//! rename-into-place works) and every `resync` period. Content that does not parse — a
//! half-written file, a typo — is logged and ignored: the last good snapshot stays in force.
//! A missing file is reported the same way (nothing is known until it appears).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info, warn};

use super::{NamespaceObject, PodObject, SourceUpdate, WorkloadSnapshot};

/// A problem with the workloads file.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("reading workloads file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "workloads file {path} is not valid JSON/YAML of shape {{\"namespaces\":[...],\"pods\":[...]}}: {reason}"
    )]
    Parse { path: PathBuf, reason: String },
    #[error("workloads file {path}: {index}: {source}")]
    Object {
        path: PathBuf,
        index: String,
        source: super::DecodeError,
    },
    #[error("watching {path} for changes: {reason}")]
    Watch { path: PathBuf, reason: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileShape {
    namespaces: Option<Vec<NamespaceObject>>,
    pods: Option<Vec<PodObject>>,
}

/// Parse the file's text (JSON, or YAML) into a snapshot of the pods on `node`. Pure.
pub fn parse_workloads(
    text: &str,
    node: &str,
    path: &Path,
) -> Result<WorkloadSnapshot, FileSourceError> {
    let parse_err = |reason: String| FileSourceError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    if text.trim().is_empty() {
        // An empty file is what a writer that truncates first leaves for a moment.
        return Err(parse_err("file is empty".into()));
    }
    let shape: FileShape = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?
    } else {
        serde_yaml::from_str(text).map_err(|e| parse_err(e.to_string()))?
    };
    let mut snap = WorkloadSnapshot::default();
    for (i, ns) in shape.namespaces.unwrap_or_default().into_iter().enumerate() {
        let ns = ns.into_info().map_err(|source| FileSourceError::Object {
            path: path.to_path_buf(),
            index: format!("namespaces[{i}]"),
            source,
        })?;
        snap.namespaces.insert(ns.name.clone(), ns);
    }
    for (i, pod) in shape.pods.unwrap_or_default().into_iter().enumerate() {
        let w = pod
            .into_workload()
            .map_err(|source| FileSourceError::Object {
                path: path.to_path_buf(),
                index: format!("pods[{i}]"),
                source,
            })?;
        if !w.node_name.is_empty() && w.node_name != node {
            continue;
        }
        snap.pods.insert(w.uid.clone(), w);
    }
    Ok(snap)
}

/// Read and parse the file once.
pub fn read_workloads(path: &Path, node: &str) -> Result<WorkloadSnapshot, FileSourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileSourceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_workloads(&text, node, path)
}

/// A running file source; stops when dropped.
pub struct FileSource {
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl FileSource {
    /// Start watching `path`; every distinct good snapshot (and every problem) is sent to
    /// `tx`. The first read happens before this returns.
    pub fn spawn(
        path: PathBuf,
        node: String,
        resync: Duration,
        tx: Sender<SourceUpdate>,
    ) -> FileSource {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        // inotify on the parent dir: editors and atomic writers replace the file.
        let watcher = {
            use notify::Watcher as _;
            let wake = wake_tx.clone();
            let target_name = path.file_name().map(|n| n.to_os_string());
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let relevant = ev.map_or(true, |e| {
                    e.paths
                        .iter()
                        .any(|p| p.file_name() == target_name.as_deref())
                });
                if relevant {
                    let _ = wake.send(());
                }
            })
            .and_then(|mut w| {
                w.watch(&dir, notify::RecursiveMode::NonRecursive)
                    .map(|()| w)
            })
            .map_err(|e| FileSourceError::Watch {
                path: dir,
                reason: e.to_string(),
            })
        };
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "falling back to periodic re-reads only");
                let _ = tx.send(SourceUpdate::Error(e.to_string()));
                None
            }
        };
        let mut last_good: Option<WorkloadSnapshot> = None;
        let mut last_error: Option<String> = None;
        let mut check = move |tx: &Sender<SourceUpdate>| match read_workloads(&path, &node) {
            Ok(snap) => {
                last_error = None;
                if last_good.as_ref() != Some(&snap) {
                    info!(
                        path = %path.display(),
                        pods = snap.pods.len(),
                        namespaces = snap.namespaces.len(),
                        "workloads file read"
                    );
                    last_good = Some(snap.clone());
                    let _ = tx.send(SourceUpdate::Snapshot(snap));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    warn!(error = %msg, "ignoring workloads file content; keeping the last good snapshot");
                    let _ = tx.send(SourceUpdate::Error(msg.clone()));
                    last_error = Some(msg);
                }
            }
        };
        check(&tx);
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("workloads-file".into())
            .spawn(move || {
                let _watcher = watcher;
                while !stop2.load(Ordering::SeqCst) {
                    match wake_rx.recv_timeout(resync) {
                        Ok(()) => {
                            // Coalesce a burst of events (write + close + rename).
                            std::thread::sleep(Duration::from_millis(20));
                            while wake_rx.try_recv().is_ok() {}
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => debug!("workloads file resync"),
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    check(&tx);
                }
            })
            .ok();
        FileSource {
            stop,
            wake: wake_tx,
            thread,
        }
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}
