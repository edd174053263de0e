#!/usr/bin/env bash
# Installs what `make bench` needs beyond the test dependencies: bubblewrap (`bwrap`), the
# reference the sandbox benchmark measures airlock's sandbox against. As root on Debian it
# installs the package with apt-get when `bwrap` is missing; otherwise it says what to
# install. It never uses sudo. Idempotent: with `bwrap` on PATH it changes nothing.
set -euo pipefail

say() { printf 'setup-bench-deps: %s\n' "$*"; }
die() { printf 'setup-bench-deps: error: %s\n' "$*" >&2; exit 1; }

if command -v bwrap >/dev/null; then
    say "bwrap found: $(command -v bwrap)"
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing bubblewrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    command -v bwrap >/dev/null || die "apt-get installed bubblewrap but bwrap is not on PATH"
    say "bwrap installed: $(command -v bwrap)"
else
    die "bwrap not found: install bubblewrap (Debian: apt-get install bubblewrap) and run again as root"
fi
