//! `meshcni-demo`: builds a throw-away node out of network namespaces, starts pods through the
//! real `meshcni` plugin with `cnitool`, shows the rules the plugin installed, makes real flows
//! and prints where each one was captured; then DELs every pod and removes every namespace.
//! Run it through `scripts/demo.sh` (as root).
//!
//! ```text
//! meshcni-demo [--plugin-dir DIR] [--cni-plugins DIR] [--work-dir DIR] [--section NAME]...
//!              [--ambient-mode inpod|iptables|ebpf]
//! ```
//! * `--plugin-dir` — where the built `meshcni` is (default: this binary's directory);
//! * `--cni-plugins` — the reference plugins (default `/usr/lib/cni`);
//! * `--work-dir` — conflist, pod metadata, IPAM state, and the list of namespaces created
//!   (`<dir>/netns`, for the caller's cleanup trap); default a fresh `/tmp/mcni-demo-<pid>`;
//! * `--section` — run only the named section(s) (`sidecar`, `ambient`); default: all;
//! * `--ambient-mode` — the agent's redirect mode in the ambient section: `inpod` (the default,
//!   as the agent's), `iptables` or `ebpf` (tc programs and pinned maps on a private bpffs).
//!
//! Sections are modules (`sidecar`, `ambient`), listed in [`SECTIONS`].
#![forbid(unsafe_code)]

mod ambient;
mod ambient_inpod;
mod error;
mod flows;
mod node;
mod sidecar;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use error::DemoError;
use flows::Row;
use node::Node;

/// What a section may need besides the node: where the built binaries are and the work dir.
pub struct SectionEnv {
    /// Directory of the built `meshcni`, `meshcni-agent`.
    pub plugin_dir: PathBuf,
    /// The demo's work dir (scratch files; `<work>/netns` lists namespaces for the trap).
    pub work: PathBuf,
    /// The ambient section's redirect mode.
    pub ambient_mode: AmbientMode,
}

/// The ambient section's redirect mode (`--ambient-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmbientMode {
    /// Rules inside each pod, netns handed to ztunnel over ZDS (the agent's default).
    Inpod,
    /// Node-level iptables + tunnels into the ztunnel pod.
    Iptables,
    /// Node-level tc eBPF programs and pinned maps (no iptables anywhere).
    Ebpf,
}

impl AmbientMode {
    const NAMES: &'static str = "inpod, iptables, ebpf";

    fn parse(s: &str) -> Option<AmbientMode> {
        match s {
            "inpod" => Some(AmbientMode::Inpod),
            "iptables" => Some(AmbientMode::Iptables),
            "ebpf" => Some(AmbientMode::Ebpf),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AmbientMode::Inpod => "inpod",
            AmbientMode::Iptables => "iptables",
            AmbientMode::Ebpf => "ebpf",
        }
    }
}

const USAGE: &str = "meshcni-demo [--plugin-dir DIR] [--cni-plugins DIR] [--work-dir DIR] \
[--section sidecar|ambient]... [--ambient-mode inpod|iptables|ebpf]";

/// One demo section: its `--section` name, its title and what it runs.
type Section = (
    &'static str,
    fn(&SectionEnv) -> String,
    fn(&mut Node, &SectionEnv) -> Result<Vec<Row>, DemoError>,
);

/// The sections, in order.
const SECTIONS: &[Section] = &[
    (
        "sidecar",
        |_| "sidecar mode".to_string(),
        |node, _| sidecar::run(node),
    ),
    (
        "ambient",
        |env| {
            format!(
                "ambient mode ({} redirect, 2 nodes, meshcni-agent per node)",
                env.ambient_mode.name()
            )
        },
        |node, env| match env.ambient_mode {
            AmbientMode::Inpod => ambient_inpod::run(node, env),
            AmbientMode::Iptables | AmbientMode::Ebpf => ambient::run(node, env),
        },
    ),
];

struct Opts {
    plugin_dir: PathBuf,
    cni_plugins: PathBuf,
    work_dir: Option<PathBuf>,
    sections: Vec<String>,
    ambient_mode: AmbientMode,
}

fn parse_args() -> Result<Opts, DemoError> {
    parse_args_from(std::env::args().skip(1))
}

/// The options in `args` (without the program name).
fn parse_args_from(args: impl IntoIterator<Item = String>) -> Result<Opts, DemoError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut opts = Opts {
        plugin_dir: exe_dir,
        cni_plugins: PathBuf::from("/usr/lib/cni"),
        work_dir: None,
        sections: Vec::new(),
        ambient_mode: AmbientMode::Inpod,
    };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .map(PathBuf::from)
                .ok_or_else(|| DemoError::Usage(format!("{a} needs a value\n{USAGE}")))
        };
        match a.as_str() {
            "--plugin-dir" => opts.plugin_dir = value()?,
            "--cni-plugins" => opts.cni_plugins = value()?,
            "--work-dir" => opts.work_dir = Some(value()?),
            "--ambient-mode" => {
                let name = value()?.display().to_string();
                opts.ambient_mode = AmbientMode::parse(&name).ok_or_else(|| {
                    DemoError::Usage(format!(
                        "unknown ambient mode {name:?} (known: {})\n{USAGE}",
                        AmbientMode::NAMES
                    ))
                })?;
            }
            "--section" => {
                let name = value()?.display().to_string();
                if !SECTIONS.iter().any(|s| s.0 == name) {
                    let known: Vec<&str> = SECTIONS.iter().map(|s| s.0).collect();
                    return Err(DemoError::Usage(format!(
                        "unknown section {name:?} (known: {})",
                        known.join(", ")
                    )));
                }
                opts.sections.push(name);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                return Err(DemoError::Usage(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )));
            }
        }
    }
    Ok(opts)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn preflight(opts: &Opts) -> Result<(), DemoError> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for p in [
        "ip",
        "cnitool",
        "iptables-nft-save",
        "iptables-legacy-save",
        "nft",
        "nsenter",
        "ipset",
    ] {
        if !on_path(p) {
            missing.push(format!("`{p}` on PATH"));
        }
    }
    let meshcni = opts.plugin_dir.join("meshcni");
    if !meshcni.is_file() {
        missing.push(format!("{} (build the workspace first)", meshcni.display()));
    }
    for p in ["bridge", "host-local", "portmap"] {
        let f = opts.cni_plugins.join(p);
        if !f.is_file() {
            missing.push(f.display().to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DemoError::Precondition(format!(
            "missing {}; run `scripts/demo.sh` as root (it installs what is needed via scripts/setup.sh)",
            missing.join(", ")
        )))
    }
}

/// Print a section heading.
pub fn heading(text: &str) {
    println!("\n── {text}");
}

/// Print `text` indented by four spaces.
pub fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn run(opts: &Opts) -> Result<bool, DemoError> {
    preflight(opts)?;
    let started = Instant::now();
    let (work, owned) = match &opts.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("mcni-demo-{}", std::process::id())),
            true,
        ),
    };
    let mut node = Node::new(&work, &opts.plugin_dir, &opts.cni_plugins)?;
    println!("meshcni demo: a throw-away node made of network namespaces");
    println!(
        "  node netns {} (bridge {} on {}, gateway .1), CNI network {}",
        node.netns().name(),
        node::BRIDGE,
        node::SUBNET,
        node.network_name()
    );
    println!(
        "  plugin {}, conflist {}",
        opts.plugin_dir.join("meshcni").display(),
        node.conflist_path().display()
    );

    let mut rows = Vec::new();
    let mut result = Ok(());
    let env = SectionEnv {
        plugin_dir: opts.plugin_dir.clone(),
        work: work.clone(),
        ambient_mode: opts.ambient_mode,
    };
    for (name, title, section) in SECTIONS {
        if !opts.sections.is_empty() && !opts.sections.iter().any(|s| s == name) {
            continue;
        }
        println!("\n═══ {}", title(&env));
        match section(&mut node, &env) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }

    heading("teardown: cnitool del every pod, delete every namespace");
    for line in node.teardown() {
        println!("    {line}");
    }
    let node_ns = node.netns().name().to_string();
    drop(node);
    println!("    deleted pod namespaces and node netns {node_ns}");
    if owned {
        let _ = std::fs::remove_dir_all(&work);
    }
    result?;

    let ok = rows.iter().filter(|r| r.as_expected).count();
    println!(
        "\n{ok}/{} flows landed where expected; demo took {:.1}s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(ok == rows.len())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|o| run(&o));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("meshcni-demo: some flows did not land where expected (see the table)");
            ExitCode::FAILURE
        }
        Err(e @ DemoError::Usage(_)) => {
            eprintln!("meshcni-demo: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("meshcni-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, DemoError> {
        parse_args_from(args.iter().map(|a| a.to_string()))
    }

    fn usage_error(args: &[&str]) -> String {
        match parse(args) {
            Err(DemoError::Usage(m)) => m,
            Err(e) => panic!("{args:?}: not a usage error: {e}"),
            Ok(_) => panic!("{args:?}: accepted"),
        }
    }

    #[test]
    fn ambient_mode_defaults_to_inpod_and_iptables_and_ebpf_are_selectable() {
        assert_eq!(
            parse(&[]).expect("no args").ambient_mode,
            AmbientMode::Inpod
        );
        assert_eq!(
            parse(&["--ambient-mode", "inpod"])
                .expect("inpod")
                .ambient_mode,
            AmbientMode::Inpod
        );
        assert_eq!(
            parse(&["--ambient-mode", "iptables"])
                .expect("iptables")
                .ambient_mode,
            AmbientMode::Iptables
        );
        assert_eq!(
            parse(&["--ambient-mode", "ebpf"])
                .expect("ebpf")
                .ambient_mode,
            AmbientMode::Ebpf
        );
    }

    #[test]
    fn unknown_options_and_modes_are_usage_errors() {
        let m = usage_error(&["--ambient-mode", "bpf"]);
        assert!(m.contains("\"bpf\"") && m.contains(USAGE), "{m}");
        let m = usage_error(&["--ambient-mode"]);
        assert!(m.contains("--ambient-mode needs a value"), "{m}");
        let m = usage_error(&["--bogus"]);
        assert!(m.contains("\"--bogus\"") && m.contains(USAGE), "{m}");
        let m = usage_error(&["--section", "nope"]);
        assert!(m.contains("unknown section"), "{m}");
    }
}
