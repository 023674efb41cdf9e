//! Plugin logging: never on stdout (the CNI result channel). JSON lines on stderr, which
//! container runtimes capture into their own logs, at the configured level.

use std::sync::Once;

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

static INIT: Once = Once::new();

/// Installs the stderr JSON subscriber once per process. `MESHCNI_LOG` (an `EnvFilter`
/// directive) overrides the configured level.
pub fn init(level: LogLevel) {
    INIT.call_once(|| {
        // netlink-packet-route warns about kernel attributes newer than it knows (e.g.
        // IFLA_INET6_CONF growing); harmless for us, so keep it out of the runtime's logs.
        let directive = std::env::var("MESHCNI_LOG").unwrap_or_else(|_| {
            format!(
                "{},netlink_packet_route=error,netlink_packet_core=error",
                level_name(level)
            )
        });
        let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .with_current_span(false)
            .try_init();
    });
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
        LogLevel::None => "off",
    }
}
