//! The conformance suite every [`ChunkStore`] implementation must pass.
//!
//! Call [`run_all`] from a test with a fresh, empty store.

use crate::chunk::{ChunkId, SnapshotId};
use crate::error::Error;
use crate::store::ChunkStore;

/// Runs every check against `store`, panicking with a description on failure.
pub fn run_all(store: &dyn ChunkStore) {
    put_get_round_trip(store);
    put_is_idempotent(store);
    batches_store_each_chunk_once(store);
    tenants_are_isolated(store);
    missing_chunk_is_an_error(store);
    corrupt_value_is_never_returned(store);
    manifests_round_trip_and_verify(store);
    empty_chunk(store);
}

fn put_get_round_trip(store: &dyn ChunkStore) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let id = ChunkId::of(&data);
    assert!(
        !store.has_chunk("t1", &id).expect("has"),
        "fresh store has the chunk"
    );
    assert!(
        store.put_chunk("t1", &id, &data).expect("put"),
        "first put must be new"
    );
    assert!(store.has_chunk("t1", &id).expect("has"));
    assert_eq!(store.get_chunk("t1", &id).expect("get"), data);
    store.sync().expect("sync");
}

fn put_is_idempotent(store: &dyn ChunkStore) {
    let data = b"idempotent".to_vec();
    let id = ChunkId::of(&data);
    assert!(store.put_chunk("t1", &id, &data).expect("put"));
    assert!(
        !store.put_chunk("t1", &id, &data).expect("put again"),
        "second put reported new"
    );
    assert_eq!(store.get_chunk("t1", &id).expect("get"), data);
}

fn batches_store_each_chunk_once(store: &dyn ChunkStore) {
    let (a, b) = (b"batch a".as_slice(), b"batch b".as_slice());
    let (ia, ib) = (ChunkId::of(a), ChunkId::of(b));
    store.put_chunk("t1", &ia, a).expect("put");
    let new = store
        .put_chunks("t1", &[(ia, a), (ib, b), (ib, b)])
        .expect("put batch");
    assert_eq!(new, [false, true, false], "stored before, new, repeated");
    assert_eq!(store.get_chunk("t1", &ib).expect("get"), b);
    assert!(!store.has_chunk("t2", &ib).expect("has"));
}

fn tenants_are_isolated(store: &dyn ChunkStore) {
    let data = b"tenant one only".to_vec();
    let id = ChunkId::of(&data);
    store.put_chunk("t1", &id, &data).expect("put");
    assert!(
        !store.has_chunk("t2", &id).expect("has"),
        "tenant t2 sees t1's chunk"
    );
    assert!(store.get_chunk("t2", &id).is_err());
    // A tenant name that is a prefix of another must not alias its keys.
    assert!(!store.has_chunk("t", &id).expect("has"));
}

fn missing_chunk_is_an_error(store: &dyn ChunkStore) {
    let id = ChunkId::of(b"never stored");
    match store.get_chunk("t1", &id) {
        Err(Error::MissingChunk(got)) => assert_eq!(got, id),
        other => panic!("expected MissingChunk, got {other:?}"),
    }
}

fn corrupt_value_is_never_returned(store: &dyn ChunkStore) {
    let id = ChunkId::of(b"the real bytes");
    store.put_chunk("t1", &id, b"other bytes!!!").expect("put");
    match store.get_chunk("t1", &id) {
        Err(Error::CorruptChunk { chunk, .. }) => assert_eq!(chunk, id),
        other => panic!("expected CorruptChunk, got {other:?}"),
    }
}

fn manifests_round_trip_and_verify(store: &dyn ChunkStore) {
    let bytes = b"BCMF manifest bytes".to_vec();
    let id = SnapshotId::of(&bytes);
    store.put_manifest("t1", &id, &bytes).expect("put manifest");
    assert_eq!(store.get_manifest("t1", &id).expect("get manifest"), bytes);
    assert!(
        store.get_manifest("t2", &id).is_err(),
        "manifest leaked across tenants"
    );
    let bad = SnapshotId::of(b"something else");
    store.put_manifest("t1", &bad, &bytes).expect("put");
    assert!(matches!(
        store.get_manifest("t1", &bad),
        Err(Error::CorruptChunk { .. })
    ));
}

fn empty_chunk(store: &dyn ChunkStore) {
    let id = ChunkId::of(b"");
    store.put_chunk("t1", &id, b"").expect("put empty");
    assert_eq!(
        store.get_chunk("t1", &id).expect("get empty"),
        Vec::<u8>::new()
    );
}
