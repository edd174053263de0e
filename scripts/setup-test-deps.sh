#!/usr/bin/env bash
# Installs what airlock's end-to-end tests and demo run against, pinned:
#   - a Python venv (scripts/venv-path.sh: $AIRLOCK_VENV, as root /var/cache/airlock/test-venv)
#     with moto[server] (the STS
#     stand-in), boto3 and the AWS CLI, from tests/clients/requirements.txt;
#   - the AWS SDK for JavaScript v3 in tests/node (npm ci from package-lock.json);
#   - nftables (`nft`), as root on Debian, for the outbound sandbox tests;
#   - rsyslog (the audit anchor test's syslog receiver) and systemd's journald (its journal),
#     as root on Debian.
#   - tinyproxy (the proxy test's HTTP proxy), as root on Debian.
#   - a C++ compiler (g++), as root on Debian, for libFuzzer in the fuzz targets.
# Idempotent: a stamp holding the hash of the pins makes a second run a no-op.
# Needs python3 (with venv), node >= 20 and npm. As root on Debian it installs python3-venv
# when missing; it never uses sudo.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# As root the venv lives where a sandboxed job can run it too (/root is hidden from jobs);
# scripts/venv-path.sh is the one place that says where.
venv="$("$repo/scripts/venv-path.sh")"
# The system's interpreter when there is one: a venv made from an interpreter under /root
# (pyenv) would not run inside a job's sandbox.
py=python3
[[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
reqs="$repo/tests/clients/requirements.txt"
node_dir="$repo/tests/node"

say() { printf 'setup-test-deps: %s\n' "$*"; }
die() { printf 'setup-test-deps: error: %s\n' "$*" >&2; exit 1; }

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- nftables ----------------------------------------------------------------------------
# Outbound jobs' firewall is applied with `nft` (Debian package nftables, the stable
# release's version); the privileged tests fail without it.
if command -v nft >/dev/null || [[ -x /usr/sbin/nft ]]; then
    say "nft found: $( (command -v nft || echo /usr/sbin/nft) | head -1)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing nftables with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
    say "installed $(/usr/sbin/nft --version)"
else
    say "warning: nft not found: outbound sandbox tests need it (Debian: apt-get install nftables, as root)"
fi

# --- rsyslog and systemd-journald ---------------------------------------------------------
# The audit anchor test (tests/tests/audit_anchors.rs) runs a real rsyslogd and a real
# systemd-journald (in a journal namespace of its own) on loopback with its own
# configuration; neither is started as a service. rsyslog is pinned to bookworm's upstream
# release 8.2302.0 (any Debian revision of it: security updates replace the older ones).
rsyslog_version='8.2302.0-1+deb12u*'
if [[ -x /usr/sbin/rsyslogd ]]; then
    say "rsyslogd found: $(/usr/sbin/rsyslogd -v | head -1)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing rsyslog=$rsyslog_version with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "rsyslog=$rsyslog_version" >/dev/null
    say "installed $(/usr/sbin/rsyslogd -v | head -1)"
else
    say "warning: rsyslogd not found: the audit anchor test needs it (Debian: apt-get install rsyslog, as root)"
fi
if [[ -x /lib/systemd/systemd-journald && -x /usr/bin/journalctl ]]; then
    say "systemd-journald found"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing systemd (journald, journalctl) with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
else
    say "warning: systemd-journald not found: the audit anchor test needs it (Debian: apt-get install systemd)"
fi

# --- tinyproxy ---------------------------------------------------------------------------
# The proxy test (tests/tests/proxy.rs) runs a real tinyproxy in the foreground on its own
# configuration. Only the binary package: `tinyproxy` would also install and start a system
# service. Pinned to bookworm's upstream release 1.11.1 (any Debian revision of it).
tinyproxy_version='1.11.1-*'
if [[ -x /usr/bin/tinyproxy ]]; then
    say "tinyproxy found: $(/usr/bin/tinyproxy -v 2>&1 | head -1)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing tinyproxy-bin=$tinyproxy_version with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "tinyproxy-bin=$tinyproxy_version" >/dev/null
    say "installed $(/usr/bin/tinyproxy -v 2>&1 | head -1)"
else
    say "warning: tinyproxy not found: the proxy test needs it (Debian: apt-get install tinyproxy-bin, as root)"
fi

# --- C++ compiler ------------------------------------------------------------------------
# The fuzz targets (scripts/fuzz.sh, run by `make test`) link libFuzzer, which the pinned
# libfuzzer-sys crate compiles from its C++ sources (Debian package g++, the stable
# release's version).
if command -v c++ >/dev/null || command -v g++ >/dev/null; then
    say "C++ compiler found: $(command -v c++ || command -v g++)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing g++ with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    say "installed $(g++ --version | head -1)"
else
    say "warning: no C++ compiler: the fuzz targets need one (Debian: apt-get install g++, as root)"
fi

# --- man ---------------------------------------------------------------------------------
# tests/tests/cli_surface.rs and packaging.rs render the generated man pages with `man -l`
# (Debian package man-db).
if command -v man >/dev/null; then
    say "man found: $(command -v man)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing man-db with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends man-db >/dev/null
    say "installed $(man --version | head -1)"
else
    say "warning: man not found: the man page tests need it (Debian: apt-get install man-db, as root)"
fi

# --- Python venv -------------------------------------------------------------------------
command -v "$py" >/dev/null || die "python3 not found: install it (Debian: apt-get install python3 python3-venv)"
want="$(hash_of "$reqs")-$("$py" -c 'import sys; print("%d.%d %s" % (sys.version_info[:2] + (sys.base_prefix,)))')"
stamp="$venv/.airlock-stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/moto_server" && -x "$venv/bin/aws" ]]; then
    say "python venv $venv is up to date (moto, boto3, awscli)"
else
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
            say "installing python3-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        else
            die "python3 has no venv/ensurepip module: install python3-venv"
        fi
    fi
    say "creating python venv $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$reqs"
    echo "$want" > "$stamp"
    say "installed $("$venv/bin/python" -m pip freeze | grep -iE '^(moto|boto3|awscli)==' | tr '\n' ' ')"
fi

# --- Node: AWS SDK for JavaScript v3 --------------------------------------------------------
command -v node >/dev/null || die "node not found: install Node.js >= 20 (Debian: apt-get install nodejs npm)"
command -v npm >/dev/null || die "npm not found: install npm"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[[ "$node_major" -ge 20 ]] || die "node $(node --version) is too old: the AWS SDK v3 needs >= 20"
nwant="$(hash_of "$node_dir/package.json" "$node_dir/package-lock.json")-$node_major"
nstamp="$node_dir/node_modules/.airlock-stamp"
if [[ -f "$nstamp" && "$(cat "$nstamp")" == "$nwant" ]]; then
    say "node modules in tests/node are up to date"
else
    say "npm ci in tests/node"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$nwant" > "$nstamp"
    say "installed $(cd "$node_dir" && npm ls --depth=0 --parseable --long 2>/dev/null | grep -o '@aws-sdk/[^:]*@[0-9.]*' | tr '\n' ' ')"
fi

say "done (venv: $venv)"
