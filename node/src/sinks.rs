//! The S3 buckets and Postgres catalogs a node reads and writes for its
//! clients: only those its operator declared (`[sinks.NAME]` in the
//! config), each with its own credentials and the tenants that may use it.
//! A job names one as `sink://NAME[/path]`; the node resolves the name when
//! it checks the job and again when it runs it, so job records and the Raft
//! log hold only names, and the node connects only to hosts its operator
//! configured. `s3://` and `postgres://` URLs, which name a place of the
//! client's choosing, are refused.
//!
//! Plain code over plain data: the config is read into [`DeclaredSinks`]
//! once at start; resolving is a lookup.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bitclone_storage::sink::objects::S3Options;
use bitclone_storage::sink::spec::Place;
use bitclone_storage::sink::{Destination, Location, Source};
use serde::Deserialize;

use crate::roots::Refused;

/// `[sinks.NAME]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSink {
    /// Tenants that may use it; `"*"`: every tenant.
    pub tenants: Vec<String>,
    /// Each tenant only under `<prefix>/<tenant>` (S3 sinks).
    pub per_tenant: Option<bool>,
    /// The tenants' data in it is theirs: erasing a tenant deletes it (its
    /// `<prefix>/<tenant>` of a per-tenant S3 sink, the whole prefix of an
    /// S3 sink declared for it alone, its rows of a catalog).
    pub owned: Option<bool>,
    pub s3: Option<FileS3Sink>,
    pub postgres: Option<FilePgSink>,
}

/// An S3 sink: a bucket and prefix, and how to reach them. Unset
/// connection fields come from the node's `[s3]` section, then from the
/// `AWS_*` variables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileS3Sink {
    pub bucket: String,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    /// The variable holding the access key id.
    pub access_key_id_env: Option<String>,
    pub secret_access_key: Option<String>,
    /// The variable holding the secret access key.
    pub secret_access_key_env: Option<String>,
    /// The variable holding a session token.
    pub session_token_env: Option<String>,
    pub virtual_hosted_style: Option<bool>,
    pub ca_file: Option<PathBuf>,
    pub concurrency: Option<usize>,
}

/// A Postgres catalog: its URL (user, hosts, database, TLS options) and
/// where its password is, outside the URL.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePgSink {
    pub url: String,
    /// The variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (a trailing newline is dropped).
    pub password_file: Option<PathBuf>,
}

/// The sinks this node's operator declared.
#[derive(Clone, Default)]
pub struct DeclaredSinks {
    sinks: BTreeMap<String, Declared>,
}

#[derive(Clone)]
struct Declared {
    tenants: Vec<String>,
    per_tenant: bool,
    owned: bool,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    S3 {
        bucket: String,
        prefix: String,
        options: S3Options,
    },
    Postgres {
        url: String,
        password: Option<Vec<u8>>,
    },
}

// Credentials never reach logs through a `{:?}`.
impl std::fmt::Debug for DeclaredSinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.sinks.keys()).finish()
    }
}

/// A destination as the node opens it: a concrete place and the
/// credentials for it.
pub struct Resolved {
    /// The declared sink's name (`None`: a `file://` directory).
    pub sink: Option<String>,
    /// `file://`, `s3://` or `postgres://`: never a declared name.
    pub destination: Destination,
    pub s3: S3Options,
    pub pg_password: Option<Vec<u8>>,
}

impl DeclaredSinks {
    /// Reads `[sinks.*]`: `defaults` are the node's `[s3]` settings
    /// (already filled from `AWS_*`), `env` reads the variables a sink
    /// names. Refuses names that are not plain, sinks with no tenants, an
    /// S3 prefix that two sinks share, and a password the node cannot read.
    pub fn from_config(
        file: BTreeMap<String, FileSink>,
        defaults: &S3Options,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DeclaredSinks> {
        let mut sinks = BTreeMap::new();
        for (name, f) in file {
            let declared =
                declare(&name, f, defaults, env).with_context(|| format!("[sinks.{name}]"))?;
            sinks.insert(name, declared);
        }
        let s3: Vec<_> = sinks
            .iter()
            .filter_map(|(n, d)| match &d.kind {
                Kind::S3 {
                    bucket,
                    prefix,
                    options,
                } => Some((
                    n,
                    options
                        .endpoint
                        .as_deref()
                        .map(|e| e.trim_end_matches('/').to_ascii_lowercase()),
                    bucket,
                    prefix,
                )),
                Kind::Postgres { .. } => None,
            })
            .collect();
        for (i, (a, ea, ba, pa)) in s3.iter().enumerate() {
            for (b, eb, bb, pb) in &s3[i + 1..] {
                let la = Location::S3 {
                    bucket: ba.to_string(),
                    prefix: pa.to_string(),
                };
                let lb = Location::S3 {
                    bucket: bb.to_string(),
                    prefix: pb.to_string(),
                };
                if ea == eb && la.overlaps(&lb) {
                    bail!(
                        "sinks {a} and {b} overlap ({} and {}): a mirror into one would delete \
                         the other's objects",
                        la.url(),
                        lb.url()
                    );
                }
            }
        }
        Ok(DeclaredSinks { sinks })
    }

    /// Files the node reads for its sinks (CA bundles, password files):
    /// no `file://` source or sink may reach them.
    pub fn files(file: &BTreeMap<String, FileSink>) -> Vec<PathBuf> {
        file.values()
            .flat_map(|f| {
                let ca = f.s3.as_ref().and_then(|s| s.ca_file.clone());
                let pg = f.postgres.as_ref();
                let pw = pg.and_then(|p| p.password_file.clone());
                let root =
                    pg.and_then(|p| bitclone_storage::sink::catalog::root_cert(&p.url).ok()?);
                ca.into_iter().chain(pw).chain(root)
            })
            .collect()
    }

    /// The names `tenant` may use, for messages.
    pub fn names_for(&self, tenant: &str) -> Vec<&str> {
        self.sinks
            .iter()
            .filter(|(_, d)| d.allows(tenant))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn lookup(&self, tenant: &str, name: &str) -> Result<&Declared, Refused> {
        match self.sinks.get(name) {
            Some(d) if d.allows(tenant) => Ok(d),
            _ => Err(Refused(format!(
                "sink {name} is not declared for tenant {tenant}{}",
                self.declared_hint(tenant)
            ))),
        }
    }

    fn declared_hint(&self, tenant: &str) -> String {
        match self.names_for(tenant).as_slice() {
            [] => " (no sinks are declared for it: the operator lists them as [sinks.NAME] \
                   in the node's config)"
                .to_string(),
            names => format!(" (declared for it: {})", names.join(", ")),
        }
    }

    fn client_chosen(&self, tenant: &str, what: &str, shown: &str) -> Refused {
        Refused(format!(
            "{what} {shown}: this node reads and writes only the S3 buckets and Postgres \
             catalogs its operator declared; name one as sink://NAME[/path]{}",
            self.declared_hint(tenant)
        ))
    }

    /// The refusal of a URL that must not be quoted back: a `postgres://`
    /// one (it may hold a password, percent-encoded past any redaction) or
    /// any with user info. Compared as the URL parser reads it (spaces
    /// around, tabs and newlines inside dropped). `None` for other URLs.
    pub fn unquotable_url_refusal(&self, tenant: &str, url: &str) -> Option<Refused> {
        let cleaned: String = url
            .trim()
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
            .collect();
        let (scheme, rest) = cleaned.split_once(':')?;
        let scheme = scheme.to_ascii_lowercase();
        if matches!(scheme.as_str(), "postgres" | "postgresql") {
            return Some(self.client_chosen(tenant, "a URL", &format!("{scheme}://…")));
        }
        if scheme == "snapshot" {
            return None; // NAME@ID: no user info there
        }
        // As the URL parser reads it: `\` is `/` for file://.
        let rest = rest.replace('\\', "/");
        let rest = rest.strip_prefix("//").unwrap_or(&rest);
        let authority = rest.split(['/', '?', '#']).next()?;
        authority.contains('@').then(|| {
            Refused(format!(
                "a {scheme}:// URL with user info (not shown): credentials belong in the \
                 node's config, not in a job"
            ))
        })
    }

    /// A destination as the job keeps it: a declared sink marked with what
    /// it stands for (see [`Place`]); others as they are.
    pub fn placed(&self, tenant: &str, d: Destination) -> Destination {
        match d {
            Destination::Declared {
                sink, path, mirror, ..
            } => {
                let place = match self.sinks.get(&sink).map(|x| (&x.kind, x.per_tenant)) {
                    Some((Kind::Postgres { .. }, _)) => Place::Catalog,
                    Some((Kind::S3 { .. }, true)) => Place::Tenant(tenant.to_string()),
                    _ => Place::Shared,
                };
                Destination::Declared {
                    sink,
                    path,
                    mirror,
                    place,
                }
            }
            other => other,
        }
    }

    /// Where a destination of `tenant` is written, and with what
    /// credentials. `file://` passes through (the file roots check it).
    pub fn destination(&self, tenant: &str, d: &Destination) -> Result<Resolved, Refused> {
        match d {
            Destination::Objects {
                location: Location::Dir { .. },
                ..
            } => Ok(Resolved {
                sink: None,
                destination: d.clone(),
                s3: S3Options::default(),
                pg_password: None,
            }),
            Destination::Objects { .. } => {
                Err(self.client_chosen(tenant, "destination", &d.display()))
            }
            // Stored by an earlier release, perhaps: never quoted.
            Destination::Catalog { .. } => {
                Err(self.client_chosen(tenant, "destination", "postgres://…"))
            }
            Destination::Declared {
                sink, path, mirror, ..
            } => {
                let decl = self.lookup(tenant, sink)?;
                let (destination, s3, pg_password) = match &decl.kind {
                    Kind::S3 { options, .. } => (
                        Destination::Objects {
                            location: decl.location(tenant, path),
                            mirror: *mirror,
                        },
                        options.clone(),
                        None,
                    ),
                    Kind::Postgres { url, password } => {
                        if !path.is_empty() || *mirror {
                            return Err(Refused(format!(
                                "{}: sink {sink} is a Postgres catalog; it takes no path and \
                                 no mirror option",
                                d.display()
                            )));
                        }
                        let url = url.clone();
                        (
                            Destination::Catalog { url },
                            S3Options::default(),
                            password.clone(),
                        )
                    }
                };
                Ok(Resolved {
                    sink: Some(sink.clone()),
                    destination,
                    s3,
                    pg_password,
                })
            }
        }
    }

    /// The places of `tenant`'s data in the sinks declared `owned` that it
    /// may use, by sink name: what erasing it deletes.
    pub fn owned_by(&self, tenant: &str) -> Vec<(String, Resolved)> {
        self.sinks
            .iter()
            .filter(|(_, d)| d.owned && d.allows(tenant))
            .map(|(name, d)| {
                let (destination, s3, pg_password) = match &d.kind {
                    Kind::S3 { options, .. } => (
                        Destination::Objects {
                            location: d.location(tenant, ""),
                            mirror: false,
                        },
                        options.clone(),
                        None,
                    ),
                    Kind::Postgres { url, password } => (
                        Destination::Catalog { url: url.clone() },
                        S3Options::default(),
                        password.clone(),
                    ),
                };
                (
                    name.clone(),
                    Resolved {
                        sink: Some(name.clone()),
                        destination,
                        s3,
                        pg_password,
                    },
                )
            })
            .collect()
    }

    /// The object store a source of `tenant` reads, if it reads one.
    pub fn source(
        &self,
        tenant: &str,
        s: &Source,
    ) -> Result<Option<(Location, S3Options)>, Refused> {
        match s {
            Source::Dir { .. } | Source::Snapshot { .. } => Ok(None),
            Source::Objects { .. } => Err(self.client_chosen(tenant, "source", &s.display())),
            Source::Declared { sink, path } => {
                let decl = self.lookup(tenant, sink)?;
                match &decl.kind {
                    Kind::S3 { options, .. } => {
                        Ok(Some((decl.location(tenant, path), options.clone())))
                    }
                    Kind::Postgres { .. } => Err(Refused(format!(
                        "source {}: sink {sink} is a Postgres catalog, not a source",
                        s.display()
                    ))),
                }
            }
        }
    }
}

impl Declared {
    fn allows(&self, tenant: &str) -> bool {
        self.tenants.iter().any(|t| t == "*" || t == tenant)
    }

    /// Where a job's path lands in an S3 sink:
    /// `<prefix>[/<tenant>]/<path>`.
    fn location(&self, tenant: &str, path: &str) -> Location {
        let (bucket, base) = match &self.kind {
            Kind::S3 { bucket, prefix, .. } => (bucket.as_str(), prefix.as_str()),
            Kind::Postgres { .. } => ("", ""),
        };
        let tenant = if self.per_tenant { tenant } else { "" };
        let prefix = [base, tenant, path]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        Location::S3 {
            bucket: bucket.to_string(),
            prefix,
        }
    }
}

fn declare(
    name: &str,
    f: FileSink,
    defaults: &S3Options,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Declared> {
    bitclone_storage::path::validate_name("sink", name)?;
    if f.tenants.is_empty() {
        bail!("tenants is empty: list the tenants that may use it, or \"*\" for all");
    }
    for t in f.tenants.iter().filter(|t| *t != "*") {
        bitclone_storage::path::validate_name("tenant", t)?;
    }
    let var = |what: &str, v: &Option<String>| -> Result<Option<String>> {
        match v {
            None => Ok(None),
            Some(k) => match env(k) {
                Some(v) if !v.is_empty() => Ok(Some(v)),
                _ => bail!("{what} names the variable {k}, which is not set"),
            },
        }
    };
    let kind = match (f.s3, f.postgres) {
        (Some(s), None) => {
            if s.bucket.is_empty() {
                bail!("s3.bucket is empty");
            }
            let prefix = s.prefix.unwrap_or_default().trim_matches('/').to_string();
            // The bucket and prefix by the rules s3:// URLs follow.
            Source::parse(&format!("s3://{}/{prefix}", s.bucket))?;
            let access_key_id = match (
                s.access_key_id,
                var("s3.access_key_id_env", &s.access_key_id_env)?,
            ) {
                (Some(_), Some(_)) => {
                    bail!("give s3.access_key_id or s3.access_key_id_env, not both")
                }
                (a, b) => a.or(b),
            };
            let secret_access_key = match (
                s.secret_access_key,
                var("s3.secret_access_key_env", &s.secret_access_key_env)?,
            ) {
                (Some(_), Some(_)) => {
                    bail!("give s3.secret_access_key or s3.secret_access_key_env, not both")
                }
                (a, b) => a.or(b),
            };
            let session_token = var("s3.session_token_env", &s.session_token_env)?;
            // Key, secret and token are one unit from one place: the sink's
            // own, or the node's ([s3], then AWS_*) for the node's endpoint
            // only, so the node's key never goes to another service.
            let (access_key_id, secret_access_key, session_token) =
                match (access_key_id, secret_access_key) {
                    (Some(k), Some(s)) => (Some(k), Some(s), session_token),
                    (None, None) if session_token.is_some() => {
                        bail!("s3.session_token_env needs the sink's own access key and secret")
                    }
                    (None, None) if s.endpoint.is_some() => bail!(
                        "a sink with its own endpoint needs its own access key and secret \
                         (the node's are for its [s3] endpoint)"
                    ),
                    (None, None) => (
                        defaults.access_key_id.clone(),
                        defaults.secret_access_key.clone(),
                        defaults.session_token.clone(),
                    ),
                    _ => bail!(
                        "an access key id needs its secret access key and the other way round"
                    ),
                };
            Kind::S3 {
                bucket: s.bucket,
                prefix,
                options: S3Options {
                    endpoint: s.endpoint.or(defaults.endpoint.clone()),
                    region: s.region.or(defaults.region.clone()),
                    access_key_id,
                    secret_access_key,
                    session_token,
                    virtual_hosted_style: s
                        .virtual_hosted_style
                        .unwrap_or(defaults.virtual_hosted_style),
                    ca_file: s.ca_file.or(defaults.ca_file.clone()),
                    concurrency: s.concurrency.or(defaults.concurrency),
                },
            }
        }
        (None, Some(p)) => {
            // Checked decoded: an encoded `password` parameter counts too.
            if bitclone_storage::sink::catalog::has_password(&p.url)? {
                bail!(
                    "postgres.url holds a password: give it in postgres.password_env or \
                     postgres.password_file, so that it is never part of what is shown"
                );
            }
            let password = match (
                var("postgres.password_env", &p.password_env)?,
                &p.password_file,
            ) {
                (Some(_), Some(_)) => {
                    bail!("give postgres.password_env or postgres.password_file, not both")
                }
                (Some(v), None) => Some(v.into_bytes()),
                (None, Some(file)) => {
                    let mut text = std::fs::read(file).with_context(|| {
                        format!("reading postgres.password_file {}", file.display())
                    })?;
                    while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        text.pop();
                    }
                    Some(text)
                }
                (None, None) => None,
            };
            if f.per_tenant.is_some() {
                bail!("per_tenant is for S3 sinks: a catalog keeps each tenant's rows apart");
            }
            Kind::Postgres {
                url: p.url,
                password,
            }
        }
        _ => bail!("give exactly one of [sinks.{name}.s3] or [sinks.{name}.postgres]"),
    };
    // As file roots: tenants sharing a sink do not see each other's
    // objects unless the operator says they may.
    let per_tenant = f.per_tenant.unwrap_or(true);
    let owned = f.owned.unwrap_or(false);
    let alone = f.tenants.len() == 1 && f.tenants[0] != "*";
    if owned && matches!(kind, Kind::S3 { .. }) && !per_tenant && !alone {
        bail!(
            "owned: an S3 sink that tenants share without per_tenant mixes their objects, so \
             erasing one tenant cannot tell which are its own"
        );
    }
    Ok(Declared {
        tenants: f.tenants,
        per_tenant,
        owned,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sinks(toml_text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<DeclaredSinks> {
        #[derive(Deserialize)]
        struct F {
            sinks: BTreeMap<String, FileSink>,
        }
        let f: F = toml::from_str(toml_text)?;
        let defaults = S3Options {
            endpoint: Some("http://127.0.0.1:3900".into()),
            access_key_id: Some("node-key".into()),
            secret_access_key: Some("node-secret".into()),
            ..S3Options::default()
        };
        DeclaredSinks::from_config(f.sinks, &defaults, env)
    }

    const CONFIG: &str = r#"
        [sinks.archive]
        tenants = ["acme"]
        per_tenant = false
        s3 = { bucket = "clones", prefix = "/acme/" }
        [sinks.shared]
        tenants = ["*"]
        s3 = { bucket = "shared", access_key_id_env = "K", secret_access_key_env = "S" }
        [sinks.catalog]
        tenants = ["acme", "beta"]
        postgres = { url = "postgres://bitclone@db.internal/catalog", password_env = "PW" }
    "#;

    fn env(k: &str) -> Option<String> {
        match k {
            "K" => Some("shared-key".into()),
            "S" => Some("shared-secret".into()),
            "PW" => Some("catalog-pw".into()),
            _ => None,
        }
    }

    #[test]
    fn a_declared_name_resolves_to_its_place_and_its_own_credentials() {
        let s = sinks(CONFIG, &env).unwrap();
        let d = |u: &str| Destination::parse(u).unwrap();
        let r = s
            .destination("acme", &d("sink://archive/ds?mirror=true"))
            .unwrap();
        assert_eq!(
            r.destination,
            Destination::Objects {
                location: Location::S3 {
                    bucket: "clones".into(),
                    prefix: "acme/ds".into()
                },
                mirror: true
            }
        );
        // Unset fields from the node's [s3]; its own key when it has one.
        assert_eq!(r.s3.access_key_id.as_deref(), Some("node-key"));
        assert_eq!(r.s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        let r = s.destination("beta", &d("sink://shared/x")).unwrap();
        assert_eq!(r.s3.access_key_id.as_deref(), Some("shared-key"));
        assert_eq!(r.s3.secret_access_key.as_deref(), Some("shared-secret"));
        // Per tenant: beta's objects under shared/beta/.
        assert!(matches!(
            r.destination,
            Destination::Objects { location: Location::S3 { ref prefix, .. }, .. } if prefix == "beta/x"
        ));
        let r = s.destination("beta", &d("sink://catalog")).unwrap();
        assert_eq!(
            r.destination,
            Destination::Catalog {
                url: "postgres://bitclone@db.internal/catalog".into()
            }
        );
        assert_eq!(r.pg_password.as_deref(), Some(&b"catalog-pw"[..]));
        // Sources: S3 sinks only.
        let (l, _) = s
            .source("acme", &Source::parse("sink://archive/ds").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(l.url(), "s3://clones/acme/ds");
        assert!(s
            .source("acme", &Source::parse("sink://catalog").unwrap())
            .is_err());
        // file:// passes through to the file roots.
        assert!(s.destination("acme", &d("file:///x")).is_ok());
    }

    #[test]
    fn client_chosen_places_and_other_tenants_sinks_are_refused() {
        let s = sinks(CONFIG, &env).unwrap();
        let d = |u: &str| Destination::parse(u).unwrap();
        for url in [
            "s3://clones/acme",
            "postgres://bitclone@evil.example/x",
            "postgres://bitclone:pw@127.0.0.1:5432/x",
        ] {
            let e = s.destination("acme", &d(url)).err().unwrap().0;
            assert!(
                e.contains("declared for it: archive, catalog, shared"),
                "{e}"
            );
            assert!(!e.contains(":pw@"), "{e}");
        }
        let e = s.destination("beta", &d("sink://archive")).err().unwrap().0;
        assert!(e.contains("not declared for tenant beta"), "{e}");
        assert!(s.destination("acme", &d("sink://nope")).is_err());
        assert!(s.destination("acme", &d("sink://catalog/sub")).is_err());
        assert!(s
            .destination("acme", &d("sink://catalog?mirror=true"))
            .is_err());
        assert!(s
            .source("acme", &Source::parse("s3://clones/acme").unwrap())
            .is_err());
        for url in [
            "postgres://u@h/x?pass%77ord=hunter2",
            " postgres://u:hunter2@h/x",
            "postgres:\t//u:hunter2@h/x",
            "PostgreSQL://u:hunter2@h/x",
            "s3://u:hunter2@bucket/x",
            "file://u:hunter2@/x",
        ] {
            let e = s.unquotable_url_refusal("acme", url).unwrap().0;
            assert!(!e.contains("hunter2"), "{e}");
        }
        for fine in [
            "sink://catalog",
            "s3://b/p@x",
            "snapshot://ds@0a",
            "file:///a@b",
        ] {
            assert!(s.unquotable_url_refusal("acme", fine).is_none(), "{fine}");
        }
        // Jobs keep what a name stood for, so that they wait only where
        // they can touch the same objects.
        let placed = |t: &str, u: &str| match s.placed(t, d(u)) {
            Destination::Declared { place, .. } => place,
            other => panic!("{other:?}"),
        };
        assert_eq!(placed("acme", "sink://catalog"), Place::Catalog);
        assert_eq!(
            placed("acme", "sink://shared/x"),
            Place::Tenant("acme".into())
        );
        assert_eq!(placed("acme", "sink://archive/x"), Place::Shared);
        let none = DeclaredSinks::default();
        let e = none.destination("acme", &d("s3://b/p")).err().unwrap().0;
        assert!(e.contains("no sinks are declared"), "{e}");
    }

    #[test]
    fn bad_declarations_are_refused_at_start() {
        let bad = |t: &str| sinks(t, &env).err().map(|e| format!("{e:#}"));
        let e = bad("[sinks.a]\ntenants = []\ns3 = { bucket = \"b\" }").unwrap();
        assert!(e.contains("tenants is empty"), "{e}");
        let e = bad("[sinks.a]\ntenants = [\"*\"]\n").unwrap();
        assert!(e.contains("exactly one"), "{e}");
        let e = bad(
            "[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", prefix = \"x\" }\n\
             [sinks.b]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", prefix = \"x/y\" }",
        )
        .unwrap();
        assert!(e.contains("overlap"), "{e}");
        let e = bad(
            "[sinks.a]\ntenants = [\"*\"]\npostgres = { url = \"postgres://u@h/d\", password_env = \"UNSET\" }",
        )
        .unwrap();
        assert!(e.contains("UNSET"), "{e}");
        let e = bad("[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", access_key_id = \"k\" }")
            .unwrap();
        assert!(e.contains("secret access key"), "{e}");
        // The node's key stays with the node's endpoint.
        let e =
            bad("[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", endpoint = \"https://x\" }")
                .unwrap();
        assert!(e.contains("its own access key"), "{e}");
        let e =
            bad("[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", session_token_env = \"K\" }")
                .unwrap();
        assert!(e.contains("session_token_env"), "{e}");
        // A password in a declared URL, even encoded, is refused.
        let e = bad(
            "[sinks.a]\ntenants = [\"*\"]\npostgres = { url = \"postgres://u@h/d?pass%77ord=x\" }",
        )
        .unwrap();
        assert!(e.contains("holds a password") && !e.contains("=x"), "{e}");
        let e = bad(
            "[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", prefix = \"x\" }\n\
             [sinks.b]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", prefix = \"x/y\", \
             endpoint = \"HTTP://127.0.0.1:3900/\", access_key_id = \"k\", secret_access_key = \"s\" }",
        )
        .unwrap();
        assert!(e.contains("overlap"), "{e}");
        assert!(bad("[sinks.\"a/b\"]\ntenants = [\"*\"]\ns3 = { bucket = \"b\" }").is_some());
        assert!(bad("[sinks.a]\ntenants = [\"*\"]\ns3 = { bucket = \"b\", bogus = 1 }").is_some());
        // Debug output shows names only.
        let s = sinks(CONFIG, &env).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("catalog-pw"),
            "{shown}"
        );
    }
}
