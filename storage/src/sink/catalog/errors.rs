//! Why a catalog attempt failed: the raw failure kept until the retry loop
//! decides, the SQLSTATE classes that tell transient from permanent, and the
//! backoff between attempts.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::PoolError;

use crate::backoff::Backoff;
use crate::error::{with_causes, Error};
use crate::sink::catalog::tls::tls_refused;
use crate::sink::catalog::ATTEMPTS;

/// Why one attempt failed; kept raw until the retry loop decides.
pub(super) enum Failure {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    Other(Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure::Pool(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Other(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Pg(e) => write!(f, "{e}"),
            Failure::Pool(e) => write!(f, "{e}"),
            Failure::Other(e) => write!(f, "{e}"),
        }
    }
}

impl Failure {
    pub(super) fn transient(&self) -> bool {
        match self {
            Failure::Pg(e) | Failure::Pool(PoolError::Backend(e)) => is_transient(e),
            Failure::Pool(PoolError::Timeout(_)) => true,
            Failure::Pool(_) | Failure::Other(_) => false,
        }
    }

    pub(super) fn into_error(self, endpoint: &str, sink: &str) -> Error {
        match self {
            Failure::Other(e) => e,
            Failure::Pg(e) | Failure::Pool(PoolError::Backend(e)) => {
                let text = with_causes(&e);
                if tls_refused(&e) {
                    Error::Sink {
                        sink: sink.to_owned(),
                        detail: text,
                        permanent: true,
                    }
                } else if is_connection_error(&e) {
                    Error::Unavailable(format!("postgres at {endpoint} is unreachable: {text}"))
                } else if is_transient(&e) {
                    Error::Unavailable(format!(
                        "postgres at {endpoint}: {text} (gave up after {ATTEMPTS} attempts)"
                    ))
                } else {
                    Error::Sink {
                        sink: sink.to_owned(),
                        detail: text,
                        // Without an SQLSTATE nothing is known to be lasting
                        // (a DNS hiccup): worth the job's retries.
                        permanent: e.code().is_some_and(|c| is_permanent_sqlstate(c.code())),
                    }
                }
            }
            Failure::Pool(e) => Error::Unavailable(format!("postgres at {endpoint}: {e}")),
        }
    }
}

/// Connection exceptions and server shutdown / start-up.
fn is_connection_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// Errors worth another attempt: the connection ones, serialization
/// failures, deadlocks and too many connections.
fn is_transient_sqlstate(code: &str) -> bool {
    is_connection_sqlstate(code) || matches!(code, "40001" | "40P01" | "53300")
}

/// Errors a retry of the whole job will not fix: authentication, access
/// rules and syntax, missing database or schema, bad data, constraints.
fn is_permanent_sqlstate(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("28" | "42" | "3D" | "3F" | "22" | "23" | "0A")
    )
}

fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => is_connection_sqlstate(code.code()),
        None => e.is_closed() || broken_io(e),
    }
}

fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => is_transient_sqlstate(code.code()),
        None => is_connection_error(e),
    }
}

/// An I/O error in `e`'s source chain that a new connection may not hit.
fn broken_io(e: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::NotConnected
                    | K::BrokenPipe
                    | K::TimedOut
                    | K::UnexpectedEof
                    | K::Interrupted
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            );
        }
        source = s.source();
    }
    false
}

/// Catalog retries: 100 ms doubling up to 2 s, with equal jitter.
pub(super) const RETRY: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classification() {
        for code in [
            "40001", "40P01", "57P01", "57P02", "57P03", "08000", "08006", "53300",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "28P01", "42501", "57014", "22001"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(is_connection_sqlstate("08001"));
        for code in ["28P01", "42501", "3D000", "23505"] {
            assert!(is_permanent_sqlstate(code), "{code}");
        }
        assert!(!is_permanent_sqlstate("53100") && !is_permanent_sqlstate("X"));
        assert!(!is_connection_sqlstate("40001"));
    }
}
