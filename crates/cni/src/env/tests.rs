use std::collections::HashMap;

use super::*;

fn env_of(pairs: &[(&str, &str)]) -> Result<Environment, CniError> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Environment::from_vars(|k| m.get(k).cloned())
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c0ffee-1.x_y"),
    ("CNI_NETNS", "/var/run/netns/cni-1234"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    (
        "CNI_ARGS",
        "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1-2-3;IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
    ),
];

fn with(
    base: &[(&'static str, &'static str)],
    key: &'static str,
    val: Option<&'static str>,
) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = base.iter().copied().filter(|(k, _)| *k != key).collect();
    if let Some(val) = val {
        v.push((key, val));
    }
    v
}

#[test]
fn command_parses_every_spec_command() {
    for (s, c) in [
        ("ADD", Command::Add),
        ("DEL", Command::Del),
        ("CHECK", Command::Check),
        ("VERSION", Command::Version),
        ("STATUS", Command::Status),
        ("GC", Command::Gc),
    ] {
        assert_eq!(Command::parse(s), Ok(c));
        assert_eq!(c.as_str(), s);
    }
}

#[test]
fn unknown_command_is_code_4_naming_the_value() {
    let e = Command::parse("add").expect_err("lowercase is not a command");
    assert_eq!(e.code, CniError::INVALID_ENVIRONMENT);
    assert!(e.msg.contains("\"add\""), "{e}");
    let e = env_of(&with(ADD, "CNI_COMMAND", Some("FROB"))).expect_err("unknown command");
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("FROB"), "{e}");
}

#[test]
fn missing_command_is_code_4() {
    for v in [None, Some("")] {
        let e = env_of(&with(ADD, "CNI_COMMAND", v)).expect_err("missing command");
        assert_eq!(e.code, 4);
        assert_eq!(e.msg, "required env variables [CNI_COMMAND] missing");
    }
}

#[test]
fn add_environment_is_fully_parsed() {
    let env = env_of(ADD).expect("valid ADD env");
    assert_eq!(env.command, Command::Add);
    assert_eq!(env.container_id, "c0ffee-1.x_y");
    assert_eq!(env.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
    assert_eq!(env.ifname, "eth0");
    assert_eq!(
        env.path,
        vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
    );
    assert_eq!(env.args.k8s_pod_name(), Some("web-0"));
    assert_eq!(env.args.k8s_pod_namespace(), Some("default"));
    assert_eq!(env.args.k8s_pod_uid(), Some("1-2-3"));
    assert_eq!(env.args.k8s_pod_infra_container_id(), Some("c0ffee"));
    assert!(env.args.ignore_unknown());
}

#[test]
fn add_and_check_require_netns_del_does_not() {
    for cmd in ["ADD", "CHECK"] {
        for netns in [None, Some("")] {
            let vars = with(&with(ADD, "CNI_COMMAND", Some(cmd)), "CNI_NETNS", netns);
            let e = env_of(&vars).expect_err("netns required");
            assert_eq!(e.code, 4);
            assert_eq!(e.msg, "required env variables [CNI_NETNS] missing");
            assert_eq!(e.details, format!("CNI_COMMAND={cmd}"));
        }
    }
    let vars = with(
        &with(ADD, "CNI_COMMAND", Some("DEL")),
        "CNI_NETNS",
        Some(""),
    );
    let env = env_of(&vars).expect("DEL tolerates empty netns");
    assert_eq!(env.netns, None);
}

#[test]
fn all_missing_variables_are_named_together() {
    let e = env_of(&[("CNI_COMMAND", "DEL")]).expect_err("DEL needs container vars");
    assert_eq!(
        e.msg,
        "required env variables [CNI_CONTAINERID,CNI_IFNAME] missing"
    );
    let e = env_of(&[("CNI_COMMAND", "ADD")]).expect_err("ADD needs container vars");
    assert_eq!(
        e.msg,
        "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME] missing"
    );
}

#[test]
fn version_status_gc_need_no_container_variables() {
    for cmd in ["VERSION", "STATUS", "GC"] {
        let env = env_of(&[
            ("CNI_COMMAND", cmd),
            ("CNI_ARGS", "garbage"),
            ("CNI_IFNAME", "bad/name"),
        ])
        .expect("no container vars needed");
        assert_eq!(env.container_id, "");
        assert_eq!(env.ifname, "");
        assert_eq!(env.netns, None);
        assert!(env.args.pairs().is_empty());
        assert!(env.path.is_empty());
    }
    let env = env_of(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")]).expect("GC");
    assert_eq!(env.path, vec![PathBuf::from("/opt/cni/bin")]);
}

#[test]
fn container_id_rules() {
    for ok in ["a", "0", "abc-DEF_1.2", "e3b0c44298fc1c149afbf4c8996fb924"] {
        assert_eq!(validate_container_id(ok), Ok(()), "{ok}");
    }
    for bad in ["", "-a", "_a", ".a", "a b", "a/b", "a:b", "é"] {
        let e = validate_container_id(bad).expect_err(bad);
        assert_eq!(e.code, 4);
        assert_eq!(e.details, bad);
    }
    let e = env_of(&with(ADD, "CNI_CONTAINERID", Some("-x"))).expect_err("bad id");
    assert_eq!(e.msg, "invalid characters in CNI_CONTAINERID");
}

#[test]
fn ifname_rules() {
    for ok in ["eth0", "a", "net1.100", "123456789012345"] {
        assert_eq!(validate_ifname(ok), Ok(()), "{ok}");
    }
    for (bad, why) in [
        ("1234567890123456", "longer than 15"),
        (".", ". or .."),
        ("..", ". or .."),
        ("eth/0", "contains /"),
        ("eth:0", "contains /"),
        ("eth 0", "contains /"),
        ("eth\t0", "contains /"),
    ] {
        let e = validate_ifname(bad).expect_err(bad);
        assert_eq!(e.code, 4);
        assert!(e.msg.contains(why), "{bad}: {e}");
        assert_eq!(e.details, bad);
    }
}

#[test]
fn cni_args_any_order_and_last_wins() {
    let a = CniArgs::parse("K8S_POD_NAME=a;FOO=bar;K8S_POD_NAME=b").expect("valid");
    assert_eq!(a.k8s_pod_name(), Some("b"));
    assert_eq!(a.get("FOO"), Some("bar"));
    assert_eq!(a.pairs().len(), 3);
    assert!(!a.ignore_unknown());
    // empty values are allowed but the typed accessors treat them as absent
    let a = CniArgs::parse("K8S_POD_NAME=;K8S_POD_NAMESPACE=ns").expect("valid");
    assert_eq!(a.get("K8S_POD_NAME"), Some(""));
    assert_eq!(a.k8s_pod_name(), None);
    assert_eq!(a.k8s_pod_namespace(), Some("ns"));
    assert_eq!(CniArgs::parse(""), Ok(CniArgs::default()));
}

#[test]
fn cni_args_ignore_unknown_values() {
    for (v, want) in [
        ("1", true),
        ("true", true),
        ("TRUE", true),
        ("0", false),
        ("false", false),
        ("False", false),
    ] {
        let a = CniArgs::parse(&format!("IgnoreUnknown={v}")).expect("bool");
        assert_eq!(a.ignore_unknown(), want, "{v}");
    }
    let e = CniArgs::parse("IgnoreUnknown=yes").expect_err("not a bool");
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("IgnoreUnknown=\"yes\""), "{e}");
}

#[test]
fn malformed_cni_args_are_specific_code_4_errors() {
    for (raw, why) in [
        ("K8S_POD_NAME", "\"K8S_POD_NAME\" is not KEY=VALUE"),
        ("A=1;", "\"\" is not KEY=VALUE"),
        ("A=1;;B=2", "\"\" is not KEY=VALUE"),
        ("A=b=c", "\"A=b=c\" is not KEY=VALUE"),
        ("=v", "\"=v\" has an empty key"),
    ] {
        let e = CniArgs::parse(raw).expect_err(raw);
        assert_eq!(e.code, CniError::INVALID_ENVIRONMENT, "{raw}");
        assert!(e.msg.starts_with("invalid CNI_ARGS: "), "{e}");
        assert!(e.msg.contains(why), "{raw}: {e}");
        assert_eq!(e.details, raw);
    }
    let e = env_of(&with(ADD, "CNI_ARGS", Some("oops"))).expect_err("ADD with bad args");
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("CNI_ARGS"));
}

#[test]
fn del_tolerates_malformed_cni_args() {
    let vars = with(
        &with(ADD, "CNI_COMMAND", Some("DEL")),
        "CNI_ARGS",
        Some("K8S_POD_NAME=p;broken;K8S_POD_NAMESPACE=n;IgnoreUnknown=maybe"),
    );
    let env = env_of(&vars).expect("DEL is lenient");
    assert_eq!(env.args.k8s_pod_name(), Some("p"));
    assert_eq!(env.args.k8s_pod_namespace(), Some("n"));
    assert_eq!(env.args.malformed(), ["broken", "IgnoreUnknown=maybe"]);
}

#[test]
fn check_known_follows_ignore_unknown() {
    let known = [K8S_POD_NAME, K8S_POD_NAMESPACE];
    let a = CniArgs::parse("K8S_POD_NAME=a;K8S_POD_NAMESPACE=b").expect("valid");
    assert_eq!(a.check_known(&known), Ok(()));
    let a = CniArgs::parse("K8S_POD_NAME=a;IP=10.0.0.1").expect("valid");
    let e = a.check_known(&known).expect_err("unknown IP");
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("IP=10.0.0.1"), "{e}");
    let a = CniArgs::parse("K8S_POD_NAME=a;IP=10.0.0.1;IgnoreUnknown=1").expect("valid");
    assert_eq!(a.check_known(&known), Ok(()));
    let a = CniArgs::parse("IgnoreUnknown=0").expect("valid");
    assert_eq!(a.check_known(&known), Ok(()));
}

#[test]
fn process_env_reader_works() {
    // The test process has no CNI_COMMAND (cargo does not set it): the error names it.
    if std::env::var_os("CNI_COMMAND").is_none() {
        let e = Environment::from_process_env().expect_err("no CNI_COMMAND in test env");
        assert_eq!(e.msg, "required env variables [CNI_COMMAND] missing");
    }
    assert_eq!(process_var("MESHCNI_SURELY_UNSET_VAR_4711"), Ok(None));
}
