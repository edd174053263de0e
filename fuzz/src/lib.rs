//! The fuzz targets' harness (docs/testing.md, "Fuzzing"): for each target, how its input
//! bytes are read, the fakes it runs against, the properties it asserts after every input,
//! and its seed inputs. `fuzz_targets/*.rs` only hand libFuzzer's input to a `run` here.
//!
//! A property that fails panics, and libFuzzer saves the input as a crash. The harness
//! never touches the network beyond loopback, and keeps its files in a temporary directory.

pub mod audit;
pub mod dns;
pub mod endpoint;
pub mod oidc;
pub mod policy;

use std::path::PathBuf;

/// A named seed input of a target.
pub type Seed = (&'static str, Vec<u8>);

/// libFuzzer's init hook of every target. With `AIRLOCK_FUZZ_WRITE_SEEDS=<dir>` in the
/// environment it writes the target's seeds into `<dir>` and exits (`scripts/fuzz.sh
/// seeds`); with `AIRLOCK_FUZZ_SELFTEST=1` it runs the target's self-test and exits: the
/// seeds must get the verdicts they were written for, so the properties are known to see
/// what they check (an oracle that never sees credentials could never fail). Otherwise it
/// does nothing.
pub fn init(seeds: fn() -> Vec<Seed>, selftest: fn()) {
    if let Some(dir) = std::env::var_os("AIRLOCK_FUZZ_WRITE_SEEDS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("create the seed directory");
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).expect("write a seed");
        }
        std::process::exit(0);
    }
    if std::env::var_os("AIRLOCK_FUZZ_SELFTEST").is_some() {
        selftest();
        eprintln!("self-test passed");
        std::process::exit(0);
    }
}

/// The seed called `name`.
pub(crate) fn seed(seeds: &[Seed], name: &str) -> Vec<u8> {
    seeds
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no seed {name}"))
        .1
        .clone()
}

/// A single-threaded runtime for a target, made once: every input runs to its end on it.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A private scratch directory for the process, on tmpfs when there is one (the endpoint
/// target writes an fsynced audit log for every input).
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("airlock-fuzz-")
        .tempdir_in(base)
        .expect("a scratch directory")
}

/// Where the repository's test fixtures are (test-only OIDC keys).
pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/oidc")
        .join(name)
}

/// How often `needle` occurs in `haystack` (non-overlapping).
pub(crate) fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    let mut n = 0;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        if &haystack[i..i + needle.len()] == needle {
            n += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    n
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    count(haystack, needle) > 0
}
