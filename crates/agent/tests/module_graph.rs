//! The agent's module house has no import cycle: the seam (`seam.rs`) is the bottom of the
//! ambient part and imports only the pure planner types; the modes, workload sources, CNI event
//! server and metrics import the seam, never the reconcile loop (`ambient/`); nothing imports
//! upward in a circle. Read from the sources, so a new `use` that closes a circle fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module of a source file (`src/ambient/cni_handoff.rs` → `ambient`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let m = first.trim_end_matches(".rs").to_string();
    (m != "lib" && m != "main").then_some(m)
}

/// `crate::<module>` references outside comments and `#[cfg(test)]` test modules.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let body = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    for line in body.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(m) = module_of(&src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read source");
        let deps = g.entry(m.clone()).or_default();
        for d in imports(&text) {
            if d != m {
                deps.insert(d);
            }
        }
    }
    g
}

fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_string()];
    while let Some(n) = stack.pop() {
        for d in g.get(&n).into_iter().flatten() {
            if d == to {
                return true;
            }
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    false
}

#[test]
fn the_agent_modules_import_each_other_without_a_cycle() {
    let g = graph();
    for m in [
        "ambient",
        "seam",
        "modes",
        "workloads",
        "cni_events",
        "metrics",
        "enroll",
    ] {
        assert!(g.contains_key(m), "module {m} not found in {:?}", g.keys());
    }
    let mut cycles = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            if reaches(&g, d, m) {
                cycles.push(format!("{m} -> {d} -> ... -> {m}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles: {cycles:#?}\ngraph: {g:#?}"
    );
}

#[test]
fn the_seam_is_the_bottom_and_nothing_below_the_loop_imports_it() {
    let g = graph();
    let seam: Vec<&String> = g["seam"].iter().collect();
    assert_eq!(
        seam,
        vec!["enroll"],
        "seam.rs may import only the planner types"
    );
    for m in [
        "modes",
        "workloads",
        "cni_events",
        "metrics",
        "seam",
        "enroll",
    ] {
        assert!(
            !g[m].contains("ambient"),
            "{m} imports the reconcile loop (crate::ambient): {:?}",
            g[m]
        );
    }
    assert!(
        !g["modes"].contains("workloads") && !g["modes"].contains("cni_events"),
        "a mode reaches into the workload sources or the CNI server: {:?}",
        g["modes"]
    );
}
