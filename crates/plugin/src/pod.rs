//! What the plugin does with a pod: skip it, or capture it as a sidecar pod with a given
//! [`CaptureConfig`]; and whether it is an ambient pod.
//!
//! Pure functions over the pod object and the plugin configuration (§1.5 decision flow,
//! §1.7 redirect parameters). Side effects (fetching the pod, programming rules) happen in
//! the callers.
//!
//! IPv6 is *not* decided here: [`capture_config_from_pod`] leaves `enable_ipv6` false and the
//! apply layer sets it from the addresses it finds inside the pod netns, as Istio's
//! `FillConfigFromEnvironment` does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use meshcni_kube::{EnablementSelector, Pod};
use meshcni_rules::sidecar::CaptureConfig;

use crate::config::PluginConf;

/// The injected proxy container.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// The init container of non-CNI injection; its presence means the pod captures itself.
pub const ISTIO_INIT: &str = "istio-init";
/// Name prefix of the agent DaemonSet's pods.
pub const AGENT_POD_PREFIX: &str = "istio-cni-node-";
/// Name prefix of meshcni-agent DaemonSet pods.
pub const MESHCNI_AGENT_POD_PREFIX: &str = "meshcni-node-";

/// Set by the injector on every injected pod.
pub const ANN_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Injection opt-out (annotation, overridden by the label of the same name).
pub const KEY_INJECT: &str = "sidecar.istio.io/inject";
pub const ANN_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const ANN_INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const ANN_EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const ANN_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const ANN_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ANN_INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const ANN_EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const ANN_EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
/// Deprecated name of [`ANN_REROUTE_VIRTUAL_INTERFACES`].
pub const ANN_KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const ANN_REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// istio-proxy env: disables the proxy (proxyless pods).
pub const ENV_DISABLE_ENVOY: &str = "DISABLE_ENVOY";
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
pub const ENV_INVALID_DROP: &str = "INVALID_DROP";
pub const ENV_DUAL_STACK: &str = "ISTIO_DUAL_STACK";

/// Default proxy UID/GID.
pub const DEFAULT_PROXY_ID: &str = "1337";
/// Ports always excluded from inbound capture (status/metrics, health, Envoy Prometheus).
pub const ALWAYS_EXCLUDED_INBOUND_PORTS: &str = "15020,15021,15090";

/// The pod identity from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> PodRef<'a> {
    /// From the optional `CNI_ARGS` values; a missing one becomes empty, which
    /// [`skip_before_lookup`] reports as [`SkipReason::NotKubernetesPod`].
    pub fn from_cni_args(namespace: Option<&'a str>, name: Option<&'a str>) -> PodRef<'a> {
        PodRef {
            namespace: namespace.unwrap_or_default(),
            name: name.unwrap_or_default(),
        }
    }
}

/// Where the injection opt-out came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectSource {
    Annotation,
    Label,
}

/// Why the plugin lets a pod through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `K8S_POD_NAME`/`K8S_POD_NAMESPACE` missing.
    NotKubernetesPod,
    /// The agent's own pod (`istio-cni-node-*` in `pod_namespace`).
    OwnAgentPod,
    /// Namespace listed in `exclude_namespaces`.
    ExcludedNamespace(String),
    /// Host-network pod: it has no pod netns to capture.
    HostNetwork,
    /// A container named `istio-init` exists: the pod programs its own rules.
    IstioInitPresent,
    /// `DISABLE_ENVOY` on `istio-proxy` is true (proxyless).
    ProxyDisabled,
    /// No `istio-proxy` container or init container.
    NoIstioProxy,
    /// `istio-proxy` runs `proxy <type>` with a type other than `sidecar` (gateways).
    NotSidecarProxy(String),
    /// `sidecar.istio.io/inject` parses false.
    InjectionDisabled { source: InjectSource, value: String },
    /// No `sidecar.istio.io/status` annotation: the pod was not injected.
    NotInjected,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotKubernetesPod => {
                f.write_str("not a kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE)")
            }
            SkipReason::OwnAgentPod => f.write_str("pod of the node agent itself"),
            SkipReason::ExcludedNamespace(ns) => write!(f, "namespace {ns} is excluded"),
            SkipReason::HostNetwork => f.write_str("pod uses the host network"),
            SkipReason::IstioInitPresent => {
                write!(
                    f,
                    "pod has an {ISTIO_INIT} container and programs its own rules"
                )
            }
            SkipReason::ProxyDisabled => {
                write!(
                    f,
                    "{ENV_DISABLE_ENVOY} is true on {ISTIO_PROXY} (proxyless)"
                )
            }
            SkipReason::NoIstioProxy => write!(f, "pod has no {ISTIO_PROXY} container"),
            SkipReason::NotSidecarProxy(t) => {
                write!(f, "{ISTIO_PROXY} runs as proxy type {t:?}, not a sidecar")
            }
            SkipReason::InjectionDisabled { source, value } => {
                let src = match source {
                    InjectSource::Annotation => "annotation",
                    InjectSource::Label => "label",
                };
                write!(f, "{src} {KEY_INJECT}={value:?} disables injection")
            }
            SkipReason::NotInjected => {
                write!(
                    f,
                    "pod was not injected (no {ANN_SIDECAR_STATUS} annotation)"
                )
            }
        }
    }
}

/// The outcome for a pod on the sidecar path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Skip(SkipReason),
    /// Capture with this configuration (`enable_ipv6` still to be detected in the netns).
    Sidecar(Box<CaptureConfig>),
}

/// An invalid redirect annotation (fails ADD, §1.8): which key, which value, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pod annotation {key}={value:?}: {reason}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// Go `strconv.ParseBool`: `1 t T TRUE true True` / `0 f F FALSE false False`, else `None`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// HEAD own-agent shortcut: `istio-cni-node-*` in `pod_namespace`.
pub fn is_own_agent_pod(conf: &PluginConf, pod: PodRef<'_>) -> bool {
    (pod.name.starts_with(AGENT_POD_PREFIX) || pod.name.starts_with(MESHCNI_AGENT_POD_PREFIX))
        && pod.namespace == conf.pod_namespace
}

/// The skips decidable from `CNI_ARGS` alone, before any lookup (HEAD order: not a pod,
/// own agent pod, excluded namespace).
pub fn skip_before_lookup(conf: &PluginConf, pod: PodRef<'_>) -> Option<SkipReason> {
    if pod.name.is_empty() || pod.namespace.is_empty() {
        Some(SkipReason::NotKubernetesPod)
    } else if is_own_agent_pod(conf, pod) {
        Some(SkipReason::OwnAgentPod)
    } else if conf.is_namespace_excluded(pod.namespace) {
        Some(SkipReason::ExcludedNamespace(pod.namespace.to_string()))
    } else {
        None
    }
}

/// The sidecar-path skips that need the pod object (§1.5 G1 step 7, 1.19+ semantics),
/// checked in Istio's order; plus host-network pods.
pub fn sidecar_skip_reason(pod: &Pod) -> Option<SkipReason> {
    if pod.spec.host_network {
        return Some(SkipReason::HostNetwork);
    }
    if pod.has_container(ISTIO_INIT) {
        return Some(SkipReason::IstioInitPresent);
    }
    let proxy = pod.container(ISTIO_PROXY);
    if proxy
        .and_then(|c| c.env_value(ENV_DISABLE_ENVOY))
        .and_then(parse_go_bool)
        == Some(true)
    {
        return Some(SkipReason::ProxyDisabled);
    }
    let Some(proxy) = proxy else {
        return Some(SkipReason::NoIstioProxy);
    };
    if proxy.args.len() >= 2 && proxy.args[0] == "proxy" && proxy.args[1] != "sidecar" {
        return Some(SkipReason::NotSidecarProxy(proxy.args[1].clone()));
    }
    // The label, when present, overrides the annotation; unparseable values are ignored.
    let inject = match pod.label(KEY_INJECT) {
        Some(v) => Some((InjectSource::Label, v)),
        None => pod
            .annotation(KEY_INJECT)
            .map(|v| (InjectSource::Annotation, v)),
    };
    if let Some((source, value)) = inject
        && parse_go_bool(value) == Some(false)
    {
        return Some(SkipReason::InjectionDisabled {
            source,
            value: value.to_string(),
        });
    }
    if pod.annotation(ANN_SIDECAR_STATUS).is_none() {
        return Some(SkipReason::NotInjected);
    }
    None
}

/// Full sidecar-path decision for a fetched pod: the pre-lookup skips, the pod skips,
/// then the capture configuration (whose validation errors fail the ADD).
pub fn decide(conf: &PluginConf, args: PodRef<'_>, pod: &Pod) -> Result<Decision, AnnotationError> {
    if let Some(r) = skip_before_lookup(conf, args).or_else(|| sidecar_skip_reason(pod)) {
        return Ok(Decision::Skip(r));
    }
    Ok(Decision::Sidecar(Box::new(capture_config_from_pod(pod)?)))
}

/// HEAD `isAmbientPod`: not host-network, not a sidecar pod, and some enablement selector
/// matches the pod's and its namespace's labels.
pub fn is_ambient_pod(
    pod: &Pod,
    ns_labels: &BTreeMap<String, String>,
    selectors: &[EnablementSelector],
) -> bool {
    if pod.spec.host_network || pod.annotation(ANN_SIDECAR_STATUS).is_some() {
        return false;
    }
    selectors
        .iter()
        .any(|s| s.matches(&pod.metadata.labels, ns_labels))
}

/// Istio's inbound exclusion fix-up (all versions), on strings exactly as Go does it: trim,
/// add a `,` separator unless empty or already ending in one, append `15020,15021,15090`,
/// then drop duplicates keeping the first occurrence.
pub fn exclude_inbound_ports_fixup(value: &str) -> String {
    let mut s = value.trim().to_string();
    if !s.is_empty() && !s.ends_with(',') {
        s.push(',');
    }
    s.push_str(ALWAYS_EXCLUDED_INBOUND_PORTS);
    let mut seen: Vec<&str> = Vec::new();
    for p in s.split(',') {
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.join(",")
}

/// Build the capture configuration from the pod's annotations, `istio-proxy` env and
/// security context (§1.7). Every annotation value is validated; the first invalid one is
/// returned with its key, value and the reason.
///
/// Deliberate differences from Istio, all stricter-or-equal on what gets programmed:
/// whitespace around list elements is trimmed (Istio trims ports but not CIDRs); ports are
/// normalised to plain decimal; `*` is accepted only where the generator gives it a meaning
/// (`includeInboundPorts`, `includeOutboundIPRanges`) — in the other port lists Istio accepts
/// it and then fails to program `--dport *`. `enable_ipv6` stays false (detected later).
pub fn capture_config_from_pod(pod: &Pod) -> Result<CaptureConfig, AnnotationError> {
    let ann = |key: &str| pod.annotation(key);

    let interception_mode = match ann(ANN_INTERCEPTION_MODE) {
        None => "REDIRECT",
        Some(v @ ("REDIRECT" | "TPROXY")) => v,
        Some(v) => {
            return Err(err(
                ANN_INTERCEPTION_MODE,
                v,
                "interception mode must be REDIRECT or TPROXY (NONE is not supported with CNI capture)",
            ));
        }
    };

    let proxy = pod.container(ISTIO_PROXY);
    let sc = proxy.and_then(|c| c.security_context.as_ref());
    let id = |v: Option<i64>| match v {
        Some(id) if id != 0 => id.to_string(),
        _ => DEFAULT_PROXY_ID.to_string(),
    };

    let include_ip = ANN_INCLUDE_OUTBOUND_IP_RANGES;
    let exclude_ip = ANN_EXCLUDE_OUTBOUND_IP_RANGES;
    let exclude_inbound = port_list(
        ANN_EXCLUDE_INBOUND_PORTS,
        ann(ANN_EXCLUDE_INBOUND_PORTS),
        "15020",
        false,
    )?;
    // HEAD prefers the new key; the deprecated one is used only when the new one is absent.
    let reroute = match ann(ANN_REROUTE_VIRTUAL_INTERFACES) {
        Some(v) => iface_list(ANN_REROUTE_VIRTUAL_INTERFACES, Some(v))?,
        None => iface_list(ANN_KUBEVIRT_INTERFACES, ann(ANN_KUBEVIRT_INTERFACES))?,
    };

    let env_bool = |name: &str| -> bool {
        let Some(v) = proxy.and_then(|c| c.env_value(name)) else {
            return false;
        };
        parse_go_bool(v).unwrap_or_else(|| {
            tracing::warn!(pod = %pod.key(), env = name, value = v, "unparseable boolean in {ISTIO_PROXY} env, using false");
            false
        })
    };
    // The plugin cannot read the pod's resolv.conf, so DNS capture means all port-53 traffic.
    let dns = env_bool(ENV_DNS_CAPTURE);

    Ok(CaptureConfig {
        inbound_interception_mode: interception_mode.to_string(),
        proxy_uid: id(sc.and_then(|s| s.run_as_user)),
        proxy_gid: id(sc.and_then(|s| s.run_as_group)),
        outbound_ip_ranges_include: cidr_list(include_ip, ann(include_ip), "*", true)?,
        outbound_ip_ranges_exclude: cidr_list(exclude_ip, ann(exclude_ip), "", false)?,
        inbound_ports_include: port_list(
            ANN_INCLUDE_INBOUND_PORTS,
            ann(ANN_INCLUDE_INBOUND_PORTS),
            "*",
            true,
        )?,
        inbound_ports_exclude: exclude_inbound_ports_fixup(&exclude_inbound),
        outbound_ports_include: port_list(
            ANN_INCLUDE_OUTBOUND_PORTS,
            ann(ANN_INCLUDE_OUTBOUND_PORTS),
            "",
            false,
        )?,
        outbound_ports_exclude: port_list(
            ANN_EXCLUDE_OUTBOUND_PORTS,
            ann(ANN_EXCLUDE_OUTBOUND_PORTS),
            "15020",
            false,
        )?,
        exclude_interfaces: iface_list(ANN_EXCLUDE_INTERFACES, ann(ANN_EXCLUDE_INTERFACES))?,
        reroute_virtual_interfaces: reroute,
        redirect_dns: dns,
        capture_all_dns: dns,
        drop_invalid: env_bool(ENV_INVALID_DROP),
        dual_stack: env_bool(ENV_DUAL_STACK),
        // Detected inside the pod netns by the apply layer.
        enable_ipv6: false,
        ..CaptureConfig::default()
    })
}

fn err(key: &str, value: &str, reason: impl Into<String>) -> AnnotationError {
    AnnotationError {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Split a comma list into trimmed elements; reject empty elements and a `*` mixed into a list.
/// `Ok(None)` means the whole value is the wildcard.
fn elements<'a>(
    key: &str,
    value: &'a str,
    allow_wildcard: bool,
) -> Result<Option<Vec<&'a str>>, AnnotationError> {
    let trimmed = value.trim();
    if trimmed == "*" {
        return if allow_wildcard {
            Ok(None)
        } else {
            Err(err(
                key,
                value,
                "the wildcard \"*\" is not allowed for this annotation; list the values",
            ))
        };
    }
    if trimmed.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let mut out = Vec::new();
    for (i, e) in trimmed.split(',').map(str::trim).enumerate() {
        if e.is_empty() {
            return Err(err(
                key,
                value,
                format!("element {} is empty (stray comma)", i + 1),
            ));
        }
        if e == "*" {
            return Err(err(
                key,
                value,
                "\"*\" must be the whole value, not a list element",
            ));
        }
        out.push(e);
    }
    Ok(Some(out))
}

fn cidr_list(
    key: &str,
    value: Option<&str>,
    default: &str,
    allow_wildcard: bool,
) -> Result<String, AnnotationError> {
    let Some(value) = value else {
        return Ok(default.to_string());
    };
    let Some(elems) = elements(key, value, allow_wildcard)? else {
        return Ok("*".to_string());
    };
    for e in &elems {
        check_cidr(e).map_err(|why| err(key, value, format!("{e:?} is not a CIDR: {why}")))?;
    }
    Ok(elems.join(","))
}

/// Go `net.ParseCIDR` acceptance: `<ip>/<decimal prefix within the family's length>`.
fn check_cidr(s: &str) -> Result<(), String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| "missing /prefix-length".to_string())?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("prefix length {prefix:?} is not a decimal number"));
    }
    match prefix.parse::<u32>() {
        Ok(n) if n <= max => Ok(()),
        _ => Err(format!("prefix length {prefix} exceeds {max}")),
    }
}

fn port_list(
    key: &str,
    value: Option<&str>,
    default: &str,
    allow_wildcard: bool,
) -> Result<String, AnnotationError> {
    let Some(value) = value else {
        return Ok(default.to_string());
    };
    let Some(elems) = elements(key, value, allow_wildcard)? else {
        return Ok("*".to_string());
    };
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        // Go ParseUint(s, 10, 16): decimal digits only (no sign), value 0..=65535.
        let port = if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) {
            e.parse::<u16>().ok()
        } else {
            None
        };
        match port {
            Some(p) => out.push(p.to_string()),
            None => {
                return Err(err(
                    key,
                    value,
                    format!("{e:?} is not a port number in 0..65535"),
                ));
            }
        }
    }
    Ok(out.join(","))
}

fn iface_list(key: &str, value: Option<&str>) -> Result<String, AnnotationError> {
    let Some(value) = value else {
        return Ok(String::new());
    };
    let Some(elems) = elements(key, value, false)? else {
        return Ok(String::new());
    };
    for e in &elems {
        // Linux dev_valid_name(): 1..=15 bytes, not "." or "..", no '/', ':' or whitespace.
        let why = if e.len() > 15 {
            Some("longer than 15 bytes")
        } else if *e == "." || *e == ".." {
            Some("\".\" and \"..\" are not interface names")
        } else if e.contains(['/', ':']) || e.contains(char::is_whitespace) || e.contains('\0') {
            Some("contains '/', ':', whitespace or NUL")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(err(
                key,
                value,
                format!("{e:?} is not an interface name: {why}"),
            ));
        }
    }
    Ok(elems.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcni_kube::{Container, EnvVar, SecurityContext};

    /// A minimal injected sidecar pod (CNI mode: `istio-validation`, not `istio-init`).
    fn sidecar_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "app-1", "namespace": "default",
                "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"},
                "labels": {"app": "app"}
            },
            "spec": {
                "initContainers": [{"name": "istio-validation"}],
                "containers": [
                    {"name": "app"},
                    {"name": "istio-proxy", "args": ["proxy", "sidecar", "--domain", "x"],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
                ]
            }
        }))
        .expect("pod json")
    }

    fn proxy_mut(pod: &mut Pod) -> &mut Container {
        pod.spec
            .containers
            .iter_mut()
            .find(|c| c.name == ISTIO_PROXY)
            .expect("istio-proxy")
    }

    fn set_env(pod: &mut Pod, name: &str, value: &str) {
        proxy_mut(pod).env.push(EnvVar {
            name: name.into(),
            value: Some(value.into()),
        });
    }

    fn annotate(pod: &mut Pod, key: &str, value: &str) {
        pod.metadata.annotations.insert(key.into(), value.into());
    }

    fn conf(json: &str) -> PluginConf {
        PluginConf::from_json(json.as_bytes()).expect("conf")
    }

    #[test]
    fn go_parse_bool() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(t), Some(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(f), Some(false), "{f}");
        }
        for bad in ["", "yes", "no", "tRUE", " true", "2", "enabled"] {
            assert_eq!(parse_go_bool(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn skips_before_lookup() {
        let c = conf(
            r#"{"pod_namespace":"istio-system","exclude_namespaces":["kube-system"],
                "kubernetes":{"exclude_namespaces":["legacy-excluded"]}}"#,
        );
        let cases: &[(&str, &str, Option<SkipReason>)] = &[
            ("", "p", Some(SkipReason::NotKubernetesPod)),
            ("default", "", Some(SkipReason::NotKubernetesPod)),
            (
                "istio-system",
                "istio-cni-node-x7z2k",
                Some(SkipReason::OwnAgentPod),
            ),
            // Same prefix in another namespace is an ordinary pod.
            ("default", "istio-cni-node-x7z2k", None),
            ("istio-system", "istiod-5f4d", None),
            (
                "kube-system",
                "coredns-1",
                Some(SkipReason::ExcludedNamespace("kube-system".into())),
            ),
            (
                "legacy-excluded",
                "p",
                Some(SkipReason::ExcludedNamespace("legacy-excluded".into())),
            ),
            ("default", "p", None),
        ];
        assert_eq!(
            skip_before_lookup(&c, PodRef::from_cni_args(None, Some("p"))),
            Some(SkipReason::NotKubernetesPod)
        );
        for (ns, name, want) in cases {
            let got = skip_before_lookup(
                &c,
                PodRef {
                    namespace: ns,
                    name,
                },
            );
            assert_eq!(&got, want, "{ns}/{name}");
        }
    }

    #[test]
    fn sidecar_skip_reasons() {
        type Mutate = fn(&mut Pod);
        let cases: Vec<(&str, Mutate, Option<SkipReason>)> = vec![
            ("injected sidecar pod", |_| {}, None),
            (
                "host network",
                |p| p.spec.host_network = true,
                Some(SkipReason::HostNetwork),
            ),
            (
                "istio-init container",
                |p| {
                    p.spec.containers.push(Container {
                        name: ISTIO_INIT.into(),
                        ..Default::default()
                    })
                },
                Some(SkipReason::IstioInitPresent),
            ),
            (
                "istio-init init container",
                |p| {
                    p.spec.init_containers.push(Container {
                        name: ISTIO_INIT.into(),
                        ..Default::default()
                    })
                },
                Some(SkipReason::IstioInitPresent),
            ),
            (
                "DISABLE_ENVOY=true",
                |p| set_env(p, ENV_DISABLE_ENVOY, "true"),
                Some(SkipReason::ProxyDisabled),
            ),
            (
                "DISABLE_ENVOY=1",
                |p| set_env(p, ENV_DISABLE_ENVOY, "1"),
                Some(SkipReason::ProxyDisabled),
            ),
            (
                "DISABLE_ENVOY=false",
                |p| set_env(p, ENV_DISABLE_ENVOY, "false"),
                None,
            ),
            (
                "DISABLE_ENVOY unparseable",
                |p| set_env(p, ENV_DISABLE_ENVOY, "yes"),
                None,
            ),
            (
                "DISABLE_ENVOY last entry wins",
                |p| {
                    set_env(p, ENV_DISABLE_ENVOY, "true");
                    set_env(p, ENV_DISABLE_ENVOY, "false");
                },
                None,
            ),
            (
                "no istio-proxy",
                |p| p.spec.containers.retain(|c| c.name != ISTIO_PROXY),
                Some(SkipReason::NoIstioProxy),
            ),
            (
                "istio-proxy as native sidecar init container",
                |p| {
                    let proxy = p.spec.containers.remove(1);
                    p.spec.init_containers.push(Container {
                        restart_policy: Some("Always".into()),
                        ..proxy
                    });
                },
                None,
            ),
            (
                "gateway proxy",
                |p| proxy_mut(p).args = vec!["proxy".into(), "router".into()],
                Some(SkipReason::NotSidecarProxy("router".into())),
            ),
            (
                "proxy args without type",
                |p| proxy_mut(p).args = vec!["proxy".into()],
                None,
            ),
            (
                "non-proxy args",
                |p| proxy_mut(p).args = vec!["envoy".into(), "router".into()],
                None,
            ),
            (
                "inject annotation false",
                |p| annotate(p, KEY_INJECT, "false"),
                Some(SkipReason::InjectionDisabled {
                    source: InjectSource::Annotation,
                    value: "false".into(),
                }),
            ),
            (
                "inject annotation true",
                |p| annotate(p, KEY_INJECT, "true"),
                None,
            ),
            (
                "inject annotation unparseable",
                |p| annotate(p, KEY_INJECT, "no"),
                None,
            ),
            (
                "inject label false",
                |p| {
                    p.metadata.labels.insert(KEY_INJECT.into(), "F".into());
                },
                Some(SkipReason::InjectionDisabled {
                    source: InjectSource::Label,
                    value: "F".into(),
                }),
            ),
            (
                "label true overrides annotation false",
                |p| {
                    annotate(p, KEY_INJECT, "false");
                    p.metadata.labels.insert(KEY_INJECT.into(), "true".into());
                },
                None,
            ),
            (
                "unparseable label overrides annotation false",
                |p| {
                    annotate(p, KEY_INJECT, "false");
                    p.metadata
                        .labels
                        .insert(KEY_INJECT.into(), "enabled".into());
                },
                None,
            ),
            (
                "not injected",
                |p| {
                    p.metadata.annotations.remove(ANN_SIDECAR_STATUS);
                },
                Some(SkipReason::NotInjected),
            ),
            (
                "istio-init wins over missing status (Istio order)",
                |p| {
                    p.metadata.annotations.clear();
                    p.spec.init_containers.push(Container {
                        name: ISTIO_INIT.into(),
                        ..Default::default()
                    });
                },
                Some(SkipReason::IstioInitPresent),
            ),
        ];
        for (name, mutate, want) in cases {
            let mut pod = sidecar_pod();
            mutate(&mut pod);
            assert_eq!(sidecar_skip_reason(&pod), want, "{name}");
        }
    }

    #[test]
    fn decide_end_to_end() {
        let c = conf(r#"{"exclude_namespaces":["kube-system"]}"#);
        let pod = sidecar_pod();
        let args = PodRef {
            namespace: "default",
            name: "app-1",
        };
        let Ok(Decision::Sidecar(cfg)) = decide(&c, args, &pod) else {
            panic!("expected sidecar decision")
        };
        assert_eq!(cfg.proxy_uid, "1337");
        assert_eq!(
            decide(
                &c,
                PodRef {
                    namespace: "kube-system",
                    name: "app-1"
                },
                &pod
            ),
            Ok(Decision::Skip(SkipReason::ExcludedNamespace(
                "kube-system".into()
            )))
        );
        let mut not_injected = pod.clone();
        not_injected.metadata.annotations.clear();
        assert_eq!(
            decide(&c, args, &not_injected),
            Ok(Decision::Skip(SkipReason::NotInjected))
        );
        // Invalid annotations fail only pods that would be captured.
        let mut bad = pod.clone();
        annotate(&mut bad, ANN_INTERCEPTION_MODE, "NONE");
        assert!(decide(&c, args, &bad).is_err());
        bad.metadata.annotations.remove(ANN_SIDECAR_STATUS);
        assert_eq!(
            decide(&c, args, &bad),
            Ok(Decision::Skip(SkipReason::NotInjected))
        );
    }

    #[test]
    fn capture_defaults() {
        let cfg = capture_config_from_pod(&sidecar_pod()).expect("cfg");
        let want = CaptureConfig {
            inbound_interception_mode: "REDIRECT".into(),
            proxy_uid: "1337".into(),
            proxy_gid: "1337".into(),
            outbound_ip_ranges_include: "*".into(),
            outbound_ip_ranges_exclude: "".into(),
            inbound_ports_include: "*".into(),
            inbound_ports_exclude: "15020,15021,15090".into(),
            outbound_ports_include: "".into(),
            outbound_ports_exclude: "15020".into(),
            exclude_interfaces: "".into(),
            reroute_virtual_interfaces: "".into(),
            redirect_dns: false,
            capture_all_dns: false,
            drop_invalid: false,
            dual_stack: false,
            enable_ipv6: false,
            ..CaptureConfig::default()
        };
        assert_eq!(cfg, want);
        assert_eq!(cfg.proxy_port, "15001");
        cfg.validate().expect("generator accepts the defaults");
    }

    #[test]
    fn exclude_inbound_fixup_examples() {
        for (input, want) in [
            ("", "15020,15021,15090"),
            ("15020", "15020,15021,15090"),
            ("3333,4444", "3333,4444,15020,15021,15090"),
            ("  3333,4444  ", "3333,4444,15020,15021,15090"),
            ("6000,7000,", "6000,7000,15020,15021,15090"),
            ("15090,3333,15090", "15090,3333,15020,15021"),
            ("15021", "15021,15020,15090"),
            ("*", "*,15020,15021,15090"),
        ] {
            assert_eq!(exclude_inbound_ports_fixup(input), want, "{input:?}");
        }
    }

    /// (annotation, value, field of the result, expected field value)
    #[test]
    fn valid_annotations() {
        type Field = fn(&CaptureConfig) -> &str;
        let mode: Field = |c| &c.inbound_interception_mode;
        let inc_ip: Field = |c| &c.outbound_ip_ranges_include;
        let exc_ip: Field = |c| &c.outbound_ip_ranges_exclude;
        let inc_in: Field = |c| &c.inbound_ports_include;
        let exc_in: Field = |c| &c.inbound_ports_exclude;
        let inc_out: Field = |c| &c.outbound_ports_include;
        let exc_out: Field = |c| &c.outbound_ports_exclude;
        let exc_if: Field = |c| &c.exclude_interfaces;
        let virt: Field = |c| &c.reroute_virtual_interfaces;
        let cases: &[(&str, &str, Field, &str)] = &[
            (ANN_INTERCEPTION_MODE, "REDIRECT", mode, "REDIRECT"),
            (ANN_INTERCEPTION_MODE, "TPROXY", mode, "TPROXY"),
            (ANN_INCLUDE_OUTBOUND_IP_RANGES, "*", inc_ip, "*"),
            (ANN_INCLUDE_OUTBOUND_IP_RANGES, "", inc_ip, ""),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8",
                inc_ip,
                "10.0.0.0/8",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,2001:db8::/32",
                inc_ip,
                "10.0.0.0/8,2001:db8::/32",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.96.0.0/12, 10.244.0.0/16",
                inc_ip,
                "10.96.0.0/12,10.244.0.0/16",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.1/08",
                inc_ip,
                "10.0.0.1/08",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "::ffff:1.2.3.4/128",
                inc_ip,
                "::ffff:1.2.3.4/128",
            ),
            (
                ANN_EXCLUDE_OUTBOUND_IP_RANGES,
                "169.254.169.254/32",
                exc_ip,
                "169.254.169.254/32",
            ),
            (
                ANN_EXCLUDE_OUTBOUND_IP_RANGES,
                "0.0.0.0/0,::/0",
                exc_ip,
                "0.0.0.0/0,::/0",
            ),
            (ANN_INCLUDE_INBOUND_PORTS, "*", inc_in, "*"),
            (ANN_INCLUDE_INBOUND_PORTS, "", inc_in, ""),
            (ANN_INCLUDE_INBOUND_PORTS, "9080, 8080", inc_in, "9080,8080"),
            (ANN_INCLUDE_INBOUND_PORTS, "1,65535", inc_in, "1,65535"),
            (ANN_INCLUDE_INBOUND_PORTS, "080", inc_in, "80"),
            (
                ANN_EXCLUDE_INBOUND_PORTS,
                "3333,4444",
                exc_in,
                "3333,4444,15020,15021,15090",
            ),
            (ANN_EXCLUDE_INBOUND_PORTS, "", exc_in, "15020,15021,15090"),
            (
                ANN_EXCLUDE_INBOUND_PORTS,
                "15021,8000",
                exc_in,
                "15021,8000,15020,15090",
            ),
            (
                ANN_INCLUDE_OUTBOUND_PORTS,
                "32000,31000",
                inc_out,
                "32000,31000",
            ),
            (ANN_EXCLUDE_OUTBOUND_PORTS, "", exc_out, ""),
            (
                ANN_EXCLUDE_OUTBOUND_PORTS,
                "3306,5432",
                exc_out,
                "3306,5432",
            ),
            (ANN_EXCLUDE_INTERFACES, "net1,eth1", exc_if, "net1,eth1"),
            (
                ANN_EXCLUDE_INTERFACES,
                "not-istio-nic",
                exc_if,
                "not-istio-nic",
            ),
            (ANN_EXCLUDE_INTERFACES, "", exc_if, ""),
            (
                ANN_KUBEVIRT_INTERFACES,
                "k6t-eth0,tap0",
                virt,
                "k6t-eth0,tap0",
            ),
            (
                ANN_REROUTE_VIRTUAL_INTERFACES,
                "eth1, eth2",
                virt,
                "eth1,eth2",
            ),
            (
                ANN_EXCLUDE_INTERFACES,
                "abcdefghijklmno",
                exc_if,
                "abcdefghijklmno",
            ),
        ];
        for (key, value, field, want) in cases {
            let mut pod = sidecar_pod();
            annotate(&mut pod, key, value);
            let cfg = capture_config_from_pod(&pod)
                .unwrap_or_else(|e| panic!("{key}={value:?} rejected: {e}"));
            assert_eq!(field(&cfg), *want, "{key}={value:?}");
            // What we accept, the generator accepts.
            cfg.validate()
                .unwrap_or_else(|e| panic!("{key}={value:?}: generator rejects {cfg:?}: {e}"));
        }
    }

    /// Istio's validator (`ParseUint(s, 10, 16)`) accepts port 0; so do we. (The rules
    /// crate's generator currently rejects 0, so this is not cross-checked with it.)
    #[test]
    fn port_zero_accepted_like_istio() {
        let mut pod = sidecar_pod();
        annotate(&mut pod, ANN_INCLUDE_INBOUND_PORTS, "0,65535");
        let cfg = capture_config_from_pod(&pod).expect("cfg");
        assert_eq!(cfg.inbound_ports_include, "0,65535");
    }

    /// (annotation, value, phrase the reason must contain)
    #[test]
    fn invalid_annotations() {
        let cases: &[(&str, &str, &str)] = &[
            (ANN_INTERCEPTION_MODE, "NONE", "must be REDIRECT or TPROXY"),
            (
                ANN_INTERCEPTION_MODE,
                "redirect",
                "must be REDIRECT or TPROXY",
            ),
            (ANN_INTERCEPTION_MODE, "", "must be REDIRECT or TPROXY"),
            (ANN_INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33", "exceeds 32"),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "2001:db8::/129",
                "exceeds 128",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0",
                "missing /prefix-length",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/",
                "not a decimal number",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/+8",
                "not a decimal number",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.256/8",
                "not an IP address",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "010.0.0.0/8",
                "not an IP address",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "example.com/32",
                "not an IP address",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "10.0.0.0/8,",
                "element 2 is empty",
            ),
            (
                ANN_INCLUDE_OUTBOUND_IP_RANGES,
                "*,10.0.0.0/8",
                "whole value",
            ),
            (ANN_EXCLUDE_OUTBOUND_IP_RANGES, "*", "not allowed"),
            (
                ANN_EXCLUDE_OUTBOUND_IP_RANGES,
                "1.1.1.1/32,,2.2.2.2/32",
                "element 2 is empty",
            ),
            (ANN_INCLUDE_INBOUND_PORTS, "65536", "not a port number"),
            (ANN_INCLUDE_INBOUND_PORTS, "-1", "not a port number"),
            (ANN_INCLUDE_INBOUND_PORTS, "+80", "not a port number"),
            (ANN_INCLUDE_INBOUND_PORTS, "80-90", "not a port number"),
            (ANN_INCLUDE_INBOUND_PORTS, "http", "not a port number"),
            (ANN_INCLUDE_INBOUND_PORTS, "80,*", "whole value"),
            (ANN_EXCLUDE_INBOUND_PORTS, "3333,", "element 2 is empty"),
            (ANN_EXCLUDE_INBOUND_PORTS, "*", "not allowed"),
            (ANN_EXCLUDE_INBOUND_PORTS, "99999", "not a port number"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "abc", "not a port number"),
            (ANN_INCLUDE_OUTBOUND_PORTS, "*", "not allowed"),
            (ANN_EXCLUDE_OUTBOUND_PORTS, "*", "not allowed"),
            (ANN_EXCLUDE_OUTBOUND_PORTS, "1e3", "not a port number"),
            (
                ANN_EXCLUDE_INTERFACES,
                "abcdefghijklmnop",
                "longer than 15 bytes",
            ),
            (ANN_EXCLUDE_INTERFACES, "eth0:1", "contains '/', ':'"),
            (ANN_EXCLUDE_INTERFACES, "a/b", "contains '/', ':'"),
            (ANN_EXCLUDE_INTERFACES, "..", "not interface names"),
            (ANN_EXCLUDE_INTERFACES, "eth0,,eth1", "element 2 is empty"),
            (ANN_EXCLUDE_INTERFACES, "*", "not allowed"),
            (ANN_KUBEVIRT_INTERFACES, "tap 0", "whitespace"),
            (ANN_REROUTE_VIRTUAL_INTERFACES, "a:b", "contains '/', ':'"),
        ];
        for (key, value, want) in cases {
            let mut pod = sidecar_pod();
            annotate(&mut pod, key, value);
            let e = capture_config_from_pod(&pod)
                .expect_err(&format!("{key}={value:?} must be rejected"));
            assert_eq!(e.key, *key);
            assert_eq!(e.value, *value);
            assert!(
                e.reason.contains(want),
                "{key}={value:?}: {:?} lacks {want:?}",
                e.reason
            );
            let msg = e.to_string();
            assert!(
                msg.contains(key) && msg.contains(&format!("{value:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn reroute_virtual_interfaces_preferred_over_kubevirt() {
        let mut pod = sidecar_pod();
        annotate(&mut pod, ANN_KUBEVIRT_INTERFACES, "old0");
        annotate(&mut pod, ANN_REROUTE_VIRTUAL_INTERFACES, "new0,new1");
        assert_eq!(
            capture_config_from_pod(&pod)
                .expect("cfg")
                .reroute_virtual_interfaces,
            "new0,new1"
        );
        // The deprecated key is not validated when the new one wins.
        annotate(&mut pod, ANN_KUBEVIRT_INTERFACES, "bad name");
        assert!(capture_config_from_pod(&pod).is_ok());
        pod.metadata
            .annotations
            .remove(ANN_REROUTE_VIRTUAL_INTERFACES);
        assert!(capture_config_from_pod(&pod).is_err());
    }

    #[test]
    fn proxy_uid_gid_from_security_context() {
        let cases: &[(Option<SecurityContext>, &str, &str)] = &[
            (None, "1337", "1337"),
            (
                Some(SecurityContext {
                    run_as_user: None,
                    run_as_group: None,
                }),
                "1337",
                "1337",
            ),
            (
                Some(SecurityContext {
                    run_as_user: Some(0),
                    run_as_group: Some(0),
                }),
                "1337",
                "1337",
            ),
            (
                Some(SecurityContext {
                    run_as_user: Some(1000),
                    run_as_group: None,
                }),
                "1000",
                "1337",
            ),
            (
                Some(SecurityContext {
                    run_as_user: None,
                    run_as_group: Some(2000),
                }),
                "1337",
                "2000",
            ),
            (
                Some(SecurityContext {
                    run_as_user: Some(1000670000),
                    run_as_group: Some(1000670000),
                }),
                "1000670000",
                "1000670000",
            ),
        ];
        for (sc, uid, gid) in cases {
            let mut pod = sidecar_pod();
            proxy_mut(&mut pod).security_context = sc.clone();
            let cfg = capture_config_from_pod(&pod).expect("cfg");
            assert_eq!(
                (cfg.proxy_uid.as_str(), cfg.proxy_gid.as_str()),
                (*uid, *gid),
                "{sc:?}"
            );
        }
        // Without an istio-proxy container at all, the defaults apply.
        let mut pod = sidecar_pod();
        pod.spec.containers.retain(|c| c.name != ISTIO_PROXY);
        let cfg = capture_config_from_pod(&pod).expect("cfg");
        assert_eq!(
            (cfg.proxy_uid.as_str(), cfg.proxy_gid.as_str()),
            ("1337", "1337")
        );
    }

    /// (env name, value, redirect_dns, capture_all_dns, drop_invalid, dual_stack)
    #[test]
    fn proxy_env_switches() {
        let cases: &[(&str, &str, bool, bool, bool, bool)] = &[
            (ENV_DNS_CAPTURE, "true", true, true, false, false),
            (ENV_DNS_CAPTURE, "1", true, true, false, false),
            (ENV_DNS_CAPTURE, "false", false, false, false, false),
            (ENV_DNS_CAPTURE, "yes", false, false, false, false),
            (ENV_INVALID_DROP, "true", false, false, true, false),
            (ENV_INVALID_DROP, "garbage", false, false, false, false),
            (ENV_DUAL_STACK, "True", false, false, false, true),
            (ENV_DUAL_STACK, "", false, false, false, false),
        ];
        for (name, value, dns, all, drop, dual) in cases {
            let mut pod = sidecar_pod();
            set_env(&mut pod, name, value);
            let cfg = capture_config_from_pod(&pod).expect("cfg");
            assert_eq!(
                (
                    cfg.redirect_dns,
                    cfg.capture_all_dns,
                    cfg.drop_invalid,
                    cfg.dual_stack
                ),
                (*dns, *all, *drop, *dual),
                "{name}={value:?}"
            );
            assert!(!cfg.enable_ipv6, "IPv6 is decided in the netns");
        }
    }

    #[test]
    fn env_on_other_containers_is_ignored() {
        let mut pod = sidecar_pod();
        pod.spec.containers[0].env.push(EnvVar {
            name: ENV_DNS_CAPTURE.into(),
            value: Some("true".into()),
        });
        pod.spec.containers[0].env.push(EnvVar {
            name: ENV_DISABLE_ENVOY.into(),
            value: Some("true".into()),
        });
        assert_eq!(sidecar_skip_reason(&pod), None);
        assert!(!capture_config_from_pod(&pod).expect("cfg").redirect_dns);
    }

    #[test]
    fn ambient_detection() {
        let defaults = EnablementSelector::istio_defaults();
        let ambient_ns: BTreeMap<String, String> =
            [("istio.io/dataplane-mode".to_string(), "ambient".to_string())].into();
        let plain_ns = BTreeMap::new();
        let plain_pod = || -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ambient-demo", "labels": {"app": "p"}},
                "spec": {"containers": [{"name": "app"}]}
            }))
            .expect("pod")
        };
        type Mutate = fn(&mut Pod);
        let cases: Vec<(&str, Mutate, bool, bool)> = vec![
            // (name, mutation, in ambient namespace?, expected)
            ("plain pod, ambient namespace", |_| {}, true, true),
            ("plain pod, plain namespace", |_| {}, false, false),
            (
                "pod opt-in, plain namespace",
                |p| {
                    p.metadata
                        .labels
                        .insert("istio.io/dataplane-mode".into(), "ambient".into());
                },
                false,
                true,
            ),
            (
                "pod opt-out, ambient namespace",
                |p| {
                    p.metadata
                        .labels
                        .insert("istio.io/dataplane-mode".into(), "none".into());
                },
                true,
                false,
            ),
            ("host network", |p| p.spec.host_network = true, true, false),
            (
                "sidecar-injected pod",
                |p| {
                    p.metadata
                        .annotations
                        .insert(ANN_SIDECAR_STATUS.into(), "{}".into());
                },
                true,
                false,
            ),
        ];
        for (name, mutate, in_ambient_ns, want) in cases {
            let mut pod = plain_pod();
            mutate(&mut pod);
            let ns = if in_ambient_ns {
                &ambient_ns
            } else {
                &plain_ns
            };
            assert_eq!(is_ambient_pod(&pod, ns, &defaults), want, "{name}");
        }
        // No selectors: nothing is ambient; an empty selector: everything (non-sidecar) is.
        assert!(!is_ambient_pod(&plain_pod(), &ambient_ns, &[]));
        assert!(is_ambient_pod(
            &plain_pod(),
            &plain_ns,
            &[EnablementSelector::default()]
        ));
    }
}
