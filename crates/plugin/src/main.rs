//! `meshcni`: the CNI plugin binary. Without arguments it speaks CNI (exec'd by the container
//! runtime); `meshcni iptables …` is the init-container mode (Istio's `istio-iptables` CLI).
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut argv = std::env::args_os();
    let _ = argv.next();
    if let Some(sub) = argv.next()
        && (sub == "iptables" || sub == "istio-iptables")
    {
        std::process::exit(meshcni_plugin::init_mode::main(std::env::args_os().skip(2)));
    }
    let start = Instant::now();
    let mut stdin = Vec::new();
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command != "VERSION" && !command.is_empty() {
        let _ = std::io::stdin()
            .take(meshcni_cni::skel::MAX_STDIN_BYTES + 1)
            .read_to_end(&mut stdin);
    }
    let mut stdout = std::io::stdout().lock();
    let code = meshcni_cni::run(
        &meshcni_plugin::flow::MeshPlugin,
        |k| std::env::var(k).ok(),
        stdin.as_slice(),
        &mut stdout,
    );
    let _ = stdout.flush();
    if !command.is_empty() {
        meshcni_plugin::report::send(&run_dir(&stdin), &command, code == 0, start.elapsed());
    }
    std::process::exit(code);
}

/// The agent run dir named in the config (for the metrics report), cheaply and leniently.
fn run_dir(stdin: &[u8]) -> PathBuf {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        cni_agent_run_dir: Option<String>,
    }
    serde_json::from_slice::<Probe>(stdin)
        .ok()
        .and_then(|p| p.cni_agent_run_dir)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(meshcni_plugin::config::DEFAULT_AGENT_RUN_DIR))
}
