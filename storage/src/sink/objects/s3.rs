//! Reaching S3: the connection options (the node's config, then the `AWS_*`
//! variables), the client with bounded retries, and object-store errors
//! turned into readable sink errors.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::sink::objects::Target;

/// How to reach S3: from the node's config, with the standard `AWS_*`
/// variables filling what the config leaves unset ([`S3Options::or_env`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// Endpoint URL (`https://…`, or `http://…` for a server on a trusted
    /// network; plain HTTP is allowed only when the endpoint says so).
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Virtual-hosted-style addressing (`bucket.endpoint`); path style otherwise.
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// PEM bundle of extra CA certificates to trust.
    pub ca_file: Option<PathBuf>,
    /// Files uploaded (or checked) at once.
    pub concurrency: Option<usize>,
}

impl S3Options {
    /// Fills unset fields from `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`/
    /// `AWS_ENDPOINT`, `AWS_REGION`/
    /// `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` and `AWS_CA_BUNDLE`.
    pub fn or_env(self) -> Self {
        self.or_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn or_vars(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| var(k));
        self.endpoint = self
            .endpoint
            .or_else(|| first(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]));
        self.region = self
            .region
            .or_else(|| first(&["AWS_REGION", "AWS_DEFAULT_REGION"]));
        // Key, secret and token are one unit: all from the config, or all
        // from the environment, never a config key with an environment secret.
        if self.access_key_id.is_none() && self.secret_access_key.is_none() {
            self.access_key_id = var("AWS_ACCESS_KEY_ID");
            self.secret_access_key = var("AWS_SECRET_ACCESS_KEY");
            self.session_token = self.session_token.or_else(|| var("AWS_SESSION_TOKEN"));
        }
        self.ca_file = self
            .ca_file
            .or_else(|| var("AWS_CA_BUNDLE").map(PathBuf::from));
        self
    }
}

pub(super) fn build_s3(
    bucket: &str,
    o: &S3Options,
    url: &str,
) -> Result<object_store::aws::AmazonS3> {
    use object_store::aws::AmazonS3Builder;
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};
    let mut client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300));
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(o.region.as_deref().unwrap_or("us-east-1"))
        .with_virtual_hosted_style_request(o.virtual_hosted_style)
        // Bounded retries: an unreachable endpoint or a dead bucket must turn
        // into a job error in seconds, not minutes; the job retries later.
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
    if let Some(e) = &o.endpoint {
        let allow_http = e.starts_with("http://");
        if !allow_http && !e.starts_with("https://") {
            return Err(Error::InvalidArgument(format!(
                "sink {url:?}: endpoint {e:?} must start with https:// (or http://)"
            )));
        }
        client = client.with_allow_http(allow_http);
        b = b.with_endpoint(e.trim_end_matches('/'));
    }
    if let Some(ca) = &o.ca_file {
        let pem = std::fs::read(ca).map_err(|e| Error::io("read CA bundle", ca, e))?;
        for cert in object_store::Certificate::from_pem_bundle(&pem)? {
            client = client.with_root_certificate(cert);
        }
    }
    match (&o.access_key_id, &o.secret_access_key) {
        (Some(k), Some(s)) => {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = &o.session_token {
                b = b.with_token(t);
            }
        }
        (None, None) => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "sink {url:?}: an access key id needs its secret access key and the other way round"
            )))
        }
    }
    Ok(b.with_client_options(client).build()?)
}

/// Adds what was being done and where to an object-store error.
pub(crate) fn sink_error(target: &Target, doing: &str, e: object_store::Error) -> Error {
    let denied = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    );
    let known = denied || matches!(e, object_store::Error::NotFound { .. });
    let text = condense(&crate::error::with_causes(&e));
    // A missing bucket shows up as NotFound on list; say it plainly.
    let hint = if text.contains("NoSuchBucket") {
        " (the bucket does not exist)"
    } else if text.contains("certificate") {
        " (the endpoint's certificate is not trusted: see ca_file / AWS_CA_BUNDLE)"
    } else if denied
        || text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
    {
        " (check the credentials and the bucket's permissions)"
    } else {
        ""
    };
    Error::Sink {
        sink: target.url.clone(),
        detail: format!("{doing}: {text}{hint}"),
        permanent: known || !hint.is_empty(),
    }
}

/// S3 errors carry the server's XML body: keep its code and message only.
fn condense(text: &str) -> String {
    let Some(at) = text.find("<?xml") else {
        return text.to_string();
    };
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find('<')? + start;
        Some(text[start..end].to_string())
    };
    let head = text[..at].trim_end_matches([' ', ':']);
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{head}: {c}: {m}"),
        (Some(c), None) => format!("{head}: {c}"),
        _ => head.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn s3_options_take_unset_fields_from_the_environment() {
        let vars: HashMap<&str, &str> = [
            ("AWS_ENDPOINT", "http://127.0.0.1:1"),
            ("AWS_REGION", "garage"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]
        .into();
        let o = S3Options {
            region: Some("eu".into()),
            ..S3Options::default()
        }
        .or_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(o.region.as_deref(), Some("eu"), "config wins over env");
        assert_eq!(o.access_key_id.as_deref(), Some("k"));
        assert_eq!(o.ca_file, None);
        // A key from the config never pairs with a secret from the environment.
        let o = S3Options {
            access_key_id: Some("mine".into()),
            ..S3Options::default()
        }
        .or_vars(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(o.secret_access_key, None);
    }

    #[test]
    fn s3_error_bodies_are_condensed() {
        let t = "Error performing PUT http://h/b/k - Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>Bucket not found: b</Message></Error>";
        assert_eq!(
            condense(t),
            "Error performing PUT http://h/b/k - Server returned non-2xx status code: 404 Not Found: NoSuchBucket: Bucket not found: b"
        );
        assert_eq!(condense("plain"), "plain");
    }
}
