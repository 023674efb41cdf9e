//! Shared fixture loading for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use meshcni_rules::sidecar::CaptureConfig;
use serde_json::{Map, Value};

pub fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/istio")
        .join(name)
}

pub struct Case {
    pub name: String,
    pub golden: String,
    pub config: CaptureConfig,
}

pub fn load_cases(corpus: &str) -> Vec<Case> {
    let dir = corpus_dir(corpus);
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("read cases.json");
    let doc: Value = serde_json::from_str(&text).expect("parse cases.json");
    let defaults = doc["defaults"]
        .as_object()
        .expect("defaults object")
        .clone();
    doc["cases"]
        .as_array()
        .expect("cases array")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_owned();
            let mut merged: Map<String, Value> = defaults.clone();
            for (k, v) in c["inputs"].as_object().expect("inputs object") {
                merged.insert(k.clone(), v.clone());
            }
            assert_eq!(
                Value::Object(merged.clone()),
                c["effective"],
                "{corpus}/{name}: defaults+inputs differ from `effective`"
            );
            let config: CaptureConfig =
                serde_json::from_value(Value::Object(merged)).expect("config deserializes");
            let golden_file = c["golden"].as_str().expect("golden file name");
            let golden = std::fs::read_to_string(dir.join(golden_file))
                .unwrap_or_else(|e| panic!("read {golden_file}: {e}"));
            Case {
                name,
                golden,
                config,
            }
        })
        .collect()
}
