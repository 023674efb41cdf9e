//! Pure CNI-config logic: building our plugin entry, merging it into the primary CNI's config
//! (`insert`), taking it out again (`remove`), and the kubelet-style "is this a usable CNI config
//! file" test used to pick the primary (spec §5.3). No I/O here: every function maps bytes/values
//! to bytes/values, so the golden tests exercise exactly what the installer writes.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::gojson::{KeyOrder, marshal_indent};

/// Errors of the pure config functions. Messages name the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{what} is not valid JSON: {detail}")]
    InvalidJson { what: &'static str, detail: String },
    #[error("{what} must be a JSON object, found {found}")]
    NotAnObject {
        what: &'static str,
        found: &'static str,
    },
    #[error("existing CNI config has neither a top-level \"type\" nor a \"plugins\" list")]
    NoPlugins,
    #[error("existing CNI config \"plugins\" must be an array, found {found}")]
    PluginsNotArray { found: &'static str },
    #[error("existing CNI config plugin #{index} must be a JSON object, found {found}")]
    PluginNotObject { index: usize, found: &'static str },
    #[error("ambient enablement selector YAML is invalid: {0}")]
    InvalidSelector(String),
    /// A plugin config template sets a field the agent also sets, to a different value.
    #[error(
        "the plugin config template sets {key} to {template}, but the agent is configured with {agent} ({flag}); remove it from the template or make them agree"
    )]
    TemplateConflict {
        key: &'static str,
        template: String,
        agent: String,
        flag: &'static str,
    },
    /// A plugin config template has a field of the wrong type for the agent to merge into.
    #[error("the plugin config template's {key} must be {want}, found {found}")]
    TemplateFieldType {
        key: &'static str,
        want: &'static str,
        found: &'static str,
    },
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Render a generic JSON document the way the reference writes merged/cleaned configs:
/// Go `MarshalIndent` of a map (sorted keys) plus a trailing newline.
pub fn render_sorted(v: &Value) -> Vec<u8> {
    let mut s = marshal_indent(v, KeyOrder::Sorted);
    s.push('\n');
    s.into_bytes()
}

/// Render in insertion order (Go struct marshalling) plus a trailing newline.
pub fn render_struct_order(v: &Value) -> Vec<u8> {
    let mut s = marshal_indent(v, KeyOrder::Insertion);
    s.push('\n');
    s.into_bytes()
}

fn parse_object(what: &'static str, bytes: &[u8]) -> Result<Map<String, Value>, ConfigError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ConfigError::InvalidJson {
        what,
        detail: e.to_string(),
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ConfigError::NotAnObject {
            what,
            found: kind_of(&other),
        }),
    }
}

/// The plugin types that count as "our entry": our own type first, then the types we replace
/// (e.g. `istio-cni` when migrating an Istio node to meshcni).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedTypes {
    /// The `type` we install (`meshcni` by default).
    pub ours: String,
    /// Other types whose entries we replace and never duplicate alongside ours.
    pub replaces: Vec<String>,
}

impl OwnedTypes {
    pub fn new(ours: impl Into<String>, replaces: &[&str]) -> Self {
        let ours = ours.into();
        OwnedTypes {
            replaces: replaces
                .iter()
                .filter(|t| **t != ours)
                .map(|t| t.to_string())
                .collect(),
            ours,
        }
    }

    /// Is `t` our type or one we replace?
    pub fn matches(&self, t: &str) -> bool {
        t == self.ours || self.replaces.iter().any(|r| r == t)
    }
}

fn plugin_type(v: &Value) -> Option<&str> {
    v.as_object()?.get("type")?.as_str()
}

/// Merge our plugin entry (`new_plugin`, a JSON object) into the existing CNI config
/// (`existing`): a single-plugin `.conf` (top-level `type`) becomes
/// `{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[existing, ours]}` (both without
/// `cniVersion`); in a list every entry of an owned type is removed and ours is appended. Every
/// other field is kept. Output is Go sorted-key indented JSON plus a newline.
pub fn insert(
    new_plugin: &[u8],
    existing: &[u8],
    owned: &OwnedTypes,
) -> Result<Vec<u8>, ConfigError> {
    let mut ours = parse_object("new plugin config", new_plugin)?;
    ours.remove("cniVersion");
    let merged = insert_value(Value::Object(ours), existing, owned)?;
    Ok(render_sorted(&merged))
}

/// [`insert`] returning the merged document instead of its rendering. `ours` must be an object
/// already stripped of `cniVersion`.
pub fn insert_value(
    ours: Value,
    existing: &[u8],
    owned: &OwnedTypes,
) -> Result<Value, ConfigError> {
    let mut existing = parse_object("existing CNI config", existing)?;
    if existing.contains_key("type") {
        existing.remove("cniVersion");
        let mut list = Map::new();
        list.insert("cniVersion".into(), json!("0.3.1"));
        list.insert("name".into(), json!("k8s-pod-network"));
        list.insert(
            "plugins".into(),
            Value::Array(vec![Value::Object(existing), ours]),
        );
        return Ok(Value::Object(list));
    }
    let plugins = match existing.get_mut("plugins") {
        None => return Err(ConfigError::NoPlugins),
        Some(Value::Array(p)) => p,
        Some(other) => {
            return Err(ConfigError::PluginsNotArray {
                found: kind_of(other),
            });
        }
    };
    for (index, p) in plugins.iter().enumerate() {
        if !p.is_object() {
            return Err(ConfigError::PluginNotObject {
                index,
                found: kind_of(p),
            });
        }
    }
    plugins.retain(|p| !plugin_type(p).is_some_and(|t| owned.matches(t)));
    plugins.push(ours);
    Ok(Value::Object(existing))
}

/// Remove our entry from a CNI config list (the reference removes the first `istio-cni`
/// plugin; we remove every entry of our own type so an uninstall never leaves a duplicate).
/// Output is Go sorted-key indented JSON plus a newline.
pub fn remove(existing: &[u8], plugin_type_to_remove: &str) -> Result<Vec<u8>, ConfigError> {
    let mut doc = parse_object("installed CNI config", existing)?;
    match doc.get_mut("plugins") {
        None => return Err(ConfigError::NoPlugins),
        Some(Value::Array(plugins)) => {
            plugins.retain(|p| plugin_type(p) != Some(plugin_type_to_remove));
        }
        Some(other) => {
            return Err(ConfigError::PluginsNotArray {
                found: kind_of(other),
            });
        }
    }
    Ok(render_sorted(&Value::Object(doc)))
}

/// [`remove`] that keeps the file's own bytes: only the removed entries (with the separator
/// next to them) are cut out of the text of the `plugins` array; key order, indentation,
/// number formatting and escapes of everything else stay as they were. Falls back to the
/// [`remove`] rendering if the text cannot be edited so that it parses to exactly the same
/// document (never expected for valid JSON). A list left empty becomes `[]`.
pub fn remove_preserving(
    existing: &[u8],
    plugin_type_to_remove: &str,
) -> Result<Vec<u8>, ConfigError> {
    let fallback = remove(existing, plugin_type_to_remove)?;
    let want: Value = serde_json::from_slice(&fallback).map_err(|e| ConfigError::InvalidJson {
        what: "installed CNI config",
        detail: e.to_string(),
    })?;
    let Some((array, elements)) = spans::plugins_array(existing) else {
        return Ok(fallback);
    };
    let keep: Vec<usize> = (0..elements.len())
        .filter(|&i| {
            let (s, e) = elements[i];
            let v: Option<Value> = serde_json::from_slice(&existing[s..e]).ok();
            v.as_ref().and_then(plugin_type) != Some(plugin_type_to_remove)
        })
        .collect();
    let mut out = existing[..array.0].to_vec();
    match elements.last() {
        Some(&(_, last_end)) if !keep.is_empty() => {
            // `[` and the whitespace before the first element.
            out.extend_from_slice(&existing[array.0..elements[0].0]);
            for (n, &k) in keep.iter().enumerate() {
                out.extend_from_slice(&existing[elements[k].0..elements[k].1]);
                match keep.get(n + 1) {
                    // The separator that followed this element in the original.
                    Some(_) => out.extend_from_slice(&existing[elements[k].1..elements[k + 1].0]),
                    // The whitespace before `]`, and `]`.
                    None => out.extend_from_slice(&existing[last_end..array.1]),
                }
            }
        }
        _ => out.extend_from_slice(b"[]"),
    }
    out.extend_from_slice(&existing[array.1..]);
    match serde_json::from_slice::<Value>(&out) {
        Ok(v) if v == want => Ok(out),
        _ => Ok(fallback),
    }
}

/// Byte spans in a JSON text that serde_json has already accepted.
mod spans {
    /// `start..end` of a value in the text.
    pub(super) type Span = (usize, usize);

    fn ws(b: &[u8], mut i: usize) -> usize {
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            i += 1;
        }
        i
    }

    /// `b[i] == '"'`: the index after the closing quote.
    fn string(b: &[u8], mut i: usize) -> Option<usize> {
        i += 1;
        loop {
            match b.get(i)? {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
    }

    /// The index after the value starting at `i`.
    fn value(b: &[u8], i: usize) -> Option<usize> {
        match b.get(i)? {
            b'"' => string(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match b.get(j)? {
                        b'"' => {
                            j = string(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while b.get(j).is_some_and(|c| {
                    !matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    j += 1;
                }
                Some(j)
            }
        }
    }

    /// The span of the top-level `"plugins"` array (the last one if repeated, like the
    /// parser) and the spans of its elements.
    pub(super) fn plugins_array(b: &[u8]) -> Option<(Span, Vec<Span>)> {
        let mut i = ws(b, 0);
        if *b.get(i)? != b'{' {
            return None;
        }
        i = ws(b, i + 1);
        let mut found = None;
        if *b.get(i)? != b'}' {
            loop {
                let key_end = string(b, i)?;
                let key: String = serde_json::from_slice(&b[i..key_end]).ok()?;
                i = ws(b, key_end);
                if *b.get(i)? != b':' {
                    return None;
                }
                let vs = ws(b, i + 1);
                let ve = value(b, vs)?;
                if key == "plugins" {
                    found = Some((vs, ve));
                }
                i = ws(b, ve);
                match b.get(i)? {
                    b',' => i = ws(b, i + 1),
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        let (vs, ve) = found?;
        if b[vs] != b'[' {
            return None;
        }
        let mut els = Vec::new();
        let mut j = ws(b, vs + 1);
        if *b.get(j)? != b']' {
            loop {
                let e = value(b, j)?;
                els.push((j, e));
                j = ws(b, e);
                match b.get(j)? {
                    b',' => j = ws(b, j + 1),
                    b']' => break,
                    _ => return None,
                }
            }
        }
        Some(((vs, ve), els))
    }
}

/// Kubelet/libcni acceptance of a config file's content (spec §5.3): `.conflist` needs a
/// `name` and a non-empty `plugins` list; `.conf` (and `.json`) needs a `type`. Unparsable
/// content is rejected.
pub fn is_valid_cni_file(file_name: &str, content: &[u8]) -> bool {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(content) else {
        return false;
    };
    if file_name.ends_with(".conflist") {
        let has_name = m
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let has_plugins = m
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|p| !p.is_empty());
        has_name && has_plugins
    } else if file_name.ends_with(".conf") || file_name.ends_with(".json") {
        m.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
    } else {
        false
    }
}

/// Does the file name carry a CNI config extension the installer considers (`.conf`,
/// `.conflist`; kubelet also reads `.json`, the reference installer does not).
pub fn has_config_extension(file_name: &str) -> bool {
    file_name.ends_with(".conf") || file_name.ends_with(".conflist")
}

/// Pick the valid config files from a directory listing, sorted lexically (kubelet order).
pub fn valid_config_names<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<String> {
    let mut names: Vec<String> = files
        .into_iter()
        .filter(|(n, c)| has_config_extension(n) && is_valid_cni_file(n, c))
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    names
}

/// Does the list `doc` contain an entry with `type == plugin_type`? (`None` if `doc` is not a
/// list config.)
pub fn list_has_type(doc: &Value, plugin_type_wanted: &str) -> Option<bool> {
    let plugins = doc.get("plugins")?.as_array()?;
    Some(
        plugins
            .iter()
            .any(|p| plugin_type(p) == Some(plugin_type_wanted)),
    )
}

/// The `type`s of a config: the plugin list's types, or the single `.conf` type.
pub fn plugin_types(doc: &Value) -> Vec<String> {
    if let Some(t) = doc.get("type").and_then(Value::as_str) {
        return vec![t.to_string()];
    }
    doc.get("plugins")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(plugin_type)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Is our desired entry present exactly as desired, exactly once, with no replaced-type entry
/// beside it? Used by the keeper to decide whether a chained config needs rewriting without
/// re-rendering a file the primary formats differently.
pub fn entry_is_current(doc: &Value, desired_entry: &Value, owned: &OwnedTypes) -> bool {
    let Some(plugins) = doc.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    let ours: Vec<&Value> = plugins
        .iter()
        .filter(|p| plugin_type(p).is_some_and(|t| owned.matches(t)))
        .collect();
    ours.len() == 1 && ours[0] == desired_entry
}

// ---------------------------------------------------------------------------------------------
// Our plugin entry.

/// Label selector as Kubernetes marshals it (`metav1.LabelSelector`, omitempty fields).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// One `AMBIENT_ENABLEMENT_SELECTOR` item.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnablementSelector {
    #[serde(default)]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespace_selector: Option<LabelSelector>,
}

impl LabelSelector {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if !self.match_labels.is_empty() {
            let labels: Map<String, Value> = self
                .match_labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            m.insert("matchLabels".into(), Value::Object(labels));
        }
        if !self.match_expressions.is_empty() {
            let exprs = self
                .match_expressions
                .iter()
                .map(|r| {
                    let mut e = Map::new();
                    e.insert("key".into(), json!(r.key));
                    e.insert("operator".into(), json!(r.operator));
                    if !r.values.is_empty() {
                        e.insert("values".into(), json!(r.values));
                    }
                    Value::Object(e)
                })
                .collect();
            m.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(m)
    }
}

impl EnablementSelector {
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = &self.pod_selector {
            m.insert("podSelector".into(), p.to_value());
        }
        if let Some(n) = &self.namespace_selector {
            m.insert("namespaceSelector".into(), n.to_value());
        }
        Value::Object(m)
    }
}

/// Parse `AMBIENT_ENABLEMENT_SELECTOR` (a YAML list); empty/blank parses to an empty list.
pub fn parse_enablement_selectors(yaml: &str) -> Result<Vec<EnablementSelector>, ConfigError> {
    if yaml.trim().is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Option<Vec<EnablementSelector>> =
        serde_saphyr::from_str(yaml).map_err(|e| ConfigError::InvalidSelector(e.to_string()))?;
    Ok(parsed.unwrap_or_default())
}

/// Parse `EXCLUDE_NAMESPACES`: comma list, items trimmed, empties dropped.
pub fn parse_exclude_namespaces(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Our plugin's config entry, HEAD shape (`plugin.Config`, spec §5.3).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub plugin_log_level: String,
    pub cni_agent_run_dir: String,
    pub ambient_enabled: bool,
    pub enablement_selectors: Vec<EnablementSelector>,
    /// `None` (Go nil slice) renders as `null`.
    pub exclude_namespaces: Option<Vec<String>>,
    pub pod_namespace: String,
    pub native_nftables: bool,
    pub enable_ambient_detection_retry: bool,
    /// meshcni fields, written only when set (so Istio-shaped output stays byte-identical):
    /// see [`crate::agent_settings`].
    pub meshcni: crate::agent_settings::AgentPluginFields,
}

impl PluginConfig {
    /// The entry as a JSON object in struct field order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), json!(self.cni_version));
        m.insert("name".into(), json!(self.name));
        m.insert("type".into(), json!(self.plugin_type));
        m.insert("ipam".into(), json!({}));
        m.insert("dns".into(), json!({}));
        m.insert("plugin_log_level".into(), json!(self.plugin_log_level));
        m.insert("cni_agent_run_dir".into(), json!(self.cni_agent_run_dir));
        m.insert("ambient_enabled".into(), json!(self.ambient_enabled));
        m.insert(
            "enablement_selectors".into(),
            Value::Array(
                self.enablement_selectors
                    .iter()
                    .map(EnablementSelector::to_value)
                    .collect(),
            ),
        );
        m.insert(
            "exclude_namespaces".into(),
            match &self.exclude_namespaces {
                Some(ns) => json!(ns),
                None => Value::Null,
            },
        );
        m.insert("pod_namespace".into(), json!(self.pod_namespace));
        m.insert("native_nftables".into(), json!(self.native_nftables));
        m.insert(
            "enable_ambient_detection_retry".into(),
            json!(self.enable_ambient_detection_retry),
        );
        for (k, v) in self.meshcni.entries() {
            m.insert(k.into(), json!(v));
        }
        Value::Object(m)
    }

    /// `json.MarshalIndent(plugin.Config{..}, "", "  ")` + newline: the standalone file content
    /// and the "new plugin" input of [`insert`].
    pub fn render(&self) -> Vec<u8> {
        render_struct_order(&self.to_value())
    }
}

/// Values substituted into a G1 `CNI_NETWORK_CONFIG` template (spec §5.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateVars {
    pub log_level: String,
    pub log_uds_address: String,
    pub kubeconfig_filename: String,
    /// `cni-net-dir`/`kubecfg-file-name` (host path).
    pub kubeconfig_filepath: String,
    pub k8s_service_host: String,
    pub k8s_service_port: String,
    pub k8s_node_name: String,
}

/// G1 template substitution (plain string replacement, like `strings.ReplaceAll`).
pub fn substitute_template(template: &str, vars: &TemplateVars) -> String {
    template
        .replace("__LOG_LEVEL__", &vars.log_level)
        .replace("__LOG_UDS_ADDRESS__", &vars.log_uds_address)
        .replace("__KUBECONFIG_FILENAME__", &vars.kubeconfig_filename)
        .replace("__KUBECONFIG_FILEPATH__", &vars.kubeconfig_filepath)
        .replace("__KUBERNETES_SERVICE_HOST__", &vars.k8s_service_host)
        .replace("__KUBERNETES_SERVICE_PORT__", &vars.k8s_service_port)
        .replace("__KUBERNETES_NODE_NAME__", &vars.k8s_node_name)
}

/// Parse a rendered plugin entry (HEAD struct or substituted template) into the object that
/// goes into a list (without `cniVersion`).
pub fn entry_for_list(plugin_config: &[u8]) -> Result<Value, ConfigError> {
    let mut m = parse_object("new plugin config", plugin_config)?;
    m.remove("cniVersion");
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio() -> OwnedTypes {
        OwnedTypes::new("istio-cni", &[])
    }

    #[test]
    fn conf_becomes_list() {
        let out = insert(
            br#"{"cniVersion":"0.3.1","type":"istio-cni","name":"istio-cni"}"#,
            br#"{"cniVersion":"0.4.0","type":"bridge","name":"x"}"#,
            &istio(),
        )
        .expect("merge");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "k8s-pod-network");
        assert_eq!(v["plugins"][0], json!({"type":"bridge","name":"x"}));
        assert_eq!(
            v["plugins"][1],
            json!({"type":"istio-cni","name":"istio-cni"})
        );
    }

    #[test]
    fn migration_replaces_other_type_and_never_duplicates() {
        let owned = OwnedTypes::new("meshcni", &["istio-cni"]);
        let existing = br#"{"name":"n","plugins":[{"type":"meshcni"},{"type":"bridge"},{"type":"istio-cni","x":1},{"type":"meshcni"}]}"#;
        let out = insert(br#"{"type":"meshcni","v":2}"#, existing, &owned).expect("merge");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            v["plugins"],
            json!([{"type":"bridge"},{"type":"meshcni","v":2}])
        );
        assert!(entry_is_current(
            &v,
            &json!({"type":"meshcni","v":2}),
            &owned
        ));
        assert!(!entry_is_current(
            &v,
            &json!({"type":"meshcni","v":3}),
            &owned
        ));
    }

    #[test]
    fn remove_preserving_cuts_only_our_entries() {
        let cases: [(&str, &str); 6] = [
            (
                "{\"name\":\"n\",\n\t\"plugins\" : [ {\"type\":\"a\", \"x\": 1.50},\n\t{\"type\":\"meshcni\"} ] }",
                "{\"name\":\"n\",\n\t\"plugins\" : [ {\"type\":\"a\", \"x\": 1.50} ] }",
            ),
            (
                "{\"plugins\":[{\"type\":\"meshcni\",\"s\":\"]}\\\"\"},\r\n  {\"type\":\"a\"}],\"name\":\"<n>\"}\n",
                "{\"plugins\":[{\"type\":\"a\"}],\"name\":\"<n>\"}\n",
            ),
            (
                "{\"plugins\":[{\"type\":\"a\"}, {\"type\":\"meshcni\"}, {\"type\":\"b\"},{\"type\":\"meshcni\"}]}",
                "{\"plugins\":[{\"type\":\"a\"}, {\"type\":\"b\"}]}",
            ),
            (
                "{\"plugins\":[ {\"type\":\"meshcni\"} ],\"name\":\"n\"}",
                "{\"plugins\":[],\"name\":\"n\"}",
            ),
            (
                "{\"plugins\":[],\"name\":\"n\"}",
                "{\"plugins\":[],\"name\":\"n\"}",
            ),
            (
                "{\"plugins\":[{\"type\":\"a\",\"p\":[{\"type\":\"meshcni\"}]}]}",
                "{\"plugins\":[{\"type\":\"a\",\"p\":[{\"type\":\"meshcni\"}]}]}",
            ),
        ];
        for (input, want) in cases {
            let got = remove_preserving(input.as_bytes(), "meshcni").expect(input);
            assert_eq!(String::from_utf8_lossy(&got), want, "input {input}");
        }
        // The reference's own output: the same bytes as its re-rendering.
        let doc = json!({"name":"n","plugins":[{"type":"a","h":"<&>"},{"type":"meshcni"}]});
        let rendered = render_sorted(&doc);
        assert_eq!(
            remove_preserving(&rendered, "meshcni").expect("remove"),
            remove(&rendered, "meshcni").expect("remove")
        );
        assert!(remove_preserving(b"{", "meshcni").is_err());
    }

    #[test]
    fn insert_errors_name_the_problem() {
        let o = istio();
        assert!(matches!(
            insert(b"[]", br#"{"name":"n","plugins":[]}"#, &o),
            Err(ConfigError::NotAnObject {
                found: "an array",
                ..
            })
        ));
        assert_eq!(insert(b"{}", b"{}", &o), Err(ConfigError::NoPlugins));
        assert!(matches!(
            insert(b"{}", br#"{"plugins":{}}"#, &o),
            Err(ConfigError::PluginsNotArray { found: "an object" })
        ));
        assert!(matches!(
            insert(b"{}", br#"{"plugins":[[]]}"#, &o),
            Err(ConfigError::PluginNotObject { index: 0, .. })
        ));
        assert!(matches!(
            insert(b"{}", b"{", &o),
            Err(ConfigError::InvalidJson { .. })
        ));
    }

    #[test]
    fn validity_kubelet_style() {
        assert!(is_valid_cni_file("a.conf", br#"{"type":"bridge"}"#));
        assert!(!is_valid_cni_file("a.conf", br#"{"name":"bridge"}"#));
        assert!(!is_valid_cni_file(
            "a.conflist",
            br#"{"plugins":[{"type":"x"}]}"#
        ));
        assert!(!is_valid_cni_file(
            "a.conflist",
            br#"{"name":"n","pugins":[{"type":"x"}]}"#
        ));
        assert!(!is_valid_cni_file(
            "a.conflist",
            br#"{"name":"n","plugins":[]}"#
        ));
        assert!(is_valid_cni_file(
            "a.conflist",
            br#"{"name":"n","plugins":[{"type":"x"}]}"#
        ));
        assert!(!is_valid_cni_file("a.conf", b"\"not json\""));
        assert!(!is_valid_cni_file("a.txt", br#"{"type":"bridge"}"#));
    }

    #[test]
    fn selectors_and_namespaces() {
        assert_eq!(parse_enablement_selectors("").expect("empty"), vec![]);
        let sel = parse_enablement_selectors(
            "- podSelector:\n    matchLabels: {istio.io/dataplane-mode: ambient}\n- namespaceSelector:\n    matchExpressions:\n    - {key: a, operator: Exists}\n",
        )
        .expect("yaml");
        let v = Value::Array(sel.iter().map(EnablementSelector::to_value).collect());
        assert_eq!(
            v,
            json!([
                {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}
            ])
        );
        assert!(parse_enablement_selectors("{").is_err());
        assert_eq!(parse_exclude_namespaces(" a, ,b ,"), vec!["a", "b"]);
        assert!(parse_exclude_namespaces(" , ").is_empty());
    }

    #[test]
    fn template_substitution() {
        let t = r#"{"type":"istio-cni","log_level":"__LOG_LEVEL__","kubernetes":{"kubeconfig":"__KUBECONFIG_FILEPATH__","h":"__KUBERNETES_SERVICE_HOST__:__KUBERNETES_SERVICE_PORT__","n":"__KUBERNETES_NODE_NAME__","f":"__KUBECONFIG_FILENAME__","u":"__LOG_UDS_ADDRESS__"}}"#;
        let vars = TemplateVars {
            log_level: "debug".into(),
            log_uds_address: "/var/run/istio-cni/log.sock".into(),
            kubeconfig_filename: "ZZZ-istio-cni-kubeconfig".into(),
            kubeconfig_filepath: "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig".into(),
            k8s_service_host: "10.0.0.1".into(),
            k8s_service_port: "443".into(),
            k8s_node_name: "node-a".into(),
        };
        let out = substitute_template(t, &vars);
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["log_level"], "debug");
        assert_eq!(
            v["kubernetes"]["kubeconfig"],
            "/etc/cni/net.d/ZZZ-istio-cni-kubeconfig"
        );
        assert_eq!(v["kubernetes"]["h"], "10.0.0.1:443");
        assert_eq!(v["kubernetes"]["n"], "node-a");
        assert_eq!(v["kubernetes"]["f"], "ZZZ-istio-cni-kubeconfig");
        assert_eq!(v["kubernetes"]["u"], "/var/run/istio-cni/log.sock");
    }
}
