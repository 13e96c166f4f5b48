//! Every request a sink makes (S3 or directory object-store calls,
//! catalog transactions), reported to one process-wide observer: the node
//! installs one that feeds its metrics; a process without one pays a
//! clock read per request.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

/// Receives each request a sink made.
pub trait RequestObserver: Send + Sync + 'static {
    /// One request to a sink of `kind` (`s3`, `dir` or `catalog`): the
    /// operation (`put`, `get`, `head`, `list`, `delete`, `copy`,
    /// `put_part`, `complete`, `abort`, or a catalog step such as
    /// `commit`), whether it succeeded, how long it took and the payload
    /// bytes it carried (0 when none or unknown).
    fn request(&self, kind: &'static str, op: &'static str, ok: bool, seconds: f64, bytes: u64);
}

static OBSERVER: OnceLock<Arc<dyn RequestObserver>> = OnceLock::new();

/// Installs the process's observer; false if one was installed before
/// (the first stays).
pub fn set_observer(o: Arc<dyn RequestObserver>) -> bool {
    OBSERVER.set(o).is_ok()
}

pub(crate) fn observe(
    kind: &'static str,
    op: &'static str,
    ok: bool,
    started: Instant,
    bytes: u64,
) {
    if let Some(o) = OBSERVER.get() {
        o.request(kind, op, ok, started.elapsed().as_secs_f64(), bytes);
    }
}

/// An object store whose every request is reported as `kind`.
#[derive(Debug)]
pub(crate) struct Observed {
    inner: Arc<dyn ObjectStore>,
    kind: &'static str,
}

impl Observed {
    pub(crate) fn wrap(inner: Arc<dyn ObjectStore>, kind: &'static str) -> Arc<dyn ObjectStore> {
        Arc::new(Observed { inner, kind })
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait::async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for Observed {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let (t, bytes) = (Instant::now(), payload.content_length() as u64);
        let r = self.inner.put_opts(location, payload, opts).await;
        observe(self.kind, "put", r.is_ok(), t, bytes);
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let t = Instant::now();
        let r = self.inner.put_multipart_opts(location, opts).await;
        observe(self.kind, "create_multipart", r.is_ok(), t, 0);
        Ok(Box::new(ObservedUpload {
            inner: r?,
            kind: self.kind,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        // A head is a get without the body.
        let op = if options.head { "head" } else { "get" };
        let t = Instant::now();
        let r = self.inner.get_opts(location, options).await;
        // The body streams after this; its length is what was asked for.
        let bytes = match &r {
            Ok(g) if op == "get" => g.range.end.saturating_sub(g.range.start),
            _ => 0,
        };
        observe(self.kind, op, r.is_ok(), t, bytes);
        r
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let t = Instant::now();
        let r = self.inner.get_ranges(location, ranges).await;
        let bytes = r
            .as_ref()
            .map(|v| v.iter().map(|b| b.len() as u64).sum())
            .unwrap_or(0);
        observe(self.kind, "get", r.is_ok(), t, bytes);
        r
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // One result per object; each is timed from the one before.
        let kind = self.kind;
        let mut last = Instant::now();
        self.inner
            .delete_stream(locations)
            .inspect(move |r| {
                observe(kind, "delete", r.is_ok(), last, 0);
                last = Instant::now();
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        observed_list(self.kind, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        observed_list(self.kind, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let t = Instant::now();
        let r = self.inner.list_with_delimiter(prefix).await;
        observe(self.kind, "list", r.is_ok(), t, 0);
        r
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let t = Instant::now();
        let r = self.inner.copy_opts(from, to, options).await;
        observe(self.kind, "copy", r.is_ok(), t, 0);
        r
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        let t = Instant::now();
        let r = self.inner.rename_opts(from, to, options).await;
        observe(self.kind, "rename", r.is_ok(), t, 0);
        r
    }
}

/// A listing is one request however many pages it takes: reported when
/// it ends (or fails).
fn observed_list(
    kind: &'static str,
    inner: BoxStream<'static, object_store::Result<ObjectMeta>>,
) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
    let t = Instant::now();
    let mut reported = false;
    inner
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .filter_map(move |item| {
            let out = match item {
                Some(Err(e)) => {
                    if !reported {
                        observe(kind, "list", false, t, 0);
                        reported = true;
                    }
                    Some(Err(e))
                }
                Some(ok) => Some(ok),
                None => {
                    if !reported {
                        observe(kind, "list", true, t, 0);
                        reported = true;
                    }
                    None
                }
            };
            futures::future::ready(out)
        })
        .boxed()
}

#[derive(Debug)]
struct ObservedUpload {
    inner: Box<dyn MultipartUpload>,
    kind: &'static str,
}

#[async_trait::async_trait]
impl MultipartUpload for ObservedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let (kind, t, bytes) = (self.kind, Instant::now(), data.content_length() as u64);
        let part = self.inner.put_part(data);
        Box::pin(async move {
            let r = part.await;
            observe(kind, "put_part", r.is_ok(), t, bytes);
            r
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let t = Instant::now();
        let r = self.inner.complete().await;
        observe(self.kind, "complete_multipart", r.is_ok(), t, 0);
        r
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let t = Instant::now();
        let r = self.inner.abort().await;
        observe(self.kind, "abort_multipart", r.is_ok(), t, 0);
        r
    }
}
