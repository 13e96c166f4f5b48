//! The chaos oracle: what a run must show, checked on the clients' own
//! records (every operation with its invocation and completion times and
//! outcome) and on the cluster's state read after healing. Plain code over
//! plain data: the harness gathers both, [`check`] decides.
//!
//! An operation whose outcome is unknown (a timeout, a connection cut by a
//! fault) may or may not have taken effect: it is never counted as lost,
//! and what it may have written is not a phantom.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How an operation ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged.
    Ok,
    /// Refused or failed: it took no effect.
    Failed(String),
    /// No answer (a timeout, a cut connection): it may have taken effect.
    Unknown(String),
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// A put of a tree whose digest (`tree_digest` of the source) is
    /// `digest`; `snapshot` is the id acknowledged.
    Put {
        dataset: String,
        digest: String,
        snapshot: Option<String>,
    },
    /// A read of a snapshot, verified by hash; `digest` is what was read.
    Get {
        dataset: String,
        snapshot: String,
        digest: Option<String>,
    },
    /// A clone job submitted; `job` is the id acknowledged.
    Clone {
        dataset: String,
        snapshot: String,
        job: Option<String>,
    },
    /// A job's state seen by a watch: its fencing token then.
    Watch {
        job: String,
        state: String,
        token: u64,
    },
    Cancel {
        job: String,
    },
    /// A cluster status read.
    Status {
        leader: Option<u64>,
    },
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    /// Milliseconds since the run started.
    pub invoked_ms: u64,
    pub completed_ms: u64,
    #[serde(flatten)]
    pub kind: OpKind,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A snapshot read back from one node after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalRead {
    pub node: u64,
    pub dataset: String,
    pub snapshot: String,
    /// The digest read, or why it could not be read.
    pub digest: Result<String, String>,
}

/// A job as the cluster holds it after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalJob {
    pub id: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Cancelled`.
    pub state: String,
    pub error: String,
}

/// What one sink holds for one job's snapshot after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkState {
    pub job: String,
    /// The sink's name (`sink://NAME`).
    pub sink: String,
    /// Commit records for the job's snapshot.
    pub commits: u32,
    /// The objects or catalog rows are exactly the snapshot's.
    pub matches: bool,
}

/// The cluster after the last fault healed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// Nodes alive at the end (every acknowledged put must read back
    /// through each).
    pub nodes: Vec<u64>,
    pub reads: Vec<FinalRead>,
    pub jobs: Vec<FinalJob>,
    pub sinks: Vec<SinkState>,
    /// Milliseconds from the end of the last fault to one leader and every
    /// shard fully replicated; `None`: never within the run.
    pub healed_after_ms: Option<u64>,
}

/// One invariant's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub invariant: &'static str,
    pub holds: bool,
    /// What broke it (at most [`MAX_EXAMPLES`]), and how many did.
    pub counterexamples: Vec<String>,
    pub violations: usize,
}

/// Counter-examples kept per invariant.
pub const MAX_EXAMPLES: usize = 10;

fn verdict(invariant: &'static str, broken: Vec<String>) -> Verdict {
    Verdict {
        invariant,
        holds: broken.is_empty(),
        violations: broken.len(),
        counterexamples: broken.into_iter().take(MAX_EXAMPLES).collect(),
    }
}

/// A rolling upgrade must not fail a job: every acknowledged clone job
/// ended other than `Failed` (a client's cancel may still end one).
pub fn no_job_failed(jobs: &[FinalJob]) -> Verdict {
    verdict(
        "no clone job failed",
        jobs.iter()
            .filter(|j| j.state == "Failed")
            .map(|j| format!("job {} failed: {}", j.id, j.error))
            .collect(),
    )
}

/// Jobs' final states.
const FINAL_STATES: [&str; 3] = ["Succeeded", "Failed", "Cancelled"];

/// Checks every invariant; `heal_bound_ms` is how soon after the last
/// fault the cluster must have healed.
pub fn check(history: &[Op], end: &FinalState, heal_bound_ms: u64) -> Vec<Verdict> {
    vec![
        progress(history),
        acknowledged_puts_read_back(history, end),
        no_phantom_reads(history, end),
        jobs_end(history, end),
        sinks_exactly_once(end),
        fencing_tokens_never_go_back(history),
        healed(end, heal_bound_ms),
    ]
}

/// A run in which no put was acknowledged proves nothing.
fn progress(history: &[Op]) -> Verdict {
    let acked = history
        .iter()
        .any(|o| matches!(o.kind, OpKind::Put { .. }) && o.outcome == Outcome::Ok);
    let broken = if acked {
        Vec::new()
    } else {
        vec![format!(
            "no put acknowledged in {} operations",
            history.len()
        )]
    };
    verdict("the clients made progress", broken)
}

/// Every acknowledged put reads back byte-identical (by digest) through
/// every node alive at the end.
fn acknowledged_puts_read_back(history: &[Op], end: &FinalState) -> Verdict {
    let mut broken = Vec::new();
    for op in history {
        let (
            OpKind::Put {
                dataset,
                digest,
                snapshot: Some(snapshot),
            },
            Outcome::Ok,
        ) = (&op.kind, &op.outcome)
        else {
            continue;
        };
        for node in &end.nodes {
            let read = end
                .reads
                .iter()
                .find(|r| r.node == *node && r.dataset == *dataset && r.snapshot == *snapshot);
            match read.map(|r| &r.digest) {
                Some(Ok(d)) if d == digest => {}
                Some(Ok(d)) => broken.push(format!(
                    "put of {dataset} acknowledged as {snapshot} (client {}, at {} ms) reads back different on node {node}: {d} != {digest}",
                    op.client, op.completed_ms
                )),
                Some(Err(e)) => broken.push(format!(
                    "put of {dataset} acknowledged as {snapshot} (client {}, at {} ms) is lost on node {node}: {e}",
                    op.client, op.completed_ms
                )),
                None => broken.push(format!(
                    "put of {dataset} acknowledged as {snapshot} (client {}, at {} ms) was not read back on node {node}",
                    op.client, op.completed_ms
                )),
            }
        }
    }
    verdict(
        "acknowledged puts read back identical on every node",
        broken,
    )
}

/// Nothing read was never written: a read's snapshot comes from a put that
/// may have happened (acknowledged, or unknown) begun before the read
/// ended, and its digest is that put's.
fn no_phantom_reads(history: &[Op], end: &FinalState) -> Verdict {
    // What each snapshot may hold: the digests of puts that may have made
    // it. An unknown put's snapshot id is not known, so its digest may
    // match any snapshot of its dataset.
    let mut by_snapshot: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    let mut unknown: Vec<(&str, &str, u64)> = Vec::new();
    let mut acked_at: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for op in history {
        if let OpKind::Put {
            dataset,
            digest,
            snapshot,
        } = &op.kind
        {
            match (&op.outcome, snapshot) {
                (Outcome::Ok, Some(s)) => {
                    by_snapshot.entry((dataset, s)).or_default().insert(digest);
                    acked_at.insert((dataset, s), op.invoked_ms);
                }
                (Outcome::Unknown(_), _) => unknown.push((dataset, digest, op.invoked_ms)),
                _ => {}
            }
        }
    }
    let possible = |dataset: &str, snapshot: &str, digest: &str, before: u64| {
        let acked = by_snapshot
            .get(&(dataset, snapshot))
            .is_some_and(|d| d.contains(digest))
            && acked_at
                .get(&(dataset, snapshot))
                .is_some_and(|at| *at <= before);
        acked
            || unknown
                .iter()
                .any(|(ds, d, at)| *ds == dataset && *d == digest && *at <= before)
    };
    let mut broken = Vec::new();
    for op in history {
        if let (
            OpKind::Get {
                dataset,
                snapshot,
                digest: Some(d),
            },
            Outcome::Ok,
        ) = (&op.kind, &op.outcome)
        {
            if !possible(dataset, snapshot, d, op.completed_ms) {
                broken.push(format!(
                    "client {} read {dataset}@{snapshot} as {d} at {} ms: no put could have written it",
                    op.client, op.completed_ms
                ));
            }
        }
    }
    for r in &end.reads {
        if let Ok(d) = &r.digest {
            if !possible(&r.dataset, &r.snapshot, d, u64::MAX) {
                broken.push(format!(
                    "node {} holds {}@{} as {d}: no put could have written it",
                    r.node, r.dataset, r.snapshot
                ));
            }
        }
    }
    verdict("nothing read that was never written", broken)
}

/// Every job a client saw submitted ended (Succeeded, Failed with its
/// error, or Cancelled): none lost, none stuck.
fn jobs_end(history: &[Op], end: &FinalState) -> Verdict {
    let mut broken = Vec::new();
    for op in history {
        let (OpKind::Clone { job: Some(id), .. }, Outcome::Ok) = (&op.kind, &op.outcome) else {
            continue;
        };
        match end.jobs.iter().find(|j| j.id == *id) {
            None => broken.push(format!("job {id} (client {}) is lost", op.client)),
            Some(j) if !FINAL_STATES.contains(&j.state.as_str()) => {
                broken.push(format!("job {id} is stuck in {}", j.state))
            }
            Some(j) if j.state == "Failed" && j.error.is_empty() => {
                broken.push(format!("job {id} failed without saying why"))
            }
            Some(_) => {}
        }
    }
    verdict("every submitted job ended", broken)
}

/// A successful job's sinks hold exactly one commit of its snapshot, with
/// exactly the snapshot's objects or rows (nothing from a fenced holder).
fn sinks_exactly_once(end: &FinalState) -> Verdict {
    let mut broken = Vec::new();
    for s in &end.sinks {
        let succeeded = end
            .jobs
            .iter()
            .any(|j| j.id == s.job && j.state == "Succeeded");
        if !succeeded {
            continue;
        }
        if s.commits != 1 {
            broken.push(format!(
                "job {} left {} commits in sink {}",
                s.job, s.commits, s.sink
            ));
        }
        if !s.matches {
            broken.push(format!(
                "job {}: sink {} does not hold exactly the snapshot",
                s.job, s.sink
            ));
        }
    }
    verdict("each successful job committed once per sink", broken)
}

/// A job's fencing token, as watches saw it over time, never decreases.
fn fencing_tokens_never_go_back(history: &[Op]) -> Verdict {
    let mut seen: Vec<&Op> = history
        .iter()
        .filter(|o| matches!(o.kind, OpKind::Watch { .. }) && o.outcome == Outcome::Ok)
        .collect();
    seen.sort_by_key(|o| o.completed_ms);
    let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut broken = Vec::new();
    for o in seen {
        let OpKind::Watch { job, token, .. } = &o.kind else {
            continue;
        };
        // Only a watch begun after the earlier one ended is ordered after it.
        if let Some((t, at)) = last.get(job.as_str()) {
            if token < t && o.invoked_ms > *at {
                broken.push(format!(
                    "job {job}: token {token} seen at {} ms after {t} at {at} ms",
                    o.completed_ms
                ));
            }
        }
        let keep = last.get(job.as_str()).is_none_or(|(t, _)| token >= t);
        if keep {
            last.insert(job, (*token, o.completed_ms));
        }
    }
    verdict("no fencing token went backwards", broken)
}

fn healed(end: &FinalState, bound_ms: u64) -> Verdict {
    let broken = match end.healed_after_ms {
        Some(ms) if ms <= bound_ms => Vec::new(),
        Some(ms) => vec![format!(
            "healed {ms} ms after the last fault, more than {bound_ms} ms"
        )],
        None => vec!["never healed (one leader, every shard fully replicated)".to_string()],
    };
    verdict("the cluster healed in time", broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, at: u64, kind: OpKind, outcome: Outcome) -> Op {
        Op {
            client,
            invoked_ms: at,
            completed_ms: at + 10,
            kind,
            outcome,
        }
    }

    fn put(at: u64, digest: &str, snapshot: &str) -> Op {
        op(
            1,
            at,
            OpKind::Put {
                dataset: "ds".into(),
                digest: digest.into(),
                snapshot: Some(snapshot.into()),
            },
            Outcome::Ok,
        )
    }

    fn read(node: u64, snapshot: &str, digest: &str) -> FinalRead {
        FinalRead {
            node,
            dataset: "ds".into(),
            snapshot: snapshot.into(),
            digest: Ok(digest.into()),
        }
    }

    fn clone_job(id: &str) -> Op {
        op(
            2,
            50,
            OpKind::Clone {
                dataset: "ds".into(),
                snapshot: "s1".into(),
                job: Some(id.into()),
            },
            Outcome::Ok,
        )
    }

    /// A run where everything holds.
    fn clean() -> (Vec<Op>, FinalState) {
        let history = vec![
            put(0, "d1", "s1"),
            op(
                3,
                20,
                OpKind::Get {
                    dataset: "ds".into(),
                    snapshot: "s1".into(),
                    digest: Some("d1".into()),
                },
                Outcome::Ok,
            ),
            clone_job("j1"),
            op(
                2,
                70,
                OpKind::Watch {
                    job: "j1".into(),
                    state: "Running".into(),
                    token: 1,
                },
                Outcome::Ok,
            ),
            op(
                2,
                90,
                OpKind::Watch {
                    job: "j1".into(),
                    state: "Running".into(),
                    token: 2,
                },
                Outcome::Ok,
            ),
            // A put that timed out: it may have happened or not.
            op(
                1,
                100,
                OpKind::Put {
                    dataset: "ds".into(),
                    digest: "d2".into(),
                    snapshot: None,
                },
                Outcome::Unknown("deadline".into()),
            ),
        ];
        let end = FinalState {
            nodes: vec![1, 2, 3],
            reads: vec![
                read(1, "s1", "d1"),
                read(2, "s1", "d1"),
                read(3, "s1", "d1"),
                // The unknown put took effect: not a phantom.
                read(1, "s2", "d2"),
            ],
            jobs: vec![FinalJob {
                id: "j1".into(),
                state: "Succeeded".into(),
                error: String::new(),
            }],
            sinks: vec![SinkState {
                job: "j1".into(),
                sink: "clones".into(),
                commits: 1,
                matches: true,
            }],
            healed_after_ms: Some(2_000),
        };
        (history, end)
    }

    fn failing(verdicts: &[Verdict]) -> Vec<&'static str> {
        verdicts
            .iter()
            .filter(|v| !v.holds)
            .map(|v| v.invariant)
            .collect()
    }

    #[test]
    fn a_clean_run_passes_every_invariant() {
        let (h, end) = clean();
        let v = check(&h, &end, 10_000);
        assert_eq!(v.len(), 7);
        assert!(failing(&v).is_empty(), "{v:#?}");
    }

    #[test]
    fn a_lost_acknowledged_put_is_caught() {
        let (h, mut end) = clean();
        end.reads[2].digest = Err("not found".into());
        let v = check(&h, &end, 10_000);
        assert_eq!(
            failing(&v),
            ["acknowledged puts read back identical on every node"]
        );
        assert!(v[1].counterexamples[0].contains("lost on node 3"), "{v:?}");
        // Not read back at all on a node is lost too.
        end.reads.remove(2);
        assert!(!check(&h, &end, 10_000)[1].holds);
    }

    #[test]
    fn a_phantom_read_is_caught() {
        let (mut h, end) = clean();
        h.push(op(
            3,
            200,
            OpKind::Get {
                dataset: "ds".into(),
                snapshot: "s1".into(),
                digest: Some("never-written".into()),
            },
            Outcome::Ok,
        ));
        let v = check(&h, &end, 10_000);
        assert_eq!(failing(&v), ["nothing read that was never written"]);
        // A read that ends before the put it claims began is a phantom too.
        let (mut h, end) = clean();
        h.insert(
            0,
            op(
                3,
                0,
                OpKind::Get {
                    dataset: "ds".into(),
                    snapshot: "s9".into(),
                    digest: Some("d9".into()),
                },
                Outcome::Ok,
            ),
        );
        h.push(put(500, "d9", "s9"));
        let mut end = end;
        for n in 1..=3 {
            end.reads.push(read(n, "s9", "d9"));
        }
        assert_eq!(
            failing(&check(&h, &end, 10_000)),
            ["nothing read that was never written"]
        );
    }

    #[test]
    fn a_double_sink_commit_and_a_foreign_object_are_caught() {
        let (h, mut end) = clean();
        end.sinks[0].commits = 2;
        let v = check(&h, &end, 10_000);
        assert_eq!(failing(&v), ["each successful job committed once per sink"]);
        end.sinks[0].commits = 1;
        end.sinks[0].matches = false;
        assert_eq!(
            failing(&check(&h, &end, 10_000)),
            ["each successful job committed once per sink"]
        );
    }

    #[test]
    fn a_stuck_or_lost_job_is_caught() {
        let (h, mut end) = clean();
        end.jobs[0].state = "Running".into();
        let v = check(&h, &end, 10_000);
        assert_eq!(failing(&v), ["every submitted job ended"]);
        assert!(v[3].counterexamples[0].contains("stuck in Running"));
        end.jobs.clear();
        let v = check(&h, &end, 10_000);
        assert!(v[3].counterexamples[0].contains("lost"), "{v:?}");
        // A failure must say why.
        let (h, mut end) = clean();
        end.jobs[0].state = "Failed".into();
        assert_eq!(
            failing(&check(&h, &end, 10_000)),
            ["every submitted job ended"]
        );
    }

    #[test]
    fn a_fencing_token_going_back_is_caught_but_not_overlapping_watches() {
        let (mut h, end) = clean();
        h.push(op(
            2,
            300,
            OpKind::Watch {
                job: "j1".into(),
                state: "Running".into(),
                token: 1,
            },
            Outcome::Ok,
        ));
        let v = check(&h, &end, 10_000);
        assert_eq!(failing(&v), ["no fencing token went backwards"]);
        // A watch that began before the token-2 one ended may see token 1.
        let (mut h, end) = clean();
        let mut overlapping = op(
            4,
            95,
            OpKind::Watch {
                job: "j1".into(),
                state: "Running".into(),
                token: 1,
            },
            Outcome::Ok,
        );
        overlapping.invoked_ms = 60;
        h.push(overlapping);
        assert!(failing(&check(&h, &end, 10_000)).is_empty());
    }

    #[test]
    fn a_cluster_that_does_not_heal_in_time_is_caught() {
        let (h, mut end) = clean();
        end.healed_after_ms = Some(20_000);
        assert_eq!(
            failing(&check(&h, &end, 10_000)),
            ["the cluster healed in time"]
        );
        end.healed_after_ms = None;
        assert_eq!(
            failing(&check(&h, &end, 10_000)),
            ["the cluster healed in time"]
        );
    }

    #[test]
    fn a_run_without_an_acknowledged_put_proves_nothing() {
        let (mut h, end) = clean();
        h.retain(|o| !matches!(o.kind, OpKind::Put { .. }));
        assert!(failing(&check(&h, &end, 10_000)).contains(&"the clients made progress"));
    }

    #[test]
    fn histories_round_trip_as_json_lines() {
        let (h, end) = clean();
        let lines: Vec<String> = h
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        assert!(lines[0].contains(r#""op":"put""#), "{}", lines[0]);
        assert!(lines[5].contains(r#""outcome":"unknown""#), "{}", lines[5]);
        let back: Vec<Op> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, h);
        let e: FinalState = serde_json::from_str(&serde_json::to_string(&end).unwrap()).unwrap();
        assert_eq!(e, end);
    }
}
