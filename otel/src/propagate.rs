//! The trace context in HTTP headers. Read: W3C `traceparent`/`tracestate`, else
//! B3 single (`b3`), else B3 multi (`x-b3-traceid`, …). Written: `traceparent`
//! (and `tracestate`) always, and B3 again in the format it came in, so an app
//! that only speaks B3 stays in the trace.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// How the context came in, so it goes out the same way too (B3 when B3
/// headers came, with or without `traceparent`). `debug`: B3's debug flag
/// (`d`, `x-b3-flags: 1`), passed on as it came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single { debug: bool },
    B3Multi { debug: bool },
}

/// What a request says of its trace.
#[derive(Clone, Debug, PartialEq)]
pub enum Parent {
    /// The caller's context; its sampled flag is the caller's decision.
    Decided(SpanContext, Format),
    /// B3 ids without a sampling state: the caller left the decision to the
    /// receiver, so it is ours to make, within the caller's trace.
    Deferred(SpanContext, Format),
    /// The caller decided not to sample and sent no ids, or ids that cannot
    /// be read (B3 `0`, or `x-b3-sampled: 0`): nothing is recorded, nothing
    /// rewritten.
    Denied,
    /// The caller decided to sample (or debug) and sent no ids, or ids that
    /// cannot be read (B3 `1` or `d`, `x-b3-sampled: 1` or `x-b3-flags: 1`):
    /// a new trace, recorded whatever the ratio.
    Forced(Format),
}

/// A B3 sampling state: `Some(true)` accept (or debug), `Some(false)` deny,
/// `None` deferred.
type B3State = Option<bool>;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const B3_MULTI: [HeaderName; 5] = [B3_TRACE, B3_SPAN, B3_SAMPLED, B3_FLAGS, B3_PARENT];

/// Whether `name` carries a trace context (W3C or B3) that `inject` writes.
pub fn is_context_header(name: &HeaderName) -> bool {
    [
        TRACEPARENT,
        TRACESTATE,
        B3,
        B3_TRACE,
        B3_SPAN,
        B3_PARENT,
        B3_SAMPLED,
        B3_FLAGS,
    ]
    .contains(name)
}

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

/// The W3C context; none when `traceparent` is missing, malformed or sent
/// more than once (W3C: a duplicated header is invalid, not the first of two).
fn w3c_context(h: &HeaderMap) -> Option<SpanContext> {
    let mut lines = h.get_all(TRACEPARENT).iter();
    let (first, second) = (lines.next()?, lines.next());
    if second.is_some() {
        return None;
    }
    let (trace, span, flags) = parse_traceparent(first.as_bytes())?;
    let sc = SpanContext::new(trace, span, flags, true, trace_state(h));
    sc.is_valid().then_some(sc)
}

/// `tracestate` at most this long: the size W3C Trace Context asks every
/// vendor to pass on. Kept whole, a caller's state (32 entries of up to 512
/// bytes) would put 16 KiB of its choosing in every queued span.
pub const TRACESTATE_MAX: usize = 512;

/// W3C Trace Context's limit on list members.
const TRACESTATE_MEMBERS: usize = 32;

/// The caller's `tracestate`, its header lines joined as one list. Past
/// `TRACESTATE_MAX`, entries longer than 128 bytes go first, then entries from
/// the end, as W3C Trace Context says to truncate. A list that is not valid as
/// a whole (a member that does not parse, a key twice, more than 32 members)
/// is no state: W3C asks that it be discarded rather than passed on in part.
fn trace_state(h: &HeaderMap) -> TraceState {
    let mut lines = h.get_all(TRACESTATE).iter();
    let Some(first) = lines.next() else {
        return TraceState::default();
    };
    let parse = |v: &str| {
        if !members_valid(v) {
            return TraceState::default();
        }
        // Empty members are no members (the SDK would count them towards
        // its 32). A member W3C allows and the SDK cannot hold (a system id
        // of 14 characters) is left out, not the whole list.
        let pairs = v
            .split(',')
            .map(|m| m.trim_matches([' ', '\t']))
            .filter_map(|m| m.split_once('='))
            .filter(|&kv| TraceState::from_key_value([kv]).is_ok());
        TraceState::from_key_value(pairs).unwrap_or_default()
    };
    let Ok(first) = first.to_str() else {
        return TraceState::default();
    };
    if first.len() <= TRACESTATE_MAX && h.get_all(TRACESTATE).iter().nth(1).is_none() {
        return parse(first);
    }
    let mut joined = String::from(first);
    for more in lines {
        let Ok(more) = more.to_str() else {
            return TraceState::default();
        };
        joined.push(',');
        joined.push_str(more);
        // Lines past what could be kept are not read further.
        if joined.len() > 64 * TRACESTATE_MAX {
            break;
        }
    }
    if joined.len() <= TRACESTATE_MAX {
        return parse(&joined);
    }
    // Valid as a whole (or nothing the SDK can hold, which cutting cannot
    // change) before it is cut: cutting must not launder a list
    // whose invalid members happen to be the ones that go.
    if parse(&joined) == TraceState::default() {
        return TraceState::default();
    }
    let entries = joined
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && e.len() <= 128);
    let mut kept = String::new();
    for e in entries {
        if kept.len() + usize::from(!kept.is_empty()) + e.len() > TRACESTATE_MAX {
            break;
        }
        if !kept.is_empty() {
            kept.push(',');
        }
        kept.push_str(e);
    }
    parse(&kept)
}

/// At most `TRACESTATE_MEMBERS` members, each `key=value` as W3C writes them,
/// with a key of its own. Checked here rather than by the SDK, whose parser
/// takes an empty value or `a==b`, refuses a valid system id of 14
/// characters, and keeps the first 32 members of a longer list without a word.
fn members_valid(list: &str) -> bool {
    let mut keys: Vec<&str> = Vec::new();
    for member in list.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue;
        }
        let Some((key, value)) = member.split_once('=') else {
            return false;
        };
        if !state_key(key) || !state_value(value) {
            return false;
        }
        if keys.len() == TRACESTATE_MEMBERS || keys.contains(&key) {
            return false;
        }
        keys.push(key);
    }
    true
}

/// A `tracestate` key: `simple-key`, or `tenant-id@system-id`. A simple key
/// may start with a digit, as Trace Context Level 2 (and the SDK) has it.
fn state_key(key: &str) -> bool {
    let rest = |b: &[u8]| {
        b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(c))
    };
    match key.split_once('@') {
        None => {
            let b = key.as_bytes();
            (1..=256).contains(&b.len())
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && rest(b)
        }
        Some((tenant, system)) => {
            let (t, s) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && rest(t)
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && rest(s)
        }
    }
}

/// A `tracestate` value: 1 to 256 printable characters but `,` and `=`, not
/// ending in a space.
fn state_value(v: &str) -> bool {
    let b = v.as_bytes();
    (1..=256).contains(&b.len())
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b[b.len() - 1] != b' '
}

/// B3's debug flag among the headers, for B3 written back beside `traceparent`:
/// `b3: {trace}-{span}-d`, or `b3: d` alone.
fn b3_debug(h: &HeaderMap) -> bool {
    match h.get(B3) {
        Some(v) => {
            let v = v.as_bytes().trim_ascii();
            v == b"d" || v.split(|b| *b == b'-').nth(2) == Some(b"d")
        }
        None => h.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1"),
    }
}

/// The caller's trace, if the request names one.
pub fn extract(h: &HeaderMap) -> Option<Parent> {
    if h.contains_key(TRACEPARENT) {
        // B3 beside it (from a proxy that answered a B3 caller in kind) is
        // written again too, or it would point at a stale span.
        // A `b3` that cannot be read is no format to answer in.
        let b3 = h.get(B3).and_then(|v| v.to_str().ok()).and_then(b3_single);
        let format = if b3.is_some() {
            Format::B3Single { debug: b3_debug(h) }
        } else if B3_MULTI.iter().any(|k| h.contains_key(k)) {
            // The sampling state alone counts: left as it came, an
            // `x-b3-sampled: 0` would contradict the `traceparent` written.
            let debug = h.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
            Format::B3Multi { debug }
        } else {
            Format::W3c
        };
        if let Some(sc) = w3c_context(h) {
            return Some(Parent::Decided(sc, format));
        }
        // A `traceparent` that cannot be read says nothing: B3 beside it may
        // still name the caller's trace (as OpenTelemetry's composite
        // propagator reads it), else a new trace starts.
    }
    // A `b3` that cannot be read says nothing: the multi headers beside it
    // may still name the caller's trace. Nor does one of the sampling state
    // alone name a trace: with the multi headers' ids beside it, it is
    // their trace's state (where they carry none of their own).
    let single = h.get(B3).and_then(|v| v.to_str().ok()).and_then(b3_single);
    let single_state = match single {
        Some(Parent::Decided(..) | Parent::Deferred(..)) => return single,
        Some(Parent::Denied) => Some((false, None)),
        Some(Parent::Forced(f)) => Some((true, Some(f))),
        None => None,
    };
    let sampled = h.get(B3_SAMPLED).map(HeaderValue::as_bytes);
    let debug = h.get(B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    let state = match (sampled, debug) {
        (_, true) | (Some(b"1" | b"true"), _) => Some(true),
        (Some(b"0" | b"false"), _) => Some(false),
        _ => single_state.map(|(s, _)| s),
    };
    // `b3: 1` or `d` is answered in kind (which writes the multi headers too).
    let format = single_state
        .and_then(|(_, f)| f)
        .unwrap_or(Format::B3Multi { debug });
    let id = |k| h.get(k).and_then(|v: &HeaderValue| v.to_str().ok());
    id(B3_TRACE)
        .zip(id(B3_SPAN))
        .and_then(|(trace, span)| b3_context(trace, span, state, format))
        .or(single)
        .or_else(|| undecided(state, format))
}

/// `b3: {trace}-{span}[-{state}[-{parent}]]`, or the state alone.
fn b3_single(v: &str) -> Option<Parent> {
    match v.trim() {
        "0" => return Some(Parent::Denied),
        "1" => return Some(Parent::Forced(Format::B3Single { debug: false })),
        "d" => return Some(Parent::Forced(Format::B3Single { debug: true })),
        _ => {}
    }
    let mut parts = v.trim().split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    let (state, debug) = match parts.next() {
        None => (None, false),
        Some("1") => (Some(true), false),
        Some("d") => (Some(true), true),
        Some("0") => (Some(false), false),
        Some(_) => return None,
    };
    let format = Format::B3Single { debug };
    b3_context(trace, span, state, format).or_else(|| undecided(state, format))
}

/// A caller's sampling decision without a trace to join (no ids, or ids
/// that cannot be read) still holds: "not sampled" is not a new trace.
fn undecided(state: B3State, format: Format) -> Option<Parent> {
    match state {
        Some(false) => Some(Parent::Denied),
        Some(true) => Some(Parent::Forced(format)),
        None => None,
    }
}

/// B3 ids are hex: a 64-bit trace id is the low half of a 128-bit one.
fn b3_context(trace: &str, span: &str, state: B3State, format: Format) -> Option<Parent> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace, 32) || hex(trace, 16)) || !hex(span, 16) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = if state == Some(true) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    if !sc.is_valid() {
        return None;
    }
    Some(match state {
        Some(_) => Parent::Decided(sc, format),
        None => Parent::Deferred(sc, format),
    })
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
    let ids = || (sc.trace_id().to_string(), sc.span_id().to_string());
    match also {
        Some(Format::B3Single { debug }) => {
            let (trace, span) = ids();
            let state = match (sc.is_sampled(), debug) {
                (true, true) => "d",
                (true, false) => "1",
                (false, _) => "0",
            };
            if let Ok(v) = HeaderValue::try_from(format!("{trace}-{span}-{state}")) {
                h.insert(B3, unique(v));
            }
            // A caller that sent both forms (B3 propagators can) has the
            // multi headers written too: left as they came, they would name
            // its own span as the next hop's parent.
            if B3_MULTI.iter().any(|k| h.contains_key(k)) {
                b3_multi(h, sc, debug);
            }
        }
        Some(Format::B3Multi { debug }) => {
            // A `b3` beside them could not be read: it names no trace the
            // next hop should join.
            h.remove(B3);
            b3_multi(h, sc, debug);
        }
        // No B3 that could be read: a `b3` there is junk, and would
        // contradict the `traceparent` written.
        Some(Format::W3c) => {
            h.remove(B3);
        }
        // A new trace: B3 that could not be read would contradict the
        // `traceparent` written.
        None => {
            h.remove(B3);
            for k in B3_MULTI {
                h.remove(k);
            }
        }
    }
}

/// Writes `sc` as B3's multiple headers.
fn b3_multi(h: &mut HeaderMap, sc: &SpanContext, debug: bool) {
    let (trace, span) = (sc.trace_id().to_string(), sc.span_id().to_string());
    for (k, v) in [(B3_TRACE, trace), (B3_SPAN, span)] {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.insert(k, unique(v));
        }
    }
    // Debug implies accept, and is sent instead of `x-b3-sampled`.
    if debug && sc.is_sampled() {
        h.insert(B3_FLAGS, HeaderValue::from_static("1"));
        h.remove(B3_SAMPLED);
    } else {
        let sampled = if sc.is_sampled() { "1" } else { "0" };
        h.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
        h.remove(B3_FLAGS);
    }
    // Our span is the next hop's parent; the caller's parent id is stale.
    h.remove(B3_PARENT);
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

    fn decided(p: Option<Parent>) -> (SpanContext, Format) {
        match p {
            Some(Parent::Decided(sc, f)) => (sc, f),
            other => panic!("not a decided context: {other:?}"),
        }
    }

    #[test]
    fn reads_w3c_b3_single_and_b3_multi() {
        let w3c = headers(&[("traceparent", &format!("00-{TRACE}-{SPAN}-01"))]);
        let (sc, f) = decided(extract(&w3c));
        assert_eq!((sc.trace_id().to_string(), f), (TRACE.into(), Format::W3c));
        assert!(sc.is_sampled() && sc.is_remote());

        let single = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let (sc, f) = decided(extract(&single));
        assert_eq!(
            (sc.span_id().to_string(), f),
            (SPAN.into(), Format::B3Single { debug: false })
        );
        assert!(sc.is_sampled());

        let multi = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]);
        let (sc, f) = decided(extract(&multi));
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(f, Format::B3Multi { debug: false });
        assert!(!sc.is_sampled());
    }

    #[test]
    fn junk_is_no_context() {
        for h in [
            headers(&[("traceparent", "00-xyz-abc-01")]),
            headers(&[("traceparent", &format!("00-{}-{SPAN}-01", "0".repeat(32)))]),
            headers(&[("b3", "nothex-00f067aa0ba902b7")]),
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
            let (ours, _) = decided(extract(&h));
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

    /// A proxy's span, sampled, as it is written for the next hop.
    fn ours() -> SpanContext {
        SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex("1111111111111111").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn writes_traceparent_and_b3_as_it_came() {
        let sc = ours();
        let mut h = headers(&[("x-b3-parentspanid", SPAN)]);
        inject(&mut h, &sc, Some(Format::B3Multi { debug: false }));
        assert_eq!(h["traceparent"], format!("00-{TRACE}-1111111111111111-01"));
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));
        // Ids new at every request stay out of HTTP/2's compression table.
        for k in ["traceparent", "x-b3-traceid", "x-b3-spanid"] {
            assert!(h[k].is_sensitive(), "{k}");
        }
        let mut h = HeaderMap::new();
        inject(&mut h, &sc, Some(Format::B3Single { debug: false }));
        assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-1"));
        assert!(h["b3"].is_sensitive() && h["traceparent"].is_sensitive());
    }

    #[test]
    fn b3_deny_deferred_and_debug_are_kept_apart() {
        // A decision not to sample, without ids: nothing to continue, nothing
        // to start.
        for h in [headers(&[("b3", "0")]), headers(&[("x-b3-sampled", "0")])] {
            assert_eq!(extract(&h), Some(Parent::Denied), "{h:?}");
        }
        // A decision to sample without ids: a new trace, recorded.
        for (h, want) in [
            (headers(&[("b3", "1")]), Format::B3Single { debug: false }),
            (headers(&[("b3", "d")]), Format::B3Single { debug: true }),
            (
                headers(&[("x-b3-sampled", "1")]),
                Format::B3Multi { debug: false },
            ),
            (
                headers(&[("x-b3-flags", "1")]),
                Format::B3Multi { debug: true },
            ),
        ] {
            assert_eq!(extract(&h), Some(Parent::Forced(want)), "{h:?}");
        }
        // Ids without a sampling state: the receiver decides.
        for h in [
            headers(&[("b3", &format!("{TRACE}-{SPAN}"))]),
            headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]),
        ] {
            match extract(&h) {
                Some(Parent::Deferred(sc, _)) => {
                    assert_eq!(sc.trace_id().to_string(), TRACE);
                    assert!(!sc.is_sampled());
                }
                other => panic!("{h:?}: {other:?}"),
            }
        }
        // Debug is sampled, and written back as debug.
        let sc = ours();
        let (got, f) = decided(extract(&headers(&[("b3", &format!("{TRACE}-{SPAN}-d"))])));
        assert!(got.is_sampled());
        assert_eq!(f, Format::B3Single { debug: true });
        let mut h = HeaderMap::new();
        inject(&mut h, &sc, Some(f));
        assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-d"));

        let mut h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        let (got, f) = decided(extract(&h));
        assert!(got.is_sampled());
        assert_eq!(f, Format::B3Multi { debug: true });
        inject(&mut h, &sc, Some(f));
        assert_eq!(h["x-b3-flags"], "1");
        assert!(!h.contains_key("x-b3-sampled"));
        // Beside a traceparent (a proxy answered a B3 caller in kind), too.
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", &format!("{TRACE}-{SPAN}-d")),
        ]);
        assert_eq!(decided(extract(&h)).1, Format::B3Single { debug: true });
    }

    /// A caller that sends both of B3's forms has both written for the next
    /// hop, and its decision not to sample holds however broken its ids.
    #[test]
    fn b3_in_both_forms_and_broken_ids() {
        let sampled = format!("{TRACE}-{SPAN}-1");
        let mut h = headers(&[
            ("b3", &sampled),
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-parentspanid", "2222222222222222"),
            ("x-b3-sampled", "1"),
        ]);
        let (_, f) = decided(extract(&h));
        inject(&mut h, &ours(), Some(f));
        assert_eq!(h["b3"], format!("{TRACE}-1111111111111111-1"));
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
        // The sampling state alone beside `b3` is written again too.
        let mut alone = headers(&[("b3", &sampled), ("x-b3-sampled", "0")]);
        let (_, f) = decided(extract(&alone));
        inject(&mut alone, &ours(), Some(f));
        assert_eq!(alone["x-b3-sampled"], "1");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-parentspanid"));

        for h in [
            headers(&[("x-b3-traceid", TRACE), ("x-b3-sampled", "0")]),
            headers(&[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", "00f067aa0ba902b"),
                ("x-b3-sampled", "0"),
            ]),
            headers(&[("b3", &format!("{TRACE}-xyz-0"))]),
        ] {
            assert_eq!(extract(&h), Some(Parent::Denied), "{h:?}");
        }
        let forced = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", "00f067aa0ba902b"),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(
            extract(&forced),
            Some(Parent::Forced(Format::B3Multi { debug: true }))
        );
    }

    #[test]
    fn tracestate_lines_are_joined_and_cut_to_512_bytes() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let mut h = headers(&[("traceparent", &tp), ("tracestate", "a=1,b=2")]);
        h.append("tracestate", HeaderValue::from_static("c=3"));
        let (sc, _) = decided(extract(&h));
        assert_eq!(sc.trace_state().header(), "a=1,b=2,c=3");
        // Nothing to cut: an entry over 128 bytes on a line of its own stays.
        let vendor = format!("vendor={}", "v".repeat(150));
        let mut h = headers(&[("traceparent", &tp), ("tracestate", "a=1")]);
        h.append("tracestate", HeaderValue::from_str(&vendor).unwrap());
        let (sc, _) = decided(extract(&h));
        assert_eq!(sc.trace_state().header(), format!("a=1,{vendor}"));

        // 31 entries of 100 bytes: the first ones that fit in 512 are kept,
        // and an entry over 128 bytes goes first.
        let long = format!("big={}", "x".repeat(200));
        let entries: Vec<String> = (0..31)
            .map(|i| format!("k{i:02}={}", "v".repeat(96)))
            .collect();
        let state = format!("{long},{}", entries.join(","));
        let h = headers(&[("traceparent", &tp), ("tracestate", &state)]);
        let (sc, _) = decided(extract(&h));
        let kept = sc.trace_state().header();
        assert!(kept.len() <= TRACESTATE_MAX, "{}", kept.len());
        assert!(kept.starts_with("k00=") && !kept.contains("big="), "{kept}");
        assert_eq!(kept.split(',').count(), 5);

        let mut out = HeaderMap::new();
        inject(&mut out, &sc, None);
        assert_eq!(out["tracestate"], kept.as_str());
    }

    /// W3C's test suite: a duplicated key, more than 32 members, or a member
    /// that does not parse makes the whole list invalid, however long.
    #[test]
    fn an_invalid_tracestate_is_dropped_whole() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let state_of = |ts: &str| {
            let h = headers(&[("traceparent", &tp), ("tracestate", ts)]);
            decided(extract(&h)).0.trace_state().header()
        };
        assert_eq!(state_of("foo=1,bar=2"), "foo=1,bar=2");
        assert_eq!(state_of("foo=1,bar=2,foo=3"), "");
        // W3C's grammar, as its test suite has it.
        for bad in [
            "foo=,bar=3",
            "foo@=1,bar=2",
            "a==b",
            "Foo=1",
            "-a=1",
            "foo =1",
            "@v=1",
        ] {
            assert_eq!(state_of(bad), "", "{bad}");
        }
        let tenant = |n: usize, m: usize| format!("{}@{}=1", "t".repeat(n), "v".repeat(m));
        assert_eq!(state_of(&tenant(242, 1)), "");
        assert_eq!(state_of(&tenant(1, 15)), "");
        assert_eq!(state_of(&tenant(241, 13)), tenant(241, 13));
        assert_eq!(state_of("1vendor=x,foo=1"), "1vendor=x,foo=1");
        // A valid member the SDK cannot hold is left out, not the list.
        assert_eq!(state_of(&format!("foo=1,{}", tenant(241, 14))), "foo=1");
        let members = |n: usize| (0..n).map(|i| format!("k{i}=v")).collect::<Vec<_>>();
        assert_eq!(state_of(&members(32).join(",")).split(',').count(), 32);
        assert_eq!(state_of(&members(33).join(",")), "");
        // Empty members (W3C allows them) are not members: 32 and an empty
        // one are all kept.
        let mut with_empty = members(32);
        with_empty.insert(1, " ".into());
        with_empty.insert(5, String::new());
        let kept = state_of(&with_empty.join(","));
        assert_eq!(kept.split(',').count(), 32, "{kept}");
        assert!(kept.ends_with("k31=v"), "{kept}");
        // Long enough to be cut: the bad member would have been cut away.
        let mut long: Vec<String> = (0..8).map(|i| format!("k{i}={}", "v".repeat(96))).collect();
        long.push("not a member".into());
        assert_eq!(state_of(&long.join(",")), "");
        long.pop();
        long.push("k0=again".into());
        assert_eq!(state_of(&long.join(",")), "");
        long.pop();
        assert!(state_of(&long.join(",")).starts_with("k0="));
    }

    /// A `traceparent` that cannot be used, malformed or sent twice, is no
    /// context of its own; B3 beside it still names the caller's trace.
    #[test]
    fn a_traceparent_that_cannot_be_read_leaves_the_trace_to_b3() {
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let other = format!("00-{}-{SPAN}-01", "1".repeat(32));
        let mut twice = headers(&[("traceparent", &tp)]);
        twice.append("traceparent", HeaderValue::from_str(&other).unwrap());
        assert!(extract(&twice).is_none());

        let b3 = format!("{}-{SPAN}-1", "2".repeat(32));
        for bad in ["", "00-xyz-abc-01"] {
            let h = headers(&[("traceparent", bad), ("b3", &b3)]);
            let (sc, f) = decided(extract(&h));
            assert_eq!(sc.trace_id().to_string(), "2".repeat(32), "{bad:?}");
            assert_eq!(f, Format::B3Single { debug: false });
        }
        twice.insert("x-b3-traceid", HeaderValue::from_static(TRACE));
        twice.insert("x-b3-spanid", HeaderValue::from_static(SPAN));
        twice.insert("x-b3-sampled", HeaderValue::from_static("1"));
        let (sc, f) = decided(extract(&twice));
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert_eq!(f, Format::B3Multi { debug: false });
    }

    /// A `b3` that cannot be read leaves the trace to the multi headers, and
    /// is not passed on beside the context written.
    #[test]
    fn an_unreadable_b3_leaves_the_trace_to_the_multi_headers() {
        for junk in ["garbage", &format!("{TRACE}-{SPAN}-true")] {
            let mut h = headers(&[
                ("b3", junk),
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "1"),
            ]);
            let (sc, f) = decided(extract(&h));
            assert_eq!(sc.trace_id().to_string(), TRACE, "{junk}");
            assert_eq!(f, Format::B3Multi { debug: false });
            inject(&mut h, &ours(), Some(f));
            assert!(!h.contains_key("b3"), "{junk}");
            assert_eq!(h["x-b3-spanid"], "1111111111111111");
        }
        // Nothing readable: a new trace, and the junk is not passed on.
        let mut h = headers(&[("b3", "garbage"), ("x-b3-sampled", "maybe")]);
        assert_eq!(extract(&h), None);
        inject(&mut h, &ours(), None);
        assert!(!h.contains_key("b3") && !h.contains_key("x-b3-sampled"));
        assert!(h.contains_key("traceparent"));
    }

    /// Beside a `traceparent`, a `b3` that cannot be read does not hide the
    /// multi headers' debug flag.
    #[test]
    fn an_unreadable_b3_beside_traceparent_leaves_the_format_to_the_multi_headers() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", "garbage"),
            ("x-b3-flags", "1"),
        ]);
        let (_, f) = decided(extract(&h));
        assert_eq!(f, Format::B3Multi { debug: true });
        inject(&mut h, &ours(), Some(f));
        assert_eq!(h["x-b3-flags"], "1");
        assert!(!h.contains_key("b3"));
        // Alone beside it, the junk is not passed on either.
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", "garbage"),
        ]);
        let (_, f) = decided(extract(&h));
        assert_eq!(f, Format::W3c);
        inject(&mut h, &ours(), Some(f));
        assert!(!h.contains_key("b3"));
    }

    /// B3's sampling state beside a `traceparent` is written again, not left
    /// to contradict it.
    #[test]
    fn b3_state_alone_beside_traceparent_is_written_again() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("x-b3-sampled", "0"),
        ]);
        let (sc, f) = decided(extract(&h));
        assert!(sc.is_sampled());
        assert_eq!(f, Format::B3Multi { debug: false });
        inject(&mut h, &ours(), Some(f));
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(h["x-b3-spanid"], "1111111111111111");
    }

    /// `b3: d` alone beside a `traceparent` asks for debug too.
    #[test]
    fn b3_debug_without_ids_beside_traceparent_is_kept() {
        let h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("b3", "d"),
        ]);
        let (sc, f) = decided(extract(&h));
        assert_eq!(f, Format::B3Single { debug: true });
        let mut out = HeaderMap::new();
        inject(&mut out, &ours(), Some(f));
        assert!(sc.is_sampled());
        assert_eq!(out["b3"], format!("{TRACE}-1111111111111111-d"));
    }

    /// A `b3` of the sampling state alone beside the multi headers' ids
    /// decides the state of their trace, not a new trace (`1`, `d`) or none
    /// at all (`0`): the caller's trace is continued.
    #[test]
    fn b3_state_alone_beside_multi_ids_continues_their_trace() {
        let ids = |b3: &'static str, sampled: Option<&'static str>| {
            let mut h = headers(&[("b3", b3), ("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
            if let Some(s) = sampled {
                h.insert("x-b3-sampled", HeaderValue::from_static(s));
            }
            h
        };
        let (sc, f) = decided(extract(&ids("1", None)));
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert_eq!(sc.span_id().to_string(), SPAN);
        assert!(sc.is_sampled());
        assert_eq!(f, Format::B3Single { debug: false });
        let mut h = ids("1", None);
        inject(&mut h, &ours(), Some(f));
        assert_eq!(h["x-b3-traceid"], TRACE);
        let (sc, f) = decided(extract(&ids("d", None)));
        assert!(sc.is_sampled() && f == Format::B3Single { debug: true });
        // `0` is their trace, not sampled.
        let (sc, _) = decided(extract(&ids("0", None)));
        assert_eq!(sc.trace_id().to_string(), TRACE);
        assert!(!sc.is_sampled());
        // The multi headers' own state comes first.
        let (sc, _) = decided(extract(&ids("0", Some("1"))));
        assert!(sc.is_sampled());
        // Without readable ids beside it, the state alone holds as before.
        let h = headers(&[("b3", "0"), ("x-b3-traceid", "junk"), ("x-b3-spanid", SPAN)]);
        assert_eq!(extract(&h), Some(Parent::Denied));
    }
}
