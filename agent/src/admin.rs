//! The admin listener: `/healthz` (503 while the audit log cannot be written) and
//! Prometheus `/metrics`, on loopback by default.
//! Read-only: it never changes the agent's state and never shows a secret.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

use crate::daemon::Daemon;

pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let daemon = daemon.clone();
                async move {
                    let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
                        ("GET", "/healthz") => {
                            // A log that cannot be written means no job starts: unhealthy.
                            let audit = daemon.audit().health();
                            let (status, word) = if audit.ok() {
                                (StatusCode::OK, "ok")
                            } else {
                                (StatusCode::SERVICE_UNAVAILABLE, "audit_failing")
                            };
                            (
                                status,
                                "application/json",
                                serde_json::json!({
                                    "status": word,
                                    "jobs": daemon.job_count(),
                                    "policy_rules": daemon.policy_rules(),
                                    "audit": audit,
                                })
                                .to_string(),
                            )
                        }
                        ("GET", "/metrics") => (
                            StatusCode::OK,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            daemon.metrics().encode(),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found\n".to_string(),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, ctype)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts are valid"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
