//! Log set-up: `tracing` to stderr, text or JSON, level from `--log-level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{LogFormat, LogLevel};

/// Install the global subscriber. Safe to call once; later calls are ignored.
pub fn init(level: LogLevel, format: LogFormat) {
    let filter = EnvFilter::new(level.directive());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for humans at a terminal, never in collected container logs.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
