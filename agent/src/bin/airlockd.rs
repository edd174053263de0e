//! `airlockd`: the airlock agent daemon (root). See `airlockd --help`.

use clap::CommandFactory;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use airlock::audit::{AuditError, AuditLog, AuditOptions};
use airlock::broker::Broker;
use airlock::config::Config;
use airlock::daemon::{Control, Daemon};
use airlock::exit;
use airlock::http_client::HttpClient;
use airlock::identity::Verifier;
use airlock::logging::{self, LogFormat};
use airlock::metrics::Metrics;
use airlock::proxy::ProxySettings;

/// The airlock agent: job-scoped cloud credentials for self-hosted CI runners.
///
/// Verifies each job's CI identity, decides from the policies what it may have, mints
/// short-lived AWS credentials for that job alone and serves them on the job's own
/// endpoint. Every decision goes to the hash-chained audit log.
#[derive(Debug, clap::Parser)]
#[command(name = "airlockd", version = airlock::cli::VERSION, after_help = SIGNALS)]
struct Args {
    /// Configuration file.
    #[arg(long, short, env = "AIRLOCK_CONFIG", default_value = airlock::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log format: plain (for journald) or json.
    #[arg(long, value_enum, default_value = "plain")]
    log_format: LogFormat,
    /// Check the configuration and the policies, print the result and exit
    /// (0: good, 78: configuration error, 65: policy error).
    #[arg(long)]
    check: bool,
}

/// What the signals do (`airlockd --help`); docs/operations.md says the same.
const SIGNALS: &str = "\
Signals:
  SIGHUP           reload the policies; a bad policy keeps the old ones (logged, audited
                   policy_reload_failed); a running sandboxed job keeps the network and
                   egress allowlist it started with.
  SIGTERM, SIGINT  stop now: every sandboxed job is ended and wiped first (its processes
                   killed, its files, network and credentials gone); an unsandboxed job
                   keeps its record, and a restart serves it again. To stop or upgrade
                   without ending jobs, run `airlock drain` first: it refuses new jobs and
                   waits for the running ones (with --stop the agent then exits 0 itself).";

fn fail(code: i32, msg: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{msg}");
    eprintln!("airlockd: {msg}");
    ExitCode::from(code as u8)
}

/// The audiences the runner integrations will request, checked against the trusted
/// issuers; with the GitHub supervisor's `audience` when its file is beside this one
/// (airlockd reads nothing else of that file).
fn check_audiences(cfg: &Config, config: &std::path::Path) -> airlock::audience::Findings {
    let answer = airlock::audience::IssuersAnswer::from_config(cfg);
    let runners = config
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(RUNNERS_FILE);
    let mut warnings = Vec::new();
    let supervisor = match std::fs::read_to_string(&runners) {
        Err(_) => None,
        Ok(text) => match text.parse::<toml::Table>() {
            Ok(t) => t
                .get("github")
                .and_then(|g| g.get("audience"))
                .and_then(|a| a.as_str())
                .map(String::from),
            Err(e) => {
                warnings.push(format!(
                    "{}: not checked, it does not parse: {}",
                    runners.display(),
                    e.message()
                ));
                None
            }
        },
    };
    let mut f = airlock::audience::check(
        &answer,
        supervisor.as_deref().map(|a| (a, runners.as_path())),
    );
    f.warnings.extend(warnings);
    f
}

/// The GitHub supervisor's file, looked for beside airlockd's (`/etc/airlock/`).
const RUNNERS_FILE: &str = "github-runners.toml";

fn main() -> ExitCode {
    // An administrator's program: its page goes to section 8.
    if let Some(code) = airlock::cli::generate_if_asked(Args::command(), "8") {
        return code;
    }
    let args = match airlock::cli::parse::<Args>() {
        Ok(a) => a,
        Err(code) => return code,
    };
    logging::init(args.log_format);
    if args.check {
        return check(&args);
    }
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(exit::CONFIG, e),
    };
    // Rules are checked against the issuers this agent trusts: each must name exactly one.
    let issuers = airlock::policy::TrustedIssuer::from_config(&cfg.issuers);
    let policies =
        match airlock::policy::load_dir_configured(&cfg.policy.dir, &issuers, Some(&args.config)) {
            Ok(p) => p,
            Err(e) => return fail(exit::DATAERR, format!("policy error, not starting: {e}")),
        };
    for w in policies.warnings() {
        tracing::warn!("policy: {w}");
    }
    // Running: a hook refused for its audience says so itself; the operator hears it here.
    let audiences = check_audiences(&cfg, &args.config);
    for e in &audiences.errors {
        tracing::warn!("{e}");
    }
    for w in &audiences.warnings {
        tracing::warn!("{w}");
    }
    // The agent's own outbound proxy: [agent] keys, else HTTPS_PROXY/HTTP_PROXY/NO_PROXY.
    let proxy = match cfg.agent.proxy_settings(|k| std::env::var(k).ok()) {
        Ok(p) => p,
        Err(e) => return fail(exit::CONFIG, format!("proxy: {e}")),
    };
    // Before any thread exists: the endpoints' connection budget is derived from it.
    match airlock::fd_budget::raise_nofile() {
        Ok(r) => tracing::info!(
            nofile = r.now,
            raised_from = r.before,
            endpoint_connections = airlock::fd_budget::endpoint_connections(r.now),
            reserved = airlock::fd_budget::reserve(r.now),
            per_job = airlock::endpoint::CONNECTIONS_PER_JOB,
            "descriptor budget"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "keeping RLIMIT_NOFILE as it is; the endpoints' connection budget is derived from it"
        ),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(exit::OSERR, format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run(args, cfg, policies, proxy))
}

/// `airlockd --check`: every error and warning once, on stderr and stdout (not also through
/// the log, which goes to stderr too).
fn check(args: &Args) -> ExitCode {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("airlockd: {line}");
            }
            return ExitCode::from(exit::CONFIG as u8);
        }
    };
    let proxy = match cfg.agent.proxy_settings(|k| std::env::var(k).ok()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("airlockd: proxy: {e}");
            return ExitCode::from(exit::CONFIG as u8);
        }
    };
    let issuers = airlock::policy::TrustedIssuer::from_config(&cfg.issuers);
    match airlock::policy::load_dir_configured(&cfg.policy.dir, &issuers, Some(&args.config)) {
        Ok(policies) => {
            // The audiences the hooks will ask for must be trusted (`audience.rs`).
            let audiences = check_audiences(&cfg, &args.config);
            if !audiences.errors.is_empty() {
                for e in &audiences.errors {
                    for line in e.to_string().lines() {
                        eprintln!("airlockd: {line}");
                    }
                }
                return ExitCode::from(exit::CONFIG as u8);
            }
            println!(
                "configuration {} is valid; {} policy rule(s) loaded from {}",
                args.config.display(),
                policies.len(),
                cfg.policy.dir.display()
            );
            for w in policies.warnings() {
                println!("warning: {w}");
            }
            for w in &audiences.warnings {
                println!("warning: {w}");
            }
            println!("outbound: {}", proxy.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let errors = e.errors();
            for e in &errors {
                eprintln!("airlockd: policy error: {e}");
            }
            eprintln!(
                "airlockd: {} policy error(s) in {}",
                errors.len(),
                cfg.policy.dir.display()
            );
            ExitCode::from(exit::DATAERR as u8)
        }
    }
}

async fn run(
    args: Args,
    cfg: Config,
    policies: airlock::policy::PolicySet,
    proxy: ProxySettings,
) -> ExitCode {
    let audit = match AuditLog::open_with(&cfg.audit.path, AuditOptions::from_config(&cfg)) {
        Ok(a) => Arc::new(a),
        // A log that does not continue the agent's head: cut or rewritten.
        Err(e @ AuditError::Head(_)) => return fail(exit::DATAERR, e),
        Err(e) => return fail(exit::CANTCREAT, e),
    };
    let code = serve(args, cfg, policies, audit.clone(), proxy).await;
    // The writer answers what is queued and writes the head before the agent exits.
    let _ = tokio::task::spawn_blocking(move || audit.close()).await;
    code
}

async fn serve(
    args: Args,
    cfg: Config,
    policies: airlock::policy::PolicySet,
    audit: Arc<AuditLog>,
    proxy: ProxySettings,
) -> ExitCode {
    let metrics = Arc::new(Metrics::with_audit(audit.stats()));
    // Once, at start: which proxy the agent's own calls use (passwords as ***).
    if proxy.is_empty() {
        tracing::info!(outbound = %proxy.describe(), "no outbound proxy");
    } else {
        tracing::info!(outbound = %proxy.describe(), "outbound proxy");
    }
    let http = match HttpClient::with_proxy(&proxy) {
        Ok(h) => h,
        Err(e) => return fail(exit::SOFTWARE, e),
    };
    let verifier = match Verifier::new(&cfg.issuers, http.clone()) {
        Ok(v) => v,
        Err(e) => return fail(exit::CONFIG, e),
    };
    let broker = match Broker::new(&cfg, http, audit.clone(), metrics.clone()).await {
        Ok(b) => b,
        Err(e) => return fail(exit::CONFIG, e),
    };
    let group = match &cfg.agent.control_group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            _ => {
                return fail(
                    exit::CONFIG,
                    format!("[agent] control_group {name:?} does not exist"),
                )
            }
        },
    };
    let sandboxes = if cfg.sandbox.enabled {
        match airlock::sandbox::job::Sandboxes::new(&cfg, &args.config) {
            Ok(s) => {
                for w in s.warnings() {
                    tracing::warn!("sandbox: {w}");
                }
                Some(s)
            }
            Err(e) => return fail(exit::CONFIG, format!("cannot set up job sandboxes: {e}")),
        }
    } else {
        tracing::warn!(
            "[sandbox] is disabled: jobs run unsandboxed with loopback credential endpoints"
        );
        if cfg.endpoint.imds {
            tracing::warn!(
                "[endpoint] imds = true with [sandbox] disabled: IMDSv2 asks no job token, so \
                 any local process that finds a job's loopback port gets that job's role; \
                 remove the line (it is off by default without the sandbox) unless every \
                 process on this host may have every running job's credentials"
            );
        }
        let with_egress: Vec<&str> = policies
            .rules()
            .iter()
            .filter(|r| r.egress.is_some())
            .map(|r| r.name.as_str())
            .collect();
        if !with_egress.is_empty() {
            tracing::warn!(
                rules = %with_egress.join(", "),
                "[rule.egress] has no effect with [sandbox] disabled: these rules' jobs reach whatever the host reaches"
            );
        }
        None
    };
    let daemon = match Daemon::new(
        cfg.clone(),
        policies,
        verifier,
        broker,
        audit.clone(),
        metrics,
        sandboxes,
    ) {
        Ok(d) => d,
        Err(e) => return fail(exit::CANTCREAT, e),
    };
    let recovered = match daemon.recover().await {
        Ok(n) => n,
        Err(e) => return fail(exit::IOERR, e),
    };
    let _reaper = daemon.spawn_reaper();
    if cfg.admin.enabled {
        match tokio::net::TcpListener::bind(cfg.admin.listen).await {
            Ok(l) => {
                tokio::spawn(airlock::admin::serve(l, daemon.clone()));
            }
            Err(e) => {
                return fail(
                    exit::OSERR,
                    format!("cannot listen on [admin] {}: {e}", cfg.admin.listen),
                )
            }
        }
    }
    let control = match airlock::control::bind(&cfg.agent.control_socket, group) {
        Ok(l) => l,
        Err(e) => return fail(exit::OSERR, e),
    };
    tokio::spawn(airlock::control::serve(
        control,
        Arc::new(Control(daemon.clone())),
        group,
    ));
    if let Err(e) = audit
        .append(
            "agent_started",
            None,
            airlock::fields! {
                "version" => env!("CARGO_PKG_VERSION"),
                "policy_rules" => daemon.policy_rules(),
                "jobs_recovered" => recovered,
            },
        )
        .await
    {
        return fail(exit::CANTCREAT, e);
    }
    tracing::info!(
        config = %args.config.display(),
        socket = %cfg.agent.control_socket.display(),
        rules = daemon.policy_rules(),
        recovered,
        "airlockd ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return fail(exit::OSERR, "cannot install signal handlers");
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                let _ = daemon.reload_policies();
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = daemon.drained_for_stop() => {
                tracing::info!("drained: no job is left and `airlock drain --stop` asked the agent to stop");
                break;
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Sandboxed jobs are wiped now; unsandboxed jobs' records stay for the next start.
    daemon.shutdown().await;
    tracing::info!(
        jobs = daemon.job_count(),
        "airlockd stopping; the records of unsandboxed jobs are kept for the next start"
    );
    if let Err(e) = audit
        .append(
            "agent_stopped",
            None,
            airlock::fields! {"jobs" => daemon.job_count()},
        )
        .await
    {
        tracing::error!(error = %e, "agent_stopped not audited");
    }
    let _ = std::fs::remove_file(&cfg.agent.control_socket);
    ExitCode::SUCCESS
}
