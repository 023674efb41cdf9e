//! `meshcni-ztunnel-standin`: the in-pod ztunnel stand-in ([`InpodZtunnelStandIn`]) as a
//! program, for running it as a pod on a real node (scripts/build-image.sh --test-images
//! packages it as `localhost/meshcni/ztunnel-standin:test`; scripts/cluster-e2e.sh deploys it in
//! istio-system as ztunnel would be deployed).
//!
//!   meshcni-ztunnel-standin [--uds PATH]      (--help: usage on stdout, exit 0)
//!
//! Connects to the agent's ZDS socket PATH (default `/var/run/ztunnel/ztunnel.sock`, ztunnel's
//! `INPOD_UDS`), reconnecting while it is absent, and holds every workload the agent sends: its
//! listeners 15001/15006/15008 and 15053 (DNS capture on; `A` queries answered with
//! 10.53.0.1) are opened inside the pod's netns through the fd that came with `AddWorkload`.
//! Outbound connections captured on 15001 are forwarded directly to their original destination.
//!
//! What it observes is its record, one JSON object per line on stdout (`kubectl logs`):
//!   {"event":"connected","connects":N}                    a ZDS connection (hello sent)
//!   {"event":"snapshot_complete"}                         the agent's SnapshotSent arrived
//!   {"event":"add","uid":..,"name":..,"namespace":..,"netns":"DEV:INO","ips":[..],"listening":[..]}
//!   {"event":"del","uid":..}                              a workload was released
//!   {"event":"hop","uid":..,"port":15001,"peer":..,"original_dst":..,"upstream_dst":..,"error":..}
//!   {"event":"protocol_error","error":..}
//! Runs until SIGTERM or SIGINT (blocked and waited for: as a container's PID 1 the default
//! action would be ignored), then disconnects and closes every listener.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshcni_testkit::{InpodZtunnelConfig, InpodZtunnelStandIn};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};

const DEFAULT_UDS: &str = "/var/run/ztunnel/ztunnel.sock";
const USAGE: &str = "usage: meshcni-ztunnel-standin [--uds PATH]";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Cli {
    Run(PathBuf),
    Help,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Cli, String> {
    let mut uds = PathBuf::from(DEFAULT_UDS);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--uds" => {
                uds = PathBuf::from(args.next().ok_or("--uds needs a path")?);
            }
            "-h" | "--help" => return Ok(Cli::Help),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    Ok(Cli::Run(uds))
}

fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (log pipe gone) must not stop the stand-in.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Poll the stand-in's state and print what changed.
fn report(s: &InpodZtunnelStandIn, stop: &AtomicBool) {
    let mut connects = 0;
    let mut snapshot = false;
    let mut held: BTreeSet<String> = BTreeSet::new();
    let mut errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let c = s.connects();
        if c != connects {
            connects = c;
            snapshot = false;
            emit(json!({"event": "connected", "connects": c}));
        }
        if !snapshot && s.snapshot_complete() {
            snapshot = true;
            emit(json!({"event": "snapshot_complete"}));
        }
        let now: BTreeSet<String> = s.workloads().into_keys().collect();
        for uid in now.difference(&held) {
            if let Some(w) = s.workload(uid) {
                let info = w.info.as_ref();
                emit(json!({
                    "event": "add",
                    "uid": uid,
                    "name": info.map(|i| i.name.as_str()),
                    "namespace": info.map(|i| i.namespace.as_str()),
                    "service_account": info.map(|i| i.service_account.as_str()),
                    "netns": format!("{}:{}", w.netns.0, w.netns.1),
                    "ips": w.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "listening": w.listening.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }));
            }
        }
        for uid in held.difference(&now) {
            emit(json!({"event": "del", "uid": uid}));
        }
        held = now;
        for h in s.take_hops() {
            emit(json!({
                "event": "hop",
                "uid": h.uid,
                "port": h.listener_port,
                "peer": h.peer.to_string(),
                "original_dst": h.original_dst.to_string(),
                "upstream_dst": h.upstream_dst.map(|a| a.to_string()),
                "error": h.error,
            }));
        }
        let pe = s.protocol_errors();
        for e in pe.iter().skip(errors) {
            emit(json!({"event": "protocol_error", "error": e}));
        }
        errors = pe.len();
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> ExitCode {
    let uds = match parse_args(std::env::args().skip(1)) {
        Ok(Cli::Run(u)) => u,
        Ok(Cli::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("meshcni-ztunnel-standin: {e}");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread exists (threads inherit the mask); wait below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("meshcni-ztunnel-standin: blocking SIGTERM/SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    let mut cfg = InpodZtunnelConfig::new(&uds);
    cfg.dns_capture = true;
    let standin = match InpodZtunnelStandIn::start_with(cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!(
                "meshcni-ztunnel-standin: starting the ZDS client for {}: {e}",
                uds.display()
            );
            return ExitCode::FAILURE;
        }
    };
    emit(json!({"event": "started", "uds": uds.display().to_string()}));
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let (s, stop) = (Arc::clone(&standin), Arc::clone(&stop));
        std::thread::spawn(move || report(&s, &stop))
    };
    let sig = signals.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    emit(json!({"event": "stopping", "signal": sig.map(|s| s.as_str()).unwrap_or("?")}));
    standin.stop();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        a.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn uds_defaults_to_ztunnels_inpod_socket() {
        assert_eq!(
            parse_args(args(&[])),
            Ok(Cli::Run(PathBuf::from(DEFAULT_UDS)))
        );
        assert_eq!(
            parse_args(args(&["--uds", "/x/z.sock"])),
            Ok(Cli::Run(PathBuf::from("/x/z.sock")))
        );
        assert_eq!(parse_args(args(&["--help"])), Ok(Cli::Help));
    }

    #[test]
    fn bad_arguments_are_refused_by_name() {
        assert_eq!(
            parse_args(args(&["--uds"])),
            Err("--uds needs a path".into())
        );
        let e = parse_args(args(&["--dns"])).unwrap_err();
        assert!(e.contains("\"--dns\""), "{e}");
    }
}
