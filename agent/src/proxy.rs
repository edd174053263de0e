//! The agent's own outbound proxy: which HTTP proxy, if any, a request of the agent (STS,
//! the issuers' discovery documents and JWKS, GitHub) goes through, from `[agent]
//! https_proxy`, `http_proxy`, `no_proxy` or else the `HTTPS_PROXY`, `HTTP_PROXY` and
//! `NO_PROXY` variables (upper case first, then lower case, as hyper-util and curl read
//! them).
//!
//! Every target is reached through a `CONNECT host:port` tunnel, https and plain http alike,
//! so TLS runs end to end between the agent and the target: the proxy sees the target's name
//! and port, never a credential or a token. Loopback and link-local targets (IMDS at
//! 169.254.169.254 and fd00:ec2::254, a job's endpoint at 169.254.170.2) never go through a
//! proxy, whatever `NO_PROXY` says: IMDS refuses proxied requests and the proxy cannot reach
//! a host's own loopback.
//!
//! A proxy URL may carry a user and password; they are sent only in `Proxy-Authorization`
//! on the `CONNECT` and never appear in a message: [`ProxyUrl`] prints them as `***`.
//! This module never opens a connection (`http_client` does).

use hyper_util::client::proxy::matcher::Matcher;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A proxy's URL, checked: `http://[user[:password]@]host:port[/]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// As given (with its user and password): what the matcher is built from.
    raw: String,
    /// `host:port`, for messages.
    host_port: String,
    has_auth: bool,
}

impl ProxyUrl {
    /// Parses and checks a proxy URL. A value without a scheme is taken as `http://`, as
    /// curl does. The error never repeats a password.
    pub fn parse(value: &str) -> Result<ProxyUrl, String> {
        let value = value.trim();
        let shown = redact_userinfo(value);
        let full = if value.contains("://") {
            value.to_owned()
        } else {
            format!("http://{value}")
        };
        let uri: http::Uri = full
            .parse()
            .map_err(|e| format!("proxy URL {shown:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(format!(
                    "proxy URL {shown:?}: TLS to the proxy itself is not supported; use http:// \
                     (the tunnel through it carries TLS end to end to the target)"
                ));
            }
            other => {
                return Err(format!(
                    "proxy URL {shown:?}: scheme {:?} is not supported; use http://HOST:PORT",
                    other.unwrap_or("")
                ));
            }
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("proxy URL {shown:?} names no host"));
        };
        let host_port = match authority.as_str().rsplit_once('@') {
            Some((_, hp)) => hp,
            None => authority.as_str(),
        };
        if authority.host().is_empty() {
            return Err(format!("proxy URL {shown:?} names no host"));
        }
        if authority.port_u16().is_none() {
            return Err(format!(
                "proxy URL {shown:?} needs a port, e.g. http://{}:3128",
                authority.host()
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "proxy URL {shown:?} must be http://HOST:PORT, without a path or query"
            ));
        }
        Ok(ProxyUrl {
            raw: full,
            host_port: host_port.to_owned(),
            has_auth: authority.as_str().contains('@'),
        })
    }

    /// `host:port` of the proxy.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }
}

/// `http://***@proxy:3128/` for a URL with a user or password: what messages show.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.has_auth {
            write!(f, "http://***@{}", self.host_port)
        } else {
            write!(f, "http://{}", self.host_port)
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// `value` with whatever sits between `scheme://` (or the start) and the authority's last
/// `@` replaced by `***`: a URL as it may go into a message, even one that does not parse.
pub fn redact_userinfo(value: &str) -> String {
    let (scheme, rest) = match value.find("://") {
        Some(i) => value.split_at(i + 3),
        None => ("", value),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => value.to_owned(),
    }
}

/// Where a setting came from, for the startup log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Env(&'static str),
    Unset,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Config => f.write_str("airlock.toml [agent]"),
            Source::Env(v) => write!(f, "${v}"),
            Source::Unset => f.write_str("unset"),
        }
    }
}

/// The agent's proxy settings, checked. The default is no proxy at all.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub https: Option<ProxyUrl>,
    pub http: Option<ProxyUrl>,
    /// Hosts, domains (`example.com` also covers its subdomains) and addresses or CIDR
    /// ranges reached directly; `*` means every host.
    pub no_proxy: Vec<String>,
    pub https_source: Source,
    pub http_source: Source,
    pub no_proxy_source: Source,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            https: None,
            http: None,
            no_proxy: Vec::new(),
            https_source: Source::Unset,
            http_source: Source::Unset,
            no_proxy_source: Source::Unset,
        }
    }
}

/// The `[agent]` keys of `airlock.toml`, as they were written: `Some("")` turns a proxy
/// off whatever the environment says, `None` leaves the choice to the environment.
#[derive(Debug, Clone, Default)]
pub struct ConfiguredProxy<'a> {
    pub https_proxy: Option<&'a str>,
    pub http_proxy: Option<&'a str>,
    pub no_proxy: Option<&'a [String]>,
}

impl ProxySettings {
    /// The settings from the configuration's keys, and for each key left out from the
    /// environment (`lookup`, e.g. `|k| std::env::var(k).ok()`). An empty variable counts as
    /// unset. The error names the key or variable and never a password.
    pub fn resolve(
        configured: &ConfiguredProxy<'_>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ProxySettings, String> {
        let env = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|n| lookup(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        };
        let url = |key: &str,
                   conf: Option<&str>,
                   names: &[&'static str]|
         -> Result<(Option<ProxyUrl>, Source), String> {
            match conf {
                Some(v) if v.trim().is_empty() => Ok((None, Source::Config)),
                Some(v) => ProxyUrl::parse(v)
                    .map(|u| (Some(u), Source::Config))
                    .map_err(|e| format!("[agent] {key}: {e}")),
                None => match env(names) {
                    Some((name, v)) => ProxyUrl::parse(&v)
                        .map(|u| (Some(u), Source::Env(name)))
                        .map_err(|e| format!("environment variable {name}: {e}")),
                    None => Ok((None, Source::Unset)),
                },
            }
        };
        let (https, https_source) = url(
            "https_proxy",
            configured.https_proxy,
            &["HTTPS_PROXY", "https_proxy"],
        )?;
        let (http, http_source) = url(
            "http_proxy",
            configured.http_proxy,
            &["HTTP_PROXY", "http_proxy"],
        )?;
        let (no_proxy, no_proxy_source) = match configured.no_proxy {
            Some(list) => (
                clean_no_proxy(list.iter().map(String::as_str)),
                Source::Config,
            ),
            None => match env(&["NO_PROXY", "no_proxy"]) {
                Some((name, v)) => (clean_no_proxy(v.split(',')), Source::Env(name)),
                None => (Vec::new(), Source::Unset),
            },
        };
        Ok(ProxySettings {
            https,
            http,
            no_proxy,
            https_source,
            http_source,
            no_proxy_source,
        })
    }

    /// From the process's environment alone (the `airlock github` hooks, which have no
    /// configuration of the agent).
    pub fn from_env() -> Result<ProxySettings, String> {
        Self::resolve(&ConfiguredProxy::default(), |k| std::env::var(k).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.https.is_none() && self.http.is_none()
    }

    /// One line for the startup log: which proxy, from where, for what (passwords shown as
    /// `***`).
    pub fn describe(&self) -> String {
        let one = |u: &Option<ProxyUrl>, s: Source| match u {
            Some(u) => format!("{u} (from {s})"),
            None if s == Source::Config => "none (turned off in airlock.toml)".to_owned(),
            None => "none".to_owned(),
        };
        format!(
            "https targets through {}; http targets through {}; direct: loopback, link-local \
             (IMDS){}",
            one(&self.https, self.https_source),
            one(&self.http, self.http_source),
            if self.no_proxy.is_empty() {
                String::new()
            } else {
                format!(
                    " and {} (from {})",
                    self.no_proxy.join(","),
                    self.no_proxy_source
                )
            }
        )
    }

    /// The matcher the client asks for each target, `None` without any proxy.
    pub(crate) fn matcher(&self) -> Option<Matcher> {
        if self.is_empty() {
            return None;
        }
        let mut b = Matcher::builder().no(self.no_proxy.join(","));
        if let Some(u) = &self.https {
            b = b.https(u.raw.as_str());
        }
        if let Some(u) = &self.http {
            b = b.http(u.raw.as_str());
        }
        Some(b.build())
    }

    /// The proxy a request to `uri` goes through (`None`: direct). What the client does,
    /// exposed for the startup check and for tests.
    pub fn proxy_for(&self, uri: &http::Uri) -> Option<&ProxyUrl> {
        let host = uri.host()?;
        if always_direct(host) {
            return None;
        }
        let m = self.matcher()?;
        m.intercept(uri)?;
        match uri.scheme_str() {
            Some("https") => self.https.as_ref(),
            Some("http") => self.http.as_ref(),
            _ => None,
        }
    }
}

fn clean_no_proxy<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    items
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// IMDS (169.254.169.254, fd00:ec2::254), every other link-local address (a job's endpoint
/// at 169.254.170.2), loopback and `localhost`: never through a proxy.
pub fn always_direct(host: &str) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost")
        || host
            .to_ascii_lowercase()
            .trim_end_matches('.')
            .ends_with(".localhost")
    {
        return true;
    }
    const IMDS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.is_loopback() || a.is_link_local() || a.is_unspecified(),
        Ok(IpAddr::V6(a)) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return v4.is_loopback() || v4.is_link_local();
            }
            a.is_loopback() || a.is_unicast_link_local() || a.is_unspecified() || a == IMDS6
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn proxy_urls_are_checked_and_never_shown_with_their_password() {
        let u = ProxyUrl::parse("http://user:s3cret@proxy.corp:3128").unwrap();
        assert_eq!(u.to_string(), "http://***@proxy.corp:3128");
        assert_eq!(format!("{u:?}"), "ProxyUrl(http://***@proxy.corp:3128)");
        assert_eq!(u.host_port(), "proxy.corp:3128");
        let bare = ProxyUrl::parse("proxy.corp:3128").unwrap();
        assert_eq!(bare.to_string(), "http://proxy.corp:3128");
        ProxyUrl::parse("http://[2001:db8::1]:3128/").unwrap();

        for (bad, says) in [
            ("https://user:s3cret@proxy.corp:3128", "TLS to the proxy"),
            ("socks5://user:s3cret@proxy.corp:1080", "scheme \"socks5\""),
            ("http://user:s3cret@proxy.corp", "needs a port"),
            ("http://user:s3cret@proxy.corp:3128/path", "without a path"),
            ("http://user:s3cret@proxy corp:3128", "not a URL"),
            ("http://user:s3cret@:3128", "names no host"),
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(
                !e.contains("s3cret"),
                "{bad}: the error shows the password: {e}"
            );
            assert!(!e.contains("user"), "{bad}: the error shows the user: {e}");
        }
    }

    #[test]
    fn userinfo_is_redacted_even_in_what_does_not_parse() {
        assert_eq!(redact_userinfo("http://u:p@h:1/x@y"), "http://***@h:1/x@y");
        assert_eq!(redact_userinfo("u:p@h:1"), "***@h:1");
        assert_eq!(redact_userinfo("http://u:p@@h:1"), "http://***@h:1");
        assert_eq!(redact_userinfo("http://h:1"), "http://h:1");
    }

    #[test]
    fn the_configuration_wins_over_the_environment() {
        let vars = env(&[
            ("HTTPS_PROXY", "http://env-proxy:3128"),
            ("http_proxy", "http://env-http:8080"),
            ("no_proxy", "internal.corp, 10.0.0.0/8"),
        ]);
        let s = ProxySettings::resolve(&ConfiguredProxy::default(), &vars).unwrap();
        assert_eq!(s.https.as_ref().unwrap().host_port(), "env-proxy:3128");
        assert_eq!(s.https_source, Source::Env("HTTPS_PROXY"));
        assert_eq!(s.http.as_ref().unwrap().host_port(), "env-http:8080");
        assert_eq!(s.http_source, Source::Env("http_proxy"));
        assert_eq!(s.no_proxy, ["internal.corp", "10.0.0.0/8"]);

        let list = vec!["only.corp".to_owned()];
        let conf = ConfiguredProxy {
            https_proxy: Some("http://conf-proxy:3128"),
            http_proxy: Some(""),
            no_proxy: Some(&list),
        };
        let s = ProxySettings::resolve(&conf, &vars).unwrap();
        assert_eq!(s.https.as_ref().unwrap().host_port(), "conf-proxy:3128");
        assert_eq!(s.https_source, Source::Config);
        assert!(
            s.http.is_none(),
            "an empty key turns the environment's proxy off"
        );
        assert_eq!(s.no_proxy, ["only.corp"]);
        assert!(s.describe().contains("turned off in airlock.toml"));
    }

    #[test]
    fn a_bad_variable_is_named_without_its_password() {
        let e = ProxySettings::resolve(
            &ConfiguredProxy::default(),
            env(&[("https_proxy", "ftp://me:hunter2@proxy:21")]),
        )
        .unwrap_err();
        assert!(e.starts_with("environment variable https_proxy:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = ProxySettings::resolve(
            &ConfiguredProxy {
                https_proxy: Some("http://me:hunter2@proxy"),
                ..Default::default()
            },
            env(&[]),
        )
        .unwrap_err();
        assert!(e.starts_with("[agent] https_proxy:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_ranges() {
        let s = ProxySettings::resolve(
            &ConfiguredProxy::default(),
            env(&[
                ("HTTPS_PROXY", "http://proxy:3128"),
                ("HTTP_PROXY", "http://proxy:3128"),
                (
                    "NO_PROXY",
                    "corp.example, .vpce.amazonaws.com,10.0.0.0/8,2001:db8::/32",
                ),
            ]),
        )
        .unwrap();
        let via = |u: &str| s.proxy_for(&uri(u)).map(|p| p.host_port().to_owned());
        let proxy = Some("proxy:3128".to_owned());
        assert_eq!(via("https://sts.us-east-1.amazonaws.com/"), proxy);
        assert_eq!(via("http://sts.test:5000/"), proxy);
        assert_eq!(via("https://corp.example/jwks"), None);
        assert_eq!(via("https://git.corp.example/jwks"), None);
        assert_eq!(via("https://notcorp.example/jwks"), proxy);
        assert_eq!(
            via("https://vpce-1.sts.eu-west-1.vpce.amazonaws.com/"),
            None
        );
        assert_eq!(via("https://10.1.2.3/"), None);
        assert_eq!(via("https://11.1.2.3/"), proxy);
        assert_eq!(via("https://[2001:db8::5]/"), None);
    }

    #[test]
    fn imds_loopback_and_link_local_never_go_through_the_proxy() {
        let s = ProxySettings::resolve(
            &ConfiguredProxy::default(),
            env(&[
                ("HTTPS_PROXY", "http://proxy:3128"),
                ("HTTP_PROXY", "http://proxy:3128"),
            ]),
        )
        .unwrap();
        for u in [
            "http://169.254.169.254/latest/api/token",
            "http://[fd00:ec2::254]/latest/api/token",
            "http://169.254.170.2/v1/credentials",
            "http://127.0.0.1:8080/",
            "http://127.9.9.9/",
            "http://[::1]:80/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fe80::1]/",
            "http://localhost:9469/",
            "https://LOCALHOST/",
            "http://a.localhost/",
        ] {
            assert_eq!(s.proxy_for(&uri(u)), None, "{u} went through the proxy");
        }
        assert!(s.proxy_for(&uri("http://169.253.169.254/")).is_some());
        assert!(s.proxy_for(&uri("http://[fd00:ec2::253]/")).is_some());
    }

    #[test]
    fn without_settings_nothing_is_proxied() {
        let s = ProxySettings::resolve(&ConfiguredProxy::default(), env(&[])).unwrap();
        assert!(s.is_empty());
        assert!(s.matcher().is_none());
        assert_eq!(s.proxy_for(&uri("https://sts.amazonaws.com/")), None);
    }
}
