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

    /// moto plus an agent with `[sandbox] enabled = true`, its own cgroup parent, namespace
    /// directory and job directories (so parallel tests never reap each other's jobs), and
    /// `extra` appended to the `[sandbox]` table (e.g. `"pids_max = 64\n"`).
    pub fn sandboxed(extra: &str) -> Stack {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Self::start_with(|mut o| {
            o.extra_config = format!(
                "[sandbox]\nenabled = true\nruntime_dir = \"jobs\"\nnetns_dir = \"netns\"\ncgroup_parent = \"al-e2e-{pid}-{n}\"\n{extra}"
            );
            o
        })
    }

    /// Like [`Stack::sandboxed`], but with the repository's policies changed so that the
    /// production rule's jobs get `network = "outbound"`.
    pub fn sandboxed_outbound_production(extra: &str) -> Stack {
        Self::sandboxed_production_rule(extra, "network = \"outbound\"\n")
    }

    /// Like [`Stack::sandboxed`], with the repository's policies, the production rule given
    /// the `[rule.sandbox]` table `rule_sandbox` (appended to the last rule of
    /// `10-production.toml`, which is the production rule).
    pub fn sandboxed_production_rule(extra: &str, rule_sandbox: &str) -> Stack {
        Self::sandboxed_production_tables(extra, &format!("[rule.sandbox]\n{rule_sandbox}"))
    }

    /// Like [`Stack::sandboxed`], with `tables` (TOML sub-tables of the rule, such as
    /// `[rule.egress]`) appended to the production rule, the last of `10-production.toml`.
    /// `extra` is appended to the agent's config after the `[sandbox]` keys, so it may also
    /// open tables of its own (`[egress]`).
    pub fn sandboxed_production_tables(extra: &str, tables: &str) -> Stack {
        let src = crate::paths::repo_root().join("policies");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&src).expect("the repository's policies/") {
            let path = entry.expect("a policies/ entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut text = std::fs::read_to_string(&path).expect("a policy file");
            if name == "10-production.toml" {
                assert!(
                    !text.lines().any(|l| {
                        let l = l.trim_start();
                        l.starts_with("[rule.sandbox]") || l.starts_with("[rule.egress]")
                    }),
                    "{name} has a sandbox or egress table"
                );
                text.push('\n');
                text.push_str(tables);
            }
            files.push((name, text));
        }
        Self::sandboxed_with(extra, crate::agent::Policies::Files(files))
    }

    fn sandboxed_with(extra: &str, policies: crate::agent::Policies) -> Stack {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Self::start_with(|mut o| {
            o.extra_config = format!(
                "[sandbox]\nenabled = true\nruntime_dir = \"jobs\"\nnetns_dir = \"netns\"\ncgroup_parent = \"al-e2e-{pid}-o{n}\"\n{extra}"
            );
            o.policies = policies;
            // For debugging a test: `AIRLOCK_TEST_LOG=airlock=debug cargo nextest run ...`.
            o.log_filter = std::env::var("AIRLOCK_TEST_LOG").ok();
            o
        })
    }

    /// `airlock run --oidc-token-file <token> -- /bin/sh -c <script>` in this stack's agent.
    pub fn run_sh(&self, token: &str, script: &str) -> std::process::Output {
        let f = self.agent.token_file(token);
        let f = f.to_string_lossy().to_string();
        self.agent.cli(&[
            "run",
            "--oidc-token-file",
            &f,
            "--",
            "/bin/sh",
            "-c",
            script,
        ])
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
