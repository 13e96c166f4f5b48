//! The placement planner: which nodes hold each shard of each tenant.
//! Plain functions over plain data.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// Replica sets of every shard of every tenant, at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub version: u64,
    /// tenant → shard index → replica set (the first member is the primary).
    pub shards: BTreeMap<String, Vec<Vec<NodeId>>>,
}

impl Layout {
    /// The replica set of a tenant's shard, if the tenant is placed.
    pub fn replicas(&self, tenant: &str, shard: u32) -> Option<&[NodeId]> {
        self.shards
            .get(tenant)
            .and_then(|s| s.get(shard as usize))
            .map(|v| v.as_slice())
    }

    /// How many shard replicas each node holds.
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut load = BTreeMap::new();
        for sets in self.shards.values() {
            for set in sets {
                for n in set {
                    *load.entry(*n).or_insert(0) += 1;
                }
            }
        }
        load
    }
}

/// Replication factor for a cluster of `nodes` members.
pub fn replication_factor(nodes: usize) -> usize {
    nodes.min(3)
}

/// Plans a layout for `members` and `tenants` (name → shard count), moving as
/// little as possible from `prev`: replicas that are still members stay, and
/// missing replicas go to the least-loaded nodes (ties by id).
pub fn plan(members: &BTreeSet<NodeId>, tenants: &BTreeMap<String, u32>, prev: &Layout) -> Layout {
    let r = replication_factor(members.len());
    let mut load: BTreeMap<NodeId, usize> = members.iter().map(|n| (*n, 0)).collect();
    let mut shards = BTreeMap::new();
    // First keep what can be kept, so the load counts include it.
    for (tenant, count) in tenants {
        let mut sets = Vec::with_capacity(*count as usize);
        for i in 0..*count as usize {
            let kept: Vec<NodeId> = prev
                .shards
                .get(tenant)
                .and_then(|s| s.get(i))
                .map(|set| {
                    set.iter()
                        .copied()
                        .filter(|n| members.contains(n))
                        .take(r)
                        .collect()
                })
                .unwrap_or_default();
            for n in &kept {
                *load.entry(*n).or_insert(0) += 1;
            }
            sets.push(kept);
        }
        shards.insert(tenant.clone(), sets);
    }
    // Then fill every set up to r from the least-loaded nodes.
    for sets in shards.values_mut() {
        for set in sets.iter_mut() {
            while set.len() < r {
                let Some((&pick, _)) = load
                    .iter()
                    .filter(|(n, _)| !set.contains(n))
                    .min_by_key(|(n, l)| (**l, **n))
                else {
                    break;
                };
                set.push(pick);
                *load.entry(pick).or_insert(0) += 1;
            }
        }
    }
    // Then even out: move replicas from the most to the least loaded node
    // while that narrows the spread (a new member gets its share).
    while let (Some((&max_n, &max_l)), Some((&min_n, &min_l))) = (
        load.iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))),
        load.iter().min_by_key(|(n, l)| (**l, **n)),
    ) {
        if max_l <= min_l + 1 {
            break;
        }
        let mut moved = false;
        'outer: for sets in shards.values_mut() {
            for set in sets.iter_mut() {
                if set.contains(&max_n) && !set.contains(&min_n) {
                    for slot in set.iter_mut() {
                        if *slot == max_n {
                            *slot = min_n;
                        }
                    }
                    moved = true;
                    break 'outer;
                }
            }
        }
        if !moved {
            break;
        }
        *load.entry(max_n).or_insert(0) -= 1;
        *load.entry(min_n).or_insert(0) += 1;
    }
    let layout = Layout {
        version: prev.version,
        shards,
    };
    if layout.shards == prev.shards {
        return prev.clone();
    }
    Layout {
        version: prev.version + 1,
        ..layout
    }
}

/// The shard of a dataset: a stable hash of its name.
pub fn shard_of(dataset: &str, shards: u32) -> u32 {
    let h = fnv1a(dataset.as_bytes());
    (h % u64::from(shards.max(1))) as u32
}

fn fnv1a(data: &[u8]) -> u64 {
    // FNV-1a: stable across versions and platforms, and placement needs no
    // cryptographic strength.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn tenants() -> BTreeMap<String, u32> {
        [("a".to_string(), 8), ("b".to_string(), 4)]
            .into_iter()
            .collect()
    }

    fn check(layout: &Layout, members: &BTreeSet<NodeId>) {
        let r = replication_factor(members.len());
        for sets in layout.shards.values() {
            for set in sets {
                assert_eq!(set.len(), r, "{set:?}");
                let unique: BTreeSet<_> = set.iter().collect();
                assert_eq!(unique.len(), r, "duplicate replica in {set:?}");
                assert!(set.iter().all(|n| members.contains(n)));
            }
        }
        let load = layout.load();
        let (lo, hi) = (
            load.values().min().copied().unwrap_or(0),
            load.values().max().copied().unwrap_or(0),
        );
        assert!(hi - lo <= 1, "unbalanced: {load:?}");
    }

    #[test]
    fn single_node_then_three_then_four() {
        let one = members(&[1]);
        let l1 = plan(&one, &tenants(), &Layout::default());
        assert_eq!(l1.version, 1);
        check(&l1, &one);
        let three = members(&[1, 2, 3]);
        let l3 = plan(&three, &tenants(), &l1);
        assert_eq!(l3.version, 2);
        check(&l3, &three);
        // Planning again with nothing changed keeps the version.
        assert_eq!(plan(&three, &tenants(), &l3), l3);
        let four = members(&[1, 2, 3, 4]);
        let l4 = plan(&four, &tenants(), &l3);
        check(&l4, &four);
        assert!(
            l4.load().get(&4).copied().unwrap_or(0) > 0,
            "the new node gets shards"
        );
    }

    #[test]
    fn a_leaving_node_is_replaced_and_others_stay() {
        let four = members(&[1, 2, 3, 4]);
        let l4 = plan(&four, &tenants(), &Layout::default());
        let three = members(&[1, 2, 4]);
        let l3 = plan(&three, &tenants(), &l4);
        check(&l3, &three);
        assert!(!l3.load().contains_key(&3));
        // Every replica set keeps its surviving members.
        for (t, sets) in &l4.shards {
            for (i, set) in sets.iter().enumerate() {
                for n in set.iter().filter(|n| **n != 3) {
                    assert!(l3.shards[t][i].contains(n), "{t}/{i}: {n} moved needlessly");
                }
            }
        }
    }

    #[test]
    fn shard_of_is_stable_and_in_range() {
        // Pinned to the published FNV-1a vector: a change of hash would move
        // every dataset to another shard.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(shard_of("a", 8), 4);
        assert_eq!(shard_of("x", 0), 0);
    }
}
