//! The correlation id of the work a client call causes. A node's API layer
//! takes the caller's `x-request-id` (or makes one up), puts it on the
//! call's log span and keeps it here for the call's task, so that what the
//! call causes on other tasks and nodes carries it along: a command
//! forwarded to the leader (as `x-request-id` on the peer call), chunks
//! replicated to peers, the jobs it submits.

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the call this task serves, if it serves one.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Runs `fut` as part of the call `id`.
pub async fn scope<F: std::future::Future>(id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// A client's id when it is short and plain (it lands in logs and headers),
/// else `None`.
pub fn accepted(id: &str) -> Option<&str> {
    (!id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    .then_some(id)
}

/// A new id, for a call that came without one.
pub fn fresh() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_are_kept_others_replaced_and_the_id_follows_the_task() {
        assert_eq!(accepted("put-42_a"), Some("put-42_a"));
        for bad in ["", "a b", "x\ny", "é", &"x".repeat(65)] {
            assert_eq!(accepted(bad), None, "{bad:?}");
        }
        assert_eq!(fresh().len(), 16);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current(), None);
        let inner = rt.block_on(scope("r1".into(), async { current() }));
        assert_eq!(inner.as_deref(), Some("r1"));
    }
}
