//! The correlation id of the work a client call causes. A node's API layer
//! takes the caller's `x-request-id` (or makes one up), puts it on the
//! call's log span and keeps it here for the call's task, so that what the
//! call causes on other tasks and nodes carries it along: a command
//! forwarded to the leader (as `x-request-id` on the peer call), chunks
//! replicated to peers, the jobs it submits.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

#[derive(Clone)]
struct Call {
    request_id: String,
    /// The call's span as a W3C `traceparent`, when traces are exported.
    traceparent: Option<String>,
}

tokio::task_local! {
    static CALL: Call;
}

/// The id of the call this task serves, if it serves one.
pub fn current() -> Option<String> {
    CALL.try_with(|c| c.request_id.clone()).ok()
}

/// Where work this task causes elsewhere continues the trace, as a W3C
/// `traceparent`: the current span when it is traced, else the span of the
/// call this task serves (outside any span of its own), else none.
pub fn traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
        .or_else(|| CALL.try_with(|c| c.traceparent.clone()).ok().flatten())
}

/// Runs `fut` as part of the call `id`.
pub async fn scope<F: std::future::Future>(id: String, fut: F) -> F::Output {
    scope_traced(id, None, fut).await
}

/// Runs `fut` as part of the call `id`, traced as `traceparent`.
pub async fn scope_traced<F: std::future::Future>(
    id: String,
    traceparent: Option<String>,
    fut: F,
) -> F::Output {
    CALL.scope(
        Call {
            request_id: id,
            traceparent,
        },
        fut,
    )
    .await
}

/// A span's OpenTelemetry context as a W3C `traceparent` header value
/// (`None` when it is not traced: no exporter, or not sampled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Makes `span` a child of the remote span a `traceparent` names (a call
/// from another node); a malformed value is ignored.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(sc) = parse_traceparent(traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; a later version's
/// first four fields), or `None` when malformed or all-zero.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version 00 has exactly four fields; "ff" is never valid.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !(hex(trace, 32) && hex(id, 16) && hex(flags, 2)) {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
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

    #[test]
    fn traceparents_are_parsed_strictly() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = parse_traceparent(good).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(!parse_traceparent(&good.replace("-01", "-00"))
            .unwrap()
            .is_sampled());
        // A later version may add fields; its first four are read.
        assert!(parse_traceparent(&format!("01{}-extra", &good[2..])).is_some());
        for bad in [
            "",
            "00-1-2-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            &format!("{good}-extra"),
            &good.replace("00-", "ff-"),
            &good.to_uppercase(),
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
