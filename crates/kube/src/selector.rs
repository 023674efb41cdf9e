//! Kubernetes label selectors and Istio's ambient enablement selectors.
//!
//! `LabelSelector` follows `metav1.LabelSelector` semantics (`matchLabels` AND
//! `matchExpressions` with `In`/`NotIn`/`Exists`/`DoesNotExist`; an empty selector matches
//! everything). `EnablementSelector` is the pair `{podSelector, namespaceSelector}` of Istio's
//! `AMBIENT_ENABLEMENT_SELECTOR` / plugin `enablement_selectors` (§1.5 HEAD); shared by the
//! plugin and the agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Operator of a [`LabelSelectorRequirement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub values: Vec<String>,
}

/// `metav1.LabelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelector {
    #[serde(
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// An invalid selector (as `metav1.LabelSelectorAsSelector` would reject it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector requirement on key {key:?}: {reason}")]
pub struct SelectorError {
    pub key: String,
    pub reason: String,
}

impl LabelSelector {
    /// Check operator/values consistency and key syntax.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for key in self.match_labels.keys() {
            check_key(key)?;
        }
        for r in &self.match_expressions {
            check_key(&r.key)?;
            let err = |reason: &str| SelectorError {
                key: r.key.clone(),
                reason: reason.to_string(),
            };
            match r.operator {
                SelectorOperator::In | SelectorOperator::NotIn if r.values.is_empty() => {
                    return Err(err("operator In/NotIn needs at least one value"));
                }
                SelectorOperator::Exists | SelectorOperator::DoesNotExist
                    if !r.values.is_empty() =>
                {
                    return Err(err("operator Exists/DoesNotExist takes no values"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether `labels` satisfy every term. An empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }
}

fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = |reason: &str| {
        Err(SelectorError {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("name part must be 1-63 characters");
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return bad(
            "name part must be alphanumeric, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
    if let Some(p) = prefix
        && (p.is_empty()
            || p.len() > 253
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'))
    {
        return bad("prefix must be a DNS subdomain");
    }
    Ok(())
}

/// One ambient enablement rule: a pod is enabled if both selectors match (a missing
/// selector matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EnablementSelector {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Label (pod and namespace) that opts workloads into ambient.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

impl EnablementSelector {
    pub fn validate(&self) -> Result<(), SelectorError> {
        if let Some(s) = &self.pod_selector {
            s.validate()?;
        }
        if let Some(s) = &self.namespace_selector {
            s.validate()?;
        }
        Ok(())
    }

    pub fn matches(
        &self,
        pod_labels: &BTreeMap<String, String>,
        ns_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.pod_selector
            .as_ref()
            .is_none_or(|s| s.matches(pod_labels))
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|s| s.matches(ns_labels))
    }

    /// Istio's Helm defaults (`ambient.enablementSelectors`): pod label
    /// `istio.io/dataplane-mode=ambient`; or pod label not `none` and namespace label `ambient`.
    pub fn istio_defaults() -> Vec<EnablementSelector> {
        vec![
            EnablementSelector {
                pod_selector: Some(LabelSelector {
                    match_labels: BTreeMap::from([(
                        DATAPLANE_MODE_LABEL.to_string(),
                        "ambient".to_string(),
                    )]),
                    match_expressions: Vec::new(),
                }),
                namespace_selector: None,
            },
            EnablementSelector {
                pod_selector: Some(LabelSelector {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![LabelSelectorRequirement {
                        key: DATAPLANE_MODE_LABEL.to_string(),
                        operator: SelectorOperator::NotIn,
                        values: vec!["none".to_string()],
                    }],
                }),
                namespace_selector: Some(LabelSelector {
                    match_labels: BTreeMap::from([(
                        DATAPLANE_MODE_LABEL.to_string(),
                        "ambient".to_string(),
                    )]),
                    match_expressions: Vec::new(),
                }),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn operators() {
        let sel: LabelSelector = serde_json::from_str(
            r#"{"matchExpressions":[
                {"key":"a","operator":"In","values":["1","2"]},
                {"key":"b","operator":"NotIn","values":["x"]},
                {"key":"c","operator":"Exists"},
                {"key":"d","operator":"DoesNotExist","values":null}]}"#,
        )
        .expect("parse");
        sel.validate().expect("valid");
        assert!(sel.matches(&labels(&[("a", "1"), ("c", "")])));
        assert!(sel.matches(&labels(&[("a", "2"), ("b", "y"), ("c", "z")])));
        assert!(!sel.matches(&labels(&[("a", "3"), ("c", "")])), "In");
        assert!(
            !sel.matches(&labels(&[("a", "1"), ("b", "x"), ("c", "")])),
            "NotIn"
        );
        assert!(!sel.matches(&labels(&[("a", "1")])), "Exists");
        assert!(
            !sel.matches(&labels(&[("a", "1"), ("c", ""), ("d", "")])),
            "DoesNotExist"
        );
        assert!(
            LabelSelector::default().matches(&labels(&[])),
            "empty matches all"
        );
    }

    #[test]
    fn invalid_selectors() {
        for (json, want) in [
            (
                r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#,
                "at least one value",
            ),
            (
                r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#,
                "takes no values",
            ),
            (r#"{"matchLabels":{"-bad":"x"}}"#, "name part"),
            (r#"{"matchLabels":{"Bad_Prefix/x":"x"}}"#, "prefix"),
        ] {
            let sel: LabelSelector = serde_json::from_str(json).expect("parse");
            let err = sel.validate().expect_err(json);
            assert!(err.to_string().contains(want), "{err}");
        }
        assert!(
            serde_json::from_str::<LabelSelector>(
                r#"{"matchExpressions":[{"key":"a","operator":"Equals","values":["x"]}]}"#
            )
            .is_err(),
            "unknown operator"
        );
    }

    #[test]
    fn istio_default_selectors() {
        let sels = EnablementSelector::istio_defaults();
        let m = |pod: &[(&str, &str)], ns: &[(&str, &str)]| {
            sels.iter().any(|s| s.matches(&labels(pod), &labels(ns)))
        };
        let ambient = [(DATAPLANE_MODE_LABEL, "ambient")];
        assert!(m(&ambient, &[]));
        assert!(m(&[], &ambient));
        assert!(m(&[("app", "x")], &ambient));
        assert!(!m(&[(DATAPLANE_MODE_LABEL, "none")], &ambient));
        assert!(!m(&[], &[]));
        assert!(!m(&[], &[(DATAPLANE_MODE_LABEL, "none")]));
        // Pod opt-in beats namespace opt-out.
        assert!(m(&ambient, &[(DATAPLANE_MODE_LABEL, "none")]));
    }
}
