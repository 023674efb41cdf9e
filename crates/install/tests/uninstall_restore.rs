//! Issue 7 item 5: uninstall gives the operator back their CNI config files byte for byte —
//! a hand-written primary conflist (odd key order, tabs, no trailing newline, characters the
//! reference's re-rendering escapes, numbers it re-formats), a `.conf` primary that the
//! install turned into a `.conflist`, and a primary that rewrote its file while we were
//! installed (then only our entry is cut out of its bytes).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshcni_install::{InstallConfig, InstallStatus, Installer, Shutdown};
use serde_json::Value;

/// 618 bytes, as an operator might have written it.
const HAND_WRITTEN: &str = "{\n    \"name\":\"k8s-pod-network\",\n\t\"cniVersion\" : \"0.3.1\",\r\n    \"plugins\": [\n        {\n            \"type\": \"calico\",\n            \"log_level\": \"info\",\n            \"datastore_type\": \"kubernetes\",\n            \"mtu\": 1440,\n            \"ipam\": { \"type\": \"calico-ipam\" },\n            \"policy\": {\"type\": \"k8s\"},\n            \"kubernetes\": {\"kubeconfig\": \"/etc/cni/net.d/calico-kubeconfig\"},\n            \"note\": \"a<b & c>d \\u00e9 (hand-made)\",\n            \"ratio\": 1.50\n        },\n\t{\"type\":\"portmap\",\"snat\":true,\"capabilities\":{\"portMappings\":true}},\n        { \"type\": \"bandwidth\", \"capabilities\": { \"bandwidth\": true } }\n    ]\n}";

const HAND_WRITTEN_V2: &str = "{ \"name\": \"k8s-pod-network\", \"cniVersion\": \"0.3.1\",\n  \"plugins\": [\n    { \"type\": \"calico\", \"mtu\": 1400, \"ipam\": { \"type\": \"calico-ipam\" } },\n    { \"type\": \"portmap\", \"capabilities\": { \"portMappings\": true } }\n  ]\n}\n\n";

const HAND_WRITTEN_CONF: &str = "{\"cniVersion\": \"0.4.0\", \"name\": \"bridge-net\",\n  \"type\": \"bridge\",   \"bridge\": \"cni0\", \"isGateway\": true,\n  \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.22.0.0/16\", \"routes\": [ {\"dst\": \"0.0.0.0/0\"} ]}}\n\n";

struct Lab {
    _tmp: tempfile::TempDir,
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    run_dir: PathBuf,
    cfg: InstallConfig,
}

fn lab(primary_name: &str, primary: &str) -> Lab {
    let tmp = tempfile::tempdir().expect("tmp");
    let conf_dir = tmp.path().join("net.d");
    let bin_dir = tmp.path().join("bin");
    let src_dir = tmp.path().join("src");
    let run_dir = tmp.path().join("run");
    let sa_dir = tmp.path().join("sa");
    for d in [&conf_dir, &bin_dir, &src_dir, &run_dir, &sa_dir] {
        fs::create_dir(d).expect("mkdir");
    }
    fs::write(src_dir.join("meshcni"), b"\x7fELF plugin").expect("fake binary");
    fs::write(sa_dir.join("token"), "token-1").expect("token");
    fs::write(sa_dir.join("ca.crt"), "ca").expect("ca");
    write_primary(&conf_dir.join(primary_name), primary, 0o644);
    let cfg = InstallConfig {
        mounted_cni_net_dir: conf_dir.clone(),
        cni_agent_run_dir: "/var/run/meshcni".into(),
        kubeconfig_dir: Some(run_dir.clone()),
        state_dir: Some(run_dir.clone()),
        service_account_dir: sa_dir,
        k8s_service_host: "10.96.0.1".into(),
        k8s_service_port: "443".into(),
        cni_bin_source_dir: src_dir,
        cni_bin_target_dirs: vec![bin_dir.clone()],
        ..InstallConfig::default()
    };
    Lab {
        _tmp: tmp,
        conf_dir,
        bin_dir,
        run_dir,
        cfg,
    }
}

/// Atomic write as a primary CNI would do it.
fn write_primary(path: &Path, content: &str, mode: u32) {
    let tmp = path.with_file_name(".primary-tmp");
    fs::write(&tmp, content).expect("write primary tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).expect("chmod");
    fs::rename(&tmp, path).expect("rename primary");
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn meshcni_entries(path: &Path) -> usize {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|d| {
            d["plugins"]
                .as_array()
                .map(|p| p.iter().filter(|p| p["type"] == "meshcni").count())
        })
        .unwrap_or(0)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

struct Keeper {
    status: Arc<InstallStatus>,
    shutdown: Shutdown,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    fn start(cfg: &InstallConfig) -> Keeper {
        let installer = Arc::new(Installer::new(cfg.clone()).expect("installer"));
        let status = Arc::new(InstallStatus::new());
        let shutdown = Shutdown::new();
        let handle = installer
            .spawn_keeper(status.clone(), shutdown.clone())
            .expect("spawn");
        Keeper {
            status,
            shutdown,
            handle: Some(handle),
        }
    }
    fn stop(&mut self) {
        self.shutdown.trigger();
        if let Some(h) = self.handle.take() {
            h.join().expect("keeper thread");
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Uninstall the way `meshcni-agent uninstall` does: a fresh installer (another process).
fn uninstall_fresh(cfg: &InstallConfig) {
    Installer::new(cfg.clone())
        .expect("installer")
        .uninstall()
        .expect("uninstall");
}

#[test]
fn uninstall_restores_a_hand_written_conflist_byte_for_byte() {
    assert_eq!(HAND_WRITTEN.len(), 618);
    let lab = lab("10-calico.conflist", HAND_WRITTEN);
    let path = lab.conf_dir.join("10-calico.conflist");
    let mut k = Keeper::start(&lab.cfg);
    assert!(wait_until(Duration::from_secs(5), || meshcni_entries(
        &path
    ) == 1
        && k.status.ready()));
    k.stop();
    uninstall_fresh(&lab.cfg);
    assert_eq!(
        fs::read_to_string(&path).expect("read"),
        HAND_WRITTEN,
        "primary not restored byte for byte"
    );
    assert_eq!(mode(&path), 0o644);
    assert_eq!(names(&lab.conf_dir), ["10-calico.conflist"]);
    assert!(names(&lab.run_dir).is_empty(), "{:?}", names(&lab.run_dir));
    assert!(names(&lab.bin_dir).is_empty());
}

#[test]
fn uninstall_restores_the_primarys_latest_version_after_it_rewrote_its_file() {
    let lab = lab("10-calico.conflist", HAND_WRITTEN);
    let path = lab.conf_dir.join("10-calico.conflist");
    let mut k = Keeper::start(&lab.cfg);
    assert!(wait_until(Duration::from_secs(5), || meshcni_entries(
        &path
    ) == 1
        && k.status.ready()));
    // The primary upgrades and writes a new version of its file (without our entry).
    write_primary(&path, HAND_WRITTEN_V2, 0o640);
    assert!(wait_until(Duration::from_secs(2), || {
        fs::read_to_string(&path).is_ok_and(|s| s.contains("1400")) && meshcni_entries(&path) == 1
    }));
    k.stop();
    uninstall_fresh(&lab.cfg);
    assert_eq!(fs::read_to_string(&path).expect("read"), HAND_WRITTEN_V2);
    assert_eq!(mode(&path), 0o640);
    assert!(names(&lab.run_dir).is_empty(), "{:?}", names(&lab.run_dir));
}

#[test]
fn uninstall_turns_a_converted_conf_back_into_the_original_conf() {
    let lab = lab("10-bridge.conf", HAND_WRITTEN_CONF);
    let conf = lab.conf_dir.join("10-bridge.conf");
    let list = lab.conf_dir.join("10-bridge.conflist");
    let mut k = Keeper::start(&lab.cfg);
    assert!(wait_until(Duration::from_secs(5), || meshcni_entries(
        &list
    ) == 1
        && k.status.ready()));
    assert!(!conf.exists(), "the .conf was converted into a .conflist");
    k.stop();
    uninstall_fresh(&lab.cfg);
    assert_eq!(names(&lab.conf_dir), ["10-bridge.conf"]);
    assert_eq!(fs::read_to_string(&conf).expect("read"), HAND_WRITTEN_CONF);
    assert_eq!(mode(&conf), 0o644);
    assert!(names(&lab.run_dir).is_empty(), "{:?}", names(&lab.run_dir));
}

#[test]
fn uninstall_cuts_only_our_entry_out_of_a_file_the_primary_rewrote_with_it() {
    let lab = lab("10-calico.conflist", HAND_WRITTEN);
    let path = lab.conf_dir.join("10-calico.conflist");
    let mut k = Keeper::start(&lab.cfg);
    assert!(wait_until(Duration::from_secs(5), || meshcni_entries(
        &path
    ) == 1
        && k.status.ready()));
    // The primary rewrites its file in its own style and keeps our entry (our entry is
    // current, so the keeper leaves the file alone).
    let doc: Value = serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
    let ours = doc["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["type"] == "meshcni"))
        .expect("our entry")
        .to_string();
    let head = "{\"name\": \"k8s-pod-network\", \"cniVersion\": \"0.3.1\", \"plugins\": [\n\t{\"type\": \"calico\", \"mtu\": 1300}";
    let with_ours = format!("{head},\n\t{ours}\n]}}\n");
    let without_ours = format!("{head}\n]}}\n");
    write_primary(&path, &with_ours, 0o600);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fs::read_to_string(&path).expect("read"),
        with_ours,
        "keeper rewrote a file holding our current entry"
    );
    k.stop();
    uninstall_fresh(&lab.cfg);
    assert_eq!(fs::read_to_string(&path).expect("read"), without_ours);
    assert_eq!(mode(&path), 0o600);
    assert!(names(&lab.run_dir).is_empty(), "{:?}", names(&lab.run_dir));
}
