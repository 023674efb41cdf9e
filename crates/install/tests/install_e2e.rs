//! Every case of `testdata/istio/install-e2e/cases.json` (Istio's whole-installer test): run
//! the keeper on temp dirs standing in for /etc/cni/net.d and /opt/cni/bin, tamper with the
//! result, stop, uninstall, and compare exact bytes at each step.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshcni_install::{InstallStatus, Installer, Shutdown, conflist};
use serde_json::Value;

const CORPUS: &str = "install-e2e";

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn file_is(p: &Path, want: &[u8]) -> bool {
    fs::read(p).is_ok_and(|b| b == want)
}

fn run_case(case: &Value) -> Result<(), String> {
    let name = s(case, "name").unwrap_or("?");
    let inputs = &case["inputs"];
    let settings = &inputs["settings"];
    let expect = &case["expect"];
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let conf_dir = tmp.path().join("net.d");
    let bin_dir = tmp.path().join("bin");
    let sa_dir = tmp.path().join("sa");
    let run_dir = tmp.path().join("run");
    for d in [&conf_dir, &bin_dir, &sa_dir, &run_dir] {
        fs::create_dir(d).map_err(|e| e.to_string())?;
    }
    populate(&conf_dir, CORPUS, inputs.get("conf_dir_files"));
    for f in ["ca.crt", "namespace", "token"] {
        fs::copy(fixtures(CORPUS).join("k8s_svcacct").join(f), sa_dir.join(f))
            .map_err(|e| e.to_string())?;
    }
    let mut cfg = config_from_settings(&Value::Null, settings, &conf_dir);
    cfg.cni_bin_source_dir = fixtures(CORPUS).join("bindir");
    cfg.cni_bin_target_dirs = vec![bin_dir.clone()];
    cfg.service_account_dir = sa_dir.clone();
    cfg.kubeconfig_dir = Some(run_dir.clone());
    let chained = cfg.chained_cni_plugin;

    let result = conf_dir.join(s(expect, "result_file").unwrap_or_default());
    let expected =
        fs::read(fixtures(CORPUS).join(s(expect, "expected_output").unwrap_or_default()))
            .map_err(|e| e.to_string())?;

    let installer = Arc::new(Installer::new(cfg).map_err(|e| e.to_string())?);
    let status = Arc::new(InstallStatus::new());
    let shutdown = Shutdown::new();
    let keeper = installer
        .spawn_keeper(status.clone(), shutdown.clone())
        .map_err(|e| e.to_string())?;
    let guard = StopOnDrop(shutdown.clone());

    // 2. delayed file: must still be waiting.
    if let Some(d) = inputs.get("delayed_file") {
        let after = Duration::from_millis(d["after_ms"].as_u64().unwrap_or(250));
        let end = Instant::now() + after;
        while Instant::now() < end {
            if file_is(&result, &expected) {
                return Err(format!(
                    "{name}: result written before the delayed file appeared"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fs::copy(
            fixtures(CORPUS).join(s(d, "source").unwrap_or_default()),
            conf_dir.join(s(d, "name").unwrap_or_default()),
        )
        .map_err(|e| e.to_string())?;
    }
    // 3. binary.
    if !wait_until(Duration::from_secs(5), || {
        bin_dir.join("istio-cni").exists()
    }) {
        return Err(format!("{name}: istio-cni binary not installed"));
    }
    // 4. result.
    if !wait_until(Duration::from_secs(3), || file_is(&result, &expected)) {
        return Err(format!(
            "{name}: result {} never matched; have {:?}; status error {:?}",
            result.display(),
            fs::read_to_string(&result),
            status.last_error()
        ));
    }
    if !wait_until(Duration::from_secs(3), || status.ready()) {
        return Err(format!("{name}: never ready: {:?}", status.last_error()));
    }
    // 5. tamper.
    if chained {
        let mut doc: Value = serde_json::from_slice(&fs::read(&result).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let plugins = doc["plugins"].as_array_mut().ok_or("no plugins")?;
        let i = plugins
            .iter()
            .position(|p| p["type"] == "istio-cni")
            .ok_or("no istio-cni")?;
        plugins.remove(i);
        fs::write(&result, conflist::render_sorted(&doc)).map_err(|e| e.to_string())?;
        fs::set_permissions(&result, fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
    } else {
        fs::remove_file(&result).map_err(|e| e.to_string())?;
    }
    // 6. restored.
    if !wait_until(Duration::from_secs(3), || file_is(&result, &expected)) {
        return Err(format!(
            "{name}: not restored after tampering: {:?}",
            fs::read_to_string(&result)
        ));
    }
    if chained
        && fs::metadata(&result)
            .map(|m| m.permissions().mode() & 0o777)
            .ok()
            != Some(0o644)
    {
        return Err(format!("{name}: primary file mode not preserved"));
    }
    // 7. stop + clean up.
    drop(guard);
    keeper.join().map_err(|_| "keeper panicked")?;
    installer
        .uninstall()
        .map_err(|e| format!("{name}: uninstall: {e}"))?;
    // 8.
    if chained {
        let clean = fs::read(
            fixtures(CORPUS).join(s(expect, "expected_after_cleanup").unwrap_or_default()),
        )
        .map_err(|e| e.to_string())?;
        if !file_is(&result, &clean) {
            return Err(format!(
                "{name}: after cleanup: {:?}",
                fs::read_to_string(&result)
            ));
        }
    } else if result.exists() {
        return Err(format!("{name}: standalone file not removed"));
    }
    // 9. binaries gone (all of ours: istio-cni and istio-iptables).
    let left: Vec<PathBuf> = fs::read_dir(&bin_dir)
        .map_err(|e| e.to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if !left.is_empty() {
        return Err(format!("{name}: binaries left: {left:?}"));
    }
    if run_dir.join("istio-cni-kubeconfig").exists() {
        return Err(format!("{name}: kubeconfig left"));
    }
    // 10. no temp files.
    for (n, _) in snapshot(&conf_dir) {
        if n.contains(".tmp") || n.contains("meshcni-tmp") {
            return Err(format!("{name}: temp file {n} left"));
        }
    }
    Ok(())
}

struct StopOnDrop(Shutdown);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

#[test]
fn istio_install_e2e_cases() {
    let doc = load_cases(CORPUS);
    let cases = doc["cases"].as_array().expect("cases").clone();
    assert_eq!(cases.len(), 16, "case count changed");
    // Cases are independent (own temp dirs): run them concurrently.
    let handles: Vec<_> = cases
        .into_iter()
        .map(|c| std::thread::spawn(move || run_case(&c)))
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|h| match h.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("case panicked".into()),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} e2e cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
