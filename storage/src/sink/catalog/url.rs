//! Catalog URLs: parsing `postgres://` URLs (with libpq's `sslmode` and
//! `sslrootcert`, which tokio-postgres does not know), and keeping passwords
//! out of messages.

use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::SslMode;

use crate::error::{Error, Result};
use crate::sink::catalog::CONNECT_TIMEOUT;

/// A parsed catalog URL.
#[derive(Debug)]
pub(super) struct CatalogUrl {
    pub(super) config: tokio_postgres::Config,
    /// `None`: plaintext; `Some(ca)`: TLS, verified against `ca` or the webpki roots.
    pub(super) tls: Option<Option<PathBuf>>,
    pub(super) redacted: String,
    pub(super) endpoint: String,
    /// `scheme://hosts/dbname`: no credentials, no parameters.
    pub(super) sink: String,
}

pub(super) fn parse_url(url: &str) -> Result<CatalogUrl> {
    let url = url.trim();
    let redacted = redact(url);
    let bad = |why: &str| Error::InvalidArgument(format!("postgres URL {redacted}: {why}"));
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("expected postgres://user:password@host:port/dbname"));
    };
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(bad("the scheme must be postgres:// or postgresql://"));
    }
    // tokio-postgres knows neither sslrootcert nor the verify-* modes: take
    // them out and pass the rest through unchanged (encoding included).
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut sslmode, mut root_cert, mut kept, mut port) = (None, None, Vec::new(), None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = url::form_urlencoded::parse(pair.as_bytes())
            .next()
            .unwrap_or_default();
        match &*key {
            "sslmode" => sslmode = Some(value.into_owned()),
            "sslrootcert" => root_cert = Some(PathBuf::from(value.into_owned())),
            k => {
                if k == "port" {
                    port = Some(value.into_owned());
                }
                kept.push(pair);
            }
        }
    }
    let (mode, tls) = match sslmode.as_deref() {
        None if root_cert.is_some() => (SslMode::Require, true),
        None | Some("disable") => (SslMode::Disable, false),
        Some("prefer") => (SslMode::Prefer, true),
        Some("require" | "verify-ca" | "verify-full") => (SslMode::Require, true),
        Some(_) => {
            return Err(bad(
                "sslmode must be disable, prefer, require, verify-ca or verify-full",
            ))
        }
    };
    if root_cert.is_some() && !tls {
        return Err(bad(
            "sslrootcert is given but sslmode=disable turns TLS off",
        ));
    }
    let cleaned = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&cleaned).map_err(|e| bad(&e.to_string()))?;
    if config.get_user().is_none() {
        return Err(bad("no user given"));
    }
    if config.get_hosts().is_empty() {
        return Err(bad("no host given"));
    }
    config.ssl_mode(mode);
    // No password from the environment here: a node must never send its own
    // to a host a URL names; whoever connects decides which password goes
    // where (`Catalog::connect_with_password`).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("bitclone");
    }
    Ok(CatalogUrl {
        config,
        tls: tls.then_some(root_cert),
        endpoint: endpoint(rest, port.as_deref().unwrap_or("5432")),
        sink: format!("{scheme}://{}", sink_part(rest)),
        redacted,
    })
}

/// The part after `://` without user info and parameters. Like
/// tokio-postgres, the user info runs up to the first '@'.
fn sink_part(rest: &str) -> &str {
    let after_at = rest.split_once('@').map_or(rest, |(_, a)| a);
    after_at.split_once('?').map_or(after_at, |(a, _)| a)
}

/// `host:port[,host:port…]` from the part after `://`, for messages.
fn endpoint(rest: &str, default_port: &str) -> String {
    let part = sink_part(rest);
    let hosts = part.split_once('/').map_or(part, |(h, _)| h);
    if hosts.is_empty() {
        return format!("the host given in the URL parameters (port {default_port})");
    }
    hosts
        .split(',')
        .map(|h| match h.rfind(':') {
            Some(i) if !h[i..].contains(']') => h.to_owned(),
            _ => format!("{h}:{default_port}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `url` with the password (in the user info or a `password=` parameter)
/// replaced by `***`.
/// `url` with any password replaced by `***`: for job listings and logs.
pub fn redact_url(url: &str) -> String {
    redact(url)
}

/// Checks a catalog URL without connecting (a clear error at submit time
/// rather than when the job runs).
pub fn check_url(url: &str) -> Result<()> {
    parse_url(url).map(|_| ())
}

/// What can be shown of a catalog URL: `scheme://hosts/dbname`, without
/// user info or parameters (where a password could hide, encoded past any
/// redaction).
pub fn public_url(url: &str) -> String {
    parse_url(url).map_or_else(|_| "postgres://…".to_owned(), |c| c.sink)
}

/// Whether the URL carries a password (decoded, wherever it is given).
pub fn has_password(url: &str) -> Result<bool> {
    Ok(parse_url(url)?.config.get_password().is_some())
}

/// The `sslrootcert` file a URL names, if any.
pub fn root_cert(url: &str) -> Result<Option<PathBuf>> {
    Ok(parse_url(url)?.tls.flatten())
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    // Like tokio-postgres, the user info runs up to the first '@'.
    let (userinfo, after_at) = match rest.split_once('@') {
        Some((u, a)) => (Some(u), a),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = userinfo {
        match u.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None => {
                out.push_str(u);
                out.push('@');
            }
        }
    }
    match after_at.split_once('?') {
        None => out.push_str(after_at),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some(("password", _)) => "password=***".to_owned(),
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(
            redact("postgres://alice:s3cr%40t@db.example:6432/bc?sslmode=require&password=x"),
            "postgres://alice:***@db.example:6432/bc?sslmode=require&password=***"
        );
        assert_eq!(redact("postgres://bob@h/db"), "postgres://bob@h/db");
        assert_eq!(redact("postgresql://h/db"), "postgresql://h/db");
        let err = parse_url("mysql://alice:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_url("postgres://alice:hunter2@h:notaport/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn url_modes_and_endpoint() {
        let t = parse_url("postgres://u:p@127.0.0.1:5999/db").unwrap();
        assert!(t.tls.is_none());
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.endpoint, "127.0.0.1:5999");
        assert_eq!(t.redacted, "postgres://u:***@127.0.0.1:5999/db");
        assert_eq!(t.sink, "postgres://127.0.0.1:5999/db");

        let t = parse_url("postgres://u@db.example/bc?sslmode=verify-full&sslrootcert=/ca.pem")
            .unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.tls, Some(Some(PathBuf::from("/ca.pem"))));
        assert_eq!(t.endpoint, "db.example:5432");

        let t = parse_url("postgres://u@h/db?sslmode=prefer&connect_timeout=3").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Prefer);
        assert_eq!(t.tls, Some(None));
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );

        for bad in [
            "postgres://u@h/db?sslmode=sometimes",
            "postgres://u@h/db?sslmode=disable&sslrootcert=/ca.pem",
            "postgres://h/db",
            "http://u@h/db",
            "u@h/db",
        ] {
            assert!(
                matches!(parse_url(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }
}
