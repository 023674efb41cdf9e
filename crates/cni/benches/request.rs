//! In-process cost of one invocation: validating a realistic chained ADD request
//! (`bridge`+`host-local` dual-stack prevResult) and producing the pass-through result.
//!   cargo bench -p meshcni-cni --bench request

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use meshcni_cni::{Request, convert_result, parse_request, run};
use serde_json::{Value, json};

fn fixture(version: &str) -> Value {
    let path = format!(
        "{}/testdata/bridge-host-local/{version}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

struct PassThrough;
impl meshcni_cni::Plugin for PassThrough {
    fn add(&self, ctx: &meshcni_cni::Context) -> Result<Value, meshcni_cni::CniError> {
        ctx.pass_through()
    }
    fn del(&self, _: &meshcni_cni::Context) -> Result<(), meshcni_cni::CniError> {
        Ok(())
    }
    fn check(&self, _: &meshcni_cni::Context) -> Result<(), meshcni_cni::CniError> {
        Ok(())
    }
    fn status(&self, _: &meshcni_cni::Context) -> Result<(), meshcni_cni::CniError> {
        Ok(())
    }
    fn gc(&self, _: &meshcni_cni::Context) -> Result<(), meshcni_cni::CniError> {
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let env: Vec<(String, String)> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "5f1e2d3c4b5a"),
        ("CNI_NETNS", "/var/run/netns/cni-5f1e2d3c"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=5f1e2d3c4b5a;K8S_POD_UID=0d5f"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let stdin = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshcni",
        "prevResult": fixture("1.0.0"), "ambient_enabled": true})
    .to_string();
    c.bench_function("parse_request+pass_through (1.0.0 ADD)", |b| {
        b.iter(
            || match parse_request(black_box(&env), black_box(stdin.as_bytes())) {
                Ok(Request::Plugin(ctx)) => ctx.pass_through().expect("ok"),
                _ => unreachable!("valid request"),
            },
        )
    });
    c.bench_function("run() ADD end to end in memory (1.0.0)", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(2048);
            let code = run(
                &PassThrough,
                |k| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone()),
                stdin.as_bytes(),
                &mut out,
            );
            assert_eq!(code, 0);
            out
        })
    });
    let prev = fixture("0.4.0");
    c.bench_function("convert_result 0.4.0 -> 1.0.0", |b| {
        b.iter(|| convert_result(black_box(&prev), "1.0.0").expect("ok"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
