//! An OpenTelemetry collector in the test process: the OTLP/gRPC trace service,
//! keeping every span it receives, or misbehaving on command (stalling on every
//! export, or refusing it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;

/// How the collector answers exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Accept,
    /// Takes the request and never answers.
    Stall,
    /// Answers every export with UNAVAILABLE.
    Refuse,
    /// Takes every export and keeps nothing (for benchmarks).
    Discard,
    /// Takes every export and answers that it rejected half its spans
    /// (rounded up; an OTLP partial success).
    Reject,
    /// Answers the first export UNAVAILABLE, then takes every one.
    RefuseFirst,
}

/// A span as received, with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// An attribute's value as text (ints and strings).
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                Value::IntValue(i) => i.to_string(),
                Value::BoolValue(b) => b.to_string(),
                Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    counts: Arc<Counts>,
    mode: Mode,
}

/// Spans received and rejected (`Reject`), exports refused (`RefuseFirst`).
#[derive(Debug, Default)]
pub struct Counts {
    pub received: AtomicU64,
    pub rejected: AtomicU64,
    pub refused: AtomicU64,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.mode {
            Mode::Stall => std::future::pending::<()>().await,
            Mode::Refuse => return Err(tonic::Status::unavailable("refusing on command")),
            Mode::Discard => unreachable!("served by `Discarding`"),
            Mode::Reject => {
                let spans: u64 = req
                    .get_ref()
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .map(|ss| ss.spans.len() as u64)
                    .sum();
                let rejected = spans.div_ceil(2);
                self.counts.received.fetch_add(spans, Ordering::Relaxed);
                self.counts.rejected.fetch_add(rejected, Ordering::Relaxed);
                return Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans: rejected as i64,
                        error_message: "rejecting on command".into(),
                    }),
                }));
            }
            Mode::RefuseFirst => {
                let first = self.counts.refused.compare_exchange(
                    0,
                    1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if first.is_ok() {
                    return Err(tonic::Status::unavailable("refusing the first on command"));
                }
            }
            Mode::Accept => {}
        }
        let mut out = self.spans.lock().expect("spans");
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// `Mode::Discard`'s trace service: each export is taken whole and answered,
/// and its spans are never decoded. A benchmark's collector shares the
/// machine's cores with the proxies it measures; decoding every span (a few
/// dozen allocations each, in bursts as batches arrive) would load them with
/// work that a collector on another node does not put beside a proxy.
#[derive(Clone, Copy, Debug)]
struct Discarding;

impl tonic::server::NamedService for Discarding {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<B> tower::Service<http::Request<B>> for Discarding
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                return Ok(tonic::Status::unimplemented("only Export").into_http());
            }
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Unread>::default();
            Ok(tonic::server::Grpc::new(codec).unary(Discarding, req).await)
        })
    }
}

impl tonic::server::UnaryService<Unread> for Discarding {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, _: tonic::Request<Unread>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(Default::default())))
    }
}

/// An export request read as a message whose every field is skipped: the
/// top-level `resource_spans` entries are stepped over by length, unparsed.
#[derive(Debug, Default)]
struct Unread;

impl tonic_prost::prost::Message for Unread {
    fn encode_raw(&self, _: &mut impl bytes::BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: tonic_prost::prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: tonic_prost::prost::encoding::DecodeContext,
    ) -> Result<(), tonic_prost::prost::DecodeError> {
        tonic_prost::prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {}
}

/// A running collector; stops when dropped.
pub struct OtlpCollector {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    spans: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpCollector {
    pub async fn start(mode: Mode) -> OtlpCollector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Counts::default());
        let svc = Collector {
            spans: spans.clone(),
            counts: counts.clone(),
            mode,
        };
        let incoming = TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let mut server = tonic::transport::Server::builder();
            let _ = match mode {
                Mode::Discard => {
                    server
                        .add_service(Discarding)
                        .serve_with_incoming(incoming)
                        .await
                }
                _ => {
                    server
                        .add_service(TraceServiceServer::new(svc))
                        .serve_with_incoming(incoming)
                        .await
                }
            };
        });
        OtlpCollector {
            addr,
            counts,
            spans,
            task,
        }
    }

    /// `--otlp-endpoint` for this collector.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits until the spans received satisfy `done` (or `within` passes);
    /// returns them.
    pub async fn wait_until(
        &self,
        within: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The spans of trace `trace` (hex), once there are at least `n` of them.
    pub async fn trace(&self, trace: &str, n: usize) -> Vec<Received> {
        self.wait_until(Duration::from_secs(10), |s| {
            s.iter().filter(|r| r.trace_id() == trace).count() >= n
        })
        .await
        .into_iter()
        .filter(|r| r.trace_id() == trace)
        .collect()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};

    use super::*;

    /// A benchmark's collector answers an export as a real one does, spans
    /// and all, without keeping any.
    #[tokio::test]
    async fn a_discarding_collector_answers_exports_and_keeps_nothing() {
        let collector = OtlpCollector::start(Mode::Discard).await;
        let mut client = TraceServiceClient::connect(collector.endpoint())
            .await
            .expect("connect");
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET".into(),
            ..Span::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource::default()),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span; 64],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        for _ in 0..2 {
            let answer = client.export(request.clone()).await.expect("export taken");
            assert_eq!(answer.into_inner().partial_success, None);
        }
        assert!(collector.spans().is_empty());
    }
}
