//! Fuzz target: a CNI invocation (environment + stdin) through `meshcni_cni::parse_request`,
//! then, for a valid request, the chained pass-through result (prevResult conversion) and the
//! plugin's own stdin fields (`meshcni_plugin::config::PluginConf`).
//!
//! Input format (so seeds are readable files): `KEY=VALUE` lines for the environment, a blank
//! line, then the stdin bytes verbatim. An input without a blank line is all environment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshcni_cni::{Request, parse_request};

fn split(data: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let (head, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let env = String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, stdin)
}

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = split(data);
    if let Ok(Request::Plugin(ctx)) = parse_request(&env, stdin) {
        // Errors are fine (a prevResult the config's version cannot express); panics are not.
        let _ = ctx.pass_through();
        if let Ok(conf) = meshcni_plugin::config::PluginConf::from_json(stdin) {
            let _ = conf.validate();
            let _ = conf.rule_backend();
        }
    }
});
