//! Rust SDK for BitClone: connect to any node of a cluster, upload a local
//! directory as a snapshot of a dataset, download snapshots, submit, watch
//! and cancel clone jobs, and read the node's catalog and statistics.
//!
//! A [`Client`] knows every endpoint it was given: unary calls that find a
//! node unavailable move on to the next one.
//!
//! ```no_run
//! use std::path::Path;
//!
//! use bitclone_client::{is_final, Client, ConnectOptions, NoProgress};
//! use futures::StreamExt;
//!
//! # async fn run() -> bitclone_client::Result<()> {
//! // TLS, checked against the cluster's CA; a bearer token (JWT) naming the
//! // tenant and the scopes (read, write) the calls need.
//! let options = ConnectOptions::new()
//!     .ca_pem(std::fs::read("/etc/bitclone/ca.pem").unwrap())
//!     .token(std::env::var("BITCLONE_TOKEN").unwrap());
//! let client = Client::connect_with(["https://127.0.0.1:7443", "https://127.0.0.1:7444"], options)
//!     .await?
//!     .with_tenant("acme");
//!
//! // Upload a directory; unchanged files (same size, mtime and mode as in the
//! // dataset's latest snapshot) are not read again.
//! let up = client.upload_dir("photos", Path::new("/data/photos"), &NoProgress).await?;
//! println!("snapshot {}: {} new bytes", up.snapshot, up.new_bytes);
//!
//! // Clone the snapshot to a directory and follow the job to its end.
//! let source = format!("snapshot://photos@{}", up.snapshot);
//! let job = client
//!     .submit_clone("photos", &source, &["file:///backup/photos".to_string()], 0)
//!     .await?;
//! let mut updates = client.watch_job(&job.id).await?;
//! while let Some(job) = updates.next().await {
//!     let job = job?;
//!     if is_final(job.state) {
//!         println!("job {} ended: {:?}", job.id, job.state());
//!     }
//! }
//!
//! // Restore the latest snapshot somewhere else.
//! client.download("photos", None, Path::new("/tmp/photos"), &NoProgress).await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod download;
mod error;
mod pages;
mod upload;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitclone_proto::v1::bit_clone_client::BitCloneClient;
use bitclone_proto::DEFAULT_MAX_MESSAGE_BYTES;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Wire types of the BitClone API (`bitclone.v1`): [`proto::Job`],
/// [`proto::SnapshotInfo`], [`proto::JobState`], ...
pub use bitclone_proto::v1 as proto;
pub use error::{Error, Result};
pub use pages::PageCounts;

/// Tenant used until [`Client::with_tenant`] sets another.
const DEFAULT_TENANT: &str = "default";
/// How long a TCP connect to one endpoint may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an endpoint has to connect before the next one is tried
/// alongside it.
const CONNECT_STAGGER: Duration = Duration::from_millis(300);
/// HTTP/2 flow-control windows: large enough for 1 MiB data frames to stream
/// without waiting for window updates.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 pings on open connections so a dead node is noticed during long
/// streams (watch, download).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Progress reporting for long transfers; the CLI implements it with a
/// progress bar. Every method has an empty default.
pub trait Progress: Send + Sync {
    /// The number of bytes the transfer will move (known once the transfer
    /// has been planned).
    fn set_total(&self, _bytes: u64) {}
    /// `bytes` more bytes were sent or received.
    fn advance(&self, _bytes: u64) {}
    /// A short human-readable note about the current phase.
    fn message(&self, _msg: &str) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// What [`Client::upload_dir`] did.
#[derive(Debug, Clone)]
pub struct UploadSummary {
    /// Id of the new snapshot.
    pub snapshot: String,
    /// Regular files in the snapshot.
    pub files: u64,
    /// Bytes of all files in the snapshot.
    pub bytes: u64,
    /// Chunks the cluster did not have before this upload.
    pub new_chunks: u64,
    /// Bytes of those new chunks.
    pub new_bytes: u64,
    /// Chunks referenced by the snapshot.
    pub chunks: u64,
    /// Files sent as unchanged (same size, mtime and mode as in the parent).
    pub unchanged_files: u64,
    /// Symbolic links kept.
    pub symlinks: u64,
    /// Manifest pages the cluster did not have before (the rest are shared
    /// with earlier snapshots), and their bytes.
    pub new_pages: u64,
    /// Bytes of those pages.
    pub new_page_bytes: u64,
    /// Manifest pages of the parent read from the node and from the local
    /// cache while comparing against it.
    pub parent_pages: PageCounts,
    /// Relative paths of entries that are not uploaded: sockets, devices,
    /// and symbolic links leading out of the tree.
    pub skipped: Vec<String>,
    /// Wall-clock duration of the whole call.
    pub seconds: f64,
}

/// What [`Client::download`] did.
#[derive(Debug, Clone)]
pub struct DownloadSummary {
    /// Id of the snapshot downloaded.
    pub snapshot: String,
    /// Regular files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Wall-clock duration of the whole call.
    pub seconds: f64,
    /// Of `seconds`, the time the final `syncfs` took to make the small
    /// files, renames and directories durable: the disk's share, which a
    /// slow or busy disk dominates.
    pub sync_seconds: f64,
}

/// The name of a job state: `Pending`, `Running`, `Succeeded`, `Failed`,
/// `Cancelled`, or `Unknown` for a value this SDK does not know.
pub fn job_state_name(state: i32) -> &'static str {
    match proto::JobState::try_from(state) {
        Ok(proto::JobState::Pending) => "Pending",
        Ok(proto::JobState::Running) => "Running",
        Ok(proto::JobState::Succeeded) => "Succeeded",
        Ok(proto::JobState::Failed) => "Failed",
        Ok(proto::JobState::Cancelled) => "Cancelled",
        _ => "Unknown",
    }
}

/// Whether a job state (the `state` field of [`proto::Job`]) is final:
/// Succeeded, Failed or Cancelled. Unknown values are not final.
pub fn is_final(state: i32) -> bool {
    matches!(
        proto::JobState::try_from(state),
        Ok(proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled)
    )
}

/// How a [`Client`] reaches the nodes and who it calls them as.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    ca_pem: Option<Vec<u8>>,
    token: Option<String>,
    allow_plaintext: bool,
    request_id: Option<String>,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allow_plaintext", &self.allow_plaintext)
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl ConnectOptions {
    /// Default options: no token; `https://` endpoints verified against the
    /// public web PKI roots.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// Verifies the nodes' certificates against this CA (PEM) instead of the
    /// public roots, e.g. the cluster's dev CA (`<certs>/ca.pem`).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> ConnectOptions {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Sends this bearer token (a JWT) with every call.
    pub fn token(mut self, token: impl Into<String>) -> ConnectOptions {
        self.token = Some(token.into().trim().to_string());
        self
    }

    /// Allows a token over plain-text `http://`, to loopback addresses only
    /// (a node serving `api.plaintext` for local tests).
    pub fn allow_plaintext(mut self, allow: bool) -> ConnectOptions {
        self.allow_plaintext = allow;
        self
    }

    /// Sends this correlation id as `x-request-id` with every call, so the
    /// nodes' logs (and audit lines) of everything the calls cause carry it;
    /// without one each call gets an id of its own from the node.
    pub fn request_id(mut self, id: impl Into<String>) -> ConnectOptions {
        self.request_id = Some(id.into());
        self
    }
}

/// Whether a token may go to `endpoint` as given: always over TLS; over
/// plain text only when allowed and to a loopback address.
fn token_may_go_to(endpoint: &Endpoint, allow_plaintext: bool) -> bool {
    let uri = endpoint.uri();
    if uri.scheme_str() == Some("https") {
        return true;
    }
    let host = uri.host().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    allow_plaintext && loopback
}

/// Adds the bearer token (and the correlation id, if any) to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>, Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = &self.1 {
            request.metadata_mut().insert("x-request-id", v.clone());
        }
        Ok(request)
    }
}

type Grpc = BitCloneClient<InterceptedService<Channel, Bearer>>;

/// A connection to a BitClone cluster through any of its nodes.
///
/// Cheap to clone; clones share the connections and the notion of which
/// endpoint currently works.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    tenant: String,
    page_cache: Option<PathBuf>,
}

struct Shared {
    /// The endpoints as given, for errors and logs.
    endpoints: Vec<String>,
    /// One channel per endpoint (the same index); tonic channels reconnect
    /// by themselves, so they are created once.
    channels: Vec<Channel>,
    /// Index of the endpoint that answered last.
    current: AtomicUsize,
    bearer: Bearer,
}

impl Shared {
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.channels.len().max(1)
    }

    /// A gRPC client on the endpoint `index` with the message size limits set.
    fn grpc(&self, index: usize) -> Grpc {
        BitCloneClient::with_interceptor(self.channels[index].clone(), self.bearer.clone())
            .max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.shared.endpoints)
            .field("current", &self.shared.current())
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// Whether a failed call should be tried on the next endpoint: the node
/// could not be reached (connect failure, connection lost), so the request
/// was not processed there.
fn should_fail_over(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        // The generated client reports a channel that cannot become ready
        // this way.
        tonic::Code::Unknown => status.message().starts_with("Service was not ready"),
        _ => false,
    }
}

/// The error and its sources on one line (tonic's transport errors say
/// little at the top level).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn build_endpoint(url: &str, options: &ConnectOptions) -> Result<Endpoint> {
    // "host:port" without a scheme is taken as TLS.
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    let invalid = |source| Error::InvalidEndpoint {
        endpoint: url.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(full).map_err(invalid)?;
    if options.token.is_some() && !token_may_go_to(&endpoint, options.allow_plaintext) {
        return Err(Error::InsecureToken {
            endpoint: url.to_owned(),
        });
    }
    if endpoint.uri().scheme_str() == Some("https") {
        let tls = match &options.ca_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        endpoint = endpoint.tls_config(tls).map_err(invalid)?;
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT))
}

impl Client {
    /// Connects to the first reachable endpoint of the list (e.g.
    /// `"https://127.0.0.1:7443"`; a missing scheme means `https://`), with
    /// no token and the public web PKI roots, and
    /// remembers all of them for failover. Endpoints are tried in order, the
    /// next one starting alongside when the one before has not connected
    /// within 300 ms (a node that accepts connections but never answers
    /// costs that, not a whole connect timeout); the first to connect is
    /// used. The others are connected lazily, when a call first needs them.
    ///
    /// Fails with [`Error::NoEndpoints`] on an empty list,
    /// [`Error::InvalidEndpoint`] when one of them is not a URI and
    /// [`Error::Unavailable`] when none answers.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Client::connect_with(endpoints, ConnectOptions::default()).await
    }

    /// Like [`Client::connect`], with a CA, a token and whether plain text
    /// may carry the token. Fails with [`Error::InsecureToken`] when a token
    /// would go to an `http://` endpoint that is not allowed one.
    pub async fn connect_with<I, S>(endpoints: I, options: ConnectOptions) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let request_id = match &options.request_id {
            None => None,
            Some(id) => Some(id.parse().map_err(|_| {
                Error::Config("the request id has characters a header cannot carry".into())
            })?),
        };
        let bearer = match &options.token {
            None => Bearer(None, request_id),
            Some(t) => Bearer(
                Some(format!("Bearer {t}").parse().map_err(|_| {
                    Error::Config("the token has characters a header cannot carry".into())
                })?),
                request_id,
            ),
        };
        let urls: Vec<String> = endpoints
            .into_iter()
            .map(|url| url.as_ref().trim().to_owned())
            .filter(|url| !url.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let configured = urls
            .iter()
            .map(|url| build_endpoint(url, &options))
            .collect::<Result<Vec<Endpoint>>>()?;

        // Endpoints in order, each given CONNECT_STAGGER before the next
        // one is tried alongside it: a node that accepts TCP but never
        // answers (paused, overloaded) delays a connect by the stagger,
        // not by the whole connect timeout. The first to connect wins.
        let mut connected: Option<(usize, Channel)> = None;
        let mut failures = Vec::new();
        let mut attempts = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        while connected.is_none() && (next < configured.len() || !attempts.is_empty()) {
            if attempts.is_empty() || next < configured.len() {
                if let Some(endpoint) = configured.get(next) {
                    let index = next;
                    attempts.push(async move { (index, endpoint.connect().await) });
                    next += 1;
                }
            }
            let stagger = tokio::time::sleep(CONNECT_STAGGER);
            tokio::select! {
                Some((index, result)) = attempts.next() => match result {
                    Ok(channel) => connected = Some((index, channel)),
                    Err(error) => {
                        let error = error_chain(&error);
                        tracing::warn!(endpoint = %urls[index], %error, "cannot connect, trying the next endpoint");
                        failures.push(format!("{}: {error}", urls[index]));
                    }
                },
                // Only while another endpoint is left to start.
                _ = stagger, if next < configured.len() => {}
            }
        }
        let Some((current, channel)) = connected else {
            return Err(Error::Unavailable {
                endpoints: urls,
                message: failures.join("; "),
            });
        };

        // The reachable endpoint keeps its live channel; the others connect
        // when a failover first needs them.
        let mut live = Some(channel);
        let channels: Vec<Channel> = configured
            .iter()
            .enumerate()
            .map(|(index, endpoint)| {
                if index == current {
                    if let Some(channel) = live.take() {
                        return channel;
                    }
                }
                endpoint.connect_lazy()
            })
            .collect();
        tracing::debug!(endpoint = %urls[current], "connected");
        Ok(Client {
            shared: Arc::new(Shared {
                endpoints: urls,
                channels,
                current: AtomicUsize::new(current),
                bearer,
            }),
            tenant: DEFAULT_TENANT.to_owned(),
            page_cache: pages::default_cache_dir(),
        })
    }

    /// The same client acting for another tenant (the default is `"default"`).
    pub fn with_tenant(self, tenant: impl Into<String>) -> Client {
        Client {
            tenant: tenant.into(),
            ..self
        }
    }

    /// The same client keeping manifest pages in `dir` (`None`: no cache).
    /// The default comes from `BITCLONE_CACHE_DIR`, `XDG_CACHE_HOME` or
    /// `HOME` (`~/.cache/bitclone/pages`).
    pub fn with_page_cache(self, dir: Option<PathBuf>) -> Client {
        Client {
            page_cache: dir,
            ..self
        }
    }

    /// Where manifest pages are cached, if anywhere.
    pub fn page_cache(&self) -> Option<&Path> {
        self.page_cache.as_deref()
    }

    /// The tenant every call acts for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The endpoints this client fails over between, as given to
    /// [`Client::connect`].
    pub fn endpoints(&self) -> &[String] {
        &self.shared.endpoints
    }

    /// Runs one call, starting at the current endpoint. When the node is
    /// unavailable the next endpoint is tried (each one once, round robin);
    /// the endpoint that answers becomes the current one. Any other status
    /// is returned as [`Error::Status`].
    async fn call<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: Fn(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let count = self.shared.channels.len();
        let start = self.shared.current();
        let mut last_error = String::new();
        for step in 0..count {
            let index = (start + step) % count;
            match f(self.shared.grpc(index)).await {
                Ok(response) => {
                    if step > 0 {
                        self.shared.current.store(index, Ordering::Relaxed);
                        tracing::info!(endpoint = %self.shared.endpoints[index], "failed over");
                    }
                    return Ok(response.into_inner());
                }
                Err(status) if should_fail_over(&status) => {
                    tracing::warn!(
                        endpoint = %self.shared.endpoints[index],
                        error = %status.message(),
                        "node unavailable, trying the next endpoint"
                    );
                    last_error =
                        format!("{}: {}", self.shared.endpoints[index], error_chain(&status));
                }
                Err(status) => return Err(Error::Status(status)),
            }
        }
        Err(Error::Unavailable {
            endpoints: self.shared.endpoints.clone(),
            message: last_error,
        })
    }

    /// Uploads the tree under `dir` as a new snapshot of `dataset`.
    ///
    /// The dataset's latest snapshot (if any) is the parent: regular files
    /// whose size, mtime and mode match the parent's entry are sent as
    /// unchanged and not read. Every directory is sent (so empty ones
    /// survive); symbolic links and special files are skipped and listed in
    /// [`UploadSummary::skipped`]. File names must be valid UTF-8.
    ///
    /// The upload is not retried on another endpoint once it has started;
    /// if reading a local file fails, the call is cancelled so the node
    /// commits nothing, and the IO error is returned. Dropping the returned
    /// future cancels the upload the same way.
    pub async fn upload_dir(
        &self,
        dataset: &str,
        dir: &std::path::Path,
        progress: &dyn Progress,
    ) -> Result<UploadSummary> {
        upload::upload_dir(self, dataset, dir, progress).await
    }

    /// Downloads a snapshot of `dataset` (the latest when `snapshot` is
    /// `None`) into `dir`, which is created if missing.
    ///
    /// Paths from the server are checked (relative, no `.`/`..`, no NUL),
    /// nothing is written through a symbolic link inside `dir`, every file
    /// is written to a temporary name, checked against its BLAKE3 and only
    /// then renamed into place with its mode and mtime. Existing files of
    /// the same name are replaced; other files in `dir` are left alone.
    ///
    /// Not cancel-safe in the sense that a dropped call leaves the files
    /// written so far (but never a partial file under its final name).
    pub async fn download(
        &self,
        dataset: &str,
        snapshot: Option<&str>,
        dir: &std::path::Path,
        progress: &dyn Progress,
    ) -> Result<DownloadSummary> {
        download::download(self, dataset, snapshot, dir, progress).await
    }

    /// Submits a clone job of `source` (`file:///abs/path` on the node or
    /// `snapshot://NAME[@ID]`) into `dataset`, written out to
    /// `destinations`. `max_attempts` 0 means the node's default.
    ///
    /// Note: on failover the submission may be sent to a second node if
    /// the first one became unavailable while answering.
    pub async fn submit_clone(
        &self,
        dataset: &str,
        source: &str,
        destinations: &[String],
        max_attempts: u32,
    ) -> Result<proto::Job> {
        let request = proto::SubmitCloneRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
            source: source.to_owned(),
            destinations: destinations.to_vec(),
            max_attempts,
            reconcile: None,
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.submit_clone(request).await }
        })
        .await
    }

    /// Submits a reconcile job: each destination (as [`Client::submit_clone`]
    /// names them) is compared with a snapshot of `dataset` (the latest when
    /// `snapshot` is `None`): every file an object of the same size and
    /// BLAKE3 (`deep`: its bytes hashed, not its metadata trusted), nothing
    /// else in a mirror, the catalog's rows the snapshot's entries. Drift
    /// fails the job, naming it; with `repair` the drifted objects or rows
    /// are cleared and the snapshot written out again.
    pub async fn submit_reconcile(
        &self,
        dataset: &str,
        snapshot: Option<&str>,
        destinations: &[String],
        deep: bool,
        repair: bool,
    ) -> Result<proto::Job> {
        let source = match snapshot {
            Some(id) => format!("snapshot://{dataset}@{id}"),
            None => format!("snapshot://{dataset}"),
        };
        let request = proto::SubmitCloneRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
            source,
            destinations: destinations.to_vec(),
            max_attempts: 0,
            reconcile: Some(proto::ReconcileOptions { deep, repair }),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.submit_clone(request).await }
        })
        .await
    }

    /// The current state of a job.
    pub async fn get_job(&self, id: &str) -> Result<proto::Job> {
        let request = proto::JobRef { id: id.to_owned() };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.get_job(request).await }
        })
        .await
    }

    /// Asks for a job to be cancelled; returns the job as it is afterwards.
    pub async fn cancel_job(&self, id: &str) -> Result<proto::Job> {
        let request = proto::JobRef { id: id.to_owned() };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.cancel_job(request).await }
        })
        .await
    }

    /// The tenant's jobs.
    pub async fn list_jobs(&self) -> Result<Vec<proto::Job>> {
        let request = proto::ListJobsRequest {
            tenant: self.tenant.clone(),
        };
        let response = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.list_jobs(request).await }
            })
            .await?;
        Ok(response.jobs)
    }

    /// Stream of job updates until a final state (Succeeded/Failed/Cancelled).
    ///
    /// The first item is the job as it is now. The stream ends after the
    /// first job in a final state, or when the node closes it; an error
    /// item (e.g. the node went away) is the last item. Only opening the
    /// stream fails over to another endpoint; call again to resume.
    pub async fn watch_job(&self, id: &str) -> Result<BoxStream<'static, Result<proto::Job>>> {
        let request = proto::JobRef { id: id.to_owned() };
        let updates = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.watch_job(request).await }
            })
            .await?;
        let stream = futures::stream::unfold(Some(updates), |state| async move {
            let mut updates = match state {
                Some(updates) => updates,
                None => return None,
            };
            match updates.message().await {
                Ok(Some(job)) => {
                    let next = if is_final(job.state) {
                        None
                    } else {
                        Some(updates)
                    };
                    Some((Ok(job), next))
                }
                Ok(None) => None,
                Err(status) => Some((Err(Error::Status(status)), None)),
            }
        });
        Ok(stream.boxed())
    }

    /// The tenant's datasets.
    pub async fn list_datasets(&self) -> Result<Vec<proto::DatasetInfo>> {
        let request = proto::ListDatasetsRequest {
            tenant: self.tenant.clone(),
        };
        let response = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.list_datasets(request).await }
            })
            .await?;
        Ok(response.datasets)
    }

    /// The snapshots of one dataset.
    pub async fn list_snapshots(&self, dataset: &str) -> Result<Vec<proto::SnapshotInfo>> {
        let request = proto::ListSnapshotsRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
        };
        let response = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.list_snapshots(request).await }
            })
            .await?;
        Ok(response.snapshots)
    }

    /// The entries of a snapshot (the latest when `snapshot` is `None`),
    /// without chunk lists, in one answer: a snapshot of more than 10,000
    /// entries gives code `OutOfRange` (read those with
    /// [`Client::for_each_entry`]). A dataset without snapshots gives
    /// [`Error::Status`] with code `NotFound`.
    pub async fn get_manifest(
        &self,
        dataset: &str,
        snapshot: Option<&str>,
    ) -> Result<proto::GetManifestResponse> {
        let request = proto::GetManifestRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
            snapshot: snapshot.unwrap_or_default().to_owned(),
            paged: false,
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.get_manifest(request).await }
        })
        .await
    }

    /// Statistics of the node that answers.
    pub async fn stats(&self) -> Result<proto::StatsResponse> {
        self.call(|mut grpc| async move { grpc.stats(proto::StatsRequest {}).await })
            .await
    }

    /// Members, leader, term, indexes and shard layout as the answering node
    /// sees them.
    pub async fn cluster_status(&self) -> Result<proto::ClusterStatusResponse> {
        self.call(
            |mut grpc| async move { grpc.cluster_status(proto::ClusterStatusRequest {}).await },
        )
        .await
    }

    /// Creates tenant `tenant` with `shards` shards, or grows its shard
    /// count (it never shrinks); returns the new layout version.
    pub async fn set_tenant(&self, tenant: &str, shards: u32) -> Result<u64> {
        let tenant = tenant.to_string();
        self.call(move |mut grpc| {
            let tenant = tenant.clone();
            async move {
                grpc.set_tenant(proto::SetTenantRequest { tenant, shards })
                    .await
            }
        })
        .await
        .map(|r| r.layout_version)
    }

    /// Removes node `id` from the cluster (send it to the leader).
    pub async fn remove_node(&self, id: u64) -> Result<proto::ClusterStatusResponse> {
        self.call(
            move |mut grpc| async move { grpc.remove_node(proto::RemoveNodeRequest { id }).await },
        )
        .await
    }

    /// Drains node `id` (needs the `admin` scope; connect to that node's own
    /// address, the node refuses a drain meant for another). The node
    /// takes no new jobs, hands the jobs it runs to other nodes (their
    /// leases released), reports not ready and hands its Raft leadership
    /// to another voter, waiting up to `timeout` for both. It stays
    /// drained until it restarts.
    pub async fn drain_node(
        &self,
        id: u64,
        timeout: std::time::Duration,
    ) -> Result<proto::DrainNodeResponse> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        self.call(move |mut grpc| async move {
            grpc.drain_node(proto::DrainNodeRequest { id, timeout_ms })
                .await
        })
        .await
    }

    /// Sets a tenant's limits (needs the `admin` scope); 0 is no limit.
    /// Returns the bytes the tenant's snapshots added so far.
    pub async fn set_quota(
        &self,
        tenant: &str,
        max_stored_bytes: u64,
        max_jobs_in_flight: u32,
    ) -> Result<u64> {
        let request = proto::SetQuotaRequest {
            tenant: tenant.to_owned(),
            max_stored_bytes,
            max_jobs_in_flight,
        };
        let r = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.set_quota(request).await }
            })
            .await?;
        Ok(r.stored_bytes)
    }

    /// Deletes a snapshot of a dataset (needs `write`), named by its whole
    /// id. Deleting the head moves the head to the newest snapshot left
    /// (its parent unless that was deleted too); deleting the last leaves no
    /// dataset. Refused (`Aborted`) while a job not finished reads it. Its
    /// chunks are freed by garbage collection after the grace period.
    pub async fn delete_snapshot(
        &self,
        dataset: &str,
        snapshot: &str,
    ) -> Result<proto::DeleteResponse> {
        let request = proto::DeleteSnapshotRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
            snapshot: snapshot.to_owned(),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.delete_snapshot(request).await }
        })
        .await
    }

    /// Deletes a dataset with all its snapshots and its retention policy
    /// (needs `write`); refused (`Aborted`) while a job not finished reads
    /// or writes it.
    pub async fn delete_dataset(&self, dataset: &str) -> Result<proto::DeleteResponse> {
        let request = proto::DeleteDatasetRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.delete_dataset(request).await }
        })
        .await
    }

    /// Sets a dataset's retention policy (needs `write`); a policy of all
    /// zeros removes it. Returns the policy and what it would delete now;
    /// the leader deletes that within `gc.retention_every`.
    pub async fn set_retention(
        &self,
        dataset: &str,
        policy: proto::RetentionPolicy,
    ) -> Result<proto::RetentionResponse> {
        let request = proto::SetRetentionRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
            policy: Some(policy),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.set_retention(request).await }
        })
        .await
    }

    /// A dataset's retention policy and what it would delete now.
    pub async fn get_retention(&self, dataset: &str) -> Result<proto::RetentionResponse> {
        let request = proto::GetRetentionRequest {
            tenant: self.tenant.clone(),
            dataset: dataset.to_owned(),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.get_retention(request).await }
        })
        .await
    }

    /// Runs a garbage collection pass on the node that answers (needs the
    /// `admin` scope); with `dry_run`, says what it would free.
    pub async fn collect_garbage(&self, dry_run: bool) -> Result<proto::CollectGarbageResponse> {
        self.call(move |mut grpc| async move {
            grpc.collect_garbage(proto::CollectGarbageRequest { dry_run })
                .await
        })
        .await
    }

    /// Scrubs the node that answers (needs the `admin` scope): every chunk,
    /// page and snapshot root read and checked against its name, bad or
    /// missing ones replaced from other members; returns what it found.
    pub async fn scrub(&self) -> Result<proto::ScrubResponse> {
        self.call(|mut grpc| async move { grpc.scrub(proto::ScrubRequest {}).await })
            .await
    }

    /// Erases a tenant (needs the `admin` scope): stops its jobs, deletes
    /// its data in the sinks its operator declared `owned`, forgets its
    /// datasets, snapshots and jobs and purges its chunks from every node.
    /// Returns what was removed where; a node that did not purge within a
    /// minute is listed as not done (it purges when it runs again). Run it
    /// again after an error: it goes on from where it stopped.
    pub async fn erase_tenant(&self, tenant: &str) -> Result<proto::EraseTenantResponse> {
        let request = proto::EraseTenantRequest {
            tenant: tenant.to_owned(),
        };
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.erase_tenant(request).await }
        })
        .await
    }

    /// Runs a cold tier pass on the node called (needs the `admin` scope).
    pub async fn tier(&self) -> Result<proto::TierResponse> {
        self.call(|mut grpc| async move { grpc.tier(proto::TierRequest {}).await })
            .await
    }

    /// The encrypted tenants and their data keys' fingerprints (needs the
    /// `admin` scope); `tenant`: just that one.
    pub async fn tenant_keys(&self, tenant: Option<&str>) -> Result<Vec<proto::TenantKeyInfo>> {
        self.keys_call(proto::tenant_keys_request::Action::List, tenant)
            .await
    }

    /// Encrypts a tenant that has no data yet (needs the `admin` scope):
    /// its chunks and manifests are sealed with a data key of its own from
    /// now on, wrapped by the nodes' key-encryption key.
    pub async fn encrypt_tenant(&self, tenant: &str) -> Result<proto::TenantKeyInfo> {
        let mut keys = self
            .keys_call(proto::tenant_keys_request::Action::Encrypt, Some(tenant))
            .await?;
        keys.pop().ok_or_else(|| Error::Protocol {
            message: "the node answered with no key".into(),
        })
    }

    /// Re-wraps the data key of `tenant` (or of every encrypted tenant)
    /// with the nodes' current key-encryption key (needs the `admin`
    /// scope); no chunk is rewritten.
    pub async fn rewrap_tenant_keys(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<proto::TenantKeyInfo>> {
        self.keys_call(proto::tenant_keys_request::Action::Rewrap, tenant)
            .await
    }

    async fn keys_call(
        &self,
        action: proto::tenant_keys_request::Action,
        tenant: Option<&str>,
    ) -> Result<Vec<proto::TenantKeyInfo>> {
        let request = proto::TenantKeysRequest {
            action: action as i32,
            tenant: tenant.unwrap_or_default().to_owned(),
        };
        let r = self
            .call(|mut grpc| {
                let request = request.clone();
                async move { grpc.tenant_keys(request).await }
            })
            .await?;
        Ok(r.keys)
    }

    /// Lets a removed node join the cluster again (needs the `admin`
    /// scope).
    pub async fn allow_rejoin(&self, id: u64) -> Result<proto::ClusterStatusResponse> {
        self.call(move |mut grpc| async move {
            grpc.allow_rejoin(proto::RemoveNodeRequest { id }).await
        })
        .await
    }

    /// A gRPC client on the current endpoint, for streaming calls that are
    /// not retried elsewhere once started.
    pub(crate) fn current_grpc(&self) -> Grpc {
        self.shared.grpc(self.shared.current())
    }

    /// Starts a download stream, failing over like unary calls until the
    /// node accepts the call.
    pub(crate) async fn open_download(
        &self,
        request: proto::DownloadRequest,
    ) -> Result<tonic::Streaming<proto::DownloadResponse>> {
        self.call(|mut grpc| {
            let request = request.clone();
            async move { grpc.download(request).await }
        })
        .await
    }
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => Err(Error::Internal {
            message: format!("blocking task failed: {error}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states() {
        assert!(is_final(proto::JobState::Succeeded as i32));
        assert!(is_final(proto::JobState::Failed as i32));
        assert!(is_final(proto::JobState::Cancelled as i32));
        assert!(!is_final(proto::JobState::Unspecified as i32));
        assert!(!is_final(proto::JobState::Pending as i32));
        assert!(!is_final(proto::JobState::Running as i32));
        assert!(!is_final(99));
        assert!(!is_final(-1));
    }

    #[test]
    fn failover_only_when_unreachable() {
        assert!(should_fail_over(&tonic::Status::unavailable("down")));
        assert!(should_fail_over(&tonic::Status::unknown(
            "Service was not ready: transport error"
        )));
        assert!(!should_fail_over(&tonic::Status::unknown("boom")));
        assert!(!should_fail_over(&tonic::Status::not_found("no such job")));
        assert!(!should_fail_over(&tonic::Status::invalid_argument("bad")));
    }

    #[test]
    fn endpoints_without_scheme_get_tls() {
        let o = ConnectOptions::new();
        let e = build_endpoint("127.0.0.1:7443", &o).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
        assert!(build_endpoint("http://127.0.0.1:7443", &o).is_ok());
        assert!(matches!(
            build_endpoint("http://[::1:7443", &o),
            Err(Error::InvalidEndpoint { .. })
        ));
    }

    #[tokio::test]
    async fn connect_needs_an_endpoint() {
        let empty: [&str; 0] = [];
        assert!(matches!(
            Client::connect(empty).await,
            Err(Error::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn connect_fails_when_nothing_listens() -> anyhow::Result<()> {
        // Bind then drop a listener to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let result = Client::connect([format!("http://127.0.0.1:{port}")]).await;
        assert!(matches!(result, Err(Error::Unavailable { .. })));
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_endpoint_does_not_hold_up_the_next_one() -> anyhow::Result<()> {
        // The kernel completes TCP handshakes on a listener that never
        // accepts: TLS to it waits for a ServerHello that never comes (a
        // paused node). Plain HTTP/2 to the other needs no answer to connect.
        let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
        let other = std::net::TcpListener::bind("127.0.0.1:0")?;
        let urls = [
            format!("https://127.0.0.1:{}", silent.local_addr()?.port()),
            format!("http://127.0.0.1:{}", other.local_addr()?.port()),
        ];
        // Trying them one after the other could not connect before the
        // silent one's connect timeout.
        let client = tokio::time::timeout(CONNECT_TIMEOUT - Duration::from_secs(1), async {
            Client::connect(urls.clone()).await
        })
        .await
        .map_err(|_| anyhow::anyhow!("connect waited for the silent endpoint"))??;
        assert_eq!(client.shared.current.load(Ordering::Relaxed), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_token_goes_in_plain_text_only_to_loopback_when_allowed() {
        let ok = |url: &str, allow: bool| {
            let options = ConnectOptions::new().token("t").allow_plaintext(allow);
            !matches!(
                build_endpoint(url, &options),
                Err(Error::InsecureToken { .. })
            )
        };
        assert!(ok("https://db.example:7443", false));
        assert!(ok("db.example:7443", false), "no scheme means TLS");
        assert!(!ok("http://127.0.0.1:7443", false));
        assert!(ok("http://127.0.0.1:7443", true));
        assert!(ok("http://[::1]:7443", true));
        assert!(ok("http://localhost:7443", true));
        assert!(!ok("http://10.0.0.5:7443", true));
        assert!(!ok("http://db.example:7443", true));
        // Without a token plain text is the server's business.
        assert!(build_endpoint("http://10.0.0.5:7443", &ConnectOptions::new()).is_ok());
        let e = Client::connect_with(
            ["http://10.0.0.5:7443"],
            ConnectOptions::new().token("t").allow_plaintext(true),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("plain text"), "{e}");
    }
}
