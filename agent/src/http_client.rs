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
                reason: with_hint(error_chain(&e)),
            })?;
            Ok(io)
        })
    }
}

/// hyper-util's tunnel errors say little (its error type is private): say what to check.
fn with_hint(reason: String) -> String {
    if reason.ends_with("unsuccessful") {
        format!(
            "{reason} (the proxy refused the CONNECT: a wrong user or password in the proxy \
             URL, or a target port it does not allow)"
        )
    } else if reason.ends_with("proxy authorization required") {
        format!("{reason} (put the proxy's user and password in its URL)")
    } else {
        reason
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

    use crate::proxy::{ConfiguredProxy, ProxySettings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn proxied(url: &str) -> HttpClient {
        let s = ProxySettings::resolve(
            &ConfiguredProxy {
                https_proxy: Some(url),
                http_proxy: Some(url),
                no_proxy: None,
            },
            |_| None,
        )
        .unwrap();
        HttpClient::with_proxy(&s).unwrap()
    }

    /// A one-connection CONNECT proxy: reads the request head, hands it to the test, and
    /// either answers `status` and stops, or answers 200 and relays to `127.0.0.1:<port>`.
    async fn fake_proxy(status: u16) -> (u16, tokio::sync::oneshot::Receiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                c.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let target = head.split_whitespace().nth(1).unwrap().to_owned();
            let _ = tx.send(head);
            if status != 200 {
                let msg = format!("HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n");
                c.write_all(msg.as_bytes()).await.unwrap();
                return;
            }
            let port = target.rsplit(':').next().unwrap();
            let mut up = TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .unwrap();
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
        });
        (port, rx)
    }

    #[tokio::test]
    async fn a_target_is_reached_through_the_proxys_tunnel_with_its_credentials() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_port = origin.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = origin.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b).await.unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\norigin")
                .await
                .unwrap();
        });
        let (proxy_port, head) = fake_proxy(200).await;
        let client = proxied(&format!("http://me:pa%40ss@127.0.0.1:{proxy_port}"));
        // A name, so the loopback rule does not send it direct; the fake proxy relays it
        // to the origin's port on loopback.
        let url = format!("http://origin.test:{origin_port}/x");
        let req = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
        let resp = client.send(req, Duration::from_secs(5)).await.unwrap();
        assert_eq!(resp.body.as_ref(), b"origin");
        let head = tokio::time::timeout(Duration::from_secs(5), head)
            .await
            .expect("the proxy was asked")
            .unwrap();
        assert!(
            head.starts_with(&format!("CONNECT origin.test:{origin_port} HTTP/1.1\r\n")),
            "{head}"
        );
        // base64("me:pa@ss")
        assert!(
            head.contains("Proxy-Authorization: Basic bWU6cGFAc3M=\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_refused_tunnel_names_the_proxy_but_not_its_password() {
        let (proxy_port, head) = fake_proxy(403).await;
        let client = proxied(&format!("http://me:hunter2@127.0.0.1:{proxy_port}"));
        let req = Request::get("https://sts.example.test/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let e = client
            .send(req, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        let head = tokio::time::timeout(Duration::from_secs(5), head)
            .await
            .expect("the proxy was asked")
            .unwrap();
        assert!(
            head.starts_with("CONNECT sts.example.test:443 "),
            "the default https port is asked for"
        );
        assert!(
            e.contains(&format!("through proxy http://***@127.0.0.1:{proxy_port}")),
            "{e}"
        );
        assert!(e.contains("the proxy refused the CONNECT"), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("me:"), "{e}");
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
