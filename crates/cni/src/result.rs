//! The ADD result model and version conversion.
//!
//! [`CniResult`] is one canonical, typed shape that every supported version parses into and
//! renders from: 0.1.0/0.2.0 (`ip4`/`ip6`), 0.3.0–0.4.0 (`interfaces`/`ips` with
//! `ips[].version`/`routes`/`dns`) and 1.0.0/1.1.0 (no `ips[].version`; 1.1.0 adds interface
//! `mtu`/`socketPath`/`pciID` and route `mtu`/`advmss`/`priority`/`table`/`scope`).
//!
//! Conversion policy (this is a chained plugin's pass-through, so nothing may be lost that the
//! target version can express):
//! * keys unknown to a version are kept at every level (result, interface, ip, route, dns) —
//!   CNI parsers ignore unknown keys, and libcni itself keeps the 1.1 route fields in older
//!   versions;
//! * `ips[].version` is emitted (computed from the address) for 0.3.0–0.4.0 and dropped for 1.x;
//! * 0.1.0/0.2.0 can express only one address per family, no interfaces, and routes nested under
//!   the address of their family: converting down keeps the first IPv4 and first IPv6 address and
//!   the routes of a family that has an address (libcni's rule). Unlike libcni we do not refuse a
//!   result without addresses; it renders as `{"cniVersion":..,"dns":{}}`.
//! * Output key order and the always-present `dns` object follow libcni's JSON.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{CniError, CniVersion};

/// A CNI ADD result, version-independent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
    /// Top-level keys this library does not model, kept verbatim.
    pub extra: Map<String, Value>,
}

/// An entry of `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    /// 1.1.0.
    pub mtu: Option<i64>,
    /// Netns path for interfaces inside the container; absent for host-side interfaces.
    pub sandbox: Option<String>,
    /// 1.1.0.
    pub socket_path: Option<String>,
    /// 1.1.0.
    pub pci_id: Option<String>,
    pub extra: Map<String, Value>,
}

/// An entry of `ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Index into `interfaces`, if the address belongs to a known interface.
    pub interface: Option<usize>,
    /// Address with prefix length (host bits kept, e.g. `10.88.0.2/16`).
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    pub extra: Map<String, Value>,
}

/// An entry of `routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    /// 1.1.0.
    pub mtu: Option<i64>,
    /// 1.1.0.
    pub advmss: Option<i64>,
    /// 1.1.0.
    pub priority: Option<i64>,
    /// 1.1.0.
    pub table: Option<i64>,
    /// 1.1.0.
    pub scope: Option<i64>,
    pub extra: Map<String, Value>,
}

/// The `dns` object (results and network configs share it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
    pub extra: Map<String, Value>,
}

impl IpConfig {
    /// `"4"` or `"6"`, the 0.3.x/0.4.0 `version` field.
    pub fn family(&self) -> &'static str {
        match self.address {
            IpNet::V4(_) => "4",
            IpNet::V6(_) => "6",
        }
    }
}

// ---- wire shapes (decoding only) ---------------------------------------------------------------

#[derive(Deserialize)]
struct WireResult {
    #[serde(default)]
    interfaces: Option<Vec<WireInterface>>,
    #[serde(default)]
    ips: Option<Vec<WireIp>>,
    #[serde(default)]
    routes: Option<Vec<WireRoute>>,
    #[serde(default)]
    dns: Option<WireDns>,
    #[serde(default)]
    ip4: Option<WireLegacyIp>,
    #[serde(default)]
    ip6: Option<WireLegacyIp>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireInterface {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    mtu: Option<i64>,
    #[serde(default)]
    sandbox: Option<String>,
    #[serde(default, rename = "socketPath")]
    socket_path: Option<String>,
    #[serde(default, rename = "pciID")]
    pci_id: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireIp {
    #[serde(default)]
    interface: Option<usize>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireLegacyIp {
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Option<Vec<WireRoute>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct WireRoute {
    #[serde(default)]
    dst: Option<String>,
    #[serde(default)]
    gw: Option<String>,
    #[serde(default)]
    mtu: Option<i64>,
    #[serde(default)]
    advmss: Option<i64>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    table: Option<i64>,
    #[serde(default)]
    scope: Option<i64>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
pub(crate) struct WireDns {
    #[serde(default)]
    nameservers: Option<Vec<String>>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    search: Option<Vec<String>>,
    #[serde(default)]
    options: Option<Vec<String>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl From<WireDns> for Dns {
    fn from(w: WireDns) -> Dns {
        Dns {
            nameservers: w.nameservers.unwrap_or_default(),
            domain: w.domain,
            search: w.search.unwrap_or_default(),
            options: w.options.unwrap_or_default(),
            extra: w.extra,
        }
    }
}

impl Dns {
    /// Decodes a `dns` object; `what` names it in errors (e.g. `"network config dns"`).
    pub fn from_value(v: &Value, what: &str) -> Result<Dns, CniError> {
        WireDns::deserialize(v)
            .map(Dns::from)
            .map_err(|e| CniError::decode(format!("failed to decode {what}: {e}"), v.to_string()))
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
            && self.extra.is_empty()
    }

    /// The JSON object (empty fields omitted, as libcni does).
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        if !self.nameservers.is_empty() {
            m.insert("nameservers".into(), strings(&self.nameservers));
        }
        if let Some(d) = &self.domain {
            m.insert("domain".into(), Value::String(d.clone()));
        }
        if !self.search.is_empty() {
            m.insert("search".into(), strings(&self.search));
        }
        if !self.options.is_empty() {
            m.insert("options".into(), strings(&self.options));
        }
        append_extra(&mut m, &self.extra);
        Value::Object(m)
    }
}

fn parse_net(s: Option<String>, path: &str) -> Result<IpNet, CniError> {
    let s = s.ok_or_else(|| {
        CniError::decode(format!("failed to decode result: {path} is missing"), "")
    })?;
    s.parse::<IpNet>().map_err(|e| {
        CniError::decode(
            format!("failed to decode result: {path} {s:?} is not an address/prefix"),
            e.to_string(),
        )
    })
}

fn parse_addr(s: Option<String>, path: &str) -> Result<Option<IpAddr>, CniError> {
    match s {
        None => Ok(None),
        // libcni decodes "" as no gateway
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse::<IpAddr>().map(Some).map_err(|e| {
            CniError::decode(
                format!("failed to decode result: {path} {s:?} is not an IP address"),
                e.to_string(),
            )
        }),
    }
}

fn route_from_wire(w: WireRoute, path: &str) -> Result<Route, CniError> {
    Ok(Route {
        dst: parse_net(w.dst, &format!("{path}.dst"))?,
        gw: parse_addr(w.gw, &format!("{path}.gw"))?,
        mtu: w.mtu,
        advmss: w.advmss,
        priority: w.priority,
        table: w.table,
        scope: w.scope,
        extra: w.extra,
    })
}

fn append_extra(m: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        if !m.contains_key(k) {
            m.insert(k.clone(), v.clone());
        }
    }
}

impl CniResult {
    /// An empty result (what a chained plugin returns when there is no `prevResult`).
    pub fn empty() -> CniResult {
        CniResult::default()
    }

    /// Parses a result of any supported version. The version is the result's own `cniVersion`
    /// when present (it must be supported: code 1 otherwise), else `default_version` (libcni
    /// assumes a `prevResult` is in the config's version). Returns the result and the version it
    /// was read as. Malformed content is code 6 naming the field.
    pub fn from_value(
        v: &Value,
        default_version: CniVersion,
    ) -> Result<(CniResult, CniVersion), CniError> {
        let version = match v.get("cniVersion") {
            None | Some(Value::Null) => default_version,
            Some(Value::String(s)) => CniVersion::from_str_exact(s).ok_or_else(|| {
                CniError::incompatible_version(
                    "incompatible CNI version in result",
                    format!(
                        "result is {s:?}, plugin supports {}",
                        crate::version::supported_list()
                    ),
                )
            })?,
            Some(other) => {
                return Err(CniError::decode(
                    "failed to decode result: cniVersion is not a string",
                    other.to_string(),
                ));
            }
        };
        if !v.is_object() {
            return Err(CniError::decode(
                "failed to decode result: not a JSON object",
                truncate(&v.to_string()),
            ));
        }
        let wire = WireResult::deserialize(v)
            .map_err(|e| CniError::decode(format!("failed to decode result: {e}"), ""))?;
        let mut extra = wire.extra;
        extra.remove("cniVersion");

        let mut result = CniResult {
            dns: wire.dns.map(Dns::from).unwrap_or_default(),
            ..CniResult::default()
        };
        if version.is_legacy_result() {
            // Modern keys in a legacy result are unknown keys: keep them, untouched.
            for key in ["interfaces", "ips", "routes"] {
                if let Some(raw) = v.get(key).filter(|raw| !raw.is_null()) {
                    extra.insert(key.to_owned(), raw.clone());
                }
            }
            for (name, legacy) in [("ip4", wire.ip4), ("ip6", wire.ip6)] {
                let Some(l) = legacy else { continue };
                result.ips.push(IpConfig {
                    interface: None,
                    address: parse_net(l.ip, &format!("{name}.ip"))?,
                    gateway: parse_addr(l.gateway, &format!("{name}.gateway"))?,
                    extra: l.extra,
                });
                for (i, r) in l.routes.unwrap_or_default().into_iter().enumerate() {
                    result
                        .routes
                        .push(route_from_wire(r, &format!("{name}.routes[{i}]"))?);
                }
            }
        } else {
            // Legacy keys in a modern result are unknown keys: keep them, untouched.
            for key in ["ip4", "ip6"] {
                if let Some(raw) = v.get(key).filter(|raw| !raw.is_null()) {
                    extra.insert(key.to_owned(), raw.clone());
                }
            }
            for w in wire.interfaces.unwrap_or_default() {
                result.interfaces.push(Interface {
                    name: w.name.unwrap_or_default(),
                    mac: w.mac,
                    mtu: w.mtu,
                    sandbox: w.sandbox,
                    socket_path: w.socket_path,
                    pci_id: w.pci_id,
                    extra: w.extra,
                });
            }
            for (i, w) in wire.ips.unwrap_or_default().into_iter().enumerate() {
                let mut ip_extra = w.extra;
                // 0.3.x/0.4.0 `version` is derived from the address; never carried as data.
                ip_extra.remove("version");
                result.ips.push(IpConfig {
                    interface: w.interface,
                    address: parse_net(w.address, &format!("ips[{i}].address"))?,
                    gateway: parse_addr(w.gateway, &format!("ips[{i}].gateway"))?,
                    extra: ip_extra,
                });
            }
            for (i, r) in wire.routes.unwrap_or_default().into_iter().enumerate() {
                result
                    .routes
                    .push(route_from_wire(r, &format!("routes[{i}]"))?);
            }
        }
        result.extra = extra;
        Ok((result, version))
    }

    /// Renders the result in `version`'s shape, with `cniVersion` = `version`.
    pub fn to_value(&self, version: CniVersion) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::from(version.as_str()));
        if version.is_legacy_result() {
            for (key, want_v4) in [("ip4", true), ("ip6", false)] {
                let Some(ip) = self
                    .ips
                    .iter()
                    .find(|ip| matches!(ip.address, IpNet::V4(_)) == want_v4)
                else {
                    continue;
                };
                let mut o = Map::new();
                o.insert("ip".into(), Value::String(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    o.insert("gateway".into(), Value::String(gw.to_string()));
                }
                let routes: Vec<Value> = self
                    .routes
                    .iter()
                    .filter(|r| matches!(r.dst, IpNet::V4(_)) == want_v4)
                    .map(route_to_value)
                    .collect();
                if !routes.is_empty() {
                    o.insert("routes".into(), Value::Array(routes));
                }
                append_extra(&mut o, &ip.extra);
                m.insert(key.into(), Value::Object(o));
            }
        } else {
            if !self.interfaces.is_empty() {
                m.insert(
                    "interfaces".into(),
                    Value::Array(self.interfaces.iter().map(interface_to_value).collect()),
                );
            }
            if !self.ips.is_empty() {
                let with_version = version.has_ip_version_field();
                m.insert(
                    "ips".into(),
                    Value::Array(
                        self.ips
                            .iter()
                            .map(|ip| ip_to_value(ip, with_version))
                            .collect(),
                    ),
                );
            }
            if !self.routes.is_empty() {
                m.insert(
                    "routes".into(),
                    Value::Array(self.routes.iter().map(route_to_value).collect()),
                );
            }
        }
        m.insert("dns".into(), self.dns.to_value());
        append_extra(&mut m, &self.extra);
        Value::Object(m)
    }

    /// Addresses assigned to the container interface `ifname`: those whose `interface` index is
    /// absent or names an interface called `ifname` (the rule chained plugins use to find the
    /// container's IPs in a `prevResult`).
    pub fn ips_on_interface<'a>(&'a self, ifname: &'a str) -> impl Iterator<Item = &'a IpConfig> {
        self.ips.iter().filter(move |ip| match ip.interface {
            None => true,
            Some(i) => self.interfaces.get(i).is_some_and(|itf| itf.name == ifname),
        })
    }
}

fn interface_to_value(i: &Interface) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), Value::String(i.name.clone()));
    if let Some(mac) = &i.mac {
        o.insert("mac".into(), Value::String(mac.clone()));
    }
    if let Some(mtu) = i.mtu {
        o.insert("mtu".into(), Value::from(mtu));
    }
    if let Some(s) = &i.sandbox {
        o.insert("sandbox".into(), Value::String(s.clone()));
    }
    if let Some(s) = &i.socket_path {
        o.insert("socketPath".into(), Value::String(s.clone()));
    }
    if let Some(s) = &i.pci_id {
        o.insert("pciID".into(), Value::String(s.clone()));
    }
    append_extra(&mut o, &i.extra);
    Value::Object(o)
}

fn ip_to_value(ip: &IpConfig, with_version: bool) -> Value {
    let mut o = Map::new();
    if with_version {
        o.insert("version".into(), Value::from(ip.family()));
    }
    if let Some(idx) = ip.interface {
        o.insert("interface".into(), Value::from(idx));
    }
    o.insert("address".into(), Value::String(ip.address.to_string()));
    if let Some(gw) = ip.gateway {
        o.insert("gateway".into(), Value::String(gw.to_string()));
    }
    append_extra(&mut o, &ip.extra);
    Value::Object(o)
}

fn route_to_value(r: &Route) -> Value {
    let mut o = Map::new();
    o.insert("dst".into(), Value::String(r.dst.to_string()));
    if let Some(gw) = r.gw {
        o.insert("gw".into(), Value::String(gw.to_string()));
    }
    for (k, v) in [
        ("mtu", r.mtu),
        ("advmss", r.advmss),
        ("priority", r.priority),
        ("table", r.table),
        ("scope", r.scope),
    ] {
        if let Some(v) = v {
            o.insert(k.into(), Value::from(v));
        }
    }
    append_extra(&mut o, &r.extra);
    Value::Object(o)
}

fn truncate(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Converts a result (typically a `prevResult`) of any supported version to `to_version`.
///
/// The input's version is its own `cniVersion`, or `to_version` if it has none. Errors: code 1
/// if either version is unsupported, code 6 if the result is malformed.
pub fn convert_result(prev: &Value, to_version: &str) -> Result<Value, CniError> {
    let to = CniVersion::parse(to_version)?;
    let (result, _) = CniResult::from_value(prev, to)?;
    Ok(result.to_value(to))
}

/// An empty result in `version` (`{"cniVersion":..,"dns":{}}`); code 1 if unsupported.
pub fn empty_result(version: &str) -> Result<Value, CniError> {
    Ok(CniResult::empty().to_value(CniVersion::parse(version)?))
}

#[cfg(test)]
mod tests;
