//! Spans leave the process through a bounded queue that a thread of its own
//! drains, sending batches to the collector over OTLP/gRPC. Ending a span never
//! waits on the network, and encoding and sending batches never runs on the
//! threads that serve requests: the exporter wakes on a timer (ending a span
//! wakes nobody) and takes what has queued. When the queue is full (the
//! collector is down, slow or refusing), a span is dropped and counted, and so
//! are the spans of a batch the collector did not take. Memory is bounded by
//! the queue.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    IdGenerator as _, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::otlp::{Batch, Collector, Encoder, Record};

/// Spans waiting for export at most; beyond, new ones are dropped.
pub const QUEUE_SPANS: usize = 4096;
/// Spans per export request at most. Small enough that writing and encoding
/// a batch fits in what the export thread's heap already holds: at
/// 512 a batch's few hundred KiB were returned to the kernel after each export
/// (`madvise`) and faulted in again at the next, about 900 page faults a second
/// at 2,000 req/s, and the traced p99 rose by 0.3–0.9 ms. At 64, sent one at
/// a time, there were a few a second.
pub const BATCH_SPANS: usize = 64;
/// Exports in flight at once at most.
pub const EXPORTS_IN_FLIGHT: usize = 4;
/// A collector that answers an export within this time gets one at a time:
/// batches encoded ahead would hold the memory of a large batch. One that
/// does not (far, slow or down) gets another export this long after the last
/// one started, up to `EXPORTS_IN_FLIGHT`: at most a batch every 5 ms (12,800
/// spans a second) up to a round trip of about 20 ms, four batches per round
/// trip beyond. A proxy that records more than its collector takes drops the
/// rest, counted.
pub const SLOW_EXPORT: Duration = Duration::from_millis(5);
/// How often the exporter takes what has queued.
pub const BATCH_DELAY: Duration = Duration::from_millis(200);
/// An export the collector does not answer in this time is abandoned.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go and which of them are kept.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The collector's OTLP/gRPC endpoint (`http://collector:4317`).
    pub endpoint: String,
    /// The share of new traces (no sampled parent) that are recorded, 0.0 to 1.0;
    /// a request whose parent was sampled is always recorded, one whose parent
    /// was not never is.
    pub sampling: f64,
    /// `service.name`.
    pub service_name: String,
    /// The rest of the resource: namespace, pod, service account…
    pub resource: Vec<KeyValue>,
}

/// A running exporter: the tracer to start spans with.
#[derive(Clone, Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
    pub tracer: SdkTracer,
}

/// An `--otlp-endpoint` that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint {0}")]
pub struct Error(String);

impl Exporter {
    /// Starts the export thread (call within a Tokio runtime). Spans are
    /// exported under the instrumentation scope `scope`, the name of the
    /// tracer to start them with. `dropped` counts every span that was ended
    /// but not delivered.
    pub fn start(
        cfg: ExportConfig,
        scope: &'static str,
        dropped: Counter,
    ) -> Result<Exporter, Error> {
        let resource = resource(&cfg);
        // The controller's spans are not flushed at exit: it has no request
        // whose trace would be cut short.
        let (tx, _) = spawn::<SpanData>(&cfg, scope, resource.clone(), dropped.clone())?;
        let ratio = cfg.sampling.clamp(0.0, 1.0);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue { tx, dropped })
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(scope);
        Ok(Exporter { provider, tracer })
    }

    /// Makes this the process's tracer provider, for code that reaches it
    /// through `opentelemetry::global` (the controller's few spans).
    pub fn install_global(&self) {
        opentelemetry::global::set_tracer_provider(self.provider.clone());
    }
}

/// The request path's side of an export thread fed with records: sampling
/// decisions, ids, and a queue that drops (and counts) rather than waits.
#[derive(Debug)]
pub struct Recorder<R> {
    tx: mpsc::Sender<R>,
    flush: mpsc::Sender<FlushAsk>,
    dropped: Counter,
    /// New traces sampled: `ratio × 2^63` compared with the trace id, as the
    /// SDK's `TraceIdRatioBased` does, so both make the same decision (at 1.0
    /// the bound is above every id's).
    bound: u64,
}

impl<R: Record> Recorder<R> {
    /// Starts the export thread (call within a Tokio runtime).
    pub fn start(cfg: ExportConfig, dropped: Counter) -> Result<Recorder<R>, Error> {
        let (tx, flush) = spawn::<R>(&cfg, "strait", resource(&cfg), dropped.clone())?;
        let ratio = cfg.sampling.clamp(0.0, 1.0);
        Ok(Recorder {
            tx,
            flush,
            dropped,
            bound: (ratio * (1u64 << 63) as f64) as u64,
        })
    }

    /// Queues a finished span; when the queue is full it is dropped and counted.
    pub fn record(&self, r: R) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }

    /// Sends what has queued now rather than at the export thread's next
    /// look, waiting at most `within`: for a process about to exit. False when
    /// the export thread did not get through it in time; spans the collector
    /// refused are counted as dropped, as always.
    pub async fn flush(&self, within: Duration) -> bool {
        let (ask, done) = tokio::sync::oneshot::channel();
        let asked = async { self.flush.send(ask).await.is_ok() && done.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }

    /// Whether a new trace with this id is recorded, by the configured ratio.
    pub fn samples(&self, id: TraceId) -> bool {
        let low = u64::from_be_bytes(id.to_bytes()[8..].try_into().unwrap_or_default());
        (low >> 1) < self.bound
    }
}

/// Random ids, from a per-thread generator (the SDK's).
pub fn new_trace_id() -> TraceId {
    RandomIdGenerator::default().new_trace_id()
}

pub fn new_span_id() -> SpanId {
    RandomIdGenerator::default().new_span_id()
}

fn resource(cfg: &ExportConfig) -> Resource {
    Resource::builder_empty()
        .with_service_name(cfg.service_name.clone())
        .with_attributes(cfg.resource.clone())
        .build()
}

/// Asks the export thread to send what has queued at once; answered once sent.
type FlushAsk = tokio::sync::oneshot::Sender<()>;

/// Starts the thread that exports what arrives on the returned queue, and
/// sends it at once when asked on the second.
fn spawn<R: Record>(
    cfg: &ExportConfig,
    scope: &'static str,
    resource: Resource,
    dropped: Counter,
) -> Result<(mpsc::Sender<R>, mpsc::Sender<FlushAsk>), Error> {
    check_endpoint(&cfg.endpoint)?;
    let (tx, rx) = mpsc::channel(QUEUE_SPANS);
    let (flush_tx, flush_rx) = mpsc::channel(4);
    // The exporter's channel belongs to the runtime it is built on: built
    // on the export thread's own, and its result sent back.
    let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
    let endpoint = cfg.endpoint.clone();
    std::thread::Builder::new()
        .name("strait-otlp".into())
        .spawn(move || {
            if let Err(e) = crate::background::yield_to_serving() {
                tracing::warn!(
                    error = %e,
                    "span export runs at normal priority and may delay requests"
                );
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = built_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                match Collector::new(&endpoint, EXPORT_TIMEOUT) {
                    Ok(collector) => {
                        let _ = built_tx.send(Ok(()));
                        let failures = std::cell::Cell::new(0);
                        drain(
                            rx,
                            flush_rx,
                            Encoder::new(&resource, scope),
                            async |batch| {
                                export(&collector, batch, &dropped, &failures).await;
                            },
                        )
                        .await;
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(|e| {
            Error(format!(
                "{}: cannot start the export thread: {e}",
                cfg.endpoint
            ))
        })?;
    match built_rx.recv() {
        Ok(Ok(())) => Ok((tx, flush_tx)),
        Ok(Err(e)) => Err(Error(format!("{}: {e}", cfg.endpoint))),
        Err(_) => Err(Error(format!(
            "{}: the export thread stopped",
            cfg.endpoint
        ))),
    }
}

/// `http://HOST:PORT`: refused at start otherwise, naming it.
fn check_endpoint(e: &str) -> Result<(), Error> {
    endpoint_problem(e).map_or(Ok(()), |why| Err(Error(format!("{e:?}: {why}"))))
}

/// Why `e` is no collector endpoint this exporter can send to, if it is not:
/// plaintext OTLP/gRPC (`http://HOST:PORT`) with its port written out, since
/// a URL without one would send to port 80. TLS to the collector is not built
/// in: an `https://` endpoint would fail at the first export.
pub fn endpoint_problem(e: &str) -> Option<String> {
    let expected = "expected http://HOST:PORT (the collector's plaintext OTLP/gRPC port, 4317)";
    let uri: http::Uri = match e.parse() {
        Ok(u) => u,
        Err(err) => return Some(format!("{err}; {expected}")),
    };
    // OTLP/gRPC sends neither from the URL; written into a pod's or a
    // Deployment's arguments, a password would be there for anyone who may
    // read them (the chart refuses both too).
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some(format!("credentials in the URL are not sent; {expected}"));
    }
    if uri.query().is_some() {
        return Some(format!("a query is not sent; {expected}"));
    }
    match (uri.scheme_str(), uri.host(), uri.port_u16()) {
        (Some("http"), Some(_), Some(_)) => None,
        (Some("https"), ..) => Some(format!("TLS to the collector is not supported; {expected}")),
        _ => Some(expected.to_string()),
    }
}

#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Every `BATCH_DELAY`, and at once when asked to flush, sends what has queued,
/// in batches, each encoded as its export starts (see `send_all`): while
/// exports are in flight the queue absorbs new spans, up to its size. Polling
/// on a timer rather than waiting on the queue means ending a span never wakes
/// this thread. Waiting for fuller batches (512 spans, or a second) saved
/// about 1 µs of CPU per request at 1,000 req/s but raised the traced p99 by
/// 0.2–0.6 ms: a larger batch is a longer burst of work and memory churn
/// beside the serving thread.
async fn drain<R: Record>(
    mut rx: mpsc::Receiver<R>,
    mut asks: mpsc::Receiver<FlushAsk>,
    mut encoder: Encoder,
    send: impl AsyncFn(Batch),
) {
    let mut tick = tokio::time::interval(BATCH_DELAY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(ask) = asks.recv() => asked.push(ask),
        }
        while let Ok(ask) = asks.try_recv() {
            asked.push(ask);
        }
        let closed = rx.is_closed();
        // What has queued by now; what comes during these exports waits for the
        // next look, so a steady stream is not chased with small batches.
        let mut take = rx.len();
        if take == 0 && closed {
            for ask in asked.drain(..) {
                let _ = ask.send(());
            }
            return;
        }
        let batches = std::iter::from_fn(|| {
            let n = take.min(BATCH_SPANS);
            take -= n;
            encoder.encode(std::iter::from_fn(|| rx.try_recv().ok()).take(n))
        });
        send_all(batches, &send).await;
        for ask in asked.drain(..) {
            let _ = ask.send(());
        }
    }
}

/// Sends `batches`, each taken from the iterator as its export starts: when
/// no export is in flight, or when `SLOW_EXPORT` has passed since the last one
/// started and one is still unanswered, up to `EXPORTS_IN_FLIGHT` at once.
async fn send_all<T>(mut batches: impl Iterator<Item = T>, send: &impl AsyncFn(T)) {
    use futures_util::StreamExt as _;
    use tokio::time::Instant;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut more = true;
    let mut last_start = Instant::now();
    loop {
        if more
            && in_flight.len() < EXPORTS_IN_FLIGHT
            && (in_flight.is_empty() || Instant::now() >= last_start + SLOW_EXPORT)
        {
            match batches.next() {
                Some(b) => {
                    in_flight.push(send(b));
                    // After encoding: the time is the collector's to answer in.
                    last_start = Instant::now();
                }
                None => more = false,
            }
        }
        if in_flight.is_empty() {
            return;
        }
        let room = more && in_flight.len() < EXPORTS_IN_FLIGHT;
        tokio::select! {
            // Exports first: one just started is sent before its clock is read.
            biased;
            _ = in_flight.next() => {}
            _ = tokio::time::sleep_until(last_start + SLOW_EXPORT), if room => {}
        }
    }
}

/// An export the collector could not take just then (restarting, or asking
/// to slow down) is sent again this many times at most, within
/// `EXPORT_TIMEOUT`, after `RETRY_WAIT` and then four times longer each time;
/// not while the exports before it fail.
const RETRIES: u32 = 2;
const RETRY_WAIT: Duration = Duration::from_millis(100);

/// Sends one export request, again while the collector says it could not
/// take it for now.
async fn send(
    collector: &Collector,
    body: bytes::Bytes,
    most: u32,
) -> Result<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse, String> {
    let deadline = tokio::time::Instant::now() + EXPORT_TIMEOUT;
    let mut wait = RETRY_WAIT;
    let mut retries = 0;
    loop {
        // A clone of the encoded request is a reference count.
        match tokio::time::timeout_at(deadline, collector.export(body.clone())).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                let transient = matches!(
                    e.code(),
                    tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                );
                if !transient || retries >= most || tokio::time::Instant::now() + wait >= deadline {
                    return Err(format!("{:?}: {}", e.code(), e.message()));
                }
                tokio::time::sleep(wait).await;
                wait *= 4;
                retries += 1;
            }
            Err(_) => return Err(format!("no answer in {EXPORT_TIMEOUT:?}")),
        }
    }
}

/// One export; `failures` counts the failed ones in a row.
async fn export(
    collector: &Collector,
    batch: Batch,
    dropped: &Counter,
    failures: &std::cell::Cell<u64>,
) {
    let n = batch.spans as u64;
    // After a failure, no retries until an export gets through: a collector
    // that is down costs a failed export, not waits.
    let retries = if failures.get() == 0 { RETRIES } else { 0 };
    let failed = match send(collector, batch.body, retries).await {
        Ok(answer) => {
            // Taken in part: the spans it turned away are dropped too; a
            // warning may come without any.
            if let Some(p) = answer.partial_success
                && (p.rejected_spans > 0 || !p.error_message.is_empty())
            {
                dropped.inc_by(u64::try_from(p.rejected_spans).unwrap_or(0).min(n));
                crate::sampled!(warn, spans = p.rejected_spans, reason = %p.error_message, "collector rejected spans");
            }
            None
        }
        Err(e) => Some(e),
    };
    match failed {
        None => failures.set(0),
        Some(e) => {
            dropped.inc_by(n);
            let in_a_row = failures.get() + 1;
            failures.set(in_a_row);
            // Once per run of failures, then every hundredth: the counter
            // says the rest.
            if in_a_row == 1 || in_a_row.is_multiple_of(100) {
                tracing::warn!(spans = n, error = %e, failures = in_a_row, "trace export failed; spans dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::SpanKind;
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};

    /// Exporting yields the CPU to the threads that serve requests.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[tokio::test]
    async fn the_export_thread_runs_in_sched_idle() {
        let cfg = ExportConfig {
            endpoint: "http://127.0.0.1:9".into(),
            sampling: 1.0,
            service_name: "test".into(),
            resource: vec![],
        };
        let _recorder = Recorder::<SpanData>::start(cfg, Counter::default()).expect("start");
        let mut exporters = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let dir = task.expect("task").path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == "strait-otlp" {
                let stat = std::fs::read_to_string(dir.join("stat")).expect("stat");
                exporters.push(crate::background::policy_in(&stat));
            }
        }
        assert_eq!(exporters, vec![libc::SCHED_IDLE as u32]);
        let me = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
        assert_ne!(crate::background::policy_in(&me), libc::SCHED_IDLE as u32);
    }

    /// Plaintext OTLP/gRPC with the port written out: anything else would
    /// fail at the first export, or send to port 80.
    #[test]
    fn endpoints_are_http_with_a_port() {
        for ok in [
            "http://otel:4317",
            "http://10.0.0.7:4317/",
            "http://[::1]:4317",
        ] {
            assert_eq!(endpoint_problem(ok), None, "{ok}");
        }
        for bad in [
            "https://otel:4317",
            "http://otel",
            "http://otel:43l7",
            "otel:4317",
            "http://otel:4317 x",
            "",
            "http://user:pw@otel:4317",
            "http://otel:4317/?token=x",
        ] {
            assert!(endpoint_problem(bad).is_some(), "{bad}");
        }
        assert!(
            endpoint_problem("https://otel:4317")
                .unwrap()
                .contains("TLS")
        );
    }

    /// The request path's ratio decision is the SDK's, id for id.
    #[test]
    fn samples_new_traces_as_the_sdk_ratio_sampler_does() {
        for ratio in [0.0, 0.01, 0.25, 0.5, 0.999, 1.0] {
            let bound = (ratio * (1u64 << 63) as f64) as u64;
            let r = Recorder::<SpanData> {
                tx: mpsc::channel(1).0,
                flush: mpsc::channel(1).0,
                dropped: Counter::default(),
                bound,
            };
            let sdk = Sampler::TraceIdRatioBased(ratio);
            let mut kept = 0;
            for _ in 0..2000 {
                let id = new_trace_id();
                let want = sdk
                    .should_sample(None, id, "GET", &SpanKind::Client, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample;
                assert_eq!(r.samples(id), want, "ratio {ratio}, trace {id}");
                kept += usize::from(want);
            }
            let share = kept as f64 / 2000.0;
            assert!((share - ratio).abs() < 0.05, "ratio {ratio}: kept {share}");
        }
    }

    fn span() -> SpanData {
        SpanData {
            span_context: opentelemetry::trace::SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "GET".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: opentelemetry::InstrumentationScope::default(),
        }
    }

    /// A collector that answers within `SLOW_EXPORT` gets one export at a time,
    /// each batch converted as its export starts, not ahead. A slow answer lets
    /// one more go beside it `SLOW_EXPORT` after the last start; once answers
    /// come quickly again, so do single exports.
    #[tokio::test(start_paused = true)]
    async fn exports_go_one_at_a_time_unless_one_goes_unanswered() {
        use std::cell::{Cell, RefCell};
        use tokio::time::{Instant, sleep};
        let ms = Duration::from_millis;
        // Batch n (of n spans) takes this long to be answered.
        let slow = SLOW_EXPORT + ms(3);
        let answer = [ms(1), ms(1), slow, ms(2), ms(2), ms(2)];
        let (in_flight, most) = (Cell::new(0), Cell::new(0));
        let (converted, starts) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
        let start = Instant::now();
        let batches = (1..=answer.len())
            .map(|n| vec![span(); n])
            .inspect(|_| converted.borrow_mut().push(start.elapsed()));
        send_all(batches, &async |b: Vec<SpanData>| {
            starts.borrow_mut().push(start.elapsed());
            in_flight.set(in_flight.get() + 1);
            most.set(most.get().max(in_flight.get()));
            sleep(answer[b.len() - 1]).await;
            in_flight.set(in_flight.get() - 1);
        })
        .await;
        // The third is slow: the fourth goes beside it after `SLOW_EXPORT`,
        // and is answered first; the fifth waits for the third.
        let third = ms(2);
        let want = [
            ms(0),
            ms(1),
            third,
            third + SLOW_EXPORT,
            third + slow,
            third + slow + ms(2),
        ];
        assert_eq!(*starts.borrow(), want);
        assert_eq!(*converted.borrow(), want);
        assert_eq!(most.get(), 2);
    }

    /// Every look sends what has queued by then, in batches, a few exports at
    /// a time; what comes during an export waits for the next look; a flush
    /// sends at once; and what is queued when the proxy stops is still sent.
    #[tokio::test(start_paused = true)]
    async fn exports_what_queued_at_each_look_at_once_when_flushed_and_at_stop() {
        use std::sync::{Arc, Mutex};
        use tokio::time::{Duration, Instant, sleep, sleep_until};
        let (tx, rx) = mpsc::channel::<SpanData>(QUEUE_SPANS);
        let (flush, asks) = mpsc::channel(4);
        let r = Recorder {
            tx: tx.clone(),
            flush,
            dropped: Counter::default(),
            bound: 0,
        };
        let sent: Arc<Mutex<Vec<(Duration, usize)>>> = Arc::default();
        let start = Instant::now();
        let log = sent.clone();
        // Spans that end while an export is in flight, during the burst.
        let late = Arc::new(Mutex::new(Some(tx.clone())));
        let during = late.clone();
        let encoder = Encoder::new(&Resource::builder_empty().build(), "strait");
        let task = tokio::spawn(drain(rx, asks, encoder, async move |b: Batch| {
            log.lock().unwrap().push((start.elapsed(), b.spans));
            if let Some(t) = during.lock().unwrap().as_ref() {
                for _ in 0..7 {
                    t.try_send(span()).unwrap();
                }
            }
            sleep(Duration::from_millis(50)).await;
        }));
        let sent = move || std::mem::take(&mut *sent.lock().unwrap());
        // The first look is at once; an empty queue sends nothing.
        sleep(BATCH_DELAY / 2).await;
        assert_eq!(sent(), []);

        // A burst: in full batches at the next look, and not the spans that
        // came meanwhile, which go at the look after. This collector is slow
        // (50 ms), so up to `EXPORTS_IN_FLIGHT` exports go at once.
        for _ in 0..((EXPORTS_IN_FLIGHT + 1) * BATCH_SPANS + 10) {
            tx.try_send(span()).unwrap();
        }
        // Between looks (at 200 and 400 ms), so that no look races the checks.
        sleep_until(start + BATCH_DELAY * 2 - BATCH_DELAY / 20).await;
        let s = sent();
        let mut sizes = vec![BATCH_SPANS; EXPORTS_IN_FLIGHT + 1];
        sizes.push(10);
        assert_eq!(s.iter().map(|b| b.1).collect::<Vec<_>>(), sizes, "{s:?}");
        let look = s[0].0;
        assert!(look <= BATCH_DELAY + BATCH_DELAY / 2, "{s:?}");
        // One more each `SLOW_EXPORT` while none is answered, up to the limit;
        // then, every slot taken, one as each is answered, 50 ms after it
        // started.
        let mut starts: Vec<_> = (0..EXPORTS_IN_FLIGHT as u32)
            .map(|i| look + SLOW_EXPORT * i)
            .collect();
        let answered = Duration::from_millis(50);
        starts.extend([look + answered, look + SLOW_EXPORT + answered]);
        assert_eq!(s.iter().map(|b| b.0).collect::<Vec<_>>(), starts, "{s:?}");
        late.lock().unwrap().take();
        sleep_until(start + BATCH_DELAY * 3 - BATCH_DELAY / 20).await;
        assert_eq!(
            sent().iter().map(|b| b.1).collect::<Vec<_>>(),
            [7 * (EXPORTS_IN_FLIGHT + 2)]
        );

        // A process about to exit asks for what has queued, and gets it sent
        // at once rather than at the next look (at 800 ms).
        sleep_until(start + BATCH_DELAY * 3 + BATCH_DELAY / 2).await;
        for _ in 0..5 {
            r.record(span());
        }
        let asked = Instant::now();
        assert!(r.flush(Duration::from_secs(2)).await, "flushed in time");
        assert_eq!(sent(), [(asked.duration_since(start), 5)]);

        // Stopping sends what is left and ends the exporter.
        for _ in 0..3 {
            tx.try_send(span()).unwrap();
        }
        drop(tx);
        drop(r);
        task.await.unwrap();
        assert_eq!(sent().iter().map(|b| b.1).collect::<Vec<_>>(), [3]);
    }
}
