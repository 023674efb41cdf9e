//! CNI spec versions this library speaks, which commands each version allows, and the answer to
//! the `VERSION` command.

use std::fmt;

use serde_json::{Map, Value};

use crate::CniError;

/// A CNI specification version this library supports.
///
/// 0.1.0 and 0.2.0 are supported for ADD/DEL only (results in the legacy `ip4`/`ip6` shape);
/// CHECK needs 0.4.0+, STATUS and GC need 1.1.0+.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every supported version, oldest first (the `supportedVersions` list of `VERSION`).
pub const SUPPORTED_VERSIONS: [CniVersion; 7] = [
    CniVersion::V0_1_0,
    CniVersion::V0_2_0,
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl CniVersion {
    /// The newest supported version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version string, e.g. `"0.4.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_1_0 => "0.1.0",
            CniVersion::V0_2_0 => "0.2.0",
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Parses an exact supported version string; `None` for anything else (e.g. `"1.0"`, `"2.0.0"`).
    pub fn from_str_exact(s: &str) -> Option<CniVersion> {
        SUPPORTED_VERSIONS.iter().copied().find(|v| v.as_str() == s)
    }

    /// Parses a version, failing with the spec's code 1 ("incompatible CNI version") naming the
    /// offending version and the supported list.
    pub fn parse(s: &str) -> Result<CniVersion, CniError> {
        Self::from_str_exact(s).ok_or_else(|| {
            CniError::incompatible_version(
                "incompatible CNI version",
                format!("config is {s:?}, plugin supports {}", supported_list()),
            )
        })
    }

    /// Results in this version use the legacy `ip4`/`ip6` shape (0.1.0, 0.2.0).
    pub fn is_legacy_result(self) -> bool {
        self <= CniVersion::V0_2_0
    }

    /// `ips[].version` is part of the result (0.3.0 – 0.4.0); dropped in 1.0.0.
    pub fn has_ip_version_field(self) -> bool {
        (CniVersion::V0_3_0..=CniVersion::V0_4_0).contains(&self)
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `["0.1.0", "0.2.0", ...]` as shown in error details.
pub fn supported_list() -> String {
    let quoted: Vec<String> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| format!("{:?}", v.as_str()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// The `VERSION` response: `{"cniVersion": <requested or newest>, "supportedVersions": [...]}`.
///
/// The spec says to echo the requested `cniVersion`; we echo it when it is one we support and
/// answer with the newest otherwise (absent, empty, or a version we cannot speak), so the runtime
/// can always parse the reply in a version both sides know.
pub fn version_response(requested: Option<&str>) -> Value {
    let version = requested
        .and_then(CniVersion::from_str_exact)
        .unwrap_or(CniVersion::LATEST);
    let mut m = Map::new();
    m.insert("cniVersion".into(), Value::from(version.as_str()));
    m.insert(
        "supportedVersions".into(),
        Value::Array(
            SUPPORTED_VERSIONS
                .iter()
                .map(|v| Value::from(v.as_str()))
                .collect(),
        ),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests;
