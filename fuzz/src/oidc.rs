//! Target `oidc`: the OIDC token parser and verifier (`identity::Verifier::verify_at`).
//!
//! Input: one mode byte, then either the raw token (mode bit 0 clear) or a header and a
//! payload separated by the byte 0xFF (bit 0 set), which the harness encodes and signs with
//! the test key chosen by bits 1-2 (RSA and EC keys of issuer A, the RSA key of issuers B
//! and C). Signing here lets the fuzzer reach the checks after the signature.
//!
//! Three issuers from JWKS files: A (GitHub; `test-rsa-1`, `test-ec-1`), B (GitLab) and C
//! (Buildkite), both `test-rsa-2`. The test keys are the repository's test-only fixtures.
//!
//! Properties, after every input:
//! - an accepted token is three parts whose signature verifies, with the header's algorithm,
//!   under a key of the issuer its `iss` names, checked here apart from the verifier's own
//!   key lookup; the identity names that issuer; `alg` is RS256 or ES256; `aud` holds the
//!   configured audience; `exp` is present and not past (with the leeway), `nbf` and `iat`
//!   not in the future;
//! - a refusal's message (Display and Debug) never contains the token or its signature.

use crate::Seed;
use airlock::config::IssuerConfig;
use airlock::http_client::HttpClient;
use airlock::identity::{IdentityError, Provider, Verifier};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

const ISSUER_A: &str = "https://token.actions.githubusercontent.com";
const ISSUER_B: &str = "https://gitlab.example.test";
const ISSUER_C: &str = "https://agent.buildkite.com";
const AUDIENCE: &str = "airlock";
/// The verifier's clock, fixed so that every run sees the same verdicts.
const NOW: i64 = 1_700_000_000;
const LEEWAY: i64 = airlock::identity::oidc::LEEWAY_SECS;

struct Harness {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
    /// Signing keys: (algorithm, kid, key), by the mode's key index.
    signers: Vec<(Algorithm, &'static str, EncodingKey)>,
    /// Each issuer's public keys, for the independent signature check.
    keys: Vec<(&'static str, Vec<(Algorithm, DecodingKey)>)>,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = crate::scratch_dir();
        let all: Value =
            serde_json::from_slice(&std::fs::read(crate::fixture("jwks-rotated.json")).unwrap())
                .unwrap();
        let jwks = |kids: &[&str]| -> Value {
            let keys: Vec<Value> = all["keys"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
                .cloned()
                .collect();
            json!({ "keys": keys })
        };
        let a_keys = jwks(&["test-rsa-1", "test-ec-1"]);
        let bc_keys = jwks(&["test-rsa-2"]);
        std::fs::write(dir.path().join("a.json"), a_keys.to_string()).unwrap();
        std::fs::write(dir.path().join("bc.json"), bc_keys.to_string()).unwrap();
        let issuer = |name: &str, provider, file: &str| IssuerConfig {
            issuer: name.into(),
            audiences: vec![AUDIENCE.into()],
            provider: Some(provider),
            jwks_url: None,
            jwks_file: Some(dir.path().join(file)),
            allow_http: false,
        };
        let verifier = Verifier::new(
            &[
                issuer(ISSUER_A, Provider::Github, "a.json"),
                issuer(ISSUER_B, Provider::Gitlab, "bc.json"),
                issuer(ISSUER_C, Provider::Buildkite, "bc.json"),
            ],
            HttpClient::new().unwrap(),
        )
        .unwrap();
        let public = |set: &Value| -> Vec<(Algorithm, DecodingKey)> {
            set["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| {
                    let jwk: Jwk = serde_json::from_value(k.clone()).unwrap();
                    let alg = if k["kty"] == "EC" {
                        Algorithm::ES256
                    } else {
                        Algorithm::RS256
                    };
                    (alg, DecodingKey::from_jwk(&jwk).unwrap())
                })
                .collect()
        };
        let pem = |name: &str| std::fs::read(crate::fixture(name)).unwrap();
        Harness {
            rt: crate::runtime(),
            verifier,
            signers: vec![
                (
                    Algorithm::RS256,
                    "test-rsa-1",
                    EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap(),
                ),
                (
                    Algorithm::ES256,
                    "test-ec-1",
                    EncodingKey::from_ec_pem(&pem("ec.pem")).unwrap(),
                ),
                (
                    Algorithm::RS256,
                    "test-rsa-2",
                    EncodingKey::from_rsa_pem(&pem("rsa2.pem")).unwrap(),
                ),
            ],
            keys: vec![
                (ISSUER_A, public(&a_keys)),
                (ISSUER_B, public(&bc_keys)),
                (ISSUER_C, public(&bc_keys)),
            ],
            _dir: dir,
        }
    })
}

/// `header.payload.signature`, signed with signer `key` (an index into the harness's keys).
fn sign(h: &Harness, key: usize, header: &[u8], payload: &[u8]) -> String {
    let (alg, _, key) = &h.signers[key % h.signers.len()];
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let sig = jsonwebtoken::crypto::sign(signed.as_bytes(), key, *alg).unwrap();
    format!("{signed}.{sig}")
}

pub fn run(data: &[u8]) {
    let _ = verdict(data);
}

/// The issuer of an accepted token, or the refusal's message; `None` for an empty input.
fn verdict(data: &[u8]) -> Option<Result<String, String>> {
    let (&mode, rest) = data.split_first()?;
    let h = harness();
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let cut = rest.iter().position(|&b| b == 0xFF).unwrap_or(rest.len());
        let payload = rest.get(cut + 1..).unwrap_or_default();
        sign(h, usize::from(mode >> 1) & 3, &rest[..cut], payload)
    };
    Some(match h.rt.block_on(h.verifier.verify_at(&token, NOW)) {
        Ok(id) => {
            check_accepted(h, &token, &id.issuer);
            Ok(id.issuer)
        }
        Err(e) => {
            check_refused(&token, &e);
            Err(e.to_string())
        }
    })
}

/// The valid seeds are accepted for their issuer, every other one is refused.
pub fn selftest() {
    let seeds = seeds();
    for (name, data) in &seeds {
        let got = verdict(data).expect("seeds are not empty");
        let want = match *name {
            "signed-github-rs256"
            | "signed-github-es256"
            | "raw-github-rs256"
            | "raw-github-es256" => Some(ISSUER_A),
            "signed-gitlab" => Some(ISSUER_B),
            "signed-buildkite" | "raw-buildkite" => Some(ISSUER_C),
            _ => None,
        };
        match (want, &got) {
            (Some(issuer), Ok(got)) => assert_eq!(got, issuer, "seed {name}"),
            (None, Err(_)) => {}
            _ => panic!("seed {name}: expected {want:?}, got {got:?}"),
        }
    }
}

fn decode(part: &str) -> Map<String, Value> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .expect("an accepted token's parts are base64url");
    serde_json::from_slice(&bytes).expect("an accepted token's parts are JSON objects")
}

fn date(claims: &Map<String, Value>, name: &str) -> Option<i64> {
    let n = claims.get(name)?.as_number()?;
    n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

fn check_accepted(h: &Harness, token: &str, issuer: &str) {
    let token = token.trim();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "an accepted token has three parts");
    let header = decode(parts[0]);
    let claims = decode(parts[1]);
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        other => panic!("accepted a token with alg {other:?}"),
    };
    let iss = claims.get("iss").and_then(Value::as_str);
    assert_eq!(iss, Some(issuer), "the identity names the token's issuer");
    let (_, keys) = h
        .keys
        .iter()
        .find(|(name, _)| *name == issuer)
        .unwrap_or_else(|| panic!("accepted a token of an unconfigured issuer {issuer:?}"));
    let signed = &token[..parts[0].len() + 1 + parts[1].len()];
    let genuine = keys.iter().any(|(key_alg, key)| {
        *key_alg == alg
            && jsonwebtoken::crypto::verify(parts[2], signed.as_bytes(), key, alg) == Ok(true)
    });
    assert!(
        genuine,
        "accepted a token that no key of {issuer} signed with {alg:?}"
    );
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == AUDIENCE,
        Some(Value::Array(items)) => items.iter().any(|a| a == AUDIENCE),
        _ => false,
    };
    assert!(audience_ok, "accepted a token without the audience");
    let exp = date(&claims, "exp").expect("accepted a token without a numeric exp");
    assert!(
        NOW < exp.saturating_add(LEEWAY),
        "accepted an expired token"
    );
    if let Some(nbf) = date(&claims, "nbf") {
        assert!(nbf <= NOW + LEEWAY, "accepted a token not yet valid");
    }
    if let Some(iat) = date(&claims, "iat") {
        assert!(iat <= NOW + LEEWAY, "accepted a token issued in the future");
    }
}

fn check_refused(token: &str, e: &IdentityError) {
    let token = token.trim();
    let sig = token.rsplit('.').next().unwrap_or_default();
    // What the token's own decoded text says may come back (an unknown iss, a kid); the
    // token and its signature must not.
    let decoded: String = token
        .split('.')
        .take(2)
        .filter_map(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    for text in [e.to_string(), format!("{e:?}")] {
        if token.len() >= 16 && !decoded.contains(token) {
            assert!(
                !text.contains(token),
                "the token leaked into an error: {text}"
            );
        }
        if sig.len() >= 16 && !decoded.contains(sig) {
            assert!(
                !text.contains(sig),
                "the signature leaked into an error: {text}"
            );
        }
    }
}

fn github_claims() -> Value {
    json!({
        "iss": ISSUER_A,
        "aud": AUDIENCE,
        "sub": "repo:octo-org/octo-repo:environment:production",
        "repository": "octo-org/octo-repo",
        "repository_id": "123456",
        "repository_owner": "octo-org",
        "repository_owner_id": "654321",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "environment": "production",
        "workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
        "event_name": "push",
        "actor": "octocat",
        "run_id": "42",
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 300,
    })
}

fn gitlab_claims() -> Value {
    json!({
        "iss": ISSUER_B,
        "aud": [AUDIENCE, "other"],
        "sub": "project_path:group/project:ref_type:branch:ref:main",
        "project_path": "group/project",
        "project_id": "99",
        "namespace_path": "group",
        "namespace_id": "7",
        "ref": "main",
        "ref_type": "branch",
        "ref_protected": "true",
        "pipeline_source": "push",
        "pipeline_id": "1001",
        "user_login": "dev",
        "environment": "production",
        "ci_config_ref_uri": "gitlab.example.test/group/project//.gitlab-ci.yml@refs/heads/main",
        "iat": NOW - 10,
        "exp": (NOW + 300) as f64 + 0.5,
    })
}

fn buildkite_claims() -> Value {
    json!({
        "iss": ISSUER_C,
        "aud": AUDIENCE,
        "sub": "organization:acme:pipeline:deploy:ref:refs/heads/main:commit:abc:step:build",
        "organization_slug": "acme",
        "pipeline_slug": "deploy",
        "build_number": 12,
        "build_branch": "main",
        "build_source": "webhook",
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 300,
    })
}

fn header(alg: &str, kid: &str) -> Value {
    json!({ "alg": alg, "kid": kid, "typ": "JWT" })
}

/// Mode byte 1|key<<1 and header 0xFF payload: the harness signs.
fn signed_seed(key: u8, header: &Value, claims: &Value) -> Vec<u8> {
    let mut out = vec![1 | key << 1];
    out.extend(serde_json::to_vec(header).unwrap());
    out.push(0xFF);
    out.extend(serde_json::to_vec(claims).unwrap());
    out
}

fn raw_seed(token: &str) -> Vec<u8> {
    let mut out = vec![0];
    out.extend(token.as_bytes());
    out
}

pub fn seeds() -> Vec<Seed> {
    let h = harness();
    let enc = |v: &Value| serde_json::to_vec(v).unwrap();
    let with = |mut v: Value, k: &str, x: Value| {
        v.as_object_mut().unwrap().insert(k.into(), x);
        v
    };
    let rs1 = header("RS256", "test-rsa-1");
    let ec1 = header("ES256", "test-ec-1");
    let rs2 = header("RS256", "test-rsa-2");
    let good = sign(h, 0, &enc(&rs1), &enc(&github_claims()));
    let mut tampered = good.clone();
    let mid = good.find('.').unwrap() + 5;
    tampered.replace_range(
        mid..mid + 1,
        if &good[mid..mid + 1] == "A" { "B" } else { "A" },
    );
    vec![
        (
            "signed-github-rs256",
            signed_seed(0, &rs1, &github_claims()),
        ),
        (
            "signed-github-es256",
            signed_seed(1, &ec1, &github_claims()),
        ),
        ("signed-gitlab", signed_seed(2, &rs2, &gitlab_claims())),
        (
            "signed-buildkite",
            signed_seed(2, &rs2, &buildkite_claims()),
        ),
        // Signed by B's key but claiming A: must never pass.
        (
            "signed-wrong-issuer-key",
            signed_seed(2, &rs2, &github_claims()),
        ),
        (
            "signed-expired",
            signed_seed(0, &rs1, &with(github_claims(), "exp", json!(NOW - 600))),
        ),
        (
            "signed-wrong-audience",
            signed_seed(
                0,
                &rs1,
                &with(github_claims(), "aud", json!(["sts.amazonaws.com"])),
            ),
        ),
        ("raw-github-rs256", raw_seed(&good)),
        (
            "raw-github-es256",
            raw_seed(&sign(h, 1, &enc(&ec1), &enc(&github_claims()))),
        ),
        (
            "raw-buildkite",
            raw_seed(&sign(h, 2, &enc(&rs2), &enc(&buildkite_claims()))),
        ),
        ("raw-tampered-payload", raw_seed(&tampered)),
        (
            "raw-alg-none",
            raw_seed(&format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(enc(&header("none", "test-rsa-1"))),
                URL_SAFE_NO_PAD.encode(enc(&github_claims()))
            )),
        ),
        (
            "raw-hs256",
            raw_seed(&format!(
                "{}.{}.c2lnbmF0dXJl",
                URL_SAFE_NO_PAD.encode(enc(&header("HS256", "test-rsa-1"))),
                URL_SAFE_NO_PAD.encode(enc(&github_claims()))
            )),
        ),
    ]
}
