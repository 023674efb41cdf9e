//! The kubeconfig the plugin uses to reach the API server (spec §5.4): rendered from the
//! service-account token and CA exactly as client-go's v1 `Config` comes out of
//! sigs.k8s.io/yaml (keys sorted, 2-space indent, block sequences not indented under their
//! key), without the `preferences: {}` that only 1.19/1.20 emitted.

/// Inputs of the kubeconfig, already read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigInputs<'a> {
    /// `KUBERNETES_SERVICE_PROTOCOL`; empty means `https`.
    pub protocol: &'a str,
    pub host: &'a str,
    pub port: &'a str,
    /// PEM bytes of the CA; ignored when `skip_tls_verify`.
    pub ca: Option<&'a [u8]>,
    pub skip_tls_verify: bool,
    /// Raw content of the service-account token file.
    pub token: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KubeconfigError {
    #[error("KUBERNETES_SERVICE_HOST not set (is this not running within a pod?)")]
    HostNotSet,
    #[error("KUBERNETES_SERVICE_PORT not set (is this not running within a pod?)")]
    PortNotSet,
    #[error("no CA certificate given and TLS verification is not skipped")]
    NoCa,
}

/// `net.JoinHostPort`: bracket hosts that contain a colon (IPv6).
pub fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Render the kubeconfig YAML.
pub fn render(inp: &KubeconfigInputs<'_>) -> Result<String, KubeconfigError> {
    if inp.host.is_empty() {
        return Err(KubeconfigError::HostNotSet);
    }
    if inp.port.is_empty() {
        return Err(KubeconfigError::PortNotSet);
    }
    let protocol = if inp.protocol.is_empty() {
        "https"
    } else {
        inp.protocol
    };
    let server = format!("{protocol}://{}", join_host_port(inp.host, inp.port));
    let mut y = String::with_capacity(2048);
    y.push_str("apiVersion: v1\nclusters:\n- cluster:\n");
    if inp.skip_tls_verify {
        y.push_str("    insecure-skip-tls-verify: true\n");
    } else {
        use base64::Engine as _;
        let ca = inp.ca.ok_or(KubeconfigError::NoCa)?;
        let data = base64::engine::general_purpose::STANDARD.encode(ca);
        y.push_str(&format!("    certificate-authority-data: {data}\n"));
    }
    y.push_str(&format!("    server: {}\n", yaml_scalar(&server)));
    y.push_str("  name: local\ncontexts:\n- context:\n    cluster: local\n    user: istio-cni\n");
    y.push_str("  name: istio-cni-context\ncurrent-context: istio-cni-context\nkind: Config\n");
    y.push_str("users:\n- name: istio-cni\n  user:\n");
    y.push_str(&format!("    token: {}\n", yaml_scalar(inp.token)));
    Ok(y)
}

/// A YAML scalar for a string value: plain when go-yaml would write it plain (no indicator
/// at the start, no `: `/` #`, nothing that resolves to another type), else double-quoted
/// with JSON-compatible escapes (valid YAML in every case).
fn yaml_scalar(s: &str) -> String {
    if plain_ok(s) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if "-?:,[]{}#&*!|>'\"%@`".contains(first) || first == ' ' || s.ends_with(' ') {
        return false;
    }
    if s.contains(": ") || s.contains(" #") || s.ends_with(':') {
        return false;
    }
    if s.chars().any(|c| c.is_control() || c == '\u{feff}') {
        return false;
    }
    // Strings that YAML 1.1 would resolve to bool/null/number must be quoted.
    let lower = s.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~"
    ) {
        return false;
    }
    let has_digit = s.bytes().any(|b| b.is_ascii_digit());
    let unsigned = s.trim_start_matches(['+', '-']);
    let numeric = s.parse::<f64>().is_ok()
        || s.replace('_', "").parse::<f64>().is_ok()
        || unsigned.starts_with("0x") && unsigned[2..].bytes().all(|b| b.is_ascii_hexdigit())
        || unsigned.starts_with("0o") && unsigned[2..].bytes().all(|b| (b'0'..=b'7').contains(&b))
        || unsigned.starts_with("0b") && unsigned[2..].bytes().all(|b| b == b'0' || b == b'1');
    if has_digit && numeric {
        return false;
    }
    if lower == ".inf" || lower == "-.inf" || lower == "+.inf" || lower == ".nan" {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let y = render(&KubeconfigInputs {
            protocol: "",
            host: "fd00::1",
            port: "6443",
            ca: None,
            skip_tls_verify: true,
            token: "t",
        })
        .expect("render");
        assert!(y.contains("    server: https://[fd00::1]:6443\n"), "{y}");
    }

    #[test]
    fn odd_tokens_are_quoted() {
        assert_eq!(yaml_scalar("abc.def-_x"), "abc.def-_x");
        assert_eq!(yaml_scalar("true"), "\"true\"");
        assert_eq!(yaml_scalar("12345"), "\"12345\"");
        assert_eq!(yaml_scalar("tok\n"), "\"tok\\n\"");
        assert_eq!(yaml_scalar(""), "\"\"");
        assert_eq!(yaml_scalar("-x"), "\"-x\"");
    }

    #[test]
    fn errors() {
        let mut i = KubeconfigInputs {
            protocol: "",
            host: "",
            port: "",
            ca: None,
            skip_tls_verify: false,
            token: "t",
        };
        assert_eq!(render(&i), Err(KubeconfigError::HostNotSet));
        i.host = "h";
        assert_eq!(render(&i), Err(KubeconfigError::PortNotSet));
        i.port = "1";
        assert_eq!(render(&i), Err(KubeconfigError::NoCa));
    }
}
