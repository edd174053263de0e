//! `airlock-testkit`: test-only helpers for demos and shell use — mint a JWT with the
//! fixture keys, serve a JWKS and discovery document on loopback.
//!
//! It must never be installed on a runner: its keys are public test material.

use airlock_tests::oidc;
use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "airlock-testkit",
    about = "Test-only OIDC helpers for airlock demos and tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print a signed JWT with the given claims.
    Mint {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        #[arg(long, default_value = "RS256")]
        alg: String,
        #[arg(long, default_value = oidc::GITHUB_ISSUER)]
        issuer: String,
        #[arg(long, default_value = oidc::TEST_AUDIENCE)]
        audience: String,
        /// JSON object of claims; `iss`, `aud`, `iat`, `nbf`, `exp` are added unless present.
        #[arg(long)]
        claims: PathBuf,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
    },
    /// Serve `/.well-known/openid-configuration` and `/jwks.json` on 127.0.0.1.
    ServeJwks {
        /// Directory holding `jwks.json`.
        #[arg(long)]
        dir: PathBuf,
        /// Port; 0 picks a free one (printed on stdout).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// `issuer` in the discovery document; default `http://127.0.0.1:PORT`.
        #[arg(long)]
        issuer: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
enum TestkitError {
    #[error("cannot read claims file {0}: {1}")]
    ReadClaims(PathBuf, std::io::Error),
    #[error("claims file {0} is not JSON: {1}")]
    ParseClaims(PathBuf, serde_json::Error),
    #[error("unknown algorithm {0:?}: use RS256 or ES256")]
    Alg(String),
    #[error(transparent)]
    Mint(#[from] oidc::OidcError),
    #[error("cannot read {0}: {1} (point --dir at tests/fixtures/oidc)")]
    ReadJwks(PathBuf, std::io::Error),
    #[error("cannot listen on 127.0.0.1:{0}: {1} (pick another --port)")]
    Bind(u16, std::io::Error),
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-testkit: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), TestkitError> {
    match cli.cmd {
        Cmd::Mint {
            key,
            kid,
            alg,
            issuer,
            audience,
            claims,
            ttl,
        } => {
            let text = std::fs::read_to_string(&claims)
                .map_err(|e| TestkitError::ReadClaims(claims.clone(), e))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TestkitError::ParseClaims(claims.clone(), e))?;
            let alg = match alg.as_str() {
                "RS256" => jsonwebtoken::Algorithm::RS256,
                "ES256" => jsonwebtoken::Algorithm::ES256,
                _ => return Err(TestkitError::Alg(alg)),
            };
            let token = oidc::mint_with(&key, &kid, alg, &issuer, &audience, &value, ttl)?;
            println!("{token}");
            Ok(())
        }
        Cmd::ServeJwks { dir, port, issuer } => serve_jwks(dir, port, issuer),
    }
}

fn serve_jwks(dir: PathBuf, port: u16, issuer: Option<String>) -> Result<(), TestkitError> {
    let path = dir.join("jwks.json");
    // Read once up front so a wrong --dir fails at start, not at the agent's first fetch.
    std::fs::read(&path).map_err(|e| TestkitError::ReadJwks(path.clone(), e))?;
    let listener =
        TcpListener::bind(("127.0.0.1", port)).map_err(|e| TestkitError::Bind(port, e))?;
    let port = listener.local_addr().map_err(TestkitError::Serve)?.port();
    let base = format!("http://127.0.0.1:{port}");
    let discovery = serde_json::json!({
        "issuer": issuer.unwrap_or_else(|| base.clone()),
        "jwks_uri": format!("{base}/jwks.json"),
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    })
    .to_string();
    println!("{port}");
    std::io::stdout().flush().map_err(TestkitError::Serve)?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (path, discovery) = (path.clone(), discovery.clone());
        std::thread::spawn(move || {
            if let Err(e) = answer(conn, &path, &discovery) {
                eprintln!("airlock-testkit: connection: {e}");
            }
        });
    }
    Ok(())
}

fn answer(conn: TcpStream, jwks: &std::path::Path, discovery: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    // The JWKS file is re-read per request so a demo can rotate keys by replacing it.
    let (status, body) = match target {
        "/.well-known/openid-configuration" => ("200 OK", discovery.as_bytes().to_vec()),
        "/jwks.json" => match std::fs::read(jwks) {
            Ok(b) => ("200 OK", b),
            Err(_) => ("500 Internal Server Error", b"{}".to_vec()),
        },
        _ => ("404 Not Found", b"{}".to_vec()),
    };
    let mut out = conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(&body)?;
    out.flush()
}
