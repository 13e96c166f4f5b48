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
    /// `rename`, `create_multipart`, `put_part`, `complete_multipart`,
    /// `abort_multipart`, or a catalog step such as `commit`), whether it
    /// succeeded, how long it took (for a `get`, until the body starts;
    /// for a `list` or `delete` stream, until it ends) and the payload
    /// bytes it carried (for a `get`, the bytes asked for; 0 when none or
    /// unknown).
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
        // The store batches and parallelises the deletes as it likes: the
        // stream is one request.
        observed(self.kind, "delete", self.inner.delete_stream(locations))
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        observed(self.kind, "list", self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        observed(
            self.kind,
            "list",
            self.inner.list_with_offset(prefix, offset),
        )
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

/// A stream of results (a listing however many pages it takes, a batch of
/// deletes) is one request: reported when it ends or first fails, timed
/// from its first poll.
fn observed<T: Send + 'static>(
    kind: &'static str,
    op: &'static str,
    inner: BoxStream<'static, object_store::Result<T>>,
) -> BoxStream<'static, object_store::Result<T>> {
    enum Step<T> {
        Start(Instant),
        Item(object_store::Result<T>),
        End,
    }
    let mut started = Instant::now();
    let mut reported = false;
    let mut report = move |ok: bool, started: Instant| {
        if !std::mem::replace(&mut reported, true) {
            observe(kind, op, ok, started, 0);
        }
    };
    futures::stream::once(async { Step::Start(Instant::now()) })
        .chain(inner.map(Step::Item))
        .chain(futures::stream::once(async { Step::End }))
        .filter_map(move |step| {
            let out = match step {
                Step::Start(t) => {
                    started = t;
                    None
                }
                Step::Item(Err(e)) => {
                    report(false, started);
                    Some(Err(e))
                }
                Step::Item(ok) => Some(ok),
                Step::End => {
                    report(true, started);
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(&'static str, bool, u64)>>);

    impl RequestObserver for Seen {
        fn request(&self, kind: &'static str, op: &'static str, ok: bool, _: f64, bytes: u64) {
            // Other tests in this process report here too (the observer is
            // process-wide): only this test's kind is kept.
            if kind == "under-test" {
                if let Ok(mut seen) = self.0.lock() {
                    seen.push((op, ok, bytes));
                }
            }
        }
    }

    #[tokio::test]
    async fn every_request_is_reported_once_and_streams_as_one() {
        let seen = Arc::new(Seen::default());
        assert!(set_observer(seen.clone()));
        let store = Observed::wrap(
            Arc::new(object_store::memory::InMemory::new()),
            "under-test",
        );
        let (a, b) = (Path::from("d/a"), Path::from("d/b"));
        store
            .put(&a, PutPayload::from_static(b"hello"))
            .await
            .unwrap();
        store.put(&b, PutPayload::from_static(b"hi")).await.unwrap();
        assert_eq!(store.head(&a).await.unwrap().size, 5);
        let got = store.get(&a).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"hello");
        assert!(store.get(&Path::from("d/none")).await.is_err());
        let listed: Vec<_> = store.list(Some(&Path::from("d"))).collect().await;
        assert_eq!(listed.len(), 2);
        let gone: Vec<_> = store
            .delete_stream(futures::stream::iter([Ok(a), Ok(b)]).boxed())
            .collect()
            .await;
        assert!(gone.iter().all(|r| r.is_ok()));
        let mut upload = store.put_multipart(&Path::from("d/big")).await.unwrap();
        upload
            .put_part(PutPayload::from(vec![7u8; 100]))
            .await
            .unwrap();
        upload.complete().await.unwrap();
        assert_eq!(
            *seen.0.lock().unwrap(),
            [
                ("put", true, 5),
                ("put", true, 2),
                ("head", true, 0),
                ("get", true, 5),
                ("get", false, 0),
                ("list", true, 0),
                ("delete", true, 0),
                ("create_multipart", true, 0),
                ("put_part", true, 100),
                ("complete_multipart", true, 0),
            ]
        );
    }
}
