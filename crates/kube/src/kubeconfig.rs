//! Kubeconfig parsing: the current context's cluster (server, trust) and user (credentials).
//!
//! Supports what the istio-cni installers write and what a hand-made kubeconfig commonly uses:
//! `certificate-authority(-data)`, `insecure-skip-tls-verify`, `token`, `tokenFile`,
//! `client-certificate(-data)`/`client-key(-data)`, `username`/`password`. Relative file paths
//! are resolved against the kubeconfig's directory, as client-go does. Credential plugins
//! (`exec`, `auth-provider`) are rejected with a clear error: a CNI plugin must not run them.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Why a kubeconfig cannot be used. Always names the kubeconfig file.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing kubeconfig {path}: {source}")]
    Parse {
        path: PathBuf,
        // Boxed: the parser error carries snippets and locations (hundreds of bytes).
        source: Box<serde_saphyr::Error>,
    },
    #[error("kubeconfig {path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("kubeconfig {path}: reading {field} file {file}: {source}")]
    ReadReferenced {
        path: PathBuf,
        field: &'static str,
        file: PathBuf,
        source: std::io::Error,
    },
}

/// How the server certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsTrust {
    /// PEM bundle from `certificate-authority(-data)`.
    CaPem(Vec<u8>),
    /// Neither a CA nor skip-verify: the built-in public (webpki) roots.
    PublicRoots,
    /// `insecure-skip-tls-verify: true`.
    InsecureSkipVerify,
}

/// Credentials of the current user.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Bearer token (`tokenFile` content wins over `token`, as in client-go).
    pub bearer_token: Option<String>,
    /// Basic auth `(username, password)`.
    pub basic: Option<(String, String)>,
    /// Client certificate chain and key, PEM.
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Auth {
    // Never print secrets (errors and logs may include a ClusterAccess).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "basic",
                &self.basic.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish()
    }
}

/// Everything needed to talk to the API server, resolved from a kubeconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAccess {
    /// Server base URL without trailing slash, e.g. `https://10.96.0.1:443`.
    pub server: String,
    pub trust: TlsTrust,
    pub auth: Auth,
    /// The kubeconfig it came from (for messages); empty if built by hand.
    pub source: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    #[serde(rename = "current-context")]
    current_context: Option<String>,
    clusters: Option<Vec<NamedCluster>>,
    contexts: Option<Vec<NamedContext>>,
    users: Option<Vec<NamedUser>>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCluster {
    server: Option<String>,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<String>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify")]
    insecure_skip_tls_verify: Option<bool>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Option<RawContext>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawContext {
    cluster: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    user: Option<RawUser>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    #[serde(rename = "client-certificate")]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<String>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    username: Option<String>,
    password: Option<String>,
    exec: Option<serde::de::IgnoredAny>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde::de::IgnoredAny>,
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

impl ClusterAccess {
    /// Load and resolve the kubeconfig at `path` (reading referenced CA/token/cert files).
    pub fn from_kubeconfig(path: &Path) -> Result<ClusterAccess, KubeconfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_kubeconfig_str(&text, path)
    }

    /// Resolve kubeconfig `text`; `path` names it in errors and anchors relative file paths.
    pub fn from_kubeconfig_str(text: &str, path: &Path) -> Result<ClusterAccess, KubeconfigError> {
        let invalid = |what: String| KubeconfigError::Invalid {
            path: path.to_path_buf(),
            what,
        };
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|source| KubeconfigError::Parse {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?
        };
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        let read_ref = |field: &'static str, file: &str| -> Result<Vec<u8>, KubeconfigError> {
            let file = resolve(file);
            std::fs::read(&file).map_err(|source| KubeconfigError::ReadReferenced {
                path: path.to_path_buf(),
                field,
                file,
                source,
            })
        };
        let decode = |field: &'static str, data: &str| -> Result<Vec<u8>, KubeconfigError> {
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| invalid(format!("{field} is not valid base64: {e}")))
        };

        let ctx_name = non_empty(&raw.current_context)
            .ok_or_else(|| invalid("missing field current-context".into()))?;
        let ctx = raw
            .contexts
            .iter()
            .flatten()
            .find(|c| c.name == ctx_name)
            .ok_or_else(|| {
                invalid(format!(
                    "current-context {ctx_name:?} not found in contexts"
                ))
            })?;
        let ctx = ctx
            .context
            .as_ref()
            .ok_or_else(|| invalid(format!("context {ctx_name:?} has no context field")))?;
        let cluster_name = non_empty(&ctx.cluster)
            .ok_or_else(|| invalid(format!("context {ctx_name:?}: missing field cluster")))?;
        let cluster = raw
            .clusters
            .iter()
            .flatten()
            .find(|c| c.name == cluster_name)
            .ok_or_else(|| {
                invalid(format!(
                    "cluster {cluster_name:?} (of context {ctx_name:?}) not found in clusters"
                ))
            })?;
        let cluster = cluster
            .cluster
            .as_ref()
            .ok_or_else(|| invalid(format!("cluster {cluster_name:?} has no cluster field")))?;
        let server = non_empty(&cluster.server)
            .ok_or_else(|| invalid(format!("cluster {cluster_name:?}: missing field server")))?;
        let server = normalize_server(server)
            .map_err(|why| invalid(format!("cluster {cluster_name:?}: server {server:?} {why}")))?;

        let insecure = cluster.insecure_skip_tls_verify.unwrap_or(false);
        let ca = if let Some(data) = non_empty(&cluster.certificate_authority_data) {
            Some(decode("certificate-authority-data", data)?)
        } else if let Some(file) = non_empty(&cluster.certificate_authority) {
            Some(read_ref("certificate-authority", file)?)
        } else {
            None
        };
        let trust = match (ca, insecure) {
            (Some(_), true) => {
                // client-go refuses this combination too.
                return Err(invalid(format!(
                    "cluster {cluster_name:?}: certificate-authority and insecure-skip-tls-verify are mutually exclusive"
                )));
            }
            (Some(pem), false) => TlsTrust::CaPem(pem),
            (None, true) => TlsTrust::InsecureSkipVerify,
            (None, false) => TlsTrust::PublicRoots,
        };

        let mut auth = Auth::default();
        if let Some(user_name) = non_empty(&ctx.user) {
            let user = raw
                .users
                .iter()
                .flatten()
                .find(|u| u.name == user_name)
                .ok_or_else(|| {
                    invalid(format!(
                        "user {user_name:?} (of context {ctx_name:?}) not found in users"
                    ))
                })?;
            let default_user = RawUser::default();
            let user = user.user.as_ref().unwrap_or(&default_user);
            if let Some(file) = non_empty(&user.token_file) {
                let bytes = read_ref("tokenFile", file)?;
                let token = String::from_utf8_lossy(&bytes).trim().to_string();
                if token.is_empty() {
                    return Err(invalid(format!(
                        "user {user_name:?}: tokenFile {file} is empty"
                    )));
                }
                auth.bearer_token = Some(token);
            } else if let Some(token) = non_empty(&user.token) {
                auth.bearer_token = Some(token.trim().to_string());
            }
            if let (Some(u), Some(p)) = (non_empty(&user.username), non_empty(&user.password)) {
                auth.basic = Some((u.to_string(), p.to_string()));
            }
            let cert = if let Some(data) = non_empty(&user.client_certificate_data) {
                Some(decode("client-certificate-data", data)?)
            } else if let Some(file) = non_empty(&user.client_certificate) {
                Some(read_ref("client-certificate", file)?)
            } else {
                None
            };
            let key = if let Some(data) = non_empty(&user.client_key_data) {
                Some(decode("client-key-data", data)?)
            } else if let Some(file) = non_empty(&user.client_key) {
                Some(read_ref("client-key", file)?)
            } else {
                None
            };
            match (cert, key) {
                (Some(c), Some(k)) => auth.client_cert_pem = Some((c, k)),
                (Some(_), None) => {
                    return Err(invalid(format!(
                        "user {user_name:?}: client certificate given but missing field client-key(-data)"
                    )));
                }
                (None, Some(_)) => {
                    return Err(invalid(format!(
                        "user {user_name:?}: client key given but missing field client-certificate(-data)"
                    )));
                }
                (None, None) => {}
            }
            let has_creds = auth.bearer_token.is_some()
                || auth.basic.is_some()
                || auth.client_cert_pem.is_some();
            if !has_creds && (user.exec.is_some() || user.auth_provider.is_some()) {
                return Err(invalid(format!(
                    "user {user_name:?} uses an exec/auth-provider credential plugin, which meshcni does not run; use token, tokenFile or a client certificate"
                )));
            }
        }

        Ok(ClusterAccess {
            server,
            trust,
            auth,
            source: path.to_path_buf(),
        })
    }
}

/// Add the default `https://` scheme like client-go and strip trailing slashes.
fn normalize_server(server: &str) -> Result<String, &'static str> {
    let server = server.trim();
    let with_scheme = if server.contains("://") {
        server.to_string()
    } else {
        format!("https://{server}")
    };
    let rest = with_scheme
        .strip_prefix("https://")
        .or_else(|| with_scheme.strip_prefix("http://"))
        .ok_or("has an unsupported scheme (want http or https)")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host");
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_server_cases() {
        assert_eq!(
            normalize_server("10.96.0.1:443").as_deref(),
            Ok("https://10.96.0.1:443")
        );
        assert_eq!(
            normalize_server("https://h/prefix/").as_deref(),
            Ok("https://h/prefix")
        );
        assert_eq!(
            normalize_server("http://[::1]:80").as_deref(),
            Ok("http://[::1]:80")
        );
        assert!(normalize_server("ftp://h").is_err());
        assert!(normalize_server("https://").is_err());
    }

    #[test]
    fn auth_debug_redacts() {
        let a = Auth {
            bearer_token: Some("secret-token".into()),
            basic: Some(("u".into(), "pw-secret".into())),
            client_cert_pem: None,
        };
        let s = format!("{a:?}");
        assert!(!s.contains("secret"), "{s}");
    }
}
