//! The access log: one line per HTTP request on stdout, as text or JSON. Lines
//! go through a bounded queue to a writer task, so a slow stdout never holds a
//! request; when the queue is full a line is dropped and counted, and so is
//! every line of a write that failed (stdout closed).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use http::Request;
use opentelemetry::trace::TraceId;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::metrics::Direction;
use super::trace::Notes;
use crate::cli::LogFormat;

const QUEUE_LINES: usize = 4096;
/// And at most this much text queued: a line is up to some KiB (a long path
/// and Host, JSON-escaped), and lines held through a slow stdout must not
/// take what the proxy's memory limit leaves it.
const QUEUE_BYTES: usize = 4 << 20;
/// Lines queued together go out in one write of about this much at most.
const WRITE_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    flush: mpsc::Sender<oneshot::Sender<()>>,
    format: LogFormat,
    dropped: Counter,
    /// Bytes of the lines queued, not yet taken by the writer.
    queued: Arc<AtomicUsize>,
}

impl AccessLog {
    /// Starts the writer to stdout (within a Tokio runtime).
    pub fn start(format: LogFormat, dropped: Counter) -> Self {
        Self::start_to(tokio::io::stdout(), format, dropped)
    }

    fn start_to(
        out: impl AsyncWrite + Unpin + Send + 'static,
        format: LogFormat,
        dropped: Counter,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<String>(QUEUE_LINES);
        let (flush, asks) = mpsc::channel(4);
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_lines(out, rx, asks, dropped.clone(), queued.clone()));
        AccessLog {
            tx,
            flush,
            format,
            dropped,
            queued,
        }
    }

    pub fn write(&self, line: Line) {
        let mut line = line.render(self.format);
        // Queued for as long as stdout is slow: only its text.
        line.shrink_to_fit();
        let n = line.len();
        if self.queued.fetch_add(n, Ordering::AcqRel) + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        if self.tx.try_send(line).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.dropped.inc();
        }
    }

    /// Writes out every line queued so far, waiting at most `within`: for a
    /// process about to exit. False when that did not happen in time.
    pub async fn flush(&self, within: Duration) -> bool {
        let (ask, done) = oneshot::channel();
        let asked = async { self.flush.send(ask).await.is_ok() && done.await.is_ok() };
        tokio::time::timeout(within, asked).await.unwrap_or(false)
    }
}

/// Writes what has queued, a burst in one write; answers a flush once every
/// line queued before it is out.
async fn write_lines(
    mut out: impl AsyncWrite + Unpin,
    mut rx: mpsc::Receiver<String>,
    mut asks: mpsc::Receiver<oneshot::Sender<()>>,
    dropped: Counter,
    queued: Arc<AtomicUsize>,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let (first, ask) = tokio::select! {
            line = rx.recv() => match line {
                Some(l) => (Some(l), None),
                None => return,
            },
            Some(ask) = asks.recv() => (None, Some(ask)),
        };
        let mut lines = 0u64;
        for l in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            buf.extend_from_slice(l.as_bytes());
            queued.fetch_sub(l.len(), Ordering::AcqRel);
            lines += 1;
            // A flush takes everything queued; a burst goes out in parts.
            if buf.len() >= WRITE_BYTES && ask.is_none() {
                break;
            }
        }
        if lines > 0 {
            let written = async {
                out.write_all(&buf).await?;
                out.flush().await
            };
            if written.await.is_err() {
                dropped.inc_by(lines);
            }
            buf.clear();
            if buf.capacity() > WRITE_BYTES {
                buf = Vec::new();
            }
        }
        if let Some(ask) = ask {
            let _ = ask.send(());
        }
    }
}

/// One request's line, from its head to its response.
#[derive(Debug)]
pub struct Line {
    at: SystemTime,
    direction: Direction,
    method: String,
    authority: String,
    path: String,
    version: &'static str,
    status: u16,
    duration: Duration,
    route: Option<String>,
    backend: Option<String>,
    endpoint: Option<String>,
    peer: Option<String>,
    /// Inbound: the caller's address, which tells a plaintext caller's
    /// line (no `peer_identity`) whose it is.
    client: Option<std::net::IpAddr>,
    retries: u32,
    trace_id: Option<String>,
    error: Option<String>,
    grpc_status: Option<&'static str>,
}

impl Line {
    pub fn of<B>(req: &Request<B>, direction: Direction) -> Line {
        // Host and port only: the user-info part of either (`user:password@`)
        // is a credential, never written to a log.
        let authority = req
            .uri()
            .authority()
            .map(crate::http::host_port)
            .or_else(|| {
                let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
                Some(match h.parse::<http::uri::Authority>() {
                    Ok(a) => crate::http::host_port(&a),
                    Err(_) => h.rsplit('@').next().unwrap_or_default().to_string(),
                })
            })
            .unwrap_or_default();
        Line {
            at: SystemTime::now(),
            direction,
            method: bounded_str(req.method().as_str()),
            authority: bounded(authority),
            path: bounded_str(req.uri().path()),
            version: match req.version() {
                http::Version::HTTP_10 => "HTTP/1.0",
                http::Version::HTTP_2 => "HTTP/2",
                _ => "HTTP/1.1",
            },
            status: 0,
            duration: Duration::ZERO,
            route: None,
            backend: None,
            endpoint: None,
            peer: None,
            client: None,
            retries: 0,
            trace_id: None,
            error: None,
            grpc_status: None,
        }
    }

    /// Inbound: the caller's address.
    pub fn from_client(mut self, client: Option<std::net::IpAddr>) -> Line {
        self.client = client;
        self
    }

    pub fn finish(
        mut self,
        status: u16,
        duration: Duration,
        notes: &Notes,
        trace_id: Option<TraceId>,
        error: Option<&str>,
        grpc_code: Option<usize>,
    ) -> Line {
        self.status = status;
        self.duration = duration;
        self.route = notes
            .route
            .as_ref()
            .map(|(_, route, rule)| format!("{route}/{rule}"));
        self.backend = notes.backend.as_ref().map(|b| b.to_string());
        self.endpoint = notes.endpoint.map(|e| e.to_string());
        self.peer = notes.peer.as_ref().map(|p| p.to_string());
        self.retries = notes.retries;
        self.grpc_status = grpc_code.map(|c| crate::http::grpc::LABELS[c]);
        self.trace_id = trace_id.map(|t| t.to_string());
        // The value may be an upstream's own header: any length.
        self.error = error.map(bounded_str);
        self
    }

    fn render(&self, format: LogFormat) -> String {
        let at = humantime::format_rfc3339_millis(self.at).to_string();
        let ms = self.duration.as_secs_f64() * 1000.0;
        match format {
            LogFormat::Json => {
                let mut v = serde_json::json!({
                    "timestamp": at,
                    "direction": self.direction.as_str(),
                    "method": self.method,
                    "authority": self.authority,
                    "path": self.path,
                    "protocol": self.version,
                    "status": self.status,
                    "duration_ms": (ms * 1000.0).round() / 1000.0,
                    "retries": self.retries,
                });
                for (k, val) in [
                    ("route", &self.route),
                    ("backend", &self.backend),
                    ("endpoint", &self.endpoint),
                    ("peer_identity", &self.peer),
                    ("trace_id", &self.trace_id),
                    ("proxy_error", &self.error),
                ] {
                    if let Some(val) = val {
                        v[k] = serde_json::Value::String(val.clone());
                    }
                }
                if let Some(g) = self.grpc_status {
                    v["grpc_status"] = g.into();
                }
                if let Some(c) = self.client {
                    v["client_addr"] = c.to_string().into();
                }
                ascii_json(&v)
            }
            LogFormat::Text => {
                use std::fmt::Write;
                // Request-derived values are quoted with escapes: a path cannot
                // forge another field or another line.
                let mut s = format!(
                    "{at} {} {:?} {:?} {:?} {} {} {ms:.3}ms",
                    self.direction.as_str(),
                    self.method,
                    self.authority,
                    self.path,
                    self.version,
                    self.status
                );
                // The JSON format's names, so one parser's keys serve both.
                let _ = write!(s, " retries={}", self.retries);
                for (k, val) in [
                    ("route", &self.route),
                    ("backend", &self.backend),
                    ("endpoint", &self.endpoint),
                    ("peer_identity", &self.peer),
                    ("trace_id", &self.trace_id),
                ] {
                    if let Some(val) = val {
                        let _ = write!(s, " {k}={val}");
                    }
                }
                if let Some(g) = self.grpc_status {
                    let _ = write!(s, " grpc_status={g}");
                }
                if let Some(c) = self.client {
                    let _ = write!(s, " client_addr={c}");
                }
                if let Some(e) = &self.error {
                    let _ = write!(s, " proxy_error={e:?}");
                }
                s.push('\n');
                s
            }
        }
    }
}

/// Values a client chooses, cut to `MAX_FIELD` bytes: the queue is bounded in
/// lines, so lines are bounded in size.
pub const MAX_FIELD: usize = 1024;

/// `s` cut to `MAX_FIELD` bytes, copying no more than that.
pub fn bounded_str(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = String::with_capacity(end + '…'.len_utf8());
    cut.push_str(&s[..end]);
    cut.push('…');
    cut
}

pub fn bounded(mut s: String) -> String {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// `v` as one line of JSON in ASCII alone: anything else in a string (a
/// path may carry U+2028, U+0085, U+009B or U+202E) is written `\uXXXX`.
/// serde_json escapes only the C0 controls, and the others would reach a
/// terminal, or a reader splitting lines on Unicode line breaks, as they are.
fn ascii_json(v: &serde_json::Value) -> String {
    struct Ascii;
    impl serde_json::ser::Formatter for Ascii {
        fn write_string_fragment<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            fragment: &str,
        ) -> std::io::Result<()> {
            for c in fragment.chars() {
                if c.is_ascii() {
                    w.write_all(&[c as u8])?;
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        write!(w, "\\u{u:04x}")?;
                    }
                }
            }
            Ok(())
        }
    }
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Ascii);
    if serde::Serialize::serialize(v, &mut ser).is_err() {
        return "{}\n".into();
    }
    out.push(b'\n');
    // ASCII throughout.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// stdout as a test sees it: what was written, a pipe nobody reads
    /// (`closed`), or one that takes nothing for now (`stalled`).
    #[derive(Clone, Default)]
    struct Out {
        written: Arc<Mutex<Vec<u8>>>,
        closed: bool,
        stalled: bool,
    }

    impl AsyncWrite for Out {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.closed {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            if self.stalled {
                return Poll::Pending;
            }
            self.written.lock().unwrap().extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn line(path: &str) -> Line {
        let req = Request::get(path).header("host", "web").body(()).unwrap();
        answered(&req)
    }

    /// `req`'s line, answered 200 at once.
    fn answered(req: &Request<()>) -> Line {
        Line::of(req, Direction::Outbound).finish(
            200,
            Duration::ZERO,
            &Notes::default(),
            None,
            None,
            None,
        )
    }

    /// A path's Unicode line breaks, C1 controls and direction overrides
    /// reach the JSON line escaped (ASCII alone), and read back as sent.
    #[test]
    fn a_json_line_is_ascii_and_reads_back_as_sent() {
        let path = "/a\u{2028}b\u{85}c\u{9b}2J\u{202e}d\u{1f600}";
        let req = Request::get(path).header("host", "web").body(()).unwrap();
        let json = answered(&req).render(LogFormat::Json);
        assert!(json.trim_end().is_ascii(), "{json:?}");
        assert_eq!(json.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["path"], path);
    }

    #[tokio::test]
    async fn a_flush_writes_every_line_queued_before_it() {
        let out = Out::default();
        let dropped = Counter::default();
        let log = AccessLog::start_to(out.clone(), LogFormat::Text, dropped.clone());
        for i in 0..100 {
            log.write(line(&format!("/{i}")));
        }
        assert!(log.flush(Duration::from_secs(5)).await);
        let written = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        assert_eq!(written.lines().count(), 100, "{written}");
        assert!(written.lines().last().unwrap().contains("\"/99\""));
        assert_eq!(dropped.get(), 0);
    }

    #[tokio::test]
    async fn lines_a_closed_stdout_did_not_take_are_counted_dropped() {
        let out = Out {
            closed: true,
            ..Out::default()
        };
        let dropped = Counter::default();
        let log = AccessLog::start_to(out, LogFormat::Json, dropped.clone());
        for i in 0..10 {
            log.write(line(&format!("/{i}")));
        }
        assert!(log.flush(Duration::from_secs(5)).await);
        assert_eq!(dropped.get(), 10);
    }

    /// Through a stdout that takes nothing, the lines queued hold at most
    /// `QUEUE_BYTES`, however long each is (a 1 KiB path of two-byte
    /// characters is 3 KiB of JSON escapes), and those past it are dropped
    /// and counted.
    #[tokio::test]
    async fn lines_queued_hold_a_bounded_amount() {
        let out = Out {
            stalled: true,
            ..Out::default()
        };
        let dropped = Counter::default();
        let log = AccessLog::start_to(out, LogFormat::Json, dropped.clone());
        let path = format!("/{}", "é".repeat(512));
        let req = Request::get(path.as_str())
            .header("host", "h".repeat(1024))
            .body(())
            .unwrap();
        let one = answered(&req).render(LogFormat::Json).len();
        assert!(one > 3000, "{one}");
        for _ in 0..QUEUE_LINES {
            log.write(answered(&req));
        }
        let queued = log.queued.load(Ordering::Acquire);
        assert!(queued <= QUEUE_BYTES, "{queued}");
        assert!(queued + one > QUEUE_BYTES, "filled: {queued}");
        // Some thousands of 3 KiB lines: most past the bound.
        assert!(
            dropped.get() as usize > QUEUE_LINES / 2,
            "{}",
            dropped.get()
        );
    }

    /// An inbound line names the caller's address, the one way to tell
    /// which plaintext callers remain (they have no `peer_identity`).
    #[test]
    fn an_inbound_line_names_its_caller_s_address() {
        let req = Request::get("/").header("host", "web").body(()).unwrap();
        let line = Line::of(&req, Direction::Inbound)
            .from_client(Some("10.1.2.3".parse().unwrap()))
            .finish(200, Duration::ZERO, &Notes::default(), None, None, None);
        assert!(
            line.render(LogFormat::Text)
                .contains(" client_addr=10.1.2.3")
        );
        let json: serde_json::Value = serde_json::from_str(&line.render(LogFormat::Json)).unwrap();
        assert_eq!(json["client_addr"], "10.1.2.3");
    }

    /// Text names its fields as JSON does.
    #[test]
    fn text_and_json_name_the_peer_alike() {
        let req = Request::get("/").header("host", "web").body(()).unwrap();
        let notes = Notes {
            peer: Some("spiffe://cluster.local/ns/shop/sa/web".parse().unwrap()),
            ..Notes::default()
        };
        let line = Line::of(&req, Direction::Inbound).finish(
            200,
            Duration::ZERO,
            &notes,
            None,
            None,
            None,
        );
        let text = line.render(LogFormat::Text);
        assert!(
            text.contains(" peer_identity=spiffe://cluster.local/ns/shop/sa/web"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&line.render(LogFormat::Json)).unwrap();
        assert_eq!(
            json["peer_identity"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }

    #[test]
    fn fields_are_cut_to_the_bound_whatever_their_length() {
        assert_eq!(bounded_str("short"), "short");
        let long = "é".repeat(MAX_FIELD);
        let cut = bounded_str(&long);
        assert!(cut.len() <= MAX_FIELD + '…'.len_utf8(), "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(cut, bounded(long));
    }

    /// User info in the authority is a credential: the line has the host.
    #[test]
    fn a_password_in_the_authority_is_not_logged() {
        for (target, host) in [
            ("/cart", "alice:s3cret@web.shop.svc.cluster.local:8080"),
            ("/cart", "alice:s3cret@[web"),
            (
                "http://alice:s3cret@web.shop.svc.cluster.local:8080/cart",
                "web",
            ),
        ] {
            let req = Request::get(target).header("host", host).body(()).unwrap();
            let line = answered(&req);
            for format in [LogFormat::Text, LogFormat::Json] {
                let text = line.render(format);
                assert!(!text.contains("s3cret"), "{text}");
                assert!(text.contains("web"), "{text}");
            }
        }
    }

    #[test]
    fn a_line_cannot_be_split_by_what_the_client_sent() {
        let req = Request::get("/a\"b")
            .header("host", "web")
            .body(())
            .unwrap();
        let line = Line::of(&req, Direction::Outbound).finish(
            200,
            Duration::from_millis(2),
            &Notes::default(),
            None,
            None,
            None,
        );
        let text = line.render(LogFormat::Text);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(" 200 2.000ms retries=0"), "{text}");
        assert!(text.contains(r#""/a\"b""#), "{text}");
        let json: serde_json::Value = serde_json::from_str(&line.render(LogFormat::Json)).unwrap();
        assert_eq!(json["path"], "/a\"b");
        assert_eq!(json["status"], 200);
    }
}
