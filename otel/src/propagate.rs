//! The trace context in HTTP headers. Read: W3C `traceparent`/`tracestate`, else
//! B3 single (`b3`), else B3 multi (`x-b3-traceid`, …). Written: `traceparent`
//! (and `tracestate`) always, and B3 again in the format it came in, so an app
//! that only speaks B3 stays in the trace.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// How the context came in, so it goes out the same way too (B3 when B3
/// headers came, with or without `traceparent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's span context, if the request carries a valid one.
pub fn extract(h: &HeaderMap) -> Option<(SpanContext, Format)> {
    if h.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&Headers(h));
        let sc = cx.span().span_context().clone();
        // B3 beside it (from a proxy that answered a B3 caller in kind) is
        // written again too, or it would point at a stale span.
        let format = if h.contains_key(B3) {
            Format::B3Single
        } else if h.contains_key(B3_TRACE) {
            Format::B3Multi
        } else {
            Format::W3c
        };
        return sc.is_valid().then_some((sc, format));
    }
    if let Some(v) = h.get(B3).and_then(|v| v.to_str().ok()) {
        return b3_single(v).map(|sc| (sc, Format::B3Single));
    }
    let trace = h.get(B3_TRACE)?.to_str().ok()?;
    let span = h.get(B3_SPAN)?.to_str().ok()?;
    let sampled = matches!(
        (
            h.get(B3_SAMPLED).map(HeaderValue::as_bytes),
            h.get(B3_FLAGS).map(HeaderValue::as_bytes),
        ),
        (_, Some(b"1")) | (Some(b"1" | b"true"), _)
    );
    b3_context(trace, span, sampled).map(|sc| (sc, Format::B3Multi))
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`; a bare `0`/`1`/`d` carries no ids.
fn b3_single(v: &str) -> Option<SpanContext> {
    let mut parts = v.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = matches!(parts.next(), Some("1" | "d"));
    b3_context(trace, span, sampled)
}

/// B3 ids are hex: a 64-bit trace id is the low half of a 128-bit one.
fn b3_context(trace: &str, span: &str, sampled: bool) -> Option<SpanContext> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace, 32) || hex(trace, 16)) || !hex(span, 16) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Writes `sc` as the context of the next hop: `traceparent` (and `tracestate`),
/// plus B3 in `also`'s format when the caller spoke B3.
pub fn inject(h: &mut HeaderMap, sc: &SpanContext, also: Option<Format>) {
    let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(h));
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let (trace, span) = (sc.trace_id().to_string(), sc.span_id().to_string());
    match also {
        Some(Format::B3Single) => {
            if let Ok(v) = HeaderValue::try_from(format!("{trace}-{span}-{sampled}")) {
                h.insert(B3, v);
            }
        }
        Some(Format::B3Multi) => {
            for (k, v) in [(B3_TRACE, trace), (B3_SPAN, span)] {
                if let Ok(v) = HeaderValue::try_from(v) {
                    h.insert(k, v);
                }
            }
            h.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
            // Our span is the next hop's parent; the caller's parent id is stale.
            h.remove(B3_PARENT);
            h.remove(B3_FLAGS);
        }
        Some(Format::W3c) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
                )
            })
            .collect()
    }

    #[test]
    fn reads_w3c_b3_single_and_b3_multi() {
        let w3c = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let (sc, f) = extract(&w3c).expect("w3c");
        assert_eq!((sc.trace_id().to_string(), f), (TRACE.into(), Format::W3c));
        assert!(sc.is_sampled() && sc.is_remote());

        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let (sc, f) = extract(&single).expect("b3");
        assert_eq!(
            (sc.span_id().to_string(), f),
            (SPAN.into(), Format::B3Single)
        );
        assert!(sc.is_sampled());

        let multi = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]);
        let (sc, f) = extract(&multi).expect("b3 multi");
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(f, Format::B3Multi);
        assert!(!sc.is_sampled());
    }

    #[test]
    fn junk_is_no_context() {
        for h in [
            headers(&[("traceparent", "00-xyz-abc-01")]),
            headers(&[("traceparent", &format!("00-{}-{SPAN}-01", "0".repeat(32)))]),
            headers(&[("b3", "1")]),
            headers(&[("b3", "nothex-00f067aa0ba902b7-1")]),
            headers(&[("x-b3-traceid", TRACE)]),
        ] {
            assert!(extract(&h).is_none(), "{h:?}");
        }
    }

    #[test]
    fn writes_traceparent_and_b3_as_it_came() {
        let sc = SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex("1111111111111111").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut h = headers(&[("x-b3-parentspanid", SPAN)]);
        inject(&mut h, &sc, Some(Format::B3Multi));
        assert_eq!(h["traceparent"], format!("00-{TRACE}-1111111111111111-01"));
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));
        let mut h = HeaderMap::new();
        inject(&mut h, &sc, Some(Format::B3Single));
        assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-1"));
    }
}
