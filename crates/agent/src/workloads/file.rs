//! Workloads from a local file, for hosts without Kubernetes, demos and tests.
//!
//! The file holds `{"namespaces": [<Namespace>...], "pods": [<Pod>...]}` with objects in the
//! Kubernetes JSON shape (what `kubectl get -o json` prints; unknown fields are ignored), as
//! JSON or YAML. Pods whose `spec.nodeName` names another node are ignored; pods without one
//! count as on this node. It is re-read when it changes (inotify on its directory for
//! writes, creates, renames and removals of that name, so atomic rename-into-place works;
//! debounced) and checked every `resync` period; content identical to the last parsed one is
//! not parsed again, so an idle agent does no work.
//!
//! What is refused (logged, counted in `meshcni_workload_refusals_total`; the last good
//! snapshot stays in force):
//! * content that does not parse — a half-written file, a typo; a missing file (nothing is
//!   known until it appears);
//! * an incomplete file: both `pods` and `namespaces` must be present (each may be `[]`). An
//!   empty document (`{}`, `---`, only comments) or one lacking either list is not "no pods";
//!   `pods: []` with `namespaces: []` is, and releases every pod;
//! * a file over a limit ([`FileLimits`]: size, nesting depth, YAML alias expansion);
//! * a pod whose `metadata.uid` is not a Kubernetes UID (letters, digits, `-`);
//! * a second pod with the UID of an earlier one (only that pod; the first keeps the UID).

use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info, warn};

use super::{NamespaceObject, PodObject, SourceUpdate, WorkloadMetrics, WorkloadSnapshot};

/// Largest workloads file accepted (bytes): 16 MiB, room for several thousand pods in the
/// `kubectl get -o json` shape.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Deepest YAML/JSON nesting accepted (a Kubernetes pod object needs about 12).
pub const MAX_DEPTH: usize = 64;
/// Most nodes YAML aliases (`*name`) may add in total when expanded.
pub const MAX_ALIAS_NODES: u64 = 100_000;

/// Bounds applied to the workloads file before it is parsed for real.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    pub max_bytes: u64,
    pub max_depth: usize,
    pub max_alias_nodes: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_bytes: MAX_FILE_BYTES,
            max_depth: MAX_DEPTH,
            max_alias_nodes: MAX_ALIAS_NODES,
        }
    }
}

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
    #[error(
        "workloads file {path} is incomplete: it has no {missing} list (an empty or partial file is not \"no pods\"; write `pods: []` and `namespaces: []` to say there are none)"
    )]
    Incomplete { path: PathBuf, missing: String },
    #[error("workloads file {path} exceeds a limit: {what}")]
    Limit { path: PathBuf, what: String },
    #[error("workloads file {path}: {index}: {source}")]
    Object {
        path: PathBuf,
        index: String,
        source: super::DecodeError,
    },
    #[error("watching {path} for changes: {reason}")]
    Watch { path: PathBuf, reason: String },
}

impl FileSourceError {
    /// The `reason` label counted in `meshcni_workload_refusals_total`.
    pub fn refusal_reason(&self) -> &'static str {
        match self {
            FileSourceError::Incomplete { .. } => "file_incomplete",
            FileSourceError::Limit { .. } => "file_limit",
            _ => "file_invalid",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileShape {
    namespaces: Option<Vec<NamespaceObject>>,
    pods: Option<Vec<PodObject>>,
}

/// Why [`check_yaml_bounds`] refused a text.
enum YamlCheck {
    Limit(String),
    Syntax(String),
}

/// Check YAML text against `limits` (depth, alias expansion) with a streaming parser that
/// stops at the first excess, before the real parse (whose alias expansion and nesting are
/// not bounded tightly enough: a 0.5 MB alias bomb or a 200 KB nesting costs GiBs / seconds).
fn check_yaml_bounds(text: &str, limits: &FileLimits) -> Result<(), YamlCheck> {
    use saphyr_parser::{Event, Parser};
    // Per open collection: (anchor id, nodes so far including expanded aliases).
    let mut stack: Vec<(usize, u64)> = Vec::new();
    // Expanded size of every anchored node.
    let mut anchored: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
    let mut alias_nodes: u64 = 0;
    let add = |stack: &mut Vec<(usize, u64)>, n: u64| {
        if let Some(top) = stack.last_mut() {
            top.1 = top.1.saturating_add(n);
        }
    };
    for ev in Parser::new_from_str(text) {
        let (ev, span) = ev.map_err(|e| {
            // The scanner's own bound on flow nesting (it scans a little ahead of the
            // events, so it can be reached before `max_depth` is seen).
            if e.info().contains("recursion limit exceeded") {
                YamlCheck::Limit(format!(
                    "nesting deeper than {} levels (line {})",
                    limits.max_depth,
                    e.marker().line()
                ))
            } else {
                YamlCheck::Syntax(e.to_string())
            }
        })?;
        match ev {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                stack.push((anchor, 1));
                if stack.len() > limits.max_depth {
                    return Err(YamlCheck::Limit(format!(
                        "nesting deeper than {} levels (line {})",
                        limits.max_depth,
                        span.start.line()
                    )));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, n)) = stack.pop() {
                    if anchor != 0 {
                        anchored.insert(anchor, n);
                    }
                    add(&mut stack, n);
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                if anchor != 0 {
                    anchored.insert(anchor, 1);
                }
                add(&mut stack, 1);
            }
            Event::Alias(anchor) => {
                let n = anchored.get(&anchor).copied().unwrap_or(1);
                alias_nodes = alias_nodes.saturating_add(n);
                if alias_nodes > limits.max_alias_nodes {
                    return Err(YamlCheck::Limit(format!(
                        "YAML aliases expand to more than {} nodes (line {})",
                        limits.max_alias_nodes,
                        span.start.line()
                    )));
                }
                add(&mut stack, n);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parse the file's text (JSON, or YAML) into a snapshot of the pods on `node`, with the
/// default [`FileLimits`]. Pods refused as duplicates of an earlier UID are left out (see
/// [`parse_workloads_checked`]). Pure.
pub fn parse_workloads(
    text: &str,
    node: &str,
    path: &Path,
) -> Result<WorkloadSnapshot, FileSourceError> {
    parse_workloads_checked(text, node, path, &FileLimits::default(), None).map(|(s, _)| s)
}

/// [`parse_workloads`] with explicit limits, also returning the pods refused because another
/// pod has their UID: the pod that held the UID in `previous` (the last good snapshot) keeps
/// it, else the first in the file. Pure.
///
/// The file must say what it holds: both `pods` and `namespaces` must be present (each may
/// be an empty list). An empty document (`{}`, `---`, only comments) or one without either
/// list is refused as [`FileSourceError::Incomplete`] — a writer that has not finished, not
/// "no pods".
pub fn parse_workloads_checked(
    text: &str,
    node: &str,
    path: &Path,
    limits: &FileLimits,
    previous: Option<&WorkloadSnapshot>,
) -> Result<(WorkloadSnapshot, Vec<super::DuplicateUid>), FileSourceError> {
    let parse_err = |reason: String| FileSourceError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    if text.len() as u64 > limits.max_bytes {
        return Err(FileSourceError::Limit {
            path: path.to_path_buf(),
            what: format!(
                "{} bytes, more than the {} bytes accepted",
                text.len(),
                limits.max_bytes
            ),
        });
    }
    if text.trim().is_empty() {
        // An empty file is what a writer that truncates first leaves for a moment.
        return Err(parse_err("file is empty".into()));
    }
    let shape: FileShape = if text.trim_start().starts_with('{') {
        // serde_json bounds nesting itself (128 levels).
        serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?
    } else {
        check_yaml_bounds(text, limits).map_err(|c| match c {
            YamlCheck::Limit(what) => FileSourceError::Limit {
                path: path.to_path_buf(),
                what,
            },
            YamlCheck::Syntax(reason) => parse_err(reason),
        })?;
        serde_saphyr::from_str::<Option<FileShape>>(text)
            .map_err(|e| parse_err(e.to_string()))?
            .unwrap_or_default()
    };
    let missing = match (&shape.pods, &shape.namespaces) {
        (Some(_), Some(_)) => None,
        (None, Some(_)) => Some("`pods`"),
        (Some(_), None) => Some("`namespaces`"),
        (None, None) => Some("`pods` and no `namespaces`"),
    };
    if let Some(missing) = missing {
        return Err(FileSourceError::Incomplete {
            path: path.to_path_buf(),
            missing: missing.into(),
        });
    }
    let mut namespaces = Vec::new();
    for (i, ns) in shape.namespaces.unwrap_or_default().into_iter().enumerate() {
        let ns = ns.into_info().map_err(|source| FileSourceError::Object {
            path: path.to_path_buf(),
            index: format!("namespaces[{i}]"),
            source,
        })?;
        namespaces.push(ns);
    }
    let mut pods = Vec::new();
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
        pods.push(w);
    }
    Ok(WorkloadSnapshot::from_parts_checked(
        pods,
        namespaces,
        |w| {
            previous
                .and_then(|p| p.pods.get(&w.uid))
                .is_some_and(|held| held.key() == w.key())
        },
    ))
}

/// Read the file, refusing one larger than `max_bytes` without reading it all.
fn read_bounded(path: &Path, max_bytes: u64) -> Result<String, FileSourceError> {
    let read_err = |source| FileSourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    if len > max_bytes {
        return Err(FileSourceError::Limit {
            path: path.to_path_buf(),
            what: format!("{len} bytes, more than the {max_bytes} bytes accepted"),
        });
    }
    let mut buf = Vec::new();
    f.take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > max_bytes {
        return Err(FileSourceError::Limit {
            path: path.to_path_buf(),
            what: format!("larger than the {max_bytes} bytes accepted"),
        });
    }
    String::from_utf8(buf).map_err(|e| FileSourceError::Parse {
        path: path.to_path_buf(),
        reason: format!("not UTF-8: {e}"),
    })
}

/// Read and parse the file once (default limits).
pub fn read_workloads(path: &Path, node: &str) -> Result<WorkloadSnapshot, FileSourceError> {
    let limits = FileLimits::default();
    let text = read_bounded(path, limits.max_bytes)?;
    parse_workloads_checked(&text, node, path, &limits, None).map(|(s, _)| s)
}

/// Options of a [`FileSource`].
#[derive(Debug, Clone, Default)]
pub struct FileSourceOptions {
    /// Re-check the file at least this often (inotify can miss changes, e.g. on some network
    /// filesystems). A re-check whose content is unchanged costs a read, not a parse.
    pub resync: Duration,
    pub limits: FileLimits,
    pub metrics: WorkloadMetrics,
}

fn content_hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// A running file source; stops when dropped.
pub struct FileSource {
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl FileSource {
    /// Start watching `path`; every distinct good snapshot (and every problem) is sent to
    /// `tx`. The first read happens before this returns. Default limits, no metrics.
    pub fn spawn(
        path: PathBuf,
        node: String,
        resync: Duration,
        tx: Sender<SourceUpdate>,
    ) -> FileSource {
        Self::spawn_with(
            path,
            node,
            FileSourceOptions {
                resync,
                ..FileSourceOptions::default()
            },
            tx,
        )
    }

    /// [`FileSource::spawn`] with explicit options.
    pub fn spawn_with(
        path: PathBuf,
        node: String,
        options: FileSourceOptions,
        tx: Sender<SourceUpdate>,
    ) -> FileSource {
        let FileSourceOptions {
            resync,
            limits,
            metrics,
        } = options;
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_tx, wake_rx) = mpsc::channel::<()>();
        // inotify on the parent dir: editors and atomic writers replace the file. Only
        // events that can change the content wake the source: not opens, reads or
        // closes-after-read (the source's own reads would wake it again, forever).
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
                    content_may_change(&e.kind)
                        && e.paths
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
        // Hash of the content parsed last: an unchanged file is not parsed again.
        let mut last_hash: Option<u64> = None;
        let mut check = move |tx: &Sender<SourceUpdate>| {
            let parsed = read_bounded(&path, limits.max_bytes).and_then(|text| {
                let h = content_hash(&text);
                if last_hash == Some(h) {
                    return Ok(None);
                }
                last_hash = Some(h);
                metrics.file_parses.inc();
                parse_workloads_checked(&text, &node, &path, &limits, last_good.as_ref()).map(Some)
            });
            match parsed {
                Ok(None) => debug!(path = %path.display(), "workloads file unchanged"),
                Ok(Some((snap, dups))) => {
                    last_error = None;
                    for d in &dups {
                        warn!(path = %path.display(), conflict = %d, "duplicate pod UID in the workloads file; the first pod keeps it");
                        metrics.refused("duplicate_uid");
                    }
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
                    if matches!(e, FileSourceError::Read { .. }) {
                        // Unreadable now: whatever is there next is new content.
                        last_hash = None;
                    }
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        if !matches!(e, FileSourceError::Read { .. }) {
                            metrics.refused(e.refusal_reason());
                        }
                        warn!(error = %msg, "ignoring workloads file content; keeping the last good snapshot");
                        let _ = tx.send(SourceUpdate::Error(msg.clone()));
                        last_error = Some(msg);
                    }
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
                            // Debounce a burst of events (write + close + rename): wait until
                            // the file has been quiet for a moment.
                            let until = std::time::Instant::now() + Duration::from_millis(500);
                            while std::time::Instant::now() < until
                                && wake_rx.recv_timeout(Duration::from_millis(20)).is_ok()
                            {
                            }
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

/// Whether an inotify event on the file can mean new content: a write, a close after
/// writing, a create, a rename or a removal. Opens, reads and closes after reading (the
/// source's own reads among them) cannot.
fn content_may_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}
