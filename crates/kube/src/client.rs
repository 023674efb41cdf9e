//! Blocking API client: `GET` a Pod or a Namespace with short timeouts.
//!
//! One [`ApiClient`] per plugin invocation. TLS uses rustls (ring) with the kubeconfig's CA,
//! the public roots, or no verification when the kubeconfig says `insecure-skip-tls-verify`.
//! Plain `http://` servers are accepted (tests, `kubectl proxy`).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;

use crate::error::{KubeError, ObjectKind, check_name};
use crate::kubeconfig::{ClusterAccess, KubeconfigError, TlsTrust};
use crate::source::PodSource;
use crate::types::{Namespace, Pod};

/// Largest response body accepted (a Pod with huge managedFields is still far below this).
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Timeouts of the client. Defaults: connect 2 s, whole request 5 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Covers connect, TLS, sending, and reading the full body.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A blocking Kubernetes API client for the plugin's lookups.
pub struct ApiClient {
    agent: ureq::Agent,
    server: String,
    authorization: Option<String>,
    options: ClientOptions,
}

/// The API-backed [`PodSource`].
pub type ApiPodSource = ApiClient;

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.server)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// Build a client from the kubeconfig at `path`.
    pub fn from_kubeconfig(path: &Path, options: ClientOptions) -> Result<ApiClient, KubeError> {
        let access = ClusterAccess::from_kubeconfig(path)?;
        ApiClient::new(&access, options)
    }

    /// Build a client for resolved cluster access.
    pub fn new(access: &ClusterAccess, options: ClientOptions) -> Result<ApiClient, KubeError> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(options.connect_timeout)
            .timeout(options.timeout)
            .redirects(0)
            .user_agent(concat!("meshcni/", env!("CARGO_PKG_VERSION")));
        let needs_custom_tls =
            !matches!(access.trust, TlsTrust::PublicRoots) || access.auth.client_cert_pem.is_some();
        if access.server.starts_with("https://") && needs_custom_tls {
            builder = builder.tls_config(Arc::new(tls_config(access)?));
        }
        let authorization = if let Some(token) = &access.auth.bearer_token {
            Some(format!("Bearer {token}"))
        } else {
            access.auth.basic.as_ref().map(|(u, p)| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            })
        };
        Ok(ApiClient {
            agent: builder.build(),
            server: access.server.clone(),
            authorization,
            options,
        })
    }

    /// The server base URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// `GET /api/v1/namespaces/{ns}/pods/{name}`.
    pub fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        check_name("namespace", namespace)?;
        check_name("pod", name)?;
        self.get_json(
            &format!("/api/v1/namespaces/{namespace}/pods/{name}"),
            ObjectKind::Pod,
            &format!("{namespace}/{name}"),
        )
    }

    /// `GET /api/v1/namespaces/{name}`.
    pub fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError> {
        check_name("namespace", name)?;
        self.get_json(
            &format!("/api/v1/namespaces/{name}"),
            ObjectKind::Namespace,
            name,
        )
    }

    fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        kind: ObjectKind,
        display_name: &str,
    ) -> Result<T, KubeError> {
        let url = format!("{}{}", self.server, path);
        let mut req = self.agent.get(&url).set("Accept", "application/json");
        if let Some(auth) = &self.authorization {
            req = req.set("Authorization", auth);
        }
        match req.call() {
            Ok(resp) => {
                let reader = resp.into_reader().take(MAX_BODY);
                serde_json::from_reader(reader).map_err(|e| {
                    if e.io_error_kind().is_some_and(is_timeout_kind) {
                        self.timeout(&url)
                    } else if e.is_io() {
                        KubeError::Unreachable {
                            server: self.server.clone(),
                            reason: format!("reading response body: {e}"),
                        }
                    } else {
                        KubeError::BadResponse {
                            url: url.clone(),
                            reason: format!("not a {kind} object: {e}"),
                        }
                    }
                })
            }
            Err(ureq::Error::Status(status, resp)) => {
                let body = read_error_body(resp);
                let message = status_message(&body);
                Err(match status {
                    404 => KubeError::NotFound {
                        kind,
                        name: display_name.to_string(),
                    },
                    401 => KubeError::Unauthorized { url, message },
                    403 => KubeError::Forbidden { url, message },
                    _ => KubeError::Api {
                        url,
                        status,
                        message,
                    },
                })
            }
            Err(ureq::Error::Transport(t)) => Err(self.classify_transport(&url, &t)),
        }
    }

    fn timeout(&self, url: &str) -> KubeError {
        KubeError::Timeout {
            url: url.to_string(),
            connect: self.options.connect_timeout,
            total: self.options.timeout,
        }
    }

    fn classify_transport(&self, url: &str, t: &ureq::Transport) -> KubeError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
        while let Some(err) = source {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if is_timeout_kind(io.kind()) {
                    return self.timeout(url);
                }
                if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    return KubeError::Tls {
                        server: self.server.clone(),
                        reason: tls.to_string(),
                    };
                }
            }
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return KubeError::Tls {
                    server: self.server.clone(),
                    reason: tls.to_string(),
                };
            }
            source = err.source();
        }
        KubeError::Unreachable {
            server: self.server.clone(),
            reason: t.to_string(),
        }
    }
}

/// Reading bodies: errors met while reading a response body.
impl ApiClient {
    /// Map an I/O error met while reading a streamed body.
    pub(crate) fn stream_error(&self, url: &str, e: &std::io::Error) -> KubeError {
        if is_timeout_kind(e.kind()) {
            self.timeout(url)
        } else {
            KubeError::Unreachable {
                server: self.server.clone(),
                reason: format!("reading {url}: {e}"),
            }
        }
    }
}

/// Writes (the agent's `uninstall-hook`): any method, any status handed back as it came.
impl ApiClient {
    /// `method path` with `body` sent as `content_type`. Returns the HTTP status and the body
    /// (at most 16 MiB) for every answer the server gave, 2xx or not, so the caller names the
    /// operation in its own errors; only transport failures (unreachable, timeout, TLS) are
    /// errors here.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(u16, String), KubeError> {
        let url = format!("{}{}", self.server, path);
        let mut req = self
            .agent
            .request(method, &url)
            .set("Accept", "application/json")
            .set("Content-Type", content_type);
        if let Some(auth) = &self.authorization {
            req = req.set("Authorization", auth);
        }
        let resp = match req.send_bytes(body) {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
            Err(ureq::Error::Transport(t)) => return Err(self.classify_transport(&url, &t)),
        };
        let status = resp.status();
        let mut text = String::new();
        resp.into_reader()
            .take(MAX_BODY)
            .read_to_string(&mut text)
            .map_err(|e| self.stream_error(&url, &e))?;
        Ok((status, text))
    }
}

impl PodSource for ApiClient {
    fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, KubeError> {
        ApiClient::get_pod(self, namespace, name)
    }
    fn get_namespace(&self, name: &str) -> Result<Namespace, KubeError> {
        ApiClient::get_namespace(self, name)
    }
}

fn is_timeout_kind(kind: std::io::ErrorKind) -> bool {
    matches!(
        kind,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

fn read_error_body(resp: ureq::Response) -> String {
    let mut body = String::new();
    // The body only improves the message; a failure to read it must not hide the status.
    let _ = resp.into_reader().take(64 * 1024).read_to_string(&mut body);
    body
}

/// The `message` of a Kubernetes `Status` object, else the (truncated) raw body.
fn status_message(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Status {
        message: Option<String>,
    }
    if let Ok(Status { message: Some(m) }) = serde_json::from_str::<Status>(body) {
        if !m.is_empty() {
            return m;
        }
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    trimmed.chars().take(512).collect()
}

fn tls_config(access: &ClusterAccess) -> Result<rustls::ClientConfig, KubeError> {
    let invalid = |what: String| {
        KubeError::Config(KubeconfigError::Invalid {
            path: access.source.clone(),
            what,
        })
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS setup: {e}")))?;
    let builder = match &access.trust {
        TlsTrust::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut count = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert =
                    cert.map_err(|e| invalid(format!("certificate-authority: bad PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("certificate-authority: bad certificate: {e}")))?;
                count += 1;
            }
            if count == 0 {
                return Err(invalid(
                    "certificate-authority contains no PEM CERTIFICATE block".into(),
                ));
            }
            builder.with_root_certificates(roots)
        }
        TlsTrust::PublicRoots => {
            // Only reached with a client certificate: without a CA we cannot build the
            // verifier ureq would otherwise supply with its bundled roots.
            return Err(invalid(
                "client certificate authentication needs certificate-authority(-data) or insecure-skip-tls-verify".into(),
            ));
        }
        TlsTrust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
    };
    match &access.auth.client_cert_pem {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => {
            let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("client-certificate: bad PEM: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(
                    "client-certificate contains no PEM CERTIFICATE block".into(),
                ));
            }
            let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
                .map_err(|e| invalid(format!("client-key: bad PEM: {e}")))?
                .ok_or_else(|| invalid("client-key contains no PEM private key".into()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| invalid(format!("client certificate/key rejected: {e}")))
        }
    }
}

/// `insecure-skip-tls-verify`: accept any server certificate, but still check handshake
/// signatures so the connection is at least a proper TLS session.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_prefers_status_object() {
        let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"x\" is forbidden: nope","reason":"Forbidden","code":403}"#;
        assert_eq!(status_message(body), "pods \"x\" is forbidden: nope");
        assert_eq!(status_message("plain text\n"), "plain text");
        assert_eq!(status_message(""), "(empty body)");
    }
}
