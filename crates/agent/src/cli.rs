//! The `meshcni-agent` command line. Every flag of Istio's `install-cni` (`cni/pkg/cmd/root.go`,
//! G1 1.20 and HEAD) is accepted under Istio's flag name, and reads the same environment variable
//! (viper convention: flag name in UPPER_SNAKE). Istio's env-only settings (`EXCLUDE_NAMESPACES`,
//! `NATIVE_NFTABLES`, …) are flags here too, with the same env names. Defaults match Istio's
//! binary except where a path or file name would collide with an Istio installation on the same
//! node (run dir, kubeconfig name, istio-owned conflist name, log socket), which use `meshcni`.
//!
//! Settings that later issues consume (repair, enablement selectors, DNS capture, …) are parsed and
//! validated now so the chart and manifests can set them; the report says which are live.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use crate::ambient_config::RedirectMode;

/// Istio's default service-account mount; the installer reads the token and CA from here.
pub const DEFAULT_SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Log verbosity (Istio's `--log-level` values, plus `trace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    None,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::None => "off",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parse a file mode the way operators write it: octal, with or without a leading `0`/`0o`
/// (`0600`, `600`, `0o600`). Istio's flag is a Go int, which viper also reads from "0600".
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    let m = u32::from_str_radix(digits, 8)
        .map_err(|e| format!("file mode {s:?} is not an octal number: {e}"))?;
    if m > 0o7777 {
        return Err(format!("file mode {s:?} is larger than 07777"));
    }
    Ok(m)
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshcni-agent",
    version,
    about = "meshcni node agent: installs the meshcni CNI plugin on the node, keeps it installed, \
             serves readiness and metrics, and (later) drives ambient redirection.",
    long_about = None,
    after_help = "Every flag can also be set through the environment variable shown for it \
                  (flag name in UPPER_SNAKE, as in Istio's install-cni). A flag on the command \
                  line wins over the environment. Booleans accept true/false/1/0/yes/no/on/off."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub args: AgentArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the agent (the default when no subcommand is given).
    Run,
    /// Remove everything the agent installed on this node (plugin binary, our entry in the CNI
    /// config or our own conflist, kubeconfig) and exit. Uses the same flags as `run`.
    Uninstall,
    /// Parse every flag and env var, print the effective configuration and exit (non-zero on
    /// invalid settings).
    CheckConfig,
    /// Print the flag/env/default reference as a Markdown table and exit.
    #[command(hide = true)]
    CliReference,
}

/// All agent settings. Field docs are the `--help` text.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    // ---- installer: CNI config ----
    /// Directory on the host where CNI network configs live, as the host sees it (used inside
    /// generated config, e.g. the kubeconfig path the plugin reads).
    #[arg(long, env = "CNI_NET_DIR", default_value = "/etc/cni/net.d")]
    pub cni_net_dir: PathBuf,

    /// The host CNI config dir as mounted into this container; the agent edits files here.
    #[arg(
        long,
        env = "MOUNTED_CNI_NET_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    pub mounted_cni_net_dir: PathBuf,

    /// Name of the CNI config file to chain into (or to write, when not chained). Empty: the
    /// first valid file in the dir, as kubelet picks it.
    #[arg(long, env = "CNI_CONF_NAME", default_value = "")]
    pub cni_conf_name: String,

    /// Chain the plugin into an existing conflist (true) or write a standalone config (false).
    #[arg(long, env = "CHAINED_CNI_PLUGIN", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub chained_cni_plugin: bool,

    /// Plugin network config template (JSON). Empty: the built-in config.
    #[arg(long, env = "CNI_NETWORK_CONFIG", default_value = "")]
    pub cni_network_config: String,

    /// File holding the plugin network config template; wins over --cni-network-config when it
    /// exists.
    #[arg(long, env = "CNI_NETWORK_CONFIG_FILE", default_value = "")]
    pub cni_network_config_file: String,

    /// Make written CNI config files group-readable (0640 instead of 0600).
    #[arg(long, env = "CNI_CONF_GROUP_READ", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub cni_conf_group_read: bool,

    /// Write our own conflist (primary config + meshcni) instead of editing the primary one.
    /// Takes effect only when chained and ambient are both on.
    #[arg(long, env = "ISTIO_OWNED_CNI_CONFIG", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub istio_owned_cni_config: bool,

    /// File name of the owned conflist; must sort before the primary config.
    #[arg(
        long,
        env = "ISTIO_OWNED_CNI_CONFIG_FILENAME",
        default_value = "02-meshcni.conflist"
    )]
    pub istio_owned_cni_config_filename: String,

    // ---- installer: binaries ----
    /// Directory the plugin binaries are copied from (inside the agent image).
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// Comma-separated host bin dirs (as mounted) the plugin binaries are copied into; dirs that
    /// are not writable are skipped.
    #[arg(
        long,
        env = "CNI_BIN_DIRS",
        default_value = "/host/opt/cni/bin",
        value_delimiter = ','
    )]
    pub cni_bin_dirs: Vec<PathBuf>,

    // ---- installer: kubeconfig for the plugin ----
    /// File name of the kubeconfig written for the plugin (into the run dir, HEAD layout).
    #[arg(long, env = "KUBECFG_FILE_NAME", default_value = "meshcni-kubeconfig")]
    pub kubecfg_file_name: String,

    /// File mode of the kubeconfig (octal).
    #[arg(long, env = "KUBECONFIG_MODE", default_value = "0600", value_parser = parse_mode)]
    pub kubeconfig_mode: u32,

    /// CA bundle for the API server; empty: the service account's ca.crt.
    #[arg(long, env = "KUBE_CA_FILE", default_value = "")]
    pub kube_ca_file: String,

    /// Write `insecure-skip-tls-verify: true` instead of the CA into the kubeconfig.
    #[arg(long, env = "SKIP_TLS_VERIFY", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub skip_tls_verify: bool,

    /// Service-account directory (token, ca.crt). Istio hard-codes it; a flag here so the agent
    /// can run against a stand-in directory.
    #[arg(long, env = "SERVICE_ACCOUNT_DIR", default_value = DEFAULT_SA_DIR)]
    pub service_account_dir: PathBuf,

    /// API server scheme written into the kubeconfig.
    #[arg(long, env = "KUBERNETES_SERVICE_PROTOCOL", default_value = "https")]
    pub kubernetes_service_protocol: String,

    /// API server host (set by Kubernetes in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", default_value = "")]
    pub kubernetes_service_host: String,

    /// API server port (set by Kubernetes in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value = "")]
    pub kubernetes_service_port: String,

    // ---- runtime, logging, serving ----
    /// Directory for the agent's sockets and state on the host (plugin event socket,
    /// `metrics.sock`, kubeconfig in HEAD layout).
    #[arg(long, env = "CNI_AGENT_RUN_DIR", default_value = "/var/run/meshcni")]
    pub cni_agent_run_dir: PathBuf,

    /// Unix socket the plugin sends its log lines to (G1 layout).
    #[arg(
        long,
        env = "LOG_UDS_ADDRESS",
        default_value = "/var/run/meshcni/log.sock"
    )]
    pub log_uds_address: PathBuf,

    /// Log level.
    #[arg(long, env = "LOG_LEVEL", value_enum, default_value = "warn")]
    pub log_level: LogLevel,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Port of the Prometheus `/metrics` endpoint (0: pick a free port; the bound address is
    /// logged).
    #[arg(long, env = "MONITORING_PORT", default_value_t = 15014)]
    pub monitoring_port: u16,

    /// Port of `/healthz` and `/readyz` (Istio hard-codes 8000).
    #[arg(long, env = "READINESS_PORT", default_value_t = 8000)]
    pub readiness_port: u16,

    /// Address the HTTP endpoints bind to.
    #[arg(long, env = "LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: std::net::IpAddr,

    // ---- identity ----
    /// Name of the node this agent runs on (Downward API). Falls back to KUBERNETES_NODE_NAME,
    /// then the hostname.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,

    /// G1 name of the node variable (used when NODE_NAME is empty).
    #[arg(long, env = "KUBERNETES_NODE_NAME", default_value = "")]
    pub kubernetes_node_name: String,

    /// Namespace of this agent's pod (Downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    /// Name of this agent's pod (Downward API). [Accepted and validated; used by a later release.]
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// Mesh system namespace (where ztunnel runs). [Accepted and validated; used by a later release.]
    #[arg(long, env = "SYSTEM_NAMESPACE", default_value = "istio-system")]
    pub system_namespace: String,

    /// Control-plane revision. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REVISION", default_value = "")]
    pub revision: String,

    /// This node's IP (Downward API), used by node-level redirect modes. [Accepted and validated; used by a later release.]
    #[arg(long, env = "HOST_IP", default_value = "")]
    pub host_ip: String,

    /// Comma-separated namespaces whose pods the plugin never touches.
    #[arg(
        long,
        env = "EXCLUDE_NAMESPACES",
        default_value = "kube-system",
        value_delimiter = ','
    )]
    pub exclude_namespaces: Vec<String>,

    // ---- ambient ----
    /// Enable ambient mode.
    #[arg(long, env = "AMBIENT_ENABLED", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_enabled: bool,

    /// Ambient redirect mode (written into the ambient config file).
    #[arg(
        long,
        env = "AMBIENT_REDIRECT_MODE",
        value_enum,
        default_value = "inpod"
    )]
    pub ambient_redirect_mode: RedirectMode,

    /// G1 switch for the eBPF redirect mode; when true it selects `ebpf` unless
    /// --ambient-redirect-mode is set explicitly.
    #[arg(long, env = "EBPF_ENABLED", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ebpf_enabled: bool,

    /// Directory of the ambient config file `config.json`.
    #[arg(
        long,
        env = "AMBIENT_CONFIG_DIR",
        default_value = "/etc/ambient-config"
    )]
    pub ambient_config_dir: PathBuf,

    /// Unix socket ztunnel connects to (ZDS). [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "ZTUNNEL_UDS_ADDRESS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub ztunnel_uds_address: PathBuf,

    /// Ambient enablement selectors (YAML list of label selectors).
    #[arg(long, env = "AMBIENT_ENABLEMENT_SELECTOR", default_value = "")]
    pub ambient_enablement_selector: String,

    /// Read the workloads (pods and namespaces, Kubernetes JSON shape) from this JSON/YAML
    /// file instead of the Kubernetes API (hosts without Kubernetes, demos). Re-read on change.
    #[arg(long, env = "AMBIENT_WORKLOADS_FILE", default_value = "")]
    pub ambient_workloads_file: String,

    /// Kubeconfig the agent uses to watch pods and namespaces; empty = in-cluster (service
    /// account token + KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, env = "AMBIENT_KUBECONFIG", default_value = "")]
    pub ambient_kubeconfig: String,

    /// Capture DNS (UDP 53) of ambient pods into ztunnel's DNS proxy on 15053 (iptables mode: DNAT on the node).
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_dns_capture: bool,

    /// Program IPv6 rules for ambient pods. [Accepted and validated; used by a later release.]
    #[arg(long, env = "AMBIENT_IPV6", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_ipv6: bool,

    /// Remove the plugin on every exit, also on upgrades/restarts (Istio semantics of this
    /// variable). Without it the plugin stays in place unless an uninstall is signalled.
    #[arg(long, env = "AMBIENT_DISABLE_SAFE_UPGRADE", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_disable_safe_upgrade: bool,

    /// Re-apply in-pod rules of already enrolled pods at start-up. [Accepted and validated; used by a later release.]
    #[arg(long, env = "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_reconcile_pod_rules_on_startup: bool,

    /// Retry ambient detection in the plugin when the pod's namespace is not cached yet.
    #[arg(long, env = "ENABLE_AMBIENT_DETECTION_RETRY", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub enable_ambient_detection_retry: bool,

    /// Use nftables instead of iptables.
    #[arg(long, env = "NATIVE_NFTABLES", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub native_nftables: bool,

    /// Force an iptables flavour (`legacy` or `nft`) for the node rules of the iptables redirect mode instead of detecting it.
    #[arg(long, env = "FORCE_IPTABLES_BINARY", default_value = "")]
    pub force_iptables_binary: String,

    /// xtables lock file (`XTABLES_LOCKFILE`) for the iptables redirect mode's commands in the
    /// node netns: the host's global lock, shared with kube-proxy and every other writer.
    #[arg(long, env = "NODE_XTABLES_LOCK", default_value = "/run/xtables.lock")]
    pub node_xtables_lock: PathBuf,

    /// Directory of the node's named network namespaces (the host's `/var/run/netns`, as
    /// mounted into the agent). The iptables redirect mode finds the ztunnel pod's netns here
    /// (by the peer of its host veth).
    #[arg(long, env = "NETNS_DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,

    /// Let the agent enter the host netns through /host/proc/1/ns/net (non-hostNetwork pod). [Accepted and validated; used by a later release.]
    #[arg(long, env = "ALLOW_SWITCH_TO_HOST_NS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub allow_switch_to_host_ns: bool,

    /// Source address kubelet probes are SNATed to (IPv4). [Accepted and validated; used by a later release.]
    #[arg(long, env = "HOST_PROBE_SNAT_IP", default_value = "169.254.7.127")]
    pub host_probe_snat_ip: std::net::Ipv4Addr,

    /// Source address kubelet probes are SNATed to (IPv6). [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "HOST_PROBE_SNAT_IPV6",
        default_value = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    )]
    pub host_probe_snat_ipv6: std::net::Ipv6Addr,

    /// Take per-pod (scoped) xtables locks instead of the global one. [Accepted and validated; used by a later release.]
    #[arg(long, env = "AMBIENT_USE_SCOPED_XTABLES_LOCKING", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_use_scoped_xtables_locking: bool,

    /// Add the AWS branch-ENI probe routing workaround. [Accepted and validated; used by a later release.]
    #[arg(long, env = "AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_enable_aws_branch_eni_probe: bool,

    // ---- repair (spec §6) ----
    /// Run the repair controller. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_ENABLED", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_enabled: bool,

    /// Repair broken pods in place (re-apply the sidecar redirect in their netns). [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_REPAIR_PODS", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_repair_pods: bool,

    /// Delete broken pods. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_DELETE_PODS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_delete_pods: bool,

    /// Label broken pods. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_LABEL_PODS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_label_pods: bool,

    /// Label key put on broken pods. [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_KEY",
        default_value = "cni.istio.io/uninitialized"
    )]
    pub repair_broken_pod_label_key: String,

    /// Label value put on broken pods. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_BROKEN_POD_LABEL_VALUE", default_value = "true")]
    pub repair_broken_pod_label_value: String,

    /// Node whose pods the repair controller watches (empty: this node). [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_NODE_NAME", default_value = "")]
    pub repair_node_name: String,

    /// Annotation that marks a pod as sidecar-injected. [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "REPAIR_SIDECAR_ANNOTATION",
        default_value = "sidecar.istio.io/status"
    )]
    pub repair_sidecar_annotation: String,

    /// Name of the validation init container. [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_NAME",
        default_value = "istio-validation"
    )]
    pub repair_init_container_name: String,

    /// Termination message of a failed validation (empty: any). [Accepted and validated; used by a later release.]
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE",
        default_value = ""
    )]
    pub repair_init_container_termination_message: String,

    /// Exit code of a failed validation (0: any). [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_INIT_CONTAINER_EXIT_CODE", default_value_t = 126)]
    pub repair_init_container_exit_code: i32,

    /// Extra label selectors for the repair pod watch. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_LABEL_SELECTORS", default_value = "")]
    pub repair_label_selectors: String,

    /// Extra field selectors for the repair pod watch. [Accepted and validated; used by a later release.]
    #[arg(long, env = "REPAIR_FIELD_SELECTORS", default_value = "")]
    pub repair_field_selectors: String,

    // ---- uninstall vs upgrade (see lifecycle.rs) ----
    /// On shutdown, remove everything the agent installed (used for uninstalling; the default
    /// leaves the plugin in place so upgrades never let pods start uncaptured).
    #[arg(long, env = "UNINSTALL_ON_EXIT", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub uninstall_on_exit: bool,

    /// Marker file checked at shutdown: when it exists and contains `true`, the agent uninstalls.
    /// The Helm chart projects it from the `meshcni-lifecycle` ConfigMap that its pre-delete hook
    /// sets.
    #[arg(
        long,
        env = "UNINSTALL_MARKER_FILE",
        default_value = "/etc/meshcni/lifecycle/uninstall"
    )]
    pub uninstall_marker_file: PathBuf,
}

impl AgentArgs {
    /// The redirect mode in effect (EBPF_ENABLED only upgrades the default).
    pub fn effective_redirect_mode(&self, redirect_mode_explicit: bool) -> RedirectMode {
        if self.ebpf_enabled && !redirect_mode_explicit {
            RedirectMode::Ebpf
        } else {
            self.ambient_redirect_mode
        }
    }

    /// Node name: NODE_NAME, else KUBERNETES_NODE_NAME, else the hostname.
    pub fn effective_node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        if !self.kubernetes_node_name.is_empty() {
            return self.kubernetes_node_name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Namespaces excluded, with empty entries (from `EXCLUDE_NAMESPACES=""`) dropped.
    pub fn excluded_namespaces(&self) -> Vec<String> {
        self.exclude_namespaces
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Path of the plugin → agent metrics socket.
    pub fn metrics_socket(&self) -> PathBuf {
        self.cni_agent_run_dir
            .join(crate::plugin_report::METRICS_SOCKET_NAME)
    }
}

/// Render the flag reference as a Markdown table (flag, env, default, description), straight from
/// the clap definitions so it cannot drift from `--help`.
pub fn reference_markdown() -> String {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let mut out = String::from("| flag | env | default | description |\n|---|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let def: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let def = if def.is_empty() || def.iter().all(|d| d.is_empty()) {
            "\"\"".to_string()
        } else {
            format!("`{}`", def.join(","))
        };
        let help = arg
            .get_help()
            .map(|h| h.to_string().replace('|', "\\|").replace('\n', " "))
            .unwrap_or_default();
        out.push_str(&format!("| `--{long}` | {env} | {def} | {help} |\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn modes_parse_octal() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert_eq!(parse_mode("0o644"), Ok(0o644));
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("77777").is_err());
    }

    #[test]
    fn defaults_match_istio() {
        let cli = Cli::try_parse_from(["meshcni-agent"]).expect("parse");
        let a = cli.args;
        assert_eq!(a.cni_net_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(a.mounted_cni_net_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert!(a.chained_cni_plugin);
        assert_eq!(a.kubeconfig_mode, 0o600);
        assert_eq!(a.monitoring_port, 15014);
        assert_eq!(a.readiness_port, 8000);
        assert_eq!(a.cni_bin_dirs, vec![PathBuf::from("/host/opt/cni/bin")]);
        assert!(!a.ambient_enabled);
        assert_eq!(a.ambient_config_dir, PathBuf::from("/etc/ambient-config"));
        assert_eq!(a.repair_init_container_exit_code, 126);
    }

    #[test]
    fn booleans_take_values_and_bare_flags() {
        let a = Cli::try_parse_from([
            "meshcni-agent",
            "--chained-cni-plugin=false",
            "--ambient-enabled",
            "--exclude-namespaces",
            "a,b",
            "uninstall",
        ])
        .expect("parse");
        assert!(!a.args.chained_cni_plugin);
        assert!(a.args.ambient_enabled);
        assert_eq!(a.args.excluded_namespaces(), vec!["a", "b"]);
        assert!(matches!(a.command, Some(Command::Uninstall)));
    }

    #[test]
    fn ebpf_enabled_selects_ebpf_unless_mode_explicit() {
        let a = Cli::try_parse_from(["meshcni-agent", "--ebpf-enabled=true"])
            .expect("parse")
            .args;
        assert_eq!(a.effective_redirect_mode(false), RedirectMode::Ebpf);
        assert_eq!(a.effective_redirect_mode(true), RedirectMode::Inpod);
    }

    #[test]
    fn every_flag_has_env_and_help() {
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{long} has no env var");
            assert!(arg.get_help().is_some(), "--{long} has no help");
        }
        let md = reference_markdown();
        assert!(md.contains("| `--cni-net-dir` | `CNI_NET_DIR` | `/etc/cni/net.d` |"));
    }
}
