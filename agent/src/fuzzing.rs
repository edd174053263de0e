//! Entry points for the fuzz targets in `fuzz/` (docs/testing.md, "Fuzzing"), and nothing
//! else. Hidden from the documentation: not an API.
//!
//! Most of what the targets drive is public already (the OIDC verifier, the policy loader,
//! the audit reader). Two parts are not, and the targets must reach them without a socket
//! in the way: one connection of a job's endpoint, served over any byte stream, and one
//! query answered by a job's resolver. This module exposes exactly those two, so that no
//! module has to be made public for the fuzzer. It owns no logic of its own; the agent must
//! never call it.

use crate::egress::dns::{self, AdmitFn, AllowFn, DnsConfig, DnsError, DnsEvent};
use crate::endpoint::{self, CredentialSource, JobEndpoint, Shared};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// Serve one connection of `job`'s endpoint on `io` (an in-memory pipe in the fuzz target),
/// exactly as the endpoint's accept loop serves an accepted socket, until it closes.
pub async fn endpoint_connection<S, I>(io: I, job: Arc<JobEndpoint>, shared: Arc<Shared<S>>)
where
    S: CredentialSource,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    endpoint::serve_connection(io, job, shared).await;
}

/// A job's resolver without its job-facing sockets: the fuzz target hands it each query's
/// bytes as they would arrive. It still asks `cfg`'s upstreams over real sockets.
pub struct DnsResolver(dns::Resolver);

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver")
    }
}

impl DnsResolver {
    /// The same checks and hooks as [`dns::serve`].
    pub fn new(
        cfg: DnsConfig,
        allow: AllowFn,
        audit_mode: bool,
        admit: AdmitFn,
        events: mpsc::Sender<DnsEvent>,
    ) -> Result<DnsResolver, DnsError> {
        cfg.check()?;
        Ok(DnsResolver(dns::Resolver::new(
            cfg, allow, audit_mode, admit, events,
        )))
    }

    /// The reply to one query received over TCP (`tcp`) or UDP, or `None` when the resolver
    /// sends nothing.
    pub async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let transport = if tcp {
            dns::Transport::Tcp
        } else {
            dns::Transport::Udp
        };
        self.0.answer(query, transport).await
    }
}
