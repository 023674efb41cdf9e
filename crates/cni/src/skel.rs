//! The plugin entry loop (libcni's `skel`): read the environment and stdin, validate them, gate
//! commands by spec version, dispatch to a [`Plugin`], and write the result or the CNI error JSON
//! to stdout with the right exit code. Synchronous and allocation-light: a plugin binary's
//! startup cost is this plus its own work.

use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::Value;

use crate::result::{convert_result, empty_result};
use crate::version::{SUPPORTED_VERSIONS, version_response};
use crate::{CniError, CniVersion, Command, Environment, NetConf};

/// Largest stdin accepted. Real configs (even with a large `prevResult`) are a few KiB; the cap
/// keeps a runaway writer from exhausting memory.
pub const MAX_STDIN_BYTES: u64 = 16 * 1024 * 1024;

/// Everything one ADD/DEL/CHECK/STATUS/GC invocation carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub env: Environment,
    pub conf: NetConf,
    /// stdin exactly as received.
    pub stdin: Vec<u8>,
}

impl Context {
    /// The config's `cniVersion`.
    pub fn version(&self) -> CniVersion {
        self.conf.cni_version
    }

    /// A chained plugin's ADD result when it changes nothing: the `prevResult` converted to the
    /// config's version, or an empty result when there is none.
    pub fn pass_through(&self) -> Result<Value, CniError> {
        match &self.conf.prev_result {
            Some(prev) => convert_result(prev, self.conf.cni_version.as_str()),
            None => empty_result(self.conf.cni_version.as_str()),
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `VERSION`; `requested` is the `cniVersion` from stdin, if any could be read.
    Version { requested: Option<String> },
    /// ADD, DEL, CHECK, STATUS or GC (`ctx.env.command`).
    Plugin(Box<Context>),
}

/// A CNI plugin. Every method gets the validated request; errors become the CNI error JSON.
pub trait Plugin {
    /// ADD: returns the result to print (any supported version; it is converted to the config's
    /// `cniVersion` before printing). Chained plugins usually return [`Context::pass_through`].
    fn add(&self, ctx: &Context) -> Result<Value, CniError>;
    /// DEL: should succeed when the attachment is already gone (DEL is repeated by runtimes).
    fn del(&self, ctx: &Context) -> Result<(), CniError>;
    /// CHECK (cniVersion ≥ 0.4.0).
    fn check(&self, ctx: &Context) -> Result<(), CniError>;
    /// STATUS (cniVersion ≥ 1.1.0): `Ok` means ready for ADD; otherwise codes 50/51/11.
    fn status(&self, ctx: &Context) -> Result<(), CniError>;
    /// GC (cniVersion ≥ 1.1.0): release resources of attachments not in
    /// [`NetConf::valid_attachments`].
    fn gc(&self, ctx: &Context) -> Result<(), CniError>;
    /// One line printed to stderr by [`main_with`] when run without `CNI_COMMAND` (by a human).
    fn about(&self) -> &str {
        ""
    }
}

/// Validates a request from environment pairs and stdin bytes. Never panics (fuzz target).
/// With duplicate keys the first pair wins (as `getenv` does).
pub fn parse_request(env_vars: &[(String, String)], stdin: &[u8]) -> Result<Request, CniError> {
    let lookup = |k: &str| -> Result<Option<String>, CniError> {
        Ok(env_vars
            .iter()
            .find(|(ek, _)| ek == k)
            .map(|(_, v)| v.clone()))
    };
    parse_request_with(lookup, stdin)
}

fn parse_request_with(
    lookup: impl Fn(&str) -> Result<Option<String>, CniError>,
    stdin: &[u8],
) -> Result<Request, CniError> {
    let env = Environment::from_fallible_lookup(lookup)?;
    if env.command == Command::Version {
        return Ok(Request::Version {
            requested: version_hint(stdin),
        });
    }
    let conf = NetConf::parse(stdin)?;
    let needed = match env.command {
        Command::Check => Some(CniVersion::V0_4_0),
        Command::Status | Command::Gc => Some(CniVersion::V1_1_0),
        _ => None,
    };
    if let Some(min) = needed.filter(|min| conf.cni_version < *min) {
        return Err(CniError::incompatible_version(
            format!("config version does not allow {}", env.command),
            format!(
                "config is {:?}; {} needs cniVersion {min} or later",
                conf.cni_version.as_str(),
                env.command
            ),
        ));
    }
    if env.command == Command::Gc {
        conf.valid_attachments()?;
    }
    Ok(Request::Plugin(Box::new(Context {
        env,
        conf,
        stdin: stdin.to_vec(),
    })))
}

/// The `cniVersion` string in stdin, if stdin is a JSON object carrying a non-empty one.
fn version_hint(stdin: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "cniVersion")]
        cni_version: Option<Value>,
    }
    let probe: Probe = serde_json::from_slice(stdin).ok()?;
    match probe.cni_version? {
        Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// Runs one invocation: `env` looks up `CNI_*` variables, `stdin`/`stdout` are the CNI channels.
/// Returns the process exit code (0 success, 1 error — the error JSON is on stdout).
pub fn run(
    plugin: &impl Plugin,
    env: impl Fn(&str) -> Option<String>,
    stdin: impl Read,
    stdout: impl Write,
) -> i32 {
    run_with(plugin, |k| Ok(env(k)), stdin, stdout)
}

fn run_with(
    plugin: &impl Plugin,
    lookup: impl Fn(&str) -> Result<Option<String>, CniError>,
    stdin: impl Read,
    mut stdout: impl Write,
) -> i32 {
    // Without CNI_COMMAND there is nothing to read stdin for (and stdin may be a terminal).
    let has_command = matches!(lookup("CNI_COMMAND"), Ok(Some(c)) if !c.is_empty());
    let input = if has_command {
        match read_stdin(stdin) {
            Ok(b) => b,
            Err(e) => return emit_error(&mut stdout, &e, None),
        }
    } else {
        Vec::new()
    };
    let request = match parse_request_with(lookup, &input) {
        Ok(r) => r,
        Err(e) => return emit_error(&mut stdout, &e, version_hint(&input).as_deref()),
    };
    let ctx = match request {
        Request::Version { requested } => {
            return emit(&mut stdout, &version_response(requested.as_deref()));
        }
        Request::Plugin(ctx) => ctx,
    };
    let version = ctx.conf.cni_version.as_str();
    let command = ctx.env.command;
    let outcome = catch_unwind(AssertUnwindSafe(|| match command {
        Command::Add => plugin
            .add(&ctx)
            .and_then(|v| convert_result(&v, version))
            .map(Some),
        Command::Del => plugin.del(&ctx).map(|()| None),
        Command::Check => plugin.check(&ctx).map(|()| None),
        Command::Status => plugin.status(&ctx).map(|()| None),
        Command::Gc => plugin.gc(&ctx).map(|()| None),
        // parse_request_with answers VERSION itself
        Command::Version => Ok(None),
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        Err(CniError::new(
            CniError::INTERNAL,
            format!("plugin panicked during {command}"),
            what,
        ))
    });
    match outcome {
        Ok(Some(result)) => emit(&mut stdout, &result),
        Ok(None) => 0,
        Err(e) => emit_error(&mut stdout, &e, Some(version)),
    }
}

fn read_stdin(stdin: impl Read) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    stdin
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::io("failed to read network config from stdin", e.to_string()))?;
    if buf.len() as u64 > MAX_STDIN_BYTES {
        return Err(CniError::io(
            "failed to read network config from stdin",
            format!("stdin is larger than {MAX_STDIN_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

fn emit(stdout: &mut impl Write, v: &Value) -> i32 {
    let mut out = v.to_string();
    out.push('\n');
    match stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Writes the error JSON; `version` is the config's `cniVersion` when known (spec: errors carry
/// the configuration's version), else the newest we speak.
fn emit_error(stdout: &mut impl Write, e: &CniError, version: Option<&str>) -> i32 {
    let version = version.unwrap_or(CniVersion::LATEST.as_str());
    let _ = emit(stdout, &e.to_json(version));
    1
}

/// `main` for a plugin binary: runs one invocation against the real environment, stdin and
/// stdout, then exits with its code. Run by hand without `CNI_COMMAND`, it also prints the
/// plugin's [`Plugin::about`] line and the supported versions to stderr.
pub fn main_with(plugin: &impl Plugin) -> ! {
    if std::env::var_os("CNI_COMMAND").is_none_or(|c| c.is_empty()) {
        let versions: Vec<&str> = SUPPORTED_VERSIONS.iter().map(|v| v.as_str()).collect();
        let mut stderr = std::io::stderr().lock();
        if !plugin.about().is_empty() {
            let _ = writeln!(stderr, "{}", plugin.about());
        }
        let _ = writeln!(
            stderr,
            "CNI protocol versions supported: {}",
            versions.join(", ")
        );
    }
    let code = run_with(
        plugin,
        crate::env::process_var,
        std::io::stdin().lock(),
        std::io::stdout().lock(),
    );
    std::process::exit(code)
}

#[cfg(test)]
mod tests;
