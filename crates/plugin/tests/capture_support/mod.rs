//! Support for `tests/capture.rs`: a pod-metadata directory holding pods built per case, the
//! real `meshcni` binary exec'd with a CNI environment, and flow probes that classify where a
//! connection ended up (captured by the sidecar stand-in, or delivered to the real server) from
//! three independent witnesses: the bytes the client got back, the stand-in's record and the
//! server's record.
//!
//! UDP DNS replies: with DNS capture on, Istio's raw-table rules put the app's port-53 packets
//! in conntrack zone 2 and only the *proxy's* replies (socket owned by uid/gid 1337) back into
//! that zone, so that the REDIRECT can be undone. The sidecar stand-in is therefore started with
//! its sockets owned by 1337 (`TransparentProxy::start_owned_by`), and the app gets its answer.
//!
//! Network safety: every namespace comes from `meshcni_testkit` (unique `mcni-` names, deleted
//! on drop); traffic only goes to addresses inside those namespaces.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use meshcni_testkit::proxy::dns_query;
use meshcni_testkit::{
    ConnectOpts, DnsQuery, Netns, ProxiedConn, TcpServer, TransparentProxy, connect, udp_exchange,
};
use serde_json::{Value, json};

/// Which rule backend the plugin is configured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleBackend {
    /// `iptables` with per-netns flavor detection (a fresh netns gets the nft flavor).
    Iptables,
    /// `iptables` forced to the legacy (x_tables) flavor: `iptables_binary: "legacy"`.
    IptablesLegacy,
    /// Native nftables: `native_nftables: true`.
    Nftables,
}

impl RuleBackend {
    /// Plugin configuration fields selecting this backend.
    pub fn conf_fields(self) -> Value {
        match self {
            RuleBackend::Iptables => json!({}),
            RuleBackend::IptablesLegacy => json!({"iptables_binary": "legacy"}),
            RuleBackend::Nftables => json!({"native_nftables": true}),
        }
    }
}

/// A pod as the injector would leave it: annotations, the `istio-proxy` container's env and
/// security context. `injected: false` gives a plain pod with only the `app` container.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub injected: bool,
    pub annotations: Vec<(String, String)>,
    pub proxy_env: Vec<(String, String)>,
    /// `runAsUser`/`runAsGroup` of `istio-proxy` (default 1337).
    pub proxy_uid: u32,
    /// Pod labels besides `app: <name>`.
    pub labels: Vec<(String, String)>,
}

impl PodSpec {
    pub fn injected(name: &str) -> PodSpec {
        PodSpec {
            namespace: "demo".into(),
            name: name.into(),
            injected: true,
            annotations: Vec::new(),
            proxy_env: Vec::new(),
            proxy_uid: 1337,
            labels: Vec::new(),
        }
    }

    pub fn plain(name: &str) -> PodSpec {
        PodSpec {
            injected: false,
            ..PodSpec::injected(name)
        }
    }

    pub fn annotate(mut self, key: &str, value: &str) -> PodSpec {
        self.annotations.push((key.into(), value.into()));
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> PodSpec {
        self.proxy_env.push((name.into(), value.into()));
        self
    }

    pub fn run_as(mut self, uid: u32) -> PodSpec {
        self.proxy_uid = uid;
        self
    }

    /// The Kubernetes Pod JSON.
    pub fn to_json(&self) -> Value {
        let mut annotations = serde_json::Map::new();
        let mut containers = vec![json!({
            "name": "app", "image": "example/app:1",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}]
        })];
        let mut init = Vec::new();
        if self.injected {
            annotations.insert(
                "sidecar.istio.io/status".into(),
                Value::String(
                    r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#.into(),
                ),
            );
            init.push(
                json!({"name": "istio-validation", "image": "docker.io/istio/proxyv2:1.22.0",
                             "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"]}),
            );
            let env: Vec<Value> = self
                .proxy_env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            containers.push(json!({
                "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.0",
                "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                "env": env,
                "securityContext": {"runAsUser": self.proxy_uid, "runAsGroup": self.proxy_uid}
            }));
        }
        for (k, v) in &self.annotations {
            annotations.insert(k.clone(), Value::String(v.clone()));
        }
        let mut labels = serde_json::Map::new();
        labels.insert("app".into(), Value::String(self.name.clone()));
        for (k, v) in &self.labels {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "uid": format!("uid-{}", self.name), "labels": labels,
                         "annotations": annotations},
            "spec": {"initContainers": init, "containers": containers}
        })
    }
}

/// A temporary directory with `meta/` (the pod-metadata dir) and `run/` (the agent run dir,
/// so the plugin's metrics datagram and logs stay inside the test).
pub struct PluginEnv {
    dir: tempfile::TempDir,
}

impl PluginEnv {
    pub fn new() -> PluginEnv {
        let dir = tempfile::Builder::new()
            .prefix("mcni-capture-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir_all(dir.path().join("meta/namespaces")).expect("mkdir meta");
        fs::create_dir_all(dir.path().join("run")).expect("mkdir run");
        PluginEnv { dir }
    }

    pub fn meta(&self) -> PathBuf {
        self.dir.path().join("meta")
    }

    pub fn write_pod(&self, pod: &PodSpec) {
        let pods = self.meta().join("pods").join(&pod.namespace);
        fs::create_dir_all(&pods).expect("mkdir pods");
        fs::write(
            pods.join(format!("{}.json", pod.name)),
            pod.to_json().to_string(),
        )
        .expect("write pod");
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": pod.namespace, "labels": {"istio-injection": "enabled"}}});
        fs::write(
            self.meta()
                .join("namespaces")
                .join(format!("{}.json", pod.namespace)),
            ns.to_string(),
        )
        .expect("write namespace");
    }

    /// Exec the real plugin binary: `CNI_COMMAND=ADD` for `pod` in `netns`, stdin = the
    /// plugin's conflist entry (+ `backend` fields) with a `prevResult` naming `ips`. Asserts it
    /// succeeds and hands the prevResult back unchanged. Returns the plugin's log (stderr).
    pub fn cni_add(
        &self,
        pod: &PodSpec,
        netns: &Netns,
        backend: RuleBackend,
        ips: &[String],
    ) -> String {
        let run = self.cni("ADD", pod, netns, backend, ips);
        assert!(
            run.ok,
            "meshcni ADD for {}/{} ({backend:?}) failed:\nstdout: {}\nstderr: {}",
            pod.namespace, pod.name, run.stdout, run.stderr
        );
        let result: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("meshcni printed no JSON result ({e}): {}", run.stdout));
        assert_eq!(
            result,
            self.conf(netns, backend, ips)["prevResult"],
            "meshcni must pass the prevResult through"
        );
        run.stderr
    }

    /// The plugin's stdin for `netns` / `backend` / `ips`.
    fn conf(&self, netns: &Netns, backend: RuleBackend, ips: &[String]) -> Value {
        self.conf_with(netns, backend.conf_fields(), ips)
    }

    /// The plugin's stdin for `netns` / `ips` with extra plugin config `fields`.
    fn conf_with(&self, netns: &Netns, fields: Value, ips: &[String]) -> Value {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns.path()}],
            "ips": ips.iter().map(|a| json!({"address": a, "interface": 0})).collect::<Vec<_>>(),
            "dns": {}
        });
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "mcni-capture", "type": "meshcni",
            "pod_metadata_dir": self.meta(),
            "cni_agent_run_dir": self.dir.path().join("run"),
            "plugin_log_level": "debug",
            "prevResult": prev,
        });
        if let (Some(c), Value::Object(extra)) = (conf.as_object_mut(), fields) {
            c.extend(extra);
        }
        conf
    }

    /// Exec the real plugin binary with `CNI_COMMAND=command` (ADD, CHECK, …) for `pod` in
    /// `netns` (its metadata written first); the outcome is returned, not asserted.
    pub fn cni(
        &self,
        command: &str,
        pod: &PodSpec,
        netns: &Netns,
        backend: RuleBackend,
        ips: &[String],
    ) -> CniRun {
        self.cni_with(command, pod, netns, backend.conf_fields(), ips)
    }

    /// [`PluginEnv::cni`] with arbitrary extra plugin config `fields`.
    pub fn cni_with(
        &self,
        command: &str,
        pod: &PodSpec,
        netns: &Netns,
        fields: Value,
        ips: &[String],
    ) -> CniRun {
        self.write_pod(pod);
        let conf = self.conf_with(netns, fields, ips);
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshcni"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{}", pod.name))
            .env("CNI_NETNS", netns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}",
                    pod.namespace, pod.name, pod.name
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshcni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait meshcni");
        CniRun {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The outcome of one plugin exec.
#[derive(Debug, Clone)]
pub struct CniRun {
    /// Exit status 0.
    pub ok: bool,
    /// The CNI result or error JSON.
    pub stdout: String,
    /// The plugin's JSON log lines.
    pub stderr: String,
}

impl CniRun {
    /// The CNI error object printed on failure (`code`, `msg`, `details`).
    pub fn error(&self) -> Value {
        assert!(!self.ok, "expected a failure, got success: {}", self.stdout);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no CNI error JSON ({e}): {}", self.stdout))
    }
}

/// Everything rule-like in `ns`: iptables/ip6tables (nft and legacy flavors) and the native
/// nftables ruleset, each under a `# <tool>` header.
pub fn all_rules(ns: &Netns) -> String {
    let mut out = String::new();
    for (prog, args) in [
        ("iptables-nft-save", &[][..]),
        ("ip6tables-nft-save", &[][..]),
        ("iptables-legacy-save", &[][..]),
        ("ip6tables-legacy-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        out.push_str(&format!("# {prog}\n"));
        out.push_str(&ns.exec_ok(prog, args).expect("dump rules"));
    }
    out
}

/// One tool's dump (`iptables-nft-save`, `nft` …) in `ns`.
pub fn rules_of(ns: &Netns, prog: &str) -> String {
    let args: &[&str] = if prog == "nft" {
        &["list", "ruleset"]
    } else {
        &[]
    };
    ns.exec_ok(prog, args).expect("dump rules")
}

/// An iptables-save dump without the timestamped comment lines and with counters zeroed, so
/// two dumps of the same state compare equal.
pub fn canonical_save(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                match l.rfind(" [") {
                    Some(i) => format!("{} [0:0]", &l[..i]),
                    None => l.to_string(),
                }
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn opts(uid: Option<u32>, payload: &str) -> ConnectOpts {
    ConnectOpts {
        uid,
        gid: uid,
        timeout: Duration::from_secs(3),
        payload: payload.as_bytes().to_vec(),
    }
}

/// Connect from `from` (as `uid`) to `dst`, expecting the sidecar stand-in `proxy` to take it on
/// listener `port` with `dst` as the original destination, and `server` to see nothing.
/// Returns the stand-in's record (whose peer the caller checks).
pub fn expect_captured(
    what: &str,
    from: &Netns,
    uid: Option<u32>,
    dst: SocketAddr,
    proxy: &TransparentProxy,
    port: u16,
    server: &TcpServer,
) -> ProxiedConn {
    let before_proxy = proxy.connections().len();
    let before_server = server.accepted().len();
    let payload = format!("{what}\n");
    let reply = connect(from, dst, &opts(uid, &payload))
        .unwrap_or_else(|e| panic!("{what}: connect to {dst} failed: {e}"));
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(
        reply,
        format!("proxied-by:{port} orig:{dst}\n{payload}"),
        "{what}: bytes back from {dst}"
    );
    let conns = proxy
        .wait_for_connections(before_proxy + 1, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let rec = conns[before_proxy].clone();
    assert_eq!(
        (rec.listener_port, rec.original_dst),
        (port, dst),
        "{what}: stand-in record {rec:?}"
    );
    assert_eq!(
        server.accepted().len(),
        before_server,
        "{what}: the server must not see a captured connection: {:?}",
        server.accepted()
    );
    rec
}

/// Connect from `from` (as `uid`) to `dst`, expecting `server` to accept it directly and see
/// `want_peer` as the client address, and `proxy` (if any) to see nothing.
pub fn expect_direct(
    what: &str,
    from: &Netns,
    uid: Option<u32>,
    dst: SocketAddr,
    proxy: Option<&TransparentProxy>,
    server: &TcpServer,
    want_peer: IpAddr,
) -> SocketAddr {
    let before_proxy = proxy.map(|p| p.connections().len());
    let before_server = server.accepted().len();
    let payload = format!("{what}\n");
    let reply = connect(from, dst, &opts(uid, &payload))
        .unwrap_or_else(|e| panic!("{what}: connect to {dst} failed: {e}"));
    let reply = String::from_utf8_lossy(&reply);
    let first = reply.lines().next().unwrap_or_default();
    let (local, peer) = first
        .strip_prefix("server:")
        .and_then(|r| r.split_once(" peer:"))
        .unwrap_or_else(|| panic!("{what}: expected the server's greeting, got {reply:?}"));
    assert_eq!(local, dst.to_string(), "{what}: server's local address");
    let peer: SocketAddr = peer.parse().expect("peer address");
    assert_eq!(peer.ip(), want_peer, "{what}: peer the server saw");
    assert_eq!(
        reply,
        format!("{first}\n{payload}"),
        "{what}: echo from the server"
    );
    let accepted = server.accepted();
    assert_eq!(
        accepted.len(),
        before_server + 1,
        "{what}: server records {accepted:?}"
    );
    assert_eq!(accepted[before_server], (dst, peer), "{what}");
    if let (Some(p), Some(n)) = (proxy, before_proxy) {
        assert_eq!(
            p.connections().len(),
            n,
            "{what}: the stand-in must not see a bypassing connection: {:?}",
            p.connections()
        );
    }
    peer
}

/// A DNS question: `qname` to `dst`, over TCP or UDP.
#[derive(Debug, Clone, Copy)]
pub struct DnsAsk<'a> {
    pub tcp: bool,
    pub dst: SocketAddr,
    pub qname: &'a str,
}

/// One DNS query for `qname` to `dst` over UDP or TCP from `from` (as `uid`); checks the reply
/// answers it, and returns the record of the stand-in (`answered_by`) that got it. With
/// `answered_must_reply` false, a UDP query that gets no reply is accepted as long as
/// `answered_by` recorded it (see the comment inside).
pub fn dns_exchange(
    what: &str,
    from: &Netns,
    uid: Option<u32>,
    ask: DnsAsk<'_>,
    answered_by: &TransparentProxy,
    answered_must_reply: bool,
) -> DnsQuery {
    let DnsAsk { tcp, dst, qname } = ask;
    let before = answered_by.dns_queries().len();
    let id = 0x4d43;
    let query = dns_query(id, qname);
    let reply = if tcp {
        let mut framed = u16::try_from(query.len())
            .expect("short query")
            .to_be_bytes()
            .to_vec();
        framed.extend_from_slice(&query);
        let o = ConnectOpts {
            payload: framed,
            ..opts(uid, "")
        };
        let r = connect(from, dst, &o).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(r.len() > 2, "{what}: short TCP DNS reply {r:?}");
        r[2..].to_vec()
    } else {
        let mut o = ConnectOpts {
            payload: query.clone(),
            ..opts(uid, "")
        };
        if !answered_must_reply {
            o.timeout = Duration::from_millis(500);
        }
        match udp_exchange(from, dst, &o) {
            Ok(r) => r,
            // A captured UDP query's reply must leave the DNS proxy's socket in conntrack zone 2,
            // which the rules grant only to sockets owned by the proxy uid/gid; the testkit
            // stand-in's sockets are root's, so its reply cannot be un-NATed (see the module docs).
            // The query itself was captured, which the stand-in's record below proves.
            Err(e) if !answered_must_reply => {
                eprintln!("{what}: no reply (stand-in socket is not the proxy's): {e}");
                let queries = answered_by.dns_queries();
                assert_eq!(queries.len(), before + 1, "{what}: {queries:?}");
                let q = queries[before].clone();
                assert_eq!((q.qname.as_str(), q.proto), (qname, "udp"), "{what}");
                return q;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    };
    assert_eq!(&reply[..2], &id.to_be_bytes(), "{what}: reply id");
    assert_eq!(reply[2] & 0x80, 0x80, "{what}: reply has QR set");
    assert_eq!(
        &reply[reply.len() - 4..],
        &meshcni_testkit::proxy::DNS_ANSWER_V4.octets(),
        "{what}: A answer"
    );
    let queries = answered_by.dns_queries();
    assert_eq!(queries.len(), before + 1, "{what}: {queries:?}");
    let q = queries[before].clone();
    assert_eq!(q.qname, qname, "{what}");
    assert_eq!(q.proto, if tcp { "tcp" } else { "udp" }, "{what}");
    q
}

/// The plugin binary, for the init-container mode.
pub fn meshcni_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshcni"))
}
