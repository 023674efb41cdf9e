//! Sidecar capture configuration (the inputs of Istio's `istio-iptables`).

use serde::{Deserialize, Serialize};

/// Every knob of Istio's `istio-iptables` capture generator (HEAD config, §2 of the spec).
///
/// List-valued fields keep Istio's string syntax (comma-separated, `*` wildcard) because that is
/// the syntax of the flags, environment variables and pod annotations they come from; they are
/// parsed and validated by [`CaptureConfig::validate`] / the generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaptureConfig {
    pub proxy_port: String,
    pub inbound_capture_port: String,
    pub inbound_tunnel_port: String,
    /// Comma-separated UIDs exempt from capture (the proxy's).
    pub proxy_uid: String,
    /// Comma-separated GIDs exempt from capture; empty copies `proxy_uid`.
    pub proxy_gid: String,
    /// `REDIRECT` (or empty) or `TPROXY`.
    pub inbound_interception_mode: String,
    pub inbound_tproxy_mark: String,
    pub inbound_tproxy_route_table: String,
    pub inbound_ports_include: String,
    pub inbound_ports_exclude: String,
    pub outbound_ports_include: String,
    pub outbound_ports_exclude: String,
    pub outbound_ip_ranges_include: String,
    pub outbound_ip_ranges_exclude: String,
    pub reroute_virtual_interfaces: String,
    pub exclude_interfaces: String,
    pub owner_groups_include: String,
    pub owner_groups_exclude: String,
    pub host_ipv4_loopback_cidr: String,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub dns_servers_v4: Vec<String>,
    pub dns_servers_v6: Vec<String>,
    pub drop_invalid: bool,
    pub enable_ipv6: bool,
    pub dual_stack: bool,
}

impl Default for CaptureConfig {
    /// Istio's built-in defaults (the golden tests' base configuration).
    fn default() -> Self {
        CaptureConfig {
            proxy_port: "15001".into(),
            inbound_capture_port: "15006".into(),
            inbound_tunnel_port: "15008".into(),
            proxy_uid: "1337".into(),
            proxy_gid: "1337".into(),
            inbound_interception_mode: String::new(),
            inbound_tproxy_mark: "1337".into(),
            inbound_tproxy_route_table: "133".into(),
            inbound_ports_include: String::new(),
            inbound_ports_exclude: String::new(),
            outbound_ports_include: String::new(),
            outbound_ports_exclude: String::new(),
            outbound_ip_ranges_include: String::new(),
            outbound_ip_ranges_exclude: String::new(),
            reroute_virtual_interfaces: String::new(),
            exclude_interfaces: String::new(),
            owner_groups_include: "*".into(),
            owner_groups_exclude: String::new(),
            host_ipv4_loopback_cidr: "127.0.0.1/32".into(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers_v4: Vec::new(),
            dns_servers_v6: Vec::new(),
            drop_invalid: false,
            enable_ipv6: false,
            dual_stack: false,
        }
    }
}
