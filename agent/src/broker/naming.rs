//! What CloudTrail shows about a job: `RoleSessionName`, `SourceIdentity` and session tags.
//!
//! Every value built here comes from job-controlled data (repository names, refs, claims),
//! so everything is sanitised to STS's character sets and length limits: a hostile claim
//! can shorten or blur a name, never make STS reject the call or forge another job's name.
//! This module is pure: no I/O, no clock.

use crate::identity::JobIdentity;
use crate::policy::Grant;
use sha2::{Digest, Sha256};

/// STS limits (AssumeRole API reference).
pub const SESSION_NAME_MAX: usize = 64;
pub const SOURCE_IDENTITY_MAX: usize = 64;
pub const TAG_KEY_MAX: usize = 128;
pub const TAG_VALUE_MAX: usize = 256;
pub const MAX_TAGS: usize = 50;

/// `[\w+=,.@-]` with `\w` as ASCII: the charset of `RoleSessionName` and `SourceIdentity`.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
}

/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]`: the charset of session tag keys and values.
fn is_tag_char(c: char) -> bool {
    c.is_alphabetic()
        || c.is_numeric()
        || is_unicode_space_separator(c)
        || matches!(c, '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
}

/// `\p{Z}`: space, line and paragraph separators (not tabs or newlines, which are `Cc`).
fn is_unicode_space_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
    )
}

/// Replace every character outside the name charset with `-`, collapse runs of `-`.
fn name_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = if is_name_char(c) { c } else { '-' };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out.trim_matches('-').to_string()
}

/// A short suffix unique to the job (8 hex digits of SHA-256 of its id): it survives every
/// truncation, so two jobs of the same run never share a session name.
pub fn job_suffix(job_id: &str) -> String {
    let h = Sha256::digest(job_id.as_bytes());
    hex::encode(&h[..4])
}

/// Join non-empty `parts` with `.`, cut to leave room for `.<suffix>`, then add the suffix.
/// All parts are ASCII after [`name_part`], so byte and char lengths agree.
fn with_suffix(parts: &[String], suffix: &str, max: usize, sep: char) -> String {
    let head: Vec<&str> = parts
        .iter()
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    let mut head = head.join(".");
    let room = max.saturating_sub(suffix.len() + 1);
    if head.len() > room {
        head.truncate(room);
        while head.ends_with(['.', '-']) {
            head.pop();
        }
    }
    if head.is_empty() {
        return format!("airlock{sep}{suffix}");
    }
    format!("{head}{sep}{suffix}")
}

/// `RoleSessionName`: `airlock.<repository>.<run_id>.<attempt>.<job suffix>`, 2–64 of
/// `[\w+=,.@-]`. Missing parts are skipped; the repository is cut first when too long.
pub fn session_name(identity: &JobIdentity, job_id: &str) -> String {
    let parts = [
        "airlock".to_string(),
        name_part(identity.repository.as_deref().unwrap_or("")),
        name_part(identity.run_id.as_deref().unwrap_or("")),
        name_part(identity.attempt.as_deref().unwrap_or("")),
    ];
    // Cut the repository, not the run id: the run id is what finds the job in the CI.
    let tail: Vec<String> = parts[2..]
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let tail_len: usize = tail.iter().map(|p| p.len() + 1).sum();
    let suffix = job_suffix(job_id);
    let room_for_repo =
        SESSION_NAME_MAX.saturating_sub("airlock.".len() + tail_len + suffix.len() + 1);
    let mut repo = parts[1].clone();
    if repo.len() > room_for_repo {
        repo.truncate(room_for_repo);
        repo = repo.trim_end_matches(['.', '-']).to_string();
    }
    let mut all = vec![parts[0].clone(), repo];
    all.extend(tail);
    with_suffix(&all, &suffix, SESSION_NAME_MAX, '.')
}

/// The agent's own web-identity session: `airlockd.<host>`, valid whatever the host name.
pub fn agent_session_name(host: &str) -> String {
    let mut host = name_part(host);
    host.truncate(SESSION_NAME_MAX - "airlockd.".len());
    let host = host.trim_end_matches(['.', '-']);
    if host.is_empty() {
        return "airlockd".to_string();
    }
    format!("airlockd.{host}")
}

/// `SourceIdentity`: `<repository>@run-<run_id>.<attempt>`, or `<repository>@job-<suffix>`
/// without a run id; same charset as session names, 2–64 characters. Unlike the session
/// name it survives role chaining, so it names the job, not the call.
pub fn source_identity(identity: &JobIdentity, job_id: &str) -> String {
    let who = identity
        .repository
        .as_deref()
        .or(identity.subject.as_deref())
        .map(name_part)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| identity.provider.as_str().to_string());
    let run = identity
        .run_id
        .as_deref()
        .map(name_part)
        .filter(|s| !s.is_empty());
    let what = match run {
        Some(run) => match identity
            .attempt
            .as_deref()
            .map(name_part)
            .filter(|s| !s.is_empty())
        {
            Some(a) => format!("run-{run}.{a}"),
            None => format!("run-{run}"),
        },
        None => format!("job-{}", job_suffix(job_id)),
    };
    let mut what = what;
    // A hostile run id cannot push the name past the limit or squeeze the repository out.
    what.truncate(SOURCE_IDENTITY_MAX / 2);
    let room = SOURCE_IDENTITY_MAX - what.len() - 1;
    let mut who = who;
    who.truncate(room);
    let who = who.trim_end_matches(['.', '-']);
    let who = if who.is_empty() { "airlock" } else { who };
    // "aws:" is reserved, but ':' is not in the charset, so no value can start with it.
    format!("{who}@{what}")
}

/// Keep tag-charset characters, replace the rest with `_`, cut to `max` characters.
fn tag_text(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| if is_tag_char(c) { c } else { '_' })
        .take(max)
        .collect()
}

/// Session tags of a grant resolved against the job's identity. A field the job has no
/// value for leaves its tag out; keys are sanitised too (and `aws:` keys, which STS
/// reserves, are dropped); at most [`MAX_TAGS`].
pub fn session_tags(grant: &Grant, identity: &JobIdentity) -> Vec<(String, String)> {
    let mut tags: Vec<(String, String)> = Vec::new();
    for (key, field) in &grant.session_tags {
        let Some(value) = identity.field(field) else {
            continue;
        };
        let key = tag_text(key, TAG_KEY_MAX);
        if key.is_empty() || key.to_ascii_lowercase().starts_with("aws:") {
            continue;
        }
        // Tag keys are case-insensitive in STS: a duplicate would fail the whole call.
        if tags.iter().any(|(k, _)| k.eq_ignore_ascii_case(&key)) {
            continue;
        }
        tags.push((key, tag_text(&value, TAG_VALUE_MAX)));
        if tags.len() == MAX_TAGS {
            break;
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentitySource, Provider};
    use crate::policy::Method;

    fn ident(repo: Option<&str>, run: Option<&str>, attempt: Option<&str>) -> JobIdentity {
        JobIdentity {
            source: IdentitySource::Oidc,
            provider: Provider::Github,
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: Some("repo:acme/web:ref:refs/heads/main".into()),
            repository: repo.map(Into::into),
            owner: Some("acme".into()),
            git_ref: Some("refs/heads/main".into()),
            ref_type: Some("branch".into()),
            environment: Some("prod".into()),
            workflow: None,
            event: Some("push".into()),
            actor: Some("octocat".into()),
            run_id: run.map(Into::into),
            attempt: attempt.map(Into::into),
            job_id: None,
            runner_environment: None,
            claims: serde_json::Map::new(),
        }
    }

    fn valid_name(s: &str) -> bool {
        (2..=64).contains(&s.len()) && s.chars().all(is_name_char)
    }

    const HOSTILE: &[&str] = &[
        "",
        "a",
        "acme/web",
        "ac me/w\u{e9}b\n\r\t\0",
        "../../etc/passwd",
        "aws:foo",
        "\u{202e}evil\u{200b}",
        "😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀😀",
        "----....----",
        "x&Action=AssumeRole&RoleArn=arn:aws:iam::1:role/admin",
    ];

    #[test]
    fn session_name_reads_as_the_job() {
        let n = session_name(&ident(Some("acme/web"), Some("123"), Some("1")), "job-1");
        assert_eq!(n, format!("airlock.acme-web.123.1.{}", job_suffix("job-1")));
        assert!(valid_name(&n));
    }

    #[test]
    fn session_names_of_hostile_inputs_are_valid_and_keep_the_suffix() {
        let long = "r".repeat(300);
        let mut inputs: Vec<&str> = HOSTILE.to_vec();
        inputs.push(&long);
        for repo in &inputs {
            for run in &inputs {
                let id = ident(Some(repo), Some(run), Some(run));
                let n = session_name(&id, "j-42");
                assert!(valid_name(&n), "{n:?} from {repo:?}/{run:?}");
                assert!(n.ends_with(&job_suffix("j-42")), "{n}");
            }
        }
    }

    #[test]
    fn a_long_repository_is_cut_before_the_run_id() {
        let id = ident(Some(&"x".repeat(100)), Some("987654321"), Some("3"));
        let n = session_name(&id, "j");
        assert_eq!(n.len(), 64);
        assert!(
            n.ends_with(&format!(".987654321.3.{}", job_suffix("j"))),
            "{n}"
        );
    }

    #[test]
    fn two_jobs_of_one_run_get_different_session_names() {
        let id = ident(Some("acme/web"), Some("1"), Some("1"));
        assert_ne!(session_name(&id, "job-a"), session_name(&id, "job-b"));
    }

    #[test]
    fn agent_session_names_are_valid() {
        assert_eq!(
            agent_session_name("runner-7.example.com"),
            "airlockd.runner-7.example.com"
        );
        for h in HOSTILE {
            assert!(valid_name(&agent_session_name(h)), "{h:?}");
        }
        assert!(valid_name(&agent_session_name(&"h".repeat(200))));
    }

    #[test]
    fn source_identity_names_repo_and_run() {
        let s = source_identity(&ident(Some("acme/web"), Some("123"), Some("1")), "j");
        assert_eq!(s, "acme-web@run-123.1");
        let s = source_identity(&ident(Some("acme/web"), None, None), "j");
        assert_eq!(s, format!("acme-web@job-{}", job_suffix("j")));
    }

    #[test]
    fn source_identity_of_hostile_inputs_is_valid() {
        let long = "9".repeat(500);
        let mut inputs: Vec<&str> = HOSTILE.to_vec();
        inputs.push(&long);
        for repo in &inputs {
            for run in &inputs {
                let s = source_identity(&ident(Some(repo), Some(run), Some(run)), "j");
                assert!(valid_name(&s), "{s:?} from {repo:?}/{run:?}");
                assert!(!s.to_ascii_lowercase().starts_with("aws:"), "{s}");
            }
        }
    }

    fn grant(tags: &[(&str, &str)]) -> Grant {
        Grant {
            alias: "deploy".into(),
            default: true,
            role_arn: "arn:aws:iam::123456789012:role/web-prod-deploy".into(),
            method: Method::AssumeRole,
            duration_secs: 3600,
            session_policy: None,
            policy_arns: vec![],
            session_tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn tags_resolve_fields_and_omit_missing_ones() {
        let mut id = ident(Some("acme/web"), Some("1"), None);
        id.claims.insert("sha".into(), "abc123".into());
        let g = grant(&[
            ("repo", "repository"),
            ("env", "environment"),
            ("attempt", "attempt"),
            ("sha", "claims.sha"),
            ("nope", "claims.missing"),
        ]);
        let tags = session_tags(&g, &id);
        assert_eq!(
            tags,
            vec![
                ("repo".to_string(), "acme/web".to_string()),
                ("env".to_string(), "prod".to_string()),
                ("sha".to_string(), "abc123".to_string()),
            ]
        );
    }

    #[test]
    fn hostile_tag_values_are_sanitised_and_cut() {
        let mut id = ident(Some("acme/web"), None, None);
        id.claims.insert(
            "evil".into(),
            format!("a\nb\tc\"d<e>{}", "é".repeat(400)).into(),
        );
        let g = grant(&[
            ("evil", "claims.evil"),
            ("aws:PrincipalTag", "repository"),
            ("k\ney", "repository"),
        ]);
        let tags = session_tags(&g, &id);
        assert_eq!(tags.len(), 2, "{tags:?}");
        let (k, v) = &tags[0];
        assert_eq!(k, "evil");
        assert_eq!(v.chars().count(), TAG_VALUE_MAX);
        assert!(v.starts_with("a_b_c_d_e_é"), "{v}");
        assert!(v.chars().all(is_tag_char));
        assert_eq!(tags[1].0, "k_ey");
    }

    #[test]
    fn duplicate_keys_and_too_many_tags_are_dropped() {
        let pairs: Vec<(String, String)> = (0..60)
            .map(|i| (format!("k{i}"), "repository".to_string()))
            .collect();
        let mut g = grant(&[("Repo", "repository"), ("repo", "owner")]);
        let tags = session_tags(&g, &ident(Some("acme/web"), None, None));
        assert_eq!(tags, vec![("Repo".to_string(), "acme/web".to_string())]);
        g.session_tags = pairs;
        assert_eq!(
            session_tags(&g, &ident(Some("a/b"), None, None)).len(),
            MAX_TAGS
        );
    }

    #[test]
    fn tag_charset_follows_sts() {
        for c in [
            'a', 'Z', '0', 'é', '中', '٣', ' ', '\u{3000}', '_', '.', ':', '/', '=', '+', '-', '@',
        ] {
            assert!(is_tag_char(c), "{c:?}");
        }
        for c in ['\n', '\t', '\0', '"', '<', '&', '*', '#', '\u{202e}', '😀'] {
            assert!(!is_tag_char(c), "{c:?}");
        }
    }
}
