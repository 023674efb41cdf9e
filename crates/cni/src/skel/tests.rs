use std::cell::RefCell;
use std::collections::HashMap;

use serde_json::json;

use super::*;

/// A toy chained plugin: passes the prevResult through, records what it was called with, and
/// misbehaves on request (`"fail": <code>` or `"panic": true` in its config).
#[derive(Default)]
struct Toy {
    calls: RefCell<Vec<(Command, String, Option<String>)>>,
}

impl Toy {
    fn record(&self, ctx: &Context) -> Result<(), CniError> {
        self.calls.borrow_mut().push((
            ctx.env.command,
            ctx.env.container_id.clone(),
            ctx.env.args.k8s_pod_name().map(str::to_owned),
        ));
        if ctx.conf.raw.get("panic") == Some(&json!(true)) {
            panic!("toy panic on purpose");
        }
        if let Some(code) = ctx.conf.raw.get("fail").and_then(Value::as_u64) {
            return Err(CniError::new(code as u32, "toy failure", "asked to fail"));
        }
        Ok(())
    }
}

impl Plugin for Toy {
    fn add(&self, ctx: &Context) -> Result<Value, CniError> {
        self.record(ctx)?;
        if let Some(v) = ctx.conf.raw.get("return") {
            return Ok(v.clone());
        }
        ctx.pass_through()
    }
    fn del(&self, ctx: &Context) -> Result<(), CniError> {
        self.record(ctx)
    }
    fn check(&self, ctx: &Context) -> Result<(), CniError> {
        self.record(ctx)
    }
    fn status(&self, ctx: &Context) -> Result<(), CniError> {
        self.record(ctx)
    }
    fn gc(&self, ctx: &Context) -> Result<(), CniError> {
        self.record(ctx)
    }
}

fn vars(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Runs the toy plugin; returns (exit code, stdout parsed as JSON or Null if empty).
fn invoke(toy: &Toy, env: &HashMap<String, String>, stdin: &[u8]) -> (i32, Value) {
    let mut out = Vec::new();
    let code = run(toy, |k| env.get(k).cloned(), stdin, &mut out);
    let v = if out.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out).expect("stdout is JSON")
    };
    (code, v)
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "k8s-pod-network", "type": "toy"})
}

fn fixture(version: &str) -> Value {
    let path = format!(
        "{}/testdata/bridge-host-local/{version}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture json")
}

#[test]
fn add_passes_prev_result_through_converted_to_the_config_version() {
    for (prev_v, conf_v) in [
        ("1.0.0", "1.0.0"),
        ("0.4.0", "1.0.0"),
        ("1.0.0", "0.3.1"),
        ("0.3.0", "1.1.0"),
    ] {
        let toy = Toy::default();
        let mut c = conf(conf_v);
        c["prevResult"] = fixture(prev_v);
        let (code, out) = invoke(&toy, &vars("ADD"), c.to_string().as_bytes());
        assert_eq!(code, 0, "{out}");
        assert_eq!(
            out,
            convert_result(&fixture(prev_v), conf_v).expect("convert")
        );
        assert_eq!(out["cniVersion"], conf_v);
        assert_eq!(out["ips"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            toy.calls.borrow().as_slice(),
            [(Command::Add, "abc123".to_owned(), Some("web-0".to_owned()))]
        );
    }
}

#[test]
fn add_without_prev_result_prints_an_empty_result() {
    for v in ["0.3.1", "1.0.0", "1.1.0"] {
        let (code, out) = invoke(
            &Toy::default(),
            &vars("ADD"),
            conf(v).to_string().as_bytes(),
        );
        assert_eq!(code, 0);
        assert_eq!(out, json!({"cniVersion": v, "dns": {}}));
    }
}

#[test]
fn add_output_is_normalised_to_the_config_version() {
    let mut c = conf("0.4.0");
    c["return"] = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.1.2.3/24"}]});
    let (code, out) = invoke(&Toy::default(), &vars("ADD"), c.to_string().as_bytes());
    assert_eq!(code, 0);
    assert_eq!(
        out,
        json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.1.2.3/24"}], "dns": {}})
    );

    c["return"] = json!({"cniVersion": "1.0.0", "ips": [{"address": "bogus"}]});
    let (code, out) = invoke(&Toy::default(), &vars("ADD"), c.to_string().as_bytes());
    assert_eq!(code, 1);
    assert_eq!(out["code"], 6);
    assert_eq!(out["cniVersion"], "0.4.0");
}

#[test]
fn del_check_status_gc_print_nothing_on_success() {
    for (cmd, v) in [
        ("DEL", "0.3.1"),
        ("CHECK", "0.4.0"),
        ("CHECK", "1.0.0"),
        ("STATUS", "1.1.0"),
        ("GC", "1.1.0"),
    ] {
        let toy = Toy::default();
        let (code, out) = invoke(&toy, &vars(cmd), conf(v).to_string().as_bytes());
        assert_eq!((code, out), (0, Value::Null), "{cmd} {v}");
        assert_eq!(toy.calls.borrow().len(), 1, "{cmd}");
    }
}

#[test]
fn del_is_tolerant_of_a_missing_netns() {
    let toy = Toy::default();
    let mut env = vars("DEL");
    env.insert("CNI_NETNS".into(), String::new());
    let (code, out) = invoke(&toy, &env, conf("1.0.0").to_string().as_bytes());
    assert_eq!((code, out), (0, Value::Null));
    env.remove("CNI_NETNS");
    let (code, _) = invoke(&toy, &env, conf("1.0.0").to_string().as_bytes());
    assert_eq!(code, 0);
    assert_eq!(toy.calls.borrow().len(), 2);
}

#[test]
fn status_and_gc_need_no_container_variables() {
    let env: HashMap<String, String> = [("CNI_COMMAND".to_owned(), "GC".to_owned())].into();
    let mut c = conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!([{"containerID": "abc", "ifname": "eth0"}]);
    let toy = Toy::default();
    assert_eq!(
        invoke(&toy, &env, c.to_string().as_bytes()),
        (0, Value::Null)
    );
    let env: HashMap<String, String> = [("CNI_COMMAND".to_owned(), "STATUS".to_owned())].into();
    assert_eq!(
        invoke(&toy, &env, c.to_string().as_bytes()),
        (0, Value::Null)
    );
    assert_eq!(
        toy.calls.borrow().as_slice(),
        [
            (Command::Gc, String::new(), None),
            (Command::Status, String::new(), None)
        ]
    );
}

#[test]
fn commands_newer_than_the_config_version_are_incompatible() {
    for (cmd, v, min) in [
        ("CHECK", "0.3.1", "0.4.0"),
        ("CHECK", "0.2.0", "0.4.0"),
        ("STATUS", "1.0.0", "1.1.0"),
        ("GC", "0.4.0", "1.1.0"),
    ] {
        let toy = Toy::default();
        let (code, out) = invoke(&toy, &vars(cmd), conf(v).to_string().as_bytes());
        assert_eq!(code, 1);
        assert_eq!(
            out,
            json!({"cniVersion": v, "code": 1, "msg": format!("config version does not allow {cmd}"),
                   "details": format!("config is {v:?}; {cmd} needs cniVersion {min} or later")})
        );
        assert!(toy.calls.borrow().is_empty(), "plugin must not run");
    }
}

#[test]
fn plugin_errors_become_cni_error_json_with_exit_1() {
    let mut c = conf("1.0.0");
    c["fail"] = json!(CniError::TRY_AGAIN_LATER);
    for cmd in ["ADD", "DEL", "CHECK"] {
        let (code, out) = invoke(&Toy::default(), &vars(cmd), c.to_string().as_bytes());
        assert_eq!(code, 1);
        assert_eq!(
            out,
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "toy failure", "details": "asked to fail"})
        );
    }
    let mut c = conf("1.1.0");
    c["fail"] = json!(CniError::PLUGIN_NOT_AVAILABLE);
    let (code, out) = invoke(&Toy::default(), &vars("STATUS"), c.to_string().as_bytes());
    assert_eq!((code, out["code"].clone()), (1, json!(50)));
}

#[test]
fn a_panicking_plugin_yields_an_internal_error_not_a_crash() {
    let mut c = conf("1.0.0");
    c["panic"] = json!(true);
    let (code, out) = invoke(&Toy::default(), &vars("ADD"), c.to_string().as_bytes());
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "1.0.0", "code": 999, "msg": "plugin panicked during ADD", "details": "toy panic on purpose"})
    );
}

#[test]
fn version_command() {
    let env: HashMap<String, String> = [("CNI_COMMAND".to_owned(), "VERSION".to_owned())].into();
    let all = json!([
        "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
    ]);
    for (stdin, want) in [
        (&br#"{"cniVersion":"0.4.0"}"#[..], "0.4.0"),
        (br#"{"cniVersion":"1.1.0","name":"x"}"#, "1.1.0"),
        (b"", "1.1.0"),
        (b"not json", "1.1.0"),
        (br#"{"cniVersion":"9.9.9"}"#, "1.1.0"),
        (br#"{"cniVersion":7}"#, "1.1.0"),
    ] {
        let toy = Toy::default();
        let (code, out) = invoke(&toy, &env, stdin);
        assert_eq!(code, 0);
        assert_eq!(out, json!({"cniVersion": want, "supportedVersions": all}));
        assert!(toy.calls.borrow().is_empty());
    }
}

#[test]
fn request_errors_carry_the_config_version_when_known() {
    // missing CNI_NETNS on ADD: env error, but stdin's version is echoed
    let mut env = vars("ADD");
    env.remove("CNI_NETNS");
    let (code, out) = invoke(&Toy::default(), &env, conf("0.4.0").to_string().as_bytes());
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "0.4.0", "code": 4, "msg": "required env variables [CNI_NETNS] missing", "details": "CNI_COMMAND=ADD"})
    );
    // unsupported version: echoed back as given
    let (code, out) = invoke(
        &Toy::default(),
        &vars("ADD"),
        conf("0.9.0").to_string().as_bytes(),
    );
    assert_eq!(
        (code, out["code"].clone(), out["cniVersion"].clone()),
        (1, json!(1), json!("0.9.0"))
    );
    // malformed JSON: no version known → newest
    let (code, out) = invoke(&Toy::default(), &vars("ADD"), b"{\"cniVersion\":");
    assert_eq!(
        (code, out["code"].clone(), out["cniVersion"].clone()),
        (1, json!(6), json!("1.1.0"))
    );
}

#[test]
fn unknown_and_missing_commands() {
    let (code, out) = invoke(
        &Toy::default(),
        &vars("REMOVE"),
        conf("1.0.0").to_string().as_bytes(),
    );
    assert_eq!(code, 1);
    assert_eq!(out["code"], 4);
    assert!(
        out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("\"REMOVE\"")),
        "{out}"
    );
    let mut env = vars("ADD");
    env.remove("CNI_COMMAND");
    let (code, out) = invoke(&Toy::default(), &env, conf("1.0.0").to_string().as_bytes());
    assert_eq!((code, out["code"].clone()), (1, json!(4)));
}

#[test]
fn bad_cni_args_fail_add_but_not_del() {
    let mut env = vars("ADD");
    env.insert("CNI_ARGS".into(), "K8S_POD_NAME=a;garbage".into());
    let toy = Toy::default();
    let (code, out) = invoke(&toy, &env, conf("1.0.0").to_string().as_bytes());
    assert_eq!((code, out["code"].clone()), (1, json!(4)));
    assert!(
        out["msg"]
            .as_str()
            .is_some_and(|m| m.contains("\"garbage\"")),
        "{out}"
    );
    env.insert("CNI_COMMAND".into(), "DEL".into());
    let (code, _) = invoke(&toy, &env, conf("1.0.0").to_string().as_bytes());
    assert_eq!(code, 0);
    assert_eq!(
        toy.calls.borrow().as_slice(),
        [(Command::Del, "abc123".to_owned(), Some("a".to_owned()))]
    );
}

struct FailingReader;
impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("stdin went away"))
    }
}

#[test]
fn stdin_io_errors_and_oversize_are_code_5() {
    let env = vars("ADD");
    let mut out = Vec::new();
    let code = run(
        &Toy::default(),
        |k| env.get(k).cloned(),
        FailingReader,
        &mut out,
    );
    assert_eq!(code, 1);
    let v: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(
        (v["code"].clone(), v["details"].clone()),
        (json!(5), json!("stdin went away"))
    );

    let big = std::io::repeat(b' ').take(MAX_STDIN_BYTES + 10);
    let mut out = Vec::new();
    let code = run(&Toy::default(), |k| env.get(k).cloned(), big, &mut out);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["code"], 5);
}

struct BrokenStdout;
impl Write for BrokenStdout {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("EPIPE"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn unwritable_stdout_is_a_failure() {
    let env = vars("ADD");
    let code = run(
        &Toy::default(),
        |k| env.get(k).cloned(),
        conf("1.0.0").to_string().as_bytes(),
        BrokenStdout,
    );
    assert_eq!(code, 1);
}

#[test]
fn parse_request_shapes() {
    let pairs: Vec<(String, String)> = vars("ADD").into_iter().collect();
    let mut c = conf("1.0.0");
    c["prevResult"] = fixture("1.0.0");
    let stdin = c.to_string();
    let Request::Plugin(ctx) = parse_request(&pairs, stdin.as_bytes()).expect("valid") else {
        panic!("ADD is a plugin request");
    };
    assert_eq!(ctx.env.command, Command::Add);
    assert_eq!(ctx.version(), CniVersion::V1_0_0);
    assert_eq!(ctx.stdin, stdin.as_bytes());
    assert_eq!(ctx.pass_through().expect("pt"), fixture("1.0.0"));

    let v = [("CNI_COMMAND".to_owned(), "VERSION".to_owned())];
    assert_eq!(
        parse_request(&v, br#"{"cniVersion":"0.3.1"}"#),
        Ok(Request::Version {
            requested: Some("0.3.1".into())
        })
    );
    // duplicates: the first wins
    let dup = [
        ("CNI_COMMAND".to_owned(), "VERSION".to_owned()),
        ("CNI_COMMAND".to_owned(), "ADD".to_owned()),
    ];
    assert!(matches!(
        parse_request(&dup, b""),
        Ok(Request::Version { requested: None })
    ));
    // GC with malformed attachments is rejected before the plugin runs
    let gc = [("CNI_COMMAND".to_owned(), "GC".to_owned())];
    let mut c = conf("1.1.0");
    c["cni.dev/valid-attachments"] = json!("all");
    assert_eq!(
        parse_request(&gc, c.to_string().as_bytes())
            .expect_err("bad")
            .code,
        6
    );
}

#[test]
fn parse_request_survives_hostile_input() {
    // a cheap in-tree stand-in for the fuzz target: deep nesting, invalid UTF-8, huge numbers,
    // and every prefix of a valid config must produce Ok or a CniError, never a panic
    let pairs: Vec<(String, String)> = vars("ADD").into_iter().collect();
    let mut c = conf("0.4.0");
    c["prevResult"] = fixture("0.4.0");
    let good = c.to_string();
    for end in 0..good.len() {
        let _ = parse_request(&pairs, &good.as_bytes()[..end]);
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for stdin in [
        deep.as_bytes(),
        b"\xff\xfe\xfd",
        br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":[{"interface":1e400}]}}"#,
        br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":[{"interface":18446744073709551616}]}}"#,
    ] {
        let _ = parse_request(&pairs, stdin);
    }
    let e = parse_request(&pairs, deep.as_bytes()).expect_err("too deep");
    assert_eq!(e.code, 6);
    assert!(e.msg.contains("recursion limit"), "{e}");
}

/// Deterministic mutation fuzzing of `parse_request` (and, for accepted ADDs, the pass-through
/// conversion): byte flips, insertions, deletions and splices of real configs, plus random
/// environments. Only "no panic" and "errors use spec codes" are asserted; a cargo-fuzz target
/// can call `parse_request` the same way with coverage guidance.
#[test]
fn mutation_fuzz_parse_request() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    for v in ["0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        let mut c = conf(v);
        c["prevResult"] = fixture(v);
        c["runtimeConfig"] = json!({"portMappings": [{"HostPort": 80, "containerPort": 8080}]});
        corpus.push(c.to_string().into_bytes());
    }
    let commands = [
        "ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC", "", "add", "ADD\0",
    ];
    let args = [
        "",
        "K8S_POD_NAME=a",
        "a",
        "=;=",
        "IgnoreUnknown=2",
        "A=1;B=2=3",
        ";;",
    ];
    let spec_codes = [1, 2, 3, 4, 5, 6, 7, 11];
    for _ in 0..20_000 {
        let mut input = corpus[(next() % corpus.len() as u64) as usize].clone();
        for _ in 0..(next() % 4 + 1) {
            let len = input.len().max(1);
            let pos = (next() % len as u64) as usize;
            match next() % 5 {
                0 if pos < input.len() => input[pos] = next() as u8,
                1 => input.insert(
                    pos.min(input.len()),
                    b"{}[]\",:0-e9\\"[(next() % 12) as usize],
                ),
                2 if pos < input.len() => {
                    input.remove(pos);
                }
                3 => input.truncate(pos),
                _ => {
                    let other = &corpus[(next() % corpus.len() as u64) as usize];
                    let from = (next() % other.len() as u64) as usize;
                    let tail = other[from..].to_vec();
                    input.truncate(pos.min(input.len()));
                    input.extend_from_slice(&tail);
                }
            }
        }
        let mut env: Vec<(String, String)> =
            vars(commands[(next() % commands.len() as u64) as usize])
                .into_iter()
                .filter(|_| next() % 8 != 0)
                .collect();
        env.push((
            "CNI_ARGS".into(),
            args[(next() % args.len() as u64) as usize].into(),
        ));
        env.sort();
        match parse_request(&env, &input) {
            Ok(Request::Plugin(ctx)) => {
                if let Err(e) = ctx.pass_through() {
                    assert!(spec_codes.contains(&e.code), "{e}");
                }
                let _ = ctx.conf.port_mappings();
                let _ = ctx.conf.prev_result_typed();
            }
            Ok(Request::Version { .. }) => {}
            Err(e) => assert!(spec_codes.contains(&e.code), "{e}"),
        }
    }
}
