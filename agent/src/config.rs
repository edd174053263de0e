//! `airlock.toml`: the agent's own configuration (not the policies).
//!
//! Parsed with `deny_unknown_fields`, then checked by [`Config::validate`] before anything
//! privileged happens. Every path is a parameter so tests can point the agent at a
//! temporary tree.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/airlock/airlock.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config {path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("config {0}: {1}")]
    Invalid(PathBuf, String),
    /// Every value the checks after parsing refused, each at its key's line and column
    /// (or the file's start for a setting that was not written), one per line.
    #[error("{}", invalid_lines(path, errors))]
    Checks {
        path: PathBuf,
        /// `(line, column, message)`, in the order of the file.
        errors: Vec<(usize, usize, String)>,
    },
}

fn invalid_lines(path: &Path, errors: &[(usize, usize, String)]) -> String {
    errors
        .iter()
        .map(|(l, c, m)| format!("config {}:{l}:{c}: {m}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TOML document with the place of every key and value: what the checks after parsing
/// use to point at the value they refuse (the typed [`Config`] keeps no places).
enum Placed {
    Table(
        Vec<(
            serde_spanned::Spanned<String>,
            serde_spanned::Spanned<Placed>,
        )>,
    ),
    Array(Vec<serde_spanned::Spanned<Placed>>),
    Leaf,
}

impl<'de> Deserialize<'de> for Placed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Placed;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Placed, E> {
                Ok(Placed::Leaf)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Placed, E> {
                Ok(Placed::Leaf)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Placed, E> {
                Ok(Placed::Leaf)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Placed, E> {
                Ok(Placed::Leaf)
            }
            fn visit_str<E>(self, _: &str) -> Result<Placed, E> {
                Ok(Placed::Leaf)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Placed, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Placed::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Placed, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<serde_spanned::Spanned<String>>()? {
                    let v = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Placed::Table(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where `key` (a path such as `["endpoint", "bind"]`, or `["issuer", "1", "jwks_url"]`)
/// was written in `text`: the byte offset of its value, of the deepest part of the path
/// that was written, or `None` when not even its first part was.
fn place_of(text: &str, key: &[&str]) -> Option<usize> {
    let root: serde_spanned::Spanned<Placed> = toml::from_str(text).ok()?;
    let mut here = &root;
    let mut found = None;
    for part in key {
        let next = match here.get_ref() {
            Placed::Table(entries) => entries
                .iter()
                .find(|(k, _)| k.get_ref() == part)
                .map(|(_, v)| v),
            Placed::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            Placed::Leaf => None,
        };
        match next {
            Some(v) => {
                found = Some(v.span().start);
                here = v;
            }
            None => break,
        }
    }
    found
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub endpoint: EndpointSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub sts: StsSection,
    #[serde(default)]
    pub credentials: CredentialsSection,
    #[serde(default)]
    pub jobs: JobsSection,
    /// Trusted OIDC issuers. No issuer: only attested identities can be used.
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// Running jobs in sandboxes (`airlock run` with the shim).
    #[serde(default)]
    pub sandbox: SandboxSection,
    /// Egress-controlled jobs: where their resolver (the agent) forwards allowed names.
    #[serde(default)]
    pub egress: EgressSection,
    /// The file this configuration was read from (named in messages that say where to
    /// change something); not a key of the file.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Group (name) allowed to use the control socket besides root; none by default.
    #[serde(default)]
    pub control_group: Option<String>,
    /// The proxy of the agent's own https calls (STS, issuers, GitHub); wins over
    /// `HTTPS_PROXY`. `""` turns the environment's off. Checked as it is parsed, so an
    /// error names its line and column (`proxy.rs`).
    #[serde(default, deserialize_with = "proxy_url_setting")]
    pub https_proxy: Option<String>,
    /// The same for plain-http targets (test stand-ins); wins over `HTTP_PROXY`.
    #[serde(default, deserialize_with = "proxy_url_setting")]
    pub http_proxy: Option<String>,
    /// Hosts, domains and CIDR ranges reached without a proxy; wins over `NO_PROXY`.
    #[serde(default)]
    pub no_proxy: Option<Vec<String>>,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            state_dir: default_state_dir(),
            control_socket: default_control_socket(),
            control_group: None,
            https_proxy: None,
            http_proxy: None,
            no_proxy: None,
        }
    }
}

impl AgentSection {
    /// The agent's proxies: these keys, and for each one left out the environment
    /// (`lookup`). The error names the variable, never a password.
    pub fn proxy_settings(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<crate::proxy::ProxySettings, String> {
        crate::proxy::ProxySettings::resolve(
            &crate::proxy::ConfiguredProxy {
                https_proxy: self.https_proxy.as_deref(),
                http_proxy: self.http_proxy.as_deref(),
                no_proxy: self.no_proxy.as_deref(),
            },
            lookup,
        )
    }
}

/// A proxy URL key: checked while parsing (an empty string is allowed: no proxy).
fn proxy_url_setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    if !v.trim().is_empty() {
        crate::proxy::ProxyUrl::parse(&v).map_err(serde::de::Error::custom)?;
    }
    Ok(Some(v))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
    /// Send every record's seq and hash to the journal (docs/operations.md, "Anchors").
    #[serde(default = "default_true")]
    pub journal: bool,
    /// journald's native socket.
    #[serde(default = "default_journal_socket")]
    pub journal_socket: PathBuf,
    /// Remote syslog receivers of the same anchors: `udp://HOST:PORT`, `tcp://HOST:PORT`.
    #[serde(default)]
    pub syslog: Vec<String>,
    /// Their facility: auth, authpriv, daemon, user, local0..local7.
    #[serde(default = "default_syslog_facility")]
    pub syslog_facility: String,
    /// Records a job's own actions produce (refused endpoint requests, binds, STS errors):
    /// this many per second on average per job...
    #[serde(default = "default_job_records_per_second")]
    pub job_records_per_second: f64,
    /// ... and this many at once; beyond, they are counted in `audit_dropped` records.
    #[serde(default = "default_job_records_burst")]
    pub job_records_burst: u32,
    /// How often a job that keeps exceeding its limit gets an `audit_dropped` record.
    #[serde(
        default = "default_job_summary_interval",
        with = "humantime_serde_compat"
    )]
    pub job_summary_interval: Duration,
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            path: default_audit_path(),
            journal: true,
            journal_socket: default_journal_socket(),
            syslog: Vec::new(),
            syslog_facility: default_syslog_facility(),
            job_records_per_second: default_job_records_per_second(),
            job_records_burst: default_job_records_burst(),
            job_summary_interval: default_job_summary_interval(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_journal_socket() -> PathBuf {
    crate::audit::anchor::JOURNAL_SOCKET.into()
}
fn default_syslog_facility() -> String {
    "authpriv".into()
}
fn default_job_records_per_second() -> f64 {
    crate::audit::JobLimit::default().per_second
}
fn default_job_records_burst() -> u32 {
    crate::audit::JobLimit::default().burst
}
fn default_job_summary_interval() -> Duration {
    crate::audit::JobLimit::default().summary_every
}

impl AuditSection {
    fn check(&self) -> Result<(), String> {
        for t in &self.syslog {
            t.parse::<crate::audit::SyslogTarget>()
                .map_err(|e| format!("[audit] syslog: {e}"))?;
        }
        if crate::audit::anchor::facility_code(&self.syslog_facility).is_none() {
            return Err(format!(
                "[audit] syslog_facility {:?}: use auth, authpriv, daemon, user or local0..local7",
                self.syslog_facility
            ));
        }
        if !(self.job_records_per_second.is_finite() && self.job_records_per_second > 0.0) {
            return Err("[audit] job_records_per_second must be a number above 0".into());
        }
        if self.job_records_burst == 0 {
            return Err("[audit] job_records_burst must be at least 1".into());
        }
        if self.job_summary_interval < Duration::from_secs(1) {
            return Err("[audit] job_summary_interval must be at least 1s".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            dir: default_policy_dir(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSection {
    /// Address the per-job credential listeners bind to while jobs are not sandboxed.
    #[serde(default = "default_endpoint_bind")]
    pub bind: std::net::IpAddr,
    /// Serve the IMDSv2 emulation besides the container-credentials protocol: the
    /// effective value, `imds` if set, else on with `[sandbox] enabled` and off without it
    /// (IMDS asks no job token, so on a shared loopback any local process could use it).
    #[serde(skip)]
    pub imds: bool,
    /// `imds` as the file says it (`None`: not set).
    #[serde(default, rename = "imds")]
    pub imds_setting: Option<bool>,
    /// Region reported to jobs (`AWS_REGION`, IMDS region documents).
    #[serde(default = "default_region")]
    pub region: String,
}

impl Default for EndpointSection {
    fn default() -> Self {
        EndpointSection {
            bind: default_endpoint_bind(),
            imds: true,
            imds_setting: None,
            region: default_region(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// `/healthz` and `/metrics`; loopback only unless changed on purpose.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: default_admin_listen(),
            enabled: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsSection {
    /// STS endpoint URL; default `https://sts.<region>.amazonaws.com`. VPC endpoints welcome.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// An `http://` endpoint is refused unless this is set (test stand-ins only).
    #[serde(default)]
    pub allow_http: bool,
    /// Per-request timeout.
    #[serde(default = "default_sts_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Attempts on throttling and 5xx (including the first).
    #[serde(default = "default_sts_attempts")]
    pub max_attempts: u32,
}

impl Default for StsSection {
    fn default() -> Self {
        StsSection {
            endpoint: None,
            region: default_region(),
            allow_http: false,
            timeout: default_sts_timeout(),
            max_attempts: default_sts_attempts(),
        }
    }
}

impl StsSection {
    pub fn endpoint_url(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{}.amazonaws.com", self.region))
    }
}

/// Where the agent's own credentials (used to sign `AssumeRole`) come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialsKind {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` of the agent.
    Env,
    /// The host's instance profile through IMDSv2.
    Imds,
    /// `AssumeRoleWithWebIdentity` with a token file (e.g. EKS/IRSA style).
    WebIdentity,
    /// No own credentials: only `web-identity` grants can be served.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    #[serde(default = "default_credentials_kind")]
    pub source: CredentialsKind,
    #[serde(default = "default_imds_endpoint")]
    pub imds_endpoint: String,
    #[serde(default)]
    pub web_identity_token_file: Option<PathBuf>,
    #[serde(default)]
    pub web_identity_role_arn: Option<String>,
}

impl Default for CredentialsSection {
    fn default() -> Self {
        CredentialsSection {
            source: default_credentials_kind(),
            imds_endpoint: default_imds_endpoint(),
            web_identity_token_file: None,
            web_identity_role_arn: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    /// A job that has not ended after this long is ended by the agent; credentials never
    /// outlive it.
    #[serde(default = "default_max_lifetime", with = "humantime_serde_compat")]
    pub max_lifetime: Duration,
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            max_lifetime: default_max_lifetime(),
        }
    }
}

/// `[egress]`: the upstream resolvers of egress-controlled jobs' names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressSection {
    /// Resolvers (`IP` or `IP:port`) the agent forwards allowed names to, from the host's
    /// namespace. Empty: the nameservers of `resolv_conf`.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Where the host's nameservers are read from when `upstreams` is empty. On a host with
    /// systemd-resolved, `/run/systemd/resolve/resolv.conf` names the real upstreams.
    #[serde(default = "default_resolv_conf")]
    pub resolv_conf: PathBuf,
    /// The shortest time an answered address stays admitted, whatever its TTL (whole
    /// seconds, 1s to 1h; docs/egress.md, "TTLs"). Lower it only where clients keep no
    /// address longer than its TTL, or for tests.
    #[serde(default = "default_min_admission_ttl", with = "humantime_serde_compat")]
    pub min_admission_ttl: Duration,
}

impl Default for EgressSection {
    fn default() -> Self {
        EgressSection {
            upstreams: Vec::new(),
            resolv_conf: default_resolv_conf(),
            min_admission_ttl: default_min_admission_ttl(),
        }
    }
}

fn default_min_admission_ttl() -> Duration {
    Duration::from_secs(u64::from(crate::egress::dns::MIN_TTL_SECS))
}

fn default_resolv_conf() -> PathBuf {
    "/etc/resolv.conf".into()
}

impl EgressSection {
    /// The upstream resolvers, as the agent's resolver takes them.
    pub fn dns_config(&self) -> Result<crate::egress::dns::DnsConfig, String> {
        let min_admit_ttl = self.min_admission_ttl_secs()?;
        let mut cfg = self.upstream_config()?;
        cfg.min_admit_ttl = min_admit_ttl;
        Ok(cfg)
    }

    /// `min_admission_ttl` in whole seconds, checked.
    pub fn min_admission_ttl_secs(&self) -> Result<u32, String> {
        let ttl = self.min_admission_ttl;
        u32::try_from(ttl.as_secs())
            .ok()
            .filter(|s| {
                ttl.subsec_nanos() == 0 && (1..=crate::egress::dns::MAX_TTL_SECS).contains(s)
            })
            .ok_or_else(|| {
                format!("[egress] min_admission_ttl = {ttl:?}: give whole seconds from 1s to 1h")
            })
    }

    fn upstream_config(&self) -> Result<crate::egress::dns::DnsConfig, String> {
        use crate::egress::dns::DnsConfig;
        if self.upstreams.is_empty() {
            let text = std::fs::read_to_string(&self.resolv_conf)
                .map_err(|e| format!("[egress] resolv_conf {}: {e}", self.resolv_conf.display()))?;
            return DnsConfig::from_resolv_conf(&text)
                .map_err(|e| format!("[egress] resolv_conf {}: {e}", self.resolv_conf.display()));
        }
        let mut addrs = Vec::new();
        for u in &self.upstreams {
            let addr = u
                .parse::<std::net::SocketAddr>()
                .or_else(|_| {
                    u.parse::<std::net::IpAddr>()
                        .map(|ip| std::net::SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    format!("[egress] upstreams: {u:?} is not an IP address or IP:port")
                })?;
            addrs.push(addr);
        }
        Ok(DnsConfig::new(addrs))
    }
}

/// One trusted OIDC issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Exact `iss` value, e.g. `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// Accepted `aud` values; a token must carry at least one.
    pub audiences: Vec<String>,
    /// How to read claims: github, gitlab, buildkite or generic. Guessed from the issuer
    /// when absent.
    #[serde(default)]
    pub provider: Option<crate::identity::Provider>,
    /// JWKS location: one of `jwks_url`, `jwks_file`; otherwise the issuer's discovery
    /// document (`<issuer>/.well-known/openid-configuration`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Allow plain-http discovery/JWKS URLs (tests only).
    #[serde(default)]
    pub allow_http: bool,
}

/// `[sandbox]`: each job in its own namespaces, cgroup and network namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSection {
    /// On by default: `airlock run` runs every job in a sandbox of its own. Off: jobs run
    /// unsandboxed with loopback credential endpoints (see docs/endpoint.md for what that
    /// cannot protect).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The sandbox init; default: `airlock-shim` next to `airlockd`.
    #[serde(default)]
    pub shim: Option<PathBuf>,
    /// Per-job directories (the empty root the shim assembles in, the job's tmpfs, the
    /// spec). Root only; the agent makes it a shared mount point of its own.
    #[serde(default = "default_sandbox_runtime")]
    pub runtime_dir: PathBuf,
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// The agent's parent group under the cgroup root.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: PathBuf,
    #[serde(default = "default_netns_dir")]
    pub netns_dir: PathBuf,
    /// Where jobs' /30 subnets come from.
    #[serde(default = "default_address_pool")]
    pub address_pool: String,
    /// IPv6 for outbound and egress jobs: the unique local range (/96 or wider) their /126s
    /// come from. Unset (the default): IPv6 stays off in every job. Setting it turns on
    /// `net.ipv6.conf.all.forwarding` at the first such job (see docs/network.md).
    #[serde(default)]
    pub ipv6_address_pool: Option<String>,
    /// Forwarded traffic that is neither from nor to a job: `auto` (dropped when airlock
    /// turned forwarding on, left alone on a host that forwarded before), `drop` or
    /// `allow`. See docs/network.md.
    #[serde(default)]
    pub other_forwarding: crate::sandbox::forwarding::OtherForwarding,
    #[serde(default)]
    pub users: crate::sandbox::users::JobUsersConfig,
    /// The runner's own uid and gid, which no job may have.
    #[serde(default)]
    pub runner_uid: Option<u32>,
    #[serde(default)]
    pub runner_gid: Option<u32>,
    #[serde(default = "default_pids_max")]
    pub pids_max: u64,
    /// Bytes of memory per job.
    #[serde(default = "default_memory_max")]
    pub memory_max: u64,
    /// CPU per job in thousandths of a CPU; none: no limit.
    #[serde(default)]
    pub cpu_millis: Option<u64>,
    /// Each job's CPU share under contention (`cpu.weight`, 1..=10000; the kernel's
    /// default 100, which is also what systemd gives airlockd's own service). See
    /// docs/cgroups.md.
    #[serde(default = "default_cpu_weight")]
    pub cpu_weight: u64,
    /// Size cap of the job's tmpfs, in bytes: one for the job as a whole (its /tmp,
    /// /var/tmp, /run, home and workspace).
    #[serde(default = "default_tmpfs_size")]
    pub tmpfs_size: u64,
    /// More host paths to hide from jobs (airlock's own config, state, audit, control
    /// socket, `/root` and the Docker and containerd sockets are always hidden).
    #[serde(default)]
    pub hide: Vec<PathBuf>,
    /// Variables of the caller's environment a job may see; everything else is dropped.
    #[serde(default = "default_pass_env")]
    pub pass_env: Vec<String>,
}

impl Default for SandboxSection {
    fn default() -> Self {
        toml::from_str("").expect("the empty [sandbox] table has defaults for every key")
    }
}

fn default_sandbox_runtime() -> PathBuf {
    "/run/airlock/jobs".into()
}
fn default_cgroup_root() -> PathBuf {
    "/sys/fs/cgroup".into()
}
fn default_cgroup_parent() -> PathBuf {
    "airlock".into()
}
fn default_netns_dir() -> PathBuf {
    "/run/netns".into()
}
fn default_address_pool() -> String {
    crate::sandbox::addr_pool::DEFAULT_POOL.into()
}
fn default_pids_max() -> u64 {
    4096
}
fn default_memory_max() -> u64 {
    8 << 30
}
fn default_cpu_weight() -> u64 {
    crate::sandbox::cgroup::DEFAULT_CPU_WEIGHT
}
fn default_tmpfs_size() -> u64 {
    4 << 30
}
fn default_pass_env() -> Vec<String> {
    ["PATH", "LANG", "LC_ALL", "TERM", "TZ", "CI"]
        .map(String::from)
        .to_vec()
}

fn yes() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    "/var/lib/airlock".into()
}
fn default_control_socket() -> PathBuf {
    "/run/airlock/control.sock".into()
}
fn default_audit_path() -> PathBuf {
    "/var/log/airlock/audit.jsonl".into()
}
fn default_policy_dir() -> PathBuf {
    "/etc/airlock/policies".into()
}
fn default_endpoint_bind() -> std::net::IpAddr {
    std::net::Ipv4Addr::LOCALHOST.into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_admin_listen() -> SocketAddr {
    ([127, 0, 0, 1], 9469).into()
}
fn default_sts_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_sts_attempts() -> u32 {
    4
}
fn default_credentials_kind() -> CredentialsKind {
    CredentialsKind::Env
}
fn default_imds_endpoint() -> String {
    "http://169.254.169.254".into()
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(6 * 3600)
}

/// `"90s"`, `"15m"`, `"6h"` or a number of seconds.
pub mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {t:?}: {e} (use e.g. \"90s\", \"15m\", \"1h\")"
                ))
            }),
        }
    }
}

/// 1-based line and column of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        let mut cfg = Self::parse(path, &text)?;
        // Relative paths in a config file mean "next to this file", whatever the caller's
        // working directory is.
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        cfg.absolutize(&base);
        if let Ok(abs) = std::path::absolute(path) {
            cfg.source = abs;
        }
        Ok(cfg)
    }

    fn absolutize(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.agent.state_dir);
        fix(&mut self.agent.control_socket);
        fix(&mut self.audit.path);
        fix(&mut self.audit.journal_socket);
        fix(&mut self.policy.dir);
        fix(&mut self.sandbox.runtime_dir);
        fix(&mut self.sandbox.netns_dir);
        if let Some(p) = &mut self.sandbox.shim {
            fix(p);
        }
        if let Some(p) = &mut self.credentials.web_identity_token_file {
            fix(p);
        }
        for iss in &mut self.issuers {
            if let Some(p) = &mut iss.jwks_file {
                fix(p);
            }
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        cfg.endpoint.imds = cfg.endpoint.imds_setting.unwrap_or(cfg.sandbox.enabled);
        cfg.source = path.to_owned();
        cfg.validate(path, text)?;
        Ok(cfg)
    }

    /// Every check after parsing; all of them run, and each refusal names the place of its
    /// key in `text`.
    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let mut found: Vec<(Vec<String>, String)> = Vec::new();
        self.checks(&mut |key: &[&str], m: String| {
            found.push((key.iter().map(ToString::to_string).collect(), m));
        });
        if found.is_empty() {
            return Ok(());
        }
        let mut errors: Vec<(usize, usize, String)> = found
            .into_iter()
            .map(|(key, m)| {
                let key: Vec<&str> = key.iter().map(String::as_str).collect();
                let (l, c) = place_of(text, &key).map_or((1, 1), |o| line_col(text, o));
                (l, c, m)
            })
            .collect();
        errors.sort_by_key(|(l, c, _)| (*l, *c));
        Err(ConfigError::Checks {
            path: path.to_owned(),
            errors,
        })
    }

    fn checks(&self, bad: &mut dyn FnMut(&[&str], String)) {
        if let Err(m) = self.audit.check() {
            // The message names the key; the place is its section's.
            let key = m
                .strip_prefix("[audit] ")
                .and_then(|r| r.split([' ', ':']).next())
                .unwrap_or("")
                .to_string();
            bad(&["audit", &key], m);
        }
        let sts = self.sts.endpoint_url();
        if sts.starts_with("http://") && !self.sts.allow_http {
            bad(&["sts", "endpoint"], format!(
                "[sts] endpoint {sts:?} is plain http; set allow_http = true only for a local test stand-in"
            ));
        }
        if !sts.starts_with("http://") && !sts.starts_with("https://") {
            bad(
                &["sts", "endpoint"],
                format!("[sts] endpoint {sts:?} must be an https:// URL"),
            );
        }
        if self.sandbox.enabled {
            if let Err(e) = self
                .sandbox
                .address_pool
                .parse::<crate::sandbox::addr_pool::Cidr>()
            {
                bad(
                    &["sandbox", "address_pool"],
                    format!("[sandbox] address_pool: {e}"),
                );
            }
            if let Some(p6) = &self.sandbox.ipv6_address_pool {
                if let Err(e) = p6.parse::<crate::sandbox::addr_pool::Pool6>() {
                    bad(
                        &["sandbox", "ipv6_address_pool"],
                        format!("[sandbox] ipv6_address_pool: {e}"),
                    );
                }
            }
            if self.sandbox.tmpfs_size < (1 << 20) {
                bad(
                    &["sandbox", "tmpfs_size"],
                    "[sandbox] tmpfs_size must be at least 1 MiB".into(),
                );
            }
        }
        if !self.endpoint.bind.is_loopback() {
            // Jobs are not sandboxed yet: a job's listener is only as private as loopback.
            bad(&["endpoint", "bind"], format!(
                "[endpoint] bind = \"{}\" is not a loopback address; job credentials would be reachable from the network",
                self.endpoint.bind
            ));
        }
        if self.sts.max_attempts == 0 {
            bad(
                &["sts", "max_attempts"],
                "[sts] max_attempts must be at least 1".into(),
            );
        }
        if self.credentials.source == CredentialsKind::WebIdentity
            && (self.credentials.web_identity_token_file.is_none()
                || self.credentials.web_identity_role_arn.is_none())
        {
            bad(&["credentials", "source"], "[credentials] source = \"web-identity\" needs web_identity_token_file and web_identity_role_arn".into());
        }
        if self.jobs.max_lifetime < Duration::from_secs(60) {
            bad(
                &["jobs", "max_lifetime"],
                "[jobs] max_lifetime must be at least 60s".into(),
            );
        }
        for (i, iss) in self.issuers.iter().enumerate() {
            let n = i.to_string();
            if iss.audiences.is_empty() {
                bad(
                    &["issuer", &n, "audiences"],
                    format!(
                        "[[issuer]] #{} ({}) needs at least one audience",
                        i + 1,
                        iss.issuer
                    ),
                );
            }
            // An audience travels into a runner's `.env` and a query string: one plain word.
            if let Some(a) = iss
                .audiences
                .iter()
                .find(|a| a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                bad(
                    &["issuer", &n, "audiences"],
                    format!(
                        "[[issuer]] {}: audience {a:?} is empty or holds a space or a control character",
                        iss.issuer
                    ),
                );
            }
            if iss.jwks_url.is_some() && iss.jwks_file.is_some() {
                bad(
                    &["issuer", &n, "jwks_file"],
                    format!(
                        "[[issuer]] {}: set jwks_url or jwks_file, not both",
                        iss.issuer
                    ),
                );
            }
            let urls = [
                ("issuer", Some(&iss.issuer)),
                ("jwks_url", iss.jwks_url.as_ref()),
            ];
            for (key, u) in urls {
                let Some(u) = u else { continue };
                if u.starts_with("http://") && !iss.allow_http {
                    bad(
                        &["issuer", &n, key],
                        format!(
                            "[[issuer]] {u:?} is plain http; set allow_http = true only for tests"
                        ),
                    );
                }
            }
            if self.issuers[..i].iter().any(|o| o.issuer == iss.issuer) {
                bad(
                    &["issuer", &n, "issuer"],
                    format!("[[issuer]] {} is listed twice", iss.issuer),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_places() {
        let c = Config::parse(Path::new("a.toml"), "").unwrap();
        assert_eq!(c.audit.path, Path::new("/var/log/airlock/audit.jsonl"));
        assert_eq!(
            c.agent.control_socket,
            Path::new("/run/airlock/control.sock")
        );
        assert_eq!(c.sts.endpoint_url(), "https://sts.us-east-1.amazonaws.com");
        assert!(
            c.sandbox.enabled,
            "jobs are sandboxed unless the operator says otherwise"
        );
        assert_eq!(c.sandbox.pids_max, 4096);
    }

    #[test]
    fn the_minimum_admission_ttl_defaults_to_two_minutes_and_is_checked() {
        let parse = |text: &str| Config::parse(Path::new("a.toml"), text).unwrap();
        let up = "[egress]\nupstreams = [\"192.0.2.53\"]\n";
        let c = parse(up);
        assert_eq!(c.egress.dns_config().unwrap().min_admit_ttl, 120);
        let c = parse(&format!("{up}min_admission_ttl = \"3s\"\n"));
        assert_eq!(c.egress.dns_config().unwrap().min_admit_ttl, 3);
        for bad in ["\"0s\"", "\"1500ms\"", "\"2h\""] {
            let c = parse(&format!("{up}min_admission_ttl = {bad}\n"));
            let err = c.egress.dns_config().unwrap_err();
            assert!(err.contains("min_admission_ttl"), "{err}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let err = Config::parse(
            Path::new("a.toml"),
            "[sts]\nregion = \"eu-west-1\"\nendpont = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config a.toml:3:1:"), "{err}");
        assert!(err.contains("endpont"), "{err}");
    }

    #[test]
    fn audit_anchors_and_job_limits_are_checked() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[audit]\nsyslog = [\"udp://10.0.0.5:514\", \"tcp://logs:6514\"]\nsyslog_facility = \"local3\"\njob_records_per_second = 0.5\njob_records_burst = 5\njob_summary_interval = \"10s\"\n",
        )
        .unwrap();
        let o = crate::audit::AuditOptions::from_config(&c);
        assert_eq!(o.anchors.syslog.len(), 2);
        assert_eq!(o.anchors.facility, 19);
        assert_eq!(
            o.anchors.journal.as_deref(),
            Some(Path::new("/run/systemd/journal/socket"))
        );
        assert_eq!(o.job_limit.burst, 5);
        assert_eq!(
            o.head_file,
            Some(PathBuf::from("/var/lib/airlock/audit-head.json"))
        );
        for (bad, why) in [
            ("syslog = [\"logs:514\"]", "udp://HOST:PORT"),
            ("syslog_facility = \"kern\"", "syslog_facility"),
            ("job_records_per_second = 0.0", "above 0"),
            ("job_records_burst = 0", "at least 1"),
            ("job_summary_interval = \"100ms\"", "at least 1s"),
        ] {
            let err = Config::parse(Path::new("a.toml"), &format!("[audit]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/airlock.toml"),
        )
        .unwrap();
        let c = Config::parse(Path::new("airlock.toml"), &shipped).unwrap();
        assert_eq!(
            c.audit.job_records_burst,
            crate::audit::JobLimit::default().burst
        );
    }

    #[test]
    fn proxy_keys_are_checked_where_they_are_written() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[agent]\nhttps_proxy = \"http://u:pw@proxy.corp:3128\"\nhttp_proxy = \"\"\nno_proxy = [\"corp.example\"]\n",
        )
        .unwrap();
        let s = c
            .agent
            .proxy_settings(|k| (k == "HTTP_PROXY").then(|| "http://env:1".to_owned()))
            .unwrap();
        assert_eq!(s.https.unwrap().to_string(), "http://***@proxy.corp:3128");
        assert!(s.http.is_none());
        assert_eq!(s.no_proxy, ["corp.example"]);

        let err = Config::parse(
            Path::new("a.toml"),
            "[agent]\nstate_dir = \"/x\"\nhttps_proxy = \"https://u:pw@proxy.corp:3128\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config a.toml:3:"), "{err}");
        assert!(err.contains("TLS to the proxy itself"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }

    #[test]
    fn plain_http_sts_needs_opt_in() {
        let err = Config::parse(
            Path::new("a.toml"),
            "[sts]\nendpoint = \"http://127.0.0.1:5000\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("allow_http"), "{err}");
        Config::parse(
            Path::new("a.toml"),
            "[sts]\nendpoint = \"http://127.0.0.1:5000\"\nallow_http = true\n",
        )
        .unwrap();
    }

    #[test]
    fn an_audience_is_one_plain_word() {
        let with = |aud: &str| {
            Config::parse(
                Path::new("a.toml"),
                &format!(
                    "[[issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\naudiences = [{aud:?}]\n"
                ),
            )
        };
        assert_eq!(with("airlock").unwrap().source, Path::new("a.toml"));
        for bad in ["", "air lock", "airlock\nAIRLOCK_X=1"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("control character"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn relative_paths_are_next_to_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("airlock.toml");
        std::fs::write(
            &f,
            "[agent]\ncontrol_socket = \"run/control.sock\"\n[policy]\ndir = \"/abs/policies\"\n",
        )
        .unwrap();
        let c = Config::load(&f).unwrap();
        assert_eq!(c.agent.control_socket, d.path().join("run/control.sock"));
        assert_eq!(c.policy.dir, Path::new("/abs/policies"));
    }

    #[test]
    fn the_endpoint_never_listens_beyond_loopback() {
        let err = Config::parse(Path::new("a.toml"), "[endpoint]\nbind = \"0.0.0.0\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        assert!(
            err.starts_with("config a.toml:2:8: "),
            "names the value's place: {err}"
        );
        Config::parse(Path::new("a.toml"), "[endpoint]\nbind = \"::1\"\n").unwrap();
    }

    #[test]
    fn every_check_after_parsing_names_its_place_and_all_are_reported() {
        let text = "[jobs]\nmax_lifetime = \"10s\"\n\n[endpoint]\nbind = \"0.0.0.0\"\n\n\
                    [[issuer]]\nissuer = \"https://a.example\"\naudiences = [\"x\"]\n\n\
                    [[issuer]]\nissuer = \"http://b.example\"\naudiences = []\n\n\
                    [sts]\nmax_attempts = 0\n";
        let err = Config::parse(Path::new("a.toml"), text)
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        let expect = [
            ("config a.toml:2:16: ", "max_lifetime"),
            ("config a.toml:5:8: ", "not a loopback"),
            ("config a.toml:12:10: ", "plain http"),
            ("config a.toml:13:13: ", "needs at least one audience"),
            ("config a.toml:16:16: ", "max_attempts"),
        ];
        assert_eq!(lines.len(), expect.len(), "{err}");
        for (line, (at, what)) in lines.iter().zip(expect) {
            assert!(
                line.starts_with(at) && line.contains(what),
                "{line:?}: {err}"
            );
        }
    }

    #[test]
    fn imds_is_off_by_default_without_the_sandbox_and_on_when_asked() {
        let p = Path::new("a.toml");
        assert!(
            Config::parse(p, "").unwrap().endpoint.imds,
            "sandboxed default"
        );
        let off = Config::parse(p, "[sandbox]\nenabled = false\n").unwrap();
        assert!(
            !off.endpoint.imds,
            "unsandboxed: no token-less IMDS by default"
        );
        let on = Config::parse(p, "[endpoint]\nimds = true\n[sandbox]\nenabled = false\n").unwrap();
        assert!(
            on.endpoint.imds,
            "an explicit imds = true still turns it on"
        );
        let sandboxed_off = Config::parse(p, "[endpoint]\nimds = false\n").unwrap();
        assert!(!sandboxed_off.endpoint.imds);
    }

    #[test]
    fn durations_accept_text_and_seconds() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[jobs]\nmax_lifetime = \"2h\"\n[sts]\ntimeout = 3\n",
        )
        .unwrap();
        assert_eq!(c.jobs.max_lifetime, Duration::from_secs(7200));
        assert_eq!(c.sts.timeout, Duration::from_secs(3));
    }
}
