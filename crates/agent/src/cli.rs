//! The `meshcni-agent` command line. Every flag of Istio's `install-cni` (`cni/pkg/cmd/root.go`,
//! G1 1.20 and HEAD) is accepted under Istio's flag name, and reads the same environment variable
//! (viper convention: flag name in UPPER_SNAKE). Istio's env-only settings (`EXCLUDE_NAMESPACES`,
//! `NATIVE_NFTABLES`, …) are flags here too, with the same env names. Defaults match Istio's
//! binary except where a path or file name would collide with an Istio installation on the same
//! node (run dir, kubeconfig name, istio-owned conflist name, log socket), which use `meshcni`.
//!
//! Every setting is either implemented or rejected: Istio settings this build does not implement
//! (the repair controller, in-pod/eBPF-only knobs, …) are accepted only at their default value, so
//! an Istio-style environment that leaves them alone works, and one that turns them on fails at
//! start-up and in `check-config` with an error naming the flag and its env var
//! ([`AgentArgs::validate`]). Redirect modes without a driver in this build fail the same way
//! when ambient is enabled.

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

/// The plugin's `ambient_detection_failure_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicy {
    Closed,
    Open,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Closed => "closed",
            FailurePolicy::Open => "open",
        }
    }
}

/// Redirect modes this build has a driver for (`ambient::make_driver`; a unit test keeps the
/// two in step).
pub const BUILT_REDIRECT_MODES: &[RedirectMode] = &[
    RedirectMode::Iptables,
    RedirectMode::Inpod,
    RedirectMode::Ebpf,
];

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

/// `--force-iptables-binary`: `legacy`, `nft`, or empty (detect). Anything else is an error, for
/// the flag and the env var alike (a typo must not silently fall back to detection).
pub fn parse_forced_iptables_binary(s: &str) -> Result<String, String> {
    match s.trim() {
        v @ ("" | "legacy" | "nft") => Ok(v.to_string()),
        other => Err(format!(
            "unknown iptables flavour {other:?}: expected `legacy`, `nft`, or empty to detect it"
        )),
    }
}

/// A Kubernetes namespace name (RFC 1123 label: 1–63 of `a-z0-9-`, alphanumeric at both ends).
pub fn parse_dns_label(s: &str) -> Result<String, String> {
    if is_namespace_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a namespace name (1-63 lowercase letters, digits or '-', starting and ending alphanumeric)"
        ))
    }
}

/// A Kubernetes service-account name (RFC 1123 subdomain: dot-separated labels, ≤ 253).
pub fn parse_dns_subdomain(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| parse_dns_label(l).is_ok()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a service-account name (lowercase RFC 1123 subdomain, at most 253 characters)"
        ))
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "meshcni-agent",
    version,
    about = "meshcni node agent: installs the meshcni CNI plugin on the node, keeps it installed, \
             serves readiness and metrics, and drives ambient redirection (inpod or iptables mode).",
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

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the agent (the default when no subcommand is given).
    Run,
    /// Remove everything the agent installed on this node (plugin binary, our entry in the CNI
    /// config or our own conflist, kubeconfig) and exit. Uses the same flags as `run`.
    Uninstall,
    /// Parse every flag and env var, print the effective configuration and exit (non-zero on
    /// invalid settings).
    CheckConfig,
    /// Check this node and its pods read-only and exit non-zero on any mismatch: our CNI config
    /// entry (present, current, after the primary plugin), the plugin binaries (same content as
    /// the image's), the plugin's kubeconfig (parses, names a server), the ambient config file
    /// (names the running mode); for every pod on the node (from the workload source): whether
    /// it should be captured and why, and whether it is (sidecar: the rules in its netns equal
    /// what ADD installs; ambient: enrolled by the running mode's driver, inpod rules in place).
    /// Uses the same flags as `run`. Also served as JSON at `/debug/doctor` on the monitoring
    /// port.
    Doctor(DoctorArgs),
    /// Print the flag/env/default reference as a Markdown table and exit.
    #[command(hide = true)]
    CliReference,
    /// The Helm chart's pre-delete hook: set `uninstall: "true"` in the lifecycle ConfigMap of
    /// POD_NAMESPACE (in-cluster API access, or --kubeconfig), then wait --wait-seconds for the
    /// kubelet to project it into the agent pods.
    UninstallHook(UninstallHookArgs),
}

/// Flags of `doctor`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DoctorArgs {
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `uninstall-hook`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct UninstallHookArgs {
    /// The lifecycle ConfigMap (in POD_NAMESPACE) whose `uninstall` key the agents read.
    #[arg(long, env = "LIFECYCLE_CONFIGMAP", default_value = "meshcni-lifecycle")]
    pub configmap: String,
    /// Seconds to wait after the patch: longer than the kubelet's ConfigMap sync (~60 s + TTL).
    #[arg(long, env = "UNINSTALL_WAIT_SECONDS", default_value = "90")]
    pub wait_seconds: u64,
    /// Kubeconfig to reach the API server with; empty = in-cluster (service-account token and
    /// CA, KUBERNETES_SERVICE_HOST/PORT).
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
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

    /// Unix socket the plugin sends its log lines to (G1 layout). [Not supported by this build: a non-default value is rejected.]
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

    /// Name of this agent's pod (Downward API). [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// Mesh system namespace: only a pod labelled `app=ztunnel` in this namespace (and running as `--ztunnel-service-account`) is trusted as the node's ztunnel; others are ignored with a warning.
    #[arg(long, env = "SYSTEM_NAMESPACE", default_value = "istio-system",
          value_parser = parse_dns_label)]
    pub system_namespace: String,

    /// Service account of ztunnel pods (Istio's chart: `ztunnel`): a pod labelled `app=ztunnel` in `--system-namespace` that runs as another account is not trusted as the node's ztunnel.
    #[arg(long, env = "ZTUNNEL_SERVICE_ACCOUNT", default_value = "ztunnel",
          value_parser = parse_dns_subdomain)]
    pub ztunnel_service_account: String,

    /// Control-plane revision. [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "REVISION", default_value = "")]
    pub revision: String,

    /// This node's IP (Downward API), used by node-level redirect modes. [Not supported by this build: a non-default value is rejected.]
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

    // ---- node readiness taint (node_taint.rs) ----
    /// Remove the readiness taint (--node-taint-key) from this node (--node-name) once the agent
    /// is ready (plugin installed; with ambient, the redirect mode up); never adds it. Off by
    /// default, as in Istio (whose control plane does it, PILOT_ENABLE_NODE_UNTAINT_CONTROLLERS).
    /// Needs API access (KUBERNETES_SERVICE_HOST or --ambient-kubeconfig) and RBAC get + patch
    /// on nodes.
    #[arg(long, env = "REMOVE_NODE_TAINT", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub remove_node_taint: bool,

    /// Key of the readiness taint --remove-node-taint removes (every effect). With the option
    /// off a non-default value is rejected.
    #[arg(long, env = "NODE_TAINT_KEY", default_value = DEFAULT_TAINT_KEY,
          value_parser = parse_taint_key)]
    pub node_taint_key: String,

    // ---- ambient ----
    /// Enable ambient mode.
    #[arg(long, env = "AMBIENT_ENABLED", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_enabled: bool,

    /// Ambient redirect mode (written into the ambient config file): `inpod` (the default, as
    /// in Istio: rules inside each pod, netns handed to ztunnel ≥ 1.21 over ZDS), `iptables`
    /// (node-level, for ztunnel ≤ 1.22) or `ebpf` (node-level, tc eBPF programs and pinned
    /// maps, no iptables; IPv4 and IPv6).
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

    /// `ebpf` redirect mode: capacity of the pod map in addresses (a dual-stack pod takes two).
    /// A pinned map of another capacity is refused at start (uninstall first). No Istio
    /// equivalent (its eBPF mode has a fixed 1,024). With another mode a non-default value is
    /// rejected.
    #[arg(long, env = "AMBIENT_EBPF_MAX_PODS", default_value = "16384",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ambient_ebpf_max_pods: u32,

    /// `ebpf` redirect mode: how the programs are attached to veths: `auto` (tcx links where
    /// the kernel has them, Linux 6.6+, else clsact filters), `tcx` or `clsact`. tcx links
    /// coexist with other tc programs by ownership and order; creating or removing one waits
    /// for an RCU grace period under the RTNL lock (≈ 25 ms per pod enrolled or released on a
    /// small VM); clsact filters do not wait (≈ 2 ms per pod) and never delete a qdisc we did
    /// not create. Switching on a node with a pinned datapath needs an uninstall first (the
    /// redirect mode refuses the other kind's pins and stays not ready; an uninstall works with
    /// either setting). With another mode a non-default value is rejected.
    #[arg(long, env = "AMBIENT_EBPF_ATTACH", default_value = "auto",
          value_parser = clap::builder::PossibleValuesParser::new(["auto", "tcx", "clsact"]))]
    pub ambient_ebpf_attach: String,

    /// `ebpf` redirect mode: the meshcni directory in bpffs holding the pinned maps and links
    /// (its parent must be a bpffs mount). With another mode a non-default value is rejected.
    #[arg(
        long,
        env = "AMBIENT_EBPF_PIN_DIR",
        default_value = "/sys/fs/bpf/meshcni"
    )]
    pub ambient_ebpf_pin_dir: PathBuf,

    /// Directory of the ambient config file `config.json`.
    #[arg(
        long,
        env = "AMBIENT_CONFIG_DIR",
        default_value = "/etc/ambient-config"
    )]
    pub ambient_config_dir: PathBuf,

    /// Unix socket ztunnel connects to (ZDS; in-pod mode). Created 0600 (root only). Only the
    /// inpod redirect mode uses it: with another mode a non-default value is rejected.
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

    /// Program IPv6 rules for ambient pods. Unset: true for the inpod mode (Istio's default)
    /// and the ebpf mode, false for the node-level iptables mode, which is IPv4-only: there
    /// `true` is rejected.
    #[arg(long, env = "AMBIENT_IPV6", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_ipv6: Option<bool>,

    /// Remove the plugin on every exit, also on upgrades/restarts (Istio semantics of this
    /// variable). Without it the plugin stays in place unless an uninstall is signalled.
    #[arg(long, env = "AMBIENT_DISABLE_SAFE_UPGRADE", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub ambient_disable_safe_upgrade: bool,

    /// Re-verify (and repair) the in-pod rules of already enrolled pods when the agent starts
    /// (inpod mode; Istio's default is false, meshcni's true: a restart checks every pod).
    /// With another mode a non-default value is rejected.
    #[arg(long, env = "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", default_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_reconcile_pod_rules_on_startup: bool,

    /// Retry ambient detection in the plugin (30 attempts, 1 s apart, instead of 2) before the
    /// failure policy applies (written into the plugin config).
    #[arg(long, env = "ENABLE_AMBIENT_DETECTION_RETRY", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub enable_ambient_detection_retry: bool,

    /// What the plugin's ADD does when ambient detection cannot read the pod or its namespace:
    /// `closed` fails the ADD (the runtime retries; an ambient pod never starts uncaptured),
    /// `open` starts the pod as non-ambient (Istio's behaviour without detection retry). Written
    /// into the plugin config.
    #[arg(
        long,
        env = "AMBIENT_DETECTION_FAILURE_POLICY",
        value_enum,
        default_value = "closed"
    )]
    pub ambient_detection_failure_policy: FailurePolicy,

    /// Hosts without Kubernetes: the plugin reads pod metadata from this directory
    /// (`pods/<namespace>/<name>.json`, `namespaces/<name>.json`, Kubernetes JSON) instead of
    /// the API server; a pod without a file there is not a mesh pod. Absolute path, as the
    /// plugin on the host sees it. Written into the plugin config (also into a template's).
    #[arg(long, env = "POD_METADATA_DIR", default_value = "")]
    pub pod_metadata_dir: String,

    /// Namespace of pods whose runtime passes no K8S_POD_NAMESPACE (podman passes only
    /// K8S_POD_NAME = the container name). Needs --pod-metadata-dir.
    #[arg(
        long,
        env = "POD_METADATA_DEFAULT_NAMESPACE",
        default_value = "default"
    )]
    pub pod_metadata_default_namespace: String,

    /// Use nftables instead of iptables.
    #[arg(long, env = "NATIVE_NFTABLES", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub native_nftables: bool,

    /// Force an iptables flavour (`legacy` or `nft`) for the node rules of the iptables redirect mode instead of detecting it (empty: detect). Any other value is refused at start-up.
    #[arg(long, env = "FORCE_IPTABLES_BINARY", default_value = "",
          value_parser = parse_forced_iptables_binary)]
    pub force_iptables_binary: String,

    /// xtables lock file (`XTABLES_LOCKFILE`) for the iptables redirect mode's commands in the
    /// node netns: the host's global lock, shared with kube-proxy and every other writer.
    #[arg(long, env = "NODE_XTABLES_LOCK", default_value = "/run/xtables.lock")]
    pub node_xtables_lock: PathBuf,

    /// Directory of the node's named network namespaces (the host's `/var/run/netns`, as
    /// mounted into the agent). The iptables redirect mode finds the ztunnel pod's netns here
    /// (by the peer of its host veth); the ebpf mode looks for pods' (and ztunnel's) netns
    /// here by IP when no process names them.
    #[arg(long, env = "NETNS_DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,

    /// The host's procfs as the agent sees it. The inpod and ebpf modes scan it to find the
    /// netns of a running pod (a process whose cgroup names the pod UID, verified by the pod's
    /// IP) when they enroll a pod without a CNI ADD (inpod: also to adopt its pods after a
    /// restart); with hostPID (the chart) that is `/proc`. With another mode a non-default
    /// value is rejected.
    #[arg(long, env = "HOST_PROC_DIR", default_value = "/proc")]
    pub host_proc_dir: PathBuf,

    /// Let the agent enter the host netns through /host/proc/1/ns/net (non-hostNetwork pod). [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "ALLOW_SWITCH_TO_HOST_NS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub allow_switch_to_host_ns: bool,

    /// Source address kubelet probes are SNATed to (IPv4; inpod mode: the node's probe SNAT
    /// and the pods' ACCEPT of it). With another mode a non-default value is rejected.
    #[arg(long, env = "HOST_PROBE_SNAT_IP", default_value = "169.254.7.127")]
    pub host_probe_snat_ip: std::net::Ipv4Addr,

    /// Source address kubelet probes are SNATed to (IPv6; inpod mode). With another mode a
    /// non-default value is rejected.
    #[arg(
        long,
        env = "HOST_PROBE_SNAT_IPV6",
        default_value = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    )]
    pub host_probe_snat_ipv6: std::net::Ipv6Addr,

    /// Take per-pod (scoped) xtables locks instead of the global one. [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "AMBIENT_USE_SCOPED_XTABLES_LOCKING", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_use_scoped_xtables_locking: bool,

    /// Add the AWS branch-ENI probe routing workaround. [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "AMBIENT_ENABLE_AWS_BRANCH_ENI_PROBE", default_value = "false",
          action = ArgAction::Set, value_parser = BoolishValueParser::new(), num_args = 0..=1,
          default_missing_value = "true")]
    pub ambient_enable_aws_branch_eni_probe: bool,

    // ---- repair (spec §6; see repair.rs) ----
    /// Run the repair controller: find pods on this node that should be captured but are not
    /// (the doctor's verdict) and act on them (REPAIR_REPAIR_PODS / _DELETE_PODS /
    /// _LABEL_PODS). Istio's default is true; this binary's default is false (the Helm chart
    /// turns it on, as Istio's chart does).
    #[arg(long, env = "REPAIR_ENABLED", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_enabled: bool,

    /// Repair broken pods in place, without a restart: re-apply the sidecar capture in the
    /// pod's netns (the plugin ADD's atomic verify-or-repair apply), or have the enrollment
    /// loop enroll an ambient pod again. Exactly one of REPAIR_REPAIR_PODS, _DELETE_PODS,
    /// _LABEL_PODS may be true (a second one would never be used: rejected).
    #[arg(long, env = "REPAIR_REPAIR_PODS", default_value = "true", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_repair_pods: bool,

    /// Delete broken pods (API DELETE with the pod's UID as precondition); needs
    /// REPAIR_REPAIR_PODS=false. Needs API access (not the workloads file).
    #[arg(long, env = "REPAIR_DELETE_PODS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_delete_pods: bool,

    /// Label broken pods (merge patch REPAIR_BROKEN_POD_LABEL_KEY=VALUE); needs
    /// REPAIR_REPAIR_PODS=false and REPAIR_DELETE_PODS=false. Needs API access (not the
    /// workloads file).
    #[arg(long, env = "REPAIR_LABEL_PODS", default_value = "false", action = ArgAction::Set,
          value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub repair_label_pods: bool,

    /// Label key put on broken pods (REPAIR_LABEL_PODS).
    #[arg(
        long,
        env = "REPAIR_BROKEN_POD_LABEL_KEY",
        default_value = "cni.istio.io/uninitialized"
    )]
    pub repair_broken_pod_label_key: String,

    /// Label value put on broken pods (REPAIR_LABEL_PODS).
    #[arg(long, env = "REPAIR_BROKEN_POD_LABEL_VALUE", default_value = "true")]
    pub repair_broken_pod_label_value: String,

    /// Node whose pods the repair controller watches: empty or this node's name (a pod's netns
    /// can only be repaired on its own node; any other value is rejected).
    #[arg(long, env = "REPAIR_NODE_NAME", default_value = "")]
    pub repair_node_name: String,

    /// Annotation that marks a pod as sidecar-injected. [Not supported by this build: a non-default value is rejected.]
    #[arg(
        long,
        env = "REPAIR_SIDECAR_ANNOTATION",
        default_value = "sidecar.istio.io/status"
    )]
    pub repair_sidecar_annotation: String,

    /// Name of the validation init container. [Not supported by this build: a non-default value is rejected.]
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_NAME",
        default_value = "istio-validation"
    )]
    pub repair_init_container_name: String,

    /// Termination message of a failed validation (empty: any). [Not supported by this build: a non-default value is rejected.]
    #[arg(
        long,
        env = "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE",
        default_value = ""
    )]
    pub repair_init_container_termination_message: String,

    /// Exit code of a failed validation (0: any). [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "REPAIR_INIT_CONTAINER_EXIT_CODE", default_value_t = 126)]
    pub repair_init_container_exit_code: i32,

    /// Extra label selectors for the repair pod watch. [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "REPAIR_LABEL_SELECTORS", default_value = "")]
    pub repair_label_selectors: String,

    /// Extra field selectors for the repair pod watch. [Not supported by this build: a non-default value is rejected.]
    #[arg(long, env = "REPAIR_FIELD_SELECTORS", default_value = "")]
    pub repair_field_selectors: String,

    /// Seconds between two full checks of every pod on the node by the repair controller (pod
    /// watch events trigger a check of the changed pods at once; the full check finds drift
    /// that no event announces, e.g. rules deleted inside a pod). meshcni-specific.
    #[arg(long, env = "REPAIR_RESYNC_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub repair_resync_seconds: u64,

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

    /// Name of the DaemonSet this agent runs in (in POD_NAMESPACE). When set, the agent asks the
    /// API server at shutdown whether it still exists: gone (404), being deleted, its service
    /// account refused (401/403) or the API server unreachable within 5 s → uninstall (a plain
    /// `kubectl delete` of the manifests); present → leave the plugin installed (upgrade,
    /// restart, drain). Empty: no check (the uninstall signals above only). Needs
    /// KUBERNETES_SERVICE_HOST and POD_NAMESPACE, and RBAC `get` on this DaemonSet.
    #[arg(long, env = "DAEMONSET_NAME", default_value = "", value_parser = parse_optional_dns_subdomain)]
    pub daemonset_name: String,
}

/// Empty, or a DNS subdomain (an object name).
fn parse_optional_dns_subdomain(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Ok(String::new())
    } else {
        parse_dns_subdomain(s)
    }
}

/// Compare each listed field with its default; a difference is an "unsupported setting" error.
macro_rules! reject_non_default {
    ($args:expr, $defaults:expr, $out:expr; $($field:ident: $why:expr),* $(,)?) => {
        $(
            if $args.$field != $defaults.$field {
                $out.push(unsupported(
                    stringify!($field),
                    &format!("{:?}", $args.$field),
                    &format!("{:?}", $defaults.$field),
                    $why,
                ));
            }
        )*
    };
}

/// `--flag-name (FLAG_NAME)` of a field (the naming convention every flag here follows; a unit
/// test checks it against the clap definitions).
pub fn flag_and_env(field: &str) -> String {
    format!(
        "--{} ({})",
        field.replace('_', "-"),
        field.to_ascii_uppercase()
    )
}

fn unsupported(field: &str, value: &str, default: &str, why: &str) -> String {
    format!(
        "{} = {value} is not supported by this build of meshcni-agent ({why}); \
         unset it or set it to its default {default}",
        flag_and_env(field)
    )
}

/// Settings this build cannot honour, found by [`AgentArgs::validate`]. The message lists
/// every problem, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl AgentArgs {
    /// Every flag at its built-in default (environment ignored).
    pub fn defaults() -> AgentArgs {
        use clap::{CommandFactory, FromArgMatches};
        let cmd = Cli::command().mut_args(|a| a.env(None::<&str>));
        let m = cmd
            .try_get_matches_from(["meshcni-agent"])
            .expect("the built-in defaults parse");
        AgentArgs::from_arg_matches(&m).expect("the built-in defaults parse")
    }

    /// Reject what this build cannot do (for `run` and `check-config`; `uninstall` removes
    /// files whatever the settings): unimplemented Istio settings at non-default values, a
    /// redirect mode without a driver when ambient is on, and inconsistent meshcni settings.
    pub fn validate(&self, redirect_mode_explicit: bool) -> Result<(), ConfigError> {
        let d = AgentArgs::defaults();
        let mut errs = Vec::new();
        const REPAIR: &str = "the repair controller detects broken pods by the doctor's \
            verdict on their netns, not by the validation init container, annotation or a \
            narrowed watch";
        const NODE_LEVEL: &str = "the iptables redirect mode does not implement it";
        reject_non_default!(self, d, errs;
            pod_name: "nothing reads the agent's own pod name",
            revision: "there is no revision-specific behaviour",
            host_ip: "the iptables redirect mode finds the node address itself",
            log_uds_address: "the plugin does not send its logs to the agent; they go to the runtime's log",
            allow_switch_to_host_ns: "the agent runs in the host network namespace (hostNetwork) or not at all",
            ambient_use_scoped_xtables_locking: "rules are applied with one iptables-restore per table",
            ambient_enable_aws_branch_eni_probe: NODE_LEVEL,
            repair_sidecar_annotation: REPAIR,
            repair_init_container_name: REPAIR,
            repair_init_container_termination_message: REPAIR,
            repair_init_container_exit_code: REPAIR,
            repair_label_selectors: REPAIR,
            repair_field_selectors: REPAIR,
        );
        let mode = self.effective_redirect_mode(redirect_mode_explicit);
        if !(self.repair_enabled
            || self.ambient_enabled && matches!(mode, RedirectMode::Inpod | RedirectMode::Ebpf))
        {
            reject_non_default!(self, d, errs;
                host_proc_dir: "only the repair controller and the inpod and ebpf redirect \
                    modes use it (to find pods' netns), and none of them is enabled",
            );
        }
        if !(self.ambient_enabled && mode == RedirectMode::Ebpf) {
            const ONLY_EBPF: &str =
                "only the ebpf redirect mode uses it, and ambient with that mode is not enabled";
            reject_non_default!(self, d, errs;
                ambient_ebpf_max_pods: ONLY_EBPF,
                ambient_ebpf_attach: ONLY_EBPF,
                ambient_ebpf_pin_dir: ONLY_EBPF,
            );
        }
        if !(self.ambient_enabled && mode == RedirectMode::Inpod) {
            const ONLY_INPOD: &str =
                "only the inpod redirect mode uses it, and ambient with that mode is not enabled";
            reject_non_default!(self, d, errs;
                ztunnel_uds_address: ONLY_INPOD,
                ambient_reconcile_pod_rules_on_startup: ONLY_INPOD,
                host_probe_snat_ip: ONLY_INPOD,
                host_probe_snat_ipv6: ONLY_INPOD,
            );
        }
        if mode == RedirectMode::Iptables && self.ambient_ipv6 == Some(true) {
            errs.push(format!(
                "{} = true is not supported by this build of meshcni-agent with redirect mode                  {mode} (its node-level redirection is IPv4-only); unset it or use the inpod mode",
                flag_and_env("ambient_ipv6")
            ));
        }
        if self.ambient_enabled && !BUILT_REDIRECT_MODES.contains(&mode) && !self.ebpf_enabled {
            let default = if redirect_mode_explicit {
                ""
            } else {
                ", the default"
            };
            errs.push(format!(
                "AMBIENT_REDIRECT_MODE={mode} (--ambient-redirect-mode{default}) is not available \
                 in this build (no {mode} driver) and ambient is enabled; set \
                 --ambient-redirect-mode=inpod (AMBIENT_REDIRECT_MODE=inpod, the default) or \
                 iptables"
            ));
        }
        if self.remove_node_taint {
            if !self.has_api_access() {
                errs.push(format!(
                    "{} = true needs API access: {} or {} (the agent patches its own Node)",
                    flag_and_env("remove_node_taint"),
                    flag_and_env("kubernetes_service_host"),
                    flag_and_env("ambient_kubeconfig")
                ));
            }
            let node = self.effective_node_name();
            if parse_dns_subdomain(&node).is_err() {
                errs.push(format!(
                    "{} = true needs this node's name ({} or {}, else the hostname): {node:?} is not a node name",
                    flag_and_env("remove_node_taint"),
                    flag_and_env("node_name"),
                    flag_and_env("kubernetes_node_name")
                ));
            }
        } else {
            reject_non_default!(self, d, errs;
                node_taint_key: "only --remove-node-taint (REMOVE_NODE_TAINT) uses it, and it is off",
            );
        }
        if !self.daemonset_name.is_empty() {
            for (field, value) in [
                ("kubernetes_service_host", &self.kubernetes_service_host),
                ("pod_namespace", &self.pod_namespace),
            ] {
                if value.is_empty() {
                    errs.push(format!(
                        "{} = {:?} needs {} (the shutdown check asks the API server for the \
                         DaemonSet in the agent's namespace)",
                        flag_and_env("daemonset_name"),
                        self.daemonset_name,
                        flag_and_env(field)
                    ));
                }
            }
        }
        if !self.pod_metadata_dir.is_empty() && !self.pod_metadata_dir.starts_with('/') {
            errs.push(format!(
                "{} = {:?} must be an absolute path (the plugin reads it on the host)",
                flag_and_env("pod_metadata_dir"),
                self.pod_metadata_dir
            ));
        }
        if self.pod_metadata_default_namespace != d.pod_metadata_default_namespace
            && self.pod_metadata_dir.is_empty()
        {
            errs.push(format!(
                "{} = {:?} needs {} (it names the namespace of pods in the local metadata dir)",
                flag_and_env("pod_metadata_default_namespace"),
                self.pod_metadata_default_namespace,
                flag_and_env("pod_metadata_dir")
            ));
        }
        if !is_namespace_name(&self.pod_metadata_default_namespace) {
            errs.push(format!(
                "{} = {:?} is not a namespace name",
                flag_and_env("pod_metadata_default_namespace"),
                self.pod_metadata_default_namespace
            ));
        }
        self.validate_repair(&mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs))
        }
    }

    /// The repair controller's settings (spec §6), when it is enabled.
    fn validate_repair(&self, errs: &mut Vec<String>) {
        if !self.repair_enabled {
            return;
        }
        if !self.repair_node_name.is_empty() && self.repair_node_name != self.effective_node_name()
        {
            errs.push(format!(
                "{} = {:?} is not this node ({:?}): a pod's netns can only be repaired on its \
                 own node; unset it",
                flag_and_env("repair_node_name"),
                self.repair_node_name,
                self.effective_node_name()
            ));
        }
        if !(self.repair_repair_pods || self.repair_delete_pods || self.repair_label_pods) {
            errs.push(format!(
                "{} = true with no action: set one of {}, {}, {} to true",
                flag_and_env("repair_enabled"),
                flag_and_env("repair_repair_pods"),
                flag_and_env("repair_delete_pods"),
                flag_and_env("repair_label_pods")
            ));
        }
        // One action: the controller takes the first of repair, delete, label (as Istio's); a
        // second one set would be accepted and never used.
        if self.repair_repair_pods {
            for (set, name) in [
                (self.repair_delete_pods, "repair_delete_pods"),
                (self.repair_label_pods, "repair_label_pods"),
            ] {
                if set {
                    errs.push(format!(
                        "{} = true has no effect while {} = true (in-place repair is used): set {} \
                         to false to act on broken pods this way instead, or unset {}",
                        flag_and_env(name),
                        flag_and_env("repair_repair_pods"),
                        flag_and_env("repair_repair_pods"),
                        flag_and_env(name)
                    ));
                }
            }
        } else if self.repair_delete_pods && self.repair_label_pods {
            errs.push(format!(
                "{} = true has no effect while {} = true (broken pods are deleted): choose one",
                flag_and_env("repair_label_pods"),
                flag_and_env("repair_delete_pods")
            ));
        }
        // As the controller decides (`repair::RepairController::spawn`).
        let api = !self.ambient_kubeconfig.is_empty()
            || (self.ambient_workloads_file.is_empty() && !self.kubernetes_service_host.is_empty());
        if !self.repair_repair_pods && (self.repair_delete_pods || self.repair_label_pods) && !api {
            errs.push(format!(
                "{} / {} need the Kubernetes API (set {} or run in a cluster with \
                 KUBERNETES_SERVICE_HOST)",
                flag_and_env("repair_delete_pods"),
                flag_and_env("repair_label_pods"),
                flag_and_env("ambient_kubeconfig")
            ));
        }
        if self.repair_label_pods {
            let key = &self.repair_broken_pod_label_key;
            let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
            let name_ok = |n: &str| {
                !n.is_empty()
                    && n.len() <= 63
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                    && n.as_bytes()[0].is_ascii_alphanumeric()
                    && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
            };
            if !name_ok(name) || (!prefix.is_empty() && parse_dns_subdomain(prefix).is_err()) {
                errs.push(format!(
                    "{} = {key:?} is not a label key",
                    flag_and_env("repair_broken_pod_label_key")
                ));
            }
            let v = &self.repair_broken_pod_label_value;
            if !v.is_empty() && !name_ok(v) {
                errs.push(format!(
                    "{} = {v:?} is not a label value",
                    flag_and_env("repair_broken_pod_label_value")
                ));
            }
        }
    }

    /// The meshcni fields of the plugin config, as the installer writes them.
    pub fn plugin_fields(&self) -> meshcni_install::agent_settings::AgentPluginFields {
        let d = AgentArgs::defaults();
        let metadata = !self.pod_metadata_dir.is_empty();
        meshcni_install::agent_settings::AgentPluginFields {
            pod_metadata_dir: metadata.then(|| self.pod_metadata_dir.clone()),
            pod_metadata_default_namespace: (metadata
                && self.pod_metadata_default_namespace != d.pod_metadata_default_namespace)
                .then(|| self.pod_metadata_default_namespace.clone()),
            ambient_detection_failure_policy: (self.ambient_detection_failure_policy
                != d.ambient_detection_failure_policy)
                .then(|| self.ambient_detection_failure_policy.as_str().to_string()),
        }
    }

    /// Whether ambient pods get IPv6 rules: `AMBIENT_IPV6`, else true for the inpod and ebpf
    /// modes (the iptables mode is IPv4-only).
    pub fn effective_ambient_ipv6(&self, mode: RedirectMode) -> bool {
        self.ambient_ipv6.unwrap_or(mode != RedirectMode::Iptables)
    }

    /// The redirect mode in effect (EBPF_ENABLED only upgrades the default).
    pub fn effective_redirect_mode(&self, redirect_mode_explicit: bool) -> RedirectMode {
        if self.ebpf_enabled && !redirect_mode_explicit {
            RedirectMode::Ebpf
        } else {
            self.ambient_redirect_mode
        }
    }

    /// Whether the agent has Kubernetes API access: `--ambient-kubeconfig`, else in-cluster
    /// (`KUBERNETES_SERVICE_HOST` set). The access itself: `workloads::kube::AccessConfig::from_args`.
    pub fn has_api_access(&self) -> bool {
        !self.ambient_kubeconfig.is_empty() || !self.kubernetes_service_host.is_empty()
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

/// A DNS-1123 label (Kubernetes namespace name): the one check behind [`parse_dns_label`] and
/// the `--pod-metadata-default-namespace` validation.
fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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

/// The reference's taint key (istiod's untaint controller, `cni.istio.io/not-ready`); the
/// default of `--node-taint-key` (node_taint.rs removes it).
pub const DEFAULT_TAINT_KEY: &str = "cni.istio.io/not-ready";

/// A taint key: `[prefix/]name`, the prefix a DNS subdomain (≤ 253), the name 1–63 of
/// `[A-Za-z0-9_.-]` starting and ending alphanumeric (Kubernetes' qualified name).
pub fn parse_taint_key(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{s:?} is not a taint key: {why}"));
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix
        && parse_dns_subdomain(p).is_err()
    {
        return bad("the prefix before '/' must be a DNS subdomain (lowercase, at most 253)");
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        return bad(
            "the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
    Ok(s.to_string())
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

    /// `BUILT_REDIRECT_MODES` is exactly the set of modes `ambient::make_driver` can build.
    #[test]
    fn built_modes_are_the_modes_with_a_driver() {
        let tmp = std::env::temp_dir().join(format!("mcni-cli-{}", std::process::id()));
        let mut args = AgentArgs::defaults();
        args.cni_agent_run_dir = tmp.clone();
        // The ebpf driver pins on a private bpffs (never the host's /sys/fs/bpf); root needed.
        let bpffs = tmp.join("bpffs");
        std::fs::create_dir_all(&bpffs).expect("bpffs dir");
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a private bpffs (root needed)");
        args.ambient_ebpf_pin_dir = bpffs.join("meshcni");
        for mode in [
            RedirectMode::Iptables,
            RedirectMode::Ebpf,
            RedirectMode::Inpod,
        ] {
            assert_eq!(
                crate::ambient::make_driver(mode, &args).is_ok(),
                BUILT_REDIRECT_MODES.contains(&mode),
                "{mode}"
            );
        }
        meshcni_ebpf::uninstall(&args.ambient_ebpf_pin_dir, &[]).expect("remove the pins");
        let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(tmp);
    }

    /// Error messages derive `--flag (ENV)` from the field name: true for every flag.
    #[test]
    fn flag_and_env_names_follow_the_field_names() {
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(
                flag_and_env(arg.get_id().as_str()),
                format!("--{long} ({})", env.unwrap_or_default())
            );
        }
    }

    #[test]
    fn defaults_validate_and_ignore_the_environment() {
        let d = AgentArgs::defaults();
        assert_eq!(d.validate(false), Ok(()));
        assert!(
            !d.repair_enabled && d.ambient_ipv6.is_none(),
            "no default claims an unbuilt feature"
        );
        let mut a = d.clone();
        a.repair_init_container_name = "other".into();
        a.pod_metadata_default_namespace = "demo".into();
        let err = a.validate(false).expect_err("rejected").to_string();
        assert!(
            err.contains("--repair-init-container-name (REPAIR_INIT_CONTAINER_NAME) = \"other\""),
            "{err}"
        );
        assert!(err.contains("needs --pod-metadata-dir"), "{err}");
        a.repair_init_container_name = d.repair_init_container_name.clone();
        a.pod_metadata_dir = "/m".into();
        assert_eq!(a.validate(false), Ok(()));
        a.pod_metadata_dir = "m".into();
        assert!(a.validate(false).is_err());
    }

    #[test]
    fn repair_settings_are_checked_when_repair_is_on() {
        let mut a = AgentArgs::defaults();
        a.node_name = "n1".into();
        a.repair_enabled = true;
        assert_eq!(
            a.validate(false),
            Ok(()),
            "in-place repair needs nothing else"
        );
        a.repair_node_name = "n2".into();
        let err = a.validate(false).expect_err("other node").to_string();
        assert!(
            err.contains("--repair-node-name (REPAIR_NODE_NAME)"),
            "{err}"
        );
        a.repair_node_name = "n1".into();
        assert_eq!(a.validate(false), Ok(()));
        a.repair_repair_pods = false;
        let err = a.validate(false).expect_err("no action").to_string();
        assert!(err.contains("with no action"), "{err}");
        // A second action would never be used: refused, naming both settings.
        a.repair_repair_pods = true;
        for delete in [true, false] {
            a.repair_delete_pods = delete;
            a.repair_label_pods = !delete;
            let err = a.validate(false).expect_err("shadowed action").to_string();
            let shadowed = if delete {
                "--repair-delete-pods (REPAIR_DELETE_PODS) = true has no effect while \
                 --repair-repair-pods (REPAIR_REPAIR_PODS) = true"
            } else {
                "--repair-label-pods (REPAIR_LABEL_PODS) = true has no effect while \
                 --repair-repair-pods (REPAIR_REPAIR_PODS) = true"
            };
            assert!(err.contains(shadowed), "{err}");
        }
        a.repair_repair_pods = false;
        a.repair_delete_pods = true;
        a.repair_label_pods = true;
        a.ambient_kubeconfig = "/k".into();
        let err = a.validate(false).expect_err("delete and label").to_string();
        assert!(
            err.contains(
                "--repair-label-pods (REPAIR_LABEL_PODS) = true has no effect while \
                 --repair-delete-pods (REPAIR_DELETE_PODS) = true"
            ),
            "{err}"
        );
        a.repair_delete_pods = false;
        a.ambient_kubeconfig.clear();
        let err = a.validate(false).expect_err("no API").to_string();
        assert!(err.contains("need the Kubernetes API"), "{err}");
        a.ambient_kubeconfig = "/k".into();
        assert_eq!(a.validate(false), Ok(()));
        a.repair_broken_pod_label_key = "bad key!".into();
        let err = a.validate(false).expect_err("label key").to_string();
        assert!(err.contains("is not a label key"), "{err}");
        a.repair_broken_pod_label_key = "example.com/broken".into();
        a.repair_broken_pod_label_value = "-x".into();
        let err = a.validate(false).expect_err("label value").to_string();
        assert!(err.contains("is not a label value"), "{err}");
        a.repair_broken_pod_label_value = "yes".into();
        assert_eq!(a.validate(false), Ok(()));
        // A workloads file is no API: label/delete need one named explicitly.
        a.ambient_kubeconfig.clear();
        a.kubernetes_service_host = "127.0.0.1".into();
        a.ambient_workloads_file = "/w.json".into();
        assert!(a.validate(false).is_err());
        a.ambient_workloads_file.clear();
        assert_eq!(a.validate(false), Ok(()));
        // The netns search root is accepted with repair on (ambient off).
        a.host_proc_dir = "/host/proc".into();
        assert_eq!(a.validate(false), Ok(()));
        a.repair_enabled = false;
        assert!(a.validate(false).is_err());
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
