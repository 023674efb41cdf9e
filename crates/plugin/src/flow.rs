//! The CNI commands. ADD: identify the pod from `CNI_ARGS`, look it up (Kubernetes API or the
//! local metadata dir), decide (spec §1.5 HEAD), then either hand an ambient pod to the agent,
//! apply sidecar capture atomically inside the pod netns, or change nothing — and always pass
//! the `prevResult` on, converted to the config's `cniVersion` (§1.4). A repeated ADD is
//! verify-or-repair (rules already in place are left alone, drifted ones replaced atomically).
//! CHECK takes ADD's decision path and compares a sidecar pod's netns with what ADD installs,
//! read-only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use meshcni_cni::{CniError, Context, Plugin};
use meshcni_kube::{
    ApiClient, ClientOptions, KubeError, LocalPodSource, Namespace, Pod, PodSource, RetryOn,
    RetryPolicy,
};
use meshcni_netx::nft::NftTable;
use meshcni_netx::{
    Applier, ApplyPlan, Backend, IptablesFlavor, IptablesOptions, Ownership, RoutesPlan,
    RulesOutcome, TproxyRouting,
};
use meshcni_rules::iptables::{self, Family};
use meshcni_rules::sidecar::{self, CaptureConfig};
use meshcni_rules::{nft, save_form};
use serde_json::Value;
use tracing::{info, warn};

use crate::agent_client::{self, CmdAddEvent, EventAddr, EventIp};
use crate::config::{FailurePolicy, IptablesBinary, PluginConf, RuleBackend};
use crate::pod::{self, Decision, PodRef};

/// Plugin-specific error codes (the spec reserves 0–99).
pub mod codes {
    /// The pod (or its namespace) could not be read from the API / metadata dir.
    pub const POD_LOOKUP_FAILED: u32 = 100;
    /// A pod annotation (or proxy env) holds an invalid value.
    pub const INVALID_POD_CONFIG: u32 = 101;
    /// Programming the capture rules in the pod netns failed (nothing was left applied).
    pub const APPLY_FAILED: u32 = 102;
    /// The node agent could not be reached or refused an ambient pod (fail closed).
    pub const AGENT_FAILED: u32 = 103;
    /// CHECK: the pod netns's capture rules/routes are missing or differ from what ADD installs
    /// (or could not be read).
    pub const CAPTURE_MISMATCH: u32 = 104;
}

/// How long the agent may take to capture an ambient pod (Istio: 5 s).
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The `meshcni` CNI plugin.
#[derive(Debug, Default)]
pub struct MeshPlugin;

impl Plugin for MeshPlugin {
    fn add(&self, ctx: &Context) -> Result<Value, CniError> {
        let conf = load_conf(ctx)?;
        // Converted up front (Istio does it while parsing the config): a prevResult that cannot
        // be passed on must fail the ADD before anything is applied, not after.
        let result = ctx.pass_through()?;
        let pod_ref = pod_ref_of(ctx, &conf);
        let cfg = match pod_action(&conf, pod_ref, "ADD")? {
            PodAction::Leave => return Ok(result),
            PodAction::Ambient => {
                enroll_ambient(ctx, &conf, pod_ref)?;
                info!(pod = %format_ref(pod_ref), "ambient pod handed to the node agent");
                return Ok(result);
            }
            PodAction::Sidecar(cfg) => *cfg,
        };
        let netns =
            ctx.env.netns.as_deref().ok_or_else(|| {
                CniError::invalid_environment("CNI_NETNS is required for ADD", "")
            })?;
        let applied = apply_sidecar(&conf, netns, cfg).map_err(|e| e.with_pod(pod_ref))?;
        let what = match applied.rules {
            RulesOutcome::Installed => "sidecar capture applied",
            RulesOutcome::Unchanged => "sidecar capture already in place",
            RulesOutcome::Repaired => "sidecar capture repaired",
        };
        info!(pod = %format_ref(pod_ref), netns = %netns.display(), backend = ?applied.backend,
            flavor = ?applied.flavor, routes_created = applied.routes_created, "{what}");
        Ok(result)
    }

    /// Sidecar rules live and die with the pod netns; ambient teardown is the agent's job (it
    /// watches pods), exactly as the reference. DEL therefore changes nothing and is
    /// idempotent, including the runtime's repeated DEL with an empty `CNI_NETNS`. Like Istio's
    /// it never fails on the plugin's own fields: a configuration broken after pods started
    /// fails ADD, but must not block their teardown (it is logged).
    fn del(&self, ctx: &Context) -> Result<(), CniError> {
        if let Err(e) = load_conf(ctx) {
            crate::logging::init(crate::config::LogLevel::Info);
            warn!(error = %e, "ignoring an invalid plugin configuration on DEL");
        }
        Ok(())
    }

    /// Validates the configuration, then, for a sidecar pod, compares the netns with what ADD
    /// would install (same decision path: pod lookup, annotations, IPv6 detection): iptables
    /// chains and rules (normalised `-save` output of our chains and of our rules in built-in
    /// chains) or the nft tables' listing, plus the TPROXY ip rules/routes and `::6` on `lo`.
    /// Any difference fails with [`codes::CAPTURE_MISMATCH`] naming it. Read-only: the netns is
    /// never changed (expected forms are computed in a throwaway netns).
    ///
    /// Passes without looking at the netns for pods ADD leaves alone (non-mesh, excluded
    /// namespaces, opted out) and for ambient pods: their capture is programmed by the node
    /// agent, which CHECK does not inspect.
    fn check(&self, ctx: &Context) -> Result<(), CniError> {
        let conf = load_conf(ctx)?;
        let pod_ref = pod_ref_of(ctx, &conf);
        let cfg = match pod_action(&conf, pod_ref, "CHECK")? {
            // Ambient pods are the node agent's; CHECK does not inspect them.
            PodAction::Leave | PodAction::Ambient => return Ok(()),
            PodAction::Sidecar(cfg) => *cfg,
        };
        let netns =
            ctx.env.netns.as_deref().ok_or_else(|| {
                CniError::invalid_environment("CNI_NETNS is required for CHECK", "")
            })?;
        check_sidecar(&conf, netns, cfg).map_err(|e| e.with_pod(pod_ref))?;
        info!(pod = %format_ref(pod_ref), netns = %netns.display(), "sidecar capture checked: in place");
        Ok(())
    }

    /// Ready when the plugin can do an ADD: its pod metadata source is usable and, with ambient
    /// on, the agent's socket exists.
    fn status(&self, ctx: &Context) -> Result<(), CniError> {
        let conf = load_conf(ctx)?;
        match &conf.pod_metadata_dir {
            Some(dir) if !dir.is_dir() => {
                return Err(CniError::new(
                    CniError::PLUGIN_NOT_AVAILABLE,
                    "pod metadata directory is missing",
                    dir.display().to_string(),
                ));
            }
            Some(_) => {}
            None => {
                let kubeconfig = kubeconfig_path(&conf);
                if let Err(e) = std::fs::metadata(&kubeconfig) {
                    return Err(CniError::new(
                        CniError::PLUGIN_NOT_AVAILABLE,
                        "plugin kubeconfig is not readable (is meshcni-agent running?)",
                        format!("{}: {e}", kubeconfig.display()),
                    ));
                }
            }
        }
        if conf.ambient_enabled {
            let sock = conf.agent_event_socket();
            if !sock.exists() {
                return Err(CniError::new(
                    CniError::PLUGIN_NOT_AVAILABLE,
                    "node agent socket is missing (is meshcni-agent running?)",
                    sock.display().to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Sidecar mode keeps no state outside the pod netns, so there is nothing to collect.
    fn gc(&self, ctx: &Context) -> Result<(), CniError> {
        load_conf(ctx).map(|_| ())
    }

    fn about(&self) -> &str {
        "meshcni: chained CNI plugin capturing pod traffic into the service mesh"
    }
}

/// What ADD does for a pod (CHECK follows the same path, so it checks exactly what ADD would
/// have installed).
enum PodAction {
    /// Not captured by the plugin (the reason is logged).
    Leave,
    /// An ambient pod: the node agent captures it.
    Ambient,
    /// A sidecar pod: capture with this configuration.
    Sidecar(Box<CaptureConfig>),
}

/// The pod of this request. podman passes only `K8S_POD_NAME`: with a local metadata dir such
/// a pod lives in the configured default namespace (see `PluginConf::default_pod_namespace`).
fn pod_ref_of<'a>(ctx: &'a Context, conf: &'a PluginConf) -> PodRef<'a> {
    let args = &ctx.env.args;
    let namespace = args
        .k8s_pod_namespace()
        .or_else(|| args.k8s_pod_name().and(conf.default_pod_namespace()));
    PodRef::from_cni_args(namespace, args.k8s_pod_name())
}

/// The decision path of ADD and CHECK (`verb` only labels the logs): early skips, the pod
/// lookup (without Kubernetes, a pod without a metadata file is not a mesh pod), ambient
/// detection under the failure policy, then the sidecar decision from the pod's annotations.
fn pod_action(conf: &PluginConf, pod_ref: PodRef<'_>, verb: &str) -> Result<PodAction, CniError> {
    if let Some(reason) = pod::skip_before_lookup(conf, pod_ref) {
        info!(pod = %format_ref(pod_ref), %reason, verb, "not capturing");
        return Ok(PodAction::Leave);
    }
    let source = pod_source(conf)?;
    // Hosts without Kubernetes: read once here, reused by the sidecar decision below.
    let local_pod = match conf.pod_metadata_dir {
        Some(_) => match local_metadata(&*source, pod_ref)? {
            Some(pod) => Some(pod),
            None => return Ok(PodAction::Leave),
        },
        None => None,
    };
    if conf.ambient_enabled {
        match ambient_check(conf, &*source, pod_ref) {
            Ok(true) => return Ok(PodAction::Ambient),
            Ok(false) => {}
            Err(e) => match conf.ambient_failure_policy() {
                FailurePolicy::Closed => {
                    return Err(CniError::new(
                        codes::POD_LOOKUP_FAILED,
                        format!(
                            "cannot decide whether pod {} is an ambient pod \
                             (ambient_detection_failure_policy=closed)",
                            format_ref(pod_ref)
                        ),
                        e.to_string(),
                    ));
                }
                FailurePolicy::Open => warn!(pod = %format_ref(pod_ref), error = %e, verb,
                    "ambient detection failed; treating the pod as non-ambient \
                     (ambient_detection_failure_policy=open)"),
            },
        }
    }
    let pod = match local_pod {
        Some(pod) => pod,
        None => fetch_pod(conf, &*source, pod_ref)?,
    };
    match pod::decide(conf, pod_ref, &pod) {
        Ok(Decision::Skip(reason)) => {
            info!(pod = %format_ref(pod_ref), %reason, verb, "not capturing");
            Ok(PodAction::Leave)
        }
        Ok(Decision::Sidecar(cfg)) => Ok(PodAction::Sidecar(cfg)),
        Err(e) => Err(CniError::new(
            codes::INVALID_POD_CONFIG,
            format!(
                "invalid capture configuration for pod {}",
                format_ref(pod_ref)
            ),
            e.to_string(),
        )),
    }
}

fn load_conf(ctx: &Context) -> Result<PluginConf, CniError> {
    let conf = PluginConf::from_json(&ctx.stdin).map_err(|e| {
        CniError::invalid_config("invalid meshcni plugin configuration", e.to_string())
    })?;
    crate::logging::init(conf.log_level());
    Ok(conf)
}

fn format_ref(p: PodRef<'_>) -> String {
    format!("{}/{}", p.namespace, p.name)
}

fn lookup_error(p: PodRef<'_>, e: &KubeError) -> CniError {
    CniError::new(
        codes::POD_LOOKUP_FAILED,
        format!("cannot read pod {} metadata", format_ref(p)),
        e.to_string(),
    )
}

/// The Kubernetes API (kubeconfig from the plugin config) or, when configured, the local
/// pod-metadata directory used on hosts without Kubernetes.
fn pod_source(conf: &PluginConf) -> Result<Box<dyn PodSource>, CniError> {
    if let Some(dir) = &conf.pod_metadata_dir {
        return Ok(Box::new(LocalPodSource::new(dir.clone())));
    }
    let path = kubeconfig_path(conf);
    let client = ApiClient::from_kubeconfig(&path, ClientOptions::default()).map_err(|e| {
        CniError::new(
            codes::POD_LOOKUP_FAILED,
            "cannot build the Kubernetes client from the plugin kubeconfig",
            e.to_string(),
        )
    })?;
    Ok(Box::new(client))
}

/// `kubernetes.kubeconfig` when set; otherwise the file the agent writes into its run dir
/// (`meshcni-kubeconfig`, or Istio's `istio-cni-kubeconfig` for configs written by istio-cni).
fn kubeconfig_path(conf: &PluginConf) -> PathBuf {
    if !conf.kubernetes.kubeconfig.is_empty() {
        return conf.kubeconfig_path();
    }
    let ours = conf.agent_run_dir().join("meshcni-kubeconfig");
    if ours.exists() {
        ours
    } else {
        conf.kubeconfig_path()
    }
}

/// Hosts without Kubernetes (local metadata dir): the pod, or `None` when it has no metadata
/// file — then it is not a mesh pod (logged with the file looked for); a file that exists but cannot be
/// read or parsed fails the ADD naming the file. Names that cannot be Kubernetes names (podman
/// container names may hold `_` or capitals) cannot have a file either.
fn local_metadata(source: &dyn PodSource, p: PodRef<'_>) -> Result<Option<Pod>, CniError> {
    match source.get_pod(p.namespace, p.name) {
        Ok(pod) => Ok(Some(pod)),
        Err(KubeError::MissingFile { path, .. }) => {
            info!(pod = %format_ref(p), path = %path.display(),
                "no pod metadata file: not a mesh pod, not capturing");
            Ok(None)
        }
        Err(e @ KubeError::InvalidName { .. }) => {
            info!(pod = %format_ref(p), reason = %e,
                "pod name cannot have a metadata file: not a mesh pod, not capturing");
            Ok(None)
        }
        Err(e) => Err(lookup_error(p, &e)),
    }
}

/// Ambient detection (HEAD): pod + namespace lookups, then the enablement selectors.
fn ambient_check(
    conf: &PluginConf,
    source: &dyn PodSource,
    p: PodRef<'_>,
) -> Result<bool, KubeError> {
    let policy = RetryPolicy {
        attempts: if conf.enable_ambient_detection_retry {
            30
        } else {
            2
        },
        interval: Duration::from_secs(1),
        retry_on: RetryOn::Any,
    };
    let local = conf.pod_metadata_dir.is_some();
    let (pod, ns): (Pod, Namespace) = policy.run(
        |_| {
            let pod = source.get_pod(p.namespace, p.name)?;
            let ns = match source.get_namespace(p.namespace) {
                // Without Kubernetes a namespace exists only as a name: no file, no labels.
                Err(KubeError::MissingFile { .. }) if local => Namespace::default(),
                other => other?,
            };
            Ok((pod, ns))
        },
        |_, _| true,
    )?;
    Ok(pod::is_ambient_pod(
        &pod,
        &ns.metadata.labels,
        &conf.enablement_selectors(),
    ))
}

fn enroll_ambient(ctx: &Context, conf: &PluginConf, p: PodRef<'_>) -> Result<(), CniError> {
    let result = ctx.conf.prev_result_typed()?;
    let ips: Vec<EventIp> = result
        .iter()
        .flat_map(|r| r.ips_on_interface(&ctx.env.ifname))
        .map(|ip| EventIp {
            interface: 0,
            address: EventAddr {
                ip: ip.address.addr().to_string(),
                mask: base64::engine::general_purpose::STANDARD
                    .encode(mask_bytes(ip.address.netmask())),
            },
            gateway: ip.gateway.map(|g| g.to_string()),
        })
        .collect();
    let event = CmdAddEvent {
        netns: ctx
            .env
            .netns
            .as_ref()
            .map(|n| n.display().to_string())
            .unwrap_or_default(),
        pod_name: p.name.to_string(),
        pod_namespace: p.namespace.to_string(),
        ips,
        pod_uid: ctx.env.args.k8s_pod_uid().map(str::to_string),
    };
    agent_client::push_cmdadd(&conf.agent_event_socket(), &event, AGENT_TIMEOUT).map_err(|e| {
        CniError::new(
            codes::AGENT_FAILED,
            format!(
                "cannot enroll ambient pod {}: node agent unavailable",
                format_ref(p)
            ),
            e.to_string(),
        )
    })
}

fn mask_bytes(mask: IpAddr) -> Vec<u8> {
    match mask {
        IpAddr::V4(m) => m.octets().to_vec(),
        IpAddr::V6(m) => m.octets().to_vec(),
    }
}

/// Sidecar-path pod fetch: retryable API errors are retried (default 30 × 1 s, as Istio); a
/// definite answer (404, 403, bad JSON) fails at once with the API's own message.
fn fetch_pod(conf: &PluginConf, source: &dyn PodSource, p: PodRef<'_>) -> Result<Pod, CniError> {
    let policy = RetryPolicy {
        attempts: conf.pod_fetch_attempts.unwrap_or(30).max(1),
        interval: Duration::from_secs(1),
        retry_on: RetryOn::Retryable,
    };
    policy
        .run(
            |_| source.get_pod(p.namespace, p.name),
            |attempt, e| {
                warn!(pod = %format_ref(p), attempt, error = %e, "pod lookup failed; retrying");
                // Degraded-mode failsafe (HEAD): never block the agent's own pod.
                !pod::is_own_agent_pod(conf, p)
            },
        )
        .map_err(|e| lookup_error(p, &e))
}

/// Why applying capture failed; the netns is left as it was.
#[derive(Debug)]
struct ApplyError {
    code: u32,
    msg: String,
    details: String,
}

impl ApplyError {
    fn with_pod(self, p: PodRef<'_>) -> CniError {
        CniError::new(
            self.code,
            format!("{} for pod {}", self.msg, format_ref(p)),
            self.details,
        )
    }
}

/// Builds the rules for `cfg` (IPv6 detected from the pod netns) and applies them as one
/// transaction: one restore per family (rolled back if a later step fails) or one nft
/// transaction, then the TPROXY routes / `::6` address. Verify-or-repair: a netns that already
/// holds exactly these rules is left untouched, a drifted one is repaired atomically.
fn apply_sidecar(
    conf: &PluginConf,
    netns: &Path,
    cfg: CaptureConfig,
) -> Result<meshcni_netx::Applied, ApplyError> {
    let (applier, plan) = sidecar_plan(conf, netns, cfg)?;
    applier.apply_capture(netns, &plan).map_err(|e| ApplyError {
        code: codes::APPLY_FAILED,
        msg: "failed to program traffic capture".into(),
        details: e.to_string(),
    })
}

/// ADD's sidecar step on its own, for the node agent's repair controller: the same atomic,
/// verify-or-repair apply ([`apply_sidecar`]) on a running pod's netns. Returns what it did.
pub fn repair_sidecar_capture(
    conf: &PluginConf,
    netns: &Path,
    cfg: CaptureConfig,
) -> Result<RulesOutcome, String> {
    apply_sidecar(conf, netns, cfg)
        .map(|a| a.rules)
        .map_err(|e| format!("{}: {}", e.msg, e.details))
}

/// What ADD would apply for `cfg` in `netns`, and with which settings.
fn sidecar_plan(
    conf: &PluginConf,
    netns: &Path,
    mut cfg: CaptureConfig,
) -> Result<(Applier, ApplyPlan), ApplyError> {
    let backend = conf.rule_backend().map_err(|e| ApplyError {
        code: CniError::INVALID_NETWORK_CONFIG,
        msg: "invalid rule backend".into(),
        details: e.to_string(),
    })?;
    // Deliberate difference from the reference: IPv6 rules whenever the pod has a global IPv6
    // address (Istio only looks at the *first* address unless ISTIO_DUAL_STACK is set, which
    // lets the IPv6 traffic of dual-stack pods bypass the proxy).
    cfg.enable_ipv6 = meshcni_netx::detect::ipv6_enabled(netns, true).map_err(|e| ApplyError {
        code: codes::APPLY_FAILED,
        msg: "cannot inspect the pod network namespace".into(),
        details: e.to_string(),
    })?;
    let plan = plan_for(&cfg, backend).map_err(|e| ApplyError {
        code: codes::INVALID_POD_CONFIG,
        msg: "invalid capture configuration".into(),
        details: e.to_string(),
    })?;
    let applier = Applier {
        backend: match backend {
            RuleBackend::Nftables => Backend::Nftables,
            _ => Backend::Iptables,
        },
        iptables: iptables_options(conf),
    };
    Ok((applier, plan))
}

/// The differences between `netns` and what ADD installs for a sidecar pod with `cfg`
/// (the comparison CHECK makes, read-only; empty = in place). For `meshcni-agent doctor`.
pub fn sidecar_capture_differences(
    conf: &PluginConf,
    netns: &Path,
    cfg: CaptureConfig,
) -> Result<Vec<String>, String> {
    let (applier, plan) =
        sidecar_plan(conf, netns, cfg).map_err(|e| format!("{}: {}", e.msg, e.details))?;
    applier
        .check_capture(netns, &plan)
        .map_err(|e| format!("cannot read the capture state of {}: {e}", netns.display()))
}

/// CHECK of a sidecar pod: what ADD would install (same decision path) compared with the
/// netns, read-only. A difference is a [`codes::CAPTURE_MISMATCH`] error naming it.
fn check_sidecar(conf: &PluginConf, netns: &Path, cfg: CaptureConfig) -> Result<(), ApplyError> {
    let (applier, plan) = sidecar_plan(conf, netns, cfg)?;
    let problems = applier
        .check_capture(netns, &plan)
        .map_err(|e| ApplyError {
            code: codes::CAPTURE_MISMATCH,
            msg: "cannot read the capture state".into(),
            details: e.to_string(),
        })?;
    match problems.first() {
        None => Ok(()),
        Some(first) => Err(ApplyError {
            code: codes::CAPTURE_MISMATCH,
            msg: format!(
                "traffic capture differs from what ADD installs ({first}{})",
                if problems.len() > 1 {
                    format!(", and {} more", problems.len() - 1)
                } else {
                    String::new()
                }
            ),
            details: problems.join("; "),
        }),
    }
}

/// The full apply plan for a capture config (pure).
pub fn plan_for(
    cfg: &CaptureConfig,
    backend: RuleBackend,
) -> Result<ApplyPlan, sidecar::ConfigError> {
    let rs = sidecar::build(cfg)?;
    let tproxy = rs.tproxy_routing.as_ref().map(|t| TproxyRouting {
        mark: t.mark,
        table: t.table,
    });
    let nftables = matches!(backend, RuleBackend::Nftables);
    let owned = Ownership {
        v4_save: if nftables {
            String::new()
        } else {
            save_form::render(&rs, Family::V4)
        },
        v6_save: (!nftables && rs.ipv6).then(|| save_form::render(&rs, Family::V6)),
        iptables_chains: save_form::sidecar_chain_names(),
        iptables_tables: save_form::sidecar_table_names(),
        nft_tables: nft::SIDECAR_LAYOUT
            .tables
            .iter()
            .map(|(_, name, _)| NftTable {
                family: "inet".to_string(),
                name: (*name).to_string(),
            })
            .collect(),
    };
    Ok(ApplyPlan {
        v4_restore: if nftables {
            String::new()
        } else {
            iptables::render_restore(&rs, Family::V4)
        },
        v6_restore: (!nftables && rs.ipv6).then(|| iptables::render_restore(&rs, Family::V6)),
        nft: nftables.then(|| nft::render(&rs)),
        routes: RoutesPlan::sidecar(rs.ipv6, tproxy),
        owned: Some(owned),
    })
}

fn iptables_options(conf: &PluginConf) -> IptablesOptions {
    let mut opts = IptablesOptions::from_env();
    match &conf.iptables_binary {
        Some(IptablesBinary::Legacy) => opts.force = Some(IptablesFlavor::Legacy),
        Some(IptablesBinary::Nft) => opts.force = Some(IptablesFlavor::Nft),
        // An explicit binary path picks the flavor its name says (`iptables-legacy`,
        // `iptables-nft`), else the distribution's plain `iptables`.
        Some(IptablesBinary::Path(p)) => {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            opts.force = Some(if name.contains("legacy") {
                IptablesFlavor::Legacy
            } else if name.contains("nft") {
                IptablesFlavor::Nft
            } else {
                IptablesFlavor::Plain
            });
        }
        None => {}
    }
    opts
}
