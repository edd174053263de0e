#!/usr/bin/env bash
# Provisions a Debian runner host (run as root; packer's shell provisioner runs it on the
# build instance): installs the airlock .deb, the GitHub Actions runner (not registered),
# wires airlock's job hooks into the runner's .env, gives the runner the control socket and
# hides its credentials from jobs, then cleans what must not be baked into an image.
#   AIRLOCK_DEB     the airlock .deb (required)
#   RUNNER_TARBALL  a local actions-runner-linux-x64-*.tar.gz; or else
#   RUNNER_VERSION + RUNNER_SHA256  download that release from GitHub and check its hash
#   RUNNER_DIR      default /opt/actions-runner;  RUNNER_USER  default runner
set -euo pipefail

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

: "${AIRLOCK_DEB:?AIRLOCK_DEB must name the airlock .deb}"
RUNNER_DIR="${RUNNER_DIR:-/opt/actions-runner}"
RUNNER_USER="${RUNNER_USER:-runner}"
HOOKS=/usr/share/airlock/integrations/github
CONFIG=/etc/airlock/airlock.toml
export DEBIAN_FRONTEND=noninteractive

[[ $(id -u) -eq 0 ]] || die "run as root"
[[ -f "$AIRLOCK_DEB" ]] || die "$AIRLOCK_DEB not found"

# --- airlock: apt resolves its dependencies (nftables) -------------------------------------
say "installing $AIRLOCK_DEB"
apt-get update -qq
deb="$(readlink -f "$AIRLOCK_DEB")"
apt-get install -y -qq "$deb" >/dev/null

# --- the runner ----------------------------------------------------------------------------
tarball="${RUNNER_TARBALL:-}"
if [[ -z "$tarball" ]]; then
    : "${RUNNER_VERSION:?set RUNNER_TARBALL, or RUNNER_VERSION and RUNNER_SHA256}"
    : "${RUNNER_SHA256:?RUNNER_SHA256 is required with RUNNER_VERSION}"
    apt-get install -y -qq curl ca-certificates >/dev/null
    tarball=/tmp/actions-runner.tar.gz
    curl -fsSL -o "$tarball" \
        "https://github.com/actions/runner/releases/download/v${RUNNER_VERSION}/actions-runner-linux-x64-${RUNNER_VERSION}.tar.gz"
    echo "${RUNNER_SHA256}  $tarball" | sha256sum -c - >/dev/null || die "runner tarball hash mismatch"
fi
id -u "$RUNNER_USER" >/dev/null 2>&1 ||
    useradd --system --create-home --home-dir "/home/$RUNNER_USER" --shell /bin/bash "$RUNNER_USER"
install -d -o "$RUNNER_USER" -g "$RUNNER_USER" -m 0750 "$RUNNER_DIR"
tar -xzf "$tarball" -C "$RUNNER_DIR"
chown -R "$RUNNER_USER:$RUNNER_USER" "$RUNNER_DIR"
chmod 0750 "$RUNNER_DIR"
if [[ -x "$RUNNER_DIR/bin/installdependencies.sh" ]]; then
    "$RUNNER_DIR/bin/installdependencies.sh" >/dev/null
fi
say "runner in $RUNNER_DIR, user $RUNNER_USER"

# --- hooks in the runner's .env (read by the runner at start) ------------------------------
env_file="$RUNNER_DIR/.env"
touch "$env_file"
set_env() { # KEY VALUE: replace the key's line, or add it
    local key=$1 value=$2
    if grep -q "^${key}=" "$env_file"; then
        sed -i "s|^${key}=.*|${key}=${value}|" "$env_file"
    else
        printf '%s=%s\n' "$key" "$value" >> "$env_file"
    fi
}
# The runner runs a hook only if its name ends in .sh (it runs `bash -e <file>`).
set_env ACTIONS_RUNNER_HOOK_JOB_STARTED "$HOOKS/job-started.sh"
set_env ACTIONS_RUNNER_HOOK_JOB_COMPLETED "$HOOKS/job-completed.sh"
chown "$RUNNER_USER:$RUNNER_USER" "$env_file"
for hook in job-started.sh job-completed.sh; do
    [[ -x "$HOOKS/$hook" ]] || say "warning: $HOOKS/$hook is not in this airlock package yet"
done

# --- airlock's configuration for this runner -----------------------------------------------
# The hooks run as the runner user: it reaches the control socket through a group. Its uid and
# gid are never given to a job, and its credentials are hidden from jobs.
getent group airlock >/dev/null || groupadd --system airlock
usermod -a -G airlock "$RUNNER_USER"
uid="$(id -u "$RUNNER_USER")"
gid="$(id -g "$RUNNER_USER")"
edit() { # PATTERN REPLACEMENT: the shipped config's commented line, made real
    grep -q "$1" "$CONFIG" || die "$CONFIG has no line matching '$1' (edited by hand?): set it yourself"
    sed -i "s|$1|$2|" "$CONFIG"
}
edit '^# control_group = "airlock".*' 'control_group = "airlock"'
edit '^# runner_uid = .*' "runner_uid = $uid"
edit '^# runner_gid = .*' "runner_gid = $gid"
edit '^# hide = \[.*' "hide = [\"$RUNNER_DIR/.credentials\", \"$RUNNER_DIR/.credentials_rsaparams\", \"$RUNNER_DIR/.runner\"]"
# The shipped config trusts the audience "airlock" for GitHub, which the hooks and the
# supervisor request (they ask airlockd; docs/identity.md, "Audiences"). --check exits 78 if
# /etc/airlock/github-runners.toml, once user data writes it, asks for one it does not trust.
airlockd --check --config "$CONFIG"

# --- nothing of this build instance in the image ---------------------------------------------
if [[ -d /run/systemd/system ]]; then
    systemctl stop airlockd.service 2>/dev/null || true
fi
systemctl is-enabled airlockd.service >/dev/null 2>&1 || systemctl enable airlockd.service
# Ephemeral runners (the recommended mode): the supervisor starts once boot-time user data
# writes /etc/airlock/github-runners.toml (from the example, with a jitconfig_command).
systemctl is-enabled airlock-github-runners.service >/dev/null 2>&1 ||
    systemctl enable airlock-github-runners.service
rm -rf /var/lib/airlock/* /var/log/airlock/*
rm -f /tmp/actions-runner.tar.gz "$AIRLOCK_DEB"
apt-get clean
say "done"
