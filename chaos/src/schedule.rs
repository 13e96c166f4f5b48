//! Fault schedules: which nemesis runs when, drawn from a seed, written
//! out whole so that a run can be replayed (`--seed S --schedule FILE`).
//! Plain data; the harness resolves targets ("the leader", "a lease
//! holder") when a fault starts.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which side a network fault cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cut {
    /// A majority and a minority that cannot reach each other.
    MajorityMinority,
    /// Two sides that both reach one bridge node.
    Bridge,
    /// One node cut off from all others.
    Isolate,
    /// One node's packets to the others dropped, theirs to it kept (its
    /// replies are dropped too, so no connection completes either way; a
    /// packet already sent to it still arrives).
    OneWay,
}

/// Which build a node runs after a replace (a rolling upgrade's step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Build {
    /// The release upgraded from (`--upgrade-from`).
    Previous,
    /// This build.
    Current,
}

/// A nemesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Nemesis {
    /// SIGKILL of the leader, restarted at the fault's end.
    KillLeader,
    /// SIGKILL of the lease holder of a job the harness submits and sees
    /// running.
    KillLeaseHolder,
    /// SIGKILL of a node drawn at start.
    KillRandom,
    /// SIGSTOP past a lease, then SIGCONT: a zombie holder.
    Pause,
    /// nftables drops inside the namespace.
    Partition { cut: Cut },
    /// Random loss on one node's links (nftables `numgen random`).
    Loss { percent: u8 },
    /// A bandwidth limit on what one node sends (`tc` htb).
    Bandwidth { kbit: u32 },
    /// One node's data dir on a small tmpfs, filled.
    FullDisk,
    /// A node joins while traffic flows (removed again at the end).
    Join,
    /// A node is removed while traffic flows (rejoined at the end).
    Remove,
    /// One stored chunk flipped on one replica.
    CorruptChunk,
    /// Node `node` drained (what a pod's `preStop` runs), stopped with
    /// SIGTERM and started on `build` at the fault's end: one pod of a
    /// StatefulSet's rolling update (or rollback).
    Replace { node: u64, build: Build },
}

impl Nemesis {
    /// Needs root (a network namespace, nftables, tc, a tmpfs mount).
    pub fn needs_root(&self) -> bool {
        matches!(
            self,
            Nemesis::Partition { .. }
                | Nemesis::Loss { .. }
                | Nemesis::Bandwidth { .. }
                | Nemesis::FullDisk
        )
    }

    /// Takes a node out of service (only one such fault at a time keeps a
    /// majority of a 3-node cluster up).
    pub fn takes_a_node(&self) -> bool {
        matches!(
            self,
            Nemesis::KillLeader
                | Nemesis::KillLeaseHolder
                | Nemesis::KillRandom
                | Nemesis::Pause
                | Nemesis::Partition { .. }
                | Nemesis::FullDisk
                | Nemesis::Remove
                // The replica is down while its chunk is flipped.
                | Nemesis::CorruptChunk
                | Nemesis::Replace { .. }
        )
    }

    /// The shortest this fault lasts: a pause outlasts a job lease (5 s)
    /// so that a paused holder wakes up as a zombie whose lease is gone.
    pub fn min_ms(&self) -> u64 {
        match self {
            Nemesis::Pause => 7_000,
            _ => 0,
        }
    }

    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Nemesis::KillLeader => "kill-leader".into(),
            Nemesis::KillLeaseHolder => "kill-lease-holder".into(),
            Nemesis::KillRandom => "kill-random".into(),
            Nemesis::Pause => "pause".into(),
            Nemesis::Partition { cut } => format!("partition-{cut:?}").to_lowercase(),
            Nemesis::Loss { percent } => format!("loss-{percent}%"),
            Nemesis::Bandwidth { kbit } => format!("bandwidth-{kbit}kbit"),
            Nemesis::FullDisk => "full-disk".into(),
            Nemesis::Join => "join".into(),
            Nemesis::Remove => "remove".into(),
            Nemesis::CorruptChunk => "corrupt-chunk".into(),
            Nemesis::Replace {
                node,
                build: Build::Current,
            } => format!("upgrade-node-{node}"),
            Nemesis::Replace {
                node,
                build: Build::Previous,
            } => format!("rollback-node-{node}"),
        }
    }
}

/// A rolling upgrade of a cluster of `nodes` started on the previous
/// build, as a StatefulSet plays it: the highest ordinal first, one node
/// at a time, each down for `t.min_fault_ms` and the next only after
/// `t.quiet_ms` (readiness, then the replicas' catch-up); then one node
/// is rolled back, the highest ordinal, where a StatefulSet's rollback
/// begins. Plain and fixed: `seed` only names the
/// clients' workload.
pub fn upgrade(seed: u64, nodes: u64, t: Timing) -> Schedule {
    let steps = (1..=nodes)
        .rev()
        .map(|node| (node, Build::Current))
        .chain(std::iter::once((nodes, Build::Previous)));
    let mut at = t.quiet_ms;
    let faults = steps
        .map(|(node, build)| {
            let f = Fault {
                nemesis: Nemesis::Replace { node, build },
                start_ms: at,
                end_ms: at + t.min_fault_ms,
            };
            at += t.min_fault_ms + t.quiet_ms;
            f
        })
        .collect();
    Schedule { seed, faults }
}

/// Every nemesis, once.
pub fn every_nemesis() -> Vec<Nemesis> {
    vec![
        Nemesis::KillLeader,
        Nemesis::KillLeaseHolder,
        Nemesis::KillRandom,
        Nemesis::Pause,
        Nemesis::Partition {
            cut: Cut::MajorityMinority,
        },
        Nemesis::Partition { cut: Cut::Bridge },
        Nemesis::Partition { cut: Cut::Isolate },
        Nemesis::Partition { cut: Cut::OneWay },
        Nemesis::Loss { percent: 20 },
        Nemesis::Bandwidth { kbit: 8_000 },
        Nemesis::FullDisk,
        Nemesis::Join,
        Nemesis::Remove,
        Nemesis::CorruptChunk,
    ]
}

/// One fault: a nemesis from `start_ms` to `end_ms` (since the run began).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub nemesis: Nemesis,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A run's faults, in start order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Fault>,
}

/// How long faults last and the quiet between them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A fault lasts between these.
    pub min_fault_ms: u64,
    pub max_fault_ms: u64,
    /// Quiet time after a fault, for the cluster to heal.
    pub quiet_ms: u64,
}

/// Every nemesis of `kinds` once, one after another with quiet between
/// (the smoke run), in an order drawn from `seed`.
pub fn smoke(seed: u64, kinds: &[Nemesis], t: Timing) -> Schedule {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut order = kinds.to_vec();
    // Fisher-Yates with the seeded generator.
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut at = t.quiet_ms;
    let faults = order
        .into_iter()
        .map(|nemesis| {
            let len = rng
                .random_range(t.min_fault_ms..=t.max_fault_ms)
                .max(nemesis.min_ms());
            let f = Fault {
                nemesis,
                start_ms: at,
                end_ms: at + len,
            };
            at += len + t.quiet_ms;
            f
        })
        .collect();
    Schedule { seed, faults }
}

/// `cycles` faults drawn from `kinds` (the long run). About one in four
/// starts while another runs, but never two that each take a node out of
/// service at once: a majority stays up, so every fault is one the
/// cluster must ride out.
pub fn long(seed: u64, kinds: &[Nemesis], cycles: usize, t: Timing) -> Schedule {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = Vec::with_capacity(cycles);
    let mut at = t.quiet_ms;
    while faults.len() < cycles && !kinds.is_empty() {
        let nemesis = kinds[rng.random_range(0..kinds.len())];
        let len = rng
            .random_range(t.min_fault_ms..=t.max_fault_ms)
            .max(nemesis.min_ms());
        let overlap = rng.random_ratio(1, 4);
        // Halfway through the previous fault, unless that puts two
        // outages at once.
        let start = match faults.last() {
            Some(prev) if overlap => {
                let mid = prev.start_ms + (prev.end_ms - prev.start_ms) / 2;
                let clash = nemesis.takes_a_node()
                    && faults.iter().any(|f| {
                        f.nemesis.takes_a_node() && f.start_ms < mid + len && mid < f.end_ms
                    });
                if clash {
                    at
                } else {
                    mid
                }
            }
            _ => at,
        };
        let f = Fault {
            nemesis,
            start_ms: start,
            end_ms: start + len,
        };
        at = at.max(f.end_ms + t.quiet_ms);
        faults.push(f);
    }
    Schedule { seed, faults }
}

impl Schedule {
    /// When the last fault ends.
    pub fn end_ms(&self) -> u64 {
        self.faults.iter().map(|f| f.end_ms).max().unwrap_or(0)
    }

    /// Faults that overlap in time and each take a node out of service (a
    /// schedule must have none).
    pub fn double_outages(&self) -> Vec<(Fault, Fault)> {
        let mut out = Vec::new();
        for (i, a) in self.faults.iter().enumerate() {
            for b in &self.faults[i + 1..] {
                let overlap = a.start_ms < b.end_ms && b.start_ms < a.end_ms;
                if overlap && a.nemesis.takes_a_node() && b.nemesis.takes_a_node() {
                    out.push((*a, *b));
                }
            }
        }
        out
    }
}

/// The directed links `(from, to)` a partition drops among the members
/// `ids`; `pick` (taken modulo their number) chooses who is singled out:
/// the minority's first node, the isolated or one-way node, the bridge.
pub fn cut_links(cut: Cut, ids: &[u64], pick: usize) -> Vec<(u64, u64)> {
    let n = ids.len();
    if n < 2 {
        return Vec::new();
    }
    let order: Vec<u64> = (0..n).map(|i| ids[(pick + i) % n]).collect();
    let both = |a: &[u64], b: &[u64]| -> Vec<(u64, u64)> {
        a.iter()
            .flat_map(|x| b.iter().flat_map(move |y| [(*x, *y), (*y, *x)]))
            .collect()
    };
    match cut {
        Cut::MajorityMinority => {
            let (minority, majority) = order.split_at(((n - 1) / 2).max(1));
            both(minority, majority)
        }
        Cut::Isolate => both(&order[..1], &order[1..]),
        // Two halves that cannot reach each other; both reach the bridge.
        Cut::Bridge => {
            let rest = &order[1..];
            let (a, b) = rest.split_at(rest.len() / 2);
            both(a, b)
        }
        Cut::OneWay => order[1..].iter().map(|y| (order[0], *y)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_replaces_the_highest_ordinal_first_one_at_a_time_then_rolls_one_back() {
        let t = Timing {
            min_fault_ms: 2_000,
            max_fault_ms: 2_000,
            quiet_ms: 10_000,
        };
        let s = upgrade(7, 3, t);
        let steps: Vec<String> = s.faults.iter().map(|f| f.nemesis.name()).collect();
        assert_eq!(
            steps,
            [
                "upgrade-node-3",
                "upgrade-node-2",
                "upgrade-node-1",
                "rollback-node-3"
            ]
        );
        // Never two nodes down at once, and quiet between.
        for w in s.faults.windows(2) {
            assert!(w[1].start_ms >= w[0].end_ms + t.quiet_ms, "{w:?}");
        }
        assert!(!every_nemesis()
            .iter()
            .any(|n| matches!(n, Nemesis::Replace { .. })));
    }

    /// Who `id` can still send to, under `links` dropped.
    fn reaches(ids: &[u64], links: &[(u64, u64)], id: u64) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|to| *to != id && !links.contains(&(id, *to)))
            .collect()
    }

    #[test]
    fn partitions_cut_what_they_say_and_leave_a_majority_connected() {
        for n in [3u64, 4, 5, 7] {
            let ids: Vec<u64> = (1..=n).collect();
            for pick in 0..n as usize {
                let mm = cut_links(Cut::MajorityMinority, &ids, pick);
                // Some strict majority reaches each other both ways.
                let connected: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|a| reaches(&ids, &mm, *a).len() as u64 >= n / 2)
                    .collect();
                assert!(connected.len() as u64 > n / 2, "n {n} pick {pick}: {mm:?}");
                for (a, b) in &mm {
                    assert!(mm.contains(&(*b, *a)), "symmetric");
                }

                let iso = cut_links(Cut::Isolate, &ids, pick);
                let alone = ids[pick];
                assert!(reaches(&ids, &iso, alone).is_empty());
                assert_eq!(iso.len() as u64, 2 * (n - 1));
                assert!(iso.iter().all(|(a, b)| *a == alone || *b == alone));

                let bridge = cut_links(Cut::Bridge, &ids, pick);
                let b = ids[pick];
                assert!(bridge.iter().all(|(x, y)| *x != b && *y != b), "{bridge:?}");
                assert!(!bridge.is_empty());

                let one = cut_links(Cut::OneWay, &ids, pick);
                assert!(reaches(&ids, &one, ids[pick]).is_empty());
                assert!(one.iter().all(|(from, _)| *from == ids[pick]));
            }
        }
        assert!(cut_links(Cut::Isolate, &[1], 0).is_empty());
    }

    const T: Timing = Timing {
        min_fault_ms: 2_000,
        max_fault_ms: 6_000,
        quiet_ms: 3_000,
    };

    #[test]
    fn the_smoke_schedule_runs_every_nemesis_once_in_turn() {
        let s = smoke(7, &every_nemesis(), T);
        assert_eq!(s.faults.len(), every_nemesis().len());
        for k in every_nemesis() {
            assert_eq!(s.faults.iter().filter(|f| f.nemesis == k).count(), 1);
        }
        for w in s.faults.windows(2) {
            assert!(w[0].end_ms + T.quiet_ms <= w[1].start_ms, "{w:?}");
        }
        assert!(s.double_outages().is_empty());
    }

    #[test]
    fn a_seed_replays_the_same_schedule_and_another_does_not() {
        assert_eq!(smoke(7, &every_nemesis(), T), smoke(7, &every_nemesis(), T));
        assert_eq!(
            long(7, &every_nemesis(), 100, T),
            long(7, &every_nemesis(), 100, T)
        );
        assert_ne!(
            long(7, &every_nemesis(), 100, T),
            long(8, &every_nemesis(), 100, T)
        );
    }

    #[test]
    fn a_long_schedule_overlaps_some_faults_but_never_two_outages() {
        for seed in 0..20 {
            let s = long(seed, &every_nemesis(), 120, T);
            assert_eq!(s.faults.len(), 120);
            assert!(s.double_outages().is_empty(), "seed {seed}");
            let overlapping = s
                .faults
                .windows(2)
                .filter(|w| w[1].start_ms < w[0].end_ms)
                .count();
            assert!(overlapping > 0, "seed {seed}: some faults overlap");
            for f in &s.faults {
                let len = f.end_ms - f.start_ms;
                let least = T.min_fault_ms.max(f.nemesis.min_ms());
                assert!((least..=T.max_fault_ms.max(least)).contains(&len), "{f:?}");
            }
            let pause = s.faults.iter().find(|f| f.nemesis == Nemesis::Pause);
            assert!(
                pause.is_some_and(|f| f.end_ms - f.start_ms >= 7_000),
                "a pause outlasts a lease"
            );
        }
    }

    #[test]
    fn without_root_only_process_faults_are_drawn() {
        let kinds: Vec<Nemesis> = every_nemesis()
            .into_iter()
            .filter(|n| !n.needs_root())
            .collect();
        let s = long(3, &kinds, 50, T);
        assert!(s.faults.iter().all(|f| !f.nemesis.needs_root()));
    }

    #[test]
    fn a_schedule_round_trips_as_json() {
        let s = smoke(11, &every_nemesis(), T);
        let text = serde_json::to_string_pretty(&s).unwrap();
        assert!(text.contains(r#""kind": "partition""#), "{text}");
        assert!(text.contains(r#""cut": "one_way""#), "{text}");
        let back: Schedule = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }
}
