//! Blocking list + watch of a Kubernetes collection, and a [`Reflector`] that keeps a local
//! copy of it current (the node agent's informer, without an async runtime or a full client).
//!
//! Protocol (as the API server speaks it): `GET <collection>?fieldSelector=...` answers a
//! `*List` whose `metadata.resourceVersion` is the point to watch from; `GET
//! <collection>?watch=1&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=<n>`
//! streams one JSON object per event, `{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR",
//! "object":{...}}`, until the server ends it after `timeoutSeconds`. Every object carries its
//! `metadata.resourceVersion`; watching again from the last one seen resumes without loss.
//! When that version is too old (etcd compaction) the server sends an `ERROR` event with a
//! `Status` of code 410 (Gone), or answers 410 outright: the client must list again.
//!
//! Objects are kept as `serde_json::Value` so callers decode only the fields they need.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::ApiClient;
use crate::error::KubeError;

/// A collection to list and watch, e.g. pods on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// Collection path, e.g. `/api/v1/pods` or `/api/v1/namespaces`.
    pub path: String,
    /// `fieldSelector`, e.g. `spec.nodeName=node-1`.
    pub field_selector: Option<String>,
    /// `labelSelector`.
    pub label_selector: Option<String>,
}

impl Resource {
    /// Pods scheduled to `node` (all namespaces).
    pub fn pods_on_node(node: &str) -> Resource {
        Resource {
            path: "/api/v1/pods".into(),
            field_selector: Some(format!("spec.nodeName={node}")),
            label_selector: None,
        }
    }

    /// All namespaces.
    pub fn namespaces() -> Resource {
        Resource {
            path: "/api/v1/namespaces".into(),
            field_selector: None,
            label_selector: None,
        }
    }

    fn selectors(&self) -> Vec<(&str, &str)> {
        let mut q = Vec::new();
        if let Some(f) = &self.field_selector {
            q.push(("fieldSelector", f.as_str()));
        }
        if let Some(l) = &self.label_selector {
            q.push(("labelSelector", l.as_str()));
        }
        q
    }
}

/// A list answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectList {
    /// `metadata.resourceVersion` of the list: watch from here.
    pub resource_version: String,
    pub items: Vec<Value>,
}

/// One watch event.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Added(Value),
    Modified(Value),
    Deleted(Value),
    /// Progress marker: nothing changed up to this version.
    Bookmark {
        resource_version: String,
    },
    /// The server reported a failure inside the stream (`Status` object).
    Error {
        code: u16,
        reason: String,
        message: String,
    },
}

impl WatchEvent {
    /// Parse one line of a watch stream.
    pub fn parse(line: &str) -> Result<WatchEvent, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let typ = v["type"].as_str().unwrap_or_default().to_string();
        let object = v.get("object").cloned().unwrap_or(Value::Null);
        match typ.as_str() {
            "ADDED" => Ok(WatchEvent::Added(object)),
            "MODIFIED" => Ok(WatchEvent::Modified(object)),
            "DELETED" => Ok(WatchEvent::Deleted(object)),
            "BOOKMARK" => Ok(WatchEvent::Bookmark {
                resource_version: resource_version(&object).to_string(),
            }),
            "ERROR" => Ok(WatchEvent::Error {
                code: object["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(0),
                reason: object["reason"].as_str().unwrap_or_default().to_string(),
                message: object["message"].as_str().unwrap_or_default().to_string(),
            }),
            other => Err(format!("unknown watch event type {other:?}")),
        }
    }
}

/// `metadata.resourceVersion` of an object (empty if absent).
pub fn resource_version(object: &Value) -> &str {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
}

/// Store key of an object: `namespace/name`, or `name` for cluster-scoped objects.
pub fn object_key(object: &Value) -> String {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

/// Largest list body accepted (thousands of pods with managedFields fit).
const MAX_LIST_BODY: u64 = 256 * 1024 * 1024;
/// Longest single watch event line accepted.
const MAX_EVENT_LINE: u64 = 16 * 1024 * 1024;

impl ApiClient {
    /// List `resource`. `timeout` covers the whole exchange.
    pub fn list(&self, resource: &Resource, timeout: Duration) -> Result<ObjectList, KubeError> {
        let (url, body) = self.get_stream(&resource.path, &resource.selectors(), timeout)?;
        let v: Value = serde_json::from_reader(body.take(MAX_LIST_BODY)).map_err(|e| {
            match e.io_error_kind() {
                Some(kind) => self.stream_error(&url, &std::io::Error::from(kind)),
                None => KubeError::BadResponse {
                    url: url.clone(),
                    reason: format!("not a list: {e}"),
                },
            }
        })?;
        let items = match v.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                return Err(KubeError::BadResponse {
                    url,
                    reason: format!("\"items\" is not an array: {other}"),
                });
            }
        };
        Ok(ObjectList {
            resource_version: resource_version(&v).to_string(),
            items,
        })
    }

    /// Start watching `resource` from `resource_version`. The server ends the stream after
    /// `server_timeout`; the client gives up `server_timeout + 30 s` after the request.
    pub fn watch(
        &self,
        resource: &Resource,
        resource_version: &str,
        server_timeout: Duration,
    ) -> Result<WatchStream<'_>, KubeError> {
        let secs = server_timeout.as_secs().max(1).to_string();
        let mut q = resource.selectors();
        q.extend([
            ("watch", "1"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", secs.as_str()),
        ]);
        let (url, body) = self.get_stream(
            &resource.path,
            &q,
            Duration::from_secs(secs.parse::<u64>().unwrap_or(1) + 30),
        )?;
        Ok(WatchStream {
            client: self,
            url,
            reader: BufReader::new(body),
            done: false,
        })
    }
}

/// An open watch; iterate to read events. Ends (`None`) when the server closes the stream.
pub struct WatchStream<'a> {
    client: &'a ApiClient,
    url: String,
    reader: BufReader<Box<dyn Read + Send + Sync + 'static>>,
    done: bool,
}

impl std::fmt::Debug for WatchStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Iterator for WatchStream<'_> {
    type Item = Result<WatchEvent, KubeError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let mut line = String::new();
            match (&mut self.reader).take(MAX_EVENT_LINE).read_line(&mut line) {
                Ok(0) => self.done = true,
                Ok(_) if line.trim().is_empty() => continue,
                Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_EVENT_LINE => {
                    self.done = true;
                    return Some(Err(KubeError::BadResponse {
                        url: self.url.clone(),
                        reason: format!("watch event longer than {MAX_EVENT_LINE} bytes"),
                    }));
                }
                Ok(_) => {
                    return Some(WatchEvent::parse(line.trim()).map_err(|reason| {
                        KubeError::BadResponse {
                            url: self.url.clone(),
                            reason: format!("watch event: {reason}"),
                        }
                    }));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.client.stream_error(&self.url, &e)));
                }
            }
        }
        None
    }
}

/// How a [`Reflector::watch_once`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEnd {
    /// The server closed the stream normally (timeout): watch again from the current version.
    Closed,
    /// The version is gone (410): list again.
    Expired { message: String },
}

/// Timing of a [`Reflector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReflectorOptions {
    /// `timeoutSeconds` of each watch request.
    pub watch_timeout: Duration,
    /// Full relist at least this often (repairs anything a watch may have missed).
    pub resync: Duration,
    /// Timeout of a list request.
    pub list_timeout: Duration,
    /// First delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for ReflectorOptions {
    fn default() -> Self {
        ReflectorOptions {
            watch_timeout: Duration::from_secs(300),
            resync: Duration::from_secs(600),
            list_timeout: Duration::from_secs(60),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A local, current copy of one collection: list, then watch from the list's version,
/// applying events; relist on 410 and on the resync period; back off on errors.
#[derive(Debug, Clone)]
pub struct Reflector {
    resource: Resource,
    options: ReflectorOptions,
    store: BTreeMap<String, Value>,
    resource_version: String,
    synced: bool,
}

/// Why [`Reflector::run`] calls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChange {
    /// A (re)list replaced the whole store.
    Relisted,
    /// One watch event changed it.
    Event,
}

impl Reflector {
    pub fn new(resource: Resource, options: ReflectorOptions) -> Reflector {
        Reflector {
            resource,
            options,
            store: BTreeMap::new(),
            resource_version: String::new(),
            synced: false,
        }
    }

    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// The objects, keyed by [`object_key`].
    pub fn store(&self) -> &BTreeMap<String, Value> {
        &self.store
    }

    /// The version watches resume from.
    pub fn resource_version(&self) -> &str {
        &self.resource_version
    }

    /// Whether a list has succeeded at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// List and replace the store.
    pub fn relist(&mut self, client: &ApiClient) -> Result<(), KubeError> {
        let list = client.list(&self.resource, self.options.list_timeout)?;
        self.store = list
            .items
            .into_iter()
            .map(|o| (object_key(&o), o))
            .collect();
        self.resource_version = list.resource_version;
        self.synced = true;
        Ok(())
    }

    /// Apply one event to the store; returns whether the store changed. `Err` carries a
    /// 410 as [`WatchEnd::Expired`] and any other `ERROR` event as an API error.
    pub fn apply(&mut self, event: WatchEvent) -> Result<bool, ApplyError> {
        match event {
            WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                let rv = resource_version(&o).to_string();
                if !rv.is_empty() {
                    self.resource_version = rv;
                }
                let key = object_key(&o);
                let changed = self.store.get(&key) != Some(&o);
                self.store.insert(key, o);
                Ok(changed)
            }
            WatchEvent::Deleted(o) => {
                let rv = resource_version(&o).to_string();
                if !rv.is_empty() {
                    self.resource_version = rv;
                }
                Ok(self.store.remove(&object_key(&o)).is_some())
            }
            WatchEvent::Bookmark { resource_version } => {
                if !resource_version.is_empty() {
                    self.resource_version = resource_version;
                }
                Ok(false)
            }
            WatchEvent::Error {
                code: 410, message, ..
            } => Err(ApplyError::Expired(message)),
            WatchEvent::Error {
                code,
                reason,
                message,
            } => Err(ApplyError::Api {
                code,
                reason,
                message,
            }),
        }
    }

    /// One watch request from the current version, applying events until the stream ends.
    /// `on_change` runs after every event that changed the store.
    pub fn watch_once(
        &mut self,
        client: &ApiClient,
        on_change: &mut dyn FnMut(&Reflector, StoreChange),
    ) -> Result<WatchEnd, KubeError> {
        let stream = match client.watch(
            &self.resource,
            &self.resource_version,
            self.options.watch_timeout,
        ) {
            Ok(s) => s,
            Err(KubeError::Api {
                status: 410,
                message,
                ..
            }) => return Ok(WatchEnd::Expired { message }),
            Err(e) => return Err(e),
        };
        for event in stream {
            match self.apply(event?) {
                Ok(true) => on_change(self, StoreChange::Event),
                Ok(false) => {}
                Err(ApplyError::Expired(message)) => return Ok(WatchEnd::Expired { message }),
                Err(ApplyError::Api {
                    code,
                    reason,
                    message,
                }) => {
                    return Err(KubeError::Api {
                        url: self.resource.path.clone(),
                        status: code,
                        message: format!("watch ERROR event ({reason}): {message}"),
                    });
                }
            }
        }
        Ok(WatchEnd::Closed)
    }

    /// Keep the store current until `stop()` returns true (checked between requests and
    /// during back-off sleeps; a watch in progress ends at its server timeout at the latest).
    /// `on_change` runs after every relist and every changing event; `on_error` for every
    /// failure (the loop then backs off and relists).
    pub fn run(
        &mut self,
        client: &ApiClient,
        stop: &dyn Fn() -> bool,
        on_change: &mut dyn FnMut(&Reflector, StoreChange),
        on_error: &mut dyn FnMut(&KubeError),
    ) {
        let mut backoff = self.options.min_backoff;
        let mut need_list = true;
        let mut last_list = Instant::now();
        while !stop() {
            if need_list || last_list.elapsed() >= self.options.resync {
                match self.relist(client) {
                    Ok(()) => {
                        need_list = false;
                        last_list = Instant::now();
                        backoff = self.options.min_backoff;
                        on_change(self, StoreChange::Relisted);
                    }
                    Err(e) => {
                        on_error(&e);
                        sleep_unless_stopped(backoff, stop);
                        backoff = (backoff * 2).min(self.options.max_backoff);
                        continue;
                    }
                }
            }
            match self.watch_once(client, on_change) {
                Ok(WatchEnd::Closed) => backoff = self.options.min_backoff,
                Ok(WatchEnd::Expired { message }) => {
                    tracing::info!(
                        resource = %self.resource.path,
                        %message,
                        "watch version expired; relisting"
                    );
                    need_list = true;
                }
                Err(e) => {
                    on_error(&e);
                    // Anything may have been missed: relist after the pause.
                    need_list = true;
                    sleep_unless_stopped(backoff, stop);
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }
}

/// A watch event that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("resource version expired (410 Gone): {0}")]
    Expired(String),
    #[error("watch ERROR event {code} ({reason}): {message}")]
    Api {
        code: u16,
        reason: String,
        message: String,
    },
}

fn sleep_unless_stopped(d: Duration, stop: &dyn Fn() -> bool) {
    let end = Instant::now() + d;
    while !stop() {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_watch_events() {
        let e = WatchEvent::parse(
            r#"{"type":"ADDED","object":{"metadata":{"name":"a","namespace":"n","resourceVersion":"7"}}}"#,
        )
        .expect("added");
        assert!(matches!(e, WatchEvent::Added(ref o) if resource_version(o) == "7"));
        let e = WatchEvent::parse(
            r#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version: 1 (5)"}}"#,
        )
        .expect("error");
        assert_eq!(
            e,
            WatchEvent::Error {
                code: 410,
                reason: "Expired".into(),
                message: "too old resource version: 1 (5)".into()
            }
        );
        assert!(WatchEvent::parse(r#"{"type":"WHAT","object":{}}"#).is_err());
        assert!(WatchEvent::parse("{").is_err());
    }

    #[test]
    fn reflector_applies_events_and_tracks_version() {
        let mut r = Reflector::new(Resource::namespaces(), ReflectorOptions::default());
        let ns = |rv: &str, label: &str| json!({"metadata":{"name":"a","resourceVersion":rv,"labels":{"x":label}}});
        assert_eq!(r.apply(WatchEvent::Added(ns("1", "1"))), Ok(true));
        assert_eq!(r.resource_version(), "1");
        assert_eq!(r.apply(WatchEvent::Modified(ns("1", "1"))), Ok(false));
        assert_eq!(r.apply(WatchEvent::Modified(ns("2", "2"))), Ok(true));
        assert_eq!(
            r.apply(WatchEvent::Bookmark {
                resource_version: "9".into()
            }),
            Ok(false)
        );
        assert_eq!(r.resource_version(), "9");
        assert_eq!(r.apply(WatchEvent::Deleted(ns("10", "2"))), Ok(true));
        assert!(r.store().is_empty());
        assert_eq!(r.resource_version(), "10");
        assert_eq!(
            r.apply(WatchEvent::Error {
                code: 410,
                reason: "Expired".into(),
                message: "old".into()
            }),
            Err(ApplyError::Expired("old".into()))
        );
    }

    #[test]
    fn object_keys() {
        assert_eq!(
            object_key(&json!({"metadata":{"name":"p","namespace":"n"}})),
            "n/p"
        );
        assert_eq!(object_key(&json!({"metadata":{"name":"n"}})), "n");
    }
}
