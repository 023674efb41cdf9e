//! The CNI environment: `CNI_COMMAND` and the per-command required variables (`CNI_CONTAINERID`,
//! `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`), validated as the spec and libcni's `skel`
//! do. Parsing goes through a lookup function so it is testable without touching the process env.

use std::fmt;
use std::path::PathBuf;

use crate::CniError;

/// The operation requested by the runtime (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    /// Parses `CNI_COMMAND` (case-sensitive, as in the spec and libcni).
    pub fn parse(s: &str) -> Result<Command, CniError> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "VERSION" => Ok(Command::Version),
            "STATUS" => Ok(Command::Status),
            "GC" => Ok(Command::Gc),
            other => Err(CniError::invalid_environment(
                format!("unknown CNI_COMMAND: {other:?}"),
                "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, STATUS, GC",
            )),
        }
    }

    /// The `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// ADD, DEL and CHECK act on one container attachment and need its variables.
    pub fn is_attachment_command(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The validated CNI environment of one invocation.
///
/// For ADD/DEL/CHECK `container_id` and `ifname` are non-empty and valid, and `netns` is `Some`
/// for ADD and CHECK (DEL tolerates an empty `CNI_NETNS`: the runtime repeats DEL after the netns
/// is gone). For VERSION, STATUS and GC the container variables are not read: `container_id` and
/// `ifname` are empty, `netns` is `None` and `args` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH` split on `:` (empty entries dropped). Never required: this library does not
    /// delegate to other plugins.
    pub path: Vec<PathBuf>,
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

impl Environment {
    /// Reads the environment through `lookup` (a missing variable is `None`).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Environment, CniError> {
        Self::from_fallible_lookup(|k| Ok(lookup(k)))
    }

    /// Reads the real process environment. A variable that is not valid UTF-8 is an error
    /// (code 4) naming it.
    pub fn from_process_env() -> Result<Environment, CniError> {
        Self::from_fallible_lookup(process_var)
    }

    /// Core of the two constructors: `lookup` may itself fail (non-UTF-8 values).
    pub(crate) fn from_fallible_lookup(
        lookup: impl Fn(&str) -> Result<Option<String>, CniError>,
    ) -> Result<Environment, CniError> {
        let command = match lookup("CNI_COMMAND")? {
            Some(c) if !c.is_empty() => Command::parse(&c)?,
            _ => {
                return Err(CniError::invalid_environment(
                    "required env variables [CNI_COMMAND] missing",
                    "",
                ));
            }
        };
        let path = lookup("CNI_PATH")?
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        if !command.is_attachment_command() {
            return Ok(Environment {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: CniArgs::default(),
                path,
            });
        }

        let non_empty = |k: &str| -> Result<Option<String>, CniError> {
            Ok(lookup(k)?.filter(|v| !v.is_empty()))
        };
        let container_id = non_empty("CNI_CONTAINERID")?;
        let netns = non_empty("CNI_NETNS")?;
        let ifname = non_empty("CNI_IFNAME")?;
        let mut missing = Vec::new();
        if container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if netns.is_none() && command != Command::Del {
            missing.push("CNI_NETNS");
        }
        if ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if !missing.is_empty() {
            return Err(CniError::invalid_environment(
                format!("required env variables [{}] missing", missing.join(",")),
                format!("CNI_COMMAND={command}"),
            ));
        }
        let container_id = container_id.unwrap_or_default();
        let ifname = ifname.unwrap_or_default();
        validate_container_id(&container_id)?;
        validate_ifname(&ifname)?;

        let raw_args = lookup("CNI_ARGS")?.unwrap_or_default();
        // DEL must be able to clean up whatever ADD left behind, so a malformed CNI_ARGS does not
        // block it: malformed pairs are set aside (see `CniArgs::malformed`).
        let args = if command == Command::Del {
            CniArgs::parse_lenient(&raw_args)
        } else {
            CniArgs::parse(&raw_args)?
        };

        Ok(Environment {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args,
            path,
        })
    }
}

pub(crate) fn process_var(key: &str) -> Result<Option<String>, CniError> {
    match std::env::var_os(key) {
        None => Ok(None),
        Some(v) => v.into_string().map(Some).map_err(|v| {
            CniError::invalid_environment(
                format!("env variable {key} is not valid UTF-8"),
                format!("{key}={}", v.to_string_lossy()),
            )
        }),
    }
}

/// The spec's container ID rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_environment(
            "invalid characters in CNI_CONTAINERID",
            id.to_owned(),
        ))
    }
}

/// Linux interface-name rules as libcni checks them: non-empty, at most 15 bytes, not `.`/`..`,
/// no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains / or : or whitespace")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(CniError::invalid_environment(
            format!("invalid CNI_IFNAME: interface name {p}"),
            name.to_owned(),
        )),
    }
}

/// `CNI_ARGS`: `K=V;K=V` pairs as the runtime passed them (order kept).
///
/// Parsing follows libcni's `LoadArgs`: pairs are separated by `;`, each must be exactly
/// `KEY=VALUE` with one `=` (so neither side may contain `=`), the key must be non-empty, and
/// `IgnoreUnknown` must be a boolean (`1`/`0`/`true`/`false`, any case) when present.
/// Whether unknown keys are an error is the plugin's call: see [`CniArgs::check_known`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
    ignore_unknown: bool,
    malformed: Vec<String>,
}

/// Keys every Kubernetes runtime passes (CRI: containerd, CRI-O).
pub const K8S_POD_NAME: &str = "K8S_POD_NAME";
pub const K8S_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
pub const K8S_POD_UID: &str = "K8S_POD_UID";
pub const K8S_POD_INFRA_CONTAINER_ID: &str = "K8S_POD_INFRA_CONTAINER_ID";
pub const IGNORE_UNKNOWN: &str = "IgnoreUnknown";

impl CniArgs {
    /// Strict parse; a malformed pair or a non-boolean `IgnoreUnknown` is a code-4 error naming
    /// `CNI_ARGS` and the offending pair.
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut args = CniArgs::default();
        if raw.is_empty() {
            return Ok(args);
        }
        for pair in raw.split(';') {
            args.push_pair(pair).map_err(|why| {
                CniError::invalid_environment(format!("invalid CNI_ARGS: {why}"), raw)
            })?;
        }
        Ok(args)
    }

    /// Lenient parse for DEL: malformed pairs are recorded in [`CniArgs::malformed`] instead of
    /// failing.
    pub fn parse_lenient(raw: &str) -> CniArgs {
        let mut args = CniArgs::default();
        if raw.is_empty() {
            return args;
        }
        for pair in raw.split(';') {
            if args.push_pair(pair).is_err() {
                args.malformed.push(pair.to_owned());
            }
        }
        args
    }

    fn push_pair(&mut self, pair: &str) -> Result<(), String> {
        let mut it = pair.split('=');
        let (Some(k), Some(v), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("pair {pair:?} is not KEY=VALUE"));
        };
        if k.is_empty() {
            return Err(format!("pair {pair:?} has an empty key"));
        }
        if k == IGNORE_UNKNOWN {
            self.ignore_unknown = parse_bool(v).ok_or_else(|| {
                format!("IgnoreUnknown={v:?} is not a boolean (1, 0, true, false)")
            })?;
        }
        self.pairs.push((k.to_owned(), v.to_owned()));
        Ok(())
    }

    /// All pairs in the order given.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The value of `key` (the last occurrence wins, as when libcni assigns fields in order).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `IgnoreUnknown=1` was given.
    pub fn ignore_unknown(&self) -> bool {
        self.ignore_unknown
    }

    /// Pairs that did not parse (only ever non-empty for DEL's lenient parse).
    pub fn malformed(&self) -> &[String] {
        &self.malformed
    }

    /// Fails (code 4, naming the unknown pairs) if a key outside `known` is present and
    /// `IgnoreUnknown` is not set — libcni's rule for a plugin that declares its arg struct.
    /// `IgnoreUnknown` itself is always known.
    pub fn check_known(&self, known: &[&str]) -> Result<(), CniError> {
        if self.ignore_unknown {
            return Ok(());
        }
        let unknown: Vec<String> = self
            .pairs
            .iter()
            .filter(|(k, _)| k != IGNORE_UNKNOWN && !known.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(CniError::invalid_environment(
                format!("invalid CNI_ARGS: unknown args {unknown:?}"),
                "set IgnoreUnknown=1 to allow unknown keys",
            ))
        }
    }

    /// `K8S_POD_NAME`, if present and non-empty.
    pub fn k8s_pod_name(&self) -> Option<&str> {
        self.non_empty(K8S_POD_NAME)
    }

    /// `K8S_POD_NAMESPACE`, if present and non-empty.
    pub fn k8s_pod_namespace(&self) -> Option<&str> {
        self.non_empty(K8S_POD_NAMESPACE)
    }

    /// `K8S_POD_UID`, if present and non-empty.
    pub fn k8s_pod_uid(&self) -> Option<&str> {
        self.non_empty(K8S_POD_UID)
    }

    /// `K8S_POD_INFRA_CONTAINER_ID`, if present and non-empty.
    pub fn k8s_pod_infra_container_id(&self) -> Option<&str> {
        self.non_empty(K8S_POD_INFRA_CONTAINER_ID)
    }

    fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }
}

/// libcni's `UnmarshallableBool`: `1`/`true` and `0`/`false`, case-insensitive.
fn parse_bool(v: &str) -> Option<bool> {
    if v == "1" || v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v == "0" || v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
