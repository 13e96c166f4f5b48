//! Encryption at rest: a tenant's chunks and manifests sealed with its own
//! data key, and named so that dedup stays inside the tenant.
//!
//! A tenant that is not encrypted stores its content as it is, named by
//! its BLAKE3 ([`Codec::Plain`]). An encrypted tenant has a 32-byte data key
//! ([`DataKey`]), from which two keys are derived with BLAKE3's key
//! derivation: one for synthetic IVs, one for chunk keys. A content is
//! stored as
//!
//! ```text
//! [0x01][siv: 32 bytes][AES-256-GCM ciphertext][tag: 16 bytes]
//! siv = BLAKE3-keyed(siv key, content)
//! key = BLAKE3-keyed(chunk-key key, siv)   (one key per distinct content, nonce 0)
//! ```
//!
//! and named by the BLAKE3 of those stored bytes, as any chunk is. The seal
//! is deterministic (the same content of a tenant seals to the same bytes,
//! so it is stored once), and the name is a keyed function of the content:
//! the same file in two tenants gets two names, and no one without the
//! tenant's key can compute the name of a known file to probe for it. Every
//! node can still check stored bytes against their name without the key
//! (replication, scrub, repair and the cold tier move stored bytes as they
//! are); only reading the content needs the key.
//!
//! Data keys never reach the Raft log in clear: they are wrapped (sealed)
//! with a key-encryption key the operator holds ([`wrap`], [`unwrap`]), and
//! rotating that key re-wraps the data keys without touching a chunk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::store::verified;

/// Bytes in a data key or a key-encryption key.
pub const KEY_BYTES: usize = 32;

const SEALED_V1: u8 = 1;
const SIV_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
/// What sealing adds to a content's length.
pub const SEAL_OVERHEAD: usize = 1 + SIV_BYTES + TAG_BYTES;

// Key derivation contexts (BLAKE3 `derive_key`): fixed forever, since
// stored bytes depend on them.
const CTX_SIV: &str = "bitclone 2026-12-05 chunk synthetic iv";
const CTX_CHUNK_KEY: &str = "bitclone 2026-12-05 chunk key";
const CTX_KEY_ID: &str = "bitclone 2026-12-05 data key id";
const CHUNK_AAD: &[u8] = b"bitclone sealed chunk v1";
const WRAP_AAD: &[u8] = b"bitclone wrapped data key v1";

/// A tenant's data key: 32 random bytes, never stored in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; KEY_BYTES]);

impl DataKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<DataKey> {
        let mut k = [0u8; KEY_BYTES];
        aws_lc_rs::rand::fill(&mut k)
            .map_err(|_| Error::Unavailable("the system random source failed".into()))?;
        Ok(DataKey(k))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DataKey> {
        let k: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "a data key is {KEY_BYTES} bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(DataKey(k))
    }

    /// The raw bytes (to wrap them).
    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// A public fingerprint of the key (16 hex digits): tells keys apart in
    /// the cluster state and in commits, reveals nothing of the key.
    pub fn id(&self) -> String {
        let d = blake3::derive_key(CTX_KEY_ID, &self.0);
        hex(&d[..8])
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({})", self.id())
    }
}

/// The keys a [`Codec`] seals a tenant's content with.
pub struct TenantCipher {
    siv_key: [u8; KEY_BYTES],
    chunk_key_key: [u8; KEY_BYTES],
    id: String,
}

impl fmt::Debug for TenantCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantCipher({})", self.id)
    }
}

/// How a tenant's content is stored and named: as it is, or sealed with
/// its data key. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub enum Codec {
    /// Stored as it is, named by its BLAKE3.
    #[default]
    Plain,
    /// Sealed with the tenant's data key (see the module docs).
    Sealed(Arc<TenantCipher>),
}

impl Codec {
    /// The codec of a tenant whose data key is `key`.
    pub fn sealed(key: &DataKey) -> Codec {
        Codec::Sealed(Arc::new(TenantCipher {
            siv_key: blake3::derive_key(CTX_SIV, &key.0),
            chunk_key_key: blake3::derive_key(CTX_CHUNK_KEY, &key.0),
            id: key.id(),
        }))
    }

    /// The data key's fingerprint ([`DataKey::id`]), or `None` if plain.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Codec::Plain => None,
            Codec::Sealed(c) => Some(&c.id),
        }
    }

    /// Whether content is stored as it is.
    pub fn is_plain(&self) -> bool {
        matches!(self, Codec::Plain)
    }

    /// The stored form of `content` and its name.
    pub fn seal<'a>(&self, content: &'a [u8]) -> (ChunkId, Cow<'a, [u8]>) {
        match self {
            Codec::Plain => (ChunkId::of(content), Cow::Borrowed(content)),
            Codec::Sealed(c) => {
                let siv = *blake3::keyed_hash(&c.siv_key, content).as_bytes();
                let mut out = Vec::with_capacity(content.len() + SEAL_OVERHEAD);
                out.push(SEALED_V1);
                out.extend_from_slice(&siv);
                out.extend_from_slice(content);
                let tag = chunk_key(c, &siv)
                    .seal_in_place_separate_tag(
                        zero_nonce(),
                        Aad::from(CHUNK_AAD),
                        &mut out[1 + SIV_BYTES..],
                    )
                    // Only fails past AES-GCM's 64 GiB message limit, far
                    // above any chunk or page.
                    .expect("AES-256-GCM seals a chunk-sized message");
                out.extend_from_slice(tag.as_ref());
                (ChunkId::of(&out), Cow::Owned(out))
            }
        }
    }

    /// The content of `stored`, read back under the name `id`: checks the
    /// bytes against the name, and for a sealed tenant opens them and
    /// checks the content against its synthetic IV. Anything else is
    /// [`Error::CorruptChunk`].
    pub fn open(&self, id: &ChunkId, stored: Vec<u8>) -> Result<Vec<u8>> {
        let stored = verified(id, stored)?;
        let Codec::Sealed(c) = self else {
            return Ok(stored);
        };
        let corrupt = |detail: &str| Error::CorruptChunk {
            chunk: *id,
            detail: detail.to_string(),
        };
        if stored.len() < SEAL_OVERHEAD || stored[0] != SEALED_V1 {
            return Err(corrupt(
                "not sealed with this tenant's key (stored in clear, or by a newer version)",
            ));
        }
        let siv: [u8; SIV_BYTES] = stored[1..1 + SIV_BYTES]
            .try_into()
            .map_err(|_| corrupt("short synthetic IV"))?;
        let mut body = stored;
        body.drain(..1 + SIV_BYTES);
        let n = chunk_key(c, &siv)
            .open_in_place(zero_nonce(), Aad::from(CHUNK_AAD), &mut body)
            .map_err(|_| corrupt("does not open with this tenant's data key"))?
            .len();
        body.truncate(n);
        if blake3::keyed_hash(&c.siv_key, &body) != blake3::Hash::from(siv) {
            return Err(corrupt("opened content does not match its synthetic IV"));
        }
        Ok(body)
    }
}

fn chunk_key(c: &TenantCipher, siv: &[u8; SIV_BYTES]) -> LessSafeKey {
    let k = blake3::keyed_hash(&c.chunk_key_key, siv);
    // A 32-byte key is always valid for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_bytes()).expect("32-byte AES key"))
}

// Each chunk key seals one content only (the same content again gives the
// same bytes), so a fixed nonce never meets two messages under one key.
fn zero_nonce() -> Nonce {
    Nonce::assume_unique_for_key([0u8; NONCE_LEN])
}

/// Wraps (seals) `key`, the data key of `tenant`, with the key-encryption
/// key `kek`: a random nonce, the tenant's name bound in, so a wrapped key
/// cannot be passed off as another tenant's. Returns `nonce || sealed key`.
pub fn wrap(kek: &[u8; KEY_BYTES], tenant: &str, key: &DataKey) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce)
        .map_err(|_| Error::Unavailable("the system random source failed".into()))?;
    let mut body = key.0.to_vec();
    kek_key(kek)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(tenant)),
            &mut body,
        )
        .map_err(|_| Error::Unavailable("wrapping a data key failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens what [`wrap`] made for `tenant` with `kek`.
pub fn unwrap(kek: &[u8; KEY_BYTES], tenant: &str, wrapped: &[u8]) -> Result<DataKey> {
    let bad = || {
        Error::InvalidArgument(format!(
            "the wrapped data key of tenant {tenant} does not open with this key-encryption key"
        ))
    };
    if wrapped.len() != NONCE_LEN + KEY_BYTES + TAG_BYTES {
        return Err(bad());
    }
    let nonce: [u8; NONCE_LEN] = wrapped[..NONCE_LEN].try_into().map_err(|_| bad())?;
    let mut body = wrapped[NONCE_LEN..].to_vec();
    let key = kek_key(kek)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(tenant)),
            &mut body,
        )
        .map_err(|_| bad())?;
    DataKey::from_bytes(key)
}

fn kek_key(kek: &[u8; KEY_BYTES]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).expect("32-byte AES key"))
}

fn wrap_aad(tenant: &str) -> Vec<u8> {
    let mut aad = WRAP_AAD.to_vec();
    aad.push(0);
    aad.extend_from_slice(tenant.as_bytes());
    aad
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of the hex string `s`.
pub fn from_hex(s: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(
            "not an even-length hex string".into(),
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .map_err(|_| Error::InvalidArgument("not a hex string".into()))
        })
        .collect()
}

/// What a store knows of a tenant's key.
#[derive(Clone, Debug)]
enum KeyState {
    Open(Codec),
    /// Encrypted, but this node cannot open its data key: reads and writes
    /// of the tenant fail rather than store or return the wrong bytes.
    Locked(String),
}

/// The codecs of a store's encrypted tenants (a tenant not listed is
/// plain). Filled by whoever holds the keys (a node, from the cluster
/// state); until [`Keyring::mark_loaded`] after [`Keyring::require_load`],
/// every tenant's codec is unavailable, so nothing is read or written in
/// the wrong form while keys are being loaded.
#[derive(Default)]
pub struct Keyring {
    inner: RwLock<Ring>,
}

#[derive(Default)]
struct Ring {
    loading: bool,
    tenants: HashMap<String, KeyState>,
}

impl Keyring {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The codec of `tenant`, or [`Error::Unavailable`] if it is encrypted
    /// and its key is not open here (or keys are still being loaded).
    pub fn codec(&self, tenant: &str) -> Result<Codec> {
        let ring = self.read();
        if ring.loading {
            return Err(Error::Unavailable(
                "tenant keys are still being loaded on this node".into(),
            ));
        }
        match ring.tenants.get(tenant) {
            None => Ok(Codec::Plain),
            Some(KeyState::Open(c)) => Ok(c.clone()),
            Some(KeyState::Locked(why)) => Err(Error::Unavailable(format!(
                "tenant {tenant} is encrypted and its data key is not available on this node: {why}"
            ))),
        }
    }

    /// Holds every codec back until [`Keyring::mark_loaded`].
    pub fn require_load(&self) {
        self.write().loading = true;
    }

    /// The keys are loaded: codecs are answered.
    pub fn mark_loaded(&self) {
        self.write().loading = false;
    }

    /// Seals `tenant` with `key` from now on.
    pub fn set(&self, tenant: &str, key: &DataKey) {
        self.write()
            .tenants
            .insert(tenant.to_string(), KeyState::Open(Codec::sealed(key)));
    }

    /// Marks `tenant` encrypted with a key this node cannot open.
    pub fn lock(&self, tenant: &str, why: String) {
        self.write()
            .tenants
            .insert(tenant.to_string(), KeyState::Locked(why));
    }

    /// Forgets `tenant` (it is plain again, or gone).
    pub fn remove(&self, tenant: &str) {
        self.write().tenants.remove(tenant);
    }

    /// The tenants listed, with the fingerprint of their open key (`None`
    /// if locked).
    pub fn tenants(&self) -> Vec<(String, Option<String>)> {
        let mut out: Vec<_> = self
            .read()
            .tenants
            .iter()
            .map(|(t, s)| {
                let id = match s {
                    KeyState::Open(c) => c.key_id().map(str::to_string),
                    KeyState::Locked(_) => None,
                };
                (t.clone(), id)
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_is_deterministic_keyed_and_opens_back() {
        let (a, b) = (DataKey::generate().unwrap(), DataKey::generate().unwrap());
        let (ca, cb) = (Codec::sealed(&a), Codec::sealed(&b));
        let content = b"the same file, in two tenants".repeat(100);
        let (ia, sa) = ca.seal(&content);
        let (ia2, sa2) = ca.seal(&content);
        assert_eq!(
            (ia, &sa),
            (ia2, &sa2),
            "one tenant: one name, one stored form"
        );
        let (ib, _) = cb.seal(&content);
        let (ip, sp) = Codec::Plain.seal(&content);
        assert_ne!(ia, ib, "two tenants: two names");
        assert_ne!(ia, ip);
        assert_eq!(ip, ChunkId::of(&content));
        assert_eq!(&*sp, &content[..]);
        assert_eq!(sa.len(), content.len() + SEAL_OVERHEAD);
        assert!(
            !sa.windows(16).any(|w| content.windows(16).any(|c| c == w)),
            "no 16 bytes of the content appear in its stored form"
        );
        assert_eq!(ia, ChunkId::of(&sa), "named by the stored bytes");
        assert_eq!(ca.open(&ia, sa.to_vec()).unwrap(), content);
        // The other tenant's key, a flipped byte, clear bytes under a
        // sealed tenant: all refused.
        assert!(matches!(
            cb.open(&ia, sa.to_vec()),
            Err(Error::CorruptChunk { .. })
        ));
        let mut bad = sa.to_vec();
        bad[40] ^= 1;
        assert!(ca.open(&ChunkId::of(&bad), bad).is_err());
        assert!(ca.open(&ip, content.clone()).is_err());
        // Plain opening still checks the name.
        assert!(Codec::Plain.open(&ia, content.clone()).is_err());
        // The empty content seals and opens too.
        let (ie, se) = ca.seal(b"");
        assert_eq!(ca.open(&ie, se.to_vec()).unwrap(), b"");
    }

    #[test]
    fn wrapped_keys_open_only_with_their_kek_and_tenant() {
        let key = DataKey::generate().unwrap();
        let (k1, k2) = ([7u8; 32], [8u8; 32]);
        let w = wrap(&k1, "acme", &key).unwrap();
        assert_eq!(unwrap(&k1, "acme", &w).unwrap(), key);
        assert!(unwrap(&k2, "acme", &w).is_err(), "another KEK");
        assert!(unwrap(&k1, "other", &w).is_err(), "another tenant");
        assert!(unwrap(&k1, "acme", &w[1..]).is_err());
        // Re-wrapping keeps the data key (and so every chunk) as it is.
        let w2 = wrap(&k2, "acme", &unwrap(&k1, "acme", &w).unwrap()).unwrap();
        assert_eq!(unwrap(&k2, "acme", &w2).unwrap().id(), key.id());
        assert_ne!(w, wrap(&k1, "acme", &key).unwrap(), "random nonces");
        assert_eq!(from_hex(&hex(&w)).unwrap(), w);
        assert!(from_hex("abc").is_err());
    }

    #[test]
    fn keyring_answers_plain_sealed_locked_and_waits_for_loading() {
        let ring = Keyring::default();
        assert!(ring.codec("t").unwrap().is_plain());
        ring.require_load();
        assert!(matches!(ring.codec("t"), Err(Error::Unavailable(_))));
        let key = DataKey::generate().unwrap();
        ring.set("t", &key);
        ring.lock("u", "no key file".into());
        ring.mark_loaded();
        assert_eq!(ring.codec("t").unwrap().key_id(), Some(key.id().as_str()));
        let e = ring.codec("u").unwrap_err().to_string();
        assert!(e.contains("no key file"), "{e}");
        assert_eq!(
            ring.tenants(),
            vec![("t".into(), Some(key.id())), ("u".into(), None)]
        );
        ring.remove("t");
        assert!(ring.codec("t").unwrap().is_plain());
    }
}
