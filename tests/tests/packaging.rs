//! The deb and rpm packages, the systemd unit and the AMI template, checked the way an
//! operator would meet them (docs/packaging.md). Privileged: root, for debootstrap roots and
//! chroots.
//!
//! - `deb_contents` / `rpm_contents`: the packages built from the test build's (dev profile)
//!   binaries hold what they should, where they should, with the right modes, dependencies,
//!   conffile / `%config(noreplace)` marks and maintainer scripts; every file under
//!   `integrations/` is shipped.
//! - `rpm_upgrade_keeps_edited_config`: rpm itself (into an empty root) keeps an edited
//!   config across an upgrade.
//! - `deb_in_debian_stable_root`: installed with apt into a fresh Debian stable root made
//!   by debootstrap: files, unit, enablement, empty policy directory; `airlockd --check`
//!   accepts the shipped config and `airlock policy check` the example policies there;
//!   `systemd-analyze verify` (the release's own systemd) finds nothing to say about the
//!   unit; an edited config and a local policy survive an upgrade, a remove and a purge.
//! - `ami_template`: `packer validate -syntax-only` (Debian's packer; a full `packer
//!   validate` is not possible here, see docs/packaging.md), the template's structural check
//!   (IMDSv2 required, hop limit 1, `imds_support = "v2.0"`, the provisioner), and
//!   provision.sh run in a Debian root with a stand-in runner tarball.
//!
//! `scripts/setup-package-deps.sh --debootstrap` (called by each test; a no-op once done)
//! installs the pinned tools and caches the debootstrap root under /var/cache/airlock.

use airlock_tests::paths;
use airlock_tests::prereq;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const WHO: &str = "the packaging tests";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

fn tools_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_PKG_TOOLS")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/airlock/cargo-tools"),
            PathBuf::from,
        )
}

fn pkg_venv() -> PathBuf {
    std::env::var_os("AIRLOCK_PKG_VENV")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/airlock/package-venv"),
            PathBuf::from,
        )
}

fn debootstrap_tarball() -> PathBuf {
    std::env::var_os("AIRLOCK_DEBOOTSTRAP_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/airlock/debootstrap"),
            PathBuf::from,
        )
        .join("stable-minbase-systemd.tar")
}

/// Root, the pinned tools and the cached Debian root (set up once per test process).
fn prerequisites() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        prereq::require_root_and(
            WHO,
            &[
                ("unshare", "util-linux"),
                ("chroot", "coreutils"),
                ("dpkg-deb", "dpkg"),
                ("flock", "util-linux"),
                ("tar", "tar"),
            ],
        );
        let script = paths::repo_root().join("scripts/setup-package-deps.sh");
        let out = Command::new(&script)
            .arg("--debootstrap")
            .output()
            .expect("run scripts/setup-package-deps.sh");
        assert!(
            out.status.success(),
            "{WHO} need scripts/setup-package-deps.sh --debootstrap to succeed:\n{}",
            text(&out)
        );
        prereq::require_root_and(
            WHO,
            &[
                ("rpm", "rpm"),
                ("packer", "packer"),
                ("debootstrap", "debootstrap"),
            ],
        );
        for bin in ["airlockd", "airlock", "airlock-shim"] {
            assert!(
                paths::bin(bin).is_file(),
                "{WHO} package the test build's {}: run `cargo build --bins` (make build) first",
                paths::bin(bin).display()
            );
        }
    });
}

/// Both packages, built from the dev-profile binaries into a fresh directory.
struct Packages {
    _dir: tempfile::TempDir,
    deb: PathBuf,
    rpm: PathBuf,
}

fn build_packages(revision: u32) -> Packages {
    prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    run(
        Command::new(paths::repo_root().join("packaging/build-packages.sh"))
            .args(["dev"])
            .arg(dir.path())
            .arg(revision.to_string())
            .env("AIRLOCK_PKG_TOOLS", tools_dir()),
    );
    let find = |suffix: &str| -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .expect("read package dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        assert_eq!(found.len(), 1, "one *{suffix} in {:?}", dir.path());
        found.remove(0)
    };
    let deb = find(&format!("-{revision}_amd64.deb"));
    let rpm = find(&format!("-{revision}.x86_64.rpm"));
    Packages {
        _dir: dir,
        deb,
        rpm,
    }
}

/// Every file under `integrations/` (relative path, executable?).
fn integration_files() -> Vec<(String, bool)> {
    files_under("integrations")
}

/// Every file under a directory of the repository (relative path, executable?).
fn files_under(top: &str) -> Vec<(String, bool)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, bool)>) {
        for e in std::fs::read_dir(dir).expect("read integrations") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
                let rel = p
                    .strip_prefix(base)
                    .expect("prefix")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, mode & 0o111 != 0));
            }
        }
    }
    let base = paths::repo_root().join(top);
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    assert!(!out.is_empty(), "{top}/ has files");
    out
}

/// Every file under an absolute directory (relative path, executable?).
fn files_under_path(base: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut todo = vec![base.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
                let rel = p.strip_prefix(base).expect("prefix");
                out.push((rel.to_string_lossy().into_owned(), mode & 0o111 != 0));
            }
        }
    }
    out
}

/// The man pages and completions the binaries under test generate (`__generate`), as the
/// packages must install them: (path in the package without the rpm/deb difference, i.e.
/// zsh's directory given as `ZSH/`).
fn generated_docs() -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for b in ["airlock", "airlockd"] {
        run(Command::new(paths::bin(b))
            .arg("__generate")
            .arg(dir.path()));
    }
    let mut out = Vec::new();
    for (rel, _) in files_under_path(dir.path()) {
        let name = rel.rsplit('/').next().expect("name").to_string();
        out.push(match rel.split('/').next() {
            Some("man") if name.ends_with(".8") => format!("/usr/share/man/man8/{name}.gz"),
            Some("man") => format!("/usr/share/man/man1/{name}.gz"),
            _ if rel.starts_with("completions/bash/") => {
                format!("/usr/share/bash-completion/completions/{name}")
            }
            _ if rel.starts_with("completions/zsh/") => format!("ZSH/{name}"),
            _ if rel.starts_with("completions/fish/") => {
                format!("/usr/share/fish/vendor_completions.d/{name}")
            }
            _ => panic!("unexpected generated file {rel}"),
        });
    }
    for must in [
        "/usr/share/man/man1/airlock.1.gz",
        "/usr/share/man/man1/airlock-job-start.1.gz",
        "/usr/share/man/man8/airlockd.8.gz",
        "/usr/share/bash-completion/completions/airlock",
        "ZSH/_airlock",
        "/usr/share/fish/vendor_completions.d/airlock.fish",
    ] {
        assert!(
            out.iter().any(|p| p == must),
            "{must} not generated: {out:#?}"
        );
    }
    out
}

/// Every `/usr/share/doc/airlock/…` path that the shipped configuration and units name: the
/// package must hold what it points its reader to.
fn doc_references() -> Vec<String> {
    let mut refs = Vec::new();
    for f in [
        "config/airlock.toml",
        "config/github-runners.toml",
        "packaging/systemd/airlockd.service",
        "packaging/systemd/airlock-github-runners.service",
    ] {
        let text = std::fs::read_to_string(paths::repo_root().join(f)).expect(f);
        let mut rest = text.as_str();
        while let Some(i) = rest.find("/usr/share/doc/airlock/") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
                .unwrap_or(tail.len());
            refs.push(tail[..end].trim_end_matches('.').to_string());
            rest = &tail[end..];
        }
    }
    assert!(
        refs.iter()
            .any(|r| r == "/usr/share/doc/airlock/configuration.md"),
        "config/airlock.toml points at configuration.md: {refs:?}"
    );
    refs
}

/// `dpkg-deb -c` lines as (path without the leading `.`, mode string).
fn deb_listing(deb: &Path) -> Vec<(String, String)> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].trim_start_matches('.').to_string(), f[0].to_string())
        })
        .collect()
}

#[test]
fn deb_contents() {
    let p = build_packages(1);
    let list = deb_listing(&p.deb);
    let mode = |path: &str| -> &str {
        list.iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| m.as_str())
            .unwrap_or_else(|| panic!("{path} not in the deb: {list:#?}"))
    };
    for exe in [
        "/usr/bin/airlockd",
        "/usr/bin/airlock",
        "/usr/libexec/airlock/airlock-shim",
    ] {
        assert_eq!(mode(exe), "-rwxr-xr-x", "{exe}");
    }
    assert_eq!(mode("/etc/airlock/airlock.toml"), "-rw-r--r--");
    for file in [
        "/usr/lib/systemd/system/airlockd.service",
        "/usr/lib/systemd/system/airlock-github-runners.service",
        "/usr/share/doc/airlock/examples/github-runners.toml",
    ] {
        assert_eq!(mode(file), "-rw-r--r--", "{file}");
    }
    for (rel, _) in files_under("policies") {
        assert_eq!(
            mode(&format!("/usr/share/doc/airlock/examples/policies/{rel}")),
            "-rw-r--r--",
            "policies/{rel}"
        );
    }
    for (rel, exec) in integration_files() {
        let m = mode(&format!("/usr/share/airlock/integrations/{rel}"));
        assert_eq!(
            m.contains('x'),
            exec,
            "integrations/{rel}: mode {m} in the deb"
        );
    }
    // The documentation: all of docs/, what the config and units point to, and the man
    // pages and completions the packaged binaries generate (one page per subcommand).
    for (rel, _) in files_under("docs") {
        assert_eq!(
            mode(&format!("/usr/share/doc/airlock/{rel}")),
            "-rw-r--r--",
            "docs/{rel}"
        );
    }
    for r in doc_references() {
        mode(&r);
    }
    let generated = generated_docs();
    for g in &generated {
        let g = g.replace("ZSH/", "/usr/share/zsh/vendor-completions/");
        assert_eq!(mode(&g), "-rw-r--r--", "{g}");
    }
    let man_pages = |l: &Vec<(String, String)>| -> usize {
        l.iter()
            .filter(|(p, _)| p.starts_with("/usr/share/man/") && p.ends_with(".gz"))
            .count()
    };
    assert_eq!(
        man_pages(&list),
        generated.iter().filter(|g| g.ends_with(".gz")).count(),
        "the deb's man pages are the ones the binaries generate"
    );
    // The installed page renders: the package's, gzipped, through man.
    let root = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&p.deb)
        .arg(root.path()));
    let page = stdout(
        Command::new("man")
            .args(["-E", "UTF-8", "-P", "cat", "-l"])
            .arg(root.path().join("usr/share/man/man8/airlockd.8.gz"))
            .env("MANWIDTH", "100")
            .env_remove("MAN_KEEP_FORMATTING"),
    );
    assert!(
        page.contains("--check") && page.contains("(commit "),
        "{page}"
    );

    // A fresh install grants nothing: no policy file is shipped where the agent loads them,
    // and the shim is not on PATH.
    assert!(
        !list
            .iter()
            .any(|(p, _)| p.starts_with("/etc/airlock/policies/") && !p.ends_with('/')),
        "the deb ships a policy under /etc/airlock/policies"
    );
    assert!(!list.iter().any(|(p, _)| p == "/usr/bin/airlock-shim"));
    assert!(!list.iter().any(|(p, _)| p.ends_with("shim-probe")));

    let field = |f: &str| stdout(Command::new("dpkg-deb").arg("-f").arg(&p.deb).arg(f));
    assert_eq!(field("Package").trim(), "airlock");
    let depends = field("Depends");
    assert!(
        depends.split(',').any(|d| d.trim() == "nftables"),
        "Depends: {depends}"
    );
    assert!(depends.contains("libc6"), "Depends: {depends}");

    let ctrl = tempfile::tempdir().expect("tempdir");
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&p.deb)
        .arg(ctrl.path()));
    let conffiles = std::fs::read_to_string(ctrl.path().join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/airlock/airlock.toml");
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let path = ctrl.path().join(script);
        let body = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no {script}"));
        assert_eq!(
            body,
            std::fs::read_to_string(paths::repo_root().join("packaging/deb").join(script))
                .expect("packaging/deb script"),
            "{script} is packaging/deb/{script}"
        );
        assert_ne!(
            std::fs::metadata(&path).expect("stat").permissions().mode() & 0o111,
            0,
            "{script} executable"
        );
        run(Command::new("sh").arg("-n").arg(&path));
    }
}

#[test]
fn rpm_contents() {
    let p = build_packages(1);
    let files = stdout(Command::new("rpm").arg("-qpl").arg(&p.rpm));
    let files: Vec<&str> = files.lines().collect();
    for f in [
        "/usr/bin/airlockd",
        "/usr/bin/airlock",
        "/usr/libexec/airlock/airlock-shim",
        "/etc/airlock/airlock.toml",
        "/usr/lib/systemd/system/airlockd.service",
        "/usr/share/doc/airlock/examples/policies/10-production.toml",
    ] {
        assert!(files.contains(&f), "{f} not in the rpm: {files:#?}");
    }
    for (rel, _) in integration_files() {
        let f = format!("/usr/share/airlock/integrations/{rel}");
        assert!(files.contains(&f.as_str()), "{f} not in the rpm");
    }
    for (rel, _) in files_under("policies") {
        let f = format!("/usr/share/doc/airlock/examples/policies/{rel}");
        assert!(files.contains(&f.as_str()), "{f} not in the rpm");
    }
    assert!(!files
        .iter()
        .any(|f| f.starts_with("/etc/airlock/policies/")));
    // The documentation, as in the deb; zsh's directory is the Fedora/RHEL one.
    for (rel, _) in files_under("docs") {
        let f = format!("/usr/share/doc/airlock/{rel}");
        assert!(files.contains(&f.as_str()), "{f} not in the rpm");
    }
    for r in doc_references() {
        assert!(files.contains(&r.as_str()), "{r} not in the rpm");
    }
    for g in generated_docs() {
        let g = g.replace("ZSH/", "/usr/share/zsh/site-functions/");
        assert!(files.contains(&g.as_str()), "{g} not in the rpm");
    }

    let info = stdout(Command::new("rpm").arg("-qpi").arg(&p.rpm));
    let value = |key: &str| -> String {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {key} in rpm -qpi:\n{info}"))
    };
    assert_eq!(value("Name"), "airlock");
    assert_eq!(value("Version"), "0.1.0");
    assert_eq!(value("License"), "Apache-2.0");

    let requires = stdout(Command::new("rpm").arg("-qpR").arg(&p.rpm));
    assert!(
        requires.lines().any(|l| l.trim() == "nftables"),
        "Requires: {requires}"
    );

    // %config(noreplace) on the config only; modes as they must be.
    let flags = stdout(
        Command::new("rpm")
            .args([
                "-qp",
                "--qf",
                "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms}\\n]",
            ])
            .arg(&p.rpm),
    );
    let row = |f: &str| -> Vec<String> {
        flags
            .lines()
            .find(|l| l.split_whitespace().next() == Some(f))
            .unwrap_or_else(|| panic!("{f} not in:\n{flags}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let conf = row("/etc/airlock/airlock.toml");
    assert_eq!(conf[1], "cn", "config flags of airlock.toml: {conf:?}");
    for exe in ["/usr/bin/airlockd", "/usr/libexec/airlock/airlock-shim"] {
        assert_eq!(
            row(exe).last().map(String::as_str),
            Some("-rwxr-xr-x"),
            "{exe}"
        );
    }
    for line in flags.lines().filter(|l| !l.starts_with("/etc/")) {
        assert!(!line.contains(" c"), "only /etc is config: {line}");
    }

    let scripts = stdout(Command::new("rpm").args(["-qp", "--scripts"]).arg(&p.rpm));
    for (part, file) in [
        ("preinstall scriptlet", "pre.sh"),
        ("postinstall scriptlet", "post.sh"),
        ("preuninstall scriptlet", "preun.sh"),
        ("postuninstall scriptlet", "postun.sh"),
    ] {
        assert!(scripts.contains(part), "no {part}:\n{scripts}");
        let body = std::fs::read_to_string(paths::repo_root().join("packaging/rpm").join(file))
            .expect("scriptlet");
        assert!(
            scripts.contains(body.trim()),
            "{part} is packaging/rpm/{file}"
        );
        run(Command::new("sh")
            .arg("-n")
            .arg(paths::repo_root().join("packaging/rpm").join(file)));
    }
}

#[test]
fn rpm_upgrade_keeps_edited_config() {
    let v1 = build_packages(1);
    let v2 = build_packages(2);
    let root = tempfile::tempdir().expect("tempdir");
    let rpm = |args: &[&str], pkg: &Path| {
        run(Command::new("rpm")
            .arg("--root")
            .arg(root.path())
            .args(["--nodeps", "--noscripts"])
            .args(args)
            .arg(pkg));
    };
    rpm(&["-i"], &v1.rpm);
    let config = root.path().join("etc/airlock/airlock.toml");
    let shipped = std::fs::read_to_string(&config).expect("installed config");
    assert_eq!(
        shipped,
        std::fs::read_to_string(paths::repo_root().join("config/airlock.toml")).unwrap()
    );
    let edited = shipped.replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
    assert_ne!(edited, shipped);
    std::fs::write(&config, &edited).unwrap();
    rpm(&["-U"], &v2.rpm);
    let q = stdout(
        Command::new("rpm")
            .arg("--root")
            .arg(root.path())
            .args(["-q", "airlock"]),
    );
    assert_eq!(q.trim(), "airlock-0.1.0-2.x86_64");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        edited,
        "the edited config was replaced by the upgrade"
    );
}

/// A fresh Debian stable root (from the cached debootstrap tarball), entered through a
/// private mount namespace so nothing mounted for it outlives the command.
struct DebianRoot {
    dir: tempfile::TempDir,
}

impl DebianRoot {
    fn new() -> DebianRoot {
        prerequisites();
        let dir = tempfile::Builder::new()
            .prefix("airlock-debroot.")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        run(Command::new("tar")
            .arg("-C")
            .arg(dir.path())
            .arg("-xf")
            .arg(debootstrap_tarball()));
        std::fs::copy("/etc/resolv.conf", dir.path().join("etc/resolv.conf")).expect("resolv.conf");
        let os = std::fs::read_to_string(dir.path().join("etc/os-release")).expect("os-release");
        assert!(os.contains("ID=debian"), "{os}");
        DebianRoot { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    fn put(&self, src: &Path, dest: &str) {
        std::fs::copy(src, self.path(dest)).unwrap_or_else(|e| panic!("copy to {dest}: {e}"));
    }

    /// `sh -c SCRIPT` inside the root; the output, whatever the status.
    fn sh(&self, script: &str) -> Output {
        let r = self.dir.path().display().to_string();
        let outer = format!(
            "set -e; mount --make-rprivate /; mount -t proc proc '{r}/proc'; \
             mount --rbind /dev '{r}/dev'; exec chroot '{r}' /usr/bin/env -i \
             PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
             /bin/sh -c \"$0\""
        );
        Command::new("unshare")
            .args(["--mount", "--fork", "sh", "-c", &outer, script])
            .output()
            .expect("unshare chroot")
    }

    /// Like `sh`, but panics unless it succeeds.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the root: {script}\n{}",
            text(&out)
        );
        text(&out)
    }
}

#[test]
fn deb_in_debian_stable_root() {
    let v1 = build_packages(1);
    let v2 = build_packages(2);
    let root = DebianRoot::new();
    root.put(&v1.deb, "/tmp/airlock_1.deb");
    root.put(&v2.deb, "/tmp/airlock_2.deb");
    assert!(
        !root.path("/usr/sbin/nft").exists(),
        "the root must start without nftables, so apt resolves the dependency"
    );

    // apt resolves the dependency; the maintainer scripts run with no systemd running.
    root.ok("apt-get install -y -q /tmp/airlock_1.deb");
    for f in [
        "/usr/bin/airlockd",
        "/usr/bin/airlock",
        "/usr/libexec/airlock/airlock-shim",
        "/usr/sbin/nft",
    ] {
        let m = std::fs::metadata(root.path(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert_ne!(m.permissions().mode() & 0o111, 0, "{f} executable");
    }
    assert_eq!(
        std::fs::read_to_string(root.path("/etc/airlock/airlock.toml")).unwrap(),
        std::fs::read_to_string(paths::repo_root().join("config/airlock.toml")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(root.path("/usr/lib/systemd/system/airlockd.service")).unwrap(),
        std::fs::read_to_string(paths::repo_root().join("packaging/systemd/airlockd.service"))
            .unwrap()
    );
    let wants = root.path("/etc/systemd/system/multi-user.target.wants/airlockd.service");
    assert_eq!(
        std::fs::read_link(&wants).expect("airlockd enabled (wants symlink)"),
        Path::new("/usr/lib/systemd/system/airlockd.service")
    );
    let policies: Vec<_> = std::fs::read_dir(root.path("/etc/airlock/policies"))
        .expect("/etc/airlock/policies exists")
        .collect();
    assert!(policies.is_empty(), "a fresh install has no policy");
    for d in ["/var/lib/airlock", "/var/log/airlock"] {
        let m = std::fs::metadata(root.path(d)).unwrap_or_else(|_| panic!("{d} missing"));
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{d} mode");
    }

    // The config names the shim where the package put it.
    let cfg: toml::Value =
        toml::from_str(&std::fs::read_to_string(root.path("/etc/airlock/airlock.toml")).unwrap())
            .expect("config parses");
    let shim = cfg["sandbox"]["shim"].as_str().expect("[sandbox] shim set");
    assert_eq!(shim, "/usr/libexec/airlock/airlock-shim");
    assert!(root.path(shim).is_file());

    // The agent validates the shipped config (and its empty policy directory) and the
    // example policies, there.
    let check = root.ok("airlockd --check --config /etc/airlock/airlock.toml");
    assert!(
        check.contains("is valid; 0 policy rule(s) loaded from /etc/airlock/policies"),
        "{check}"
    );
    // It trusts the audience the hooks request, and not AWS's (no warning about it).
    assert!(!check.contains("warning"), "{check}");
    let installed = std::fs::read_to_string(root.path("/etc/airlock/airlock.toml")).unwrap();
    assert!(
        installed.contains("audiences = [\"airlock\"]") && !installed.contains("sts.amazonaws.com"),
        "{installed}"
    );
    // Every shipped directory of example policies loads (the examples and the cookbook's).
    let mut dirs: Vec<String> = files_under("policies")
        .into_iter()
        // `cases/` holds `airlock policy test` tables, not policies: run below.
        .filter(|(rel, _)| rel.ends_with(".toml") && !rel.starts_with("cases/"))
        .map(|(rel, _)| match rel.rsplit_once('/') {
            Some((dir, _)) => format!("/usr/share/doc/airlock/examples/policies/{dir}"),
            None => "/usr/share/doc/airlock/examples/policies".to_string(),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    assert!(dirs.contains(&"/usr/share/doc/airlock/examples/policies".to_string()));
    for dir in &dirs {
        let out = root.ok(&format!("airlock policy check {dir}"));
        assert!(out.contains("rule(s), valid"), "{dir}: {out}");
    }
    // The shipped examples pass their own cases with the installed configuration's issuers.
    let out = root.ok(
        "airlock policy test /usr/share/doc/airlock/examples/policies/cases/shipped.toml \
         --dir /usr/share/doc/airlock/examples/policies",
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("ok"), "{out}");
    // ... and really checks: a broken policy there is refused with exit 65.
    std::fs::write(
        root.path("/etc/airlock/policies/99-broken.toml"),
        "[[rule]\n",
    )
    .unwrap();
    let bad = root.sh("airlockd --check --config /etc/airlock/airlock.toml");
    assert_eq!(bad.status.code(), Some(65), "{}", text(&bad));
    std::fs::remove_file(root.path("/etc/airlock/policies/99-broken.toml")).unwrap();

    // The units, verified by the release's own systemd: not a single remark.
    for unit in ["airlockd.service", "airlock-github-runners.service"] {
        let verify = root.sh(&format!(
            "systemd-analyze verify /usr/lib/systemd/system/{unit}"
        ));
        assert!(
            verify.status.success() && text(&verify).trim().is_empty(),
            "systemd-analyze verify {unit}:\n{}",
            text(&verify)
        );
    }

    let unit = root.ok("systemctl cat airlockd.service 2>/dev/null || cat /usr/lib/systemd/system/airlockd.service");
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStart=/usr/bin/airlockd --config /etc/airlock/airlock.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    for forbidden in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateMounts=",
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} would put the agent in a mount namespace of its own"
        );
    }

    // An operator's edits survive an upgrade, untouched and without a prompt.
    let config = root.path("/etc/airlock/airlock.toml");
    let edited = std::fs::read_to_string(&config)
        .unwrap()
        .replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
    std::fs::write(&config, &edited).unwrap();
    let local =
        std::fs::read_to_string(paths::repo_root().join("policies/30-ci-readonly.toml")).unwrap();
    std::fs::write(root.path("/etc/airlock/policies/50-local.toml"), &local).unwrap();
    root.ok("systemctl disable airlockd.service");
    root.ok("apt-get install -y -q /tmp/airlock_2.deb");
    let version = root.ok("dpkg-query -W -f '${Version}' airlock");
    assert_eq!(version.trim(), "0.1.0-2");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(root.path("/etc/airlock/policies/50-local.toml")).unwrap(),
        local
    );
    assert!(!root.path("/etc/airlock/airlock.toml.dpkg-new").exists());
    assert!(
        wants.symlink_metadata().is_err(),
        "the upgrade enabled the service the admin had disabled"
    );
    let check = root.ok("airlockd --check --config /etc/airlock/airlock.toml");
    assert!(check.contains("1 policy rule(s)"), "{check}");

    // Remove keeps the config and the policies; purge takes the config and the job
    // records, and leaves the admin's policies and the audit log.
    std::fs::write(root.path("/var/log/airlock/audit.jsonl"), "{}\n").unwrap();
    root.ok("apt-get remove -y -q airlock");
    assert!(!root.path("/usr/bin/airlockd").exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    root.ok("dpkg --purge airlock");
    assert!(!config.exists(), "purge removes the config");
    assert!(!root.path("/var/lib/airlock").exists());
    assert!(root.path("/etc/airlock/policies/50-local.toml").exists());
    assert!(root.path("/var/log/airlock/audit.jsonl").exists());
    assert!(!root
        .path("/usr/lib/systemd/system/airlockd.service")
        .exists());
}

#[test]
fn ami_template() {
    prerequisites();
    let ami = paths::repo_root().join("packaging/ami");

    // Packer's own parser (Debian's packer 1.6.6: syntax only, see the module doc).
    let out = run(Command::new("packer")
        .args(["validate", "-syntax-only"])
        .arg(ami.join("airlock-runner.pkr.hcl")));
    assert!(
        text(&out).contains("Syntax-only check passed"),
        "{}",
        text(&out)
    );
    // ... which does catch a broken template.
    let bad_dir = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(ami.join("airlock-runner.pkr.hcl")).unwrap();
    std::fs::write(
        bad_dir.path().join("bad.pkr.hcl"),
        template.replacen("metadata_options {", "metadata_options {{", 1),
    )
    .unwrap();
    let bad = Command::new("packer")
        .args(["validate", "-syntax-only"])
        .arg(bad_dir.path().join("bad.pkr.hcl"))
        .output()
        .unwrap();
    assert!(!bad.status.success(), "packer accepted a broken template");

    // The structure the image's security depends on.
    let out = run(Command::new(pkg_venv().join("bin/python"))
        .arg(ami.join("check_template.py"))
        .arg(&ami));
    let report = text(&out);
    for check in [
        "metadata_options.http_tokens = required",
        "metadata_options.http_put_response_hop_limit = 1",
        "imds_support = \"v2.0\" on the AMI",
        "the shell provisioner runs provision.sh",
    ] {
        assert!(report.contains(&format!("ok   {check}")), "{report}");
    }
    // ... and the check fails when the hop limit is raised.
    for f in ["plugins.pkr.hcl", "provision.sh"] {
        std::fs::copy(ami.join(f), bad_dir.path().join(f)).unwrap();
    }
    std::fs::write(
        bad_dir.path().join("airlock-runner.pkr.hcl"),
        template.replace(
            "http_put_response_hop_limit = 1",
            "http_put_response_hop_limit = 2",
        ),
    )
    .unwrap();
    let bad = Command::new(pkg_venv().join("bin/python"))
        .arg(ami.join("check_template.py"))
        .arg(bad_dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success(), "hop limit 2 passed: {}", text(&bad));

    // provision.sh in a Debian stable root, with a stand-in for the runner's tarball.
    let pkgs = build_packages(1);
    let root = DebianRoot::new();
    root.put(&pkgs.deb, "/tmp/airlock.deb");
    root.put(&ami.join("provision.sh"), "/tmp/provision.sh");
    let runner = tempfile::tempdir().unwrap();
    std::fs::create_dir(runner.path().join("bin")).unwrap();
    std::fs::write(
        runner.path().join("run.sh"),
        "#!/bin/sh\necho fake runner\n",
    )
    .unwrap();
    std::fs::write(runner.path().join(".env"), "LANG=C.UTF-8\n").unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(runner.path())
        .arg("-czf")
        .arg(root.path("/tmp/runner.tar.gz"))
        .arg("."));
    root.ok(
        "AIRLOCK_DEB=/tmp/airlock.deb RUNNER_TARBALL=/tmp/runner.tar.gz bash /tmp/provision.sh",
    );

    let env = std::fs::read_to_string(root.path("/opt/actions-runner/.env")).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"LANG=C.UTF-8"), "{env}");
    assert!(
        lines.contains(
            &"ACTIONS_RUNNER_HOOK_JOB_STARTED=/usr/share/airlock/integrations/github/job-started.sh"
        ),
        "{env}"
    );
    assert!(
        lines.contains(
            &"ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/usr/share/airlock/integrations/github/job-completed.sh"
        ),
        "{env}"
    );
    assert!(root.path("/opt/actions-runner/run.sh").is_file());
    let uid = root.ok("id -u runner");
    let groups = root.ok("id -nG runner");
    assert!(
        groups.split_whitespace().any(|g| g == "airlock"),
        "{groups}"
    );
    let cfg: toml::Value =
        toml::from_str(&std::fs::read_to_string(root.path("/etc/airlock/airlock.toml")).unwrap())
            .expect("provisioned config parses");
    assert_eq!(cfg["agent"]["control_group"].as_str(), Some("airlock"));
    assert_eq!(
        cfg["sandbox"]["runner_uid"]
            .as_integer()
            .map(|u| u.to_string()),
        Some(uid.trim().to_string())
    );
    let hide: Vec<&str> = cfg["sandbox"]["hide"]
        .as_array()
        .expect("hide")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        hide.contains(&"/opt/actions-runner/.credentials"),
        "{hide:?}"
    );
    root.ok("airlockd --check --config /etc/airlock/airlock.toml");
    assert!(
        root.path("/etc/systemd/system/multi-user.target.wants/airlockd.service")
            .symlink_metadata()
            .is_ok(),
        "airlockd is enabled in the image"
    );
    // Nothing of the build is baked in.
    assert_eq!(
        std::fs::read_dir(root.path("/var/lib/airlock"))
            .unwrap()
            .count(),
        0
    );
    assert!(!root.path("/tmp/airlock.deb").exists());
}

/// The unit's protections are passed on by the kernel to every child, and jobs are the
/// agent's descendants (it starts their sandbox init): none may be one that breaks what CI
/// jobs do — JITs (`MemoryDenyWriteExecute=`), `setarch`/`linux32` (`LockPersonality=`),
/// packaging a set-id program (`RestrictSUIDSGID=`) — and none may give the agent a mount
/// namespace of its own (the jobs' mounts must be the host's).
#[test]
fn the_unit_passes_nothing_on_that_breaks_a_job() {
    let unit =
        std::fs::read_to_string(paths::repo_root().join("packaging/systemd/airlockd.service"))
            .unwrap();
    let set: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for key in [
        "MemoryDenyWriteExecute=",
        "LockPersonality=",
        "RestrictSUIDSGID=",
        "PrivateMounts=",
        "ProtectSystem=",
        "PrivateTmp=",
        "ProtectHome=",
    ] {
        assert!(
            !set.iter().any(|l| l.starts_with(key)),
            "the unit sets {key}: {set:?}"
        );
    }
    // What it does set, and what the sandbox init undoes for each job.
    assert!(set.contains(&"OOMScoreAdjust=-500"), "{set:?}");
    assert!(set.contains(&"NoNewPrivileges=yes"), "{set:?}");
}

/// A maintainer script from `packaging/`, with the host paths it reads pointed into `dir`.
fn script_in(dir: &Path, rel: &str) -> PathBuf {
    let body = std::fs::read_to_string(paths::repo_root().join("packaging").join(rel))
        .expect("maintainer script");
    let body = body
        .replace(
            "/usr/bin/airlock",
            &dir.join("airlock").display().to_string(),
        )
        .replace(
            "/run/systemd/system",
            &dir.join("systemd").display().to_string(),
        )
        .replace(
            "/etc/default/airlock",
            &dir.join("default").display().to_string(),
        )
        .replace(
            "/etc/sysconfig/airlock",
            &dir.join("sysconfig").display().to_string(),
        );
    for host in [
        "/usr/bin/airlock",
        "/run/systemd/system",
        "/etc/default/airlock",
    ] {
        assert!(!body.contains(host), "{rel} still reads {host}");
    }
    let path = dir.join(rel.replace('/', "-"));
    std::fs::write(&path, body).unwrap();
    path
}

/// Runs `script arg` with fake `systemctl` (the agent active when `active`),
/// `systemd-detect-virt` (not a chroot) and `airlock` (which logs its arguments and exits
/// with `airlock_rc`); returns the script's status, its output and the `airlock` calls.
fn run_maintainer_script(
    rel: &str,
    arg: &str,
    active: bool,
    airlock_rc: i32,
    env: &[(&str, &str)],
    default_file: Option<&str>,
) -> (i32, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("systemd")).unwrap();
    std::fs::create_dir(d.join("bin")).unwrap();
    let exe = |p: PathBuf, body: String| {
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    exe(
        d.join("bin/systemctl"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {}/systemctl.log\n[ \"$1\" = is-active ] && exit {}\nexit 0\n",
            d.display(),
            if active { 0 } else { 3 }
        ),
    );
    exe(
        d.join("bin/systemd-detect-virt"),
        "#!/bin/sh\nexit 1\n".into(),
    );
    exe(
        d.join("airlock"),
        format!(
            "#!/bin/sh\necho \"$*\" >> {}/airlock.log\nexit {airlock_rc}\n",
            d.display()
        ),
    );
    if let Some(text) = default_file {
        std::fs::write(d.join("default"), text).unwrap();
    }
    let script = script_in(d, rel);
    let mut cmd = Command::new("sh");
    cmd.arg(&script)
        .arg(arg)
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", d.join("bin").display()));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the maintainer script");
    let calls = std::fs::read_to_string(d.join("airlock.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    (out.status.code().unwrap_or(-1), text(&out), calls)
}

/// An upgrade drains a running agent before the new files replace the old ones (deb
/// preinst, rpm %pre: the old package's prerm/%preun run too late in rpm's order), for the
/// configured time, and never fails or blocks the upgrade on what the drain says; a first
/// install, a stopped agent or AIRLOCK_DRAIN_TIMEOUT=0 drains nothing. A failed deb upgrade
/// takes jobs again.
#[test]
fn maintainer_scripts_drain_a_running_agent_before_an_upgrade() {
    for (rel, upgrade, install) in [
        ("deb/preinst", "upgrade", "install"),
        ("rpm/pre.sh", "2", "1"),
    ] {
        let (rc, out, calls) = run_maintainer_script(rel, upgrade, true, 0, &[], None);
        assert_eq!(rc, 0, "{rel}: {out}");
        assert_eq!(calls, ["drain --timeout 30m"], "{rel}: {out}");
        assert!(out.contains("drained; airlockd restarts"), "{rel}: {out}");

        let file = "# local\nAIRLOCK_DRAIN_TIMEOUT=\"45m\"\n";
        let (_, out, calls) = run_maintainer_script(rel, upgrade, true, 0, &[], Some(file));
        assert_eq!(calls, ["drain --timeout 45m"], "{rel}: {out}");
        // The environment (`AIRLOCK_DRAIN_TIMEOUT=2h apt install …`) wins over the file.
        let env = [("AIRLOCK_DRAIN_TIMEOUT", "2h")];
        let (_, out, calls) = run_maintainer_script(rel, upgrade, true, 0, &env, Some(file));
        assert_eq!(calls, ["drain --timeout 2h"], "{rel}: {out}");
        // Not a duration: the default, said so.
        let env = [("AIRLOCK_DRAIN_TIMEOUT", "soon; rm -rf /")];
        let (rc, out, calls) = run_maintainer_script(rel, upgrade, true, 0, &env, None);
        assert_eq!(
            (rc, calls.as_slice()),
            (0, ["drain --timeout 30m".to_string()].as_slice()),
            "{rel}: {out}"
        );
        assert!(
            out.contains("is not a number with s, m, h or d; using 30m"),
            "{rel}: {out}"
        );
        // 0: no drain, and the restart's consequence is said.
        let env = [("AIRLOCK_DRAIN_TIMEOUT", "0")];
        let (rc, out, calls) = run_maintainer_script(rel, upgrade, true, 0, &env, None);
        assert_eq!((rc, calls.len()), (0, 0), "{rel}: {out}");
        assert!(out.contains("not draining"), "{rel}: {out}");
        // Timed out (75) or failed (an airlock older than drain: clap's 2): the upgrade
        // goes on, and says what the restart does to the jobs left.
        for (code, says) in [
            (75, "jobs still ran after 30m"),
            (2, "could not be drained (exit 2)"),
        ] {
            let (rc, out, _) = run_maintainer_script(rel, upgrade, true, code, &[], None);
            assert_eq!(rc, 0, "{rel}: {out}");
            assert!(
                out.contains(says) && out.contains("ends and wipes"),
                "{rel}: {out}"
            );
        }
        // A first install, or an agent that is not running: nothing to drain.
        let (rc, out, calls) = run_maintainer_script(rel, install, true, 0, &[], None);
        assert_eq!((rc, calls.len()), (0, 0), "{rel} {install}: {out}");
        let (rc, out, calls) = run_maintainer_script(rel, upgrade, false, 0, &[], None);
        assert_eq!((rc, calls.len()), (0, 0), "{rel}, agent stopped: {out}");
    }
    let (rc, out, calls) = run_maintainer_script("deb/postrm", "abort-upgrade", true, 0, &[], None);
    assert_eq!(
        (rc, calls.as_slice()),
        (0, ["drain --cancel".to_string()].as_slice()),
        "{out}"
    );
}
