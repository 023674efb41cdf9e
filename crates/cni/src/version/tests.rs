use super::*;

#[test]
fn versions_are_ordered_and_round_trip() {
    let mut prev = None;
    for v in SUPPORTED_VERSIONS {
        assert_eq!(CniVersion::from_str_exact(v.as_str()), Some(v));
        assert_eq!(v.to_string(), v.as_str());
        assert!(prev < Some(v));
        prev = Some(v);
    }
    assert_eq!(CniVersion::LATEST, CniVersion::V1_1_0);
    assert_eq!(CniVersion::from_str_exact("1.0"), None);
}

#[test]
fn result_shape_predicates() {
    use CniVersion::*;
    let legacy: Vec<bool> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| v.is_legacy_result())
        .collect();
    assert_eq!(legacy, [true, true, false, false, false, false, false]);
    let ipver: Vec<bool> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| v.has_ip_version_field())
        .collect();
    assert_eq!(ipver, [false, false, true, true, true, false, false]);
    assert!(V0_4_0 < V1_0_0);
}

#[test]
fn version_response_echoes_supported_requests_only() {
    let all = serde_json::json!([
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
    ]);
    for (req, want) in [
        (Some("0.3.0"), "0.3.0"),
        (None, "1.1.0"),
        (Some(""), "1.1.0"),
        (Some("3.0.0"), "1.1.0"),
    ] {
        assert_eq!(
            version_response(req),
            serde_json::json!({"cniVersion": want, "supportedVersions": all})
        );
    }
}
