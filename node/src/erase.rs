//! Erasing a tenant: its jobs stopped, its data in the sinks its operator
//! marked `owned` deleted, everything of it forgotten by the cluster state,
//! then every node purges its store (`purge_loop`), and a report of what
//! went where.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitclone_raft::state::{Command, Purged};
use bitclone_raft::NodeId;
use bitclone_storage::sink::catalog::Catalog;
use bitclone_storage::sink::objects;
use bitclone_storage::sink::Destination;
use bitclone_storage::Error as StoreError;

use crate::node::Node;

/// What one owned sink lost.
pub struct SinkErased {
    pub name: String,
    /// "objects" or "rows".
    pub unit: &'static str,
    pub removed: u64,
}

/// What an erasure removed where.
pub struct EraseReport {
    pub datasets: u64,
    pub snapshots: u64,
    pub jobs: u64,
    pub sinks: Vec<SinkErased>,
    /// Every member, with what it purged (`None`: not yet; it purges when
    /// it runs again).
    pub nodes: Vec<(NodeId, Option<Purged>)>,
}

/// How long the erasure waits for the nodes to purge before it reports
/// those that have not as pending.
const PURGE_WAIT: Duration = Duration::from_secs(60);

/// Erases `tenant` (see the module doc). Runs again after a failure from
/// where it stopped: every step is idempotent.
pub async fn erase_tenant(node: &Arc<Node>, tenant: &str) -> Result<EraseReport, StoreError> {
    node.write(Command::EraseTenant {
        tenant: tenant.to_string(),
    })
    .await?;
    wait_for_jobs(node, tenant).await?;
    let mut sinks = Vec::new();
    for (name, place) in node.config.sinks.owned_by(tenant) {
        let erased = match &place.destination {
            Destination::Objects { location, .. } => {
                let target = objects::open_location(location, false, &place.s3)?;
                SinkErased {
                    name,
                    unit: "objects",
                    removed: objects::erase_all(&target).await?,
                }
            }
            Destination::Catalog { url } => {
                let catalog =
                    Catalog::connect_with_password(url, place.pg_password.as_deref()).await?;
                SinkErased {
                    name,
                    unit: "rows",
                    removed: catalog.erase_tenant(tenant).await?,
                }
            }
            other => {
                return Err(StoreError::InvalidArgument(format!(
                    "sink {name} resolved to {}, which an erasure cannot clear",
                    other.display()
                )))
            }
        };
        tracing::info!(%tenant, sink = %erased.name, removed = erased.removed, unit = erased.unit, "erased the tenant's data in a sink");
        sinks.push(erased);
    }
    node.write(Command::ForgetTenant {
        tenant: tenant.to_string(),
    })
    .await?;
    let deadline = Instant::now() + PURGE_WAIT;
    loop {
        let (erasure, members) = node
            .read(|s| {
                (
                    s.erasing.get(tenant).cloned(),
                    s.members.keys().copied().collect::<Vec<_>>(),
                )
            })
            .await?;
        let erasure = erasure.ok_or_else(|| {
            StoreError::Conflict(format!("tenant {tenant} was created again meanwhile"))
        })?;
        if erasure.complete(members.iter()) || Instant::now() > deadline {
            return Ok(EraseReport {
                datasets: erasure.datasets,
                snapshots: erasure.snapshots,
                jobs: erasure.jobs,
                sinks,
                nodes: members
                    .iter()
                    .map(|n| (*n, erasure.purged.get(n).cloned()))
                    .collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until no job of `tenant` runs under a live lease (they were asked
/// to stop; a holder that died loses its lease when it lapses), so that
/// none writes to a sink after the sinks are cleared.
async fn wait_for_jobs(node: &Arc<Node>, tenant: &str) -> Result<(), StoreError> {
    let lease = Duration::from_millis(node.read(|s| s.settings.lease_ms).await?.max(0) as u64);
    let deadline = Instant::now() + 2 * lease + Duration::from_secs(30);
    loop {
        let now = bitclone_raft::cluster::now_ms();
        let running = node
            .read(|s| {
                s.jobs
                    .values()
                    .find(|j| j.tenant == tenant && j.is_held(now))
                    .map(|j| (j.id.clone(), j.lease.map_or(0, |l| l.holder)))
            })
            .await?;
        let Some((job, holder)) = running else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(StoreError::Unavailable(format!(
                "job {job} of tenant {tenant} still runs on node {holder}; run the erasure again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// On every node: purges the store of each tenant the state has forgotten
/// and this node has not purged yet, and says so through Raft. Runs until
/// shutdown.
pub async fn purge_loop(node: Arc<Node>) {
    // Purged by this process, waiting for the report to be accepted: not
    // purged (and compacted) again every second.
    let mut purged: std::collections::HashMap<String, Purged> = Default::default();
    loop {
        node.pause(Duration::from_secs(1)).await;
        if node.is_shutting_down() {
            return;
        }
        let me = node.cluster.id;
        let due: Vec<String> = node.cluster.local(|s| {
            s.erasing
                .iter()
                .filter(|(_, e)| e.forgotten && !e.purged.contains_key(&me))
                .map(|(t, _)| t.clone())
                .collect()
        });
        purged.retain(|t, _| due.contains(t));
        for tenant in due {
            if let Some(p) = purged.get(&tenant) {
                report_purge(&node, &tenant, p.clone()).await;
                continue;
            }
            let store = node.store.clone();
            let t = tenant.clone();
            let result = tokio::task::spawn_blocking(move || {
                let erased = store.erase_tenant(&t)?;
                let left = store.tenant_keys(&t)?;
                if left > 0 {
                    return Err(StoreError::Unavailable(format!(
                        "{left} keys of tenant {t} are left after its purge"
                    )));
                }
                Ok(erased)
            })
            .await
            .unwrap_or(Err(StoreError::Panicked));
            let erased = match result {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "purging an erased tenant failed");
                    continue;
                }
            };
            tracing::info!(%tenant, chunks = erased.chunks, bytes = erased.bytes, snapshots = erased.snapshots, "purged an erased tenant from the store");
            let p = Purged {
                chunks: erased.chunks,
                bytes: erased.bytes,
                snapshots: erased.snapshots,
            };
            purged.insert(tenant.clone(), p.clone());
            report_purge(&node, &tenant, p).await;
        }
    }
}

async fn report_purge(node: &Node, tenant: &str, purged: Purged) {
    let r = node
        .write(Command::TenantPurged {
            tenant: tenant.to_string(),
            node: node.cluster.id,
            purged,
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(%tenant, error = %e, "reporting a purge failed");
    }
}
