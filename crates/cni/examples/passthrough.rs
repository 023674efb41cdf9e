//! The smallest useful chained CNI plugin on `meshcni-cni`: it accepts every command and passes
//! the `prevResult` through unchanged (converted to the config's `cniVersion`). Also the
//! binary used to measure the library's startup cost:
//!   cargo build --release -p meshcni-cni --example passthrough

use meshcni_cni::{CniError, Context, Plugin, main_with};
use serde_json::Value;

struct PassThrough;

impl Plugin for PassThrough {
    fn add(&self, ctx: &Context) -> Result<Value, CniError> {
        ctx.pass_through()
    }
    fn del(&self, _: &Context) -> Result<(), CniError> {
        Ok(())
    }
    fn check(&self, ctx: &Context) -> Result<(), CniError> {
        // CHECK must see the ADD result; decoding it validates its shape.
        ctx.conf.prev_result_typed().map(|_| ())
    }
    fn status(&self, _: &Context) -> Result<(), CniError> {
        Ok(())
    }
    fn gc(&self, ctx: &Context) -> Result<(), CniError> {
        ctx.conf.valid_attachments().map(|_| ())
    }
    fn about(&self) -> &str {
        "passthrough: meshcni-cni example chained plugin"
    }
}

fn main() {
    main_with(&PassThrough)
}
