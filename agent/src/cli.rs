//! What `airlockd` and `airlock` share about their command lines: the version they print,
//! the exit codes of a command line that does not parse, and the man pages and shell
//! completions generated from their clap definitions for the packages.
//!
//! Owns no behaviour of either program: each keeps its own clap definition in its `bin/`
//! file and hands it here. Must never write anywhere but the directory the package build
//! names.

use std::path::Path;
use std::process::ExitCode;

use crate::exit;

/// `--version` of both binaries: the crate's version and the commit they were built from
/// (`build.rs`: `AIRLOCK_COMMIT`, else git, `-dirty` for a modified tree, else `unknown`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("AIRLOCK_COMMIT"),
    ")"
);

/// The first argument that asks a binary for its generated documentation instead of
/// running: `airlock __generate DIR`. Not a clap subcommand, so that it appears in no
/// `--help`, man page or completion; `packaging/build-packages.sh` calls it.
pub const GENERATE: &str = "__generate";

/// Parses the command line. `--help` and `--version` print to stdout and exit 0; every
/// usage error (an unknown subcommand or flag, a missing or bad value) prints clap's
/// message to stderr and exits 64 (`EX_USAGE`, as docs/operations.md says), not clap's 2.
pub fn parse<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(exit::USAGE as u8)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// `Some(exit code)` when the command line is `GENERATE DIR`: the man pages and completions
/// of `cmd` were written under DIR (see [`generate`]). `None` otherwise: parse it as usual.
pub fn generate_if_asked(cmd: clap::Command, man_section: &'static str) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(GENERATE.as_ref()) {
        return None;
    }
    let name = cmd.get_name().to_string();
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("{name}: usage: {name} {GENERATE} DIR");
        return Some(ExitCode::from(exit::USAGE as u8));
    };
    Some(match generate(cmd, man_section, Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "{name}: cannot write the generated documentation under {}: {e}",
                Path::new(&dir).display()
            );
            ExitCode::from(exit::CANTCREAT as u8)
        }
    })
}

/// Writes, for the program `cmd` describes (`NAME`):
/// - `DIR/man/NAME.SECTION`, and a page `NAME-SUB[-SUB…].SECTION` per visible subcommand
///   (what `man airlock-job-start` finds; each page's SUBCOMMANDS names the next ones);
/// - `DIR/completions/bash/NAME`, `DIR/completions/zsh/_NAME`,
///   `DIR/completions/fish/NAME.fish`: each named as its shell looks it up.
pub fn generate(cmd: clap::Command, man_section: &'static str, dir: &Path) -> std::io::Result<()> {
    let mut cmd = cmd.version(VERSION);
    let name = cmd.get_name().to_string();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    // `help` is clap's own subcommand: a page of its own would say nothing `--help` does not.
    let mut pages = cmd.clone().disable_help_subcommand(true);
    pages.build();
    write_pages(pages, man_section, &man)?;

    use clap_complete::Shell;
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join("completions").join(sub);
        std::fs::create_dir_all(&d)?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
        std::fs::write(d.join(file), out)?;
    }
    Ok(())
}

/// The page of a built `cmd`, then one per visible subcommand, recursively; clap names a
/// built subcommand `NAME-SUB` (its display name), which is the page's title and file.
fn write_pages(cmd: clap::Command, section: &'static str, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), section, dir)?;
    }
    clap_mangen::Man::new(cmd)
        .section(section)
        .source(format!("airlock {VERSION}"))
        .manual("airlock")
        .generate_to(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    /// A small stand-in for the real CLIs.
    #[derive(Debug, Parser)]
    #[command(name = "demo", version = VERSION)]
    struct Demo {
        /// A flag.
        #[arg(long)]
        flag: bool,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Debug, Subcommand)]
    enum Sub {
        /// Lists things.
        List {
            /// As JSON.
            #[arg(long)]
            json: bool,
        },
        #[command(hide = true)]
        Secret,
    }

    #[test]
    fn the_version_names_the_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")), "{VERSION}");
        let commit = VERSION
            .split_once("(commit ")
            .and_then(|(_, c)| c.strip_suffix(')'))
            .expect("(commit …)");
        assert!(!commit.is_empty(), "{VERSION}");
    }

    #[test]
    fn pages_and_completions_are_written_for_the_command_and_each_visible_subcommand() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        generate(Demo::command(), "1", dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/demo.1")).unwrap();
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("\\-\\-flag"), "{page}");
        let list = std::fs::read_to_string(dir.path().join("man/demo-list.1")).unwrap();
        assert!(list.contains("\\-\\-json"), "{list}");
        assert!(!dir.path().join("man/demo-secret.1").exists());
        assert!(!dir.path().join("man/demo-help.1").exists());
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/demo")).unwrap();
        assert!(
            bash.contains("complete") && bash.contains("--flag"),
            "{bash}"
        );
        let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_demo")).unwrap();
        assert!(zsh.starts_with("#compdef demo"), "{zsh}");
        let fish = std::fs::read_to_string(dir.path().join("completions/fish/demo.fish")).unwrap();
        assert!(fish.contains("complete -c demo"), "{fish}");
    }
}
