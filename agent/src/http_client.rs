//! The one outbound HTTP client of the agent (STS, JWKS and discovery, IMDS for the
//! agent's own credentials): hyper with rustls and the host's CA roots, directly or through
//! an HTTP proxy's `CONNECT` tunnel (`proxy.rs` says which), with TLS end to end to the
//! target either way.
//!
//! Every request has a deadline; responses are read whole up to a size cap, so a slow or
//! hostile server cannot hold a task or grow memory without bound.

use crate::proxy::{always_direct, redact_userinfo, ProxySettings};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

type Connector = hyper_rustls::HttpsConnector<ProxyConnector>;

/// How long a TCP connect (to the target or to the proxy) may take; the whole request,
/// the `CONNECT` exchange included, stays within the caller's deadline too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// A client for http and https URLs that connects directly, whatever the environment
    /// says; https verified against the host's CA roots. (Whether plain http is acceptable
    /// for a given URL is the caller's decision.)
    pub fn new() -> Result<HttpClient, HttpError> {
        Self::with_proxy(&ProxySettings::default())
    }

    /// Like [`HttpClient::new`], through the proxies of `proxy` (see `proxy.rs`).
    pub fn with_proxy(proxy: &ProxySettings) -> Result<HttpClient, HttpError> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_nodelay(true);
        let inner = ProxyConnector {
            tcp,
            matcher: proxy.matcher().map(Arc::new),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(inner);
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

/// Drop the query string of a URL, and any user and password in it, before it goes into a
/// message: queries can carry tokens.
pub fn redact_url(url: &str) -> String {
    let url = redact_userinfo(url);
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url,
    }
}

/// The TCP connector under TLS: straight to the target, or to the proxy the matcher names
/// for it and then `CONNECT host:port` through it (hyper-util's [`Tunnel`]: one request,
/// a response head of at most 8 KiB, 200 or an error). The TLS layer above then speaks to
/// the target over the tunnel, so the proxy relays ciphertext only.
#[derive(Clone, Debug)]
pub struct ProxyConnector {
    tcp: HttpConnector,
    matcher: Option<Arc<Matcher>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a tunnel could not be opened, naming the proxy (its password shown as `***`).
#[derive(Debug, thiserror::Error)]
#[error("through proxy {proxy}: {reason}")]
pub struct ProxyConnectError {
    proxy: String,
    reason: String,
}

impl tower_service::Service<Uri> for ProxyConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = match (&self.matcher, dst.host()) {
            (Some(m), Some(host)) if !always_direct(host) => m.intercept(&dst),
            _ => None,
        };
        let Some(intercept) = intercept else {
            let fut = self.tcp.call(dst);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        let proxy_uri = intercept.uri().clone();
        let shown = match (intercept.basic_auth(), proxy_uri.authority()) {
            (Some(_), Some(a)) => format!("http://***@{a}"),
            (_, Some(a)) => format!("http://{a}"),
            _ => "(none)".to_owned(),
        };
        // The tunnel asks for the target's port, and takes 443 when the URI has none: give
        // it the scheme's own, so a plain-http target is reached on 80.
        let dst = with_explicit_port(dst);
        let mut tunnel = Tunnel::new(proxy_uri, self.tcp.clone());
        if let Some(auth) = intercept.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        Box::pin(async move {
            let io = tunnel.call(dst).await.map_err(|e| ProxyConnectError {
                proxy: shown,
                reason: error_chain(&e),
            })?;
            Ok(io)
        })
    }
}

fn with_explicit_port(dst: Uri) -> Uri {
    if dst.port().is_some() {
        return dst;
    }
    let port = if dst.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let Some(host) = dst.host() else {
        return dst;
    };
    let authority = format!("{host}:{port}");
    let mut parts = dst.clone().into_parts();
    match authority.parse() {
        Ok(a) => {
            parts.authority = Some(a);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
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
        assert_eq!(redact_url("http://u:pw@x:1/y?t=1"), "http://***@x:1/y?…");
    }

    #[test]
    fn tunnels_name_the_port_of_the_scheme() {
        let p = |s: &str| with_explicit_port(s.parse().unwrap()).to_string();
        assert_eq!(p("http://sts.test/x"), "http://sts.test:80/x");
        assert_eq!(p("https://sts.test/x?a=b"), "https://sts.test:443/x?a=b");
        assert_eq!(p("https://sts.test:8443/"), "https://sts.test:8443/");
        assert_eq!(p("https://[2001:db8::1]/"), "https://[2001:db8::1]:443/");
    }
}
