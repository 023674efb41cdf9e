//! Sidecar capture (Istio's `istio-iptables`, spec §2, HEAD generation).
//!
//! [`CaptureConfig`] holds the generator's inputs in Istio's string syntax; [`CaptureConfig::validate`]
//! parses and checks them; [`build`] turns them into a [`RuleSet`]: the ordered rule list of
//! spec §2.3 (one model, rendered by [`crate::iptables`] and [`crate::nft`]) plus the routing
//! and address side effects the apply layer must perform. Nothing here touches the system.

use std::net::IpAddr;

use ipnet::IpNet;
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

use crate::model::{
    Chain, Cidr, CtState, Family, Match, NftMarkWording, NftSpelling, OwnerKind, Proto, Rule,
    Scope, Table, Target,
};

/// Source address of inbound passthrough traffic (Envoy's original-src for inbound), IPv4.
pub const INBOUND_PASSTHROUGH_V4: &str = "127.0.0.6/32";
/// Source address of inbound passthrough traffic, IPv6; also added to `lo` when IPv6 is on.
pub const INBOUND_PASSTHROUGH_V6: &str = "::6/128";
/// IPv6 loopback range (the IPv4 one is configurable: [`CaptureConfig::host_ipv4_loopback_cidr`]).
pub const IPV6_LOOPBACK: &str = "::1/128";
/// Mark put on proxy-to-app traffic over `lo` in TPROXY mode.
pub const OUTBOUND_TO_APP_MARK: u32 = 1338;
/// Port of the istio-agent DNS proxy.
pub const DNS_AGENT_PORT: u16 = 15053;
/// DNS.
pub const DNS_PORT: u16 = 53;
/// Conntrack zone for proxy <-> upstream resolver traffic.
pub const DNS_ZONE_UPSTREAM: u16 = 1;
/// Conntrack zone for app <-> proxy DNS traffic.
pub const DNS_ZONE_APP: u16 = 2;
/// Mask of `--tproxy-mark`.
pub const TPROXY_MARK_MASK: u32 = 0xffff_ffff;
/// Istio caps the number of owner groups (each one is an `-m owner` match).
pub const MAX_OWNER_GROUPS: usize = 64;

/// Why a [`CaptureConfig`] was rejected. Every message names the field and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("port `{value}` {reason} in {field}")]
    BadPort {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("bad CIDR `{value}` in {field}: {reason}")]
    BadCidr {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("bad DNS server `{value}` in {field}: expected an {expected} address")]
    BadDnsServer {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "unknown interception mode `{0}` in inbound_interception_mode (expected REDIRECT or TPROXY)"
    )]
    UnknownInterceptionMode(String),
    #[error("wildcard `*` not allowed in {field}")]
    WildcardNotAllowed { field: &'static str },
    #[error("bad interface name `{value}` in {field}: {reason}")]
    BadInterface {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("bad {what} `{value}` in {field}: {reason}")]
    BadOwner {
        field: &'static str,
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{field} is empty: at least one {what} is required")]
    Empty {
        field: &'static str,
        what: &'static str,
    },
    #[error("too many owner groups in {field}: {count} (at most {max})")]
    TooManyOwnerGroups {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("bad mark `{value}` in {field}: {reason}")]
    BadMark {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("bad route table `{value}` in {field}: {reason}")]
    BadRouteTable {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Routing that TPROXY interception needs so that marked packets are delivered locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    /// `ip rule add fwmark <mark> lookup <table>`
    pub mark: u32,
    /// `ip route add local default dev lo table <table>`
    pub table: u32,
    /// Also install the IPv6 rule and route (`ip -6 ...`).
    pub ipv6: bool,
}

impl TproxyRouting {
    /// Families the rule and route are installed for (v4 always, v6 when IPv6 is on).
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// `ip` arguments (program name excluded) adding the policy rule for `family`.
    /// "File exists" is expected on re-apply and is not an error (spec §2.3 step 20).
    pub fn ip_rule_add_args(&self, family: Family) -> Vec<String> {
        self.ip_args(family, ["rule", "add", "fwmark"], |s| {
            vec![s.mark.to_string(), "lookup".into(), s.table.to_string()]
        })
    }

    /// `ip` arguments removing the policy rule for `family`.
    pub fn ip_rule_del_args(&self, family: Family) -> Vec<String> {
        self.ip_args(family, ["rule", "del", "fwmark"], |s| {
            vec![s.mark.to_string(), "lookup".into(), s.table.to_string()]
        })
    }

    /// `ip` arguments adding `local default dev lo table <table>` for `family`.
    pub fn ip_route_add_args(&self, family: Family) -> Vec<String> {
        self.ip_args(family, ["route", "add", "local"], |s| {
            vec![
                "default".into(),
                "dev".into(),
                "lo".into(),
                "table".into(),
                s.table.to_string(),
            ]
        })
    }

    /// `ip` arguments removing the local default route for `family`.
    pub fn ip_route_del_args(&self, family: Family) -> Vec<String> {
        self.ip_args(family, ["route", "del", "local"], |s| {
            vec![
                "default".into(),
                "dev".into(),
                "lo".into(),
                "table".into(),
                s.table.to_string(),
            ]
        })
    }

    fn ip_args(
        &self,
        family: Family,
        head: [&str; 3],
        tail: impl Fn(&Self) -> Vec<String>,
    ) -> Vec<String> {
        let fam = match family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        let mut v = vec![fam.to_string()];
        v.extend(head.iter().map(|s| (*s).to_string()));
        v.extend(tail(self));
        v
    }
}

/// The generator's output: ordered rules plus the non-rule state the apply layer must create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// Rules in emission order (spec §2.3). Per-family lists are the rules whose scope
    /// includes the family; the v6 list only exists when [`RuleSet::ipv6`] is set.
    pub rules: Vec<Rule>,
    /// IPv6 capture is on (an `ip6tables` rule list exists; nft renders IPv6 variants).
    pub ipv6: bool,
    /// Policy routing for TPROXY inbound capture (only when inbound capture is on and uses
    /// TPROXY).
    pub tproxy_routing: Option<TproxyRouting>,
    /// Address to add to `lo` (`::6/128`, the IPv6 inbound passthrough source) when IPv6 is on.
    pub lo_ipv6_address: Option<IpNet>,
}

impl RuleSet {
    /// Whether `family` has a rule list (v4 always; v6 only with IPv6 on).
    pub fn has_family(&self, family: Family) -> bool {
        match family {
            Family::V4 => true,
            Family::V6 => self.ipv6,
        }
    }

    /// The rules of one family's list, in order.
    pub fn rules_for(&self, family: Family) -> impl Iterator<Item = &Rule> + '_ {
        let on = self.has_family(family);
        self.rules
            .iter()
            .filter(move |r| on && r.scope.includes(family))
    }
}

/// Inbound capture selection (`inbound_ports_include`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum InboundPorts {
    /// `""`: no inbound capture.
    None,
    /// `*`: everything except the listed ports.
    AllExcept(Vec<u16>),
    /// Only these ports.
    Only(Vec<u16>),
}

/// Outbound include/exclude ranges of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges {
    wildcard: bool,
    cidrs: Vec<Cidr>,
}

/// Owner-group interception filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnerGroups {
    AllExcept(Vec<String>),
    Only(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Dns {
    capture_all: bool,
    servers_v4: Vec<Cidr>,
    servers_v6: Vec<Cidr>,
}

/// A validated, typed view of [`CaptureConfig`].
#[derive(Debug, Clone)]
struct Plan {
    proxy_port: u16,
    inbound_capture_port: u16,
    tunnel_port: u16,
    uids: Vec<String>,
    gids: Vec<String>,
    tproxy: bool,
    tproxy_mark: u32,
    tproxy_table: u32,
    inbound: InboundPorts,
    outbound_ports_include: Vec<u16>,
    outbound_ports_exclude: Vec<u16>,
    include_v4: Ranges,
    include_v6: Ranges,
    exclude_v4: Vec<Cidr>,
    exclude_v6: Vec<Cidr>,
    include_has_loopback: bool,
    virt_ifaces: Vec<String>,
    exclude_ifaces: Vec<String>,
    owner_groups: OwnerGroups,
    lo_v4: Cidr,
    lo_v6: Cidr,
    passthrough_v4: Cidr,
    passthrough_v6: Cidr,
    dns: Option<Dns>,
    drop_invalid: bool,
    ipv6: bool,
}

/// Istio's list split: comma-separated, empty items dropped (so `6000,7000,` is fine);
/// surrounding whitespace is trimmed.
fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(field: &'static str, s: &str) -> Result<u16, ConfigError> {
    let bad = |reason| ConfigError::BadPort {
        field,
        value: s.to_owned(),
        reason,
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("is not a number"));
    }
    match s.parse::<u64>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(bad("out of range (1-65535)")),
    }
}

fn parse_port_list(field: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    split(s)
        .map(|p| {
            if p == "*" {
                Err(ConfigError::WildcardNotAllowed { field })
            } else {
                parse_port(field, p)
            }
        })
        .collect()
}

fn parse_u32(s: &str) -> Option<u32> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn parse_mark(field: &'static str, s: &str) -> Result<u32, ConfigError> {
    match parse_u32(s) {
        Some(0) => Err(ConfigError::BadMark {
            field,
            value: s.to_owned(),
            reason: "must be non-zero",
        }),
        Some(m) => Ok(m),
        None => Err(ConfigError::BadMark {
            field,
            value: s.to_owned(),
            reason: "expected a 32-bit number (decimal or 0x-hex)",
        }),
    }
}

fn parse_route_table(field: &'static str, s: &str) -> Result<u32, ConfigError> {
    let bad = |reason| ConfigError::BadRouteTable {
        field,
        value: s.to_owned(),
        reason,
    };
    match parse_u32(s) {
        Some(0) => Err(bad("table 0 is reserved (unspecified)")),
        // Taking over `default`/`main`/`local` would break the pod's own routing.
        Some(253..=255) => Err(bad("tables 253-255 are the kernel's default/main/local")),
        Some(t) => Ok(t),
        None => Err(bad("expected a 32-bit number")),
    }
}

fn parse_ids(field: &'static str, what: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    let ids: Vec<String> = split(s)
        .map(|id| {
            if id.bytes().all(|b| b.is_ascii_digit()) && id.parse::<u32>().is_ok() {
                Ok(id.to_owned())
            } else {
                Err(ConfigError::BadOwner {
                    field,
                    what,
                    value: id.to_owned(),
                    reason: "expected a numeric id (0-4294967295)",
                })
            }
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(ConfigError::Empty { field, what });
    }
    Ok(ids)
}

fn parse_groups(field: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    let groups: Vec<String> = split(s)
        .map(|g| {
            let bad = |reason| ConfigError::BadOwner {
                field,
                what: "group",
                value: g.to_owned(),
                reason,
            };
            if g == "*" {
                return Err(ConfigError::WildcardNotAllowed { field });
            }
            let ok_chars = g
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok_chars || g.starts_with('-') {
                return Err(bad(
                    "expected a numeric gid or a group name ([A-Za-z0-9_.-], not starting with '-')",
                ));
            }
            if g.len() > 32 {
                return Err(bad("group names are at most 32 characters"));
            }
            Ok(g.to_owned())
        })
        .collect::<Result<_, _>>()?;
    if groups.len() > MAX_OWNER_GROUPS {
        return Err(ConfigError::TooManyOwnerGroups {
            field,
            count: groups.len(),
            max: MAX_OWNER_GROUPS,
        });
    }
    Ok(groups)
}

fn parse_ifaces(field: &'static str, s: &str) -> Result<Vec<String>, ConfigError> {
    split(s)
        .map(|i| {
            let bad = |reason| ConfigError::BadInterface {
                field,
                value: i.to_owned(),
                reason,
            };
            if i.len() > 15 {
                return Err(bad("longer than 15 bytes (IFNAMSIZ)"));
            }
            if i == "." || i == ".." {
                return Err(bad("`.` and `..` are not interface names"));
            }
            if i.starts_with('!') || i.starts_with('-') {
                return Err(bad("must not start with `!` or `-`"));
            }
            let ok = i
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'"' | b'\'' | b'*'));
            if !ok {
                return Err(bad(
                    "contains whitespace, a non-ASCII byte or one of / : \" ' *",
                ));
            }
            // `+` is iptables' prefix wildcard; only meaningful as the last character.
            if i[..i.len() - 1].contains('+') {
                return Err(bad("`+` (wildcard) is only allowed as the last character"));
            }
            Ok(i.to_owned())
        })
        .collect()
}

fn parse_cidr(field: &'static str, s: &str) -> Result<IpNet, ConfigError> {
    s.parse::<IpNet>().map_err(|e| ConfigError::BadCidr {
        field,
        value: s.to_owned(),
        reason: e.to_string(),
    })
}

/// Split a CIDR list into v4/v6 ranges; `*` = wildcard for both families.
fn parse_ranges(
    field: &'static str,
    s: &str,
    allow_wildcard: bool,
) -> Result<(Ranges, Ranges, bool), ConfigError> {
    if s.trim() == "*" {
        if !allow_wildcard {
            return Err(ConfigError::WildcardNotAllowed { field });
        }
        let all = Ranges {
            wildcard: true,
            cidrs: Vec::new(),
        };
        return Ok((all.clone(), all, false));
    }
    let mut v4 = Ranges::default();
    let mut v6 = Ranges::default();
    let mut has_loopback = false;
    for item in split(s) {
        if item == "*" {
            return Err(if allow_wildcard {
                ConfigError::BadCidr {
                    field,
                    value: item.to_owned(),
                    reason: "`*` must be the whole value, not a list item".into(),
                }
            } else {
                ConfigError::WildcardNotAllowed { field }
            });
        }
        let net = parse_cidr(field, item)?;
        has_loopback |= net.addr().is_loopback();
        match net {
            IpNet::V4(_) => v4.cidrs.push(Cidr::new(net)),
            IpNet::V6(_) => v6.cidrs.push(Cidr::new(net)),
        }
    }
    Ok((v4, v6, has_loopback))
}

fn parse_dns_servers(
    field: &'static str,
    servers: &[String],
    family: Family,
) -> Result<Vec<Cidr>, ConfigError> {
    servers
        .iter()
        .map(|s| {
            let text = s.trim();
            let expected = match family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            let bad = || ConfigError::BadDnsServer {
                field,
                value: s.clone(),
                expected,
            };
            let addr: IpAddr = text.parse().map_err(|_| bad())?;
            match (family, addr) {
                (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)) => {
                    Ok(Cidr::host_verbatim(addr, text))
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

fn parse_loopback(s: &str) -> Result<Cidr, ConfigError> {
    const FIELD: &str = "host_ipv4_loopback_cidr";
    let net = parse_cidr(FIELD, s.trim())?;
    let bad = |reason: &str| ConfigError::BadCidr {
        field: FIELD,
        value: s.to_owned(),
        reason: reason.to_owned(),
    };
    match net {
        IpNet::V4(v4) => {
            if !v4.addr().is_loopback() {
                return Err(bad("must be inside 127.0.0.0/8"));
            }
            if v4.prefix_len() < 8 {
                return Err(bad("prefix length must be between 8 and 32"));
            }
            Ok(Cidr::new(net))
        }
        IpNet::V6(_) => Err(bad("must be an IPv4 CIDR")),
    }
}

fn fixed_cidr(s: &str) -> Cidr {
    // Only called with the module's constant CIDR strings.
    Cidr::new(s.parse().expect("constant CIDR literal is valid"))
}

impl CaptureConfig {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan, ConfigError> {
        let proxy_port = parse_port("proxy_port", self.proxy_port.trim())?;
        let inbound_capture_port =
            parse_port("inbound_capture_port", self.inbound_capture_port.trim())?;
        let tunnel_port = parse_port("inbound_tunnel_port", self.inbound_tunnel_port.trim())?;

        let uids = parse_ids("proxy_uid", "uid", &self.proxy_uid)?;
        // Istio: an empty gid list copies the uid list.
        let gids = if self.proxy_gid.trim().is_empty() {
            uids.clone()
        } else {
            parse_ids("proxy_gid", "gid", &self.proxy_gid)?
        };

        let tproxy = match self.inbound_interception_mode.trim() {
            "" | "REDIRECT" => false,
            "TPROXY" => true,
            other => return Err(ConfigError::UnknownInterceptionMode(other.to_owned())),
        };
        let tproxy_mark = parse_mark("inbound_tproxy_mark", self.inbound_tproxy_mark.trim())?;
        let tproxy_table = parse_route_table(
            "inbound_tproxy_route_table",
            self.inbound_tproxy_route_table.trim(),
        )?;

        let inbound_exclude =
            parse_port_list("inbound_ports_exclude", &self.inbound_ports_exclude)?;
        let inbound = match self.inbound_ports_include.trim() {
            "" => InboundPorts::None,
            "*" => InboundPorts::AllExcept(inbound_exclude),
            list => {
                let ports = parse_port_list("inbound_ports_include", list)?;
                if ports.is_empty() {
                    InboundPorts::None
                } else {
                    InboundPorts::Only(ports)
                }
            }
        };
        let outbound_ports_include =
            parse_port_list("outbound_ports_include", &self.outbound_ports_include)?;
        let outbound_ports_exclude =
            parse_port_list("outbound_ports_exclude", &self.outbound_ports_exclude)?;

        let (include_v4, include_v6, include_has_loopback) = parse_ranges(
            "outbound_ip_ranges_include",
            &self.outbound_ip_ranges_include,
            true,
        )?;
        let (exclude_v4, exclude_v6, _) = parse_ranges(
            "outbound_ip_ranges_exclude",
            &self.outbound_ip_ranges_exclude,
            false,
        )?;

        let virt_ifaces = parse_ifaces(
            "reroute_virtual_interfaces",
            &self.reroute_virtual_interfaces,
        )?;
        let exclude_ifaces = parse_ifaces("exclude_interfaces", &self.exclude_interfaces)?;

        let owner_groups = if self.owner_groups_include.trim() == "*" {
            OwnerGroups::AllExcept(parse_groups(
                "owner_groups_exclude",
                &self.owner_groups_exclude,
            )?)
        } else {
            // Istio ignores the exclude list unless the include list is `*`; still validate it.
            parse_groups("owner_groups_exclude", &self.owner_groups_exclude)?;
            OwnerGroups::Only(parse_groups(
                "owner_groups_include",
                &self.owner_groups_include,
            )?)
        };

        let lo_v4 = parse_loopback(&self.host_ipv4_loopback_cidr)?;

        let servers_v4 = parse_dns_servers("dns_servers_v4", &self.dns_servers_v4, Family::V4)?;
        let servers_v6 = parse_dns_servers("dns_servers_v6", &self.dns_servers_v6, Family::V6)?;
        // HEAD: DNS redirection without capture-all and without any server is switched off.
        let dns = (self.redirect_dns
            && (self.capture_all_dns || !servers_v4.is_empty() || !servers_v6.is_empty()))
        .then_some(Dns {
            capture_all: self.capture_all_dns,
            servers_v4,
            servers_v6,
        });

        Ok(Plan {
            proxy_port,
            inbound_capture_port,
            tunnel_port,
            uids,
            gids,
            tproxy,
            tproxy_mark,
            tproxy_table,
            inbound,
            outbound_ports_include,
            outbound_ports_exclude,
            include_v4,
            include_v6,
            exclude_v4: exclude_v4.cidrs,
            exclude_v6: exclude_v6.cidrs,
            include_has_loopback,
            virt_ifaces,
            exclude_ifaces,
            owner_groups,
            lo_v4,
            lo_v6: fixed_cidr(IPV6_LOOPBACK),
            passthrough_v4: fixed_cidr(INBOUND_PASSTHROUGH_V4),
            passthrough_v6: fixed_cidr(INBOUND_PASSTHROUGH_V6),
            dns,
            drop_invalid: self.drop_invalid,
            ipv6: self.enable_ipv6,
        })
    }
}

/// Collects rules, dropping IPv6-only rules when IPv6 is off (the v6 list does not exist).
struct Emitter {
    ipv6: bool,
    rules: Vec<Rule>,
}

impl Emitter {
    fn push(&mut self, rule: Rule) {
        if rule.scope == Scope::V6 && !self.ipv6 {
            return;
        }
        self.rules.push(rule);
    }

    /// Emit `make(family, loopback-cidr)` for v4 and then (if IPv6) v6: Istio's "versioned" rule.
    fn versioned(&mut self, plan: &Plan, make: impl Fn(Family, &Plan) -> Rule) {
        for fam in [Family::V4, Family::V6] {
            let r = make(fam, plan);
            self.push(Rule {
                scope: fam.into(),
                ..r
            });
        }
    }
}

impl Plan {
    fn lo(&self, fam: Family) -> &Cidr {
        match fam {
            Family::V4 => &self.lo_v4,
            Family::V6 => &self.lo_v6,
        }
    }

    fn passthrough(&self, fam: Family) -> &Cidr {
        match fam {
            Family::V4 => &self.passthrough_v4,
            Family::V6 => &self.passthrough_v6,
        }
    }
}

/// nft spelling of rules whose protocol is folded into the port (`tcp dport 53`).
const FOLDED: NftSpelling = NftSpelling {
    fold_protocol: true,
    ports_before_addresses: false,
    meta_owner: false,
    tcp_only: false,
    mark_before_ports: false,
    mark: NftMarkWording::And,
    no_counter: false,
};

/// nft spelling of the DNS conntrack-zone rules (`udp dport 53 meta skuid 1337`,
/// `udp dport 53 ip daddr ...`).
const DNS_ZONE: NftSpelling = NftSpelling {
    fold_protocol: true,
    ports_before_addresses: true,
    meta_owner: true,
    tcp_only: false,
    mark_before_ports: false,
    mark: NftMarkWording::And,
    no_counter: false,
};

/// Validate `cfg` and generate its rules (spec §2.3, HEAD order).
pub fn build(cfg: &CaptureConfig) -> Result<RuleSet, ConfigError> {
    let p = cfg.plan()?;
    let mut e = Emitter {
        ipv6: p.ipv6,
        rules: Vec::with_capacity(64),
    };
    use Chain::*;
    use Table::*;

    // 1. Excluded interfaces bypass capture entirely: in nat, and with TPROXY also in mangle
    //    (all nat rules first, as Istio emits them).
    let exclude_tables: &[Table] = if p.tproxy { &[Nat, Mangle] } else { &[Nat] };
    for &table in exclude_tables {
        for iface in &p.exclude_ifaces {
            e.push(
                Rule::append(table, Prerouting)
                    .in_iface(iface)
                    .to(Target::Return),
            );
            e.push(
                Rule::append(table, Output)
                    .out_iface(iface)
                    .to(Target::Return),
            );
        }
    }

    // 2. Virtual interfaces (KubeVirt): HEAD returns early from nat PREROUTING.
    for iface in &p.virt_ifaces {
        e.push(
            Rule::insert(Nat, Prerouting, 1)
                .in_iface(iface)
                .to(Target::Return),
        );
    }

    // 3. Drop conntrack-invalid packets.
    if p.drop_invalid {
        e.push(
            Rule::append(Mangle, Prerouting)
                .ctstate(&[CtState::Invalid])
                .nft(NftSpelling {
                    tcp_only: true,
                    ..NftSpelling::default()
                })
                .jump(IstioDrop),
        );
        e.push(Rule::append(Mangle, IstioDrop).to(Target::Drop));
    }

    // 4-6. The tunnel port is never captured; the two redirect chains.
    e.push(
        Rule::append(Nat, IstioInbound)
            .proto(Proto::Tcp)
            .dport(p.tunnel_port)
            .to(Target::Return),
    );
    e.push(
        Rule::append(Nat, IstioRedirect)
            .proto(Proto::Tcp)
            .to(Target::Redirect {
                port: p.proxy_port,
                singular: false,
            }),
    );
    e.push(
        Rule::append(Nat, IstioInRedirect)
            .proto(Proto::Tcp)
            .to(Target::Redirect {
                port: p.inbound_capture_port,
                singular: false,
            }),
    );

    // 7. Inbound capture.
    if p.inbound != InboundPorts::None {
        let table = if p.tproxy { Mangle } else { Nat };
        if p.tproxy {
            e.push(Rule::append(Mangle, IstioDivert).to(Target::SetMark(p.tproxy_mark)));
            e.push(Rule::append(Mangle, IstioDivert).to(Target::Accept));
            e.versioned(&p, |fam, p| {
                Rule::append(Mangle, IstioTproxy)
                    .not_dst(p.lo(fam))
                    .proto(Proto::Tcp)
                    .to(Target::Tproxy {
                        port: p.inbound_capture_port,
                        mark: p.tproxy_mark,
                        mask: TPROXY_MARK_MASK,
                    })
            });
        }
        e.push(
            Rule::append(table, Prerouting)
                .proto(Proto::Tcp)
                .jump(IstioInbound),
        );
        let established = [CtState::Related, CtState::Established];
        match &p.inbound {
            InboundPorts::None => {}
            InboundPorts::AllExcept(excluded) => {
                for &port in excluded {
                    e.push(
                        Rule::append(table, IstioInbound)
                            .proto(Proto::Tcp)
                            .dport(port)
                            .to(Target::Return),
                    );
                }
                if p.tproxy {
                    e.push(
                        Rule::append(Mangle, IstioInbound)
                            .proto(Proto::Tcp)
                            .ctstate(&established)
                            .jump(IstioDivert),
                    );
                    e.push(
                        Rule::append(Mangle, IstioInbound)
                            .proto(Proto::Tcp)
                            .jump(IstioTproxy),
                    );
                } else {
                    e.push(
                        Rule::append(Nat, IstioInbound)
                            .proto(Proto::Tcp)
                            .jump(IstioInRedirect),
                    );
                }
            }
            InboundPorts::Only(ports) => {
                for &port in ports {
                    if p.tproxy {
                        e.push(
                            Rule::append(Mangle, IstioInbound)
                                .proto(Proto::Tcp)
                                .dport(port)
                                .ctstate(&established)
                                .jump(IstioDivert),
                        );
                        e.push(
                            Rule::append(Mangle, IstioInbound)
                                .proto(Proto::Tcp)
                                .dport(port)
                                .jump(IstioTproxy),
                        );
                    } else {
                        e.push(
                            Rule::append(Nat, IstioInbound)
                                .proto(Proto::Tcp)
                                .dport(port)
                                .jump(IstioInRedirect),
                        );
                    }
                }
            }
        }
    }

    // 8. All outbound traffic goes through ISTIO_OUTPUT.
    e.push(Rule::append(Nat, Output).jump(IstioOutput));

    // 9. Excluded outbound ports (TCP and, in HEAD, UDP).
    for &port in &p.outbound_ports_exclude {
        for proto in [Proto::Tcp, Proto::Udp] {
            e.push(
                Rule::append(Nat, IstioOutput)
                    .proto(proto)
                    .dport(port)
                    .nft(FOLDED)
                    .to(Target::Return),
            );
        }
    }

    // 10. Inbound passthrough traffic (Envoy -> app with original source) is not captured.
    e.versioned(&p, |fam, p| {
        Rule::append(Nat, IstioOutput)
            .out_iface("lo")
            .src(p.passthrough(fam))
            .to(Target::Return)
    });

    // 11-12. Proxy uid/gid: app calling itself via a service VIP goes back inbound; other
    // proxy traffic is never captured.
    let dns_on = p.dns.is_some();
    for (kind, ids) in [(OwnerKind::Uid, &p.uids), (OwnerKind::Gid, &p.gids)] {
        for id in ids {
            e.versioned(&p, |fam, p| {
                let r = Rule::append(Nat, IstioOutput)
                    .out_iface("lo")
                    .not_dst(p.lo(fam))
                    .proto(Proto::Tcp);
                let r = if dns_on && kind == OwnerKind::Uid {
                    r.m(Match::DestPorts {
                        ports: vec![DNS_PORT, p.tunnel_port],
                        negate: true,
                    })
                } else {
                    r.not_dport(p.tunnel_port)
                };
                r.owner(kind, id, false).jump(IstioInRedirect)
            });
            if !p.include_has_loopback {
                let r = Rule::append(Nat, IstioOutput).out_iface("lo");
                let r = if dns_on {
                    r.proto(Proto::Tcp).not_dport(DNS_PORT)
                } else {
                    r
                };
                e.push(r.owner(kind, id, true).to(Target::Return));
            }
            e.push(
                Rule::append(Nat, IstioOutput)
                    .owner(kind, id, false)
                    .to(Target::Return),
            );
        }
    }

    // 13. Owner-group filter.
    match &p.owner_groups {
        OwnerGroups::AllExcept(excluded) => {
            for g in excluded {
                e.push(
                    Rule::append(Nat, IstioOutput)
                        .owner(OwnerKind::Gid, g, false)
                        .to(Target::Return),
                );
            }
        }
        OwnerGroups::Only(included) => {
            let mut r = Rule::append(Nat, IstioOutput);
            for g in included {
                r = r.owner(OwnerKind::Gid, g, true);
            }
            e.push(r.to(Target::Return));
        }
    }

    // 14. DNS redirection to the agent's DNS proxy (HEAD `SetupDNSRedir`).
    if let Some(dns) = &p.dns {
        emit_dns(&mut e, &p, dns);
    }

    // 15. Traffic to loopback is never captured.
    e.versioned(&p, |fam, p| {
        Rule::append(Nat, IstioOutput)
            .dst(p.lo(fam))
            .to(Target::Return)
    });

    // 16. Excluded outbound ranges.
    for (fam, cidrs) in [(Family::V4, &p.exclude_v4), (Family::V6, &p.exclude_v6)] {
        for c in cidrs {
            e.push(
                Rule::append(Nat, IstioOutput)
                    .scope(fam.into())
                    .dst(c)
                    .to(Target::Return),
            );
        }
    }

    // 17. Included outbound ports.
    for &port in &p.outbound_ports_include {
        e.push(
            Rule::append(Nat, IstioOutput)
                .proto(Proto::Tcp)
                .dport(port)
                .nft(FOLDED)
                .jump(IstioRedirect),
        );
    }

    // 18. Included outbound ranges, v4 then v6. A wildcard is the same for both families, so
    // it is emitted once for both lists (nft then renders it once).
    if p.include_v4.wildcard {
        e.push(Rule::append(Nat, IstioOutput).jump(IstioRedirect));
        for iface in &p.virt_ifaces {
            e.push(
                Rule::insert(Nat, Prerouting, 1)
                    .in_iface(iface)
                    .jump(IstioRedirect),
            );
        }
    } else {
        for (fam, ranges) in [(Family::V4, &p.include_v4), (Family::V6, &p.include_v6)] {
            for c in &ranges.cidrs {
                for iface in &p.virt_ifaces {
                    e.push(
                        Rule::insert(Nat, Prerouting, 1)
                            .scope(fam.into())
                            .in_iface(iface)
                            .dst(c)
                            .jump(IstioRedirect),
                    );
                }
                e.push(
                    Rule::append(Nat, IstioOutput)
                        .scope(fam.into())
                        .dst(c)
                        .jump(IstioRedirect),
                );
            }
        }
    }

    // 19. TPROXY: keep the original-src mark across the connection and let proxy->app
    // traffic over lo skip the TPROXY path.
    if p.tproxy {
        let m = p.tproxy_mark;
        e.push(
            Rule::append(Mangle, Prerouting)
                .proto(Proto::Tcp)
                .mark(m, false)
                .to(Target::SaveMark),
        );
        e.push(
            Rule::append(Mangle, Output)
                .proto(Proto::Tcp)
                .out_iface("lo")
                .mark(m, false)
                .to(Target::Return),
        );
        for (kind, ids) in [(OwnerKind::Uid, &p.uids), (OwnerKind::Gid, &p.gids)] {
            for id in ids {
                e.versioned(&p, |fam, p| {
                    Rule::append(Mangle, Output)
                        .not_dst(p.lo(fam))
                        .proto(Proto::Tcp)
                        .out_iface("lo")
                        .owner(kind, id, false)
                        .to(Target::SetMark(OUTBOUND_TO_APP_MARK))
                });
            }
        }
        e.push(
            Rule::append(Mangle, Output)
                .proto(Proto::Tcp)
                .m(Match::ConnMark { mark: m })
                .to(Target::RestoreMark),
        );
        e.push(
            Rule::insert(Mangle, IstioInbound, 1)
                .proto(Proto::Tcp)
                .mark(m, false)
                .to(Target::Return),
        );
        e.versioned(&p, |fam, p| {
            Rule::insert(Mangle, IstioInbound, 2)
                .proto(Proto::Tcp)
                .src(p.passthrough(fam))
                .in_iface("lo")
                .to(Target::Return)
        });
        e.push(
            Rule::insert(Mangle, IstioInbound, 3)
                .proto(Proto::Tcp)
                .in_iface("lo")
                .mark(OUTBOUND_TO_APP_MARK, true)
                .to(Target::Return),
        );
    }

    // 20. Non-rule state.
    let tproxy_routing = (p.tproxy && p.inbound != InboundPorts::None).then_some(TproxyRouting {
        mark: p.tproxy_mark,
        table: p.tproxy_table,
        ipv6: p.ipv6,
    });
    Ok(RuleSet {
        rules: e.rules,
        ipv6: p.ipv6,
        tproxy_routing,
        lo_ipv6_address: p.ipv6.then(|| p.passthrough_v6.net()),
    })
}

/// Step 14 (HEAD `SetupDNSRedir`).
fn emit_dns(e: &mut Emitter, p: &Plan, dns: &Dns) {
    use Chain::*;
    use Table::*;
    let v4 = dns.capture_all || !dns.servers_v4.is_empty();
    let v6 = p.ipv6 && (dns.capture_all || !dns.servers_v6.is_empty());
    let agent = |proto: Proto| Target::Redirect {
        port: DNS_AGENT_PORT,
        // Istio's UDP rule says `--to-port`; same meaning, kept for byte-identical output.
        singular: proto == Proto::Udp,
    };
    let servers = [(Family::V4, &dns.servers_v4), (Family::V6, &dns.servers_v6)];

    e.push(Rule::append(Raw, Output).jump(IstioOutputDns));
    if let Some(scope) = Scope::of(v4, v6) {
        e.push(
            Rule::append(Nat, IstioOutput)
                .scope(scope)
                .jump(IstioOutputDns),
        );
    }
    for proto in [Proto::Tcp, Proto::Udp] {
        if dns.capture_all {
            e.push(
                Rule::append(Nat, IstioOutputDns)
                    .proto(proto)
                    .dport(DNS_PORT)
                    .nft(FOLDED)
                    .to(agent(proto)),
            );
        } else {
            for (fam, list) in servers {
                for s in list {
                    e.push(
                        Rule::append(Nat, IstioOutputDns)
                            .scope(fam.into())
                            .proto(proto)
                            .dport(DNS_PORT)
                            .dst(s)
                            .nft(FOLDED)
                            .to(agent(proto)),
                    );
                }
            }
        }
    }

    // Conntrack zones keep the app<->proxy and proxy<->resolver legs of a DNS exchange apart
    // (they share the 5-tuple after the REDIRECT).
    for (kind, ids) in [(OwnerKind::Uid, &p.uids), (OwnerKind::Gid, &p.gids)] {
        for id in ids {
            e.push(
                Rule::append(Raw, IstioOutputDns)
                    .proto(Proto::Udp)
                    .dport(DNS_PORT)
                    .owner(kind, id, false)
                    .nft(DNS_ZONE)
                    .to(Target::CtZone(DNS_ZONE_UPSTREAM)),
            );
            e.push(
                Rule::append(Raw, IstioOutputDns)
                    .proto(Proto::Udp)
                    .sport(DNS_AGENT_PORT)
                    .owner(kind, id, false)
                    .nft(DNS_ZONE)
                    .to(Target::CtZone(DNS_ZONE_APP)),
            );
        }
    }
    if dns.capture_all {
        e.push(Rule::append(Raw, Prerouting).jump(IstioInbound));
        e.push(
            Rule::append(Raw, IstioOutputDns)
                .proto(Proto::Udp)
                .dport(DNS_PORT)
                .nft(DNS_ZONE)
                .to(Target::CtZone(DNS_ZONE_APP)),
        );
        e.push(
            Rule::append(Raw, IstioInbound)
                .proto(Proto::Udp)
                .sport(DNS_PORT)
                .nft(DNS_ZONE)
                .to(Target::CtZone(DNS_ZONE_UPSTREAM)),
        );
    } else {
        let has4 = !dns.servers_v4.is_empty();
        let has6 = p.ipv6 && !dns.servers_v6.is_empty();
        if let Some(scope) = Scope::of(has4, has6) {
            e.push(
                Rule::append(Raw, Prerouting)
                    .scope(scope)
                    .jump(IstioInbound),
            );
        }
        for (fam, list) in servers {
            for s in list {
                e.push(
                    Rule::append(Raw, IstioOutputDns)
                        .scope(fam.into())
                        .proto(Proto::Udp)
                        .dport(DNS_PORT)
                        .dst(s)
                        .nft(DNS_ZONE)
                        .to(Target::CtZone(DNS_ZONE_APP)),
                );
                e.push(
                    Rule::append(Raw, IstioInbound)
                        .scope(fam.into())
                        .proto(Proto::Udp)
                        .sport(DNS_PORT)
                        .src(s)
                        .nft(DNS_ZONE)
                        .to(Target::CtZone(DNS_ZONE_UPSTREAM)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
