//! The plugin's own fields of the CNI stdin configuration (`PluginConf`) and their
//! effective values.
//!
//! Every field any istio-cni generation put into its conflist entry (§1.2: G1 1.18–1.20,
//! G2 1.21–1.23, HEAD) is accepted, so an existing istio-cni entry works with only `type`
//! changed; unknown fields are ignored. The embedded CNI `NetConf` fields (`cniVersion`,
//! `name`, `prevResult`, ...) are parsed by `meshcni-cni`, not here. `null` is accepted for
//! every field and means "unset", as with Go's `encoding/json`.
//!
//! meshcni-specific optional fields: `pod_metadata_dir` (read pods from a
//! [`meshcni_kube::LocalPodSource`] directory instead of the API; a pod without a file there is
//! not a mesh pod), `pod_metadata_default_namespace` (the namespace of pods whose runtime passes
//! no `K8S_POD_NAMESPACE`, e.g. podman; default `default`; only with `pod_metadata_dir`),
//! `ambient_detection_failure_policy` (`closed`, the default, or `open`: what ADD does when the
//! ambient check cannot read the pod or its namespace), `iptables_binary` (`legacy`, `nft` or an
//! absolute path of an `iptables` binary; default: detect per pod) and `pod_fetch_attempts`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use meshcni_kube::EnablementSelector;
use serde::{Deserialize, Deserializer};

/// HEAD default of `cni_agent_run_dir`.
pub const DEFAULT_AGENT_RUN_DIR: &str = "/var/run/istio-cni";
/// Kubeconfig file name inside the agent run dir (HEAD).
pub const AGENT_KUBECONFIG_NAME: &str = "istio-cni-kubeconfig";
/// Agent event socket name inside the agent run dir (HEAD `pluginevent.sock`).
pub const AGENT_EVENT_SOCKET_NAME: &str = "pluginevent.sock";
/// Log socket name inside the agent run dir.
pub const LOG_SOCKET_NAME: &str = "log.sock";

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Present-but-`null` becomes `Some(empty)`; absent stays `None` (via `#[serde(default)]`).
fn null_as_some_empty<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default()))
}

/// The `kubernetes` object of G1/G2 configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KubernetesConf {
    /// Unused (as in Istio).
    #[serde(deserialize_with = "null_default")]
    pub k8s_api_root: String,
    /// Kubeconfig path (installer-filled in G1).
    #[serde(deserialize_with = "null_default")]
    pub kubeconfig: String,
    /// Rule manager; only `iptables` (or empty) is known.
    #[serde(deserialize_with = "null_default")]
    pub intercept_type: String,
    /// Unused (as in Istio).
    #[serde(deserialize_with = "null_default")]
    pub node_name: String,
    #[serde(deserialize_with = "null_default")]
    pub exclude_namespaces: Vec<String>,
    /// Unused by the plugin (as in Istio).
    #[serde(deserialize_with = "null_default")]
    pub cni_bin_dir: String,
}

/// Which `iptables` binary to use, overriding per-netns detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IptablesBinary {
    Legacy,
    Nft,
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for IptablesBinary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "legacy" => Ok(IptablesBinary::Legacy),
            "nft" => Ok(IptablesBinary::Nft),
            p if p.starts_with('/') => Ok(IptablesBinary::Path(PathBuf::from(p))),
            other => Err(serde::de::Error::custom(format!(
                "iptables_binary {other:?}: want \"legacy\", \"nft\" or an absolute path"
            ))),
        }
    }
}

/// What ADD does when ambient detection cannot read the pod or its namespace.
///
/// `closed` (default): fail the ADD (CNI error 100): the runtime retries, and an ambient pod never
/// starts uncaptured. `open`: log a warning and treat the pod as non-ambient (Istio's behaviour
/// without `enable_ambient_detection_retry`): the pod starts, possibly outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    #[default]
    Closed,
    Open,
}

/// Default of `pod_metadata_default_namespace`.
pub const DEFAULT_METADATA_NAMESPACE: &str = "default";

/// Effective log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    None,
    Error,
    Warn,
    Info,
    Debug,
}

/// Which rule backend programs sidecar capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleBackend {
    Iptables,
    Nftables,
}

/// The plugin's configuration fields (all generations).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PluginConf {
    // ---- G1 (1.18–1.20) ----
    /// `debug|info|warn|error`; G1/G2 name of `plugin_log_level`.
    #[serde(deserialize_with = "null_default")]
    pub log_level: String,
    /// Log tee socket (G1/G2).
    #[serde(deserialize_with = "null_default")]
    pub log_uds_address: String,
    #[serde(deserialize_with = "null_default")]
    pub ambient_enabled: bool,
    /// 1.18/1.19: run iptables via `nsenter`. Accepted and ignored: meshcni always enters
    /// the netns itself.
    #[serde(rename = "hostNSEnterExec", deserialize_with = "null_default")]
    pub host_nsenter_exec: bool,
    #[serde(deserialize_with = "null_default")]
    pub kubernetes: KubernetesConf,
    // ---- G2 (1.21–1.23) ----
    /// Agent event socket path.
    #[serde(deserialize_with = "null_default")]
    pub cni_event_address: String,
    // ---- HEAD ----
    #[serde(deserialize_with = "null_default")]
    pub plugin_log_level: String,
    #[serde(deserialize_with = "null_default")]
    pub cni_agent_run_dir: String,
    /// `None` when the key is absent (pre-1.27 configs); `Some(vec![])` for `[]` or `null`.
    #[serde(deserialize_with = "null_as_some_empty")]
    pub enablement_selectors: Option<Vec<EnablementSelector>>,
    /// Top-level list (1.24+); may be `null`.
    #[serde(deserialize_with = "null_default")]
    pub exclude_namespaces: Vec<String>,
    /// Namespace of the agent DaemonSet.
    #[serde(deserialize_with = "null_default")]
    pub pod_namespace: String,
    #[serde(deserialize_with = "null_default")]
    pub native_nftables: bool,
    #[serde(deserialize_with = "null_default")]
    pub enable_ambient_detection_retry: bool,
    // ---- meshcni ----
    /// Read pod/namespace metadata from this directory instead of the API server.
    pub pod_metadata_dir: Option<PathBuf>,
    /// Namespace of pods whose `CNI_ARGS` carry `K8S_POD_NAME` but no `K8S_POD_NAMESPACE`
    /// (podman); only with `pod_metadata_dir`. Default [`DEFAULT_METADATA_NAMESPACE`].
    pub pod_metadata_default_namespace: Option<String>,
    /// What ADD does when ambient detection fails; see [`FailurePolicy`].
    pub ambient_detection_failure_policy: Option<FailurePolicy>,
    /// Force an iptables binary instead of detecting legacy vs nft per pod netns.
    pub iptables_binary: Option<IptablesBinary>,
    /// Attempts for the sidecar-path pod fetch on retryable API errors (unreachable, timeout,
    /// 429, 5xx), one second apart. Default 30, as Istio's `podRetrievalMaxRetries`.
    pub pod_fetch_attempts: Option<u32>,
}

/// Why the plugin configuration is unusable (fails ADD, §1.8).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("parsing plugin configuration from stdin: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(
        "plugin configuration: kubernetes.intercept_type {0:?} is not supported (only \"iptables\")"
    )]
    UnknownInterceptType(String),
    #[error("plugin configuration: enablement_selectors[{index}]: {source}")]
    InvalidSelector {
        index: usize,
        source: meshcni_kube::SelectorError,
    },
    #[error("plugin configuration: pod_metadata_dir {0:?} must be an absolute path")]
    RelativeMetadataDir(PathBuf),
    #[error(
        "plugin configuration: pod_metadata_default_namespace is set but pod_metadata_dir is not (it only applies to the local metadata directory)"
    )]
    DefaultNamespaceWithoutDir,
    #[error("plugin configuration: pod_metadata_default_namespace {0:?} is not a namespace name")]
    InvalidDefaultNamespace(String),
}

impl PluginConf {
    /// Parse the plugin fields from the whole stdin JSON and validate them.
    pub fn from_json(stdin: &[u8]) -> Result<PluginConf, ConfigError> {
        let conf: PluginConf = serde_json::from_slice(stdin)?;
        conf.validate()?;
        Ok(conf)
    }

    /// Reject values Istio would reject at parse time (1.19+), plus meshcni's own checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.rule_backend()?;
        for (index, sel) in self.enablement_selectors.iter().flatten().enumerate() {
            sel.validate()
                .map_err(|source| ConfigError::InvalidSelector { index, source })?;
        }
        if let Some(dir) = &self.pod_metadata_dir
            && !dir.is_absolute()
        {
            return Err(ConfigError::RelativeMetadataDir(dir.clone()));
        }
        if let Some(ns) = &self.pod_metadata_default_namespace {
            if self.pod_metadata_dir.is_none() {
                return Err(ConfigError::DefaultNamespaceWithoutDir);
            }
            let valid = !ns.is_empty()
                && ns.len() <= 63
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !ns.starts_with('-')
                && !ns.ends_with('-');
            if !valid {
                return Err(ConfigError::InvalidDefaultNamespace(ns.clone()));
            }
        }
        Ok(())
    }

    /// The namespace of a pod whose runtime passed only `K8S_POD_NAME`: with a local metadata
    /// dir, `pod_metadata_default_namespace` (default `default`); with the Kubernetes API, none
    /// (kubelet always passes the namespace; such a pod is not a Kubernetes pod).
    pub fn default_pod_namespace(&self) -> Option<&str> {
        self.pod_metadata_dir.as_ref()?;
        Some(
            self.pod_metadata_default_namespace
                .as_deref()
                .unwrap_or(DEFAULT_METADATA_NAMESPACE),
        )
    }

    /// The effective [`FailurePolicy`]: the field when set; otherwise `closed`. (Istio's
    /// `enable_ambient_detection_retry: true` also means closed; only the explicit `open`
    /// restores Istio's fail-open default.)
    pub fn ambient_failure_policy(&self) -> FailurePolicy {
        self.ambient_detection_failure_policy.unwrap_or_default()
    }

    /// `cni_agent_run_dir`, default `/var/run/istio-cni`.
    pub fn agent_run_dir(&self) -> &Path {
        if self.cni_agent_run_dir.is_empty() {
            Path::new(DEFAULT_AGENT_RUN_DIR)
        } else {
            Path::new(&self.cni_agent_run_dir)
        }
    }

    /// `kubernetes.kubeconfig` if set (G1/G2), else `<cni_agent_run_dir>/istio-cni-kubeconfig`.
    pub fn kubeconfig_path(&self) -> PathBuf {
        if self.kubernetes.kubeconfig.is_empty() {
            self.agent_run_dir().join(AGENT_KUBECONFIG_NAME)
        } else {
            PathBuf::from(&self.kubernetes.kubeconfig)
        }
    }

    /// `log_uds_address` if set, else `<cni_agent_run_dir>/log.sock`.
    pub fn log_socket_path(&self) -> PathBuf {
        if self.log_uds_address.is_empty() {
            self.agent_run_dir().join(LOG_SOCKET_NAME)
        } else {
            PathBuf::from(&self.log_uds_address)
        }
    }

    /// `cni_event_address` if set (G2), else `<cni_agent_run_dir>/pluginevent.sock`.
    pub fn agent_event_socket(&self) -> PathBuf {
        if self.cni_event_address.is_empty() {
            self.agent_run_dir().join(AGENT_EVENT_SOCKET_NAME)
        } else {
            PathBuf::from(&self.cni_event_address)
        }
    }

    /// `plugin_log_level`, else `log_level`; unknown or empty → `Info`.
    pub fn log_level(&self) -> LogLevel {
        let raw = if self.plugin_log_level.is_empty() {
            &self.log_level
        } else {
            &self.plugin_log_level
        };
        match raw.to_ascii_lowercase().as_str() {
            "debug" => LogLevel::Debug,
            "warn" | "warning" => LogLevel::Warn,
            "error" => LogLevel::Error,
            "none" => LogLevel::None,
            _ => LogLevel::Info,
        }
    }

    /// Union of `kubernetes.exclude_namespaces` and top-level `exclude_namespaces`, first
    /// occurrence order, without duplicates or empty names.
    pub fn excluded_namespaces(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for ns in self
            .kubernetes
            .exclude_namespaces
            .iter()
            .chain(self.exclude_namespaces.iter())
        {
            if !ns.is_empty() && !out.contains(&ns.as_str()) {
                out.push(ns);
            }
        }
        out
    }

    /// Whether pods in `namespace` are skipped entirely.
    pub fn is_namespace_excluded(&self, namespace: &str) -> bool {
        !namespace.is_empty()
            && self
                .kubernetes
                .exclude_namespaces
                .iter()
                .chain(self.exclude_namespaces.iter())
                .any(|ns| ns == namespace)
    }

    /// nftables when `native_nftables`, else iptables; unknown `intercept_type` is an error.
    pub fn rule_backend(&self) -> Result<RuleBackend, ConfigError> {
        match self.kubernetes.intercept_type.as_str() {
            "" | "iptables" => {}
            other => return Err(ConfigError::UnknownInterceptType(other.to_string())),
        }
        Ok(if self.native_nftables {
            RuleBackend::Nftables
        } else {
            RuleBackend::Iptables
        })
    }

    /// The enablement selectors in force. Configurations from before `enablement_selectors`
    /// existed (key absent) get Istio's default selectors, which express the older rule
    /// "namespace labelled `istio.io/dataplane-mode=ambient`" plus the pod-level opt-in/out.
    pub fn enablement_selectors(&self) -> Cow<'_, [EnablementSelector]> {
        match &self.enablement_selectors {
            Some(s) => Cow::Borrowed(s.as_slice()),
            None => Cow::Owned(EnablementSelector::istio_defaults()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conflist entry istio-cni 1.20's installer writes (values filled in).
    const G1_1_20: &str = r#"{
        "cniVersion": "0.3.1",
        "name": "istio-cni",
        "type": "istio-cni",
        "log_level": "debug",
        "log_uds_address": "/var/run/istio-cni/log.sock",
        "ambient_enabled": true,
        "kubernetes": {
            "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
            "cni_bin_dir": "/opt/cni/bin",
            "exclude_namespaces": ["istio-system", "kube-system"]
        }
    }"#;

    /// 1.18's entry, with the nsenter flag and the unused k8s fields.
    const G1_1_18: &str = r#"{
        "cniVersion": "0.3.1",
        "name": "istio-cni",
        "type": "istio-cni",
        "log_level": "info",
        "log_uds_address": "/var/run/istio-cni/log.sock",
        "ambient_enabled": false,
        "hostNSEnterExec": true,
        "kubernetes": {
            "k8s_api_root": "https://10.96.0.1:443",
            "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
            "intercept_type": "iptables",
            "node_name": "kind-worker",
            "cni_bin_dir": "/opt/cni/bin",
            "exclude_namespaces": ["istio-system", "kube-system"]
        }
    }"#;

    /// 1.21's entry (G2).
    const G2_1_21: &str = r#"{
        "cniVersion": "0.3.1",
        "name": "istio-cni",
        "type": "istio-cni",
        "log_level": "info",
        "log_uds_address": "/var/run/istio-cni/log.sock",
        "cni_event_address": "/var/run/istio-cni/pluginevent.sock",
        "ambient_enabled": true,
        "kubernetes": {
            "kubeconfig": "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig",
            "cni_bin_dir": "/opt/cni/bin",
            "exclude_namespaces": ["kube-system"]
        }
    }"#;

    /// HEAD's entry as the installer golden `list-with-istio.conflist.golden` has it.
    const HEAD_GOLDEN: &str = r#"{
        "ambient_enabled": false,
        "cni_agent_run_dir": "/path/to/kubeconfig",
        "dns": {},
        "enable_ambient_detection_retry": false,
        "enablement_selectors": [],
        "exclude_namespaces": null,
        "ipam": {},
        "name": "istio-cni",
        "native_nftables": false,
        "plugin_log_level": "debug",
        "pod_namespace": "my-namespace",
        "type": "istio-cni"
    }"#;

    /// HEAD with ambient on and the Helm default selectors.
    const HEAD_AMBIENT: &str = r#"{
        "cniVersion": "1.0.0",
        "name": "istio-cni",
        "type": "istio-cni",
        "plugin_log_level": "info",
        "cni_agent_run_dir": "/var/run/istio-cni",
        "ambient_enabled": true,
        "enablement_selectors": [
            {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
            {"podSelector": {"matchExpressions": [{"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}]},
             "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}}
        ],
        "exclude_namespaces": ["kube-system"],
        "pod_namespace": "istio-system",
        "native_nftables": true,
        "enable_ambient_detection_retry": true
    }"#;

    fn parse(s: &str) -> PluginConf {
        PluginConf::from_json(s.as_bytes()).expect("valid conf")
    }

    #[test]
    fn g1_1_20_entry() {
        let c = parse(G1_1_20);
        assert!(c.ambient_enabled);
        assert_eq!(c.log_level(), LogLevel::Debug);
        assert_eq!(
            c.kubeconfig_path(),
            PathBuf::from("/etc/cni/net.d/ZZZ-istio-cni-kubeconfig")
        );
        assert_eq!(c.excluded_namespaces(), ["istio-system", "kube-system"]);
        assert!(c.is_namespace_excluded("kube-system"));
        assert!(!c.is_namespace_excluded("default"));
        assert_eq!(
            c.log_socket_path(),
            PathBuf::from("/var/run/istio-cni/log.sock")
        );
        assert_eq!(c.rule_backend().expect("backend"), RuleBackend::Iptables);
        assert!(c.enablement_selectors.is_none());
        assert_eq!(
            c.enablement_selectors().as_ref(),
            EnablementSelector::istio_defaults().as_slice()
        );
    }

    #[test]
    fn g1_1_18_entry() {
        let c = parse(G1_1_18);
        assert!(c.host_nsenter_exec);
        assert_eq!(c.kubernetes.k8s_api_root, "https://10.96.0.1:443");
        assert_eq!(c.kubernetes.node_name, "kind-worker");
        assert_eq!(c.log_level(), LogLevel::Info);
        assert_eq!(c.rule_backend().expect("backend"), RuleBackend::Iptables);
    }

    #[test]
    fn g2_1_21_entry() {
        let c = parse(G2_1_21);
        assert_eq!(
            c.agent_event_socket(),
            PathBuf::from("/var/run/istio-cni/pluginevent.sock")
        );
        assert_eq!(c.excluded_namespaces(), ["kube-system"]);
    }

    #[test]
    fn head_golden_entry() {
        let c = parse(HEAD_GOLDEN);
        assert!(!c.ambient_enabled);
        assert_eq!(c.log_level(), LogLevel::Debug);
        assert_eq!(c.pod_namespace, "my-namespace");
        assert_eq!(
            c.kubeconfig_path(),
            PathBuf::from("/path/to/kubeconfig/istio-cni-kubeconfig")
        );
        assert_eq!(
            c.agent_event_socket(),
            PathBuf::from("/path/to/kubeconfig/pluginevent.sock")
        );
        assert_eq!(
            c.log_socket_path(),
            PathBuf::from("/path/to/kubeconfig/log.sock")
        );
        assert!(c.excluded_namespaces().is_empty(), "null list");
        assert_eq!(c.enablement_selectors, Some(vec![]));
        assert!(
            c.enablement_selectors().is_empty(),
            "explicit [] selects nothing"
        );
    }

    #[test]
    fn head_ambient_entry() {
        let c = parse(HEAD_AMBIENT);
        assert!(c.ambient_enabled && c.enable_ambient_detection_retry);
        assert_eq!(c.rule_backend().expect("backend"), RuleBackend::Nftables);
        assert_eq!(
            c.enablement_selectors().as_ref(),
            EnablementSelector::istio_defaults().as_slice()
        );
        assert_eq!(
            c.kubeconfig_path(),
            PathBuf::from("/var/run/istio-cni/istio-cni-kubeconfig")
        );
    }

    #[test]
    fn defaults_when_empty() {
        let c = parse("{}");
        assert_eq!(c.agent_run_dir(), Path::new(DEFAULT_AGENT_RUN_DIR));
        assert_eq!(
            c.kubeconfig_path(),
            PathBuf::from("/var/run/istio-cni/istio-cni-kubeconfig")
        );
        assert_eq!(c.log_level(), LogLevel::Info);
        assert!(c.pod_metadata_dir.is_none() && c.iptables_binary.is_none());
    }

    #[test]
    fn nulls_everywhere_mean_unset() {
        let c = parse(
            r#"{"log_level":null,"ambient_enabled":null,"kubernetes":null,"exclude_namespaces":null,
                "enablement_selectors":null,"native_nftables":null,"pod_namespace":null}"#,
        );
        assert_eq!(c.enablement_selectors, Some(vec![]));
        assert!(!c.ambient_enabled);
        let c = parse(r#"{"kubernetes":{"exclude_namespaces":null,"kubeconfig":null}}"#);
        assert!(c.excluded_namespaces().is_empty());
    }

    #[test]
    fn exclusions_are_a_union() {
        let c = parse(
            r#"{"kubernetes":{"exclude_namespaces":["a","b",""]},"exclude_namespaces":["b","c"]}"#,
        );
        assert_eq!(c.excluded_namespaces(), ["a", "b", "c"]);
        for ns in ["a", "b", "c"] {
            assert!(c.is_namespace_excluded(ns));
        }
        assert!(!c.is_namespace_excluded(""));
    }

    #[test]
    fn meshcni_fields() {
        let c = parse(r#"{"pod_metadata_dir":"/run/meshcni/pods","iptables_binary":"nft"}"#);
        assert_eq!(c.pod_metadata_dir, Some(PathBuf::from("/run/meshcni/pods")));
        assert_eq!(c.iptables_binary, Some(IptablesBinary::Nft));
        let c = parse(r#"{"iptables_binary":"/usr/sbin/iptables-legacy"}"#);
        assert_eq!(
            c.iptables_binary,
            Some(IptablesBinary::Path("/usr/sbin/iptables-legacy".into()))
        );
        assert_eq!(
            parse(r#"{"iptables_binary":"legacy"}"#).iptables_binary,
            Some(IptablesBinary::Legacy)
        );
    }

    #[test]
    fn default_namespace_and_failure_policy() {
        let c = parse(r#"{"pod_metadata_dir":"/m"}"#);
        assert_eq!(c.default_pod_namespace(), Some("default"));
        let c = parse(r#"{"pod_metadata_dir":"/m","pod_metadata_default_namespace":"demo"}"#);
        assert_eq!(c.default_pod_namespace(), Some("demo"));
        assert_eq!(parse("{}").default_pod_namespace(), None, "API: no default");
        assert_eq!(parse("{}").ambient_failure_policy(), FailurePolicy::Closed);
        assert_eq!(
            parse(r#"{"ambient_detection_failure_policy":"open"}"#).ambient_failure_policy(),
            FailurePolicy::Open
        );
        assert_eq!(
            parse(r#"{"ambient_detection_failure_policy":"closed"}"#).ambient_failure_policy(),
            FailurePolicy::Closed
        );
    }

    #[test]
    fn log_level_precedence() {
        let c = parse(r#"{"log_level":"debug","plugin_log_level":"warn"}"#);
        assert_eq!(c.log_level(), LogLevel::Warn);
        assert_eq!(
            parse(r#"{"log_level":"error"}"#).log_level(),
            LogLevel::Error
        );
        assert_eq!(
            parse(r#"{"log_level":"bogus"}"#).log_level(),
            LogLevel::Info
        );
        assert_eq!(
            parse(r#"{"plugin_log_level":"none"}"#).log_level(),
            LogLevel::None
        );
    }

    /// Each invalid document and a phrase its error must contain.
    #[test]
    fn invalid_configs() {
        for (doc, want) in [
            (
                r#"{"kubernetes":{"intercept_type":"ebpf"}}"#,
                "intercept_type \"ebpf\"",
            ),
            (
                r#"{"enablement_selectors":[{},{"podSelector":{"matchExpressions":[{"key":"k","operator":"In"}]}}]}"#,
                "enablement_selectors[1]",
            ),
            (
                r#"{"enablement_selectors":[{"podSelector":{"matchExpressions":[{"key":"k","operator":"Bogus"}]}}]}"#,
                "unknown variant",
            ),
            (
                r#"{"iptables_binary":"iptables"}"#,
                "want \"legacy\", \"nft\"",
            ),
            (r#"{"pod_metadata_dir":"pods"}"#, "absolute"),
            (
                r#"{"pod_metadata_default_namespace":"demo"}"#,
                "pod_metadata_dir is not",
            ),
            (
                r#"{"pod_metadata_dir":"/m","pod_metadata_default_namespace":"../x"}"#,
                "not a namespace name",
            ),
            (
                r#"{"ambient_detection_failure_policy":"sometimes"}"#,
                "unknown variant",
            ),
            (r#"{"ambient_enabled":"yes"}"#, "invalid type"),
            (r#"{"exclude_namespaces":"kube-system"}"#, "invalid type"),
            ("not json", "parsing plugin configuration"),
        ] {
            let err = PluginConf::from_json(doc.as_bytes()).expect_err(doc);
            assert!(err.to_string().contains(want), "{doc}: {err}");
        }
    }
}
