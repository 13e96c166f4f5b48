//! The audit log: one JSON line per mutating call and per refused call,
//! written and flushed before the call is answered.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

/// One audited call.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    pub request_id: &'a str,
    /// The token's subject; empty when no token verified.
    pub subject: &'a str,
    pub tenant: &'a str,
    pub action: &'a str,
    /// What the call acts on (dataset, job, node, tenant).
    pub target: &'a str,
    /// `ok`, or the gRPC code of the refusal or failure.
    pub result: &'a str,
    /// The refusal's or failure's message.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: &'a str,
}

pub struct Audit {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Audit {
    pub fn open(target: &AuditTarget) -> std::io::Result<Audit> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                )
            }
        };
        Ok(Audit {
            out: Mutex::new(out),
        })
    }

    /// Writes one line. A failure to write is logged, not returned: the
    /// call it records has already been decided.
    pub fn record(&self, event: &Event<'_>) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => return tracing::error!(error = %e, "cannot encode an audit line"),
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.log");
        for n in 0..2 {
            let a = Audit::open(&AuditTarget::File(path.clone())).unwrap();
            a.record(&Event {
                time_unix_ms: n,
                request_id: "r",
                subject: "alice",
                tenant: "t",
                action: "put",
                target: "ds",
                result: "ok",
                detail: "",
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["time_unix_ms"], 1);
        assert_eq!(lines[0]["action"], "put");
        assert!(lines[0].get("detail").is_none());
    }
}
