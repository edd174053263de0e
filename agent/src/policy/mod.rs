//! Policies: which job gets which roles. Pure: identity and time in, a [`Decision`] out.
//!
//! Loading (`load`) reads TOML files from a directory and checks everything once, so that a
//! loaded [`PolicySet`] cannot fail at decision time. Deciding (`decide`) does no I/O and
//! never looks at the clock itself: the caller passes `now`. Default deny: no matching rule,
//! no grants.

pub mod decide;
pub mod load;

use serde::Serialize;
use std::path::PathBuf;

pub use decide::{Decision, Explanation, RuleVerdict};
pub use load::{load_dir, PolicyError};

/// How a grant's role is assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `AssumeRole`, signed with the agent's own credentials.
    AssumeRole,
    /// `AssumeRoleWithWebIdentity` with the job's own OIDC token (needs an OIDC identity).
    WebIdentity,
}

/// One role a matching rule grants, under an alias. Checked at load time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    /// Path segment of the container endpoint (`/v1/credentials/<alias>`) and IMDS role name.
    pub alias: String,
    /// The grant served at the default path; exactly one per rule.
    pub default: bool,
    pub role_arn: String,
    pub method: Method,
    /// Requested session length before clamping to STS limits and the job's lifetime.
    pub duration_secs: u32,
    /// Inline session policy (a file's content is read at load time); ≤ 2048 chars.
    pub session_policy: Option<String>,
    /// Managed session policy ARNs (≤ 10).
    pub policy_arns: Vec<String>,
    /// Session tag key → identity field name (see `identity::FIELDS`, or `claims.<name>`).
    pub session_tags: Vec<(String, String)>,
}

/// What to do with a job outside a rule's time windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutsideWindow {
    Refuse,
    Flag,
}

/// Where a rule came from, for messages and `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}
