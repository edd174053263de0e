#!/usr/bin/env bash
# Builds and runs airlock's fuzz targets (fuzz/, docs/testing.md "Fuzzing") on stable Rust:
# libFuzzer comes from the libfuzzer-sys crate (built with the system's C++ compiler), and
# the coverage that guides it from rustc's SanitizerCoverage pass, with the flags cargo-fuzz
# passes, minus any sanitizer (those need nightly).
#
#   scripts/fuzz.sh build                    build every target (pinned by fuzz/Cargo.lock)
#   scripts/fuzz.sh smoke                    self-test, then FUZZ_SMOKE_SECONDS (10) of each
#                                            target from the committed corpus: `make test`
#   scripts/fuzz.sh run [TARGET...]          FUZZ_SECONDS (600) of each target, keeping what
#                                            it finds in fuzz/work/corpus/<target>: `make fuzz`
#   scripts/fuzz.sh seeds                    rewrite fuzz/corpus/<target>/seed-* from the harness
#   scripts/fuzz.sh repro TARGET FILE...     run inputs once (a crash, to see it again)
#
# A crash, a failed property, a timeout (FUZZ_TIMEOUT, 10 s per input) or more than 2 GiB of
# memory fails the command; the input is saved under fuzz/work/artifacts/<target>/.
# The build has its own target directory ($AIRLOCK_FUZZ_TARGET_DIR, else
# $CARGO_TARGET_DIR/fuzz, else fuzz/target): its flags differ from every other build's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$repo/fuzz"
targets=(oidc policy endpoint dns audit)
triple="$(rustc -vV | sed -n 's/^host: //p')"
target_dir="${AIRLOCK_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}}"
target_dir="${target_dir:-$fuzz/target}"
bin_dir="$target_dir/$triple/fuzz"
work="$fuzz/work"

say() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: error: %s\n' "$*" >&2; exit 1; }

# cargo-fuzz's instrumentation (its `cargo fuzz build -s none`): inline 8-bit edge
# counters with their PC table, comparison tracing, stack depth; `--cfg fuzzing`. With
# --target given, RUSTFLAGS reach only the target's code, not build scripts or proc macros.
flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0
    -Clink-dead-code
    --cfg fuzzing
    -Dwarnings
)

build() {
    command -v c++ >/dev/null || command -v g++ >/dev/null \
        || die "no C++ compiler: libfuzzer-sys builds libFuzzer with one (Debian: apt-get install g++; scripts/setup-test-deps.sh does it as root)"
    say "building ${targets[*]} into $target_dir"
    local start=$SECONDS
    RUSTFLAGS="${flags[*]}" cargo build --locked --manifest-path "$fuzz/Cargo.toml" \
        --profile fuzz --target "$triple" --target-dir "$target_dir" --bins
    say "built in $((SECONDS - start)) s"
}

check_target() {
    local t
    for t in "${targets[@]}"; do [[ "$1" == "$t" ]] && return 0; done
    die "no target $1 (targets: ${targets[*]})"
}

# libFuzzer options shared by every run. The first corpus directory is where libFuzzer
# writes what it finds; the committed one comes second and is only read.
common=(-timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1)

fuzz_one() {
    local t=$1 seconds=$2 corpus=$3
    mkdir -p "$work/artifacts/$t" "$corpus"
    say "$t: ${seconds} s"
    if ! "$bin_dir/$t" "${common[@]}" -max_total_time="$seconds" \
        -artifact_prefix="$work/artifacts/$t/" "$corpus" "$fuzz/corpus/$t" \
        >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log" >&2
        die "$t failed; the input is in $work/artifacts/$t/ (replay: scripts/fuzz.sh repro $t FILE; full log $work/$t.log)"
    fi
    grep -E '^stat::number_of_executed_units|^#[0-9]+[[:space:]]+DONE' "$work/$t.log" | sed "s/^/fuzz: $t: /"
}

selftest() {
    local t=$1
    AIRLOCK_FUZZ_SELFTEST=1 "$bin_dir/$t" >"$work/$t.selftest.log" 2>&1 \
        || { cat "$work/$t.selftest.log" >&2; die "$t: self-test failed"; }
    say "$t: self-test passed"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
mkdir -p "$work"
case "$cmd" in
    build)
        build
        ;;
    smoke)
        build
        seconds="${FUZZ_SMOKE_SECONDS:-10}"
        scratch="$(mktemp -d)"
        trap 'rm -rf "$scratch"' EXIT
        start=$SECONDS
        for t in "${targets[@]}"; do
            selftest "$t"
            fuzz_one "$t" "$seconds" "$scratch/$t"
        done
        say "${#targets[@]} targets, ${seconds} s each: no crash ($((SECONDS - start)) s in all)"
        ;;
    run)
        [[ $# -gt 0 ]] && { for t in "$@"; do check_target "$t"; done; targets=("$@"); }
        build
        for t in "${targets[@]}"; do
            selftest "$t"
            fuzz_one "$t" "${FUZZ_SECONDS:-600}" "$work/corpus/$t"
        done
        ;;
    seeds)
        build
        for t in "${targets[@]}"; do
            rm -f "$fuzz/corpus/$t"/seed-*
            seeds="$(mktemp -d)"
            AIRLOCK_FUZZ_WRITE_SEEDS="$seeds" "$bin_dir/$t" 2>/dev/null
            mkdir -p "$fuzz/corpus/$t"
            for f in "$seeds"/*; do mv "$f" "$fuzz/corpus/$t/seed-$(basename "$f")"; done
            rmdir "$seeds"
            say "$t: $(ls "$fuzz/corpus/$t" | wc -l) inputs in fuzz/corpus/$t"
        done
        ;;
    repro)
        [[ $# -ge 2 ]] || die "usage: scripts/fuzz.sh repro TARGET FILE..."
        check_target "$1"
        t=$1
        shift
        build
        "$bin_dir/$t" "${common[@]}" "$@"
        ;;
    *)
        die "usage: scripts/fuzz.sh build|smoke|run [TARGET...]|seeds|repro TARGET FILE..."
        ;;
esac
