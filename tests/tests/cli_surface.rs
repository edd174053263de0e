//! What an operator meets before anything runs: `--version`, the exit codes of a command
//! line that does not parse (docs/operations.md: 64 for usage), the man pages and shell
//! completions the packages carry (generated from the same binaries), no colour escapes in
//! a pipe, and the JSON log of a running agent holding plain values only.

use airlock_tests::oidc::GithubJob;
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn run(bin: &str, args: &[&str]) -> Output {
    let path = paths::bin(bin);
    Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        // What a pipe in a plain environment gives: clap may colour only for a terminal.
        .env_remove("CLICOLOR_FORCE")
        .env_remove("NO_COLOR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (cargo build --bins)", path.display()))
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn no_escapes(out: &Output) {
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !bytes.windows(2).any(|w| w == b"\x1b["),
            "colour escapes in piped {name}:\n{}",
            show(out)
        );
    }
}

/// `git rev-parse --short=12 HEAD` of the repository, when it is a git checkout.
fn head_commit() -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(paths::repo_root())
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn version_names_the_commit_for_both_binaries() {
    let head = head_commit();
    for bin in ["airlock", "airlockd"] {
        let out = run(bin, &["--version"]);
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let rest = line
            .strip_prefix(&format!("{bin} {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{bin} --version: {line:?}"));
        let commit = rest.strip_suffix("-dirty").unwrap_or(rest);
        match &head {
            // Built in this checkout: its HEAD, unless AIRLOCK_COMMIT named another.
            Some(h) if std::env::var_os("AIRLOCK_COMMIT").is_none() => assert_eq!(
                commit, h,
                "{bin} --version names another commit than HEAD: rebuild (cargo build --bins)"
            ),
            _ => assert!(
                commit == "unknown" || !commit.is_empty(),
                "{bin} --version: {line:?}"
            ),
        }
        no_escapes(&out);
    }
    // Subcommands carry it too (`propagate_version`).
    let out = run("airlock", &["job", "--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(commit "),
        "{}",
        show(&out)
    );
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for (bin, args, says) in [
        // A typo'd subcommand, an unknown flag, a missing subcommand, a bad value, a
        // missing argument.
        (
            "airlock",
            &["polcy", "check"][..],
            "unrecognized subcommand",
        ),
        (
            "airlock",
            &["job", "list", "--jsn"][..],
            "unexpected argument",
        ),
        ("airlock", &[][..], "Usage"),
        ("airlock", &["slot", "clear", "seven"][..], "invalid value"),
        ("airlock", &["job", "end"][..], "required"),
        ("airlockd", &["--chek"][..], "unexpected argument"),
        ("airlockd", &["--log-format", "xml"][..], "invalid value"),
    ] {
        let out = run(bin, args);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{bin} {args:?}: {}",
            show(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{bin} {args:?}: {}", show(&out));
        assert!(out.stdout.is_empty(), "{bin} {args:?}: {}", show(&out));
        no_escapes(&out);
    }
    for (bin, args) in [
        ("airlock", &["--help"][..]),
        ("airlock", &["job", "start", "--help"][..]),
        ("airlock", &["help", "audit"][..]),
        ("airlockd", &["--help"][..]),
    ] {
        let out = run(bin, args);
        assert_eq!(out.status.code(), Some(0), "{bin} {args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{bin} {args:?}: {}",
            show(&out)
        );
        no_escapes(&out);
    }
    // The generator's entry point is not part of the documented command line.
    let help = run("airlock", &["--help"]);
    assert!(
        !String::from_utf8_lossy(&help.stdout).contains("__generate"),
        "{}",
        show(&help)
    );
}

/// `man -l` renders a page to text; its warnings (`--warnings`) go to stderr.
fn render(page: &Path) -> String {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        // man-db keeps bold and underline (overstrikes) in a pipe if this is set at all.
        .env_remove("MAN_KEEP_FORMATTING")
        .output()
        .expect("man (package man-db) is installed");
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        show(&out)
    );
    assert!(
        out.stderr.is_empty(),
        "man -l {} warns:\n{}",
        page.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn generated_man_pages_render_and_completions_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bin in ["airlock", "airlockd"] {
        let out = run(bin, &["__generate", &dir.path().to_string_lossy()]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{bin} __generate: {}",
            show(&out)
        );
    }
    let man = dir.path().join("man");

    let airlockd = render(&man.join("airlockd.8"));
    for says in ["airlockd", "--check", "--log-format", "SIGHUP", "(commit "] {
        assert!(
            airlockd.contains(says),
            "{says:?} not in airlockd(8):\n{airlockd}"
        );
    }
    let airlock = render(&man.join("airlock.1"));
    for says in ["airlock", "run", "job", "policy", "audit", "--config"] {
        assert!(
            airlock.contains(says),
            "{says:?} not in airlock(1):\n{airlock}"
        );
    }
    // One page per subcommand, down to the leaves, as `man airlock-job-start` finds them.
    let start = render(&man.join("airlock-job-start.1"));
    for says in ["--oidc-token-file", "--bind-later", "--owner-pid"] {
        assert!(
            start.contains(says),
            "{says:?} not in airlock-job-start(1):\n{start}"
        );
    }
    render(&man.join("airlock-audit-verify.1"));
    assert!(!man.join("airlock-help.1").exists());

    // bash: the file parses and, sourced, registers completion for the command.
    for bin in ["airlock", "airlockd"] {
        let file = dir.path().join("completions/bash").join(bin);
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("source \"$0\" && complete -p {bin}"))
            .arg(&file)
            .output()
            .expect("bash");
        assert!(out.status.success(), "{}: {}", file.display(), show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(bin),
            "{}",
            show(&out)
        );
    }
    let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_airlock")).expect("zsh");
    assert!(zsh.starts_with("#compdef airlock"), "{zsh}");
    assert!(
        zsh.contains("--oidc-token-file"),
        "zsh completion lacks flags"
    );
    let fish =
        std::fs::read_to_string(dir.path().join("completions/fish/airlock.fish")).expect("fish");
    assert!(fish.contains("complete -c airlock"), "{fish}");
    assert!(
        fish.contains("oidc-token-file"),
        "fish completion lacks flags"
    );
    assert!(!fish.contains("__generate") && !zsh.contains("__generate"));

    // The entry point takes exactly one directory.
    let out = run("airlock", &["__generate"]);
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
}

/// Every string anywhere in a JSON value.
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        Value::Object(o) => o.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Every line of an agent's log as JSON, none holding a Debug-printed `Option`.
fn json_lines(log: &str) -> Vec<Value> {
    let mut records = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nlog:\n{log}"));
        let mut all = Vec::new();
        strings(&v, &mut all);
        for s in all {
            assert!(
                !s.starts_with("Some(") && s != "None",
                "a Debug-printed Option in the JSON log: {line}"
            );
        }
        records.push(v);
    }
    records
}

#[test]
fn the_json_log_of_a_sandboxed_job_holds_numbers_as_numbers() {
    airlock_tests::prereq::require_root_and("the sandboxed JSON log test", &[("nft", "nftables")]);
    let stack = Stack::sandboxed_then("", |o| o.log_format("json"));
    let out = stack.run_sh(&GithubJob::production().token(), "true");
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    // The wipe is logged once the job has ended; `airlock run` returns after that.
    let log = stack.agent.log();
    let records = json_lines(&log);
    let started = records
        .iter()
        .find(|r| r["message"] == "job started")
        .unwrap_or_else(|| panic!("no \"job started\":\n{log}"));
    assert_eq!(started["sandboxed"], true, "{started}");
    assert_eq!(started["rule"], "web-production", "{started}");
    let wiped = records
        .iter()
        .find(|r| r["message"] == "job wiped")
        .unwrap_or_else(|| panic!("no \"job wiped\":\n{log}"));
    assert!(wiped["ms"].is_u64(), "{wiped}");
    assert!(wiped["killed"].is_u64(), "{wiped}");
    assert_eq!(wiped["job"], started["job"], "{wiped}");
}

#[test]
fn the_json_log_holds_plain_values_and_leaves_out_what_is_absent() {
    let stack = Stack::start_with(|o| o.log_format("json"));
    let prod = stack.job(&GithubJob::production());
    assert!(prod.refused.is_none(), "{:?}", prod.raw);
    let feature = stack.job(&GithubJob::feature_branch());
    assert!(feature.refused.is_some(), "{:?}", feature.raw);
    // A bad token: refused before it is a job, with no runner named.
    assert!(stack.agent.start_job("not-a-token").is_err());

    let log = stack.agent.log();
    let records = json_lines(&log);
    let started = |job: &str| -> &Value {
        records
            .iter()
            .find(|r| r["message"] == "job started" && r["job"] == job)
            .unwrap_or_else(|| panic!("no \"job started\" for {job}:\n{log}"))
    };
    let p = started(&prod.job_id);
    assert!(
        p["identity"]
            .as_str()
            .is_some_and(|s| s.starts_with("github acme/web")),
        "{p}"
    );
    assert_eq!(p["rule"], "web-production", "{p}");
    assert_eq!(p["sandboxed"], false, "{p}");
    assert!(p.get("refused").is_none(), "{p}");

    let f = started(&feature.job_id);
    assert!(f.get("rule").is_none(), "{f}");
    assert!(
        f["refused"]
            .as_str()
            .is_some_and(|s| s.contains("no policy rule matches")),
        "{f}"
    );
    assert!(
        f["identity"]
            .as_str()
            .is_some_and(|s| s.starts_with("github other-org/tool")),
        "{f}"
    );

    let refused = records
        .iter()
        .find(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("job refused"))
        })
        .unwrap_or_else(|| panic!("no \"job refused\":\n{log}"));
    assert!(refused.get("runner").is_none(), "{refused}");
    assert_eq!(refused["level"], "WARN", "{refused}");
}
