#!/usr/bin/env bash
# Builds airlock's .deb and .rpm from binaries cargo already built (it never compiles):
#   packaging/build-packages.sh [release|dev] [OUTDIR] [REVISION]
# release (default): target/release, what `make package` builds; dev: target/debug, what the
# test build made (the packaging test uses it: no second, optimised build). OUTDIR defaults
# to <target>/packages; REVISION (default 1) is the deb revision and rpm release.
# cargo-deb strips the binaries itself; for the rpm, stripped copies (strip --strip-unneeded,
# as cargo-deb does) are staged in a temporary <target>/airlock-rpm-stage.* (cargo-generate-rpm
# packs binaries as they are).
# Needs cargo-deb and cargo-generate-rpm: scripts/setup-package-deps.sh.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile="${1:-release}"
# dev: quicker, lighter compression (--fast, gzip): the test's packages are thrown away.
case "$profile" in
release) dir=release; deb_fast=(); rpm_compress=zstd ;;
dev) dir=debug; deb_fast=(--fast); rpm_compress=gzip ;;
*) echo "build-packages: profile must be release or dev, not $profile" >&2; exit 64 ;;
esac
target="${CARGO_TARGET_DIR:-$repo/target}"
[[ "$target" = /* ]] || target="$repo/$target"
out="${2:-$target/packages}"
revision="${3:-1}"

if [[ $(id -u) -eq 0 ]]; then
    tools="${AIRLOCK_PKG_TOOLS:-/var/cache/airlock/cargo-tools}"
else
    tools="${AIRLOCK_PKG_TOOLS:-$HOME/.cache/airlock/cargo-tools}"
fi
export PATH="$tools/bin:$PATH"
for t in cargo-deb cargo-generate-rpm strip; do
    command -v "$t" >/dev/null || { echo "build-packages: $t not found: run scripts/setup-package-deps.sh" >&2; exit 69; }
done
for b in airlockd airlock airlock-shim; do
    [[ -x "$target/$dir/$b" ]] || {
        echo "build-packages: $target/$dir/$b is missing: cargo build $([[ $profile == release ]] && echo --release) -p airlock-agent -p airlock-shim --bins" >&2
        exit 66
    }
done
mkdir -p "$out"
cd "$repo"
# cargo-deb stages under <target>/debian: one build at a time (tests run in parallel).
exec 9>"$target/.airlock-build-packages.lock"
flock 9

# dev: cargo-deb 3.8 warns that it prefers release builds; the package is the same shape.
cargo deb -p airlock-agent --no-build --profile "$profile" --deb-revision "$revision" "${deb_fast[@]}" -o "$out/" 2>&1 |
    grep -v -e 'dev profile is not supported' -e 'To enable debug symbols' >&2 || true
deb="$out/airlock_$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="airlock-agent"))')-${revision}_$(dpkg --print-architecture).deb"
[[ -f "$deb" ]] || { echo "build-packages: cargo deb made no $deb" >&2; exit 70; }

stage="$(mktemp -d "$target/airlock-rpm-stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$dir"
for b in airlockd airlock airlock-shim; do
    strip --strip-unneeded -o "$stage/$dir/$b.tmp" "$target/$dir/$b"
    mv "$stage/$dir/$b.tmp" "$stage/$dir/$b"
done
cargo generate-rpm -p agent --target-dir "$stage" --profile "$profile" -s "release = \"$revision\"" \
    --payload-compress "$rpm_compress" -o "$out/"
ls "$out"/airlock-*-"$revision".*.rpm >/dev/null
echo "$deb"
ls -1 "$out"/airlock-*-"$revision".*.rpm
