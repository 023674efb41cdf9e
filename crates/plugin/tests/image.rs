//! The container image built by `scripts/build-image.sh`, for real:
//! * its name:tag is the chart's default image (values.yaml hub/image/tag), the plain
//!   manifest's, and tag = Chart appVersion = the workspace version;
//! * two builds give the same digest and byte-identical archives;
//! * imported into a private containerd (`ctr images import`, in a node netns this test
//!   creates) every binary in it starts — `meshcni-agent`, the `meshcni` plugin, the iptables
//!   legacy and nft variants and their plain names, `nft`, `ipset` — and, in a privileged
//!   container (its own fresh netns), the plugin's init mode writes Istio's capture rules with
//!   both iptables variants (the xtables modules load), `nft` creates a table and `ipset` a set;
//! * the test images (`--test-images`) build reproducibly under their fixed names; `pause` runs
//!   and exits 0 on SIGTERM, busybox applets run, the ztunnel stand-in starts.
//!
//! Needs root, containerd, ctr, runc (scripts/setup.sh); fails, never skips, without them.

#[allow(dead_code)] // the support module serves runtimes.rs too
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Containerd, Netns, cmd, output, repo_root, require, run_ok, script};

/// `key: value` of a top-level scalar in a YAML file of the chart (quotes stripped).
fn yaml_scalar(rel: &str, key: &str) -> String {
    let path = repo_root().join(rel);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| {
            v.split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_string()
        })
        .unwrap_or_else(|| panic!("{rel} has no top-level {key}:"))
}

#[test]
fn image_name_is_the_chart_default_and_the_manifest_image() {
    let printed = run_ok(Command::new(script("build-image.sh")).arg("--print-ref"));
    let printed = printed.trim();
    let values = "deploy/helm/meshcni/values.yaml";
    let want = format!(
        "{}/{}:{}",
        yaml_scalar(values, "hub"),
        yaml_scalar(values, "image"),
        yaml_scalar(values, "tag")
    );
    assert_eq!(
        printed, want,
        "build-image.sh builds the chart's default image"
    );
    assert_eq!(
        yaml_scalar(values, "tag"),
        yaml_scalar("deploy/helm/meshcni/Chart.yaml", "appVersion"),
        "the image tag is the Chart appVersion"
    );
    assert_eq!(
        yaml_scalar(values, "tag"),
        env!("CARGO_PKG_VERSION"),
        "the image tag is the workspace version (what --version prints)"
    );
    let manifest = fs::read_to_string(repo_root().join("deploy/manifests/meshcni.yaml"))
        .expect("read manifest");
    let images: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(|v| v.trim().trim_matches('"'))
        .collect();
    assert!(!images.is_empty(), "the manifest names an image");
    assert!(
        images.iter().all(|i| *i == printed),
        "every image in deploy/manifests/meshcni.yaml is {printed}: {images:?}"
    );
}

/// Run build-image.sh with `args`; its stdout JSON lines.
fn build_image(args: &[&str], epoch: &str) -> Vec<Value> {
    let out = output(
        Command::new(script("build-image.sh"))
            .args(args)
            .env("SOURCE_DATE_EPOCH", epoch),
    );
    assert!(
        out.status.success(),
        "build-image.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!(
        "{}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("build-image.sh:"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

struct Node {
    // Field order = drop order: containerd stops before its netns goes.
    containerd: Containerd,
    _ns: Netns,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = Netns::new("img");
        let (bin, conf) = (dir.path().join("cni-bin"), dir.path().join("cni-conf"));
        fs::create_dir_all(&bin).expect("mkdir");
        fs::create_dir_all(&conf).expect("mkdir");
        let state = dir.path().join("containerd");
        fs::create_dir_all(&state).expect("mkdir");
        let containerd = Containerd::start(&ns, &state, &bin, &conf);
        Node {
            containerd,
            _ns: ns,
            _dir: dir,
        }
    }

    fn import(&self, tar: &Path) {
        let tar = tar.display().to_string();
        run_ok(
            &mut self
                .containerd
                .ctr(&["-n", "meshcni-img", "images", "import", &tar]),
        );
    }

    /// `ctr run --rm` of `image` with `argv`; each run gets its own fresh netns (no --net-host).
    fn run(&self, image: &str, extra: &[&str], argv: &[&str]) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "mcni-img-{}",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut args = vec!["-n", "meshcni-img", "run", "--rm"];
        args.extend_from_slice(extra);
        args.push(image);
        args.push(&id);
        args.extend_from_slice(argv);
        run_ok(&mut self.containerd.ctr(&args))
    }
}

#[test]
fn image_is_reproducible_and_every_binary_runs_in_containerd() {
    require(
        &[
            "containerd",
            "ctr",
            "runc",
            "ip",
            "nsenter",
            "python3",
            "cargo",
        ],
        &[],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    let epoch = run_ok(&mut cmd(
        "git",
        &[
            "-C",
            &repo_root().display().to_string(),
            "log",
            "-1",
            "--format=%ct",
        ],
    ));
    let epoch = epoch.trim();
    let first = build_image(&["--out", &a.display().to_string()], epoch);
    let second = build_image(&["--out", &b.display().to_string()], epoch);
    let (first, second) = (&first[0], &second[0]);
    assert_eq!(
        first["digest"], second["digest"],
        "same inputs, same digest"
    );
    assert_eq!(
        fs::read(&a).expect("read a"),
        fs::read(&b).expect("read b"),
        "byte-identical archives"
    );
    let name = first["name"].as_str().expect("name").to_string();
    eprintln!(
        "image {name} {}: compressed {} bytes, uncompressed {} bytes",
        first["digest"], first["size_compressed"], first["size_uncompressed"]
    );

    let node = Node::start();
    node.import(&a);
    let listed = run_ok(&mut node.containerd.ctr(&["-n", "meshcni-img", "images", "ls"]));
    let digest = first["digest"].as_str().expect("digest");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&name) && l.contains(digest)),
        "ctr lists {name} at {digest}:\n{listed}"
    );

    let version = node.run(&name, &[], &["meshcni-agent", "--version"]);
    assert_eq!(
        version.trim(),
        format!("meshcni-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let plugin = node.run(
        &name,
        &["--env", "CNI_COMMAND=VERSION"],
        &["/opt/cni/bin/meshcni"],
    );
    let plugin: Value = serde_json::from_str(&plugin).expect("CNI VERSION answer is JSON");
    assert!(
        plugin["supportedVersions"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "{plugin}"
    );
    for (bin, want) in [
        ("iptables-legacy", "(legacy)"),
        ("iptables-legacy-save", "(legacy)"),
        ("iptables-legacy-restore", "(legacy)"),
        ("ip6tables-legacy-save", "(legacy)"),
        ("ip6tables-legacy-restore", "(legacy)"),
        ("iptables-nft", "(nf_tables)"),
        ("iptables-nft-save", "(nf_tables)"),
        ("iptables-nft-restore", "(nf_tables)"),
        ("ip6tables-nft-save", "(nf_tables)"),
        ("ip6tables-nft-restore", "(nf_tables)"),
        ("iptables", "(nf_tables)"),
        ("iptables-save", "(nf_tables)"),
        ("iptables-restore", "(nf_tables)"),
        ("ip6tables", "(nf_tables)"),
        ("ip6tables-save", "(nf_tables)"),
        ("ip6tables-restore", "(nf_tables)"),
        ("nft", "nftables v"),
        ("ipset", "ipset v"),
    ] {
        // ipset --version also asks the kernel for its protocol version: needs CAP_NET_ADMIN
        // (privileged container, still in its own new netns).
        let extra: &[&str] = if bin == "ipset" {
            &["--privileged"]
        } else {
            &[]
        };
        let out = node.run(&name, extra, &[bin, "--version"]);
        assert!(out.contains(want), "{bin} --version: {out:?}");
    }

    // Real work in a privileged container (its own new netns, never the node's or the host's):
    // Istio's sidecar capture through both iptables variants (loads the tcp, owner, mark,
    // REDIRECT, … xtables modules), an nft table, an ipset.
    for flavor in ["legacy", "nft"] {
        node.run(
            &name,
            &["--privileged"],
            &[
                "/opt/cni/bin/meshcni",
                "iptables",
                "--force-iptables-binary",
                flavor,
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-b",
                "*",
            ],
        );
    }
    node.run(
        &name,
        &["--privileged"],
        &["nft", "add", "table", "inet", "mcni_img"],
    );
    node.run(
        &name,
        &["--privileged"],
        &["ipset", "create", "mcni-img", "hash:ip"],
    );
}

#[test]
fn test_images_pause_and_busybox_run() {
    require(
        &["containerd", "ctr", "runc", "ip", "nsenter", "gcc"],
        &[PathBuf::from("/bin/busybox")],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("images");
    let built = build_image(
        &["--test-images", &out_dir.display().to_string()],
        "1700000000",
    );
    let names: Vec<&str> = built.iter().filter_map(|j| j["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "localhost/meshcni/pause:1.0",
            "localhost/meshcni/busybox:1.35.0",
            "localhost/meshcni/ztunnel-standin:test"
        ]
    );
    let again = build_image(
        &[
            "--test-images",
            &dir.path().join("again").display().to_string(),
        ],
        "1700000000",
    );
    assert_eq!(
        built
            .iter()
            .map(|j| j["digest"].clone())
            .collect::<Vec<_>>(),
        again
            .iter()
            .map(|j| j["digest"].clone())
            .collect::<Vec<_>>(),
        "test images are reproducible too"
    );
    let node = Node::start();
    node.import(&out_dir.join("pause.tar"));
    node.import(&out_dir.join("busybox.tar"));
    node.import(&out_dir.join("ztunnel-standin.tar"));
    // The ztunnel stand-in starts in its image (its libraries are there).
    let usage = node.run(
        "localhost/meshcni/ztunnel-standin:test",
        &[],
        &["/usr/local/bin/meshcni-ztunnel-standin", "--help"],
    );
    assert_eq!(usage.trim(), "usage: meshcni-ztunnel-standin [--uds PATH]");
    let v = node.run("localhost/meshcni/pause:1.0", &[], &["/bin/pause", "-v"]);
    assert_eq!(v.trim(), "meshcni-pause 1.0");
    // As a sandbox: PID 1 of its container, sleeping until SIGTERM, then exit status 0
    // (`ctr task delete` exits with the task's status).
    let ctr = |args: &[&str]| {
        let mut all = vec!["-n", "meshcni-img"];
        all.extend_from_slice(args);
        node.containerd.ctr(&all)
    };
    run_ok(&mut ctr(&[
        "run",
        "-d",
        "localhost/meshcni/pause:1.0",
        "mcni-pause",
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = |want: &str| {
        run_ok(&mut ctr(&["task", "ls"]))
            .lines()
            .any(|l| l.starts_with("mcni-pause") && l.contains(want))
    };
    while !status("RUNNING") {
        assert!(Instant::now() < deadline, "pause never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(status("RUNNING"), "pause keeps running until signalled");
    run_ok(&mut ctr(&[
        "task",
        "kill",
        "--signal",
        "SIGTERM",
        "mcni-pause",
    ]));
    while !status("STOPPED") {
        assert!(Instant::now() < deadline, "pause did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
    run_ok(&mut ctr(&["task", "delete", "mcni-pause"]));
    run_ok(&mut ctr(&["container", "delete", "mcni-pause"]));
    let echo = node.run(
        "localhost/meshcni/busybox:1.35.0",
        &[],
        &["/bin/echo", "busybox", "runs"],
    );
    assert_eq!(echo.trim(), "busybox runs");
    let links = node.run(
        "localhost/meshcni/busybox:1.35.0",
        &[],
        &["ip", "-o", "link"],
    );
    assert!(links.contains("lo:"), "{links}");
}
