//! Init-container mode: `meshcni iptables [flags]` applies the sidecar capture in the *current*
//! network namespace, accepting Istio's `istio-iptables` flags and their environment variables
//! (spec §2.2), for clusters that run without the CNI plugin. Same generator, same atomic apply.

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;
use meshcni_netx::{Applier, Backend, IptablesFlavor, IptablesOptions};
use meshcni_rules::iptables::{self, Family};
use meshcni_rules::nft;
use meshcni_rules::sidecar::{self, CaptureConfig};

use crate::config::RuleBackend;

/// Istio `istio-iptables` compatible flags. Every flag can also be set through the environment
/// variable named after it (upper snake case), as Istio's viper binding does.
#[derive(Debug, Parser)]
#[command(
    name = "meshcni iptables",
    about = "Apply Istio sidecar traffic capture in the current network namespace (istio-iptables compatible)"
)]
pub struct InitArgs {
    /// Outbound capture port (Envoy).
    #[arg(short = 'p', long, env = "ENVOY_PORT", default_value = "15001")]
    pub envoy_port: String,
    /// Inbound capture port.
    #[arg(
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// HBONE tunnel port (never captured).
    #[arg(
        short = 'e',
        long,
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// UID(s) of the proxy, exempt from capture (comma list). Default: uid of ENVOY_USER or 1337.
    #[arg(short = 'u', long, env = "PROXY_UID")]
    pub proxy_uid: Option<String>,
    /// GID(s) of the proxy (comma list). Default: the UID list.
    #[arg(short = 'g', long, env = "PROXY_GID")]
    pub proxy_gid: Option<String>,
    /// REDIRECT or TPROXY.
    #[arg(
        short = 'm',
        long,
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = ""
    )]
    pub istio_inbound_interception_mode: String,
    /// Inbound ports to capture (comma list or `*`).
    #[arg(short = 'b', long, env = "ISTIO_INBOUND_PORTS", default_value = "")]
    pub istio_inbound_ports: String,
    /// Inbound ports excluded from capture (comma list).
    #[arg(
        short = 'd',
        long,
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub istio_local_exclude_ports: String,
    /// Interfaces whose traffic is never captured (comma list).
    #[arg(
        short = 'c',
        long,
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub istio_exclude_interfaces: String,
    /// Outbound IP ranges to capture (CIDR list or `*`).
    #[arg(short = 'i', long, env = "ISTIO_SERVICE_CIDR", default_value = "")]
    pub istio_service_cidr: String,
    /// Outbound IP ranges excluded from capture (CIDR list).
    #[arg(
        short = 'x',
        long,
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub istio_service_exclude_cidr: String,
    /// Outbound ports always captured (comma list).
    #[arg(short = 'q', long, env = "ISTIO_OUTBOUND_PORTS", default_value = "")]
    pub istio_outbound_ports: String,
    /// Outbound ports excluded from capture (comma list).
    #[arg(
        short = 'o',
        long,
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub istio_local_outbound_ports_exclude: String,
    /// Virtual interfaces whose inbound traffic is treated as outbound (comma list).
    #[arg(short = 'k', long, env = "KUBE_VIRT_INTERFACES", default_value = "")]
    pub kube_virt_interfaces: String,
    /// TPROXY mark.
    #[arg(
        short = 't',
        long,
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337"
    )]
    pub istio_inbound_tproxy_mark: String,
    /// TPROXY route table.
    #[arg(
        short = 'r',
        long,
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub istio_inbound_tproxy_route_table: String,
    /// Print the rules instead of applying them.
    #[arg(short = 'n', long, env = "DRY_RUN")]
    pub dry_run: bool,
    /// Capture DNS (port 53) to the proxy agent on 15053.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE")]
    pub redirect_dns: bool,
    /// Capture all DNS, not only to the resolv.conf servers.
    #[arg(long, env = "CAPTURE_ALL_DNS")]
    pub capture_all_dns: bool,
    /// Drop packets conntrack marks INVALID.
    #[arg(long, env = "INVALID_DROP")]
    pub drop_invalid: bool,
    /// Program IPv6 whenever any IPv6 address exists.
    #[arg(long, env = "ISTIO_DUAL_STACK")]
    pub dual_stack: bool,
    /// Remove existing meshcni/Istio capture before applying (drift repair).
    #[arg(long, env = "RECONCILE")]
    pub reconcile: bool,
    /// Only remove the capture rules.
    #[arg(long, env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,
    /// Use the native nftables backend.
    #[arg(long, env = "NATIVE_NFTABLES")]
    pub native_nftables: bool,
    /// Force the iptables flavor (`legacy` or `nft`).
    #[arg(long, env = "FORCE_IPTABLES_BINARY")]
    pub force_iptables_binary: Option<String>,
    /// Accepted for compatibility; the init container runs in the pod netns already.
    #[arg(long, env = "CNI_MODE", hide = true)]
    pub cni_mode: bool,
    /// Accepted for compatibility (the rules do not depend on it).
    #[arg(long, env = "NETWORK_NAMESPACE", hide = true)]
    pub network_namespace: Option<String>,
    /// Accepted for compatibility; meshcni applies atomically and verifies by exit status.
    #[arg(long, hide = true)]
    pub skip_rule_apply: bool,
    /// Accepted for compatibility.
    #[arg(long, hide = true)]
    pub force_apply: bool,
}

impl InitArgs {
    /// The capture configuration these flags (and the `ISTIO_OUTBOUND_*` env knobs) describe.
    pub fn capture_config(&self, env: impl Fn(&str) -> Option<String>) -> CaptureConfig {
        let uid = self
            .proxy_uid
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "1337".to_string());
        let gid = self
            .proxy_gid
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| uid.clone());
        let mut cfg = CaptureConfig {
            proxy_port: self.envoy_port.clone(),
            inbound_capture_port: self.inbound_capture_port.clone(),
            inbound_tunnel_port: self.inbound_tunnel_port.clone(),
            proxy_uid: uid,
            proxy_gid: gid,
            inbound_interception_mode: self.istio_inbound_interception_mode.clone(),
            inbound_tproxy_mark: self.istio_inbound_tproxy_mark.clone(),
            inbound_tproxy_route_table: self.istio_inbound_tproxy_route_table.clone(),
            inbound_ports_include: self.istio_inbound_ports.clone(),
            inbound_ports_exclude: self.istio_local_exclude_ports.clone(),
            outbound_ports_include: self.istio_outbound_ports.clone(),
            outbound_ports_exclude: self.istio_local_outbound_ports_exclude.clone(),
            outbound_ip_ranges_include: self.istio_service_cidr.clone(),
            outbound_ip_ranges_exclude: self.istio_service_exclude_cidr.clone(),
            reroute_virtual_interfaces: self.kube_virt_interfaces.clone(),
            exclude_interfaces: self.istio_exclude_interfaces.clone(),
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            drop_invalid: self.drop_invalid,
            dual_stack: self.dual_stack,
            ..CaptureConfig::default()
        };
        if let Some(g) = env("ISTIO_OUTBOUND_OWNER_GROUPS") {
            cfg.owner_groups_include = g;
        }
        if let Some(g) = env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE") {
            cfg.owner_groups_exclude = g;
        }
        if let Some(c) = env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR").filter(|c| !c.is_empty()) {
            cfg.host_ipv4_loopback_cidr = c;
        }
        cfg
    }
}

/// Nameservers of a resolv.conf, split by family (used when DNS capture is limited to them).
pub fn resolv_conf_servers(text: &str) -> (Vec<String>, Vec<String>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        match words.next().map(|a| a.parse::<std::net::IpAddr>()) {
            Some(Ok(std::net::IpAddr::V4(a))) => v4.push(a.to_string()),
            Some(Ok(std::net::IpAddr::V6(a))) => v6.push(a.to_string()),
            _ => {}
        }
    }
    (v4, v6)
}

/// Entry point for `meshcni iptables …`; returns the exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match InitArgs::try_parse_from(
        std::iter::once(OsString::from("meshcni iptables")).chain(args),
    ) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meshcni iptables: {e}");
            1
        }
    }
}

fn run(args: &InitArgs) -> Result<(), String> {
    let netns = Path::new("/proc/self/ns/net");
    let mut cfg = args.capture_config(|k| std::env::var(k).ok());
    if cfg.redirect_dns && !cfg.capture_all_dns {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        (cfg.dns_servers_v4, cfg.dns_servers_v6) = resolv_conf_servers(&text);
    }
    cfg.enable_ipv6 = meshcni_netx::detect::ipv6_enabled(netns, true).map_err(|e| e.to_string())?;
    let backend = if args.native_nftables {
        RuleBackend::Nftables
    } else {
        RuleBackend::Iptables
    };
    let rs = sidecar::build(&cfg).map_err(|e| format!("invalid configuration: {e}"))?;
    let mut options = IptablesOptions::from_env();
    options.force = match args.force_iptables_binary.as_deref() {
        Some("legacy") => Some(IptablesFlavor::Legacy),
        Some("nft") => Some(IptablesFlavor::Nft),
        Some(other) => {
            return Err(format!(
                "--force-iptables-binary {other:?}: want legacy or nft"
            ));
        }
        None => options.force,
    };
    let applier = Applier {
        backend: if args.native_nftables {
            Backend::Nftables
        } else {
            Backend::Iptables
        },
        iptables: options,
    };
    if args.dry_run {
        if args.native_nftables {
            print!("{}", nft::render(&rs));
        } else {
            print!("{}", iptables::render_restore(&rs, Family::V4));
            if rs.ipv6 {
                print!("{}", iptables::render_restore(&rs, Family::V6));
            }
        }
        return Ok(());
    }
    if args.cleanup_only || args.reconcile {
        crate::cleanup::remove_sidecar_capture(&applier, netns, &rs)
            .map_err(|e| format!("cleanup failed: {e}"))?;
        if args.cleanup_only {
            return Ok(());
        }
    }
    let plan =
        crate::flow::plan_for(&cfg, backend).map_err(|e| format!("invalid configuration: {e}"))?;
    applier
        .apply_capture(netns, &plan)
        .map_err(|e| format!("applying capture failed: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> InitArgs {
        InitArgs::try_parse_from(std::iter::once("meshcni iptables").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn istio_init_container_args_map_onto_the_capture_config() {
        // The args Istio's injector gives istio-init.
        let a = parse(
            &[
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,15020",
                "--log_output_level=default:info",
            ][..16],
        );
        let cfg = a.capture_config(|_| None);
        assert_eq!(cfg.proxy_uid, "1337");
        assert_eq!(cfg.proxy_gid, "1337");
        assert_eq!(cfg.outbound_ip_ranges_include, "*");
        assert_eq!(cfg.inbound_ports_include, "*");
        assert_eq!(cfg.inbound_ports_exclude, "15090,15021,15020");
        assert_eq!(cfg.inbound_interception_mode, "REDIRECT");
        sidecar::build(&cfg).unwrap();
    }

    #[test]
    fn env_knobs_are_honoured() {
        let a = parse(&["-u", "3,4"]);
        let cfg = a.capture_config(|k| match k {
            "ISTIO_OUTBOUND_OWNER_GROUPS" => Some("java,202".into()),
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" => Some("127.0.0.1/8".into()),
            _ => None,
        });
        assert_eq!(cfg.proxy_gid, "3,4");
        assert_eq!(cfg.owner_groups_include, "java,202");
        assert_eq!(cfg.host_ipv4_loopback_cidr, "127.0.0.1/8");
    }

    #[test]
    fn resolv_conf_parsing_splits_families() {
        let (v4, v6) = resolv_conf_servers(
            "# x\nnameserver 10.96.0.10\nsearch a b\nnameserver fd00::a\nnameserver bogus\n",
        );
        assert_eq!(v4, vec!["10.96.0.10"]);
        assert_eq!(v6, vec!["fd00::a"]);
    }

    #[test]
    fn unknown_flag_is_a_usage_error() {
        assert_eq!(main(["--no-such-flag".into()]), 2);
    }
}
