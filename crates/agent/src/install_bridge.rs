//! [`NodeInstaller`] on top of `meshcni-install`: maps the agent's flags onto
//! [`InstallConfig`], runs the installer's keeper thread, and exposes its status.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use meshcni_install::{InstallConfig, InstallResult, InstallStatus, Installer, Shutdown};

use crate::cli::{AgentArgs, LogLevel};
use crate::installer::{InstallCounters, NodeInstaller};

/// Map the flags onto the installer configuration (pure).
pub fn install_config(args: &AgentArgs) -> Result<InstallConfig, String> {
    let non_empty = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
    let defaults = InstallConfig::default();
    Ok(InstallConfig {
        mounted_cni_net_dir: args.mounted_cni_net_dir.clone(),
        cni_net_dir: args.cni_net_dir.clone(),
        cni_conf_name: args.cni_conf_name.clone(),
        chained_cni_plugin: args.chained_cni_plugin,
        cni_network_config: args.cni_network_config.clone(),
        cni_network_config_file: non_empty(&args.cni_network_config_file),
        kubecfg_file_name: args.kubecfg_file_name.clone(),
        // HEAD layout: the kubeconfig lives in the run dir, where the plugin looks for it.
        kubeconfig_dir: None,
        kubeconfig_mode: args.kubeconfig_mode,
        kube_ca_file: non_empty(&args.kube_ca_file),
        skip_tls_verify: args.skip_tls_verify,
        k8s_service_protocol: args.kubernetes_service_protocol.clone(),
        k8s_service_host: args.kubernetes_service_host.clone(),
        k8s_service_port: args.kubernetes_service_port.clone(),
        k8s_node_name: args.effective_node_name(),
        service_account_dir: args.service_account_dir.clone(),
        cni_agent_run_dir: args.cni_agent_run_dir.clone(),
        istio_owned_cni_config: args.istio_owned_cni_config,
        istio_owned_cni_config_filename: args.istio_owned_cni_config_filename.clone(),
        cni_conf_group_read: args.cni_conf_group_read,
        cni_bin_source_dir: args.cni_bin_dir.clone(),
        cni_bin_target_dirs: args.cni_bin_dirs.clone(),
        // The plugin logs at the agent's level (Istio derives it from the agent's scope).
        plugin_log_level: match args.log_level {
            LogLevel::Trace | LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::None => "none",
        }
        .into(),
        log_uds_address: args.log_uds_address.to_string_lossy().into_owned(),
        ambient_enabled: args.ambient_enabled,
        // An empty selector means Istio's defaults for the agent's own enrollment; write those
        // defaults into the plugin config too, so plugin and agent agree on who is ambient
        // (an explicit `[]` would tell the plugin that no pod is).
        ambient_enablement_selector: if args.ambient_enabled
            && args.ambient_enablement_selector.trim().is_empty()
        {
            DEFAULT_ENABLEMENT_SELECTORS_YAML.to_string()
        } else {
            args.ambient_enablement_selector.clone()
        },
        exclude_namespaces: args.excluded_namespaces().join(","),
        pod_namespace: args.pod_namespace.clone(),
        native_nftables: args.native_nftables,
        enable_ambient_detection_retry: args.enable_ambient_detection_retry,
        meshcni_plugin_fields: args.plugin_fields(),
        // The uninstall record (the primary's config as it was before our edit) lives in the
        // run dir, next to the kubeconfig; it survives agent restarts and upgrades (a hostPath)
        // but not a reboot of a tmpfs /var/run, after which uninstall cuts out our entry only.
        state_dir: Some(args.cni_agent_run_dir.clone()),
        ..defaults
    })
}

/// Istio's Helm default `ambient.enablementSelectors`: pods labelled
/// `istio.io/dataplane-mode=ambient`, or pods not opted out in a namespace labelled so.
pub const DEFAULT_ENABLEMENT_SELECTORS_YAML: &str = r#"- podSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
- podSelector:
    matchExpressions:
    - key: istio.io/dataplane-mode
      operator: NotIn
      values: ["none"]
  namespaceSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
"#;

#[cfg(test)]
mod selector_tests {
    use super::*;

    #[test]
    fn default_selectors_match_the_plugin_and_agent_defaults() {
        meshcni_install::conflist::parse_enablement_selectors(DEFAULT_ENABLEMENT_SELECTORS_YAML)
            .expect("the installer accepts the default selectors");
        let parsed: Vec<meshcni_kube::EnablementSelector> =
            serde_saphyr::from_str(DEFAULT_ENABLEMENT_SELECTORS_YAML)
                .expect("default selectors parse");
        assert_eq!(parsed, meshcni_kube::EnablementSelector::istio_defaults());
    }
}

/// The real installer plus its keeper thread.
pub struct MeshInstaller {
    installer: Arc<Installer>,
    status: Arc<InstallStatus>,
    shutdown: Shutdown,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl NodeInstaller for MeshInstaller {
    fn is_ready(&self) -> bool {
        self.status.ready()
    }

    fn counters(&self) -> InstallCounters {
        let s = &self.status;
        InstallCounters {
            success: s.installs(InstallResult::Success),
            copy_binaries_failure: s.installs(InstallResult::CopyBinariesFailure),
            create_kubeconfig_failure: s.installs(InstallResult::CreateKubeconfigFailure),
            create_cni_config_failure: s.installs(InstallResult::CreateCniConfigFailure),
            config_reinserts: s.reinserts(),
            last_reinsert_latency: s.last_reinsert_latency(),
            max_reinsert_latency: s.max_reinsert_latency(),
        }
    }

    fn stop(&self) {
        self.shutdown.trigger();
        let handle = self.keeper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if handle.is_some_and(|h| h.join().is_err()) {
            tracing::error!("the installer keeper thread panicked");
        }
    }

    fn last_error(&self) -> Option<String> {
        self.status.last_error()
    }

    fn uninstall(&self) -> Result<(), String> {
        self.installer.uninstall().map_err(|e| e.to_string())
    }

    fn verify_and_repair(&self) -> Vec<meshcni_install::RepairStep> {
        self.installer.verify_and_repair()
    }
}

fn build(args: &AgentArgs) -> Result<MeshInstaller, String> {
    let cfg = install_config(args)?;
    let installer = Installer::new(cfg).map_err(|e| e.to_string())?;
    Ok(MeshInstaller {
        installer: Arc::new(installer),
        status: Arc::new(InstallStatus::new()),
        shutdown: Shutdown::new(),
        keeper: Mutex::new(None),
    })
}

/// Build the installer and start its keeper.
pub fn start(args: &AgentArgs) -> Result<Arc<dyn NodeInstaller>, String> {
    let m = build(args)?;
    let handle = m
        .installer
        .spawn_keeper(m.status.clone(), m.shutdown.clone())
        .map_err(|e| format!("spawning the installer keeper thread: {e}"))?;
    *m.keeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
    Ok(Arc::new(m))
}

/// Build the installer without a keeper (for `meshcni-agent uninstall`).
pub fn for_uninstall(args: &AgentArgs) -> Result<Arc<dyn NodeInstaller>, String> {
    Ok(Arc::new(build(args)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    #[test]
    fn flags_map_onto_the_install_config() {
        let a = Cli::try_parse_from([
            "meshcni-agent",
            "--mounted-cni-net-dir=/m",
            "--cni-net-dir=/h",
            "--cni-bin-dir=/src",
            "--cni-bin-dirs=/t1,/t2",
            "--chained-cni-plugin=false",
            "--cni-conf-name=x.conf",
            "--kubeconfig-mode=0640",
            "--kube-ca-file=/ca.pem",
            "--exclude-namespaces=kube-system,istio-system",
            "--log-level=trace",
            "--ambient-enabled",
            "--node-name=n1",
            "--cni-agent-run-dir=/run/x",
        ])
        .expect("parse")
        .args;
        let c = install_config(&a).expect("map");
        assert_eq!(c.mounted_cni_net_dir, std::path::PathBuf::from("/m"));
        assert_eq!(c.cni_net_dir, std::path::PathBuf::from("/h"));
        assert_eq!(c.cni_bin_source_dir, std::path::PathBuf::from("/src"));
        assert_eq!(c.cni_bin_target_dirs.len(), 2);
        assert!(!c.chained_cni_plugin);
        assert_eq!(c.cni_conf_name, "x.conf");
        assert_eq!(c.kubeconfig_mode, 0o640);
        assert_eq!(c.kube_ca_file, Some("/ca.pem".into()));
        assert_eq!(
            c.cni_network_config_file, None,
            "empty flag = no template file"
        );
        assert_eq!(c.exclude_namespaces, "kube-system,istio-system");
        assert_eq!(c.plugin_log_level, "debug");
        assert!(c.ambient_enabled);
        assert_eq!(c.k8s_node_name, "n1");
        assert_eq!(
            c.kubeconfig_path(),
            std::path::PathBuf::from("/run/x/meshcni-kubeconfig")
        );
        assert_eq!(c.plugin_type, "meshcni");
        assert_eq!(
            c.state_dir,
            Some(std::path::PathBuf::from("/run/x")),
            "the uninstall record lives in the run dir"
        );
    }
}
