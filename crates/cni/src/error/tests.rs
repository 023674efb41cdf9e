use super::*;

#[test]
fn error_json_has_the_spec_shape() {
    let e = CniError::invalid_config("invalid network config", "subnet 10.0.0.0/31 is too small");
    assert_eq!(
        e.to_json("1.0.0"),
        serde_json::json!({"cniVersion": "1.0.0", "code": 7, "msg": "invalid network config",
                           "details": "subnet 10.0.0.0/31 is too small"})
    );
    assert_eq!(
        e.to_string(),
        "CNI error 7: invalid network config; subnet 10.0.0.0/31 is too small"
    );
    assert_eq!(CniError::io("x", "").to_string(), "CNI error 5: x");
}

#[test]
fn well_known_codes_match_the_spec() {
    assert_eq!(
        [
            CniError::INCOMPATIBLE_VERSION,
            CniError::UNSUPPORTED_FIELD,
            CniError::UNKNOWN_CONTAINER,
            CniError::INVALID_ENVIRONMENT,
            CniError::IO_FAILURE,
            CniError::DECODING_FAILURE,
            CniError::INVALID_NETWORK_CONFIG,
            CniError::TRY_AGAIN_LATER,
            CniError::PLUGIN_NOT_AVAILABLE,
            CniError::PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY,
        ],
        [1, 2, 3, 4, 5, 6, 7, 11, 50, 51]
    );
    assert_eq!(CniError::decode("m", "d").code, 6);
    assert_eq!(CniError::invalid_environment("m", "d").code, 4);
    assert_eq!(CniError::incompatible_version("m", "d").code, 1);
    assert_eq!(CniError::try_again_later("m", "d").code, 11);
}
