//! Clone jobs as plain data, and the rules of their lifecycle:
//! Pending → Running → Succeeded | Failed | Cancelled, with attempts,
//! exponential backoff with jitter, and a checkpoint. No IO and no clock here:
//! the time comes in as an argument, so every rule is tested without a runtime.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Where a job got to; a retry resumes from here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Set once the source is ingested and committed as a snapshot.
    pub snapshot: Option<String>,
    /// Destinations fully written.
    pub destinations_done: usize,
    /// Within the current destination: next manifest entry, files and bytes
    /// written. No longer set (an export walks its destination again and
    /// skips what is already there); kept so older records still decode.
    pub next_entry: usize,
    pub files_done: u64,
    pub bytes_done: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub dataset: String,
    /// Parsed once at submit; records of the release before typed specs
    /// hold URLs, which still read.
    #[serde(deserialize_with = "bitclone_storage::sink::spec::source_compat")]
    pub source: Source,
    #[serde(deserialize_with = "bitclone_storage::sink::spec::destinations_compat")]
    pub destinations: Vec<Destination>,
    pub state: JobState,
    pub attempts: u32,
    pub max_attempts: u32,
    pub last_error: String,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
    pub next_attempt_unix_ms: i64,
    pub checkpoint: Checkpoint,
    pub progress: Progress,
    /// Set by a cancel request; a running job stops at its next check.
    pub cancel_requested: bool,
    /// Who may run the job until when.
    #[serde(default)]
    pub lease: Option<Lease>,
    /// Grows with every lease grant; every effect of the job carries it.
    #[serde(default)]
    pub fencing_token: u64,
    /// The correlation id of the call that submitted it: the job's log
    /// lines carry it.
    #[serde(default)]
    pub request_id: String,
    /// The submitting call's span as a W3C `traceparent` (empty when not
    /// traced): lease grants and runs of the job continue its trace.
    #[serde(default)]
    pub traceparent: String,
    /// A reconcile job: instead of writing the snapshot out, compare each
    /// destination with it (and with `repair`, write out what drifted).
    /// Absent from other jobs' records, which stay as earlier releases
    /// wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Reconcile>,
}

/// How a reconcile job checks and mends its destinations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconcile {
    /// Hash every object's bytes rather than trust its BLAKE3 metadata.
    pub deep: bool,
    /// Delete what drifted and write the snapshot out again; without it,
    /// drift fails the job, naming what drifted.
    pub repair: bool,
}

/// The right to run a job until a deadline, renewed by heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: u64,
    pub deadline_unix_ms: i64,
}

impl Lease {
    /// Whether the holder may still act at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.deadline_unix_ms >= now_ms
    }
}

pub use bitclone_storage::sink::{Destination, Source};
pub use bitclone_storage::Backoff;

/// Whether an error can go away by itself (retry) or not (fail now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    Transient,
    Permanent,
}

impl Job {
    /// Whether this job and `other` write overlapping sinks, so that they
    /// must not run at the same time.
    pub fn shares_a_sink(&self, other: &Job) -> bool {
        self.destinations
            .iter()
            .any(|a| other.destinations.iter().any(|b| a.overlaps(b)))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        tenant: String,
        dataset: String,
        source: Source,
        destinations: Vec<Destination>,
        max_attempts: u32,
        now_ms: i64,
    ) -> Job {
        Job {
            id,
            tenant,
            dataset,
            source,
            destinations,
            state: JobState::Pending,
            attempts: 0,
            max_attempts: max_attempts.max(1),
            last_error: String::new(),
            created_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            next_attempt_unix_ms: now_ms,
            checkpoint: Checkpoint::default(),
            progress: Progress::default(),
            cancel_requested: false,
            lease: None,
            fencing_token: 0,
            request_id: String::new(),
            traceparent: String::new(),
            reconcile: None,
        }
    }

    /// Running under a lease that has not lapsed: its holder may still make
    /// effects (it holds its sinks).
    pub fn is_held(&self, now_ms: i64) -> bool {
        self.state == JobState::Running && self.lease.is_some_and(|l| l.is_live(now_ms))
    }

    /// A pending job whose retry time has come.
    pub fn is_due(&self, now_ms: i64) -> bool {
        self.state == JobState::Pending && self.next_attempt_unix_ms <= now_ms
    }

    /// Pending → Running; counts the attempt.
    pub fn start(&mut self, now_ms: i64) {
        debug_assert_eq!(self.state, JobState::Pending);
        self.state = JobState::Running;
        self.attempts += 1;
        self.updated_unix_ms = now_ms;
    }

    pub fn succeed(&mut self, now_ms: i64) {
        self.state = JobState::Succeeded;
        self.last_error.clear();
        self.progress.phase = "done".into();
        self.updated_unix_ms = now_ms;
    }

    /// A failed attempt: retry later (Pending with a backoff) or, when the
    /// error is permanent or the attempts are used up, Failed.
    pub fn fail(
        &mut self,
        error: String,
        kind: Failure,
        backoff: Backoff,
        jitter: f64,
        now_ms: i64,
    ) {
        self.last_error = error;
        self.updated_unix_ms = now_ms;
        if kind == Failure::Permanent || self.attempts >= self.max_attempts {
            self.state = JobState::Failed;
            self.progress.phase = "failed".into();
        } else {
            self.state = JobState::Pending;
            self.progress.phase = "waiting to retry".into();
            let delay = backoff.delay(self.attempts, jitter);
            self.next_attempt_unix_ms = now_ms + delay.as_millis() as i64;
        }
    }

    /// Asks the job to stop. A job not running ends Cancelled at once (returns
    /// true); a running one is flagged and ends Cancelled when its worker sees it.
    pub fn request_cancel(&mut self, now_ms: i64) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.cancel_requested = true;
        self.updated_unix_ms = now_ms;
        if self.state == JobState::Pending {
            self.state = JobState::Cancelled;
            self.progress.phase = "cancelled".into();
            return true;
        }
        false
    }

    /// The worker stopped because of a cancel request.
    pub fn cancelled(&mut self, now_ms: i64) {
        self.state = JobState::Cancelled;
        self.progress.phase = "cancelled".into();
        self.updated_unix_ms = now_ms;
    }

    /// The node stopped (shutdown or crash) while the job ran: back to
    /// Pending, resuming from the checkpoint; the interrupted attempt does
    /// not count against the job.
    pub fn interrupted(&mut self, now_ms: i64) {
        if self.state == JobState::Running {
            self.state = JobState::Pending;
            self.attempts = self.attempts.saturating_sub(1);
            self.next_attempt_unix_ms = now_ms;
            self.progress.phase = "interrupted; will resume".into();
            self.updated_unix_ms = now_ms;
        }
    }
}

/// The lease holder's rule, as plain logic fed with instants: renew every
/// third of the lease; a renewal counts from when it was sent (the leader
/// grants the new deadline later than that, so counting from the send is
/// safe); after a whole lease without a successful renewal the holder stops
/// its job on its own, since it may already have been replaced. The async
/// heartbeat (node) is a thin driver around it.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    lease: Duration,
    /// When the last successful renewal (or the grant) was asked for.
    renewed: std::time::Instant,
}

/// What the cluster answered to a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease runs on; the job may have been asked to stop.
    Renewed { cancel_requested: bool },
    /// The state machine refused it: another holder, or the job moved on.
    Refused,
    /// No answer (no leader, a partition); the lease may still be live.
    Failed,
}

/// Why a holder gives up its lease and stops its job at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The cluster refused a renewal.
    LeaseLost,
    /// No renewal succeeded for a whole lease.
    NoRenewal,
}

impl LeaseHolder {
    /// A holder whose lease was asked for at `asked`.
    pub fn new(asked: std::time::Instant, lease: Duration) -> LeaseHolder {
        LeaseHolder {
            lease,
            renewed: asked,
        }
    }

    /// How often to renew (and publish progress).
    pub fn cadence(&self) -> Duration {
        self.lease / 3
    }

    /// Until when the holder may act without another successful renewal.
    pub fn deadline(&self) -> std::time::Instant {
        self.renewed + self.lease
    }

    /// Whether the holder must stop at `now` for want of a renewal.
    pub fn check(&self, now: std::time::Instant) -> Result<(), Stop> {
        if now >= self.deadline() {
            return Err(Stop::NoRenewal);
        }
        Ok(())
    }

    /// Takes the answer to a renewal sent at `sent`. `Ok(true)`: a cancel
    /// was requested, so the job stops, but the holder keeps renewing until
    /// the attempt has wound down and ended Cancelled under its lease.
    pub fn renewal(&mut self, sent: std::time::Instant, r: Renewal) -> Result<bool, Stop> {
        match r {
            Renewal::Renewed { cancel_requested } => {
                self.renewed = self.renewed.max(sent);
                Ok(cancel_requested)
            }
            Renewal::Refused => Err(Stop::LeaseLost),
            Renewal::Failed => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_stops_after_a_whole_lease_without_a_renewal() {
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        let mut h = LeaseHolder::new(t0, ms(3_000));
        assert_eq!(h.cadence(), ms(1_000));
        assert_eq!(h.check(t0 + ms(2_999)), Ok(()));
        assert_eq!(h.check(t0 + ms(3_000)), Err(Stop::NoRenewal));
        // A renewal counts from when it was sent, not when it came back.
        let renewed = Renewal::Renewed {
            cancel_requested: false,
        };
        assert_eq!(h.renewal(t0 + ms(1_000), renewed), Ok(false));
        assert_eq!(h.deadline(), t0 + ms(4_000));
        // Failed renewals move nothing; the lease runs out on its own.
        assert_eq!(h.renewal(t0 + ms(2_000), Renewal::Failed), Ok(false));
        assert_eq!(h.renewal(t0 + ms(3_000), Renewal::Failed), Ok(false));
        assert_eq!(h.check(t0 + ms(3_999)), Ok(()));
        assert_eq!(h.check(t0 + ms(4_000)), Err(Stop::NoRenewal));
        // An answer to an older request cannot move the deadline back.
        let mut h2 = h.clone();
        assert_eq!(h2.renewal(t0 + ms(500), renewed), Ok(false));
        assert_eq!(h2.deadline(), t0 + ms(4_000));
        // A refusal gives the lease up at once; a cancel stops the job but
        // the holder keeps renewing while it winds down.
        assert_eq!(
            h.renewal(t0 + ms(3_500), Renewal::Refused),
            Err(Stop::LeaseLost)
        );
        assert_eq!(
            h.renewal(
                t0 + ms(3_500),
                Renewal::Renewed {
                    cancel_requested: true
                }
            ),
            Ok(true)
        );
    }

    fn job() -> Job {
        Job::new(
            "j".into(),
            "t".into(),
            "d".into(),
            Source::parse("file:///x").unwrap(),
            vec![],
            3,
            1000,
        )
    }

    const B: Backoff = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };

    #[test]
    fn retries_then_fails_after_max_attempts() {
        let mut j = job();
        assert!(j.is_due(1000));
        j.start(1000);
        assert_eq!((j.state, j.attempts), (JobState::Running, 1));
        j.fail("boom".into(), Failure::Transient, B, 0.0, 2000);
        assert_eq!(j.state, JobState::Pending);
        assert_eq!(j.next_attempt_unix_ms, 2500);
        assert!(!j.is_due(2499));
        assert!(j.is_due(2500));
        j.start(2500);
        j.fail("boom".into(), Failure::Transient, B, 0.0, 3000);
        assert_eq!(j.next_attempt_unix_ms, 4000);
        j.start(4000);
        j.fail("boom 3".into(), Failure::Transient, B, 0.0, 5000);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.last_error, "boom 3");
        assert!(!j.is_due(i64::MAX));
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let mut j = job();
        j.start(0);
        j.fail("no such directory".into(), Failure::Permanent, B, 0.5, 1);
        assert_eq!((j.state, j.attempts), (JobState::Failed, 1));
    }

    #[test]
    fn cancel_pending_is_immediate_running_is_flagged_final_is_kept() {
        let mut j = job();
        assert!(j.request_cancel(5));
        assert_eq!(j.state, JobState::Cancelled);
        let mut r = job();
        r.start(0);
        assert!(!r.request_cancel(5));
        assert_eq!(r.state, JobState::Running);
        assert!(r.cancel_requested);
        r.cancelled(6);
        assert_eq!(r.state, JobState::Cancelled);
        let mut done = job();
        done.start(0);
        done.succeed(1);
        assert!(!done.request_cancel(2));
        assert_eq!(done.state, JobState::Succeeded);
    }

    #[test]
    fn interrupted_run_resumes_without_losing_an_attempt() {
        let mut j = job();
        j.start(0);
        j.checkpoint.snapshot = Some("abc".into());
        j.interrupted(10);
        assert_eq!((j.state, j.attempts), (JobState::Pending, 0));
        assert_eq!(j.checkpoint.snapshot.as_deref(), Some("abc"));
        assert!(j.is_due(10));
    }
}
