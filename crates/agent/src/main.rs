//! `meshcni-agent` binary; all logic lives in the library.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    meshcni_agent::main_entry()
}
