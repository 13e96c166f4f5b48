//! A clone job's source and destinations as typed values, parsed once from
//! the URLs a user gives (at submit) and stored as they are (in the cluster
//! state). Nothing parses the URLs again: sinks open from these values.
//!
//! URLs: sources `file:///abs/dir`, `s3://bucket/prefix`,
//! `sink://NAME[/path]`, `snapshot://NAME[@ID]`; destinations
//! `s3://bucket/prefix[?mirror=true]`, `file:///abs/dir[?mirror=true]`,
//! `sink://NAME[/path][?mirror=true]`, `postgres://…`.
//!
//! `sink://NAME` names a sink the operator declared in the node's config
//! (an S3 bucket and prefix, or a Postgres catalog, with its credentials):
//! the job stores only the name and the path under it, and the node
//! resolves them when it runs the job. A node takes only those from
//! clients; `s3://` and `postgres://` URLs, which name a place of the
//! client's choosing, are for tools that run with the user's own
//! credentials (`bitclone restore`, `bitclone verify`).

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::chunk::SnapshotId;
use crate::error::{Error, Result};

/// Where objects live.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Location {
    /// An S3 bucket and a `/`-separated prefix inside it (empty: the root).
    S3 { bucket: String, prefix: String },
    /// A local directory (absolute).
    Dir { path: PathBuf },
}

impl Location {
    /// The location as a URL, for messages and listings.
    pub fn url(&self) -> String {
        match self {
            Location::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}"),
            Location::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            Location::Dir { path } => format!("file://{}", path.display()),
        }
    }

    /// Whether writing under one can touch objects of the other: the same
    /// place, or one inside the other (a mirror of the outer one deletes the
    /// inner one's objects).
    pub fn overlaps(&self, other: &Location) -> bool {
        match (self, other) {
            (
                Location::S3 { bucket, prefix },
                Location::S3 {
                    bucket: b2,
                    prefix: p2,
                },
            ) => bucket == b2 && nested(prefix, p2),
            (Location::Dir { path }, Location::Dir { path: p2 }) => {
                path.starts_with(p2) || p2.starts_with(path)
            }
            _ => false,
        }
    }
}

/// Whether one `/`-separated path is inside the other (or they are equal;
/// the empty path holds everything).
fn nested(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_end_matches('/'), b.trim_end_matches('/'));
    a == b
        || a.is_empty()
        || b.is_empty()
        || a.starts_with(&format!("{b}/"))
        || b.starts_with(&format!("{a}/"))
}

/// Where a clone is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// An object store, as a mirror of the snapshot when `mirror` (objects
    /// the snapshot does not have are deleted).
    Objects { location: Location, mirror: bool },
    /// A Postgres catalog (its connection URL, checked at parse; only its
    /// hosts and database are ever shown).
    Catalog { url: String },
    /// A sink the operator declared (`sink://NAME[/path]`), and the path
    /// under its prefix (empty: the prefix itself; always empty for a
    /// catalog).
    Declared {
        sink: String,
        path: String,
        mirror: bool,
        /// What the name stood for when the job was accepted, so that jobs
        /// take turns only where they can touch the same objects.
        #[serde(default)]
        place: Place,
    },
}

/// What a declared sink is, as far as jobs sharing it go (no credentials,
/// no hosts: those stay in the node's config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Place {
    /// One set of objects every allowed tenant writes.
    #[default]
    Shared,
    /// This tenant's own part of the sink's objects.
    Tenant(String),
    /// A catalog: its commits are transactions, so jobs never wait for
    /// each other.
    Catalog,
}

impl Destination {
    /// Parses and checks a destination URL.
    pub fn parse(url: &str) -> Result<Destination> {
        if url.starts_with(DECLARED) {
            let (sink, path, mirror) = declared(url, "sink")?;
            return Ok(Destination::Declared {
                sink,
                path,
                mirror,
                place: Place::Shared,
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            crate::sink::catalog::check_url(url)?;
            return Ok(Destination::Catalog {
                url: url.to_string(),
            });
        }
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::InvalidArgument(format!("sink {url:?}: {e}")))?;
        let mut mirror = false;
        for (k, v) in parsed.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("mirror", "true" | "1" | "yes") => mirror = true,
                ("mirror", "false" | "0" | "no") => mirror = false,
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "sink {url:?}: unknown option {k}={v} (known: mirror=true|false)"
                    )))
                }
            }
        }
        let location = match parsed.scheme() {
            "file" | "s3" => location(&parsed, url, "sink")?,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "sink {url:?}: scheme {other}:// is not a sink (supported: sink://, file://, s3://, postgres://)"
                )))
            }
        };
        Ok(Destination::Objects { location, mirror })
    }

    /// The destination as users see it: catalog passwords are never shown.
    pub fn display(&self) -> String {
        match self {
            Destination::Objects { location, mirror } => {
                let url = location.url();
                if *mirror {
                    format!("{url}?mirror=true")
                } else {
                    url
                }
            }
            Destination::Catalog { url } => crate::sink::catalog::public_url(url),
            Destination::Declared {
                sink, path, mirror, ..
            } => {
                let url = declared_url(sink, path);
                if *mirror {
                    format!("{url}?mirror=true")
                } else {
                    url
                }
            }
        }
    }

    /// Whether two jobs writing these must take turns. Catalogs never
    /// overlap: their commits are transactions.
    pub fn overlaps(&self, other: &Destination) -> bool {
        match (self, other) {
            (
                Destination::Objects { location: a, .. },
                Destination::Objects { location: b, .. },
            ) => a.overlaps(b),
            (
                Destination::Declared {
                    sink, path, place, ..
                },
                Destination::Declared {
                    sink: s2,
                    path: p2,
                    place: place2,
                    ..
                },
            ) => sink == s2 && place == place2 && *place != Place::Catalog && nested(path, p2),
            _ => false,
        }
    }
}

const DECLARED: &str = "sink://";

fn declared_url(sink: &str, path: &str) -> String {
    if path.is_empty() {
        format!("{DECLARED}{sink}")
    } else {
        format!("{DECLARED}{sink}/{path}")
    }
}

/// `sink://NAME[/path][?mirror=true]` as (name, path, mirror); `what` is
/// "sink" or "source" (which takes no options).
fn declared(url: &str, what: &str) -> Result<(String, String, bool)> {
    let bad = |why: String| Error::InvalidArgument(format!("{what} {url:?}: {why}"));
    let rest = url.strip_prefix(DECLARED).unwrap_or(url);
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (name, path) = rest.split_once('/').unwrap_or((rest, ""));
    crate::path::validate_name("sink", name).map_err(|e| bad(e.to_string()))?;
    let path = path.trim_matches('/');
    if path
        .split('/')
        .any(|p| matches!(p, "." | "..") || (p.is_empty() && !path.is_empty()))
    {
        return Err(bad(format!("bad path {path:?} (empty, . or .. parts)")));
    }
    object_store::path::Path::parse(path).map_err(|e| bad(format!("bad path: {e}")))?;
    let mut mirror = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match (what, k.as_ref(), v.as_ref()) {
            ("sink", "mirror", "true" | "1" | "yes") => mirror = true,
            ("sink", "mirror", "false" | "0" | "no") => mirror = false,
            ("sink", ..) => {
                return Err(bad(format!(
                    "unknown option {k}={v} (known: mirror=true|false)"
                )))
            }
            _ => return Err(bad("a source takes no options".into())),
        }
    }
    Ok((name.to_string(), path.to_string(), mirror))
}

/// What a clone job reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// A local directory on the node.
    Dir { path: PathBuf },
    /// The objects under an S3 prefix.
    Objects { location: Location },
    /// The objects under a path of a sink the operator declared
    /// (`sink://NAME[/path]`).
    Declared { sink: String, path: String },
    /// A stored snapshot of a dataset of the same tenant (the latest when
    /// `snapshot` is `None`): a metadata-only clone.
    Snapshot {
        dataset: String,
        snapshot: Option<SnapshotId>,
    },
}

impl Source {
    /// Parses and checks a source URL.
    pub fn parse(url: &str) -> Result<Source> {
        if let Some(rest) = url.strip_prefix("snapshot://") {
            let (dataset, snapshot) = match rest.split_once('@') {
                Some((d, s)) => (d, Some(s.parse::<SnapshotId>()?)),
                None => (rest, None),
            };
            crate::path::validate_name("dataset", dataset)?;
            return Ok(Source::Snapshot {
                dataset: dataset.to_string(),
                snapshot,
            });
        }
        if url.starts_with(DECLARED) {
            let (sink, path, _) = declared(url, "source")?;
            return Ok(Source::Declared { sink, path });
        }
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::InvalidArgument(format!("source {url:?}: {e}")))?;
        if parsed.query().is_some() {
            return Err(Error::InvalidArgument(format!(
                "source {url:?}: a source takes no options"
            )));
        }
        if !matches!(parsed.scheme(), "file" | "s3") {
            return Err(Error::InvalidArgument(format!(
                "source {url:?}: supported sources are sink://NAME[/path], file:///abs/path, s3://bucket/prefix and snapshot://NAME[@ID]"
            )));
        }
        Ok(match location(&parsed, url, "source")? {
            Location::Dir { path } => Source::Dir { path },
            location => Source::Objects { location },
        })
    }

    /// The source as a URL, for listings.
    pub fn display(&self) -> String {
        match self {
            Source::Dir { path } => format!("file://{}", path.display()),
            Source::Objects { location } => location.url(),
            Source::Declared { sink, path } => declared_url(sink, path),
            Source::Snapshot {
                dataset,
                snapshot: Some(id),
            } => format!("snapshot://{dataset}@{id}"),
            Source::Snapshot { dataset, .. } => format!("snapshot://{dataset}"),
        }
    }
}

/// The location of a `file://` or `s3://` URL.
fn location(parsed: &url::Url, url: &str, what: &str) -> Result<Location> {
    match parsed.scheme() {
        "file" => {
            let path = parsed.to_file_path().map_err(|_| {
                Error::InvalidArgument(format!("{what} {url:?} is not an absolute file:// path"))
            })?;
            // Specs are stored as text (JSON, in the Raft log).
            if path.to_str().is_none() {
                return Err(Error::InvalidArgument(format!(
                    "{what} {url:?}: the path is not UTF-8"
                )));
            }
            Ok(Location::Dir { path })
        }
        "s3" => {
            let bucket = parsed.host_str().unwrap_or_default();
            if bucket.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{what} {url:?}: no bucket (expected s3://bucket/prefix)"
                )));
            }
            let prefix = parsed.path().trim_matches('/');
            // object_store's own rules for a path (no empty or `.` parts).
            object_store::path::Path::parse(prefix)
                .map_err(|e| Error::InvalidArgument(format!("{what} {url:?}: bad prefix: {e}")))?;
            Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            })
        }
        other => Err(Error::InvalidArgument(format!(
            "{what} {url:?}: scheme {other}:// is not supported here"
        ))),
    }
}

/// Deserializes a [`Source`] written either typed or, by the release
/// before typed specs, as its URL.
pub fn source_compat<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Source, D::Error> {
    match Compat::<Source>::deserialize(d)? {
        Compat::Typed(s) => Ok(s),
        Compat::Url(url) => Source::parse(&url).map_err(serde::de::Error::custom),
    }
}

/// Deserializes [`Destination`]s written either typed or, by the release
/// before typed specs, as their URLs.
pub fn destinations_compat<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Destination>, D::Error> {
    Vec::<Compat<Destination>>::deserialize(d)?
        .into_iter()
        .map(|c| match c {
            Compat::Typed(x) => Ok(x),
            Compat::Url(url) => Destination::parse(&url).map_err(serde::de::Error::custom),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Compat<T> {
    Typed(T),
    Url(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_once_into_typed_values() {
        assert_eq!(
            Destination::parse("s3://b/some/prefix/?mirror=true").unwrap(),
            Destination::Objects {
                location: Location::S3 {
                    bucket: "b".into(),
                    prefix: "some/prefix".into()
                },
                mirror: true
            }
        );
        assert_eq!(
            Destination::parse("file:///tmp/out").unwrap(),
            Destination::Objects {
                location: Location::Dir {
                    path: "/tmp/out".into()
                },
                mirror: false
            }
        );
        let pg = Destination::parse("postgres://u:secret@127.0.0.1:5/db").unwrap();
        assert!(matches!(pg, Destination::Catalog { .. }));
        assert!(!pg.display().contains("secret"), "{}", pg.display());
        assert_eq!(
            Source::parse("snapshot://ds").unwrap(),
            Source::Snapshot {
                dataset: "ds".into(),
                snapshot: None
            }
        );
        assert!(matches!(
            Source::parse("s3://b/p").unwrap(),
            Source::Objects { .. }
        ));
        assert_eq!(
            Source::parse("file:///data").unwrap(),
            Source::Dir {
                path: "/data".into()
            }
        );
        for bad in [
            "http://x/y",
            "s3:///nobucket",
            "file://relative",
            "file:///tmp/%FF",
            "snapshot://../x",
            "snapshot://ds@nothex",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Destination::parse("sink://archive/team/ds/?mirror=true").unwrap(),
            Destination::Declared {
                sink: "archive".into(),
                path: "team/ds".into(),
                mirror: true,
                place: Place::Shared,
            }
        );
        assert_eq!(
            Destination::parse("sink://archive/team/ds?mirror=true")
                .unwrap()
                .display(),
            "sink://archive/team/ds?mirror=true"
        );
        assert_eq!(
            Source::parse("sink://archive").unwrap(),
            Source::Declared {
                sink: "archive".into(),
                path: String::new()
            }
        );
        assert_eq!(
            Source::parse("sink://archive/a/b").unwrap().display(),
            "sink://archive/a/b"
        );
        for bad in [
            "sink://archive/a?mirror=true",
            "sink://../x",
            "sink://",
            "sink://a/../b",
            "sink://a/b//c",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "ftp://x",
            "s3://b/p?mirrors=1",
            "file:///x?mirror=maybe",
            "sink://a/./b",
            "sink://a?mirror=maybe",
            "sink://a b",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlapping_locations() {
        let d = |u: &str| Destination::parse(u).unwrap();
        assert!(d("s3://b/p").overlaps(&d("s3://b/p/?mirror=true")));
        assert!(d("s3://b/p").overlaps(&d("s3://b/p/q")));
        assert!(d("s3://b").overlaps(&d("s3://b/p")));
        assert!(!d("s3://b/p").overlaps(&d("s3://b/pq")));
        assert!(!d("s3://b/p").overlaps(&d("s3://c/p")));
        assert!(d("file:///a/b").overlaps(&d("file:///a")));
        assert!(!d("file:///a/b").overlaps(&d("file:///a/c")));
        assert!(!d("postgres://u@h/db").overlaps(&d("postgres://u@h/db")));
        assert!(d("sink://a").overlaps(&d("sink://a/x?mirror=true")));
        assert!(d("sink://a/x").overlaps(&d("sink://a/x/y")));
        assert!(!d("sink://a/x").overlaps(&d("sink://a/xy")));
        assert!(!d("sink://a/x").overlaps(&d("sink://b/x")));
        let placed = |u: &str, p: Place| match d(u) {
            Destination::Declared {
                sink, path, mirror, ..
            } => Destination::Declared {
                sink,
                path,
                mirror,
                place: p,
            },
            other => other,
        };
        let mine = |t: &str| Place::Tenant(t.into());
        assert!(placed("sink://a/x", mine("t")).overlaps(&placed("sink://a", mine("t"))));
        assert!(!placed("sink://a/x", mine("t")).overlaps(&placed("sink://a/x", mine("u"))));
        assert!(!placed("sink://c", Place::Catalog).overlaps(&placed("sink://c", Place::Catalog)));
        // Only hosts and database are shown of a catalog URL.
        let pg = d("postgres://u:pw@h:5/db?pass%77ord=x&sslmode=disable");
        assert_eq!(pg.display(), "postgres://h:5/db");
    }

    #[test]
    fn specs_written_as_urls_by_the_previous_release_still_read() {
        #[derive(Deserialize)]
        struct Old {
            #[serde(deserialize_with = "source_compat")]
            source: Source,
            #[serde(deserialize_with = "destinations_compat")]
            destinations: Vec<Destination>,
        }
        let old: Old = serde_json::from_str(
            r#"{"source":"snapshot://ds","destinations":["file:///o?mirror=true"]}"#,
        )
        .unwrap();
        assert_eq!(old.source, Source::parse("snapshot://ds").unwrap());
        assert_eq!(
            old.destinations,
            vec![Destination::parse("file:///o?mirror=true").unwrap()]
        );
        // And the typed form round-trips.
        let typed = serde_json::json!({
            "source": Source::parse("s3://b/p").unwrap(),
            "destinations": [Destination::parse("postgres://u@h/db").unwrap()],
        });
        let back: Old = serde_json::from_value(typed).unwrap();
        assert!(matches!(back.source, Source::Objects { .. }));
    }
}
