//! The network configuration a plugin reads on stdin (`NetConf`): the spec's well-known keys
//! typed or kept as JSON, plus the whole raw object so a plugin can decode its own keys.
//! Also the runtime-config conventions a plugin may need (`portMappings`) and GC's
//! `cni.dev/valid-attachments`.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::result::{CniResult, Dns};
use crate::{CniError, CniVersion};

/// A parsed network configuration (one plugin's entry of a conflist, as the runtime passes it).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    /// `type`: the plugin binary name (empty if the runtime did not pass it).
    pub plugin_type: String,
    /// `capabilities` as written in the conflist (`{"portMappings": true, ...}`).
    pub capabilities: Option<Map<String, Value>>,
    /// `runtimeConfig`, kept as JSON (its keys follow CNI conventions, not the spec).
    pub runtime_config: Option<Value>,
    /// `prevResult`, kept as JSON in whatever version the previous plugin produced.
    pub prev_result: Option<Value>,
    pub ipam: Option<Value>,
    pub dns: Option<Dns>,
    /// The whole configuration object.
    pub raw: Map<String, Value>,
}

/// An entry of GC's `cni.dev/valid-attachments`: an attachment that must be kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The key of GC's list of attachments that are still valid (spec 1.1.0).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

/// One `runtimeConfig.portMappings` entry (CNI convention for the `portMappings` capability).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// Lower-cased; `tcp` when absent or empty.
    pub protocol: String,
    /// `hostIP`, when set and non-empty.
    pub host_ip: Option<String>,
}

impl NetConf {
    /// Parses stdin bytes.
    ///
    /// Errors: malformed JSON or a well-known key of the wrong JSON type → code 6 (serde's message
    /// with line/column); missing `cniVersion` or an invalid/missing `name` → code 7; a
    /// `cniVersion` we do not support → code 1 naming it and the supported list.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::decode(
                format!("failed to decode network config: {e}"),
                "stdin is not valid JSON",
            )
        })?;
        let Value::Object(raw) = value else {
            return Err(CniError::decode(
                "failed to decode network config: not a JSON object",
                "",
            ));
        };
        let version = match raw.get("cniVersion") {
            None | Some(Value::Null) => {
                return Err(CniError::invalid_config(
                    "invalid network config: missing cniVersion",
                    "",
                ));
            }
            Some(Value::String(s)) if s.is_empty() => {
                return Err(CniError::invalid_config(
                    "invalid network config: empty cniVersion",
                    "",
                ));
            }
            Some(Value::String(s)) => CniVersion::parse(s)?,
            Some(other) => return Err(wrong_type("cniVersion", "a string", other)),
        };
        let name = match raw.get("name") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type("name", "a string", other)),
        };
        validate_network_name(&name)?;
        let plugin_type = match raw.get("type") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(wrong_type("type", "a string", other)),
        };
        let capabilities = match raw.get("capabilities") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(other) => return Err(wrong_type("capabilities", "an object", other)),
        };
        let dns = match raw.get("dns") {
            None | Some(Value::Null) => None,
            Some(v) => Some(Dns::from_value(v, "network config dns")?),
        };
        let present = |k: &str| raw.get(k).filter(|v| !v.is_null()).cloned();
        Ok(NetConf {
            cni_version: version,
            name,
            plugin_type,
            capabilities,
            runtime_config: present("runtimeConfig"),
            prev_result: present("prevResult"),
            ipam: present("ipam"),
            dns,
            raw,
        })
    }

    /// Decodes the plugin's own configuration type from the whole object (code 6 with serde's
    /// message on mismatch).
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        T::deserialize(Value::Object(self.raw.clone())).map_err(|e| {
            CniError::decode(
                format!(
                    "failed to decode plugin config of network {:?}: {e}",
                    self.name
                ),
                "",
            )
        })
    }

    /// Whether the conflist enabled capability `name`.
    pub fn capability(&self, name: &str) -> bool {
        self.capabilities
            .as_ref()
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// A `runtimeConfig` key, matched exactly first, then ASCII-case-insensitively (runtimes
    /// differ in case, and Go plugins decode keys case-insensitively).
    pub fn runtime_config_field(&self, key: &str) -> Option<&Value> {
        self.runtime_config
            .as_ref()
            .and_then(|rc| get_fold(rc, key))
    }

    /// `runtimeConfig.portMappings`, normalised (see [`normalize_port_mappings`]); empty if absent.
    pub fn port_mappings(&self) -> Result<Vec<PortMapping>, CniError> {
        match self.runtime_config_field("portMappings") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => normalize_port_mappings(v),
        }
    }

    /// The `prevResult`, typed (read in its own `cniVersion`, else the config's).
    pub fn prev_result_typed(&self) -> Result<Option<CniResult>, CniError> {
        match &self.prev_result {
            None => Ok(None),
            Some(v) => CniResult::from_value(v, self.cni_version).map(|(r, _)| Some(r)),
        }
    }

    /// GC's `cni.dev/valid-attachments` (`None` if absent; code 6 if malformed).
    pub fn valid_attachments(&self) -> Result<Option<Vec<Attachment>>, CniError> {
        match self.raw.get(VALID_ATTACHMENTS_KEY) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Vec::<Attachment>::deserialize(v).map(Some).map_err(|e| {
                CniError::decode(format!("failed to decode {VALID_ATTACHMENTS_KEY}: {e}"), "")
            }),
        }
    }
}

fn wrong_type(key: &str, expected: &str, got: &Value) -> CniError {
    CniError::decode(
        format!("failed to decode network config: {key} must be {expected}"),
        format!("{key}={got}"),
    )
}

/// The spec's network-name rule: non-empty, `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (code 7 otherwise).
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::invalid_config(
            "invalid network config: missing network name",
            "",
        ));
    }
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_config(
            "invalid characters found in network name",
            name.to_owned(),
        ))
    }
}

/// Object key lookup: exact match, else the first ASCII-case-insensitive match.
fn get_fold<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    let m = v.as_object()?;
    m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// Normalises a `portMappings` array. Keys are matched case-insensitively (`hostPort`,
/// `HostPort`, `hostport`; `hostIP`/`HostIP`/`hostIp`), ports must be integers in 0..=65535,
/// `protocol` is lower-cased and defaults to `tcp`. Errors are code 7 naming the entry.
pub fn normalize_port_mappings(v: &Value) -> Result<Vec<PortMapping>, CniError> {
    let Value::Array(entries) = v else {
        return Err(CniError::invalid_config(
            "invalid runtimeConfig.portMappings: not an array",
            v.to_string(),
        ));
    };
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let bad = |what: String| {
            CniError::invalid_config(
                format!("invalid runtimeConfig.portMappings[{i}]: {what}"),
                e.to_string(),
            )
        };
        if !e.is_object() {
            return Err(bad("not an object".into()));
        }
        let port = |key: &str| -> Result<u16, CniError> {
            match get_fold(e, key) {
                None | Some(Value::Null) => Err(bad(format!("{key} is missing"))),
                Some(p) => p
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or_else(|| bad(format!("{key} {p} is not a port number (0-65535)"))),
            }
        };
        let text = |key: &str| -> Result<Option<String>, CniError> {
            match get_fold(e, key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!("{key} {other} is not a string"))),
            }
        };
        out.push(PortMapping {
            host_port: port("hostPort")?,
            container_port: port("containerPort")?,
            protocol: text("protocol")?
                .map(|p| p.to_ascii_lowercase())
                .unwrap_or_else(|| "tcp".to_owned()),
            host_ip: text("hostIP")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
