//! Every flag of `meshcni-agent` is real: given a non-default value (on the command line and,
//! separately, through its environment variable), `check-config` either shows the effect in the
//! effective configuration, or rejects the value with an error naming the flag and its env var.
//!
//! The flags are enumerated from the clap definition, so a new flag without a row in [`TABLE`]
//! fails `every_flag_changes_behaviour_or_is_rejected`.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use clap::CommandFactory;

/// What a non-default value must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Shown in what the installer gets or writes (the `InstallConfig` and `plugin config:`
    /// lines of `check-config`), and absent with the default.
    Installed(&'static str),
    /// Shown in the run plan (settings of the running agent: ports, logging, ambient loop),
    /// and absent with the default.
    Runtime(&'static str),
    /// `check-config` fails; stderr names the flag, its env var and this text.
    Rejected(&'static str),
}
use Expect::*;

const AMBIENT_IPTABLES: &[&str] = &["--ambient-enabled=true", "--ambient-redirect-mode=iptables"];
/// Ambient on with the default redirect mode, `inpod`.
const AMBIENT_INPOD: &[&str] = &["--ambient-enabled=true"];
const AMBIENT_EBPF: &[&str] = &["--ambient-enabled=true", "--ambient-redirect-mode=ebpf"];
const TEMPLATE_FILE: &str = "@template-file@";

/// (flag, non-default value, other flags it needs, expectation).
const TABLE: &[(&str, &str, &[&str], Expect)] = &[
    (
        "cni-net-dir",
        "/etc/cni/other",
        &[],
        Installed("cni_net_dir: \"/etc/cni/other\""),
    ),
    (
        "mounted-cni-net-dir",
        "/host/x",
        &[],
        Installed("mounted_cni_net_dir: \"/host/x\""),
    ),
    (
        "cni-conf-name",
        "10-x.conflist",
        &[],
        Installed("cni_conf_name: \"10-x.conflist\""),
    ),
    (
        "chained-cni-plugin",
        "false",
        &[],
        Installed("chained_cni_plugin: false"),
    ),
    (
        "cni-network-config",
        r#"{"type":"meshcni","name":"from-inline-template"}"#,
        &[],
        Installed("\"name\": \"from-inline-template\""),
    ),
    (
        "cni-network-config-file",
        TEMPLATE_FILE,
        &[],
        Installed("\"name\": \"from-template-file\""),
    ),
    (
        "cni-conf-group-read",
        "true",
        &[],
        Installed("cni_conf_group_read: true"),
    ),
    (
        "istio-owned-cni-config",
        "true",
        &[],
        Installed("istio_owned_cni_config: true"),
    ),
    (
        "istio-owned-cni-config-filename",
        "01-x.conflist",
        &[],
        Installed("istio_owned_cni_config_filename: \"01-x.conflist\""),
    ),
    (
        "cni-bin-dir",
        "/src/bin",
        &[],
        Installed("cni_bin_source_dir: \"/src/bin\""),
    ),
    (
        "cni-bin-dirs",
        "/t1,/t2",
        &[],
        Installed("cni_bin_target_dirs: [\"/t1\", \"/t2\"]"),
    ),
    (
        "kubecfg-file-name",
        "kc",
        &[],
        Installed("kubecfg_file_name: \"kc\""),
    ),
    (
        "kubeconfig-mode",
        "0640",
        &[],
        Installed("kubeconfig_mode: 416"),
    ),
    (
        "kube-ca-file",
        "/ca.pem",
        &[],
        Installed("kube_ca_file: Some(\"/ca.pem\")"),
    ),
    (
        "skip-tls-verify",
        "true",
        &[],
        Installed("skip_tls_verify: true"),
    ),
    (
        "service-account-dir",
        "/sa",
        &[],
        Installed("service_account_dir: \"/sa\""),
    ),
    (
        "kubernetes-service-protocol",
        "http",
        &[],
        Installed("k8s_service_protocol: \"http\""),
    ),
    (
        "kubernetes-service-host",
        "127.0.0.1",
        &[],
        Installed("k8s_service_host: \"127.0.0.1\""),
    ),
    (
        "kubernetes-service-port",
        "1",
        &[],
        Installed("k8s_service_port: \"1\""),
    ),
    (
        "cni-agent-run-dir",
        "/run/x",
        &[],
        Installed("\"cni_agent_run_dir\": \"/run/x\""),
    ),
    (
        "log-uds-address",
        "/run/x/log.sock",
        &[],
        Rejected("does not send its logs"),
    ),
    (
        "log-level",
        "debug",
        &[],
        Installed("\"plugin_log_level\": \"debug\""),
    ),
    ("log-format", "json", &[], Runtime("log_format: Json")),
    (
        "monitoring-port",
        "15015",
        &[],
        Runtime("monitoring_port: 15015"),
    ),
    (
        "readiness-port",
        "8001",
        &[],
        Runtime("readiness_port: 8001"),
    ),
    (
        "listen-address",
        "127.0.0.1",
        &[],
        Runtime("listen_address: 127.0.0.1"),
    ),
    (
        "node-name",
        "node-9",
        &[],
        Installed("k8s_node_name: \"node-9\""),
    ),
    (
        "kubernetes-node-name",
        "node-8",
        &[],
        Installed("k8s_node_name: \"node-8\""),
    ),
    (
        "pod-namespace",
        "mesh",
        &[],
        Installed("\"pod_namespace\": \"mesh\""),
    ),
    ("pod-name", "meshcni-node-x", &[], Rejected("pod name")),
    // ztunnel identity (issue 8 item 13): behaviour proven by tests/ztunnel_discovery.rs.
    (
        "system-namespace",
        "mesh-system",
        &[],
        Runtime("system_namespace: \"mesh-system\""),
    ),
    (
        "ztunnel-service-account",
        "zt-sa",
        &[],
        Runtime("ztunnel_service_account: \"zt-sa\""),
    ),
    ("revision", "canary", &[], Rejected("revision")),
    ("host-ip", "10.0.0.1", &[], Rejected("node address")),
    (
        "exclude-namespaces",
        "a,b",
        &[],
        Installed("\"exclude_namespaces\": [\n    \"a\",\n    \"b\"\n  ]"),
    ),
    (
        "ambient-enabled",
        "true",
        &["--ambient-redirect-mode=iptables"],
        Installed("\"ambient_enabled\": true"),
    ),
    // With ambient on, the default (inpod) is built: see the test below.
    (
        "ambient-redirect-mode",
        "iptables",
        &[],
        Runtime("redirect_mode: Iptables"),
    ),
    (
        "ebpf-enabled",
        "true",
        &["--ambient-enabled=true"],
        Runtime("redirect_mode: Ebpf"),
    ),
    (
        "ambient-ebpf-max-pods",
        "100",
        AMBIENT_EBPF,
        Runtime("ambient_ebpf_max_pods: 100"),
    ),
    (
        "ambient-ebpf-max-pods",
        "100",
        AMBIENT_IPTABLES,
        Rejected("only the ebpf redirect mode"),
    ),
    (
        "ambient-ebpf-attach",
        "clsact",
        AMBIENT_EBPF,
        Runtime("ambient_ebpf_attach: \"clsact\""),
    ),
    (
        "ambient-ebpf-attach",
        "tcx",
        AMBIENT_INPOD,
        Rejected("only the ebpf redirect mode"),
    ),
    (
        "ambient-ebpf-pin-dir",
        "/sys/fs/bpf/other",
        AMBIENT_EBPF,
        Runtime("ambient_ebpf_pin_dir: \"/sys/fs/bpf/other\""),
    ),
    (
        "ambient-ebpf-pin-dir",
        "/sys/fs/bpf/other",
        AMBIENT_INPOD,
        Rejected("only the ebpf redirect mode"),
    ),
    (
        "ambient-config-dir",
        "/etc/ac",
        AMBIENT_IPTABLES,
        Runtime("ambient_config_dir: \"/etc/ac\""),
    ),
    (
        "ztunnel-uds-address",
        "/run/z.sock",
        AMBIENT_INPOD,
        Runtime("ztunnel_uds_address: \"/run/z.sock\""),
    ),
    (
        "ztunnel-uds-address",
        "/run/z.sock",
        AMBIENT_IPTABLES,
        Rejected("only the inpod redirect mode"),
    ),
    (
        "ambient-enablement-selector",
        "- podSelector:\n    matchLabels:\n      mesh: \"yes\"",
        AMBIENT_IPTABLES,
        Installed("\"mesh\": \"yes\""),
    ),
    (
        "ambient-workloads-file",
        "/w.json",
        AMBIENT_IPTABLES,
        Runtime("ambient_workloads_file: \"/w.json\""),
    ),
    (
        "ambient-kubeconfig",
        "/kc",
        AMBIENT_IPTABLES,
        Runtime("ambient_kubeconfig: \"/kc\""),
    ),
    (
        "ambient-dns-capture",
        "true",
        AMBIENT_IPTABLES,
        Runtime("ambient_dns_capture: true"),
    ),
    (
        "ambient-ipv6",
        "false",
        AMBIENT_INPOD,
        Runtime("ambient_ipv6: Some(false)"),
    ),
    (
        "ambient-ipv6",
        "true",
        AMBIENT_IPTABLES,
        Rejected("IPv4-only"),
    ),
    (
        "ambient-disable-safe-upgrade",
        "true",
        &[],
        Runtime("ambient_disable_safe_upgrade: true"),
    ),
    (
        "ambient-reconcile-pod-rules-on-startup",
        "false",
        AMBIENT_INPOD,
        Runtime("ambient_reconcile_pod_rules_on_startup: false"),
    ),
    (
        "ambient-reconcile-pod-rules-on-startup",
        "false",
        &[],
        Rejected("only the inpod redirect mode"),
    ),
    (
        "enable-ambient-detection-retry",
        "true",
        &[],
        Installed("\"enable_ambient_detection_retry\": true"),
    ),
    (
        "ambient-detection-failure-policy",
        "open",
        &[],
        Installed("\"ambient_detection_failure_policy\": \"open\""),
    ),
    (
        "pod-metadata-dir",
        "/var/lib/meshcni/pods",
        &[],
        Installed("\"pod_metadata_dir\": \"/var/lib/meshcni/pods\""),
    ),
    (
        "pod-metadata-default-namespace",
        "demo",
        &["--pod-metadata-dir=/m"],
        Installed("\"pod_metadata_default_namespace\": \"demo\""),
    ),
    (
        "native-nftables",
        "true",
        &[],
        Installed("\"native_nftables\": true"),
    ),
    (
        "force-iptables-binary",
        "legacy",
        AMBIENT_IPTABLES,
        Runtime("force_iptables_binary: \"legacy\""),
    ),
    (
        "netns-dir",
        "/nd",
        AMBIENT_IPTABLES,
        Runtime("netns_dir: \"/nd\""),
    ),
    // Behaviour proven by ambient_stack::node_xtables_lock_flag_is_the_lock_node_restores_wait_for.
    (
        "node-xtables-lock",
        "/lk",
        AMBIENT_IPTABLES,
        Runtime("node_xtables_lock: \"/lk\""),
    ),
    (
        "host-proc-dir",
        "/host/proc",
        AMBIENT_INPOD,
        Runtime("host_proc_dir: \"/host/proc\""),
    ),
    (
        "host-proc-dir",
        "/host/proc",
        AMBIENT_IPTABLES,
        Rejected("the inpod and ebpf redirect modes use it"),
    ),
    (
        "host-proc-dir",
        "/host/proc",
        AMBIENT_EBPF,
        Runtime("host_proc_dir: \"/host/proc\""),
    ),
    (
        "allow-switch-to-host-ns",
        "true",
        &[],
        Rejected("host network namespace"),
    ),
    (
        "host-probe-snat-ip",
        "169.254.7.128",
        AMBIENT_INPOD,
        Runtime("host_probe_snat_ip: 169.254.7.128"),
    ),
    (
        "host-probe-snat-ip",
        "169.254.7.128",
        AMBIENT_IPTABLES,
        Rejected("only the inpod redirect mode"),
    ),
    (
        "host-probe-snat-ipv6",
        "fd16::1",
        AMBIENT_INPOD,
        Runtime("host_probe_snat_ipv6: fd16::1"),
    ),
    (
        "host-probe-snat-ipv6",
        "fd16::1",
        &[],
        Rejected("only the inpod redirect mode"),
    ),
    (
        "ambient-use-scoped-xtables-locking",
        "true",
        &[],
        Rejected("one iptables-restore"),
    ),
    (
        "ambient-enable-aws-branch-eni-probe",
        "true",
        &[],
        Rejected("iptables redirect mode does not implement"),
    ),
    (
        "repair-enabled",
        "true",
        &[],
        Runtime("repair_enabled: true"),
    ),
    (
        "repair-repair-pods",
        "false",
        &[],
        Runtime("repair_repair_pods: false"),
    ),
    (
        "repair-delete-pods",
        "true",
        &[],
        Runtime("repair_delete_pods: true"),
    ),
    (
        "repair-label-pods",
        "true",
        &[],
        Runtime("repair_label_pods: true"),
    ),
    (
        "repair-broken-pod-label-key",
        "k",
        &[],
        Runtime("repair_broken_pod_label_key: \"k\""),
    ),
    (
        "repair-broken-pod-label-value",
        "v",
        &[],
        Runtime("repair_broken_pod_label_value: \"v\""),
    ),
    (
        "repair-node-name",
        "n",
        &["--repair-enabled=true", "--node-name=n"],
        Runtime("repair_node_name: \"n\""),
    ),
    (
        "repair-sidecar-annotation",
        "a",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-init-container-name",
        "c",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-init-container-termination-message",
        "m",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-init-container-exit-code",
        "1",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-label-selectors",
        "a=b",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-field-selectors",
        "a=b",
        &[],
        Rejected("doctor's verdict"),
    ),
    (
        "repair-resync-seconds",
        "5",
        &[],
        Runtime("repair_resync_seconds: 5"),
    ),
    (
        "uninstall-on-exit",
        "true",
        &[],
        Runtime("uninstall_on_exit: true"),
    ),
    (
        "uninstall-marker-file",
        "/m/uninstall",
        &[],
        Runtime("uninstall_marker_file: \"/m/uninstall\""),
    ),
    (
        "daemonset-name",
        "meshcni-node",
        &[
            "--kubernetes-service-host=127.0.0.1",
            "--pod-namespace=kube-system",
        ],
        Runtime("daemonset_name: \"meshcni-node\""),
    ),
    (
        "remove-node-taint",
        "true",
        &["--kubernetes-service-host=127.0.0.1", "--node-name=node-a"],
        Runtime("remove_node_taint: true"),
    ),
    (
        "node-taint-key",
        "example.com/not-ready",
        &[
            "--remove-node-taint=true",
            "--kubernetes-service-host=127.0.0.1",
            "--node-name=node-a",
        ],
        Runtime("node_taint_key: \"example.com/not-ready\""),
    ),
];

fn check_config(args: &[String], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .env_clear()
        .envs(env.iter().cloned())
        .args(args)
        .arg("check-config")
        .output()
        .expect("run meshcni-agent check-config")
}

/// The part of `check-config` output an expectation looks at.
fn section(out: &str, e: Expect) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let plan = lines.iter().position(|l| l.starts_with("RunPlan "));
    match (e, plan) {
        (Runtime(_), Some(i)) => lines[i].to_string(),
        (Installed(_), Some(i)) => lines[i + 1..].join("\n"),
        _ => String::new(),
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn every_flag_changes_behaviour_or_is_rejected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let template = tmp.path().join("template.json");
    std::fs::write(
        &template,
        r#"{"type":"meshcni","name":"from-template-file"}"#,
    )
    .expect("template");
    let cmd = meshcni_agent::cli::Cli::command();
    let flags: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(String::from)
        .collect();
    let rows: BTreeSet<String> = TABLE.iter().map(|r| r.0.to_string()).collect();
    let missing: Vec<_> = flags.difference(&rows).collect();
    assert!(
        missing.is_empty(),
        "flags without a row in TABLE: {missing:?}"
    );
    let stale: Vec<_> = rows.difference(&flags).collect();
    assert!(stale.is_empty(), "TABLE rows for no flag: {stale:?}");

    let mut failures = Vec::new();
    for &(flag, value, context, expect) in TABLE {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .expect("flag exists");
        let env_name = arg
            .get_env()
            .expect("every flag has an env var")
            .to_string_lossy()
            .into_owned();
        let value = if value == TEMPLATE_FILE {
            template.display().to_string()
        } else {
            value.to_string()
        };
        let context: Vec<String> = context.iter().map(|s| s.to_string()).collect();
        let baseline = check_config(&context, &[]);
        let (base_out, base_err) = text(&baseline);
        if !baseline.status.success() {
            failures.push(format!(
                "--{flag}: context {context:?} alone fails: {base_err}"
            ));
            continue;
        }
        let mut on_cli = context.clone();
        on_cli.push(format!("--{flag}={value}"));
        for (how, out) in [
            ("command line", check_config(&on_cli, &[])),
            (
                "environment",
                check_config(&context, &[(env_name.clone(), value.clone())]),
            ),
        ] {
            let (stdout, stderr) = text(&out);
            match expect {
                Rejected(why) => {
                    let ok = !out.status.success()
                        && stderr.contains(&format!("--{flag}"))
                        && stderr.contains(&env_name)
                        && (stderr.contains("not supported") || stderr.contains("not available"))
                        && stderr.contains(why);
                    if !ok {
                        failures.push(format!(
                            "--{flag}={value} ({how}): expected a rejection naming --{flag}, \
                             {env_name} and {why:?}; got {}: {stderr}",
                            out.status
                        ));
                    }
                }
                Installed(want) | Runtime(want) => {
                    let shown = section(&stdout, expect).contains(want);
                    let by_default = section(&base_out, expect).contains(want);
                    if !out.status.success() || !shown || by_default {
                        failures.push(format!(
                            "--{flag}={value} ({how}): expected {want:?} in the effective \
                             config and not by default (shown {shown}, by default {by_default}); \
                             {}:\n{stdout}\n{stderr}",
                            out.status
                        ));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `--help` is honest about rejections: every flag whose non-default value is rejected says so
/// in its own help text, so an operator reading `--help` (or the README table generated from
/// it) never takes it for a working setting.
#[test]
fn help_of_every_rejected_flag_says_it_is_rejected() {
    let cmd = meshcni_agent::cli::Cli::command();
    let mut silent = Vec::new();
    for &(flag, _, _, expect) in TABLE {
        if !matches!(expect, Rejected(_)) {
            continue;
        }
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .expect("flag exists");
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        if !help.contains("rejected") {
            silent.push(format!("--{flag}: {help:?}"));
        }
    }
    assert!(
        silent.is_empty(),
        "rejected flags whose help does not say so:\n{}",
        silent.join("\n")
    );
}

/// The default redirect mode is inpod, and it is built: ambient on with the defaults passes
/// `check-config` and plans the inpod mode; `ebpf` (env or flag) is built too and planned.
/// (Only `check-config` here: running the ebpf mode loads programs, which the netns tests in
/// `ambient_traffic.rs` and `ebpf_mode.rs` do on a private bpffs.)
#[test]
fn ambient_with_the_default_mode_runs_inpod_and_ebpf_is_planned() {
    for (env, args, want) in [
        (None, &[][..], "redirect_mode: Inpod"),
        (Some("ebpf"), &[][..], "redirect_mode: Ebpf"),
        (
            None,
            &["--ambient-redirect-mode=ebpf"][..],
            "redirect_mode: Ebpf",
        ),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"));
        c.env_clear().env("AMBIENT_ENABLED", "true");
        if let Some(mode) = env {
            c.env("AMBIENT_REDIRECT_MODE", mode);
        }
        let out = c
            .args(args)
            .arg("check-config")
            .output()
            .expect("run agent");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{env:?} {args:?}: {stderr}");
        assert!(stdout.contains(want), "{env:?} {args:?}: {stdout}");
    }
}

/// `--help` promises nothing for a later release.
#[test]
fn help_makes_no_promises() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .arg("--help")
        .output()
        .expect("run agent");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for bad in ["later release", "(later)", "used by a later"] {
        assert!(!help.contains(bad), "--help says {bad:?}:\n{help}");
    }
}

/// A plugin config template (`CNI_NETWORK_CONFIG`) never drops the agent's exclusions or its
/// `POD_METADATA_DIR`; a template contradicting the agent is refused naming both.
#[test]
fn a_template_keeps_the_agent_settings() {
    let agent = env!("CARGO_BIN_EXE_meshcni-agent");
    let out = Command::new(agent)
        .env_clear()
        .env("EXCLUDE_NAMESPACES", "kube-system,istio-system")
        .env("POD_METADATA_DIR", "/var/lib/meshcni/pods")
        .env(
            "CNI_NETWORK_CONFIG",
            r#"{"cniVersion":"0.3.1","name":"meshcni","type":"meshcni","log_level":"__LOG_LEVEL__"}"#,
        )
        .arg("check-config")
        .output()
        .expect("run agent");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let plugin = stdout
        .split_once("plugin config: ")
        .map(|(_, p)| p)
        .expect("plugin config printed");
    let v: serde_json::Value = serde_json::from_str(plugin.trim()).expect("plugin config JSON");
    assert_eq!(
        v["exclude_namespaces"],
        serde_json::json!(["kube-system", "istio-system"])
    );
    assert_eq!(v["pod_metadata_dir"], "/var/lib/meshcni/pods");
    assert_eq!(v["log_level"], "warn", "the template is still substituted");

    let out = Command::new(agent)
        .env_clear()
        .env("POD_METADATA_DIR", "/var/lib/meshcni/pods")
        .env(
            "CNI_NETWORK_CONFIG",
            r#"{"type":"meshcni","pod_metadata_dir":"/elsewhere"}"#,
        )
        .arg("check-config")
        .output()
        .expect("run agent");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/elsewhere") && stderr.contains("POD_METADATA_DIR"),
        "{stderr}"
    );
}
