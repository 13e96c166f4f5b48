//! Encryption at rest, the node's side: the key-encryption keys (a key file
//! or a key-management hook), wrapping and unwrapping tenants' data keys,
//! and the store's keyring kept equal to the cluster state.
//!
//! The cluster state holds each encrypted tenant's data key wrapped
//! (`TenantKey`); every node unwraps it with its key source and opens the
//! tenant's codec in its store. A node that cannot (no key source, a key
//! missing from its file, a hook failing) marks the tenant locked: its
//! reads and writes of that tenant fail, nothing is stored in clear.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitclone_raft::state::{Command as RaftCommand, TenantKey};
use bitclone_storage::crypt::{self, KEY_BYTES};
use bitclone_storage::{ChunkStore, DataKey, Error as StoreError};

use bitclone_raft::cluster::now_ms;

use crate::node::Node;

/// Where a node's key-encryption keys come from (`[encryption]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KeySource {
    /// None: the node cannot encrypt a tenant nor read an encrypted one.
    #[default]
    None,
    /// A file of `ID HEX` lines (64 hex digits each); the first wraps new
    /// and re-wrapped keys, every one unwraps. Read at each use, so a key
    /// added or retired takes effect without a restart.
    File(PathBuf),
    /// A program that wraps and unwraps for a key-management service:
    /// `PROGRAM… wrap TENANT` reads the data key (hex) on stdin and prints
    /// `KEK WRAPPED` (the key-encryption key's name and the wrapped key,
    /// printable, no spaces); `PROGRAM… unwrap TENANT KEK` reads the wrapped
    /// key on stdin and prints the data key (hex).
    Hook(Vec<String>),
}

const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// A tenant whose key could not be unwrapped is tried again this often
/// (not every second: each try may call a key-management service).
const RETRY_LOCKED: Duration = Duration::from_secs(30);

/// The keys of a key file, in order; the first is the primary.
pub fn parse_key_file(text: &str) -> Result<Vec<(String, [u8; KEY_BYTES])>, String> {
    let mut keys: Vec<(String, [u8; KEY_BYTES])> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {}: expected `ID HEX`", n + 1));
        };
        if id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "line {}: key id {id:?} must be 1-64 of A-Z a-z 0-9 . _ -",
                n + 1
            ));
        }
        let bytes = crypt::from_hex(hex)
            .ok()
            .and_then(|b| <[u8; KEY_BYTES]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                format!(
                    "line {}: key {id} is not {} hex digits",
                    n + 1,
                    KEY_BYTES * 2
                )
            })?;
        if keys.iter().any(|(k, _)| k == id) {
            return Err(format!("line {}: key id {id} appears twice", n + 1));
        }
        keys.push((id.to_string(), bytes));
    }
    if keys.is_empty() {
        return Err("no key in it".into());
    }
    Ok(keys)
}

/// A new key file line: `ID HEX` with 32 random bytes.
pub fn generate_line(id: &str) -> anyhow::Result<String> {
    let key = DataKey::generate()?;
    let line = format!("{id} {}", crypt::hex(key.as_bytes()));
    parse_key_file(&line).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(line)
}

fn read_key_file(path: &Path) -> Result<Vec<(String, [u8; KEY_BYTES])>, StoreError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::Unavailable(format!("key file {}: {e}", path.display())))?;
    parse_key_file(&text)
        .map_err(|e| StoreError::Unavailable(format!("key file {}: {e}", path.display())))
}

impl KeySource {
    /// Wraps `tenant`'s data key with the current key-encryption key:
    /// (its name, the wrapped key). Blocking.
    pub fn wrap(&self, tenant: &str, key: &DataKey) -> Result<(String, String), StoreError> {
        match self {
            KeySource::None => Err(no_source()),
            KeySource::File(path) => {
                let keys = read_key_file(path)?;
                let (id, kek) = &keys[0];
                Ok((id.clone(), crypt::hex(&crypt::wrap(kek, tenant, key)?)))
            }
            KeySource::Hook(cmd) => {
                let out = run_hook(cmd, &["wrap", tenant], &crypt::hex(key.as_bytes()))?;
                let mut parts = out.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(kek), Some(wrapped), None) => Ok((kek.to_string(), wrapped.to_string())),
                    _ => Err(StoreError::Unavailable(format!(
                        "key hook {}: `wrap` printed {out:?}, not `KEK WRAPPED`",
                        cmd[0]
                    ))),
                }
            }
        }
    }

    /// [`KeySource::wrap`], then unwrapped again and compared: a wrapping
    /// goes into the state only if it opens (a wrong one would lock the
    /// tenant out).
    pub fn wrap_checked(
        &self,
        tenant: &str,
        key: &DataKey,
    ) -> Result<(String, String), StoreError> {
        let (kek, wrapped) = self.wrap(tenant, key)?;
        if self.unwrap(tenant, &kek, &wrapped)?.id() != key.id() {
            return Err(StoreError::Unavailable(
                "the key source's unwrap does not give back the key it wrapped".into(),
            ));
        }
        Ok((kek, wrapped))
    }

    /// Opens `tenant`'s data key wrapped by the key-encryption key `kek`.
    /// Blocking.
    pub fn unwrap(&self, tenant: &str, kek: &str, wrapped: &str) -> Result<DataKey, StoreError> {
        match self {
            KeySource::None => Err(no_source()),
            KeySource::File(path) => {
                let keys = read_key_file(path)?;
                let (_, k) = keys.iter().find(|(id, _)| id == kek).ok_or_else(|| {
                    StoreError::Unavailable(format!(
                        "key file {} has no key {kek} (the one that wraps tenant {tenant}'s key)",
                        path.display()
                    ))
                })?;
                Ok(crypt::unwrap(k, tenant, &crypt::from_hex(wrapped)?)?)
            }
            KeySource::Hook(cmd) => {
                let out = run_hook(cmd, &["unwrap", tenant, kek], wrapped)?;
                DataKey::from_bytes(&crypt::from_hex(&out)?)
            }
        }
    }
}

fn no_source() -> StoreError {
    StoreError::Unavailable(
        "this node has no key-encryption key: set [encryption] key_file or kms_command".into(),
    )
}

/// Runs the hook with `args`, `input` on its stdin; its stdout, trimmed.
fn run_hook(cmd: &[String], args: &[&str], input: &str) -> Result<String, StoreError> {
    let fail = |what: String| StoreError::Unavailable(format!("key hook {}: {what}", cmd[0]));
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{input}\n").as_bytes())
            .map_err(|e| fail(format!("writing its input: {e}")))?;
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > HOOK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer in {HOOK_TIMEOUT:?}")));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} {}: {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Keeps a store's keyring equal to the cluster state's tenant keys.
#[derive(Default)]
pub struct KeySync {
    /// tenant → the (key id, kek, wrapped) last opened or tried.
    seen: HashMap<String, (TenantKey, Option<Instant>)>,
}

impl KeySync {
    /// One round: opens keys that are new or re-wrapped, locks tenants
    /// whose key cannot be opened, forgets tenants no longer encrypted.
    /// Blocking (a hook may run).
    pub fn sync(
        &mut self,
        source: &KeySource,
        store: &dyn ChunkStore,
        state: &std::collections::BTreeMap<String, TenantKey>,
    ) {
        let ring = store.keyring();
        for (tenant, key) in state {
            let retry = match self.seen.get(tenant) {
                Some((k, None)) if k == key => continue,
                Some((k, Some(failed))) if k == key => failed.elapsed() >= RETRY_LOCKED,
                _ => true,
            };
            if !retry {
                continue;
            }
            let opened = source
                .unwrap(tenant, &key.kek, &key.wrapped)
                .and_then(|dk| {
                    if dk.id() == key.id {
                        Ok(dk)
                    } else {
                        Err(StoreError::Unavailable(format!(
                            "the unwrapped key is {}, the cluster's is {}",
                            dk.id(),
                            key.id
                        )))
                    }
                });
            match opened {
                Ok(dk) => {
                    ring.set(tenant, &dk);
                    self.seen.insert(tenant.clone(), (key.clone(), None));
                }
                Err(e) => {
                    tracing::error!(%tenant, error = %e, "cannot open the tenant's data key; its data is unreadable on this node");
                    ring.lock(tenant, e.to_string());
                    self.seen
                        .insert(tenant.clone(), (key.clone(), Some(Instant::now())));
                }
            }
        }
        for (tenant, _) in ring.tenants() {
            if !state.contains_key(&tenant) {
                ring.remove(&tenant);
                self.seen.remove(&tenant);
            }
        }
        ring.mark_loaded();
    }
}

/// Brings the keyring up to date with the local state now.
pub async fn sync_now(node: &Arc<Node>) {
    let state = node.cluster.local(|s| s.tenant_keys.clone());
    let n = node.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let mut sync = n.key_sync.lock().unwrap_or_else(|e| e.into_inner());
        sync.sync(&n.config.keys, n.store.as_ref(), &state);
    })
    .await;
}

/// Follows the cluster state's tenant keys, every second.
pub async fn sync_loop(node: Arc<Node>) {
    loop {
        sync_now(&node).await;
        node.pause(Duration::from_secs(1)).await;
        if node.is_shutting_down() {
            return;
        }
    }
}

/// A tenant's key as the API shows it.
pub struct KeyInfo {
    pub tenant: String,
    pub key: TenantKey,
    pub open_here: bool,
    pub previous_kek: Option<String>,
}

/// The encrypted tenants (`tenant`: just that one).
pub fn list(node: &Node, tenant: Option<&str>) -> Vec<KeyInfo> {
    let open: HashMap<String, Option<String>> =
        node.store.keyring().tenants().into_iter().collect();
    node.cluster.local(|s| {
        s.tenant_keys
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|w| w == t.as_str()))
            .map(|(t, k)| KeyInfo {
                tenant: t.clone(),
                open_here: open.get(t).and_then(|o| o.as_deref()) == Some(k.id.as_str()),
                key: k.clone(),
                previous_kek: None,
            })
            .collect()
    })
}

/// Encrypts `tenant` (no data yet): a new data key, wrapped here, into the
/// cluster state; open on this node when this returns.
pub async fn encrypt(node: &Arc<Node>, tenant: &str) -> Result<KeyInfo, StoreError> {
    let (source, t) = (node.config.keys.clone(), tenant.to_string());
    let (dk, kek, wrapped) = tokio::task::spawn_blocking(move || {
        let dk = DataKey::generate()?;
        let (kek, wrapped) = source.wrap_checked(&t, &dk)?;
        Ok::<_, StoreError>((dk, kek, wrapped))
    })
    .await
    .unwrap_or(Err(StoreError::Panicked))?;
    let key = TenantKey {
        id: dk.id(),
        kek,
        wrapped,
        since_unix_ms: now_ms(),
    };
    write(node, tenant, key, false).await?;
    sync_now(node).await;
    list(node, Some(tenant))
        .pop()
        .ok_or_else(|| StoreError::Conflict(format!("tenant {tenant} was erased meanwhile")))
}

/// Re-wraps the data key of `tenant` (or of every encrypted tenant) with
/// the current key-encryption key; chunks are not touched.
pub async fn rewrap(node: &Arc<Node>, tenant: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
    let mut out = Vec::new();
    let current = list(node, tenant);
    if let (Some(t), true) = (tenant, current.is_empty()) {
        return Err(StoreError::InvalidArgument(format!(
            "tenant {t} is not encrypted"
        )));
    }
    for info in current {
        let (source, t, old) = (
            node.config.keys.clone(),
            info.tenant.clone(),
            info.key.clone(),
        );
        let key = tokio::task::spawn_blocking(move || {
            let dk = source.unwrap(&t, &old.kek, &old.wrapped)?;
            let (kek, wrapped) = source.wrap_checked(&t, &dk)?;
            Ok::<_, StoreError>(TenantKey {
                kek,
                wrapped,
                ..old
            })
        })
        .await
        .unwrap_or(Err(StoreError::Panicked))?;
        write(node, &info.tenant, key.clone(), true).await?;
        out.push(KeyInfo {
            previous_kek: Some(info.key.kek),
            key,
            ..info
        });
    }
    sync_now(node).await;
    Ok(out)
}

async fn write(node: &Node, tenant: &str, key: TenantKey, rewrap: bool) -> Result<(), StoreError> {
    let resp = node
        .cluster
        .write(RaftCommand::SetTenantKey {
            tenant: tenant.to_string(),
            key,
            rewrap,
        })
        .await
        .map_err(crate::node::raft_error)?;
    crate::link::fenced_error("", resp)?;
    // Applied here too before the answer is read from the local state.
    node.cluster
        .read(|_| ())
        .await
        .map_err(crate::node::raft_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_parse_and_refuse_what_is_wrong() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let keys = parse_key_file(&format!("# rotated 2026-12\nk2 {b}\n\nk1 {a}\n")).unwrap();
        assert_eq!(keys[0].0, "k2", "the first key is the primary");
        assert_eq!(keys[1].1, [0x11; 32]);
        for bad in [
            String::new(),
            "# only a comment".into(),
            format!("k1 {a} extra"),
            format!("k1 {}", &a[2..]),
            format!("k/1 {a}"),
            format!("k1 {a}\nk1 {b}"),
            "k1 zz".into(),
        ] {
            assert!(parse_key_file(&bad).is_err(), "{bad:?}");
        }
        let line = generate_line("new").unwrap();
        assert_eq!(parse_key_file(&line).unwrap()[0].0, "new");
    }

    #[test]
    fn file_source_wraps_with_the_first_key_and_unwraps_with_any() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (a, b) = ("11".repeat(32), "22".repeat(32));
        std::fs::write(&path, format!("old {a}\n")).unwrap();
        let src = KeySource::File(path.clone());
        let dk = DataKey::generate().unwrap();
        let (kek, wrapped) = src.wrap("t", &dk).unwrap();
        assert_eq!(kek, "old");
        // Rotation: a new primary first, the old key kept to unwrap.
        std::fs::write(&path, format!("new {b}\nold {a}\n")).unwrap();
        assert_eq!(src.unwrap("t", &kek, &wrapped).unwrap(), dk);
        let (kek2, wrapped2) = src.wrap("t", &dk).unwrap();
        assert_eq!(kek2, "new");
        // The old key retired: what it wrapped no longer opens.
        std::fs::write(&path, format!("new {b}\n")).unwrap();
        assert_eq!(src.unwrap("t", &kek2, &wrapped2).unwrap(), dk);
        let e = src.unwrap("t", &kek, &wrapped).unwrap_err().to_string();
        assert!(e.contains("no key old"), "{e}");
        assert!(KeySource::None.wrap("t", &dk).is_err());
    }

    #[test]
    fn hook_source_speaks_its_protocol() {
        // A stand-in key-management service: keeps keys in a directory
        // and hands out handles, as a real one would.
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("kms");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\nset -e\nd={}\nread -r input\ncase \"$1\" in\n\
                 wrap) h=$(printf %s \"$2$input\" | sha256sum | cut -c1-16); printf %s \"$input\" > \"$d/$h\"; echo \"toy $h\" ;;\n\
                 unwrap) [ \"$3\" = toy ] || exit 3; cat \"$d/$input\" ;;\n\
                 *) exit 2 ;;\nesac\n",
                dir.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let src = KeySource::Hook(vec![hook.display().to_string()]);
        let dk = DataKey::generate().unwrap();
        let (kek, wrapped) = src.wrap("acme", &dk).unwrap();
        assert_eq!(kek, "toy");
        assert_eq!(src.unwrap("acme", &kek, &wrapped).unwrap(), dk);
        let e = src
            .unwrap("acme", "other", &wrapped)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status: 3"), "{e}");
        let missing = KeySource::Hook(vec!["/nonexistent/kms".into()]);
        assert!(missing.wrap("acme", &dk).is_err());
    }

    #[test]
    fn sync_opens_locks_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("k1 {}\n", "33".repeat(32))).unwrap();
        let src = KeySource::File(path.clone());
        let store = bitclone_storage::MemStore::new();
        store.keyring().require_load();
        let dk = DataKey::generate().unwrap();
        let (kek, wrapped) = src.wrap("a", &dk).unwrap();
        let key = TenantKey {
            id: dk.id(),
            kek,
            wrapped,
            since_unix_ms: 0,
        };
        let mut state = std::collections::BTreeMap::new();
        state.insert("a".to_string(), key.clone());
        state.insert(
            "b".to_string(),
            TenantKey {
                kek: "gone".into(),
                ..key.clone()
            },
        );
        let mut sync = KeySync::default();
        sync.sync(&src, &store, &state);
        assert_eq!(store.codec("a").unwrap().key_id(), Some(dk.id().as_str()));
        let e = store.codec("b").unwrap_err().to_string();
        assert!(e.contains("no key gone"), "{e}");
        assert!(store.codec("c").unwrap().is_plain());
        state.remove("a");
        sync.sync(&src, &store, &state);
        assert!(store.codec("a").unwrap().is_plain(), "forgotten");
    }
}
