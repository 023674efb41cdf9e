//! `InstallConfig`: every knob of the installer, mirroring the reference flags/env (spec §5.1).
//! The agent maps its clap flags onto these fields; `Default` gives meshcni's production values.

use std::path::PathBuf;
use std::time::Duration;

use crate::conflist::{
    ConfigError, OwnedTypes, PluginConfig, TemplateVars, parse_enablement_selectors,
    parse_exclude_namespaces,
};

/// Installer settings. Paths are as seen by the installer process (inside its container);
/// `cni_net_dir` and `cni_agent_run_dir` are host paths written into configs verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallConfig {
    /// `--mounted-cni-net-dir` / `MOUNTED_CNI_NET_DIR`: the CNI config directory the installer
    /// edits (host `/etc/cni/net.d` mounted at `/host/etc/cni/net.d`).
    pub mounted_cni_net_dir: PathBuf,
    /// `--cni-net-dir`: the same directory as the host sees it; only used for the G1 template's
    /// `__KUBECONFIG_FILEPATH__` (= `cni_net_dir/kubecfg_file_name`).
    pub cni_net_dir: PathBuf,
    /// `--cni-conf-name` / `CNI_CONF_NAME`: the primary config file name. Empty: chained mode
    /// picks the first valid file (kubelet order), standalone writes `YYY-<plugin_type>.conf`.
    pub cni_conf_name: String,
    /// `--chained-cni-plugin` / `CHAINED_CNI_PLUGIN`: insert into the primary's list (true) or
    /// write a standalone config (false).
    pub chained_cni_plugin: bool,
    /// `--cni-network-config` / `CNI_NETWORK_CONFIG`: G1 plugin config template. Empty (and no
    /// template file) = the HEAD-shaped [`PluginConfig`] built from the fields below.
    pub cni_network_config: String,
    /// `--cni-network-config-file` / `CNI_NETWORK_CONFIG_FILE`: template file; used instead of
    /// `cni_network_config` when it exists.
    pub cni_network_config_file: Option<PathBuf>,
    /// `--kubecfg-file-name` / `KUBECFG_FILE_NAME`: file name of the plugin kubeconfig.
    pub kubecfg_file_name: String,
    /// Where the kubeconfig is written (installer's view). `None` = `cni_agent_run_dir` (HEAD
    /// layout); set it to `mounted_cni_net_dir` for the G1 layout.
    pub kubeconfig_dir: Option<PathBuf>,
    /// `--kubeconfig-mode` / `KUBECONFIG_MODE` (0600).
    pub kubeconfig_mode: u32,
    /// `--kube-ca-file` / `KUBE_CA_FILE`: `None` = `<service_account_dir>/ca.crt`.
    pub kube_ca_file: Option<PathBuf>,
    /// `--skip-tls-verify` / `SKIP_TLS_VERIFY`.
    pub skip_tls_verify: bool,
    /// `KUBERNETES_SERVICE_PROTOCOL` (empty = https).
    pub k8s_service_protocol: String,
    /// `KUBERNETES_SERVICE_HOST` (required for the kubeconfig).
    pub k8s_service_host: String,
    /// `KUBERNETES_SERVICE_PORT` (required for the kubeconfig).
    pub k8s_service_port: String,
    /// `KUBERNETES_NODE_NAME` (G1 template `__KUBERNETES_NODE_NAME__`).
    pub k8s_node_name: String,
    /// Service-account directory holding `token` (and `ca.crt`); watched for token rotation.
    pub service_account_dir: PathBuf,
    /// `--cni-agent-run-dir` / `CNI_AGENT_RUN_DIR`: copied verbatim into the plugin config.
    pub cni_agent_run_dir: PathBuf,
    /// `--istio-owned-cni-config` / `ISTIO_OWNED_CNI_CONFIG`: with chained + ambient, never edit
    /// the primary file; write primary+ours into our own file that sorts first.
    pub istio_owned_cni_config: bool,
    /// `--istio-owned-cni-config-filename`; empty = `02-<plugin_type>.conflist`.
    pub istio_owned_cni_config_filename: String,
    /// `--cni-conf-group-read`: files we create get 0640 instead of 0600.
    pub cni_conf_group_read: bool,
    /// Source directory of the plugin binaries (`/opt/cni/bin` in the image).
    pub cni_bin_source_dir: PathBuf,
    /// Binary names to install from `cni_bin_source_dir`; empty = every regular file (reference
    /// behaviour). Uninstall removes exactly these names from every target dir.
    pub cni_bin_names: Vec<String>,
    /// Target directories (`/host/opt/cni/bin`, optional secondary dirs). Non-writable ones are
    /// skipped with a log line.
    pub cni_bin_target_dirs: Vec<PathBuf>,
    /// The plugin `type` we install (`meshcni`; the Istio fixtures use `istio-cni`).
    pub plugin_type: String,
    /// The plugin entry's `name`.
    pub plugin_name: String,
    /// Other plugin types whose entries are replaced by ours (migration from `istio-cni`).
    pub replace_plugin_types: Vec<String>,
    /// Plugin config `plugin_log_level` (and G1 `__LOG_LEVEL__`).
    pub plugin_log_level: String,
    /// G1 `__LOG_UDS_ADDRESS__` (`--log-uds-address`).
    pub log_uds_address: String,
    /// `--ambient-enabled` / `AMBIENT_ENABLED`.
    pub ambient_enabled: bool,
    /// `AMBIENT_ENABLEMENT_SELECTOR` (YAML list; empty = `[]`).
    pub ambient_enablement_selector: String,
    /// `EXCLUDE_NAMESPACES` (comma list; empty = `null`).
    pub exclude_namespaces: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `NATIVE_NFTABLES`.
    pub native_nftables: bool,
    /// `ENABLE_AMBIENT_DETECTION_RETRY`.
    pub enable_ambient_detection_retry: bool,
    /// meshcni's own plugin fields (`POD_METADATA_DIR`, ...); merged into templates too.
    pub meshcni_plugin_fields: crate::agent_settings::AgentPluginFields,
    /// Where the installer keeps what uninstall needs to give the primary CNI's config back
    /// byte for byte (the original file and the bytes we wrote, [`crate::backup`]). `None`:
    /// no record; uninstall then cuts our entry out of the file's current bytes and a `.conf`
    /// we converted stays a `.conflist` (the reference's behaviour). The agent uses its run
    /// dir.
    pub state_dir: Option<PathBuf>,
    /// Keeper tuning.
    pub keeper: KeeperTuning,
}

/// Timing of the keeper loop.
#[derive(Debug, Clone, PartialEq)]
pub struct KeeperTuning {
    /// Periodic full re-check even without file events (watches can miss events).
    pub resync_interval: Duration,
    /// Rewrite-loop detection: more than `loop_threshold` re-inserts within `loop_window` …
    pub loop_window: Duration,
    pub loop_threshold: usize,
    /// … switches re-insert logging from one info line each to a warning that summarises them,
    /// repeated after `loop_backoff_base * 2^n` (n = warnings so far in this loop), capped at
    /// `loop_backoff_max`. Only logging backs off: every re-insert happens at once.
    pub loop_backoff_base: Duration,
    pub loop_backoff_max: Duration,
    /// Delay before retrying a failed install pass when no file event comes first (doubles up
    /// to `resync_interval`).
    pub error_retry: Duration,
}

impl Default for KeeperTuning {
    fn default() -> Self {
        KeeperTuning {
            resync_interval: Duration::from_secs(5),
            loop_window: Duration::from_secs(30),
            loop_threshold: 10,
            loop_backoff_base: Duration::from_millis(500),
            loop_backoff_max: Duration::from_secs(10),
            error_retry: Duration::from_millis(500),
        }
    }
}

impl Default for InstallConfig {
    fn default() -> Self {
        InstallConfig {
            mounted_cni_net_dir: "/host/etc/cni/net.d".into(),
            cni_net_dir: "/etc/cni/net.d".into(),
            cni_conf_name: String::new(),
            chained_cni_plugin: true,
            cni_network_config: String::new(),
            cni_network_config_file: None,
            kubecfg_file_name: "meshcni-kubeconfig".into(),
            kubeconfig_dir: None,
            kubeconfig_mode: 0o600,
            kube_ca_file: None,
            skip_tls_verify: false,
            k8s_service_protocol: String::new(),
            k8s_service_host: String::new(),
            k8s_service_port: String::new(),
            k8s_node_name: String::new(),
            service_account_dir: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            cni_agent_run_dir: "/var/run/meshcni".into(),
            istio_owned_cni_config: false,
            istio_owned_cni_config_filename: String::new(),
            cni_conf_group_read: false,
            cni_bin_source_dir: "/opt/cni/bin".into(),
            cni_bin_names: vec!["meshcni".into()],
            cni_bin_target_dirs: vec!["/host/opt/cni/bin".into()],
            plugin_type: "meshcni".into(),
            plugin_name: "meshcni".into(),
            replace_plugin_types: vec!["istio-cni".into()],
            plugin_log_level: "info".into(),
            log_uds_address: String::new(),
            ambient_enabled: false,
            ambient_enablement_selector: String::new(),
            exclude_namespaces: String::new(),
            pod_namespace: String::new(),
            native_nftables: false,
            enable_ambient_detection_retry: false,
            meshcni_plugin_fields: Default::default(),
            state_dir: None,
            keeper: KeeperTuning::default(),
        }
    }
}

impl InstallConfig {
    /// Istio-owned mode is active only with chained + ambient (spec §5.3).
    pub fn owned_mode(&self) -> bool {
        self.istio_owned_cni_config && self.chained_cni_plugin && self.ambient_enabled
    }

    /// The file name of our own conflist in owned mode.
    pub fn owned_file_name(&self) -> String {
        if self.istio_owned_cni_config_filename.is_empty() {
            format!("02-{}.conflist", self.plugin_type)
        } else {
            self.istio_owned_cni_config_filename.clone()
        }
    }

    /// Standalone default file name (`YYY-istio-cni.conf` in the reference).
    pub fn standalone_file_name(&self) -> String {
        if self.cni_conf_name.is_empty() {
            format!("YYY-{}.conf", self.plugin_type)
        } else {
            self.cni_conf_name.clone()
        }
    }

    /// Mode for config files we create (0600, or 0640 with `cni_conf_group_read`).
    pub fn created_file_mode(&self) -> u32 {
        if self.cni_conf_group_read {
            0o640
        } else {
            0o600
        }
    }

    pub fn owned_types(&self) -> OwnedTypes {
        let replaces: Vec<&str> = self
            .replace_plugin_types
            .iter()
            .map(String::as_str)
            .collect();
        OwnedTypes::new(self.plugin_type.clone(), &replaces)
    }

    /// Whether the plugin needs the kubeconfig: not when it reads pods from a local
    /// pod-metadata directory (hosts without Kubernetes, no service account to build it from).
    pub fn needs_kubeconfig(&self) -> bool {
        self.meshcni_plugin_fields.pod_metadata_dir.is_none()
    }

    /// The uninstall record ([`crate::backup`]), when a state dir is configured.
    pub fn backup_path(&self) -> Option<PathBuf> {
        self.state_dir.as_deref().map(crate::backup::path_in)
    }

    /// Where the kubeconfig is written.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig_dir
            .clone()
            .unwrap_or_else(|| self.cni_agent_run_dir.clone())
            .join(&self.kubecfg_file_name)
    }

    /// The HEAD-shaped plugin config.
    pub fn plugin_config(&self) -> Result<PluginConfig, ConfigError> {
        let excl = parse_exclude_namespaces(&self.exclude_namespaces);
        Ok(PluginConfig {
            cni_version: "0.3.1".into(),
            name: self.plugin_name.clone(),
            plugin_type: self.plugin_type.clone(),
            plugin_log_level: self.plugin_log_level.clone(),
            cni_agent_run_dir: self.cni_agent_run_dir.to_string_lossy().into_owned(),
            ambient_enabled: self.ambient_enabled,
            enablement_selectors: parse_enablement_selectors(&self.ambient_enablement_selector)?,
            exclude_namespaces: if excl.is_empty() { None } else { Some(excl) },
            pod_namespace: self.pod_namespace.clone(),
            native_nftables: self.native_nftables,
            enable_ambient_detection_retry: self.enable_ambient_detection_retry,
            meshcni: self.meshcni_plugin_fields.clone(),
        })
    }

    /// Values for the G1 template.
    pub fn template_vars(&self) -> TemplateVars {
        TemplateVars {
            log_level: self.plugin_log_level.clone(),
            log_uds_address: self.log_uds_address.clone(),
            kubeconfig_filename: self.kubecfg_file_name.clone(),
            kubeconfig_filepath: self
                .cni_net_dir
                .join(&self.kubecfg_file_name)
                .to_string_lossy()
                .into_owned(),
            k8s_service_host: self.k8s_service_host.clone(),
            k8s_service_port: self.k8s_service_port.clone(),
            k8s_node_name: self.k8s_node_name.clone(),
        }
    }
}
