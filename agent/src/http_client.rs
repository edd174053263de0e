//! The one outbound HTTP client of the agent (STS, JWKS and discovery, IMDS for the
//! agent's own credentials): hyper with rustls and the host's CA roots.
//!
//! Every request has a deadline; responses are read whole up to a size cap, so a slow or
//! hostile server cannot hold a task or grow memory without bound.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Largest response body accepted (STS answers and JWKS are a few KiB).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request to {0} timed out after {1:?}")]
    Timeout(String, Duration),
    #[error("request to {0} failed: {1}")]
    Connect(String, String),
    #[error("response from {0} could not be read: {1}")]
    Body(String, String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<Connector, Full<Bytes>>,
}

impl HttpClient {
    /// A client for http and https URLs; https verified against the host's CA roots.
    /// (Whether plain http is acceptable for a given URL is the caller's decision.)
    pub fn new() -> Result<HttpClient, HttpError> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpClient { client })
    }

    /// Send a request and read the whole response, all within `timeout`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let target = redact_url(&req.uri().to_string());
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Connect(target.clone(), error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| HttpError::Body(target.clone(), e.to_string()))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(target, timeout)),
        }
    }
}

/// Drop the query string of a URL before it goes into a message: queries can carry tokens.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_query_in_messages() {
        assert_eq!(redact_url("https://x/y?token=abc"), "https://x/y?…");
        assert_eq!(redact_url("https://x/y"), "https://x/y");
    }
}
