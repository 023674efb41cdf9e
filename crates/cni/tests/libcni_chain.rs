//! End to end against the reference runtime client: `cnitool` (libcni) runs a conflist
//! `bridge`+`host-local` (dual-stack) → `mcni-toy`, where `mcni-toy` is this very test binary
//! (re-executed through a symlink) running a pass-through plugin on `meshcni_cni::main_with`.
//! Checks, per cniVersion: the toy's ADD output is the converted `prevResult`, libcni accepts and
//! re-prints it unchanged, its addresses are the ones really configured in the pod netns; CHECK
//! gets the cached result; DEL twice succeeds; a plugin error reaches the runtime intact; VERSION.
//!
//! Network safety: everything happens inside two namespaces created here (`mcni-h2-<pid>-*`),
//! removed on success and failure; IPAM state lives in a temp dir. libcni's result cache files
//! (`/var/lib/cni/results/<net>-*`) are removed by DEL, which the test asserts.
//! Needs root, `ip`, `cnitool` and `/usr/lib/cni/{bridge,host-local}`; fails without them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Output};

use meshcni_cni::{CniError, CniResult, Context, Plugin, convert_result, main_with};
use serde_json::{Value, json};

const TOY: &str = "mcni-toy";
const CNI_BIN: &str = "/usr/lib/cni";

/// The chained plugin under test: records every call, passes the prevResult through.
struct Toy;

impl Toy {
    fn record(ctx: &Context, out: Option<&Value>) {
        let Some(dir) = ctx.conf.raw.get("recordDir").and_then(Value::as_str) else {
            return;
        };
        let n = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let rec = json!({
            "command": ctx.env.command.as_str(),
            "containerID": ctx.env.container_id,
            "netns": ctx.env.netns.as_ref().map(|p| p.display().to_string()),
            "ifname": ctx.env.ifname,
            "podName": ctx.env.args.k8s_pod_name(),
            "podNamespace": ctx.env.args.k8s_pod_namespace(),
            "stdin": serde_json::from_slice::<Value>(&ctx.stdin).unwrap_or(Value::Null),
            "out": out,
        });
        let _ = fs::write(format!("{dir}/{n:03}.json"), rec.to_string());
    }
}

impl Plugin for Toy {
    fn add(&self, ctx: &Context) -> Result<Value, CniError> {
        if ctx.conf.raw.get("failAdd") == Some(&json!(true)) {
            Self::record(ctx, None);
            return Err(CniError::try_again_later(
                "toy refuses ADD",
                "asked to by failAdd",
            ));
        }
        let out = ctx.pass_through()?;
        Self::record(ctx, Some(&out));
        Ok(out)
    }
    fn del(&self, ctx: &Context) -> Result<(), CniError> {
        Self::record(ctx, None);
        Ok(())
    }
    fn check(&self, ctx: &Context) -> Result<(), CniError> {
        Self::record(ctx, None);
        let prev = ctx
            .conf
            .prev_result_typed()?
            .ok_or_else(|| CniError::invalid_config("CHECK without prevResult", ""))?;
        if prev.ips_on_interface(&ctx.env.ifname).next().is_none() {
            return Err(CniError::invalid_config(
                "CHECK: no IPs on the container interface",
                "",
            ));
        }
        Ok(())
    }
    fn status(&self, ctx: &Context) -> Result<(), CniError> {
        Self::record(ctx, None);
        Ok(())
    }
    fn gc(&self, ctx: &Context) -> Result<(), CniError> {
        Self::record(ctx, None);
        Ok(())
    }
    fn about(&self) -> &str {
        "meshcni-cni test plugin"
    }
}

struct Netns(String);

impl Netns {
    fn create(name: String) -> Netns {
        let _ = Proc::new("ip").args(["netns", "del", &name]).output();
        must(
            Proc::new("ip").args(["netns", "add", &name]),
            "ip netns add",
        );
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Proc::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn must(cmd: &mut Proc, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Lab {
    node: Netns,
    pod: Netns,
    plugin_dir: PathBuf,
    conf_dir: PathBuf,
    record_dir: PathBuf,
    ipam_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let plugin_dir = tmp.path().join("bin");
        let conf_dir = tmp.path().join("net.d");
        let record_dir = tmp.path().join("calls");
        let ipam_dir = tmp.path().join("ipam");
        for d in [&plugin_dir, &conf_dir, &record_dir, &ipam_dir] {
            fs::create_dir_all(d).expect("mkdir");
        }
        let me = std::env::current_exe().expect("current exe");
        std::os::unix::fs::symlink(me, plugin_dir.join(TOY)).expect("symlink toy plugin");
        let pid = std::process::id();
        Lab {
            node: Netns::create(format!("mcni-h2-{pid}-{tag}-n")),
            pod: Netns::create(format!("mcni-h2-{pid}-{tag}-p")),
            plugin_dir,
            conf_dir,
            record_dir,
            ipam_dir,
            _tmp: tmp,
        }
    }

    fn write_conflist(&self, net: &str, version: &str, toy_extra: Value) {
        let mut toy = json!({"type": TOY, "recordDir": self.record_dir});
        if let (Some(t), Some(extra)) = (toy.as_object_mut(), toy_extra.as_object()) {
            t.extend(extra.clone());
        }
        let bridge = format!("mcni{}", std::process::id() % 100_000);
        let conflist = json!({
            "cniVersion": version,
            "name": net,
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": self.ipam_dir,
                          "ranges": [[{"subnet": "10.77.0.0/24"}], [{"subnet": "fd00:77::/64"}]],
                          "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
                 "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}},
                toy
            ]
        });
        for e in fs::read_dir(&self.conf_dir).expect("conf dir") {
            fs::remove_file(e.expect("entry").path()).expect("rm old conflist");
        }
        fs::write(self.conf_dir.join("10-test.conflist"), conflist.to_string())
            .expect("write conflist");
    }

    fn cnitool(&self, op: &str, net: &str) -> Output {
        let cni_path = format!("{}:{CNI_BIN}", self.plugin_dir.display());
        Proc::new("ip")
            .args([
                "netns",
                "exec",
                &self.node.0,
                "cnitool",
                op,
                net,
                &self.pod.path(),
            ])
            .env("CNI_PATH", cni_path)
            .env("NETCONFPATH", &self.conf_dir)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=testns;K8S_POD_NAME=web-0;K8S_POD_UID=0d5f-11",
            )
            .output()
            .expect("run cnitool")
    }

    fn calls(&self) -> Vec<Value> {
        let mut names: Vec<PathBuf> = fs::read_dir(&self.record_dir)
            .expect("record dir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        let calls = names
            .iter()
            .map(|p| {
                serde_json::from_str(&fs::read_to_string(p).expect("read call")).expect("call json")
            })
            .collect();
        for p in names {
            fs::remove_file(p).expect("rm call");
        }
        calls
    }

    /// Global addresses on the pod's eth0, as `addr/prefix` strings.
    fn pod_addrs(&self) -> Vec<String> {
        let out = must(
            Proc::new("ip").args(["-j", "-n", &self.pod.0, "addr", "show", "dev", "eth0"]),
            "ip addr",
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j json");
        let mut addrs = Vec::new();
        for link in v.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] == "global" {
                    addrs.push(format!(
                        "{}/{}",
                        a["local"].as_str().unwrap_or(""),
                        a["prefixlen"]
                    ));
                }
            }
        }
        addrs.sort();
        addrs
    }
}

fn ok(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout={} stderr={}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).expect("cnitool output is JSON")
    }
}

fn no_cache_left(net: &str) {
    let leftovers: Vec<String> = fs::read_dir("/var/lib/cni/results")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{net}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "libcni cache left behind: {leftovers:?}"
    );
}

fn chain_at(version: &str) {
    let lab = Lab::new(&version.replace('.', ""));
    let net = format!(
        "mcni-h2-{}-{}",
        std::process::id(),
        version.replace('.', "")
    );
    lab.write_conflist(&net, version, json!({}));

    // ADD
    let printed = ok(
        &lab.cnitool("add", &net),
        &format!("cnitool add ({version})"),
    );
    let calls = lab.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let add = &calls[0];
    assert_eq!(add["command"], "ADD");
    assert_eq!(add["ifname"], "eth0");
    assert_eq!(add["netns"], lab.pod.path());
    assert_eq!(
        (add["podName"].clone(), add["podNamespace"].clone()),
        (json!("web-0"), json!("testns"))
    );
    let stdin = &add["stdin"];
    assert_eq!(stdin["cniVersion"], version);
    let prev = &stdin["prevResult"];
    assert_eq!(
        prev["cniVersion"], version,
        "libcni hands the previous result in the conf version"
    );
    let out = &add["out"];
    assert_eq!(
        out,
        &convert_result(prev, version).expect("convert"),
        "toy output = converted prevResult"
    );
    assert_eq!(out, prev, "same version: pass-through is the identity");
    assert_eq!(
        &printed, out,
        "libcni accepted and re-printed the toy's result unchanged"
    );
    let (typed, _) =
        CniResult::from_value(out, meshcni_cni::CniVersion::parse(version).expect("v"))
            .expect("typed");
    let mut on_eth0: Vec<String> = typed
        .ips_on_interface("eth0")
        .map(|ip| ip.address.to_string())
        .collect();
    on_eth0.sort();
    assert_eq!(
        on_eth0,
        lab.pod_addrs(),
        "result IPs are the ones configured in the pod"
    );
    assert_eq!(on_eth0.len(), 2, "dual-stack");
    assert_eq!(out["dns"]["nameservers"], json!(["10.96.0.10"]));

    // CHECK (0.4.0+): libcni replays the cached result as prevResult
    if version != "0.3.1" {
        ok(&lab.cnitool("check", &net), "cnitool check");
        let calls = lab.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["command"], "CHECK");
        assert_eq!(&calls[0]["stdin"]["prevResult"], out);
    }

    // DEL twice
    ok(&lab.cnitool("del", &net), "cnitool del");
    ok(&lab.cnitool("del", &net), "cnitool del (again)");
    let calls = lab.calls();
    assert_eq!(
        calls
            .iter()
            .map(|c| c["command"].clone())
            .collect::<Vec<_>>(),
        [json!("DEL"), json!("DEL")]
    );
    assert!(
        pod_has_no_eth0(&lab),
        "bridge removed the pod interface on DEL"
    );
    no_cache_left(&net);
    println!("libcni chain at cniVersion {version}: ok");
}

fn pod_has_no_eth0(lab: &Lab) -> bool {
    !Proc::new("ip")
        .args(["-n", &lab.pod.0, "link", "show", "eth0"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn error_reaches_the_runtime() {
    let lab = Lab::new("err");
    let net = format!("mcni-h2-{}-err", std::process::id());
    lab.write_conflist(&net, "1.0.0", json!({"failAdd": true}));
    let out = lab.cnitool("add", &net);
    assert!(!out.status.success(), "ADD must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("toy refuses ADD") && stderr.contains("asked to by failAdd"),
        "libcni must surface our error msg and details: {stderr}"
    );
    // cnitool does not roll back a failed ADD: DEL cleans the bridge's part
    ok(&lab.cnitool("del", &net), "cnitool del after failed add");
    let _ = lab.calls();
    no_cache_left(&net);
    println!("plugin error reaches libcni: ok ({})", stderr.trim());
}

fn version_command_like_reference_plugins() {
    let me = std::env::current_exe().expect("exe");
    let tmp = tempfile::tempdir().expect("tmp");
    let toy = tmp.path().join(TOY);
    std::os::unix::fs::symlink(me, &toy).expect("symlink");
    let run = |plugin: &Path, stdin: &str| -> Value {
        use std::io::Write;
        let mut child = Proc::new(plugin)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let ours = run(&toy, r#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(ours["cniVersion"], "0.4.0");
    let bridge = run(
        Path::new("/usr/lib/cni/bridge"),
        r#"{"cniVersion":"0.4.0"}"#,
    );
    let theirs: Vec<Value> = bridge["supportedVersions"]
        .as_array()
        .expect("list")
        .clone();
    let ours_list = ours["supportedVersions"].as_array().expect("list");
    for v in &theirs {
        assert!(
            ours_list.contains(v),
            "we support everything bridge does: {v}"
        );
    }
    println!("VERSION: ok ({ours})");
}

fn main() {
    let invoked_as = std::env::args_os().next().map(PathBuf::from);
    if invoked_as.as_deref().and_then(Path::file_name) == Some(std::ffi::OsStr::new(TOY)) {
        main_with(&Toy);
    }
    // libtest-style filtering is not supported; `cargo test` passes flags we ignore.
    for tool in ["ip", "cnitool"] {
        must(
            Proc::new("which").arg(tool),
            &format!("{tool} must be installed"),
        );
    }
    for p in ["bridge", "host-local"] {
        assert!(
            Path::new(CNI_BIN).join(p).exists(),
            "{CNI_BIN}/{p} must exist"
        );
    }
    version_command_like_reference_plugins();
    for v in ["0.3.1", "0.4.0", "1.0.0"] {
        chain_at(v);
    }
    error_reaches_the_runtime();
}
