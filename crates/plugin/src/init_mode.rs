//! Init-container mode: `meshcni iptables [flags]` applies the sidecar capture in the *current*
//! network namespace, accepting Istio's `istio-iptables` flags and their environment variables
//! (spec §2.2), for clusters that run without the CNI plugin. Same generator, same atomic apply.

use std::ffi::OsString;
use std::path::Path;

use clap::builder::FalseyValueParser;
use clap::{ArgAction, Parser};
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
    /// UID(s) of the proxy, exempt from capture (comma list). Default: 1337 (Istio looks up the
    /// uid of `$ENVOY_USER`, `istio-proxy`, which is 1337 in its images; not done here).
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
    #[arg(short = 'n', long, env = "DRY_RUN", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub dry_run: bool,
    /// Capture DNS (port 53) to the proxy agent on 15053.
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub redirect_dns: bool,
    /// Capture all DNS, not only to the resolv.conf servers.
    #[arg(long, env = "CAPTURE_ALL_DNS", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub capture_all_dns: bool,
    /// Drop packets conntrack marks INVALID.
    #[arg(long, env = "INVALID_DROP", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub drop_invalid: bool,
    /// Program IPv6 whenever any IPv6 address exists.
    #[arg(long, env = "ISTIO_DUAL_STACK", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub dual_stack: bool,
    /// Remove existing meshcni/Istio capture before applying (drift repair).
    #[arg(long, env = "RECONCILE", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub reconcile: bool,
    /// Only remove the capture rules.
    #[arg(long, env = "CLEANUP_ONLY", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub cleanup_only: bool,
    /// Use the native nftables backend.
    #[arg(long, env = "NATIVE_NFTABLES", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub native_nftables: bool,
    /// Force the iptables flavor (`legacy` or `nft`).
    #[arg(long, env = "FORCE_IPTABLES_BINARY")]
    pub force_iptables_binary: Option<String>,
    /// Accepted for compatibility; the init container runs in the pod netns already.
    #[arg(long, env = "CNI_MODE", hide = true, num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub cni_mode: bool,
    /// Accepted for compatibility (the rules do not depend on it).
    #[arg(long, env = "NETWORK_NAMESPACE", hide = true)]
    pub network_namespace: Option<String>,
    /// Do not touch the rules (the `istio-validation` init container: `--run-validation
    /// --skip-rule-apply`, the CNI plugin having applied them).
    #[arg(long, env = "SKIP_RULE_APPLY", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub skip_rule_apply: bool,
    /// Check that the capture works: a connection to 127.0.0.6:<probe port> must reach the
    /// outbound/inbound capture ports; exits 126 if it does not within the probe timeout.
    #[arg(long, env = "RUN_VALIDATION", num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub run_validation: bool,
    /// Port the validation probe dials (its original destination port).
    #[arg(long, env = "IPTABLES_PROBE_PORT", default_value = "15002")]
    pub iptables_probe_port: u16,
    /// How long the validation may take (Go duration, e.g. `5s`, `500ms`).
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "5s", value_parser = parse_go_duration)]
    pub probe_timeout: std::time::Duration,
    /// Accepted for compatibility.
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub force_apply: bool,
    /// Istio's logging flags (`--log_output_level=default:info`, `--log_as_json`, …, set by the
    /// injector on every istio-init container): accepted and ignored, this mode logs to stderr.
    #[command(flatten)]
    pub istio_logging: IstioLogFlags,
}

/// The `istio.io/pkg/log` flags every Istio binary accepts. Accepted so that the injector's
/// istio-init arguments parse; their values do not change what is applied.
#[derive(Debug, Default, clap::Args)]
pub struct IstioLogFlags {
    #[arg(long = "log_output_level", hide = true)]
    pub log_output_level: Option<String>,
    #[arg(long = "log_stacktrace_level", hide = true)]
    pub log_stacktrace_level: Option<String>,
    #[arg(long = "log_target", hide = true)]
    pub log_target: Vec<String>,
    #[arg(long = "log_rotate", hide = true)]
    pub log_rotate: Option<String>,
    #[arg(long = "log_rotate_max_age", hide = true)]
    pub log_rotate_max_age: Option<String>,
    #[arg(long = "log_rotate_max_size", hide = true)]
    pub log_rotate_max_size: Option<String>,
    #[arg(long = "log_rotate_max_backups", hide = true)]
    pub log_rotate_max_backups: Option<String>,
    #[arg(long = "log_as_json", hide = true, num_args = 0..=1, require_equals = true,
        default_missing_value = "true", default_value = "false", action = ArgAction::Set,
        value_parser = FalseyValueParser::new())]
    pub log_as_json: bool,
    #[arg(long = "log_caller", hide = true)]
    pub log_caller: Option<String>,
}

/// Parses a Go `time.Duration` string (`5s`, `1m30s`, `250ms`, `1.5s`).
pub fn parse_go_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {text:?} (want e.g. 5s, 500ms, 1m30s)");
    let mut rest = text.trim();
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
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
    if !args.skip_rule_apply
        && let Err(e) = run(&args)
    {
        eprintln!("meshcni iptables: {e}");
        return 1;
    }
    if args.run_validation {
        let port = |p: &str, flag: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{flag} {p:?} is not a port number"))
        };
        let probe = port(&args.envoy_port, "--envoy-port").and_then(|envoy| {
            Ok(crate::validation::Probe {
                capture_ports: vec![
                    envoy,
                    port(&args.inbound_capture_port, "--inbound-capture-port")?,
                ],
                probe_port: args.iptables_probe_port,
                timeout: args.probe_timeout,
            })
        });
        match probe.and_then(|p| crate::validation::run(&p).map_err(|e| e.to_string())) {
            Ok(()) => eprintln!("meshcni iptables: validation passed, traffic capture is in place"),
            Err(e) => {
                eprintln!("meshcni iptables: validation failed: {e}");
                return crate::validation::VALIDATION_ERROR_CODE;
            }
        }
    }
    0
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
        let a = parse(&[
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
        ]);
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
    fn istio_validation_and_logging_flags_parse() {
        let a = parse(&[
            "--log_output_level=default:info",
            "--log_as_json",
            "--log_caller=default",
            "--log_target",
            "stderr",
            "--run-validation",
            "--skip-rule-apply",
            "--iptables-probe-port",
            "15009",
            "--probe-timeout=1m30s",
            "--redirect-dns=false",
            "--dual-stack=true",
            "-n",
        ]);
        assert!(a.run_validation && a.skip_rule_apply && a.dry_run && a.dual_stack);
        assert!(!a.redirect_dns && !a.force_apply);
        assert_eq!(a.iptables_probe_port, 15009);
        assert_eq!(a.probe_timeout, std::time::Duration::from_secs(90));
        let d = parse(&[]);
        assert!(!d.run_validation && !d.skip_rule_apply && !d.dry_run);
        assert_eq!(d.probe_timeout, std::time::Duration::from_secs(5));
        assert_eq!(d.iptables_probe_port, 15002);
    }

    #[test]
    fn go_durations_parse() {
        use std::time::Duration;
        assert_eq!(parse_go_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "5x", "-1s", "1e400s"] {
            let err = parse_go_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn unknown_flag_is_a_usage_error() {
        assert_eq!(main(["--no-such-flag".into()]), 2);
    }
}
