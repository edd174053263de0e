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
        Self::sandboxed_with(extra, crate::agent::Policies::Repo)
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
        Self::sandboxed_rule_tables(extra, &[("10-production.toml", tables)])
    }

    /// Like [`Stack::sandboxed`], with each `(file, tables)`: `tables` appended to the last
    /// rule of that file of the repository's policies (`10-production.toml`: production,
    /// `20-staging.toml`: staging), which must not have such tables yet.
    pub fn sandboxed_rule_tables(extra: &str, edits: &[(&str, &str)]) -> Stack {
        Self::sandboxed_rule_tables_with(extra, edits, |o| o)
    }

    /// [`Stack::sandboxed_rule_tables`] with the agent's options changed by `adjust` last
    /// (e.g. [`AgentOptions::netns`], [`AgentOptions::nft_stub`]).
    pub fn sandboxed_rule_tables_with(
        extra: &str,
        edits: &[(&str, &str)],
        adjust: impl FnOnce(AgentOptions) -> AgentOptions,
    ) -> Stack {
        let src = crate::paths::repo_root().join("policies");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&src).expect("the repository's policies/") {
            let path = entry.expect("a policies/ entry").path();
            if !path.is_file() {
                continue; // policies/cookbook/: examples, not the repository's policies
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut text = std::fs::read_to_string(&path).expect("a policy file");
            if let Some((_, tables)) = edits.iter().find(|(f, _)| *f == name) {
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
        Self::sandboxed_with_adjusted(extra, crate::agent::Policies::Files(files), adjust)
    }

    /// Like [`Stack::sandboxed`], with `policies` instead of the repository's.
    pub fn sandboxed_with(extra: &str, policies: crate::agent::Policies) -> Stack {
        Self::sandboxed_with_adjusted(extra, policies, |o| o)
    }

    /// Like [`Stack::sandboxed`], with the agent's options then changed by `adjust` (e.g.
    /// [`AgentOptions::audit_config`]).
    pub fn sandboxed_then(extra: &str, adjust: impl FnOnce(AgentOptions) -> AgentOptions) -> Stack {
        Self::sandboxed_with_adjusted(extra, crate::agent::Policies::Repo, adjust)
    }

    fn sandboxed_with_adjusted(
        extra: &str,
        policies: crate::agent::Policies,
        adjust: impl FnOnce(AgentOptions) -> AgentOptions,
    ) -> Stack {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let pool = unique_pool();
        Self::start_with(|mut o| {
            o.extra_config = format!(
                "[sandbox]\nenabled = true\nruntime_dir = \"jobs\"\nnetns_dir = \"netns\"\ncgroup_parent = \"al-e2e-{pid}-{n}\"\naddress_pool = \"{pool}\"\n{extra}"
            );
            o.policies = policies;
            // For debugging a test: `AIRLOCK_TEST_LOG=airlock=debug cargo nextest run ...`.
            o.log_filter = std::env::var("AIRLOCK_TEST_LOG").ok();
            adjust(o)
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

/// A /24 for one test agent's jobs that no other test agent on the host has: agents in
/// parallel test processes with the same pool would give two jobs the same address, and the
/// host would route one job's replies to the other. A counter in a file, under a lock shared
/// by every test process, walks 10.128.0.0/9 (32,768 pools) round.
pub(crate) fn unique_pool() -> String {
    use std::io::{Read, Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open("/tmp/airlock-tests-pools")
        .expect("the test pool counter");
    f.lock().expect("the test pool counter's lock");
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let n: u32 = text.trim().parse().unwrap_or(0) % 32_768;
    f.set_len(0).expect("truncate the counter");
    f.rewind().expect("rewind the counter");
    write!(f, "{}", n + 1).expect("write the counter");
    format!("10.{}.{}.0/24", 128 + n / 256, n % 256)
}
