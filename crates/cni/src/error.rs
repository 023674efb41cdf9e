//! The CNI error type: a spec error code plus a short message and longer details, rendered as the
//! spec's error object (`{"cniVersion","code","msg","details"}`) on stdout.

use std::fmt;

use serde_json::{Map, Value};

/// A CNI error as defined by the spec ("Error" section): codes 0–99 are reserved for the
/// well-known errors listed as associated constants; 100+ are free for plugin-specific errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Spec error code (see the associated constants).
    pub code: u32,
    /// A short message characterising the error.
    pub msg: String,
    /// A longer message describing the error (may be empty).
    pub details: String,
}

impl CniError {
    /// 1: incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// 2: unsupported field in network configuration (message names key and value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// 3: container unknown or does not exist (runtime need not clean up).
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// 4: invalid necessary environment variables (message names the variables).
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// 5: I/O failure (e.g. reading stdin).
    pub const IO_FAILURE: u32 = 5;
    /// 6: failed to decode content (e.g. network config JSON).
    pub const DECODING_FAILURE: u32 = 6;
    /// 7: invalid network config.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// 11: try again later (transient condition).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// 50: the plugin is not available (cannot service ADD requests) — STATUS.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// 51: the plugin is not available and existing containers may have limited connectivity — STATUS.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY: u32 = 51;
    /// 999: internal error (libcni's `ErrInternal`; used here for a plugin panic).
    pub const INTERNAL: u32 = 999;

    /// A new error with the given code, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 1, incompatible CNI version.
    pub fn incompatible_version(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::INCOMPATIBLE_VERSION, msg, details)
    }

    /// Code 4, invalid environment variables.
    pub fn invalid_environment(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::INVALID_ENVIRONMENT, msg, details)
    }

    /// Code 5, I/O failure.
    pub fn io(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::IO_FAILURE, msg, details)
    }

    /// Code 6, failed to decode content.
    pub fn decode(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::DECODING_FAILURE, msg, details)
    }

    /// Code 7, invalid network config.
    pub fn invalid_config(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::INVALID_NETWORK_CONFIG, msg, details)
    }

    /// Code 11, try again later.
    pub fn try_again_later(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(Self::TRY_AGAIN_LATER, msg, details)
    }

    /// The spec's error object for a response in `cni_version`
    /// (`{"cniVersion":..,"code":..,"msg":..,"details":..}`).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(cni_version.to_owned()));
        m.insert("code".into(), Value::from(self.code));
        m.insert("msg".into(), Value::String(self.msg.clone()));
        m.insert("details".into(), Value::String(self.details.clone()));
        Value::Object(m)
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests;
