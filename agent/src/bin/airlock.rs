//! `airlock`: the operator CLI. See `airlock --help`.

use clap::{Args as ClapArgs, CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock::config::Config;
use airlock::control::{Client, ControlError, StartRequest};
use airlock::exit;
use airlock::secret::Secret;

/// Operate airlock: run jobs with job-scoped credentials, check and explain policies,
/// verify and query the audit log.
#[derive(Debug, Parser)]
#[command(name = "airlock", version = airlock::cli::VERSION, propagate_version = true)]
struct Cli {
    /// Agent configuration (for the socket, policy and audit paths). A flag only, never an
    /// environment variable: the CI integrations run with variables a pipeline sets.
    #[arg(long, short, global = true, default_value = airlock::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Control socket of airlockd (default: from the configuration). A flag only.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command as a job: start the job, run CMD with the job's credential
    /// environment, end the job when CMD exits, exit with CMD's status.
    Run {
        #[command(flatten)]
        id: IdentityArgs,
        /// Name of the runner (shown in the audit log).
        #[arg(long)]
        runner: Option<String>,
        /// End the job (and its credentials) after this long even if CMD still runs,
        /// e.g. "30m" (at most the agent's [jobs] max_lifetime).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_lifetime: Option<std::time::Duration>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Start, end and list jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Check and explain policies; suggest egress allowlists from the audit log.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Verify and query the audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Sandbox slots a wipe left something behind in (they take no job until cleared).
    #[command(subcommand)]
    Slot(SlotCmd),
    /// Stop or upgrade without ending jobs: airlockd takes no new job (a start is refused,
    /// 503 Draining), the running ones keep their credentials; wait until none is left
    /// (0) or the timeout passes (75, naming the jobs left). Root only; see
    /// docs/operations.md, "Draining and upgrades".
    Drain(airlock::drain::DrainArgs),
    /// GitHub Actions: the runner's job hooks and the ephemeral runner supervisor.
    #[command(subcommand)]
    Github(airlock::github::GithubCmd),
    /// GitLab custom executor driver (config_exec, prepare_exec, run_exec, cleanup_exec);
    /// see docs/gitlab.md.
    #[command(subcommand)]
    Gitlab(airlock::gitlab::GitlabCmd),
    /// Buildkite agent hooks (environment, command, pre-exit): each step's command runs in
    /// a sandbox with the job's credentials; see docs/buildkite.md.
    #[command(subcommand)]
    Buildkite(airlock::buildkite::BuildkiteCmd),
}

#[derive(Debug, Subcommand)]
enum SlotCmd {
    /// List tainted slots and what their wipe left.
    List,
    /// Clear a tainted slot after dealing with what was left; it takes jobs again.
    Clear { slot: u32 },
}

#[derive(Debug, ClapArgs)]
#[group(multiple = false)]
struct IdentityArgs {
    /// File holding the job's CI OIDC token.
    #[arg(long)]
    oidc_token_file: Option<PathBuf>,
    /// File holding runner-attested claims (JSON object with a "provider" key); weaker than a
    /// token, accepted only where a policy sets require_oidc = false.
    #[arg(long)]
    claims_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Start a job; prints its id, endpoint, token and environment as JSON.
    Start {
        #[command(flatten)]
        id: IdentityArgs,
        /// Name of the runner (shown in the audit log).
        #[arg(long)]
        runner: Option<String>,
        /// Start without an identity; bind it later with `airlock job bind`.
        #[arg(long)]
        bind_later: bool,
        /// End the job after this long, e.g. "30m" (at most the agent's [jobs] max_lifetime).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_lifetime: Option<std::time::Duration>,
        /// The process the job belongs to (this command or one of its ancestors): the job
        /// ends when it exits, and a caller that is not root may act on the job only from
        /// it or below it. Default for callers that are not root: this command's parent
        /// (the shell that ran it); for root: none.
        #[arg(long)]
        owner_pid: Option<i32>,
    },
    /// Bind the identity of a job started with --bind-later (once).
    Bind {
        job_id: String,
        #[command(flatten)]
        id: IdentityArgs,
    },
    /// End a job: its token and credentials stop working at once.
    End { job_id: String },
    /// Run CMD in a started job's existing sandbox (its files, network, cgroup and
    /// credentials); exit with CMD's status (125: the sandbox could not be built).
    Exec {
        job_id: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// List the agent's jobs.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Load every policy in DIR (default: the configured directory), checked against the
    /// issuers of the agent's configuration (--config), and report errors and warnings.
    /// Exit 0 when valid, 65 otherwise, 78 when the configuration cannot be read.
    Check { dir: Option<PathBuf> },
    /// Show which rule matches a job's token or claims, which rules did not and why (first:
    /// whether the job is of the rule's one issuer), each rule's issuer and id pins, and
    /// what would be granted. No network: a token is verified only against keys in a
    /// jwks_file, or with --verify; otherwise it is explained as a what-if, and says so.
    Explain {
        #[command(flatten)]
        id: IdentityArgs,
        /// What-if: decide --claims-file's claims (a token payload) as if ISSUER (a configured
        /// issuer's URL, or a provider only one configured issuer has: github) had signed
        /// them. Nothing is verified.
        #[arg(long, value_name = "ISSUER", requires = "claims_file")]
        as_verified: Option<String>,
        /// Verify --oidc-token-file's signature, times and audience against its issuer's
        /// keys, fetching its jwks_url if the issuer has one (network).
        #[arg(long)]
        verify: bool,
        /// Exit 1 unless RULE grants the job (or, with "refused", unless it is refused).
        #[arg(long, value_name = "RULE|refused")]
        expect: Option<String>,
        /// Policy directory (default: the configured one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a table of what-if cases (CASES.toml: claims, the issuer, the expected rule or
    /// "refused", the expected grants) against the policies; one line per case. Exit 0 when
    /// every case passes, 1 when one fails, 65 on an error in a policy or in CASES.toml.
    Test {
        cases: PathBuf,
        /// Policy directory (default: the configured one).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write a [rule.egress] section from what chosen jobs did (run them with
    /// mode = "audit" first): every name and address they connected to, on its port, minus
    /// what the [egress] baseline allows. Give at least one of --repository, --workflow,
    /// --job; several must all match. Exit 65 when no job matches or the log is not an
    /// audit log.
    Suggest {
        /// Audit log to read (default: the configured one).
        #[arg(long)]
        audit: Option<PathBuf>,
        /// Policy directory whose [egress] baseline is left out (default: the configured one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Jobs of this repository (exactly, e.g. acme/web).
        #[arg(long)]
        repository: Option<String>,
        /// Jobs of this workflow: the whole value, or its file (deploy.yml) or path
        /// (.github/workflows/deploy.yml).
        #[arg(long)]
        workflow: Option<String>,
        /// This job id.
        #[arg(long)]
        job: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify the hash chain of an audit log (default: the configured one, checked against
    /// the agent's head in its state directory too). Exit 0 when intact, 65 when a record
    /// was edited, removed or reordered, or the log does not reach a head it must reach (its
    /// end was cut, or it was rewritten).
    Verify {
        file: Option<PathBuf>,
        /// A head the log must reach, kept off the host (a remote syslog's
        /// AIRLOCK_AUDIT_SEQ and AIRLOCK_AUDIT_HASH): SEQ:HASH. Repeatable.
        #[arg(long, value_name = "SEQ:HASH")]
        head: Vec<String>,
        /// Also check against the newest anchor of this log in the journal (journalctl).
        #[arg(long)]
        journal: bool,
        /// The journald namespace the anchors went to (with --journal).
        #[arg(long, value_name = "NAMESPACE", requires = "journal")]
        journal_namespace: Option<String>,
    },
    /// Accept the audit log as it is although it does not continue the agent's last head
    /// (after finding out why it was cut or replaced). The log must verify; the acceptance,
    /// with both heads, your reason and uid, is appended and becomes the new head. The agent
    /// must be stopped.
    AcceptHead {
        /// Why (recorded in the log).
        #[arg(long)]
        reason: String,
    },
    /// Print matching audit records as JSON lines.
    Query {
        #[arg(long)]
        file: Option<PathBuf>,
        /// Repository (exact, or a substring).
        #[arg(long)]
        repository: Option<String>,
        /// Role ARN, role name or grant alias.
        #[arg(long)]
        role: Option<String>,
        /// Job id.
        #[arg(long)]
        job: Option<String>,
        /// Event name (job_started, credentials_issued, ...).
        #[arg(long)]
        event: Option<String>,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only records at or before this RFC 3339 time.
        #[arg(long)]
        until: Option<String>,
    },
}

/// An error with its sysexits code.
struct Fail(i32, String);

impl<E: std::fmt::Display> From<(i32, E)> for Fail {
    fn from((c, e): (i32, E)) -> Self {
        Fail(c, e.to_string())
    }
}

fn control_fail(e: ControlError) -> Fail {
    let code = match &e {
        ControlError::Connect(..) => exit::UNAVAILABLE,
        ControlError::Refused {
            status: 401 | 403, ..
        } => exit::NOPERM,
        ControlError::Refused { status: 404, .. } => exit::NOINPUT,
        ControlError::Refused {
            status: 400..=499, ..
        } => exit::DATAERR,
        ControlError::Refused { .. } => exit::UNAVAILABLE,
        _ => exit::SOFTWARE,
    };
    Fail(code, e.to_string())
}

fn main() -> ExitCode {
    if let Some(code) = airlock::cli::generate_if_asked(Cli::command(), "1") {
        return code;
    }
    let cli = match airlock::cli::parse::<Cli>() {
        Ok(c) => c,
        Err(code) => return code,
    };
    airlock::logging::init(airlock::logging::LogFormat::Plain);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("airlock: cannot start: {e}");
            return ExitCode::from(exit::OSERR as u8);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(Fail(code, msg)) => {
            eprintln!("airlock: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

/// The configuration, or the defaults when the default file does not exist.
fn config(path: &Path) -> Result<Config, Fail> {
    if !path.exists() && path == Path::new(airlock::config::DEFAULT_PATH) {
        return Config::parse(path, "").map_err(|e| Fail(exit::CONFIG, e.to_string()));
    }
    Config::load(path).map_err(|e| Fail(exit::CONFIG, e.to_string()))
}

/// The agent's configuration, for the `policy` commands: every rule must name one of its
/// `[[issuer]]`s, so policies cannot be checked without it (no empty default here).
fn policy_config(path: &Path) -> Result<Config, Fail> {
    Config::load(path).map_err(|e| {
        Fail(
            exit::CONFIG,
            format!(
                "{e}; policies are checked against the issuers the agent trusts ([[issuer]] in its \
                 configuration), so give the agent's airlock.toml with --config"
            ),
        )
    })
}

/// The policies of `dir`, checked against the issuers of `cfg` (read from `cfg_path`). Every
/// error is reported, one per line, with their count.
fn load_policies(
    cfg: &Config,
    cfg_path: &Path,
    dir: &Path,
) -> Result<airlock::policy::PolicySet, Fail> {
    let issuers = airlock::policy::TrustedIssuer::from_config(&cfg.issuers);
    airlock::policy::load_dir_configured(dir, &issuers, Some(cfg_path)).map_err(|e| {
        let errors = e.errors();
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Fail(
            exit::DATAERR,
            if lines.len() == 1 {
                lines.join("")
            } else {
                format!(
                    "{} errors in {}:\n{}",
                    lines.len(),
                    dir.display(),
                    lines.join("\n")
                )
            },
        )
    })
}

fn read_input(path: &Path, what: &str) -> Result<String, Fail> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Fail(
            exit::NOINPUT,
            format!("cannot read {what} {}: {e}", path.display()),
        )
    })?;
    if meta.len() > 64 * 1024 {
        return Err(Fail(
            exit::DATAERR,
            format!("{what} {} is larger than 64 KiB", path.display()),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| {
        Fail(
            exit::NOINPUT,
            format!("cannot read {what} {}: {e}", path.display()),
        )
    })
}

type Claims = serde_json::Map<String, serde_json::Value>;

fn identity_input(id: &IdentityArgs) -> Result<(Option<Secret<String>>, Option<Claims>), Fail> {
    if let Some(p) = &id.oidc_token_file {
        let t = read_input(p, "token file")?;
        let t = t.trim();
        if t.is_empty() {
            return Err(Fail(
                exit::DATAERR,
                format!("token file {} is empty", p.display()),
            ));
        }
        return Ok((Some(Secret::new(t.to_string())), None));
    }
    if let Some(p) = &id.claims_file {
        let text = read_input(p, "claims file")?;
        let claims: Claims = serde_json::from_str(&text).map_err(|e| {
            Fail(
                exit::DATAERR,
                format!("claims file {} is not a JSON object: {e}", p.display()),
            )
        })?;
        return Ok((None, Some(claims)));
    }
    Ok((None, None))
}

async fn run(cli: Cli) -> Result<i32, Fail> {
    let socket = |cli_socket: &Option<PathBuf>, cfg_path: &Path| -> Result<Client, Fail> {
        Ok(Client::new(match cli_socket {
            Some(s) => s.clone(),
            None => config(cfg_path)?.agent.control_socket,
        }))
    };
    match cli.cmd {
        Cmd::Github(cmd) => Ok(airlock::github::run_cli(cmd, cli.socket, &cli.config).await),
        Cmd::Run {
            id,
            runner,
            max_lifetime,
            cmd,
        } => {
            let (oidc_token, claims) = identity_input(&id)?;
            if oidc_token.is_none() && claims.is_none() {
                return Err(Fail(
                    exit::USAGE,
                    "give --oidc-token-file or --claims-file".into(),
                ));
            }
            let client = socket(&cli.socket, &cli.config)?;
            run_job(
                &client,
                StartRequest {
                    oidc_token,
                    claims,
                    runner,
                    max_lifetime_secs: max_lifetime.map(|d| d.as_secs()),
                    command: Some(airlock::control::JobCommand {
                        argv: cmd.clone(),
                        env: std::env::vars().collect(),
                    }),
                    // The job is this command's: it ends if airlock is killed.
                    owner_pid: Some(std::process::id() as i32),
                    ..Default::default()
                },
                &cmd,
            )
            .await
        }
        Cmd::Job(JobCmd::Start {
            id,
            runner,
            bind_later,
            max_lifetime,
            owner_pid,
        }) => {
            let owner_pid = owner_pid.or_else(|| {
                (!nix::unistd::geteuid().is_root()).then(|| nix::unistd::getppid().as_raw())
            });
            let (oidc_token, claims) = identity_input(&id)?;
            if !bind_later && oidc_token.is_none() && claims.is_none() {
                return Err(Fail(
                    exit::USAGE,
                    "give --oidc-token-file, --claims-file or --bind-later".into(),
                ));
            }
            let client = socket(&cli.socket, &cli.config)?;
            let resp = client
                .start(&StartRequest {
                    oidc_token,
                    claims,
                    runner,
                    bind_later,
                    max_lifetime_secs: max_lifetime.map(|d| d.as_secs()),
                    command: None,
                    owner_pid,
                    ..Default::default()
                })
                .await
                .map_err(control_fail)?;
            print_json(&resp)
        }
        Cmd::Job(JobCmd::Bind { job_id, id }) => {
            let (oidc_token, claims) = identity_input(&id)?;
            let client = socket(&cli.socket, &cli.config)?;
            let resp = client
                .bind(
                    &job_id,
                    &airlock::control::BindRequest { oidc_token, claims },
                )
                .await
                .map_err(control_fail)?;
            print_json(&resp)
        }
        Cmd::Job(JobCmd::End { job_id }) => {
            let client = socket(&cli.socket, &cli.config)?;
            client.end(&job_id).await.map_err(control_fail)?;
            println!("job {job_id} ended");
            Ok(exit::OK)
        }
        Cmd::Job(JobCmd::Exec { job_id, cmd }) => {
            let client = socket(&cli.socket, &cli.config)?;
            let x = client
                .exec(
                    &job_id,
                    &airlock::control::JobCommand {
                        argv: cmd.clone(),
                        env: std::env::vars().collect(),
                    },
                )
                .await
                .map_err(control_fail)?;
            let status = airlock::shim_run::run(
                &client,
                &job_id,
                &x.sandbox,
                airlock::shim_run::Input::Inherit,
            )
            .await
            .map_err(|e| Fail(exit::UNAVAILABLE, format!("cannot run {}: {e}", cmd[0])))?;
            Ok(status.code)
        }
        Cmd::Gitlab(cmd) => Ok(airlock::gitlab::run_cli(cmd, cli.socket, &cli.config).await),
        Cmd::Buildkite(cmd) => Ok(airlock::buildkite::run_cli(cmd, cli.socket, &cli.config).await),
        Cmd::Job(JobCmd::List { json }) => {
            let client = socket(&cli.socket, &cli.config)?;
            let jobs = client.list().await.map_err(control_fail)?;
            if json {
                return print_json(&jobs);
            } else {
                println!(
                    "{:<18}  {:<20}  {:<22}  {:<24}  IDENTITY",
                    "JOB", "CREATED", "RULE", "GRANTS"
                );
                for j in jobs {
                    let grants = if j.grants.is_empty() {
                        "-".to_string()
                    } else {
                        j.grants.join(",")
                    };
                    println!(
                        "{:<18}  {:<20}  {:<22}  {:<24}  {}",
                        j.job_id,
                        j.created,
                        j.rule.as_deref().unwrap_or("-"),
                        grants,
                        j.identity.as_deref().unwrap_or("(not bound)")
                    );
                }
            }
            Ok(exit::OK)
        }
        Cmd::Slot(SlotCmd::List) => {
            let client = socket(&cli.socket, &cli.config)?;
            let slots = client.tainted().await.map_err(control_fail)?;
            if slots.is_empty() {
                println!("no tainted slots");
            }
            for s in slots {
                println!("slot {}: {}", s.slot, s.why);
            }
            Ok(exit::OK)
        }
        Cmd::Drain(args) => {
            let client = socket(&cli.socket, &cli.config)?;
            airlock::drain::run(args, &client)
                .await
                .map_err(|(code, msg)| Fail(code, msg))
        }
        Cmd::Slot(SlotCmd::Clear { slot }) => {
            let client = socket(&cli.socket, &cli.config)?;
            client.clear_slot(slot).await.map_err(control_fail)?;
            println!("slot {slot} cleared");
            Ok(exit::OK)
        }
        Cmd::Policy(PolicyCmd::Check { dir }) => {
            let cfg = policy_config(&cli.config)?;
            let dir = dir.unwrap_or(cfg.policy.dir.clone());
            let p = load_policies(&cfg, &cli.config, &dir)?;
            let issuers: Vec<String> = airlock::policy::TrustedIssuer::from_config(&cfg.issuers)
                .iter()
                .map(ToString::to_string)
                .collect();
            println!(
                "issuers of {}: {}",
                cli.config.display(),
                if issuers.is_empty() {
                    "none".to_string()
                } else {
                    issuers.join(", ")
                }
            );
            for w in p.warnings() {
                println!("warning: {w}");
            }
            // Own credentials that are a session make every AssumeRole a role chain.
            use airlock::config::CredentialsKind;
            let chained = match cfg.credentials.source {
                CredentialsKind::Imds => Some("source = \"imds\""),
                CredentialsKind::WebIdentity => Some("source = \"web-identity\""),
                CredentialsKind::Env | CredentialsKind::None => None,
            };
            if let Some(source) = chained {
                let cap = airlock::broker::CHAINED_MAX_DURATION_SECS;
                for w in p.chained_session_warnings(cap, source) {
                    println!("warning: {w}");
                }
            }
            println!("{}: {} rule(s), valid", dir.display(), p.len());
            Ok(exit::OK)
        }
        Cmd::Policy(PolicyCmd::Explain {
            id,
            as_verified,
            verify,
            expect,
            dir,
            json,
        }) => {
            let how = ExplainHow {
                as_verified,
                verify,
                expect,
                json,
            };
            explain(&cli.config, id, dir, how).await
        }
        Cmd::Policy(PolicyCmd::Test { cases, dir }) => policy_test(&cli.config, &cases, dir),
        Cmd::Policy(PolicyCmd::Suggest {
            audit,
            dir,
            repository,
            workflow,
            job,
        }) => {
            let selector = airlock::policy::suggest::JobSelector {
                repository,
                workflow,
                job,
            };
            suggest(&cli.config, audit, dir, &selector)
        }
        Cmd::Audit(AuditCmd::Verify {
            file,
            head,
            journal,
            journal_namespace,
        }) => verify_audit(&cli.config, file, head, journal, journal_namespace),
        Cmd::Audit(AuditCmd::AcceptHead { reason }) => {
            let cfg = config(&cli.config)?;
            let opts = airlock::audit::AuditOptions::from_config(&cfg);
            let path = cfg.audit.path.clone();
            let uid = nix::unistd::getuid().as_raw();
            let done = tokio::task::spawn_blocking(move || {
                airlock::audit::head::accept(&path, opts, &reason, uid)
            })
            .await
            .map_err(|e| Fail(exit::SOFTWARE, e.to_string()))?;
            use airlock::audit::{head::HeadError, AuditError};
            let a = done.map_err(|e| match &e {
                AuditError::Locked(_) => Fail(exit::TEMPFAIL, e.to_string()),
                AuditError::Head(HeadError::NotIntact { .. }) => Fail(exit::DATAERR, e.to_string()),
                _ => Fail(exit::CANTCREAT, e.to_string()),
            })?;
            let prev = a
                .previous
                .map_or_else(|| "none".to_string(), |h| h.to_string());
            println!(
                "{}: accepted as it is (its head: {}; the agent's head was: {prev}); recorded as audit_head_accepted, seq {}, the new head",
                cfg.audit.path.display(),
                a.log_head,
                a.seq
            );
            Ok(exit::OK)
        }
        Cmd::Audit(AuditCmd::Query {
            file,
            repository,
            role,
            job,
            event,
            since,
            until,
        }) => {
            let file = match file {
                Some(f) => f,
                None => config(&cli.config)?.audit.path,
            };
            let time = |s: Option<String>,
                        what: &str|
             -> Result<Option<time::OffsetDateTime>, Fail> {
                s.map(|s| {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| Fail(exit::USAGE, format!("--{what} {s:?} is not an RFC 3339 time (e.g. 2026-11-26T09:00:00Z): {e}")))
                })
                .transpose()
            };
            let filter = airlock::audit::Filter {
                repository,
                role,
                job,
                event,
                since: time(since, "since")?,
                until: time(until, "until")?,
            };
            let recs = airlock::audit::query(&file, &filter)
                .map_err(|e| Fail(exit::NOINPUT, e.to_string()))?;
            for r in recs {
                println!("{}", serde_json::Value::Object(r));
            }
            Ok(exit::OK)
        }
    }
}

/// `airlock audit verify`: the chain, then every head the log must reach.
fn verify_audit(
    cfg_path: &Path,
    file: Option<PathBuf>,
    heads: Vec<String>,
    journal: bool,
    namespace: Option<String>,
) -> Result<i32, Fail> {
    use airlock::audit::head::{self, Head};
    // The configured log is checked against the agent's own head too.
    let (file, head_file) = match file {
        Some(f) => (f, None),
        None => {
            let cfg = config(cfg_path)?;
            let hf = cfg.agent.state_dir.join(airlock::audit::HEAD_FILE);
            (cfg.audit.path, Some(hf))
        }
    };
    // Heads are read before the log: a running agent appends meanwhile, and a head read
    // after the log could be ahead of what was verified.
    let mut checks: Vec<(String, Head)> = Vec::new();
    for h in heads {
        let h: Head = h
            .parse()
            .map_err(|e| Fail(exit::USAGE, format!("--head: {e}")))?;
        checks.push(("the given head".into(), h));
    }
    if let Some(hf) = head_file {
        match head::read_head_file(&hf) {
            Ok(Some(h)) => checks.push((format!("the agent's head ({})", hf.display()), h)),
            Ok(None) => {}
            Err(e) => return Err(Fail(exit::DATAERR, e.to_string())),
        }
    }
    if journal {
        let log = std::path::absolute(&file).unwrap_or_else(|_| file.clone());
        match head::journal_head(&log, namespace.as_deref()) {
            Ok(Some(h)) => checks.push(("the journal's newest anchor".into(), h)),
            Ok(None) => {
                return Err(Fail(
                    exit::NOINPUT,
                    format!(
                        "the journal has no anchor of {} (AIRLOCK_AUDIT_LOG={}){}",
                        file.display(),
                        log.display(),
                        namespace.map_or(String::new(), |n| format!(" in namespace {n}"))
                    ),
                ))
            }
            Err(e) => return Err(Fail(exit::UNAVAILABLE, e)),
        }
    }
    let report = match airlock::audit::verify(&file) {
        Ok(r) => r,
        Err(e @ airlock::audit::VerifyError::Read(..)) => {
            return Err(Fail(exit::NOINPUT, e.to_string()))
        }
        Err(e) => {
            return Err(Fail(
                exit::DATAERR,
                format!("{}: chain broken at {e}", file.display()),
            ))
        }
    };
    let log_head = Head {
        seq: report.records,
        hash: report.last_hash.clone(),
    };
    let mut broken = Vec::new();
    for (what, h) in &checks {
        if let Err(detail) = head::check_against(&file, &report, h) {
            broken.push(format!(
                "{}: does not reach {what}, {h}: {detail} (the log's head: {log_head})",
                file.display()
            ));
        }
    }
    if !broken.is_empty() {
        return Err(Fail(exit::DATAERR, broken.join("\n")));
    }
    println!(
        "{}: {} record(s), chain intact, last hash {}",
        file.display(),
        report.records,
        report.last_hash
    );
    for (what, h) in &checks {
        println!("reaches {what}: {h}");
    }
    Ok(exit::OK)
}

/// How `policy explain` evaluates and reports.
struct ExplainHow {
    as_verified: Option<String>,
    verify: bool,
    expect: Option<String>,
    json: bool,
}

/// How an explained identity was established: verified, or a what-if and why.
enum Basis {
    Verified,
    WhatIf(String),
}

async fn explain(
    cfg_path: &Path,
    id: IdentityArgs,
    dir: Option<PathBuf>,
    how: ExplainHow,
) -> Result<i32, Fail> {
    use airlock::policy::cases;
    if how.verify && id.oidc_token_file.is_none() {
        return Err(Fail(
            exit::USAGE,
            "--verify verifies a token: give it with --oidc-token-file (claims have no signature to verify)".into(),
        ));
    }
    let cfg = policy_config(cfg_path)?;
    let dir = dir.unwrap_or(cfg.policy.dir.clone());
    let policies = load_policies(&cfg, cfg_path, &dir)?;
    let trusted = airlock::policy::TrustedIssuer::from_config(&cfg.issuers);
    let (identity, basis) = match identity_input(&id)? {
        (Some(token), None) => explain_token(cfg_path, &cfg, &trusted, &token, how.verify).await?,
        (None, Some(claims)) => match &how.as_verified {
            Some(wanted) => {
                let iss = cases::resolve_issuer(&trusted, wanted).map_err(|e| {
                    Fail(
                        exit::USAGE,
                        format!("--as-verified: {e} (from {})", cfg_path.display()),
                    )
                })?;
                let why = format!(
                    "claims not verified: decided as if {} had signed them (--as-verified)",
                    iss.issuer
                );
                (cases::as_verified(iss, claims), Basis::WhatIf(why))
            }
            None => (
                airlock::identity::from_attested(claims)
                    .map_err(|e| Fail(exit::DATAERR, format!("attested claims refused: {e}")))?,
                Basis::Verified,
            ),
        },
        _ => {
            return Err(Fail(
                exit::USAGE,
                "give --oidc-token-file or --claims-file".into(),
            ))
        }
    };
    let ex = policies.explain(&identity, time::OffsetDateTime::now_utc());
    let expectation = how
        .expect
        .as_deref()
        .map(|e| cases::check_expect(&ex.decision, e));
    if how.json {
        let mut v = serde_json::to_value(&ex).map_err(|e| (exit::SOFTWARE, e))?;
        if let serde_json::Value::Object(m) = &mut v {
            let (what_if, why) = match &basis {
                Basis::Verified => (false, None),
                Basis::WhatIf(why) => (true, Some(why.clone())),
            };
            m.insert("what_if".into(), what_if.into());
            if let Some(why) = why {
                m.insert("what_if_reason".into(), why.into());
            }
            if let (Some(e), Some(r)) = (&how.expect, &expectation) {
                m.insert(
                    "expect".into(),
                    serde_json::json!({"expected": e, "met": r.is_ok()}),
                );
            }
        }
        print_json(&v)?;
    } else {
        if let Basis::WhatIf(why) = &basis {
            println!("WHAT-IF: {why}");
        }
        print_explanation(&identity, &ex, matches!(basis, Basis::WhatIf(_)));
    }
    match expectation {
        Some(Err(diff)) => {
            eprintln!("airlock: --expect not met: {diff}");
            Ok(exit::EXPECTATION_FAILED)
        }
        _ => Ok(exit::OK),
    }
}

/// A token's identity for `policy explain`. Verified when its issuer's keys are local
/// (jwks_file) or --verify asks for the network; otherwise decoded unverified, as a what-if
/// that says so. Never a DNS lookup unless asked.
async fn explain_token(
    cfg_path: &Path,
    cfg: &Config,
    trusted: &[airlock::policy::TrustedIssuer],
    token: &Secret<String>,
    verify: bool,
) -> Result<(airlock::identity::JobIdentity, Basis), Fail> {
    use airlock::identity::IdentityError;
    let claims = airlock::identity::oidc::unverified_claims(token.expose())
        .map_err(|e| Fail(exit::DATAERR, format!("identity token refused: {e}")))?;
    let iss = claims.get("iss").and_then(|v| v.as_str()).unwrap_or("");
    let Some(issuer) = cfg.issuers.iter().find(|i| i.issuer == iss) else {
        let configured = if trusted.is_empty() {
            "none".to_string()
        } else {
            trusted
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let shown: String = iss.chars().take(200).collect();
        return Err(Fail(
            exit::DATAERR,
            format!(
                "identity token refused: its issuer {shown:?} is not configured in {} (configured: {configured}), \
                 so no token of it can be verified and no rule can match it; add an [[issuer]] with this exact \
                 issuer to {} to trust it, or use --claims-file with --as-verified for a what-if",
                cfg_path.display(),
                cfg_path.display()
            ),
        ));
    };
    if !verify && issuer.jwks_file.is_none() {
        let t = trusted
            .iter()
            .find(|t| t.issuer == iss)
            .ok_or_else(|| Fail(exit::SOFTWARE, "configured issuer not trusted".into()))?;
        let why = format!(
            "token not verified: its signature, times and audience were not checked, since {} would \
             be fetched over the network (give --verify to fetch the keys and verify it); decided as if {} had signed it",
            issuer.jwks_url.as_deref().map_or_else(
                || format!("the keys of {iss} (its OIDC discovery document)"),
                |u| format!("its keys at {u}")
            ),
            t.issuer
        );
        return Ok((
            airlock::policy::cases::as_verified(t, claims),
            Basis::WhatIf(why),
        ));
    }
    // The keys are fetched as the agent would: through its proxy, if it has one.
    let proxy = cfg
        .agent
        .proxy_settings(|k| std::env::var(k).ok())
        .map_err(|e| Fail(exit::CONFIG, format!("proxy: {e}")))?;
    let http =
        airlock::http_client::HttpClient::with_proxy(&proxy).map_err(|e| (exit::SOFTWARE, e))?;
    let v = airlock::identity::Verifier::new(&cfg.issuers, http).map_err(|e| (exit::CONFIG, e))?;
    let id = v.verify(token.expose()).await.map_err(|e| match e {
        IdentityError::UnknownIssuer(_) => Fail(
            exit::DATAERR,
            format!("identity token refused: {e} ({})", cfg_path.display()),
        ),
        e => Fail(exit::DATAERR, format!("identity token refused: {e}")),
    })?;
    Ok((id, Basis::Verified))
}

fn print_explanation(
    identity: &airlock::identity::JobIdentity,
    ex: &airlock::policy::Explanation,
    what_if: bool,
) {
    let from = match identity.source {
        airlock::identity::IdentitySource::Oidc if what_if => {
            format!(
                "what-if: unverified claims as if from a token of {}",
                identity.issuer
            )
        }
        airlock::identity::IdentitySource::Oidc => format!("token of {}", identity.issuer),
        airlock::identity::IdentitySource::Attested => {
            format!("runner-attested {} claims", identity.provider)
        }
    };
    println!("identity: {} ({from})", identity.summary());
    for v in &ex.rules {
        let mark = if v.matched { "MATCH" } else { "no   " };
        println!("  {mark} {} ({})", v.rule, v.origin);
        let attested = if v.require_oidc || v.scope.issuer.is_none() {
            String::new()
        } else {
            format!("; and runner-attested {} claims", v.scope.provider)
        };
        println!(
            "        trusts: {}, by {}{attested}",
            v.scope, v.scope.written
        );
        if !v.id_pins.is_empty() {
            println!("        id pins: {}", v.id_pins.join(", "));
        }
        for r in &v.reasons {
            println!("        {r}");
        }
    }
    let d = &ex.decision;
    match (&d.refused, &d.rule) {
        (Some(why), _) => println!("decision: refused: {why}"),
        (None, Some(rule)) => {
            println!("decision: rule {rule} grants:");
            for g in &d.grants {
                println!(
                    "  {}{}: {} via {:?}, {} s{}",
                    g.alias,
                    if g.default { " (default)" } else { "" },
                    g.role_arn,
                    g.method,
                    g.duration_secs,
                    if g.session_policy.is_some() {
                        ", with a session policy"
                    } else {
                        ""
                    }
                );
            }
            for f in &d.flags {
                println!("  flag: {f}");
            }
        }
        (None, None) => println!("decision: nothing granted"),
    }
    if let Some(s) = &ex.sandbox {
        println!("  sandbox: {s}");
    }
    if let Some(e) = &ex.egress {
        if e.allow.is_empty() {
            println!("  egress: mode {}, nothing allowed", e.mode);
        } else {
            println!("  egress: mode {}, allow:", e.mode);
        }
        for a in &e.allow {
            let from = if a.baseline { " (baseline)" } else { "" };
            println!("    {a}{from}");
        }
    }
}

/// `airlock policy test CASES.toml`: every case's decision against what it expects.
fn policy_test(cfg_path: &Path, cases_path: &Path, dir: Option<PathBuf>) -> Result<i32, Fail> {
    use airlock::policy::cases;
    let cfg = policy_config(cfg_path)?;
    let dir = dir.unwrap_or(cfg.policy.dir.clone());
    let policies = load_policies(&cfg, cfg_path, &dir)?;
    let trusted = airlock::policy::TrustedIssuer::from_config(&cfg.issuers);
    let text = std::fs::read_to_string(cases_path).map_err(|e| {
        Fail(
            exit::NOINPUT,
            format!("cannot read the cases file {}: {e}", cases_path.display()),
        )
    })?;
    let list = cases::parse_cases(cases_path, &text, &trusted).map_err(|errors| {
        Fail(
            exit::DATAERR,
            format!(
                "{} error(s) in the cases file:\n{}",
                errors.len(),
                errors.join("\n")
            ),
        )
    })?;
    println!(
        "WHAT-IF: {} case(s) of {}, decided against {} as if their issuers had signed the claims (nothing is verified)",
        list.len(),
        cases_path.display(),
        dir.display()
    );
    let results = cases::run_cases(&policies, &list, time::OffsetDateTime::now_utc());
    let mut failed = 0;
    for r in &results {
        match &r.outcome {
            Ok(got) => println!("ok    {}: {got}", r.case.name),
            Err(diffs) => {
                failed += 1;
                println!("FAIL  {} ({})", r.case.name, r.case.origin);
                for d in diffs {
                    println!("        {d}");
                }
            }
        }
    }
    println!(
        "{} case(s): {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    Ok(if failed == 0 {
        exit::OK
    } else {
        exit::EXPECTATION_FAILED
    })
}

/// `airlock policy suggest`: the selected jobs' egress from the audit log, as a section to
/// paste into their rule.
fn suggest(
    cfg_path: &Path,
    audit: Option<PathBuf>,
    dir: Option<PathBuf>,
    selector: &airlock::policy::suggest::JobSelector,
) -> Result<i32, Fail> {
    use airlock::policy::suggest::SuggestError;
    if selector.is_empty() {
        return Err(Fail(
            exit::USAGE,
            "choose the jobs to learn from with --repository, --workflow and/or --job".into(),
        ));
    }
    let cfg = policy_config(cfg_path)?;
    let audit = audit.unwrap_or(cfg.audit.path.clone());
    let dir = dir.unwrap_or(cfg.policy.dir.clone());
    let policies = load_policies(&cfg, cfg_path, &dir)?;
    let file = std::fs::File::open(&audit).map_err(|e| {
        Fail(
            exit::NOINPUT,
            format!("cannot read the audit log {}: {e}", audit.display()),
        )
    })?;
    let suggestion = airlock::policy::suggest::suggest(
        std::io::BufReader::new(file),
        selector,
        policies.baseline(),
    )
    .map_err(|e| {
        let code = match e {
            SuggestError::Read(_) => exit::IOERR,
            SuggestError::Parse { .. } | SuggestError::NoJob(_) => exit::DATAERR,
        };
        Fail(code, format!("{}: {e}", audit.display()))
    })?;
    print!("{suggestion}");
    Ok(exit::OK)
}

fn print_json(v: &impl serde::Serialize) -> Result<i32, Fail> {
    let text = serde_json::to_string_pretty(v).map_err(|e| (exit::SOFTWARE, e))?;
    println!("{text}");
    Ok(exit::OK)
}

/// Start a job, run CMD in it, end it, return CMD's exit code.
async fn run_job(client: &Client, req: StartRequest, cmd: &[String]) -> Result<i32, Fail> {
    let job = client.start(&req).await.map_err(control_fail)?;
    match &job.refused {
        Some(why) => eprintln!("airlock: job {} gets no credentials: {why}", job.job_id),
        None => eprintln!(
            "airlock: job {} (rule {}; roles {})",
            job.job_id,
            job.rule.as_deref().unwrap_or("-"),
            job.grants.join(", ")
        ),
    }
    // The agent built the sandbox and wrote the spec: it runs CMD inside with this process's
    // descriptors and a clean environment of its own making.
    if let Some(sb) = &job.sandbox {
        let status =
            airlock::shim_run::run(client, &job.job_id, sb, airlock::shim_run::Input::Inherit)
                .await;
        let ended = client.end(&job.job_id).await;
        if let Err(e) = &ended {
            eprintln!("airlock: warning: could not end job {}: {e}", job.job_id);
        }
        return status
            .map(|s| s.code)
            .map_err(|e| Fail(exit::UNAVAILABLE, format!("cannot run {}: {e}", cmd[0])));
    }
    let mut command = tokio::process::Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // The host's own credentials must not reach the job, nor win over the job's in the
    // SDKs' provider chains.
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_EC2_METADATA_DISABLED",
    ] {
        command.env_remove(var);
    }
    command.envs(job.env.expose());
    let status = match command.spawn() {
        Ok(mut child) => {
            use nix::sys::signal::{kill, Signal};
            use tokio::signal::unix::{signal, SignalKind};
            let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
            let forward = |sig: Signal| {
                if let Some(pid) = pid {
                    let _ = kill(pid, sig);
                }
            };
            let (Ok(mut sint), Ok(mut sterm), Ok(mut shup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                let _ = child.start_kill();
                let _ = client.end(&job.job_id).await;
                return Err(Fail(exit::OSERR, "cannot install signal handlers".into()));
            };
            // airlock stays until the command ends so that the job is always ended.
            loop {
                tokio::select! {
                    st = child.wait() => break st.map_err(|e| Fail(exit::OSERR, format!("waiting for {}: {e}", cmd[0]))),
                    _ = sint.recv() => forward(Signal::SIGINT),
                    _ = sterm.recv() => forward(Signal::SIGTERM),
                    _ = shup.recv() => forward(Signal::SIGHUP),
                }
            }
        }
        Err(e) => Err(Fail(exit::NOINPUT, format!("cannot run {}: {e}", cmd[0]))),
    };
    let ended = client.end(&job.job_id).await;
    if let Err(e) = &ended {
        eprintln!("airlock: warning: could not end job {}: {e}", job.job_id);
    }
    Ok(airlock::shim_run::exit_code(status?))
}
