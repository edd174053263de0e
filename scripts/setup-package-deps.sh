#!/usr/bin/env bash
# Installs what the packaging test (tests/tests/packaging.rs) and `make package` need, pinned,
# and caches it outside the clone. Idempotent: a second run is a no-op.
#   - cargo-deb and cargo-generate-rpm (`cargo install --locked --version`), into
#     $AIRLOCK_PKG_TOOLS (as root /var/cache/airlock/cargo-tools, else
#     ~/.cache/airlock/cargo-tools); their bin/ is what build-packages.sh puts on PATH;
#   - Debian packages, from the machine's apt sources (the stable release's versions), as
#     root: binutils (strip); with --debootstrap also debootstrap, rpm, packer, python3-venv;
#   - with --debootstrap, a Python venv with python-hcl2 ($AIRLOCK_PKG_VENV, as root
#     /var/cache/airlock/package-venv) for the AMI template's structural check;
#   - with --debootstrap (the packaging test passes it; `make package` does not): a Debian
#     stable minbase root with systemd, made by debootstrap from deb.debian.org and kept as a
#     tarball in $AIRLOCK_DEBOOTSTRAP_CACHE (default /var/cache/airlock/debootstrap), made
#     again when older than 7 days. The test unpacks a fresh copy for each run.
# It never uses sudo.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'setup-package-deps: %s\n' "$*"; }
die() { printf 'setup-package-deps: error: %s\n' "$*" >&2; exit 1; }

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
PYTHON_HCL2_VERSION=8.1.4
SUITE=stable
MIRROR=http://deb.debian.org/debian

if [[ $(id -u) -eq 0 ]]; then
    tools="${AIRLOCK_PKG_TOOLS:-/var/cache/airlock/cargo-tools}"
    venv="${AIRLOCK_PKG_VENV:-/var/cache/airlock/package-venv}"
else
    tools="${AIRLOCK_PKG_TOOLS:-$HOME/.cache/airlock/cargo-tools}"
    venv="${AIRLOCK_PKG_VENV:-$HOME/.cache/airlock/package-venv}"
fi
cache="${AIRLOCK_DEBOOTSTRAP_CACHE:-/var/cache/airlock/debootstrap}"

want_debootstrap=0
for arg in "$@"; do
    case "$arg" in
    --debootstrap) want_debootstrap=1 ;;
    *) die "unknown argument $arg" ;;
    esac
done

# One run at a time (the packaging tests call this in parallel).
mkdir -p /var/cache/airlock 2>/dev/null || true
lockdir=/var/cache/airlock; [[ -w $lockdir ]] || lockdir="${TMPDIR:-/tmp}"
exec 9>"$lockdir/.setup-package-deps.lock"
flock 9

# --- Debian packages -----------------------------------------------------------------------
# `make package` needs strip only; the tests (--debootstrap) the rest too.
need=()
command -v strip >/dev/null || need+=(binutils)
if ((want_debootstrap)); then
    command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || need+=(debootstrap)
    command -v rpm >/dev/null || need+=(rpm)
    command -v packer >/dev/null || need+=(packer)
    /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
fi
if ((${#need[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "installing ${need[*]} with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        die "missing Debian packages: ${need[*]} (apt-get install them as root)"
    fi
fi
if ((want_debootstrap)); then
    say "debootstrap $(dpkg-query -W -f='${Version}' debootstrap), rpm $(dpkg-query -W -f='${Version}' rpm), packer $(dpkg-query -W -f='${Version}' packer)"
fi

# --- cargo-deb, cargo-generate-rpm ---------------------------------------------------------
install_tool() { # crate version binary
    local crate=$1 version=$2 bin=$3
    if [[ -x "$tools/bin/$bin" ]] && "$tools/bin/$bin" --version 2>/dev/null | grep -qF "$version"; then
        say "$crate $version is installed"
        return
    fi
    command -v cargo >/dev/null || die "cargo not found"
    say "cargo install --locked --version $version $crate (into $tools)"
    # A temporary target dir of its own: never the workspace's (its lock, its profile).
    local build
    build="$(mktemp -d)"
    CARGO_TARGET_DIR="$build" cargo install --quiet --locked --version "$version" \
        --root "$tools" "$crate"
    rm -rf "$build"
    "$tools/bin/$bin" --version | grep -qF "$version" || die "$crate did not report version $version"
}
install_tool cargo-deb "$CARGO_DEB_VERSION" cargo-deb
install_tool cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION" cargo-generate-rpm

# --- python-hcl2 venv (tests only) ----------------------------------------------------------
if ((!want_debootstrap)); then
    :
elif [[ -x "$venv/bin/python" ]] && [[ "$(cat "$venv/.airlock-stamp" 2>/dev/null)" == "python-hcl2==$PYTHON_HCL2_VERSION" ]]; then
    say "python venv $venv is up to date (python-hcl2 $PYTHON_HCL2_VERSION)"
else
    say "creating python venv $venv with python-hcl2==$PYTHON_HCL2_VERSION"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        "python-hcl2==$PYTHON_HCL2_VERSION"
    echo "python-hcl2==$PYTHON_HCL2_VERSION" > "$venv/.airlock-stamp"
fi

# --- Debian stable root --------------------------------------------------------------------
if ((want_debootstrap)); then
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
    tarball="$cache/$SUITE-minbase-systemd.tar"
    if [[ -f "$tarball" ]] && [[ -n "$(find "$tarball" -mtime -7)" ]]; then
        say "debootstrap root $tarball is fresh"
    else
        mkdir -p "$cache"
        work="$(mktemp -d "$cache/build.XXXXXX")"
        trap 'rm -rf "$work"' EXIT
        say "debootstrap --variant=minbase $SUITE from $MIRROR (a few minutes)"
        # systemd: for `systemd-analyze verify` of the unit in the target release; the
        # package's own dependencies (nftables) are left for apt to resolve in the test.
        if ! debootstrap --variant=minbase --include=systemd "$SUITE" "$work/root" "$MIRROR" \
            >"$work/debootstrap.log" 2>&1; then
            tail -n 30 "$work/debootstrap.log" >&2
            [[ -f "$work/root/debootstrap/debootstrap.log" ]] && tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2
            die "debootstrap failed"
        fi
        # Package lists for the test's `apt-get install ./airlock.deb`, then no cached .debs.
        cp /etc/resolv.conf "$work/root/etc/resolv.conf"
        chroot "$work/root" apt-get update -qq
        chroot "$work/root" apt-get clean
        tar -C "$work/root" -cf "$tarball.new" .
        mv "$tarball.new" "$tarball"
        rm -rf "$work"
        trap - EXIT
        say "cached $tarball ($(du -h "$tarball" | cut -f1))"
    fi
fi

say "done (tools: $tools/bin, venv: $venv)"
