//! The agent's settings that must reach the plugin whatever shape its config entry has.
//!
//! The built-in (HEAD-shaped) plugin config carries them as fields. A user-supplied template
//! (`CNI_NETWORK_CONFIG` / `CNI_NETWORK_CONFIG_FILE`, the G1 mechanism) would otherwise replace
//! them silently, so after substitution [`merge_into_template`] merges them in:
//!
//! * the agent's `EXCLUDE_NAMESPACES` are added to the template's top-level
//!   `exclude_namespaces` (the plugin honours the union of that list and
//!   `kubernetes.exclude_namespaces`), so a template can add exclusions but never drop one;
//! * meshcni's own fields ([`AgentPluginFields`]: `pod_metadata_dir`,
//!   `pod_metadata_default_namespace`, `ambient_detection_failure_policy`) are inserted; a
//!   template that sets one of them to a different value is rejected with an error naming the
//!   field, both values and the agent flag.
//!
//! A template that already agrees is returned byte for byte.

use serde_json::{Map, Value};

use crate::config::InstallConfig;
use crate::conflist::{ConfigError, kind_of, parse_exclude_namespaces};

/// meshcni-specific plugin config fields the agent writes (each only when set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPluginFields {
    /// `--pod-metadata-dir` / `POD_METADATA_DIR`.
    pub pod_metadata_dir: Option<String>,
    /// `--pod-metadata-default-namespace` / `POD_METADATA_DEFAULT_NAMESPACE`.
    pub pod_metadata_default_namespace: Option<String>,
    /// `--ambient-detection-failure-policy` / `AMBIENT_DETECTION_FAILURE_POLICY`.
    pub ambient_detection_failure_policy: Option<String>,
}

impl AgentPluginFields {
    /// `(plugin field, value, agent flag)` of every field that is set, in output order.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        self.entries_with_flag()
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect()
    }

    fn entries_with_flag(&self) -> Vec<(&'static str, &str, &'static str)> {
        [
            (
                "pod_metadata_dir",
                &self.pod_metadata_dir,
                "--pod-metadata-dir / POD_METADATA_DIR",
            ),
            (
                "pod_metadata_default_namespace",
                &self.pod_metadata_default_namespace,
                "--pod-metadata-default-namespace / POD_METADATA_DEFAULT_NAMESPACE",
            ),
            (
                "ambient_detection_failure_policy",
                &self.ambient_detection_failure_policy,
                "--ambient-detection-failure-policy / AMBIENT_DETECTION_FAILURE_POLICY",
            ),
        ]
        .into_iter()
        .filter_map(|(k, v, flag)| v.as_deref().map(|v| (k, v, flag)))
        .collect()
    }
}

/// Merge the agent's exclusions and meshcni fields into a rendered template (see the module
/// docs). Returns `rendered` unchanged when nothing had to be added.
pub fn merge_into_template(rendered: Vec<u8>, cfg: &InstallConfig) -> Result<Vec<u8>, ConfigError> {
    let parsed: Value =
        serde_json::from_slice(&rendered).map_err(|e| ConfigError::InvalidJson {
            what: "plugin config template",
            detail: e.to_string(),
        })?;
    let Value::Object(mut obj) = parsed else {
        return Err(ConfigError::NotAnObject {
            what: "plugin config template",
            found: kind_of(&parsed),
        });
    };
    let mut changed =
        merge_exclusions(&mut obj, &parse_exclude_namespaces(&cfg.exclude_namespaces))?;
    for (key, agent, flag) in cfg.meshcni_plugin_fields.entries_with_flag() {
        match obj.get(key) {
            None | Some(Value::Null) => {
                obj.insert(key.into(), Value::String(agent.to_string()));
                changed = true;
            }
            Some(Value::String(t)) if t == agent => {}
            Some(other) => {
                return Err(ConfigError::TemplateConflict {
                    key,
                    template: other.to_string(),
                    agent: format!("{agent:?}"),
                    flag,
                });
            }
        }
    }
    if !changed {
        return Ok(rendered);
    }
    let mut out =
        serde_json::to_vec_pretty(&Value::Object(obj)).map_err(|e| ConfigError::InvalidJson {
            what: "merged plugin config template",
            detail: e.to_string(),
        })?;
    out.push(b'\n');
    Ok(out)
}

/// Names in a `null`/absent/array-of-strings field; `want` describes the accepted shape.
fn names(v: Option<&Value>, key: &'static str) -> Result<Vec<String>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(ConfigError::TemplateFieldType {
                    key,
                    want: "a list of namespace names",
                    found: kind_of(other),
                }),
            })
            .collect(),
        Some(other) => Err(ConfigError::TemplateFieldType {
            key,
            want: "a list of namespace names or null",
            found: kind_of(other),
        }),
    }
}

fn merge_exclusions(obj: &mut Map<String, Value>, agent: &[String]) -> Result<bool, ConfigError> {
    let mut top = names(obj.get("exclude_namespaces"), "exclude_namespaces")?;
    let nested = names(
        obj.get("kubernetes")
            .and_then(|k| k.get("exclude_namespaces")),
        "kubernetes.exclude_namespaces",
    )?;
    let missing: Vec<&String> = agent
        .iter()
        .filter(|ns| !top.contains(ns) && !nested.contains(ns))
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    top.extend(missing.into_iter().cloned());
    obj.insert(
        "exclude_namespaces".into(),
        Value::Array(top.into_iter().map(Value::String).collect()),
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cniconfig::plugin_config_bytes;

    fn cfg(template: &str, exclude: &str) -> InstallConfig {
        InstallConfig {
            cni_network_config: template.into(),
            exclude_namespaces: exclude.into(),
            ..InstallConfig::default()
        }
    }

    fn rendered(cfg: &InstallConfig) -> Value {
        serde_json::from_slice(&plugin_config_bytes(cfg).expect("render")).expect("json")
    }

    /// Regression (issue 7 item 6): a template used to replace the agent's config wholesale,
    /// dropping `EXCLUDE_NAMESPACES`.
    #[test]
    fn a_template_keeps_the_agent_exclusions() {
        let t = r#"{"cniVersion":"0.3.1","name":"meshcni","type":"meshcni","log_level":"__LOG_LEVEL__"}"#;
        let v = rendered(&cfg(t, "kube-system,istio-system"));
        assert_eq!(
            v["exclude_namespaces"],
            serde_json::json!(["kube-system", "istio-system"])
        );
        assert_eq!(v["log_level"], "info", "substitution still happens");
        // A template's own exclusions are kept, the agent's added after them.
        let t = r#"{"type":"meshcni","exclude_namespaces":["mine"],
                    "kubernetes":{"exclude_namespaces":["kube-system"]}}"#;
        let v = rendered(&cfg(t, "kube-system,istio-system"));
        assert_eq!(
            v["exclude_namespaces"],
            serde_json::json!(["mine", "istio-system"])
        );
        assert_eq!(
            v["kubernetes"]["exclude_namespaces"],
            serde_json::json!(["kube-system"])
        );
    }

    #[test]
    fn a_template_that_agrees_is_kept_byte_for_byte() {
        let t = "{\n  \"type\": \"meshcni\",\n  \"exclude_namespaces\": [\"kube-system\"]\n}\n";
        assert_eq!(
            plugin_config_bytes(&cfg(t, "kube-system")).expect("render"),
            t.as_bytes()
        );
    }

    #[test]
    fn meshcni_fields_are_merged_and_conflicts_rejected() {
        let mut c = cfg(r#"{"type":"meshcni"}"#, "");
        c.meshcni_plugin_fields = AgentPluginFields {
            pod_metadata_dir: Some("/var/lib/meshcni/pods".into()),
            pod_metadata_default_namespace: Some("demo".into()),
            ambient_detection_failure_policy: Some("open".into()),
        };
        let v = rendered(&c);
        assert_eq!(v["pod_metadata_dir"], "/var/lib/meshcni/pods");
        assert_eq!(v["pod_metadata_default_namespace"], "demo");
        assert_eq!(v["ambient_detection_failure_policy"], "open");

        c.cni_network_config = r#"{"type":"meshcni","pod_metadata_dir":"/elsewhere"}"#.into();
        let err = plugin_config_bytes(&c).expect_err("conflict").to_string();
        for n in [
            "pod_metadata_dir",
            "/elsewhere",
            "/var/lib/meshcni/pods",
            "POD_METADATA_DIR",
        ] {
            assert!(err.contains(n), "{err}");
        }
    }

    #[test]
    fn malformed_templates_are_errors() {
        for (t, want) in [
            ("[1]", "must be a JSON object"),
            ("{", "not valid JSON"),
            (
                r#"{"exclude_namespaces":"kube-system"}"#,
                "exclude_namespaces must be",
            ),
        ] {
            let err = plugin_config_bytes(&cfg(t, "kube-system"))
                .expect_err(t)
                .to_string();
            assert!(err.contains(want), "{t}: {err}");
        }
    }

    #[test]
    fn the_builtin_config_writes_the_fields_only_when_set() {
        let c = InstallConfig::default();
        let v = rendered(&c);
        assert!(v.get("pod_metadata_dir").is_none(), "{v}");
        let mut c = c;
        c.meshcni_plugin_fields.pod_metadata_dir = Some("/m".into());
        assert_eq!(rendered(&c)["pod_metadata_dir"], "/m");
    }
}
