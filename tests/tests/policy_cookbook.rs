//! Every example of `docs/policy-cookbook.md` loads: each directory under
//! `policies/cookbook/` passes `airlock policy check` with the shipped `config/airlock.toml`
//! (its issuers), and the page quotes each file verbatim (so the page cannot drift from
//! what is checked).

use airlock_tests::paths;
use std::process::Command;

#[test]
fn every_cookbook_policy_loads_and_the_page_quotes_it_verbatim() {
    let root = paths::repo_root();
    let page = std::fs::read_to_string(root.join("docs/policy-cookbook.md")).unwrap();
    let mut dirs: Vec<_> = std::fs::read_dir(root.join("policies/cookbook"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in dirs {
        // Checked against the issuers of the configuration the packages ship.
        let out = Command::new(paths::bin("airlock"))
            .arg("--config")
            .arg(root.join("config/airlock.toml"))
            .args(["policy", "check"])
            .arg(&dir)
            .output()
            .expect("run airlock (cargo build --bins)");
        assert!(
            out.status.success(),
            "{}: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
        let text = std::fs::read_to_string(dir.join("policy.toml")).unwrap();
        assert!(
            page.contains(&format!("```toml\n{text}```")),
            "docs/policy-cookbook.md does not quote {} verbatim",
            dir.display()
        );
    }
}
