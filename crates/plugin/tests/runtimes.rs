//! Real CNI runtimes driving the built `meshcni` binary: the reference client `cnitool`
//! (libcni 1.1.2, built from Debian sources by `scripts/setup.sh`) and containerd 1.6's CRI
//! plugin (driven through `scripts/cri-pod.py`, a kubelet-like CRI client).
//!
//! Both run inside a node network namespace created here, with the chain
//! `bridge`+`host-local` → `portmap` → `cni-log` (records what meshcni receives) → `meshcni`,
//! so the runtime's final result is meshcni's output. Pod metadata comes from a local
//! pod-metadata directory (plugin field `pod_metadata_dir`): one sidecar-injected pod, whose
//! netns must get the Istio capture chains, and one plain pod, whose netns must stay empty.
//!
//! Needs root and the tools `scripts/setup.sh` installs; missing ones fail the test (never skip).
//!
//! CNI versions: cnitool/libcni 1.1.2 and the Debian reference plugins (1.1.1) implement spec
//! versions up to 1.0.0 (`version.All` = 0.1.0 … 1.0.0), so 0.3.1, 0.4.0 and 1.0.0 are driven
//! here; a 1.1.0 conflist cannot be driven by these tools (libcni cannot parse a 1.1.0 result).
//! CHECK needs ≥ 0.4.0 (libcni refuses it below).

mod support;

use std::fs;
use std::path::Path;

use serde_json::Value;
use support::*;

const CNITOOL_SUBNET: &str = "10.250.9.0/24";

fn cnitool_tools() {
    require(
        &[
            "ip",
            "nsenter",
            "cnitool",
            "iptables-nft-save",
            "iptables-legacy-save",
            "jq",
        ],
        &[
            Path::new(CNI_PLUGINS_DIR).join("bridge"),
            Path::new(CNI_PLUGINS_DIR).join("host-local"),
            Path::new(CNI_PLUGINS_DIR).join("portmap"),
        ],
    );
}

/// One cnitool network: node netns, plugin dir, conflist, metadata dir.
struct CnitoolLab {
    dir: tempfile::TempDir,
    node: Netns,
    net: String,
    version: String,
}

impl CnitoolLab {
    fn new(version: &str) -> CnitoolLab {
        let dir = tempfile::Builder::new()
            .prefix("mcni-cnitool-")
            .tempdir()
            .expect("tempdir");
        let node = Netns::new("node");
        let net = unique("net");
        plugin_dir(dir.path());
        let conf_dir = dir.path().join("net.d");
        fs::create_dir_all(&conf_dir).expect("create net.d");
        let conf = conflist(
            version,
            &net,
            CNITOOL_SUBNET,
            dir.path(),
            &dir.path().join("meta"),
        );
        fs::write(conf_dir.join("10-meshcni.conflist"), conf.to_string()).expect("write conflist");
        CnitoolLab {
            dir,
            node,
            net,
            version: version.to_string(),
        }
    }

    fn meta(&self) -> std::path::PathBuf {
        self.dir.path().join("meta")
    }

    /// `cnitool <op> <net> <netns>` inside the node netns, kubelet-like CNI_ARGS.
    fn cnitool(&self, op: &str, pod: &PodMeta<'_>, netns_path: &str) -> std::process::Output {
        let infra = pod.uid.replace('-', "");
        let mut c = self.node.exec("cnitool", &[op, &self.net, netns_path]);
        c.env("NETCONFPATH", self.dir.path().join("net.d"))
            .env("CNI_PATH", self.dir.path().join("bin"))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                k8s_cni_args(pod.namespace, pod.name, pod.uid, &infra),
            );
        // No CAP_ARGS portMappings: portmap 1.1.1's CHECK then fails on a v4-only pod ("could
        // not check ipv6 dnat: chain CNI-DN-… not found"). The containerd test maps a port.
        output(&mut c)
    }

    fn cnitool_ok(&self, op: &str, pod: &PodMeta<'_>, netns_path: &str) -> String {
        let out = self.cnitool(op, pod, netns_path);
        assert!(
            out.status.success(),
            "cnitool {op} ({} {}/{} cniVersion {}) failed ({}):\nstdout: {}\nstderr: {}",
            netns_path,
            pod.namespace,
            pod.name,
            self.version,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for CnitoolLab {
    fn drop(&mut self) {
        // cnitool caches results in /var/lib/cni/results/<net>-<containerid>-<ifname>; a
        // successful DEL removes ours, a failed test may leave one: remove what carries our name.
        if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}-", self.net))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// ADD → CHECK → DEL → DEL (netns now empty) → DEL (netns gone) for one pod; returns nothing,
/// asserts everything. `injected` decides which rules the pod netns must end up with.
fn cnitool_pod_lifecycle(lab: &CnitoolLab, name: &str, uid: &str, injected: bool) {
    let pod = PodMeta {
        namespace: "demo",
        name,
        uid,
        injected,
    };
    write_pod_metadata(&lab.meta(), &pod);
    let pod_ns = Netns::new(name);
    let netns_path = pod_ns.path();

    // ADD: the final result printed by cnitool is meshcni's output; it must equal the
    // prevResult meshcni received (what bridge produced, passed on by portmap and cni-log).
    let stdout = lab.cnitool_ok("add", &pod, &netns_path);
    let result: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("cnitool add printed no JSON result ({e}):\n{stdout}"));
    let calls = recorded_calls(lab.dir.path());
    let add = calls
        .iter()
        .rev()
        .find(|c| c["command"] == "ADD" && c["env"]["CNI_NETNS"] == netns_path.as_str())
        .unwrap_or_else(|| panic!("no ADD recorded for {netns_path}"));
    let prev = &add["stdin"]["prevResult"];
    assert_eq!(
        prev["cniVersion"],
        lab.version.as_str(),
        "bridge result version: {prev}"
    );
    assert_eq!(
        &result, prev,
        "meshcni must hand back the prevResult unchanged (cniVersion {})",
        lab.version
    );
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no IP in result {result}"));
    assert!(
        ip.starts_with("10.250.9."),
        "IP {ip} not from {CNITOOL_SUBNET}"
    );
    assert_eq!(
        ipv4_addrs(&pod_ns, "eth0"),
        vec![ip.to_string()],
        "pod eth0 address"
    );
    let args = add["env"]["CNI_ARGS"].as_str().unwrap_or_default();
    assert!(
        args.contains(&format!("K8S_POD_NAME={name}")),
        "CNI_ARGS seen by the chain: {args}"
    );

    let rules = iptables_rules(&netns_path);
    if injected {
        assert_istio_capture(
            &rules,
            &format!("injected pod {name} (cniVersion {})", lab.version),
        );
    } else {
        assert_no_istio(
            &rules,
            &format!("plain pod {name} (cniVersion {})", lab.version),
        );
    }

    // CHECK exists from 0.4.0 on.
    if lab.version.as_str() >= "0.4.0" {
        lab.cnitool_ok("check", &pod, &netns_path);
    } else {
        let out = lab.cnitool("check", &pod, &netns_path);
        assert!(
            !out.status.success(),
            "libcni must refuse CHECK for cniVersion {}",
            lab.version
        );
    }

    // DEL, then DEL again on the now-empty netns, then DEL once the netns is gone (runtimes
    // retry DEL after the sandbox is torn down): all must succeed.
    lab.cnitool_ok("del", &pod, &netns_path);
    assert!(
        ipv4_addrs(&pod_ns, "eth0").is_empty(),
        "eth0 must be gone after DEL"
    );
    lab.cnitool_ok("del", &pod, &netns_path);
    drop(pod_ns);
    lab.cnitool_ok("del", &pod, &netns_path);

    let dels = recorded_calls(lab.dir.path())
        .into_iter()
        .filter(|c| c["command"] == "DEL" && c["env"]["CNI_NETNS"] == netns_path.as_str())
        .count();
    assert_eq!(
        dels, 3,
        "DEL must have reached the end of the chain three times"
    );
    let ipam = lab.dir.path().join("ipam").join(&lab.net);
    let leased: Vec<_> = fs::read_dir(&ipam)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10."))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leased.is_empty(),
        "host-local still holds {leased:?} after DEL"
    );
}

fn cnitool_chain(version: &str) {
    cnitool_tools();
    let lab = CnitoolLab::new(version);
    cnitool_pod_lifecycle(&lab, "web", "44444444-4444-4444-8444-444444444444", true);
    cnitool_pod_lifecycle(&lab, "plain", "55555555-5555-4555-8555-555555555555", false);
}

#[test]
fn cnitool_chain_cni_0_3_1() {
    cnitool_chain("0.3.1");
}

#[test]
fn cnitool_chain_cni_0_4_0() {
    cnitool_chain("0.4.0");
}

#[test]
fn cnitool_chain_cni_1_0_0() {
    cnitool_chain("1.0.0");
}

// ---------------------------------------------------------------------------------------------

const CRI_SUBNET: &str = "10.250.10.0/24";

fn inspect(ctr: &Containerd, id: &str) -> Value {
    let out = run_ok(&mut ctr.cri(&["inspectp", id]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspectp {id}: bad JSON ({e}): {out}"))
}

#[test]
fn containerd_cri_chain() {
    require(
        &[
            "ip",
            "nsenter",
            "containerd",
            "containerd-shim-runc-v2",
            "ctr",
            "runc",
            "python3",
            "umount",
            "kill",
            "jq",
            "iptables-nft-save",
            "iptables-legacy-save",
        ],
        &[
            Path::new(CNI_PLUGINS_DIR).join("bridge"),
            Path::new(CNI_PLUGINS_DIR).join("portmap"),
            "/bin/busybox".into(),
            cri_python(),
        ],
    );
    // /var/tmp, not /tmp: overlayfs snapshots need a real filesystem on some hosts (tmpfs /tmp).
    let dir = tempfile::Builder::new()
        .prefix("mcni-ctr-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let w = dir.path();
    let node = Netns::new("ctrnode");
    let bin = plugin_dir(w);
    let conf_dir = w.join("net.d");
    fs::create_dir_all(&conf_dir).expect("create net.d");
    let net = unique("k8s");
    let conf = conflist("1.0.0", &net, CRI_SUBNET, w, &w.join("meta"));
    fs::write(conf_dir.join("10-meshcni.conflist"), conf.to_string()).expect("write conflist");
    for d in ["root", "state", "opt"] {
        fs::create_dir_all(w.join(d)).expect("create containerd dir");
    }

    let ctr = Containerd::start(&node, w, &bin, &conf_dir);
    ctr.import_busybox_image(
        "localhost/meshcni-pause:latest",
        &["/bin/sleep"],
        &["2147483647"],
    );

    let pods = [
        ("web", "22222222-2222-4222-8222-222222222222", true),
        ("plain", "33333333-3333-4333-8333-333333333333", false),
    ];
    for (name, uid, injected) in pods {
        let meta = PodMeta {
            namespace: "demo",
            name,
            uid,
            injected,
        };
        write_pod_metadata(&w.join("meta"), &meta);
        let id = run_ok(&mut ctr.cri(&[
            "runp",
            "--name",
            name,
            "--namespace",
            "demo",
            "--uid",
            uid,
            "--port",
            "18080:8080",
        ]))
        .trim()
        .to_string();
        let st = inspect(&ctr, &id);
        assert_eq!(st["state"], "SANDBOX_READY", "{name}: {st}");
        // containerd takes the sandbox IP from the chain's final result, i.e. meshcni's output.
        let ip = st["ip"].as_str().unwrap_or_default().to_string();
        assert!(
            ip.starts_with("10.250.10."),
            "{name}: sandbox IP {ip:?} not from {CRI_SUBNET} (prevResult lost?): {st}"
        );
        let netns_path = st["netns"].as_str().unwrap_or_default().to_string();
        assert!(
            Path::new(&netns_path).exists(),
            "{name}: sandbox netns {netns_path:?} missing: {st}"
        );

        let calls = recorded_calls(w);
        let add = calls
            .iter()
            .find(|c| c["command"] == "ADD" && c["env"]["CNI_CONTAINERID"] == id.as_str())
            .unwrap_or_else(|| panic!("{name}: no ADD recorded for sandbox {id}"));
        let args = add["env"]["CNI_ARGS"].as_str().unwrap_or_default();
        for want in [
            "K8S_POD_NAMESPACE=demo".to_string(),
            format!("K8S_POD_NAME={name}"),
            format!("K8S_POD_UID={uid}"),
        ] {
            assert!(
                args.split(';').any(|a| a == want),
                "{name}: CNI_ARGS {args:?} lacks {want}"
            );
        }
        let prev_ip = add["stdin"]["prevResult"]["ips"][0]["address"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            prev_ip.split('/').next(),
            Some(ip.as_str()),
            "{name}: meshcni's input vs sandbox IP"
        );

        let rules = iptables_rules(&netns_path);
        if injected {
            assert_istio_capture(&rules, &format!("containerd injected pod {name}"));
        } else {
            assert_no_istio(&rules, &format!("containerd plain pod {name}"));
        }

        run_ok(&mut ctr.cri(&["stopp", &id]));
        run_ok(&mut ctr.cri(&["rmp", &id]));
        let dels = recorded_calls(w)
            .into_iter()
            .filter(|c| c["command"] == "DEL" && c["env"]["CNI_CONTAINERID"] == id.as_str())
            .count();
        assert!(
            dels >= 2,
            "{name}: StopPodSandbox + RemovePodSandbox must each reach DEL, saw {dels}"
        );
        assert!(
            !Path::new(&netns_path).exists(),
            "{name}: sandbox netns {netns_path} left behind"
        );
    }
    assert!(
        ctr.sandboxes().is_empty(),
        "sandboxes left: {:?}",
        ctr.sandboxes()
    );
    let ipam = w.join("ipam").join(&net);
    let leased: Vec<_> = fs::read_dir(&ipam)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10."))
                .collect()
        })
        .unwrap_or_default();
    assert!(leased.is_empty(), "host-local still holds {leased:?}");
}
