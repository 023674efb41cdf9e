//! `meshcni-agent`: the node agent of meshcni.
//!
//! It installs the `meshcni` CNI plugin on the node and keeps it installed (through
//! `meshcni-install`), writes the ambient config file, serves `/healthz`, `/readyz` and
//! Prometheus `/metrics`, collects per-request reports from the plugin, and on shutdown leaves the
//! plugin in place (upgrade-safe) unless told to uninstall — see [`lifecycle`].
//!
//! Modules: [`cli`] flags, [`run`] lifecycle orchestration, [`installer`] the installer seam,
//! [`install_bridge`] its `meshcni-install` implementation, [`readiness`] gates, [`metrics`],
//! [`plugin_report`] the plugin → agent wire format, [`cni_events`] the plugin's ambient
//! hand-off (`POST /cmdadd` on `pluginevent.sock`), [`ambient_config`], [`http`], [`logging`];
//! ambient enrollment: [`seam`] (the `RedirectDriver` trait, driver events, the CNI request —
//! the bottom layer), [`enroll`] (pure planner), [`workloads`] (pods/namespaces from
//! Kubernetes or a file, mesh decisions), [`modes`] (one module per redirect mode, and
//! `make_driver`), [`ambient`] (the reconcile loop; imports all of them, none imports it).

#![forbid(unsafe_code)]

pub mod ambient;
pub mod ambient_config;
pub mod cli;
pub mod cni_events;
pub mod crash;
pub mod doctor;
pub mod enroll;
pub mod http;
pub mod install_bridge;
pub mod installer;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod modes;
pub mod node_taint;
pub mod owner_check;
pub mod plugin_report;
pub mod readiness;
pub mod repair;
pub mod run;
pub mod seam;
pub mod uninstall_hook;
pub mod workloads;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// The binary's `main`.
pub fn main_entry() -> ExitCode {
    let matches = cli::Cli::command().get_matches();
    let cli = match cli::Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let explicit_mode = matches!(
        matches.value_source("ambient_redirect_mode"),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    );
    let args = cli.args;
    logging::init(args.log_level, args.log_format);

    let result = match cli.command.unwrap_or(cli::Command::Run) {
        cli::Command::CliReference => {
            print!("{}", cli::reference_markdown());
            Ok(())
        }
        cli::Command::CheckConfig => args
            .validate(explicit_mode)
            .map_err(run::AgentError::Config)
            .and_then(|()| {
                let plan = run::RunPlan {
                    redirect_mode: args.effective_redirect_mode(explicit_mode),
                    args,
                };
                let ic = install_bridge::install_config(&plan.args)
                    .map_err(run::AgentError::Installer)?;
                // What the installer will write for the plugin (templates merged).
                let plugin = meshcni_install::cniconfig::plugin_config_bytes(&ic)
                    .map_err(|e| run::AgentError::Installer(e.to_string()))?;
                println!("{plan:?}");
                println!("{ic:?}");
                println!("plugin config: {}", String::from_utf8_lossy(&plugin));
                Ok(())
            }),
        cli::Command::UninstallHook(hook) => {
            match uninstall_hook::HookPlan::from_args(&args, &hook)
                .and_then(|plan| uninstall_hook::run(&plan))
            {
                Ok(()) => return ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "meshcni-agent uninstall-hook failed");
                    eprintln!("meshcni-agent: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        cli::Command::Doctor(d) => {
            let mode = args.effective_redirect_mode(explicit_mode);
            let report = doctor::run(&args, mode);
            if d.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("meshcni-agent doctor: encoding the report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.render_table());
            }
            return if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        cli::Command::Uninstall => install_bridge::for_uninstall(&args)
            .map_err(run::AgentError::Installer)
            .and_then(|inst| {
                let mode = args.effective_redirect_mode(explicit_mode);
                run::uninstall_all(&args, mode, inst.as_ref())
            }),
        cli::Command::Run => {
            if let Err(e) = args.validate(explicit_mode) {
                tracing::error!(error = %e, "meshcni-agent cannot start");
                eprintln!("meshcni-agent: {e}");
                return ExitCode::FAILURE;
            }
            let plan = run::RunPlan {
                redirect_mode: args.effective_redirect_mode(explicit_mode),
                args,
            };
            tracing::info!(?plan, "starting meshcni-agent");
            install_bridge::start(&plan.args)
                .map_err(run::AgentError::Installer)
                .and_then(|inst| run::run(plan, inst))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "meshcni-agent failed");
            eprintln!("meshcni-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
