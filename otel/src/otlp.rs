//! Spans as OTLP protobuf, written in place and sent to the collector.
//!
//! A batch is encoded from messages that are kept and overwritten batch after
//! batch: a span's ids, name and attribute strings reuse the memory the last
//! span in that place held, so a span costs its encoding and next to no
//! allocation. Going through the SDK's `SpanData` and the generic exporter
//! (which converts it to these same messages, clones the batch for a retry and
//! frees it all) took about half of the export thread's time.

use std::time::SystemTime;

use bytes::{BufMut as _, Bytes, BytesMut};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, SpanFlags, Status, span, status,
};
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_sdk::trace::SpanData;
use prost::Message as _;

/// A span as a busy thread records it: whatever it knew, cheaply kept, and
/// written as protobuf only on the export thread, so a request pays for a move
/// into the queue and no more.
pub trait Record: Send + 'static {
    fn write(self, span: &mut SpanWriter<'_>);
}

impl Record for SpanData {
    fn write(self, span: &mut SpanWriter<'_>) {
        span.replace(self.into());
    }
}

/// Overwrites a kept span message field by field, reusing what it holds.
/// Whatever is not written again (attributes and events past those written,
/// the status) is cleared when the writer is dropped.
pub struct SpanWriter<'a> {
    span: &'a mut Span,
    attributes: usize,
    events: usize,
    status: bool,
}

impl<'a> SpanWriter<'a> {
    fn new(span: &'a mut Span) -> Self {
        // What a record might not write is cleared; strings keep their memory.
        span.trace_id.clear();
        span.span_id.clear();
        span.parent_span_id.clear();
        span.trace_state.clear();
        span.flags = 0;
        span.name.clear();
        span.kind = 0;
        span.start_time_unix_nano = 0;
        span.end_time_unix_nano = 0;
        span.dropped_attributes_count = 0;
        span.dropped_events_count = 0;
        span.dropped_links_count = 0;
        span.links.clear();
        SpanWriter {
            span,
            attributes: 0,
            events: 0,
            status: false,
        }
    }

    /// The span's own context and its parent's: a parent recorded in another
    /// process (the caller's proxy or app) is remote.
    pub fn context(&mut self, cx: &SpanContext, parent: Option<SpanId>) {
        // Ids and trace state were cleared when the writer was made.
        let s = &mut *self.span;
        s.trace_id.extend_from_slice(&cx.trace_id().to_bytes());
        s.span_id.extend_from_slice(&cx.span_id().to_bytes());
        if let Some(p) = parent {
            s.parent_span_id.extend_from_slice(&p.to_bytes());
        }
        s.trace_state.push_str(&cx.trace_state().header());
        let remote = if parent.is_some() {
            SpanFlags::ContextIsRemoteMask as u32
        } else {
            0
        };
        s.flags =
            u32::from(cx.trace_flags().to_u8()) | SpanFlags::ContextHasIsRemoteMask as u32 | remote;
    }

    pub fn name(&mut self, parts: &[&str]) {
        self.span.name.clear();
        for p in parts {
            self.span.name.push_str(p);
        }
    }

    pub fn kind(&mut self, kind: SpanKind) {
        self.span.kind = span::SpanKind::from(kind) as i32;
    }

    pub fn times(&mut self, start: SystemTime, end: SystemTime) {
        self.span.start_time_unix_nano = nanos(start);
        self.span.end_time_unix_nano = nanos(end);
    }

    pub fn str(&mut self, key: &str, value: &str) {
        match slot(&mut self.span.attributes, &mut self.attributes, key) {
            Some(any_value::Value::StringValue(s)) => {
                s.clear();
                s.push_str(value);
            }
            other => *other = Some(any_value::Value::StringValue(value.to_owned())),
        }
    }

    /// A string attribute made of `parts`, written over the string kept there.
    pub fn str_parts(&mut self, key: &str, parts: &[&str]) {
        let v = slot(&mut self.span.attributes, &mut self.attributes, key);
        if !matches!(v, Some(any_value::Value::StringValue(_))) {
            *v = Some(any_value::Value::StringValue(String::new()));
        }
        if let Some(any_value::Value::StringValue(s)) = v {
            s.clear();
            for p in parts {
                s.push_str(p);
            }
        }
    }

    pub fn int(&mut self, key: &str, value: i64) {
        *slot(&mut self.span.attributes, &mut self.attributes, key) =
            Some(any_value::Value::IntValue(value));
    }

    pub fn bool(&mut self, key: &str, value: bool) {
        *slot(&mut self.span.attributes, &mut self.attributes, key) =
            Some(any_value::Value::BoolValue(value));
    }

    /// An event with one integer attribute.
    pub fn event(&mut self, name: &str, at: SystemTime, key: &str, value: i64) {
        if self.events == self.span.events.len() {
            self.span.events.push(span::Event::default());
        }
        let e = &mut self.span.events[self.events];
        self.events += 1;
        e.time_unix_nano = nanos(at);
        e.name.clear();
        e.name.push_str(name);
        e.dropped_attributes_count = 0;
        let mut n = 0;
        *slot(&mut e.attributes, &mut n, key) = Some(any_value::Value::IntValue(value));
        e.attributes.truncate(n);
    }

    /// One more attribute on the event last written.
    pub fn event_str(&mut self, key: &str, value: &str) {
        self.event_attr(key, any_value::Value::StringValue(value.to_string()));
    }

    pub fn event_int(&mut self, key: &str, value: i64) {
        self.event_attr(key, any_value::Value::IntValue(value));
    }

    fn event_attr(&mut self, key: &str, value: any_value::Value) {
        let Some(e) = self
            .events
            .checked_sub(1)
            .and_then(|i| self.span.events.get_mut(i))
        else {
            return;
        };
        e.attributes.push(KeyValue {
            key: key.to_string(),
            value: Some(AnyValue { value: Some(value) }),
            ..KeyValue::default()
        });
    }

    pub fn dropped_events(&mut self, n: u32) {
        self.span.dropped_events_count = n;
    }

    /// The span failed, with this description.
    pub fn error(&mut self, description: &str) {
        let s = self.span.status.get_or_insert_with(Status::default);
        s.code = status::StatusCode::Error as i32;
        s.message.clear();
        s.message.push_str(description);
        self.status = true;
    }

    /// A span the SDK built, as it is.
    fn replace(&mut self, span: Span) {
        *self.span = span;
        self.attributes = self.span.attributes.len();
        self.events = self.span.events.len();
        self.status = self.span.status.is_some();
    }
}

impl Drop for SpanWriter<'_> {
    fn drop(&mut self) {
        self.span.attributes.truncate(self.attributes);
        self.span.events.truncate(self.events);
        if !self.status {
            // Unset, as the SDK writes it.
            let s = self.span.status.get_or_insert_with(Status::default);
            s.code = status::StatusCode::Unset as i32;
            s.message.clear();
        }
    }
}

/// The next attribute's value, its key written; the place keeps the value the
/// span before had there, for a string to reuse.
fn slot<'a>(
    attributes: &'a mut Vec<KeyValue>,
    used: &mut usize,
    key: &str,
) -> &'a mut Option<any_value::Value> {
    if *used == attributes.len() {
        attributes.push(KeyValue::default());
    }
    let kv = &mut attributes[*used];
    *used += 1;
    if kv.key != key {
        kv.key.clear();
        kv.key.push_str(key);
    }
    &mut kv.value.get_or_insert_with(AnyValue::default).value
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// An encoded export request and how many spans it carries.
#[derive(Debug)]
pub(crate) struct Batch {
    pub spans: usize,
    pub body: Bytes,
}

/// Turns records into encoded export requests, keeping the messages (and
/// their strings) from one batch to the next. Holds at most one batch's
/// spans, each as large as the largest that was written in its place.
pub(crate) struct Encoder {
    request: ExportTraceServiceRequest,
    /// Span messages between batches.
    spare: Vec<Span>,
    buf: BytesMut,
}

impl Encoder {
    /// Every batch under one resource (the workload) and one scope (what
    /// recorded the spans: `strait` for a proxy's).
    pub fn new(resource: &opentelemetry_sdk::Resource, scope: &'static str) -> Self {
        let attrs = ResourceAttributesWithSchema::from(resource);
        let scope = opentelemetry::InstrumentationScope::builder(scope).build();
        Encoder {
            request: ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(Resource {
                        attributes: attrs.attributes.0,
                        ..Default::default()
                    }),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope::from((&scope, None))),
                        spans: Vec::new(),
                        schema_url: String::new(),
                    }],
                    schema_url: attrs.schema_url.unwrap_or_default(),
                }],
            },
            spare: Vec::new(),
            buf: BytesMut::new(),
        }
    }

    /// The records as one export request; `None` when there are none.
    pub fn encode<R: Record>(&mut self, records: impl IntoIterator<Item = R>) -> Option<Batch> {
        let spans = &mut self.request.resource_spans[0].scope_spans[0].spans;
        for r in records {
            let mut s = self.spare.pop().unwrap_or_default();
            r.write(&mut SpanWriter::new(&mut s));
            spans.push(s);
        }
        let n = spans.len();
        if n == 0 {
            return None;
        }
        // Cannot fail: a `BytesMut` grows as written (and keeps the room of
        // the batches before, once sent). `encode` sizes the request itself:
        // sizing it here too was a second pass over every span.
        let encoded = self.request.encode(&mut self.buf);
        debug_assert!(encoded.is_ok());
        let spans = &mut self.request.resource_spans[0].scope_spans[0].spans;
        self.spare.append(spans);
        Some(Batch {
            spans: n,
            body: self.buf.split().freeze(),
        })
    }
}

/// The collector's `TraceService`, sent requests already encoded.
#[derive(Clone, Debug)]
pub(crate) struct Collector(tonic::client::Grpc<tonic::transport::Channel>);

impl Collector {
    /// Connects when first used, and again after a failure.
    pub fn new(endpoint: &str, timeout: std::time::Duration) -> Result<Self, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Ok(Collector(tonic::client::Grpc::new(channel)))
    }

    pub async fn export(&self, body: Bytes) -> Result<ExportTraceServiceResponse, tonic::Status> {
        let mut grpc = self.0.clone();
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        );
        let mut req = tonic::Request::new(body);
        // A trace not sampled, its own for each export. A proxy the export
        // passes (a meshed collector's sidecar) follows its callers'
        // decisions, and would otherwise start a trace of each export, and
        // export that, and so on for ever.
        let untraced = format!(
            "00-{}-{}-00",
            crate::export::new_trace_id(),
            crate::export::new_span_id()
        );
        if let Ok(v) = untraced.parse() {
            req.metadata_mut().insert("traceparent", v);
        }
        grpc.unary(req, path, Encoded)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Requests as they were encoded; answers decoded by prost.
#[derive(Clone, Copy, Debug, Default)]
struct Encoded;

impl tonic::codec::Codec for Encoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = Encoded;
    type Decoder = tonic_prost::ProstDecoder<ExportTraceServiceResponse>;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

impl tonic::codec::Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceFlags, TraceId, TraceState};

    fn decode(b: &Batch) -> Vec<Span> {
        let r = ExportTraceServiceRequest::decode(b.body.clone()).expect("decodes");
        assert_eq!(r.resource_spans.len(), 1);
        let rs = &r.resource_spans[0];
        let service = rs
            .resource
            .as_ref()
            .expect("resource")
            .attributes
            .iter()
            .any(|kv| {
                kv.key == "service.name"
                    && kv.value.as_ref().and_then(|v| v.value.clone())
                        == Some(any_value::Value::StringValue("svc".into()))
            });
        assert!(service, "{rs:?}");
        assert_eq!(
            rs.scope_spans[0].scope.as_ref().expect("scope").name,
            "strait"
        );
        rs.scope_spans[0].spans.clone()
    }

    struct Test {
        name: &'static str,
        attrs: Vec<(&'static str, &'static str)>,
        failed: Option<&'static str>,
        retries: i64,
        /// Called from another process, as a server span: else a client span
        /// starting a trace.
        remote_parent: bool,
    }

    impl Record for Test {
        fn write(self, w: &mut SpanWriter<'_>) {
            let cx = SpanContext::new(
                TraceId::from(7),
                SpanId::from(9),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
            if self.remote_parent {
                w.context(&cx, Some(SpanId::from(3)));
                w.kind(SpanKind::Server);
            } else {
                w.context(&cx, None);
                w.kind(SpanKind::Client);
            }
            w.name(&["pkg.", self.name]);
            w.times(SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH);
            for (k, v) in self.attrs {
                w.str(k, v);
            }
            w.int("n", self.retries);
            for i in 0..self.retries {
                w.event("retry", SystemTime::UNIX_EPOCH, "attempt", i + 1);
                w.event_str("failed_endpoint", "10.0.0.7:8080");
            }
            if let Some(e) = self.failed {
                w.error(e);
            }
        }
    }

    fn attr(s: &Span, key: &str) -> Option<any_value::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    /// A kept message written over carries nothing of the span before it:
    /// fewer attributes, other values, no events, no error.
    #[test]
    fn spans_written_over_kept_messages_carry_only_their_own_fields() {
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("svc")
            .build();
        let mut enc = Encoder::new(&resource, "strait");
        let first = enc
            .encode([
                Test {
                    name: "A/long",
                    attrs: vec![("a", "a value that is long"), ("b", "b"), ("c", "c")],
                    failed: Some("refused"),
                    retries: 2,
                    remote_parent: true,
                },
                Test {
                    name: "B",
                    attrs: vec![("a", "x")],
                    failed: None,
                    retries: 0,
                    remote_parent: true,
                },
            ])
            .expect("batch");
        assert_eq!(first.spans, 2);
        let spans = decode(&first);
        assert_eq!(spans[0].name, "pkg.A/long");
        assert_eq!(spans[0].attributes.len(), 4);
        assert_eq!(spans[0].events.len(), 2);
        let st = spans[0].status.as_ref().expect("status");
        assert_eq!((st.code, st.message.as_str()), (2, "refused"));
        assert_eq!(spans[0].trace_id, TraceId::from(7).to_bytes());
        assert_eq!(spans[0].parent_span_id, SpanId::from(3).to_bytes());
        assert_eq!(spans[0].flags, 0x301, "sampled, remote parent");
        assert_eq!(spans[0].kind, span::SpanKind::Server as i32);

        // The next batch reuses both messages, in the other order.
        let second = enc
            .encode([
                Test {
                    name: "C",
                    attrs: vec![("b", "short")],
                    failed: None,
                    retries: 0,
                    remote_parent: false,
                },
                Test {
                    name: "D",
                    attrs: vec![],
                    failed: None,
                    retries: 1,
                    remote_parent: true,
                },
            ])
            .expect("batch");
        let spans = decode(&second);
        assert_eq!(spans.len(), 2);
        for s in &spans {
            let st = s.status.as_ref().expect("status");
            assert_eq!((st.code, st.message.as_str()), (0, ""), "{s:?}");
        }
        assert_eq!(spans[0].name, "pkg.C");
        assert!(spans[0].parent_span_id.is_empty(), "{:?}", spans[0]);
        assert_eq!(spans[0].flags, 0x101, "sampled, no remote parent");
        assert_eq!(spans[0].kind, span::SpanKind::Client as i32);
        assert_eq!(spans[0].attributes.len(), 2);
        assert_eq!(
            attr(&spans[0], "b"),
            Some(any_value::Value::StringValue("short".into()))
        );
        assert_eq!(attr(&spans[0], "a"), None);
        assert!(spans[0].events.is_empty());
        assert_eq!(spans[1].name, "pkg.D");
        assert_eq!(spans[1].attributes.len(), 1);
        assert_eq!(attr(&spans[1], "n"), Some(any_value::Value::IntValue(1)));
        assert_eq!(spans[1].events.len(), 1);
        // A reused event has its own attributes only: the attempt, and the
        // one added after it.
        let keys: Vec<&str> = spans[1].events[0]
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        assert_eq!(keys, ["attempt", "failed_endpoint"]);

        // Nothing to send, nothing encoded.
        assert!(enc.encode(Vec::<Test>::new()).is_none());
    }
}
