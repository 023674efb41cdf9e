//! Every case of `testdata/istio/install/cases.json` (Istio's cniconfig/install/kubeconfig unit
//! tests), compared byte for byte per the case's comparison rule.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::*;
use meshcni_install::{
    InstallError, Installer, OwnedTypes, Wait, check_valid_cni_config, conflist,
    get_config_filenames, resolve_config_path, write_cni_config,
};
use serde_json::Value;

const CORPUS: &str = "install";

fn fixture_bytes(name: &str) -> Vec<u8> {
    fs::read(fixtures(CORPUS).join(name)).expect("read fixture")
}

/// Golden comparison: byte-exact (which implies the trimmed comparison Istio uses).
fn compare(case: &str, got: &[u8], golden: &str) -> Result<(), String> {
    let want = fixture_bytes(golden);
    if got == want.as_slice() {
        return Ok(());
    }
    let how = if trimmed(got) == trimmed(&want) {
        "trimmed equal but bytes differ"
    } else {
        "differs"
    };
    Err(format!(
        "{case}: output {how} from {golden}\n--- got ---\n{}\n--- want ---\n{}",
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(&want)
    ))
}

fn run_case(defaults: &Value, case: &Value) -> Result<(), String> {
    let name = s(case, "name").unwrap_or("?");
    let kind = s(case, "kind").unwrap_or("?");
    let inputs = &case["inputs"];
    let expect = &case["expect"];
    let empty = Value::Object(Default::default());
    let settings = inputs.get("settings").unwrap_or(&empty);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let conf_dir = dir.path().join("net.d");
    fs::create_dir(&conf_dir).map_err(|e| e.to_string())?;
    populate(&conf_dir, CORPUS, inputs.get("conf_dir_files"));
    populate_inline(&conf_dir, inputs.get("conf_dir_inline_files"));
    let cfg = config_from_settings(defaults, settings, &conf_dir);

    match kind {
        "insert_cni_config" => {
            let new = fixture_bytes(s(inputs, "new_plugin_config_file").unwrap_or_default());
            let existing = fixture_bytes(s(inputs, "existing_config_file").unwrap_or_default());
            let res = conflist::insert(&new, &existing, &OwnedTypes::new("istio-cni", &[]));
            match (res, s(expect, "output_equals")) {
                (Ok(out), Some(golden)) => compare(name, &out, golden),
                (Err(_), None) if expect["error"] == true => Ok(()),
                (r, _) => Err(format!("{name}: unexpected result {r:?}")),
            }
        }
        "create_cni_config_file" => {
            let wait_ms = inputs["wait_limit_ms"].as_u64().unwrap_or(100);
            let before = snapshot(&conf_dir);
            let res = write_cni_config(&cfg, &Wait::timeout(Duration::from_millis(wait_ms)));
            match (res, s(expect, "result_file")) {
                (Ok(w), Some(result_file)) => {
                    if w.path != conf_dir.join(result_file) {
                        return Err(format!(
                            "{name}: wrote {} want {result_file}",
                            w.path.display()
                        ));
                    }
                    let got = fs::read(&w.path).map_err(|e| e.to_string())?;
                    compare(name, &got, s(expect, "content_equals").unwrap_or_default())?;
                    if result_file.ends_with(".conflist") {
                        // A renamed .conf must be gone; a primary in owned mode untouched.
                        let conf_name = result_file.trim_end_matches("list");
                        let had = |n: &str| before.iter().any(|(b, _)| b == n);
                        if cfg.owned_mode() {
                            for (n, content) in &before {
                                let now = fs::read(conf_dir.join(n))
                                    .map_err(|e| format!("{name}: {n}: {e}"))?;
                                if &now != content {
                                    return Err(format!(
                                        "{name}: primary {n} was modified in owned mode"
                                    ));
                                }
                            }
                        } else if had(conf_name)
                            && !had(result_file)
                            && conf_dir.join(conf_name).exists()
                        {
                            return Err(format!(
                                "{name}: {conf_name} still exists after conversion"
                            ));
                        }
                    }
                    Ok(())
                }
                (Err(InstallError::Timeout { .. }), None) => {
                    if snapshot(&conf_dir) != before {
                        return Err(format!("{name}: files changed although the call failed"));
                    }
                    Ok(())
                }
                (r, _) => Err(format!("{name}: unexpected result {r:?}")),
            }
        }
        "cleanup" => {
            let bin_dir = dir.path().join("bin");
            fs::create_dir(&bin_dir).map_err(|e| e.to_string())?;
            populate_inline(&bin_dir, inputs.get("bin_dir_inline_files"));
            let mut cfg = cfg.clone();
            cfg.kubeconfig_dir = Some(conf_dir.clone());
            cfg.kubecfg_file_name = s(inputs, "installed_kubeconfig_file")
                .unwrap_or_default()
                .into();
            cfg.cni_bin_target_dirs = vec![bin_dir.clone()];
            cfg.cni_bin_names = vec!["istio-cni".into()];
            let inst = Installer::new(cfg).map_err(|e| e.to_string())?;
            inst.adopt_installed_config(
                conf_dir.join(s(inputs, "installed_config_file").unwrap_or_default()),
            );
            inst.uninstall()
                .map_err(|e| format!("{name}: uninstall: {e}"))?;
            for d in expect["deleted"].as_array().into_iter().flatten() {
                let d = d.as_str().unwrap_or_default();
                let p = match d.strip_prefix("<bin>/") {
                    Some(b) => bin_dir.join(b),
                    None => conf_dir.join(d),
                };
                if p.exists() {
                    return Err(format!("{name}: {d} still exists"));
                }
            }
            if let Some(f) = s(expect, "file") {
                let got = fs::read(conf_dir.join(f)).map_err(|e| e.to_string())?;
                compare(name, &got, s(expect, "content_equals").unwrap_or_default())?;
            }
            Ok(())
        }
        "create_kubeconfig" => {
            let sa = dir.path().join("sa");
            fs::create_dir(&sa).map_err(|e| e.to_string())?;
            populate_inline(&sa, inputs.get("service_account_dir_inline_files"));
            let mut cfg = cfg.clone();
            cfg.service_account_dir = sa;
            cfg.kube_ca_file = s(settings, "kube_ca_file")
                .filter(|f| !f.is_empty())
                .map(|f| fixtures(CORPUS).join(f));
            let inst = Installer::new(cfg).map_err(|e| e.to_string())?;
            match (inst.render_kubeconfig(), s(expect, "output_equals")) {
                (Ok(y), Some(golden)) => compare(name, y.as_bytes(), golden),
                (Err(InstallError::Kubeconfig { .. }), None) => Ok(()),
                (r, _) => Err(format!("{name}: unexpected result {r:?}")),
            }
        }
        "check_valid_cni_config" => {
            let path = conf_dir.join(s(inputs, "config_file_to_check").unwrap_or_default());
            let res = check_valid_cni_config(&cfg, &path);
            let want = expect["valid"].as_bool().unwrap_or(false);
            if res.is_ok() == want {
                Ok(())
            } else {
                Err(format!(
                    "{name}: valid={} want {want} ({res:?})",
                    res.is_ok()
                ))
            }
        }
        "get_cni_config_filepath" => {
            let stop = Arc::new(AtomicBool::new(false));
            let cancelled = s(inputs, "context").is_some();
            let wait = if cancelled {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                Wait::until_stopped(stop.clone())
            } else {
                Wait::timeout(Duration::from_secs(3))
            };
            let mut delayed_at = None;
            let writer = inputs.get("delayed_file").map(|d| {
                let after = Duration::from_millis(d["after_ms"].as_u64().unwrap_or(250));
                let dst = conf_dir.join(s(d, "name").unwrap_or_default());
                let src = fixtures(CORPUS).join(s(d, "source").unwrap_or_default());
                delayed_at = Some(Instant::now() + after);
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    // When the write starts, not when the copy returns: the resolver may rightly
                    // see the finished file (and record its own instant) before this thread is
                    // scheduled again, which made the old check flaky under load (CI).
                    let started = Instant::now();
                    fs::copy(src, &dst).expect("delayed copy");
                    started
                })
            });
            let res = resolve_config_path(&cfg, &wait);
            let resolved_at = Instant::now();
            let write_started = writer.map(|w| w.join().expect("writer"));
            match (res, s(expect, "resolved_file")) {
                (Ok(p), Some(f)) => {
                    if p != conf_dir.join(f) {
                        return Err(format!("{name}: resolved {} want {f}", p.display()));
                    }
                    if let Some(w) = write_started {
                        if resolved_at < w {
                            return Err(format!("{name}: resolved before the file was written"));
                        }
                        // Well under the 3 s wait: the resolver noticed the file, it did not run
                        // into its timeout (loose bound: the machine may be loaded).
                        if resolved_at - w > Duration::from_millis(1500) {
                            return Err(format!(
                                "{name}: resolved {:?} after the write",
                                resolved_at - w
                            ));
                        }
                    }
                    Ok(())
                }
                (Err(InstallError::Cancelled { .. }), None) if cancelled => Ok(()),
                (r, _) => Err(format!("{name}: unexpected result {r:?}")),
            }
        }
        "get_config_filenames" => {
            let target = match s(inputs, "dir") {
                Some(d) => Path::new(d).to_path_buf(),
                None => {
                    populate_inline(&conf_dir, inputs.get("dir_files_inline"));
                    conf_dir.clone()
                }
            };
            match (get_config_filenames(&target), s(expect, "first")) {
                (Ok(names), Some(first)) if names.first().map(String::as_str) == Some(first) => {
                    Ok(())
                }
                (Err(_), None) if expect["error"] == true => Ok(()),
                (r, _) => Err(format!("{name}: unexpected result {r:?}")),
            }
        }
        other => Err(format!("{name}: unknown kind {other}")),
    }
}

#[test]
fn istio_install_cases() {
    let doc = load_cases(CORPUS);
    let cases = doc["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 56, "case count changed");
    let mut failures = Vec::new();
    for case in cases {
        if let Err(e) = run_case(&doc["defaults"], case) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    println!("{} install cases passed", cases.len());
}

/// The G1 path: `CNI_NETWORK_CONFIG` template (`istio-cni.conf.template`, as in Istio 1.20's
/// cniconfig test with log level `debug` and kubeconfig file name `/path/to/kubeconfig`)
/// merged into `list.conflist` gives exactly `list-with-istio.conflist`; standalone writes the
/// substituted template verbatim; the template file wins over the inline template.
#[test]
fn g1_template_config() {
    let template = String::from_utf8(fixture_bytes("istio-cni.conf.template")).expect("utf8");
    let dir = tempfile::tempdir().expect("tmp");
    fs::copy(
        fixtures(CORPUS).join("list.conflist"),
        dir.path().join("list.conflist"),
    )
    .expect("copy");
    let cfg = meshcni_install::InstallConfig {
        mounted_cni_net_dir: dir.path().to_path_buf(),
        cni_network_config: template.clone(),
        plugin_log_level: "debug".into(),
        kubecfg_file_name: "/path/to/kubeconfig".into(),
        plugin_type: "istio-cni".into(),
        plugin_name: "istio-cni".into(),
        ..Default::default()
    };
    let w = write_cni_config(&cfg, &Wait::no_wait()).expect("write");
    assert_eq!(w.path, dir.path().join("list.conflist"));
    compare(
        "g1 template chained",
        &fs::read(&w.path).expect("read"),
        "list-with-istio.conflist",
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let standalone_dir = tempfile::tempdir().expect("tmp");
    let tfile = standalone_dir.path().join("template.json");
    fs::write(
        &tfile,
        template.replace("__LOG_LEVEL__", "from-file-__LOG_LEVEL__"),
    )
    .expect("w");
    let cfg = meshcni_install::InstallConfig {
        mounted_cni_net_dir: standalone_dir.path().to_path_buf(),
        chained_cni_plugin: false,
        cni_network_config_file: Some(tfile),
        ..cfg
    };
    let w = write_cni_config(&cfg, &Wait::no_wait()).expect("write");
    assert_eq!(w.path, standalone_dir.path().join("YYY-istio-cni.conf"));
    let want = template
        .replace("__LOG_LEVEL__", "from-file-debug")
        .replace("__KUBECONFIG_FILENAME__", "/path/to/kubeconfig");
    assert_eq!(fs::read_to_string(&w.path).expect("read"), want);
}
