//! OIDC token verification: picks the configured issuer from a token's `iss`, checks the
//! signature against that issuer's JWKS (file, URL or discovery), then the time and
//! audience claims, and hands the claims to [`super::claims::normalise`].
//!
//! It owns the per-issuer key cache and its rate-limited refetch. It must never log a
//! token or put one into an error, and never verify a token with another issuer's keys.

use super::claims::{configured_provider, normalise};
use super::{IdentitySource, JobIdentity, Provider};
use crate::config::IssuerConfig;
use crate::http_client::{redact_url, HttpClient, HttpError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest token accepted. CI tokens are 1-2 KiB; the cap bounds the work an unverified
/// token can cause.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 60;
/// Default shortest time between two JWKS fetches of one issuer.
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Deadline of one discovery or JWKS request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("OIDC token is {size} bytes, more than the {max} accepted; pass the CI provider's token unchanged")]
    TooLarge { size: usize, max: usize },
    #[error("OIDC token is malformed: {0}; pass the CI provider's JWT unchanged")]
    Malformed(String),
    #[error("OIDC token is unsigned (alg \"none\"); only RS256 and ES256 tokens are accepted")]
    AlgNone,
    #[error(
        "OIDC token uses the symmetric algorithm {0}; only RS256 and ES256 tokens are accepted"
    )]
    SymmetricAlg(String),
    #[error("OIDC token uses the algorithm {0}; only RS256 and ES256 tokens are accepted")]
    UnsupportedAlg(String),
    #[error("OIDC token has no iss claim; it cannot be matched to a configured issuer")]
    MissingIssuer,
    #[error("OIDC token issuer {0:?} is not configured; add an [[issuer]] with this exact issuer to airlock.toml to trust it")]
    UnknownIssuer(String),
    #[error("OIDC token from {0} has no kid header; the issuer's key cannot be chosen")]
    MissingKid(String),
    #[error("OIDC token key id {kid:?} is not in the JWKS of {issuer} (refetched at most every {interval:?}); the token is signed by an unknown or retired key")]
    UnknownKid {
        issuer: String,
        kid: String,
        interval: Duration,
    },
    #[error("key {kid:?} of {issuer} is a {key_kind} key and cannot check an {alg} signature")]
    KeyMismatch {
        issuer: String,
        kid: String,
        alg: &'static str,
        key_kind: String,
    },
    #[error("OIDC token signature does not verify with key {kid:?} of {issuer}")]
    BadSignature { issuer: String, kid: String },
    #[error("OIDC token has no exp claim; tokens without an expiry are refused")]
    MissingExp,
    #[error(
        "OIDC token expired at {exp} (now {now}, leeway {LEEWAY_SECS}s); request a fresh token"
    )]
    Expired { exp: i64, now: i64 },
    #[error("OIDC token is not valid before {nbf} (now {now}, leeway {LEEWAY_SECS}s); check the host clock")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("OIDC token was issued in the future at {iat} (now {now}, leeway {LEEWAY_SECS}s); check the host clock")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("OIDC token audience {got:?} is not accepted for {issuer} (accepted: {accepted:?}); request the token with one of the accepted audiences")]
    WrongAudience {
        issuer: String,
        got: Vec<String>,
        accepted: Vec<String>,
    },
    #[error("issuer {issuer}: {reason}")]
    InvalidIssuer { issuer: String, reason: String },
    #[error(
        "issuer {issuer}: {url} is plain http; set allow_http = true on this issuer only for tests"
    )]
    InsecureUrl { issuer: String, url: String },
    #[error("issuer {issuer}: JWKS file {path}: {reason}")]
    JwksFile {
        issuer: String,
        path: PathBuf,
        reason: String,
    },
    #[error("issuer {issuer}: cannot fetch keys from {url}: {reason}")]
    JwksFetch {
        issuer: String,
        url: String,
        reason: String,
    },
    #[error("runner-attested claims must be a JSON object, not a JSON {0}")]
    AttestedNotObject(&'static str),
    #[error("runner-attested claims are {size} bytes, more than the {max} accepted")]
    AttestedTooLarge { size: usize, max: usize },
    #[error(
        "runner-attested claims need a \"provider\" key (github, gitlab, buildkite or generic)"
    )]
    AttestedMissingProvider,
    #[error("runner-attested provider {0:?} is unknown; use github, gitlab, buildkite or generic")]
    AttestedUnknownProvider(String),
    #[error("runner-attested \"issuer\" must be a non-empty string")]
    AttestedBadIssuer,
}

/// The two signature algorithms CI providers use; everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }
}

/// Verifies CI OIDC tokens against the configured issuers.
pub struct Verifier {
    issuers: HashMap<String, Arc<Issuer>>,
    http: HttpClient,
    refetch_interval: Duration,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.issuers.keys().collect();
        names.sort();
        f.debug_struct("Verifier")
            .field("issuers", &names)
            .field("refetch_interval", &self.refetch_interval)
            .finish()
    }
}

/// Keys fetched from a URL are fetched again after this long, so a key the issuer has
/// rotated out stops being trusted even if no token ever names an unknown `kid`.
pub const JWKS_REFRESH_AFTER: Duration = Duration::from_secs(3600);
/// While the issuer cannot be reached, keys fetched before are used up to this age.
pub const JWKS_STALE_LIMIT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug)]
struct Issuer {
    name: String,
    audiences: Vec<String>,
    provider: Provider,
    allow_http: bool,
    source: JwksSource,
    /// Swapped whole on a refetch, so a reader never sees half a key set.
    keys: RwLock<Arc<KeySet>>,
    /// When `keys` were last loaded from a URL (never set for a file).
    loaded_at: RwLock<Option<Instant>>,
    /// Held across a fetch: concurrent verifications wait for the one fetch in flight
    /// instead of each hitting the JWKS URL.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Debug)]
enum JwksSource {
    File(PathBuf),
    Url(String),
    Discovery(String),
}

#[derive(Debug, Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// Why the last fetch failed, repeated while the next one is rate-limited.
    last_error: Option<String>,
}

type KeySet = HashMap<String, Arc<Key>>;

struct Key {
    jwk: Jwk,
    decoding: DecodingKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.jwk.common.key_id)
            .finish()
    }
}

impl Issuer {
    fn cached(&self, kid: &str) -> Option<Arc<Key>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(kid).cloned()
    }

    fn replace_keys(&self, set: KeySet) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        *keys = Arc::new(set);
        if !matches!(self.source, JwksSource::File(_)) {
            *self.loaded_at.write().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// How long ago the keys were fetched; `None` for a file (read once, at start).
    fn keys_age(&self) -> Option<Duration> {
        let at = *self.loaded_at.read().unwrap_or_else(|p| p.into_inner());
        at.map(|t| t.elapsed())
    }

    /// A cached key that may be used without asking the issuer again.
    fn fresh(&self, kid: &str) -> Option<Arc<Key>> {
        self.cached(kid)
            .filter(|_| self.keys_age().is_none_or(|a| a < JWKS_REFRESH_AFTER))
    }

    /// A cached key still usable when the issuer cannot be reached: not older than
    /// [`JWKS_STALE_LIMIT`], so a key the issuer has dropped is not trusted for long.
    fn usable_stale(&self, kid: &str) -> Option<Arc<Key>> {
        self.cached(kid)
            .filter(|_| self.keys_age().is_none_or(|a| a < JWKS_STALE_LIMIT))
    }

    fn check_url(&self, url: &str) -> Result<(), IdentityError> {
        if url.starts_with("https://") {
            return Ok(());
        }
        if url.starts_with("http://") {
            if self.allow_http {
                return Ok(());
            }
            return Err(IdentityError::InsecureUrl {
                issuer: self.name.clone(),
                url: redact_url(url),
            });
        }
        Err(IdentityError::InvalidIssuer {
            issuer: self.name.clone(),
            reason: format!("{:?} is not an https:// URL", redact_url(url)),
        })
    }
}

impl Verifier {
    /// Set up the issuers. JWKS files are read and parsed now, so a bad file stops the
    /// agent at start rather than failing every job later; URLs are fetched on first use.
    pub fn new(issuers: &[IssuerConfig], http: HttpClient) -> Result<Verifier, IdentityError> {
        let mut map = HashMap::new();
        for cfg in issuers {
            let issuer = Self::issuer(cfg)?;
            if map.insert(cfg.issuer.clone(), Arc::new(issuer)).is_some() {
                return Err(IdentityError::InvalidIssuer {
                    issuer: cfg.issuer.clone(),
                    reason: "listed twice; keep one [[issuer]] per issuer".into(),
                });
            }
        }
        Ok(Verifier {
            issuers: map,
            http,
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
        })
    }

    /// Change the shortest time between two JWKS fetches of one issuer (tests use a short
    /// or a very long one).
    pub fn with_refetch_interval(mut self, interval: Duration) -> Verifier {
        self.refetch_interval = interval;
        self
    }

    fn issuer(cfg: &IssuerConfig) -> Result<Issuer, IdentityError> {
        let invalid = |reason: &str| IdentityError::InvalidIssuer {
            issuer: cfg.issuer.clone(),
            reason: reason.to_string(),
        };
        if cfg.issuer.is_empty() {
            return Err(invalid("the issuer must not be empty"));
        }
        if cfg.audiences.is_empty() {
            return Err(invalid("needs at least one audience"));
        }
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(_), Some(_)) => return Err(invalid("set jwks_url or jwks_file, not both")),
            (Some(path), None) => JwksSource::File(path.clone()),
            (None, Some(url)) => JwksSource::Url(url.clone()),
            (None, None) => JwksSource::Discovery(format!(
                "{}/.well-known/openid-configuration",
                cfg.issuer.trim_end_matches('/')
            )),
        };
        let issuer = Issuer {
            name: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            provider: configured_provider(cfg),
            allow_http: cfg.allow_http,
            source,
            keys: RwLock::new(Arc::new(KeySet::new())),
            loaded_at: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        };
        match &issuer.source {
            JwksSource::File(path) => issuer.replace_keys(read_jwks_file(&issuer.name, path)?),
            JwksSource::Url(url) | JwksSource::Discovery(url) => issuer.check_url(url)?,
        }
        Ok(issuer)
    }

    /// Verify a token now.
    pub async fn verify(&self, token: &str) -> Result<JobIdentity, IdentityError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.verify_at(token, now).await
    }

    /// Verify a token as of `now_unix` (seconds since the epoch).
    pub async fn verify_at(
        &self,
        token: &str,
        now_unix: i64,
    ) -> Result<JobIdentity, IdentityError> {
        let parsed = Parsed::new(token)?;
        let iss = match parsed.claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(IdentityError::MissingIssuer),
            Some(_) => {
                return Err(IdentityError::Malformed(
                    "the iss claim is not a string".into(),
                ))
            }
        };
        // The unverified iss only chooses whose keys to try; nothing else is believed
        // before the signature checks out.
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| IdentityError::UnknownIssuer(shorten(iss)))?;
        let kid = parsed
            .kid
            .as_deref()
            .ok_or_else(|| IdentityError::MissingKid(issuer.name.clone()))?;
        let key = self.key_for(issuer, kid).await?;
        check_key_fits(issuer, kid, &key.jwk, parsed.alg)?;
        let valid = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.signed.as_bytes(),
            &key.decoding,
            parsed.alg.jwt(),
        )
        .unwrap_or(false);
        if !valid {
            return Err(IdentityError::BadSignature {
                issuer: issuer.name.clone(),
                kid: kid.to_string(),
            });
        }
        check_times(&parsed.claims, now_unix)?;
        check_audience(issuer, &parsed.claims)?;
        tracing::debug!(issuer = %issuer.name, kid, "OIDC token verified");
        Ok(normalise(
            issuer.provider,
            &issuer.name,
            IdentitySource::Oidc,
            parsed.claims,
        ))
    }

    /// The key `kid` of `issuer`, refetching the issuer's JWKS when it is unknown (at most
    /// once per refetch interval, and one fetch at a time).
    async fn key_for(&self, issuer: &Issuer, kid: &str) -> Result<Arc<Key>, IdentityError> {
        if let Some(key) = issuer.fresh(kid) {
            return Ok(key);
        }
        let mut state = issuer.fetch.lock().await;
        // Whoever held the lock before us may have fetched the key already.
        if let Some(key) = issuer.fresh(kid) {
            return Ok(key);
        }
        let unknown = || IdentityError::UnknownKid {
            issuer: issuer.name.clone(),
            kid: shorten(kid),
            interval: self.refetch_interval,
        };
        if let Some(last) = state.last_attempt {
            if last.elapsed() < self.refetch_interval {
                if let Some(key) = issuer.usable_stale(kid) {
                    return Ok(key);
                }
                return Err(match &state.last_error {
                    Some(reason) => IdentityError::JwksFetch {
                        issuer: issuer.name.clone(),
                        url: self.source_name(issuer),
                        reason: reason.clone(),
                    },
                    None => unknown(),
                });
            }
        }
        state.last_attempt = Some(Instant::now());
        match self.load(issuer).await {
            Ok(set) => {
                tracing::info!(issuer = %issuer.name, keys = set.len(), "JWKS loaded");
                state.last_error = None;
                issuer.replace_keys(set);
            }
            Err(e) => {
                state.last_error = Some(match &e {
                    IdentityError::JwksFetch { reason, .. } => reason.clone(),
                    other => other.to_string(),
                });
                if let Some(key) = issuer.usable_stale(kid) {
                    tracing::warn!(issuer = %issuer.name, error = %e, "JWKS refresh failed; using the keys fetched before");
                    return Ok(key);
                }
                tracing::warn!(issuer = %issuer.name, error = %e, "JWKS fetch failed");
                return Err(e);
            }
        }
        issuer.cached(kid).ok_or_else(unknown)
    }

    fn source_name(&self, issuer: &Issuer) -> String {
        match &issuer.source {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url(u) | JwksSource::Discovery(u) => redact_url(u),
        }
    }

    async fn load(&self, issuer: &Issuer) -> Result<KeySet, IdentityError> {
        match &issuer.source {
            JwksSource::File(path) => read_jwks_file(&issuer.name, path),
            JwksSource::Url(url) => self.fetch_jwks(issuer, url).await,
            JwksSource::Discovery(url) => {
                let doc = self.get_json(issuer, url).await?;
                let fail = |reason: String| IdentityError::JwksFetch {
                    issuer: issuer.name.clone(),
                    url: redact_url(url),
                    reason,
                };
                // OpenID Connect Discovery 1.0 §4.3: the document must name the issuer it
                // was fetched for, or its keys may belong to someone else.
                match doc.get("issuer") {
                    Some(Value::String(s)) if *s == issuer.name => {}
                    Some(Value::String(s)) => {
                        return Err(fail(format!(
                            "discovery document names issuer {:?}, not this one",
                            shorten(s)
                        )))
                    }
                    _ => return Err(fail("discovery document has no issuer".into())),
                }
                let Some(Value::String(jwks_uri)) = doc.get("jwks_uri") else {
                    return Err(fail("discovery document has no jwks_uri".into()));
                };
                issuer.check_url(jwks_uri)?;
                self.fetch_jwks(issuer, jwks_uri).await
            }
        }
    }

    async fn fetch_jwks(&self, issuer: &Issuer, url: &str) -> Result<KeySet, IdentityError> {
        let doc = self.get_json(issuer, url).await?;
        parse_jwks(&doc).map_err(|reason| IdentityError::JwksFetch {
            issuer: issuer.name.clone(),
            url: redact_url(url),
            reason,
        })
    }

    async fn get_json(&self, issuer: &Issuer, url: &str) -> Result<Value, IdentityError> {
        let fail = |reason: String| IdentityError::JwksFetch {
            issuer: issuer.name.clone(),
            url: redact_url(url),
            reason,
        };
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| fail(format!("invalid URL: {e}")))?;
        let resp = self
            .http
            .send(req, FETCH_TIMEOUT)
            .await
            .map_err(|e: HttpError| fail(e.to_string()))?;
        if resp.status != http::StatusCode::OK {
            return Err(fail(format!("HTTP status {}", resp.status)));
        }
        serde_json::from_slice(&resp.body).map_err(|e| fail(format!("not JSON: {e}")))
    }
}

/// A token split and decoded, not yet verified.
struct Parsed<'a> {
    alg: Alg,
    kid: Option<String>,
    claims: Map<String, Value>,
    /// `header.payload`, the bytes the signature covers.
    signed: &'a str,
    signature: &'a str,
}

impl<'a> Parsed<'a> {
    fn new(token: &'a str) -> Result<Parsed<'a>, IdentityError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(IdentityError::TooLarge {
                size: token.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        let malformed = |m: &str| IdentityError::Malformed(m.to_string());
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 {
            return Err(IdentityError::Malformed(format!(
                "expected 3 dot-separated parts, found {}",
                parts.len()
            )));
        }
        let (header, payload, signature) = (parts[0], parts[1], parts[2]);
        let header = decode_json_object(header, "header")?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.as_str(),
            _ => return Err(malformed("the header has no alg")),
        };
        let alg = match alg {
            "RS256" => Alg::Rs256,
            "ES256" => Alg::Es256,
            a if a.eq_ignore_ascii_case("none") => return Err(IdentityError::AlgNone),
            "HS256" | "HS384" | "HS512" => return Err(IdentityError::SymmetricAlg(alg.into())),
            other => return Err(IdentityError::UnsupportedAlg(shorten(other))),
        };
        // RFC 7515 §4.1.11: extensions marked critical that we do not understand mean
        // the token must be refused.
        if header.contains_key("crit") {
            return Err(malformed(
                "the header marks critical extensions (crit), which are not supported",
            ));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(malformed("the kid header is not a string")),
        };
        let claims = decode_json_object(payload, "payload")?;
        if signature.is_empty() || URL_SAFE_NO_PAD.decode(signature).is_err() {
            return Err(malformed("the signature is not base64url"));
        }
        let signed_len = parts[0].len() + 1 + parts[1].len();
        Ok(Parsed {
            alg,
            kid,
            claims,
            signed: &token[..signed_len],
            signature,
        })
    }
}

/// A token's claims, read WITHOUT verifying anything: its form is checked as for
/// verification (three parts, a supported asymmetric `alg`, JSON objects), its signature,
/// times and audience are not. Only for what-ifs that say so (`airlock policy explain`
/// without `--verify`); never for deciding what a job gets.
pub fn unverified_claims(token: &str) -> Result<Map<String, Value>, IdentityError> {
    Parsed::new(token).map(|p| p.claims)
}

fn decode_json_object(part: &str, what: &str) -> Result<Map<String, Value>, IdentityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| IdentityError::Malformed(format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(IdentityError::Malformed(format!(
            "the {what} is not a JSON object"
        ))),
        // serde_json messages name a line and column, never the input itself.
        Err(e) => Err(IdentityError::Malformed(format!(
            "the {what} is not JSON: {e}"
        ))),
    }
}

fn check_key_fits(issuer: &Issuer, kid: &str, jwk: &Jwk, alg: Alg) -> Result<(), IdentityError> {
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => "RSA".to_string(),
        AlgorithmParameters::EllipticCurve(p) => format!("EC {:?}", p.curve),
        AlgorithmParameters::OctetKey(_) => "symmetric".to_string(),
        AlgorithmParameters::OctetKeyPair(_) => "OKP".to_string(),
    };
    let type_fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Alg::Rs256) => true,
        (AlgorithmParameters::EllipticCurve(p), Alg::Es256) => p.curve == EllipticCurve::P256,
        _ => false,
    };
    // A key that names its algorithm may only be used with that one (RFC 7517 §4.4).
    let alg_fits = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => alg == Alg::Rs256,
        Some(KeyAlgorithm::ES256) => alg == Alg::Es256,
        Some(_) => false,
    };
    if type_fits && alg_fits {
        return Ok(());
    }
    let key_kind = match jwk.common.key_algorithm {
        Some(a) => format!("{kind} ({a})"),
        None => kind,
    };
    Err(IdentityError::KeyMismatch {
        issuer: issuer.name.clone(),
        kid: kid.to_string(),
        alg: alg.name(),
        key_kind,
    })
}

/// A NumericDate claim: absent is `None`; anything but a number is malformed.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            // Fractional dates are allowed by RFC 7519; whole seconds are enough here.
            (None, Some(f)) if f.is_finite() => Ok(Some(f.floor() as i64)),
            _ => Err(IdentityError::Malformed(format!(
                "the {name} claim is out of range"
            ))),
        },
        Some(_) => Err(IdentityError::Malformed(format!(
            "the {name} claim is not a number"
        ))),
    }
}

fn check_times(claims: &Map<String, Value>, now: i64) -> Result<(), IdentityError> {
    let exp = numeric_date(claims, "exp")?.ok_or(IdentityError::MissingExp)?;
    if now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(IdentityError::Expired { exp, now });
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if now.saturating_add(LEEWAY_SECS) < nbf {
            return Err(IdentityError::NotYetValid { nbf, now });
        }
    }
    if let Some(iat) = numeric_date(claims, "iat")? {
        if iat > now.saturating_add(LEEWAY_SECS) {
            return Err(IdentityError::IssuedInFuture { iat, now });
        }
    }
    Ok(())
}

fn check_audience(issuer: &Issuer, claims: &Map<String, Value>) -> Result<(), IdentityError> {
    let got: Vec<&str> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if got
        .iter()
        .any(|a| issuer.audiences.iter().any(|ok| ok == a))
    {
        return Ok(());
    }
    Err(IdentityError::WrongAudience {
        issuer: issuer.name.clone(),
        got: got.iter().take(8).map(|a| shorten(a)).collect(),
        accepted: issuer.audiences.clone(),
    })
}

fn read_jwks_file(issuer: &str, path: &Path) -> Result<KeySet, IdentityError> {
    let fail = |reason: String| IdentityError::JwksFile {
        issuer: issuer.to_string(),
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let doc: Value = serde_json::from_slice(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    parse_jwks(&doc).map_err(fail)
}

/// The usable signing keys of a JWKS. Keys we cannot use (no kid, encryption keys, types
/// the library does not know) are skipped rather than failing the whole set, so that an
/// issuer adding a new key type does not lock every job out.
fn parse_jwks(doc: &Value) -> Result<KeySet, String> {
    let Some(Value::Array(keys)) = doc.get("keys") else {
        return Err("not a JWKS: no \"keys\" array".into());
    };
    let mut set = KeySet::new();
    for raw in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            tracing::debug!("skipping a JWK that cannot be parsed");
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        if !matches!(
            jwk.algorithm,
            AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_)
        ) {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            tracing::debug!(kid, "skipping a JWK whose key material is invalid");
            continue;
        };
        set.insert(kid, Arc::new(Key { jwk, decoding }));
    }
    if set.is_empty() {
        return Err("no usable signing key (RSA or EC keys with a kid)".into());
    }
    Ok(set)
}

/// Bound token-supplied text (iss, kid, aud) before it goes into an error message.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(128).collect();
    if s.chars().count() > 128 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    const ISS: &str = "https://ci.example.test";
    const AUD: &str = "airlock";
    const NOW: i64 = 1_700_000_000;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/oidc")
            .join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).unwrap()
    }

    fn issuer_cfg(issuer: &str) -> IssuerConfig {
        IssuerConfig {
            issuer: issuer.to_string(),
            audiences: vec![AUD.to_string(), "other".to_string()],
            provider: Some(Provider::Github),
            jwks_url: None,
            jwks_file: None,
            allow_http: false,
        }
    }

    fn file_verifier() -> Verifier {
        let mut cfg = issuer_cfg(ISS);
        cfg.jwks_file = Some(fixture("jwks.json"));
        Verifier::new(&[cfg], HttpClient::new().unwrap()).unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": ISS,
            "aud": AUD,
            "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
            "repository": "octo-org/octo-repo",
            "ref": "refs/heads/main",
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "exp": NOW + 300,
        })
    }

    fn with(mut v: Value, key: &str, val: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.into(), val);
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    fn mint(alg: Algorithm, kid: &str, pem: &str, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&read_fixture(pem)).unwrap(),
            _ => EncodingKey::from_rsa_pem(&read_fixture(pem)).unwrap(),
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn rsa(claims: &Value) -> String {
        mint(Algorithm::RS256, "test-rsa-1", "rsa.pem", claims)
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// A token with any header, the given claims and a made-up signature.
    fn raw_token(header: Value, claims: &Value, signature: &str) -> String {
        format!("{}.{}.{}", b64(&header), b64(claims), signature)
    }

    /// The error's Display and Debug must not leak the token or its signature.
    fn assert_no_token(err: &IdentityError, token: &str) {
        let sig = token.rsplit('.').next().unwrap();
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains(token), "token leaked: {text}");
            if sig.len() > 8 {
                assert!(!text.contains(sig), "signature leaked: {text}");
            }
        }
    }

    async fn rejected(v: &Verifier, token: &str) -> IdentityError {
        let err = v.verify_at(token, NOW).await.unwrap_err();
        assert_no_token(&err, token);
        err
    }

    #[tokio::test]
    async fn rs256_and_es256_tokens_are_accepted() {
        let v = file_verifier();
        let id = v.verify_at(&rsa(&claims()), NOW).await.unwrap();
        assert_eq!(id.source, IdentitySource::Oidc);
        assert_eq!(id.issuer, ISS);
        assert_eq!(id.provider, Provider::Github);
        assert_eq!(id.repository.as_deref(), Some("octo-org/octo-repo"));
        assert_eq!(id.git_ref.as_deref(), Some("refs/heads/main"));

        let es = mint(Algorithm::ES256, "test-ec-1", "ec.pem", &claims());
        let id = v.verify_at(&es, NOW).await.unwrap();
        assert_eq!(id.repository.as_deref(), Some("octo-org/octo-repo"));
    }

    #[tokio::test]
    async fn verify_uses_the_real_clock() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let fresh = json!({"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300});
        file_verifier().verify(&rsa(&fresh)).await.unwrap();
        let err = file_verifier().verify(&rsa(&claims())).await.unwrap_err();
        assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
    }

    #[tokio::test]
    async fn audience_may_be_an_array_and_must_match() {
        let v = file_verifier();
        let arr = with(claims(), "aud", json!(["sts.amazonaws.com", "other"]));
        v.verify_at(&rsa(&arr), NOW).await.unwrap();

        let wrong = with(claims(), "aud", json!(["sts.amazonaws.com"]));
        let err = rejected(&v, &rsa(&wrong)).await;
        match &err {
            IdentityError::WrongAudience { got, accepted, .. } => {
                assert_eq!(got, &["sts.amazonaws.com"]);
                assert_eq!(accepted, &[AUD, "other"]);
            }
            e => panic!("unexpected {e}"),
        }
        let err = rejected(&v, &rsa(&without(claims(), "aud"))).await;
        assert!(
            matches!(err, IdentityError::WrongAudience { ref got, .. } if got.is_empty()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn oversized_and_malformed_tokens_are_refused() {
        let v = file_verifier();
        let big = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_BYTES)));
        let err = rejected(&v, &rsa(&big)).await;
        assert!(
            matches!(
                err,
                IdentityError::TooLarge {
                    max: MAX_TOKEN_BYTES,
                    ..
                }
            ),
            "{err}"
        );

        let good = rsa(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.{}", parts[2]),
            format!("{}.{}!.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", b64(&json!("just a string")), parts[1], parts[2]),
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("{not json"),
                parts[1],
                parts[2]
            ),
            format!("{}.{}.{}", parts[0], b64(&json!([1, 2])), parts[2]),
            format!("{}.{}.", parts[0], parts[1]),
            raw_token(json!({"typ": "JWT"}), &claims(), parts[2]),
        ];
        for token in &cases {
            let err = rejected(&v, token).await;
            assert!(matches!(err, IdentityError::Malformed(_)), "{token}: {err}");
        }
        let err = rejected(&v, &rsa(&with(claims(), "exp", json!("tomorrow")))).await;
        assert!(
            matches!(err, IdentityError::Malformed(ref m) if m.contains("exp")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn unsigned_and_symmetric_tokens_are_refused() {
        let v = file_verifier();
        let none = raw_token(json!({"alg": "none", "kid": "test-rsa-1"}), &claims(), "");
        assert!(matches!(rejected(&v, &none).await, IdentityError::AlgNone));
        let none = raw_token(json!({"alg": "nOnE"}), &claims(), "c2ln");
        assert!(matches!(rejected(&v, &none).await, IdentityError::AlgNone));

        // The classic key-confusion attack: HMAC keyed with the issuer's public key.
        let public = read_fixture("jwks.json");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("test-rsa-1".into());
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            header.alg = alg;
            let token =
                jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&public))
                    .unwrap();
            let err = rejected(&v, &token).await;
            assert!(
                matches!(err, IdentityError::SymmetricAlg(ref a) if a == &format!("{alg:?}")),
                "{err}"
            );
        }
        for alg in ["RS384", "PS256", "ES384", "EdDSA"] {
            let token = raw_token(json!({"alg": alg, "kid": "test-rsa-1"}), &claims(), "c2ln");
            let err = rejected(&v, &token).await;
            assert!(
                matches!(err, IdentityError::UnsupportedAlg(ref a) if a == alg),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn key_type_must_fit_the_algorithm() {
        let v = file_verifier();
        // ES256 header naming the RSA key, and RS256 naming the EC key.
        let es_on_rsa = mint(Algorithm::ES256, "test-rsa-1", "ec.pem", &claims());
        let err = rejected(&v, &es_on_rsa).await;
        assert!(
            matches!(err, IdentityError::KeyMismatch { alg: "ES256", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("RSA"), "{err}");
        let rs_on_ec = mint(Algorithm::RS256, "test-ec-1", "rsa.pem", &claims());
        let err = rejected(&v, &rs_on_ec).await;
        assert!(
            matches!(err, IdentityError::KeyMismatch { alg: "RS256", .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn issuer_and_key_must_be_known_and_signature_valid() {
        let v = file_verifier();
        let other = with(claims(), "iss", json!("https://evil.example"));
        let err = rejected(&v, &rsa(&other)).await;
        assert!(
            matches!(err, IdentityError::UnknownIssuer(ref i) if i == "https://evil.example"),
            "{err}"
        );
        assert!(err.to_string().contains("https://evil.example"), "{err}");
        let err = rejected(&v, &rsa(&without(claims(), "iss"))).await;
        assert!(matches!(err, IdentityError::MissingIssuer), "{err}");

        let unknown = mint(Algorithm::RS256, "test-rsa-2", "rsa2.pem", &claims());
        let err = rejected(&v, &unknown).await;
        assert!(
            matches!(err, IdentityError::UnknownKid { ref kid, .. } if kid == "test-rsa-2"),
            "{err}"
        );

        let no_kid = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims(),
            &EncodingKey::from_rsa_pem(&read_fixture("rsa.pem")).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            rejected(&v, &no_kid).await,
            IdentityError::MissingKid(_)
        ));

        // Signed by another key while claiming a trusted kid.
        let forged = mint(Algorithm::RS256, "test-rsa-1", "rsa2.pem", &claims());
        let err = rejected(&v, &forged).await;
        assert!(
            matches!(err, IdentityError::BadSignature { ref kid, .. } if kid == "test-rsa-1"),
            "{err}"
        );

        // A valid signature over other claims.
        let good = rsa(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&with(claims(), "repository", json!("octo-org/prod"))),
            parts[2]
        );
        let err = rejected(&v, &tampered).await;
        assert!(matches!(err, IdentityError::BadSignature { .. }), "{err}");
    }

    #[tokio::test]
    async fn time_claims_have_sixty_seconds_of_leeway() {
        let v = file_verifier();
        let at = |c: Value, now: i64| {
            let token = rsa(&c);
            let v = &v;
            async move { v.verify_at(&token, now).await }
        };
        let exp = with(claims(), "exp", json!(NOW));
        at(exp.clone(), NOW + 59).await.unwrap();
        let err = at(exp, NOW + 60).await.unwrap_err();
        assert!(
            matches!(err, IdentityError::Expired { exp: NOW, now } if now == NOW + 60),
            "{err}"
        );

        let nbf = with(claims(), "nbf", json!(NOW + 100));
        at(nbf.clone(), NOW + 40).await.unwrap();
        let err = at(nbf, NOW + 39).await.unwrap_err();
        assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");

        let iat = with(claims(), "iat", json!(NOW + 100));
        at(iat.clone(), NOW + 40).await.unwrap();
        let err = at(iat, NOW + 39).await.unwrap_err();
        assert!(matches!(err, IdentityError::IssuedInFuture { .. }), "{err}");

        let err = rejected(&v, &rsa(&without(claims(), "exp"))).await;
        assert!(matches!(err, IdentityError::MissingExp), "{err}");
        // Without nbf and iat only exp counts.
        at(without(without(claims(), "nbf"), "iat"), NOW)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn keys_of_one_issuer_never_verify_another() {
        let mut a = issuer_cfg(ISS);
        a.jwks_file = Some(fixture("jwks.json"));
        let mut b = issuer_cfg("https://b.example.test");
        b.jwks_file = Some(fixture("jwks-rotated.json"));
        let v = Verifier::new(&[a, b], HttpClient::new().unwrap()).unwrap();
        let token = mint(Algorithm::RS256, "test-rsa-2", "rsa2.pem", &claims());
        let err = rejected(&v, &token).await;
        assert!(matches!(err, IdentityError::UnknownKid { .. }), "{err}");
        let for_b = with(claims(), "iss", json!("https://b.example.test"));
        let id = v
            .verify_at(
                &mint(Algorithm::RS256, "test-rsa-2", "rsa2.pem", &for_b),
                NOW,
            )
            .await
            .unwrap();
        assert_eq!(id.issuer, "https://b.example.test");
    }

    #[test]
    fn bad_configuration_fails_at_construction() {
        let http = HttpClient::new().unwrap();
        let mut cfg = issuer_cfg(ISS);
        cfg.jwks_file = Some(fixture("does-not-exist.json"));
        let err = Verifier::new(&[cfg], http.clone()).unwrap_err();
        assert!(matches!(err, IdentityError::JwksFile { .. }), "{err}");
        assert!(err.to_string().contains("does-not-exist.json"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"keys\": 3}").unwrap();
        let mut cfg = issuer_cfg(ISS);
        cfg.jwks_file = Some(bad.clone());
        let err = Verifier::new(&[cfg], http.clone()).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");

        let mut cfg = issuer_cfg(ISS);
        cfg.jwks_url = Some("http://127.0.0.1:1/keys".into());
        let err = Verifier::new(&[cfg], http.clone()).unwrap_err();
        assert!(matches!(err, IdentityError::InsecureUrl { .. }), "{err}");
        assert!(err.to_string().contains("allow_http"), "{err}");

        let err = Verifier::new(&[issuer_cfg("http://127.0.0.1:1")], http.clone()).unwrap_err();
        assert!(matches!(err, IdentityError::InsecureUrl { .. }), "{err}");

        let mut cfg = issuer_cfg(ISS);
        cfg.audiences.clear();
        let err = Verifier::new(&[cfg], http.clone()).unwrap_err();
        assert!(matches!(err, IdentityError::InvalidIssuer { .. }), "{err}");

        let err = Verifier::new(&[issuer_cfg(ISS), issuer_cfg(ISS)], http).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    /// A loopback HTTP server with swappable routes that counts requests per path.
    struct TestServer {
        addr: SocketAddr,
        routes: Arc<Mutex<HashMap<String, String>>>,
        hits: Arc<Mutex<HashMap<String, usize>>>,
    }

    impl TestServer {
        async fn start(delay: Duration) -> TestServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let routes: Arc<Mutex<HashMap<String, String>>> = Arc::default();
            let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
            let (r, h) = (routes.clone(), hits.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (r, h) = (r.clone(), h.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let (r, h) = (r.clone(), h.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let _ = req.into_body().collect().await;
                                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                                tokio::time::sleep(delay).await;
                                let body = r.lock().unwrap().get(&path).cloned();
                                let resp = match body {
                                    Some(b) => http::Response::new(Full::new(Bytes::from(b))),
                                    None => {
                                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                                        *resp.status_mut() = http::StatusCode::NOT_FOUND;
                                        resp
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            TestServer { addr, routes, hits }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn set(&self, path: &str, body: impl Into<String>) {
            self.routes.lock().unwrap().insert(path.into(), body.into());
        }

        fn hits(&self, path: &str) -> usize {
            self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
        }
    }

    fn jwks(name: &str) -> String {
        String::from_utf8(read_fixture(name)).unwrap()
    }

    fn url_verifier(server: &TestServer, interval: Duration) -> Verifier {
        let mut cfg = issuer_cfg(ISS);
        cfg.jwks_url = Some(server.url("/keys"));
        cfg.allow_http = true;
        Verifier::new(&[cfg], HttpClient::new().unwrap())
            .unwrap()
            .with_refetch_interval(interval)
    }

    #[tokio::test]
    async fn jwks_is_fetched_from_a_url_once_and_cached() {
        let server = TestServer::start(Duration::ZERO).await;
        server.set("/keys", jwks("jwks.json"));
        let v = url_verifier(&server, Duration::ZERO);
        v.verify_at(&rsa(&claims()), NOW).await.unwrap();
        let es = mint(Algorithm::ES256, "test-ec-1", "ec.pem", &claims());
        v.verify_at(&es, NOW).await.unwrap();
        assert_eq!(
            server.hits("/keys"),
            1,
            "known kids are served from the cache"
        );
    }

    #[tokio::test]
    async fn jwks_is_found_by_discovery() {
        let server = TestServer::start(Duration::ZERO).await;
        let issuer = server.url("");
        server.set(
            "/.well-known/openid-configuration",
            json!({"issuer": issuer, "jwks_uri": server.url("/jwks")}).to_string(),
        );
        server.set("/jwks", jwks("jwks.json"));
        let mut cfg = issuer_cfg(&issuer);
        cfg.allow_http = true;
        let v = Verifier::new(&[cfg], HttpClient::new().unwrap()).unwrap();
        let token = rsa(&with(claims(), "iss", json!(issuer)));
        let id = v.verify_at(&token, NOW).await.unwrap();
        assert_eq!(id.issuer, issuer);
        assert_eq!(server.hits("/.well-known/openid-configuration"), 1);
        assert_eq!(server.hits("/jwks"), 1);
    }

    #[tokio::test]
    async fn discovery_naming_another_issuer_is_refused() {
        let server = TestServer::start(Duration::ZERO).await;
        let issuer = server.url("");
        server.set(
            "/.well-known/openid-configuration",
            json!({"issuer": "https://elsewhere.example", "jwks_uri": server.url("/jwks")})
                .to_string(),
        );
        server.set("/jwks", jwks("jwks.json"));
        let mut cfg = issuer_cfg(&issuer);
        cfg.allow_http = true;
        let v = Verifier::new(&[cfg], HttpClient::new().unwrap()).unwrap();
        let token = rsa(&with(claims(), "iss", json!(issuer)));
        let err = rejected(&v, &token).await;
        assert!(matches!(err, IdentityError::JwksFetch { .. }), "{err}");
        assert!(err.to_string().contains("elsewhere.example"), "{err}");
        assert_eq!(server.hits("/jwks"), 0);
    }

    #[tokio::test]
    async fn discovered_http_jwks_uri_needs_allow_http() {
        // The issuer itself is https (and unreachable); check_url runs on the discovered
        // URI, exercised here directly.
        let mut cfg = issuer_cfg("https://127.0.0.1:1");
        cfg.allow_http = false;
        let issuer = Verifier::issuer(&cfg).unwrap();
        let err = issuer.check_url("http://127.0.0.1:1/jwks").unwrap_err();
        assert!(matches!(err, IdentityError::InsecureUrl { .. }), "{err}");
        issuer.check_url("https://127.0.0.1:1/jwks").unwrap();
    }

    #[tokio::test]
    async fn rotated_keys_are_picked_up_by_a_refetch() {
        let server = TestServer::start(Duration::ZERO).await;
        server.set("/keys", jwks("jwks.json"));
        let v = url_verifier(&server, Duration::ZERO);
        v.verify_at(&rsa(&claims()), NOW).await.unwrap();
        server.set("/keys", jwks("jwks-rotated.json"));
        let rotated = mint(Algorithm::RS256, "test-rsa-2", "rsa2.pem", &claims());
        let id = v.verify_at(&rotated, NOW).await.unwrap();
        assert_eq!(id.issuer, ISS);
        assert_eq!(server.hits("/keys"), 2);
    }

    #[tokio::test]
    async fn refetches_are_rate_limited() {
        let server = TestServer::start(Duration::ZERO).await;
        server.set("/keys", jwks("jwks.json"));
        let v = url_verifier(&server, Duration::from_secs(3600));
        v.verify_at(&rsa(&claims()), NOW).await.unwrap();
        server.set("/keys", jwks("jwks-rotated.json"));
        let rotated = mint(Algorithm::RS256, "test-rsa-2", "rsa2.pem", &claims());
        for _ in 0..5 {
            let err = rejected(&v, &rotated).await;
            assert!(matches!(err, IdentityError::UnknownKid { .. }), "{err}");
        }
        assert_eq!(server.hits("/keys"), 1, "no refetch inside the interval");

        // Once the interval has passed, one refetch finds the key.
        let v = v.with_refetch_interval(Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(60)).await;
        v.verify_at(&rotated, NOW).await.unwrap();
        assert_eq!(server.hits("/keys"), 2);
    }

    #[tokio::test]
    async fn concurrent_verifications_share_one_fetch() {
        let server = TestServer::start(Duration::from_millis(200)).await;
        server.set("/keys", jwks("jwks.json"));
        let v = Arc::new(url_verifier(&server, Duration::ZERO));
        let token = rsa(&claims());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (v, t) = (v.clone(), token.clone());
                tokio::spawn(async move { v.verify_at(&t, NOW).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(server.hits("/keys"), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_reported_and_not_retried_at_once() {
        let server = TestServer::start(Duration::ZERO).await;
        let v = url_verifier(&server, Duration::from_secs(3600));
        let token = rsa(&claims());
        for _ in 0..3 {
            let err = rejected(&v, &token).await;
            assert!(matches!(err, IdentityError::JwksFetch { .. }), "{err}");
            assert!(err.to_string().contains("404"), "{err}");
        }
        assert_eq!(server.hits("/keys"), 1);
    }

    /// Pretend the issuer's keys were fetched `age` ago.
    fn age_keys(v: &Verifier, age: Duration) {
        let issuer = v.issuers.get(ISS).unwrap();
        *issuer.loaded_at.write().unwrap() = Some(Instant::now() - age);
    }

    #[tokio::test]
    async fn keys_are_fetched_again_after_an_hour_and_stale_keys_expire() {
        let server = TestServer::start(Duration::ZERO).await;
        server.set("/keys", jwks("jwks.json"));
        let v = url_verifier(&server, Duration::ZERO);
        let token = rsa(&claims());
        v.verify_at(&token, NOW).await.unwrap();
        age_keys(&v, JWKS_REFRESH_AFTER + Duration::from_secs(1));
        v.verify_at(&token, NOW).await.unwrap();
        assert_eq!(server.hits("/keys"), 2, "old keys are refreshed");
        // The issuer dropped test-rsa-1: after the refresh it is no longer trusted.
        let mut only_ec: Value = serde_json::from_str(&jwks("jwks.json")).unwrap();
        only_ec["keys"]
            .as_array_mut()
            .unwrap()
            .retain(|k| k["kid"] == "test-ec-1");
        server.set("/keys", only_ec.to_string());
        age_keys(&v, JWKS_REFRESH_AFTER + Duration::from_secs(1));
        let err = rejected(&v, &token).await;
        assert!(matches!(err, IdentityError::UnknownKid { .. }), "{err}");
        // The issuer is down: keys fetched before are used for a while, then not.
        server.set("/keys", jwks("jwks.json"));
        v.verify_at(&token, NOW).await.unwrap();
        server.routes.lock().unwrap().clear();
        age_keys(&v, JWKS_REFRESH_AFTER + Duration::from_secs(1));
        v.verify_at(&token, NOW).await.unwrap();
        age_keys(&v, JWKS_STALE_LIMIT + Duration::from_secs(1));
        let err = rejected(&v, &token).await;
        assert!(matches!(err, IdentityError::JwksFetch { .. }), "{err}");
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let mut doc: Value = serde_json::from_str(&jwks("jwks.json")).unwrap();
        let keys = doc["keys"].as_array_mut().unwrap();
        keys.push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
        keys.push(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"}));
        keys.push(json!({"kty": "weird", "kid": "w"}));
        let set = parse_jwks(&doc).unwrap();
        let mut kids: Vec<&String> = set.keys().collect();
        kids.sort();
        assert_eq!(kids, ["test-ec-1", "test-rsa-1"]);
        assert!(parse_jwks(&json!({"keys": []})).is_err());
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let v = file_verifier();
        let text = format!("{v:?}");
        assert!(text.contains(ISS), "{text}");
        assert!(!text.contains("\"n\""), "{text}");
    }
}
