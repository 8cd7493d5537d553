//! The trace context in HTTP headers. Read: W3C `traceparent`/`tracestate`, else
//! B3 single (`b3`), else B3 multi (`x-b3-traceid`, …). Written: `traceparent`
//! (and `tracestate`) always, and B3 again in the format it came in, so an app
//! that only speaks B3 stays in the trace.

use std::str::FromStr;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// How the context came in, so it goes out the same way too (B3 when B3
/// headers came, with or without `traceparent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// `traceparent` as W3C Trace Context level 1 writes it: `00-{trace}-{span}-{flags}`,
/// lowercase hex. Read and written here, on every request of a traced proxy,
/// without the SDK propagator's `Context` and strings; the tests hold the two
/// to the same answers.
fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let v = v.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    // Version 0 is exactly four fields; a later version may append its own.
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let mut trace = [0u8; 16];
    for (i, b) in trace.iter_mut().enumerate() {
        *b = hex_u8(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span = [0u8; 8];
    for (i, b) in span.iter_mut().enumerate() {
        *b = hex_u8(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_u8(&v[53..55])?;
    Some((
        TraceId::from_bytes(trace),
        SpanId::from_bytes(span),
        // Unknown flags are accepted and cleared (W3C "other flags").
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

/// Two lowercase hex digits.
fn hex_u8(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// A value new on every request (span ids). Marked sensitive so that HTTP/2's
/// header compression sends it as a literal instead of adding it to the
/// connection's table, where each request's id would push out the entries that
/// do repeat (authority, user agent...) and make the next requests' headers
/// larger and costlier to encode and decode.
fn unique(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

fn traceparent(sc: &SpanContext) -> Option<HeaderValue> {
    let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
    write_hex(&mut b[3..35], &sc.trace_id().to_bytes());
    write_hex(&mut b[36..52], &sc.span_id().to_bytes());
    write_hex(
        &mut b[53..55],
        &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
    );
    HeaderValue::from_bytes(&b).ok().map(unique)
}

fn w3c_context(h: &HeaderMap) -> Option<SpanContext> {
    let (trace, span, flags) = parse_traceparent(h.get(TRACEPARENT)?.as_bytes())?;
    let state = h
        .get(TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceState::from_str(v).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace, span, flags, true, state);
    sc.is_valid().then_some(sc)
}

/// The caller's span context, if the request carries a valid one.
pub fn extract(h: &HeaderMap) -> Option<(SpanContext, Format)> {
    if h.contains_key(TRACEPARENT) {
        // B3 beside it (from a proxy that answered a B3 caller in kind) is
        // written again too, or it would point at a stale span.
        let format = if h.contains_key(B3) {
            Format::B3Single
        } else if h.contains_key(B3_TRACE) {
            Format::B3Multi
        } else {
            Format::W3c
        };
        return w3c_context(h).map(|sc| (sc, format));
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
    if !sc.is_valid() {
        return;
    }
    if let Some(v) = traceparent(sc) {
        h.insert(TRACEPARENT, v);
    }
    // Most requests carry no state: no string is built for them.
    let state = sc.trace_state();
    match (*state != TraceState::NONE)
        .then(|| HeaderValue::try_from(state.header()).ok())
        .flatten()
    {
        Some(v) if !v.is_empty() => {
            h.insert(TRACESTATE, v);
        }
        _ => {
            h.remove(TRACESTATE);
        }
    }
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    let ids = || (sc.trace_id().to_string(), sc.span_id().to_string());
    match also {
        Some(Format::B3Single) => {
            let (trace, span) = ids();
            if let Ok(v) = HeaderValue::try_from(format!("{trace}-{span}-{sampled}")) {
                h.insert(B3, unique(v));
            }
        }
        Some(Format::B3Multi) => {
            let (trace, span) = ids();
            for (k, v) in [(B3_TRACE, trace), (B3_SPAN, span)] {
                if let Ok(v) = HeaderValue::try_from(v) {
                    h.insert(k, unique(v));
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

    /// Our `traceparent` and the SDK propagator's agree: on well-formed headers
    /// (the same context read, the same headers written), and ours refuses what
    /// W3C calls malformed.
    #[test]
    fn traceparent_as_the_sdk_reads_and_writes_it() {
        use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry_sdk::propagation::TraceContextPropagator;

        struct Get<'a>(&'a HeaderMap);
        impl Extractor for Get<'_> {
            fn get(&self, key: &str) -> Option<&str> {
                self.0.get(key).and_then(|v| v.to_str().ok())
            }
            fn keys(&self) -> Vec<&str> {
                self.0.keys().map(HeaderName::as_str).collect()
            }
        }
        struct Set(Vec<(String, String)>);
        impl Injector for Set {
            fn set(&mut self, key: &str, value: String) {
                self.0.push((key.to_string(), value));
            }
        }
        let sdk = TraceContextPropagator::new();
        for (tp, ts) in [
            (format!("00-{TRACE}-{SPAN}-01"), None),
            (
                format!("00-{TRACE}-{SPAN}-00"),
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ),
            (format!("00-{TRACE}-{SPAN}-ff"), None),
            (format!("01-{TRACE}-{SPAN}-09-what-comes-next"), Some("a=1")),
            (format!(" 00-{TRACE}-{SPAN}-01 "), Some("not a valid state")),
        ] {
            let mut pairs = vec![("traceparent", tp.as_str())];
            pairs.extend(ts.map(|t| ("tracestate", t)));
            let h = headers(&pairs);
            let theirs = sdk.extract(&Get(&h)).span().span_context().clone();
            let (ours, _) = extract(&h).expect(&tp);
            assert_eq!(ours, theirs, "{tp}");

            let cx = opentelemetry::Context::new().with_remote_span_context(theirs);
            let mut want = Set(Vec::new());
            sdk.inject_context(&cx, &mut want);
            let mut got = HeaderMap::new();
            inject(&mut got, &ours, None);
            for (k, v) in want.0 {
                match got.get(&k) {
                    Some(g) => assert_eq!(g.to_str().unwrap(), v, "{k}"),
                    // An empty tracestate is left out rather than sent empty.
                    None => assert!(k == "tracestate" && v.is_empty(), "{k}"),
                }
            }
        }
        for junk in [
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00_{TRACE}-{SPAN}-01"),
        ] {
            assert!(
                extract(&headers(&[("traceparent", &junk)])).is_none(),
                "{junk}"
            );
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
        // Ids new at every request stay out of HTTP/2's compression table.
        for k in ["traceparent", "x-b3-traceid", "x-b3-spanid"] {
            assert!(h[k].is_sensitive(), "{k}");
        }
        let mut h = HeaderMap::new();
        inject(&mut h, &sc, Some(Format::B3Single));
        assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-1"));
        assert!(h["b3"].is_sensitive() && h["traceparent"].is_sensitive());
    }
}
