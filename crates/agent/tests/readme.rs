//! The README's agent flag table is the output of `meshcni-agent cli-reference`: keep it true.

use std::process::Command;

#[test]
fn readme_agent_flag_table_matches_the_cli() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshcni-agent"))
        .arg("cli-reference")
        .output()
        .expect("run meshcni-agent cli-reference");
    assert!(out.status.success(), "cli-reference failed: {out:?}");
    let table = String::from_utf8(out.stdout).expect("utf-8");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("read README.md");
    let begin = "<!-- BEGIN agent-flags -->\n";
    let end = "\n<!-- END agent-flags -->";
    let start = readme
        .find(begin)
        .expect("README has the agent-flags markers")
        + begin.len();
    let stop = readme[start..].find(end).expect("end marker") + start;
    assert_eq!(
        readme[start..stop].trim_end(),
        table.trim_end(),
        "README agent flag table is stale: regenerate it with `meshcni-agent cli-reference`"
    );
}
