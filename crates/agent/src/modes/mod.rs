//! Redirect-mode drivers, each an implementation of [`crate::seam::RedirectDriver`] in one
//! module that imports the seam and the pure planner types, never the reconcile loop:
//!
//! * [`iptables`] — G1 node-level redirection: node iptables + ipset + policy routing +
//!   GENEVE/VXLAN tunnels into the ztunnel pod (spec §3).
//! * [`inpod`] — rules inside each pod netns, the netns handed to ztunnel over ZDS (spec §7).
//! * [`ebpf`] — node-level tc eBPF programs and pinned maps (`meshcni-ebpf`), no iptables.
//! * [`fake`] — an in-memory driver for tests of the loop.
//!
//! [`make_driver`] is the one place a mode name becomes a driver.

pub mod ebpf;
pub mod fake;
pub mod inpod;
pub mod iptables;

use crate::ambient_config::RedirectMode;
use crate::seam::RedirectDriver;

/// The driver for `mode`, or `Err(reason)` when this build has none (ambient then stays
/// not ready with that reason: gate `redirect-mode`). Redirect-mode drivers add their arm
/// here; `args` carries everything a driver may need (node name, host IP, iptables flavour,
/// DNS capture, IPv6, ...).
pub fn make_driver(
    mode: RedirectMode,
    args: &crate::cli::AgentArgs,
) -> Result<Box<dyn RedirectDriver>, String> {
    match mode {
        RedirectMode::Iptables => {
            use crate::modes::iptables::IptablesDriver;
            IptablesDriver::new(iptables_config(args))
                .map(|d| Box::new(d) as Box<dyn RedirectDriver>)
                .map_err(|e| e.message)
        }
        RedirectMode::Inpod => {
            use crate::modes::inpod::InpodDriver;
            let cfg = inpod_config(args, mode);
            InpodDriver::new(cfg)
                .map(|d| Box::new(d) as Box<dyn RedirectDriver>)
                .map_err(|e| e.message)
        }
        RedirectMode::Ebpf => {
            use crate::modes::ebpf::EbpfDriver;
            EbpfDriver::new(ebpf_config(args, mode))
                .map(|d| Box::new(d) as Box<dyn RedirectDriver>)
                .map_err(|e| e.message)
        }
    }
}

/// The iptables driver's configuration from the flags (also what `doctor` checks against).
pub fn iptables_config(args: &crate::cli::AgentArgs) -> crate::modes::iptables::IptablesModeConfig {
    let mut iptables = meshcni_netx::IptablesOptions::from_env();
    if let Some(forced) = meshcni_netx::IptablesFlavor::parse_forced(&args.force_iptables_binary) {
        iptables.force = Some(forced);
    }
    crate::modes::iptables::IptablesModeConfig {
        dns_capture: args.ambient_dns_capture,
        // Kept on a hostPath with the rest of the run dir, so a restarted agent adopts
        // its own state (and remembers the sysctls to restore on uninstall).
        state_file: args.cni_agent_run_dir.join("iptables-mode.json"),
        netns_dir: args.netns_dir.clone(),
        node_xtables_lock: args.node_xtables_lock.clone(),
        iptables,
        ..crate::modes::iptables::IptablesModeConfig::default()
    }
}

/// The ebpf driver's configuration from the flags (also what `doctor` checks against).
pub fn ebpf_config(
    args: &crate::cli::AgentArgs,
    mode: RedirectMode,
) -> crate::modes::ebpf::EbpfModeConfig {
    crate::modes::ebpf::EbpfModeConfig {
        netns_dirs: vec![args.netns_dir.clone()],
        proc_root: args.host_proc_dir.clone(),
        pin_dir: args.ambient_ebpf_pin_dir.clone(),
        pod_capacity: args.ambient_ebpf_max_pods,
        attach: match args.ambient_ebpf_attach.as_str() {
            "tcx" => meshcni_ebpf::AttachMode::Tcx,
            "clsact" => meshcni_ebpf::AttachMode::Clsact,
            _ => meshcni_ebpf::AttachMode::Auto,
        },
        dns_capture: args.ambient_dns_capture,
        enable_ipv6: args.effective_ambient_ipv6(mode),
        // On the run dir's hostPath: a restarted agent adopts its pods.
        state_file: args.cni_agent_run_dir.join("ebpf-mode.json"),
        ..crate::modes::ebpf::EbpfModeConfig::default()
    }
}

/// The inpod driver's state file: next to the plugin's socket on the run dir's hostPath, so a
/// restarted agent adopts its pods.
pub fn inpod_state_file(args: &crate::cli::AgentArgs) -> std::path::PathBuf {
    args.cni_agent_run_dir.join("inpod-mode.json")
}

/// The inpod driver's configuration from the flags (also what `doctor` checks pods against).
pub fn inpod_config(
    args: &crate::cli::AgentArgs,
    mode: RedirectMode,
) -> crate::modes::inpod::InpodModeConfig {
    crate::modes::inpod::InpodModeConfig {
        zds_socket: args.ztunnel_uds_address.clone(),
        rules: meshcni_rules::inpod::InpodConfig {
            redirect_dns: args.ambient_dns_capture,
            enable_ipv6: args.effective_ambient_ipv6(mode),
            host_probe_snat_v4: args.host_probe_snat_ip,
            host_probe_snat_v6: args.host_probe_snat_ipv6,
        },
        backend: if args.native_nftables {
            meshcni_netx::inpod::InpodBackend::Nftables
        } else {
            meshcni_netx::inpod::InpodBackend::Iptables
        },
        state_file: inpod_state_file(args),
        netns_dirs: vec![args.netns_dir.clone()],
        proc_root: args.host_proc_dir.clone(),
        reconcile_on_startup: args.ambient_reconcile_pod_rules_on_startup,
        ..crate::modes::inpod::InpodModeConfig::default()
    }
}
