//! Probes that run inside a sandboxed job (Debian's `/usr/bin/python3`, from the host's
//! read-only tree) and measure what the job sees: how fast and how reliably it gets its
//! credentials while another job attacks the agent.
//!
//! Owns the probe scripts and the parsing of what they print; it never reaches into the
//! agent.

use crate::stack::Stack;
use std::collections::BTreeMap;

/// `script` run by python3 with `args`, as a `/bin/sh -c` script.
pub fn python(script: &str, args: &str) -> String {
    format!("/usr/bin/python3 - {args} <<'AL_EOF'\n{script}\nAL_EOF\n")
}

/// 40 credential GETs to the job's own endpoint over fresh connections, each timed;
/// prints `n= errors= p50_ms= p99_ms= max_ms=`.
pub const CREDENTIAL_LATENCY: &str = r#"
import os, socket, time
host = "169.254.170.2"
tok = os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]
req = ("GET /v1/credentials HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nConnection: close\r\n\r\n" % (host, tok)).encode()
lat, errors = [], 0
for _ in range(40):
    t = time.monotonic()
    ok = False
    try:
        s = socket.create_connection((host, 80), timeout=3)
        s.sendall(req)
        data = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            data += c
        s.close()
        ok = data.startswith(b"HTTP/1.1 200") and b"SecretAccessKey" in data
    except OSError:
        pass
    if ok:
        lat.append((time.monotonic() - t) * 1000)
    else:
        errors += 1
    time.sleep(0.05)
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else -1
print("n=%d" % len(lat))
print("errors=%d" % errors)
print("p50_ms=%.2f" % pick(0.5))
print("p99_ms=%.2f" % pick(0.99))
print("max_ms=%.2f" % (lat[-1] if lat else -1))
"#;

/// What [`CREDENTIAL_LATENCY`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    pub n: u32,
    pub errors: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn parse(stdout: &str) -> Option<Latency> {
        let kv: BTreeMap<String, String> = crate::kv(stdout);
        let f = |k: &str| kv.get(k)?.parse::<f64>().ok();
        let u = |k: &str| kv.get(k)?.parse::<u32>().ok();
        Some(Latency {
            n: u("n")?,
            errors: u("errors")?,
            p50_ms: f("p50_ms")?,
            p99_ms: f("p99_ms")?,
            max_ms: f("max_ms")?,
        })
    }
}

/// Runs [`CREDENTIAL_LATENCY`] as a production job of `stack` (sandboxed); panics with the
/// job's output and the agent's log if it does not run. `when` labels the printed line.
pub fn credential_latency(stack: &Stack, when: &str) -> Latency {
    let who = crate::oidc::GithubJob::production();
    let out = stack.run_sh(&who.token(), &python(CREDENTIAL_LATENCY, ""));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the latency job ({when}) failed: {stdout}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    let l = Latency::parse(&stdout)
        .unwrap_or_else(|| panic!("the latency job ({when}) printed no figures: {stdout}"));
    eprintln!("credential latency {when}: {l:?}");
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_parse() {
        let l = Latency::parse("n=40\nerrors=0\np50_ms=0.9\np99_ms=2.5\nmax_ms=3.0\n").unwrap();
        assert_eq!((l.n, l.errors), (40, 0));
        assert_eq!(l.p99_ms, 2.5);
        assert!(Latency::parse("n=40\n").is_none());
    }
}
