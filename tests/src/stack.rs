//! A moto STS stand-in plus an `airlockd` wired to it: what most end-to-end tests start.
//!
//! Owns wiring only; it must never weaken moto's signature and IAM checks to make a test
//! pass.

use crate::agent::{Agent, AgentOptions, Job};
use crate::moto::MotoServer;
use crate::oidc::GithubJob;

/// Fields drop in order: the agent stops before its STS does.
#[derive(Debug)]
pub struct Stack {
    pub agent: Agent,
    pub moto: MotoServer,
}

impl Stack {
    /// moto plus an agent with the repository's policies.
    pub fn start() -> Stack {
        Self::start_with(|o| o)
    }

    /// moto plus an agent whose options `adjust` changes.
    pub fn start_with(adjust: impl FnOnce(AgentOptions) -> AgentOptions) -> Stack {
        let moto = start_moto();
        let opts = adjust(AgentOptions::new(
            moto.endpoint(),
            moto.agent_access_key(),
            moto.agent_secret_key(),
        ));
        match Agent::start(opts) {
            Ok(agent) => Stack { agent, moto },
            Err(e) => panic!("airlockd did not start: {e}"),
        }
    }

    /// Starts a job for `who`, panicking with the CLI's error if it fails.
    pub fn job(&self, who: &GithubJob) -> Job {
        match self.agent.start_job(&who.token()) {
            Ok(job) => job,
            Err(e) => panic!("job start for {} failed: {e}", who.repository),
        }
    }

    pub fn sts(&self) -> &str {
        self.moto.endpoint()
    }
}

fn start_moto() -> MotoServer {
    match MotoServer::start() {
        Ok(m) => m,
        Err(e) => panic!("moto_server did not start: {e}"),
    }
}
