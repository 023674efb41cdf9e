//! The agent's view of the installer: what it needs from `meshcni-install` (start keeping the
//! plugin installed, a ready flag, counters, stop, uninstall), as a small trait so the HTTP,
//! metrics and shutdown logic are tested independently of the real file work.

/// Installer counters, cumulative since start. The names mirror Istio's
/// `istio_cni_installs_total{result}` label values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstallCounters {
    /// Install passes that completed (`SUCCESS`).
    pub success: u64,
    /// Passes that failed copying binaries (`COPY_BINARIES_FAILURE`).
    pub copy_binaries_failure: u64,
    /// Passes that failed writing the kubeconfig (`CREATE_KUBECONFIG_FAILURE`).
    pub create_kubeconfig_failure: u64,
    /// Passes that failed writing the CNI config (`CREATE_CNI_CONFIG_FILE_FAILURE`).
    pub create_cni_config_failure: u64,
    /// Times our entry had to be put back because something removed or rewrote it.
    pub config_reinserts: u64,
    /// How long our entry was missing before the last re-insert (removal → re-insert).
    pub last_reinsert_latency: Option<std::time::Duration>,
    /// The longest such time since start.
    pub max_reinsert_latency: Option<std::time::Duration>,
}

impl InstallCounters {
    /// `(meshcni label, Istio label, value)` rows for the install-events families.
    pub fn rows(&self) -> [(&'static str, &'static str, u64); 4] {
        [
            ("success", "SUCCESS", self.success),
            (
                "copy_binaries_failure",
                "COPY_BINARIES_FAILURE",
                self.copy_binaries_failure,
            ),
            (
                "create_kubeconfig_failure",
                "CREATE_KUBECONFIG_FAILURE",
                self.create_kubeconfig_failure,
            ),
            (
                "create_cni_config_failure",
                "CREATE_CNI_CONFIG_FAILURE",
                self.create_cni_config_failure,
            ),
        ]
    }
}

/// What the agent drives. Implementations must be cheap to query from any thread.
pub trait NodeInstaller: Send + Sync + 'static {
    /// The installed state is complete and valid right now.
    fn is_ready(&self) -> bool;
    /// Counters since start.
    fn counters(&self) -> InstallCounters;
    /// Stop keeping the installation in place and wait for the keeper to finish. Removes nothing.
    fn stop(&self);
    /// Why the installation is not ready (last failed pass or check), if known.
    fn last_error(&self) -> Option<String>;
    /// Remove everything this installer put on the node.
    fn uninstall(&self) -> Result<(), String>;
    /// After [`NodeInstaller::stop`], when the plugin stays installed: verify every part of
    /// the installation once more and put back what is missing (a primary CNI that rewrote
    /// its file while the keeper was stopping). Returns what was found and done per part.
    fn verify_and_repair(&self) -> Vec<meshcni_install::RepairStep>;
}
