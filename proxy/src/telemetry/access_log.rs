//! The access log: one line per HTTP request on stdout, as text or JSON. Lines
//! go through a bounded queue to a writer task, so a slow stdout never holds a
//! request; when the queue is full a line is dropped and counted.

use std::time::{Duration, SystemTime};

use http::Request;
use opentelemetry::trace::TraceId;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::metrics::Direction;
use super::trace::Notes;
use crate::cli::LogFormat;

const QUEUE_LINES: usize = 4096;

#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    format: LogFormat,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer (within a Tokio runtime).
    pub fn start(format: LogFormat, dropped: Counter) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE_LINES);
        tokio::spawn(async move {
            let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
            while let Some(line) = rx.recv().await {
                let _ = out.write_all(line.as_bytes()).await;
                // Flush once the queue is empty: one write for a burst.
                if rx.is_empty() {
                    let _ = out.flush().await;
                }
            }
        });
        AccessLog {
            tx,
            format,
            dropped,
        }
    }

    pub fn write(&self, line: Line) {
        if self.tx.try_send(line.render(self.format)).is_err() {
            self.dropped.inc();
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
    retries: u32,
    trace_id: Option<String>,
    error: Option<String>,
    grpc_status: Option<&'static str>,
}

impl Line {
    pub fn of<B>(req: &Request<B>, direction: Direction) -> Line {
        let authority = req
            .uri()
            .authority()
            .map(|a| match a.port() {
                Some(p) => format!("{}:{}", a.host(), p.as_str()),
                None => a.host().to_string(),
            })
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        Line {
            at: SystemTime::now(),
            direction,
            method: bounded_str(req.method().as_str()),
            authority: bounded(authority),
            path: bounded(req.uri().path().to_string()),
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
            retries: 0,
            trace_id: None,
            error: None,
            grpc_status: None,
        }
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
                format!("{v}\n")
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

#[cfg(test)]
mod tests {
    use super::*;

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
