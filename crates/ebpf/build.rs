//! Compiles the BPF programs in `bpf/*.bpf.c` with clang (`-target bpf`) into `OUT_DIR`; the
//! library embeds `meshcni.bpf.o` (`include_bytes!`). Needs Debian's `clang` and `libbpf-dev`
//! (`bpf/bpf_helpers.h`) plus the kernel UAPI headers (`linux-libc-dev`); `scripts/setup.sh`
//! installs them. A missing tool fails the build with a message naming the package.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["meshcni", "broken"];

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn multiarch_include(arch: &str) -> Option<PathBuf> {
    let triple = match arch {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        _ => return None,
    };
    let dir = PathBuf::from("/usr/include").join(triple);
    dir.join("asm/types.h").exists().then_some(dir)
}

fn run() -> Result<(), String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let manifest = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?,
    );
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPF_EXTRA_INCLUDE");

    let mut includes: Vec<PathBuf> = Vec::new();
    if let Ok(extra) = std::env::var("BPF_EXTRA_INCLUDE") {
        includes.extend(std::env::split_paths(&extra));
    }
    let helpers = Path::new("/usr/include/bpf/bpf_helpers.h");
    if !helpers.exists()
        && !includes
            .iter()
            .any(|d| d.join("bpf/bpf_helpers.h").exists())
    {
        return Err(format!(
            "{} not found: install Debian's libbpf-dev (apt-get install libbpf-dev; \
             scripts/setup.sh does) to build the meshcni eBPF programs",
            helpers.display()
        ));
    }
    if !Path::new("/usr/include/linux/bpf.h").exists() {
        return Err(
            "/usr/include/linux/bpf.h not found: install Debian's linux-libc-dev \
             (kernel UAPI headers) to build the meshcni eBPF programs"
                .to_string(),
        );
    }
    match multiarch_include(&arch) {
        Some(dir) => includes.push(dir),
        None => {
            return Err(format!(
                "no /usr/include/<multiarch>/asm/types.h for target arch {arch:?}: install \
                 linux-libc-dev for this architecture"
            ));
        }
    }

    for name in PROGRAMS {
        let src = manifest.join("bpf").join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        println!("cargo:rerun-if-changed={}", src.display());
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]);
        for dir in &includes {
            cmd.arg("-I").arg(dir);
        }
        cmd.arg("-c").arg(&src).arg("-o").arg(&obj);
        let output = cmd.output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "`{clang}` not found: install Debian's clang (apt-get install clang; \
                     scripts/setup.sh does) to compile {} (or set CLANG)",
                    src.display()
                )
            } else {
                format!("run `{clang}` for {}: {e}", src.display())
            }
        })?;
        if !output.status.success() {
            return Err(format!(
                "`{clang} -target bpf` failed for {} ({}):\n{}{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}
