//! Protocol detection: HTTP/1.x, HTTP/2 prior knowledge, or opaque TCP, from the
//! client's first bytes, waiting at most a bounded time (server-speaks-first
//! protocols send nothing until the server does).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }
}

#[derive(Debug)]
pub struct Detected {
    pub protocol: Protocol,
    /// Bytes read while detecting, to be replayed to whoever handles the stream.
    pub prefix: BytesMut,
}

/// Reads until the protocol is known, the deadline passes (opaque), or EOF.
/// Returns `None` when the client closed without sending anything. Opaque with
/// an empty prefix: the client said nothing before the deadline.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
    max_bytes: usize,
) -> std::io::Result<Option<Detected>> {
    detect_from(io, BytesMut::with_capacity(1024), timeout, max_bytes).await
}

/// As `detect`, from the first bytes already read into `buf`.
pub async fn detect_from<I: AsyncRead + Unpin>(
    io: &mut I,
    mut buf: BytesMut,
    timeout: Duration,
    max_bytes: usize,
) -> std::io::Result<Option<Detected>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&buf, max_bytes) {
            return Ok(Some(Detected {
                protocol,
                prefix: buf,
            }));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) if buf.is_empty() => return Ok(None),
            // The start of an HTTP request, and then a pause: HTTP, whose server
            // waits for the rest with its own timeout. Carried raw, the rest
            // would reach the app past everything the HTTP stack enforces (a
            // forged `strait-client-id` among them).
            Err(_) if !buf.is_empty() => {
                return Ok(Some(Detected {
                    protocol: if H2_PREFACE.starts_with(&buf[..]) {
                        Protocol::Http2
                    } else {
                        Protocol::Http1
                    },
                    prefix: buf,
                }));
            }
            // EOF with a partial prefix: nothing more can follow it, carried as it is.
            Ok(Ok(0)) | Err(_) => {
                return Ok(Some(Detected {
                    protocol: Protocol::Opaque,
                    prefix: buf,
                }));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `Some` once the bytes so far decide the protocol.
fn classify(buf: &[u8], max_bytes: usize) -> Option<Protocol> {
    classify_as(buf, max_bytes, Reader::Detection)
}

/// Whose reading of a line `classify_as` follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Detection's: a method of token characters, and HTTP/2's preface.
    Detection,
    /// Netty's, for a line after control bytes on a stream already carried
    /// as opaque: any bytes but whitespace and controls make a method
    /// (`G@T`), and `PRI * HTTP/2.0` is a request like any other. Too broad
    /// for detection, which would wait on unframed text (`{"id":1}`, an
    /// XMPP stream header) and answer it 400 at the timeout.
    Netty,
}

fn classify_as(buf: &[u8], max_bytes: usize, reader: Reader) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if reader == Reader::Detection && buf[..n] == H2_PREFACE[..n] {
        // "PRI " could still be an HTTP/1 method named PRI; only the full preface decides.
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // Servers skip empty lines before a request line (RFC 9112, 2.2), and
    // lenient ones (Python's) any whitespace: a request behind it is HTTP too.
    // Undecided when detection has read all it reads: what an app's server
    // could still parse as a request is HTTP, for our HTTP server to serve or
    // refuse (its head limit), never bytes for the app to parse.
    let full = buf.len() >= max_bytes;
    let Some(start) = buf.iter().position(|&b| !is_space(b)) else {
        return full.then_some(Protocol::Http1);
    };
    let buf = &buf[start..];
    if skipped_before_request(buf[0]) {
        // Netty skips every control byte before a request line too; binary
        // protocols open with them (lengths, small numbers: a Cassandra
        // frame, SOCKS5's greeting), and waiting on each for what follows
        // would take them for HTTP at the detection timeout. So only a whole
        // request line behind them is HTTP; anything else is opaque at once.
        let rest = &buf[buf
            .iter()
            .take_while(|&&b| skipped_before_request(b))
            .count()..];
        let line = rest.contains(&b'\n') && classify(rest, max_bytes) == Some(Protocol::Http1);
        return Some(if line {
            Protocol::Http1
        } else {
            Protocol::Opaque
        });
    }
    // HTTP/1 request line: token SP request-target SP "HTTP/1." digit CRLF,
    // as lenient servers read it: Tomcat and Python take tabs (or runs of
    // whitespace) between the parts, Python an `HTTP/1.10` or trailing
    // whitespace. Whatever such a server would take for a request with
    // headers is HTTP here, and what our server's strict parser refuses is
    // refused (400) rather than carried raw to the app, forged
    // `strait-client-id` and all.
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let in_method = |b: u8| match reader {
        Reader::Detection => is_tchar(b),
        Reader::Netty => !skipped_before_request(b),
    };
    let method_len = line.iter().take_while(|&&b| in_method(b)).count();
    if method_len == 0 || (method_len < line.len() && !is_space(line[method_len])) {
        return Some(Protocol::Opaque);
    }
    match line_end {
        // A control byte in a line not yet ended: no request line to a strict
        // server, and most binary protocols (LDAP's BER, say) look like this,
        // so opaque at once; but Python's server takes any byte in a target,
        // so after a standard method it decides nothing before the line ends
        // (deciding would carry the rest raw, the headers after it too).
        None if !line[method_len..].iter().all(|&b| is_line_byte(b))
            && !standard_method(&line[..method_len]) =>
        {
            Some(Protocol::Opaque)
        }
        // A request line longer than detection reads, or a method as long:
        // servers (Go's, hyper's) take a method of any length, so even a run
        // of letters with no space may yet be a request. A client-first
        // stream that opens with 8 KiB of letters and digits alone is carried
        // as HTTP, then: declare its port opaque.
        None => full.then_some(Protocol::Http1),
        Some(_) => {
            // As Python's server splits it: a method, a target and a version
            // (the last word, however spelled) is a request with headers to
            // come. So is `GET` and a target without a version: HTTP/0.9, yet
            // Python reads headers after it too, whatever the target (and our
            // server refuses it, 400); any other line without a version is not
            // a request, nor is a line that merely mentions `HTTP/` (a log
            // line, a metric).
            let words: Vec<&[u8]> = line[method_len..]
                .split(|&b| is_space(b))
                .filter(|w| !w.is_empty())
                .collect();
            let versioned = words.len() >= 2 && words.last().is_some_and(|v| is_version(v));
            let http09 = words.len() == 1 && &line[..method_len] == b"GET";
            Some(if versioned || http09 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            })
        }
    }
}

/// What the bytes of a stream carried as opaque have become, as far as a
/// lenient server would read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// A request line that follows control bytes: Netty would read it.
    Request,
    /// Never a request.
    NotARequest,
    /// Control bytes, and perhaps the start of a line after them.
    Undecided,
}

/// `classify` takes a stream that opens with control bytes for opaque at
/// once, unless a whole request line follows them (binary protocols open so,
/// and waiting on each would make them HTTP at the timeout). A client that
/// pauses after its control bytes, or after the start of its line, would
/// then have its request line, and a forged `strait-client-id` after it,
/// reach an app that skips them (Netty). This reads such a stream's bytes as
/// they come, for as long as that can happen.
#[derive(Debug)]
pub struct OpeningWatch {
    state: Watch,
    max_bytes: usize,
}

#[derive(Debug)]
enum Watch {
    /// Whitespace so far.
    Spaces,
    /// Whitespace and controls, at least one control: as many as come, for
    /// Netty skips them all, and none kept.
    Controls,
    /// The line after them, up to `max_bytes`.
    Line(BytesMut),
}

impl OpeningWatch {
    pub fn new(max_bytes: usize) -> Self {
        OpeningWatch {
            state: Watch::Spaces,
            max_bytes,
        }
    }

    /// The stream's next bytes: what it has become with them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Opening {
        loop {
            match &mut self.state {
                Watch::Spaces => {
                    let n = bytes.iter().take_while(|&&b| is_space(b)).count();
                    bytes = &bytes[n..];
                    let Some(&b) = bytes.first() else {
                        return Opening::Undecided;
                    };
                    if !skipped_before_request(b) {
                        // Detection saw the line's own start, and decided.
                        return Opening::NotARequest;
                    }
                    self.state = Watch::Controls;
                }
                Watch::Controls => {
                    let n = bytes
                        .iter()
                        .take_while(|&&b| skipped_before_request(b))
                        .count();
                    bytes = &bytes[n..];
                    if bytes.is_empty() {
                        return Opening::Undecided;
                    }
                    self.state = Watch::Line(BytesMut::new());
                }
                Watch::Line(line) => {
                    let room = self.max_bytes.saturating_sub(line.len());
                    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    return judge_line(line, self.max_bytes);
                }
            }
        }
    }
}

/// A line that follows control bytes, as much of it as has come, as Netty
/// would read it.
fn judge_line(line: &[u8], max_bytes: usize) -> Opening {
    let read = classify_as(line, max_bytes, Reader::Netty);
    if line.contains(&b'\n') {
        return if read == Some(Protocol::Http1) {
            Opening::Request
        } else {
            Opening::NotARequest
        };
    }
    match read {
        Some(Protocol::Opaque) => Opening::NotARequest,
        // Still undecided with all detection reads: HTTP to detection, and
        // perhaps a request to a server whose line limit is longer.
        _ if line.len() >= max_bytes => Opening::Request,
        _ => Opening::Undecided,
    }
}

/// Whitespace as the most lenient servers split a request line on it
/// (Python's `str.split` of the line decoded as Latin-1 included).
fn is_space(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0
    )
}

/// What Netty skips before a request line: whitespace, and the ISO controls
/// (0x00 to 0x1f, 0x7f to 0x9f).
fn skipped_before_request(b: u8) -> bool {
    is_space(b) || b < 0x20 || (0x7f..=0x9f).contains(&b)
}

/// A request line's last word as some server reads it for a version: any
/// spelling after `HTTP/` (Python's), or any `NAME/digits.digits` (Netty's
/// `HttpVersion.valueOf`, which takes `RTSP/1.0` and the like).
fn is_version(v: &[u8]) -> bool {
    if v.len() >= 5 && v[..5].eq_ignore_ascii_case(b"HTTP/") {
        return true;
    }
    let Some(slash) = v.iter().rposition(|&b| b == b'/') else {
        return false;
    };
    let number = &v[slash + 1..];
    let Some(dot) = number.iter().position(|&b| b == b'.') else {
        return false;
    };
    let digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
    slash > 0 && digits(&number[..dot]) && digits(&number[dot + 1..])
}

/// A byte that some server takes in a request line after the method: any but
/// the controls (lenient ones take bytes above 0x7f in a target).
fn is_line_byte(b: u8) -> bool {
    is_space(b) || matches!(b, 0x21..=0x7e | 0x80..=0xff)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One of HTTP's standard methods: followed by a space, the start of a
/// request whatever bytes come after.
fn standard_method(method: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    ];
    METHODS.contains(&method)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_request_lines_and_prefaces() {
        let m = 8192;
        assert_eq!(classify(b"GET / HTTP/1.1\r\n", m), Some(Protocol::Http1));
        assert_eq!(
            classify(b"POST /x?y=1 HTTP/1.0\n", m),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HT", m), None);
        assert_eq!(classify(H2_PREFACE, m), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10], m), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00", m), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n", m), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / SPDY/3\r\n", m), Some(Protocol::Opaque));
        // Servers take a method of any length.
        assert_eq!(classify(&[b'A'; 9000], m), Some(Protocol::Http1));
    }

    #[test]
    fn requests_an_app_would_parse_are_http() {
        let m = 8192;
        // Empty lines before the request line, which servers skip.
        assert_eq!(
            classify(b"\r\n\r\nGET / HTTP/1.1\r\n", m),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\r\n", m), None);
        assert_eq!(classify(&b"\r\n".repeat(5000), m), Some(Protocol::Http1));
        // Bytes above 0x7f in a target: taken by lenient servers, so undecided
        // until the line ends, as any other.
        assert_eq!(classify(b"GET /\x80", m), None);
        assert_eq!(
            classify(b"GET /\x80 HTTP/1.1\r\n", m),
            Some(Protocol::Http1)
        );
        // A request line longer than detection reads.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(classify(&long, m), Some(Protocol::Http1));
        assert_eq!(classify(&long[..4000], m), None);
        // Bytes no request line holds decide at once (LDAP's anonymous bind,
        // in BER), unless a standard method came first, after which a lenient
        // server may take them in a target.
        assert_eq!(classify(b"AB \x00\x01", m), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"0\x0c\x02\x01\x01\x60\x07\x02\x01\x03\x04\x00\x80\x00", m),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"AB\x00\x01", m), Some(Protocol::Opaque));
        // Lines lenient servers read as requests with headers, and strict
        // ones refuse: HTTP, for ours to refuse.
        for line in [
            &b"GET\t/ HTTP/1.1\r\n"[..],
            b"GET\t/\tHTTP/1.1\r\n",
            b" \tGET / HTTP/1.1\r\n",
            b"GET  /  HTTP/1.1\r\n",
            b"GET / HTTP/1.10\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / http/1.1\r\n",
            b"GET\x0b/ HTTP/1.1\n",
            // Netty skips every control byte before the line, and takes any
            // `NAME/d.d` for a version.
            b"\x00GET /admin HTTP/1.1\r\n",
            b"\x01\x7f\x85GET / HTTP/1.1\r\n",
            b"GET /admin RTSP/1.0\r\n",
            b"GET / X/10.2\r\n",
        ] {
            assert_eq!(classify(line, m), Some(Protocol::Http1), "{line:?}");
        }
        // No version: HTTP/0.9, headers after which Python's server reads
        // (a forged `strait-client-id` among them), so HTTP, for ours to
        // refuse. Other lines without a version are not requests.
        assert_eq!(classify(b"GET /\r\n", m), Some(Protocol::Http1));
        assert_eq!(
            classify(b"GET /x\r\nstrait-client-id: a\r\n\r\n", m),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"SET key value\r\n", m), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET a b\r\n", m), Some(Protocol::Opaque));
        // Whatever the target: Python's server takes `GET x` too (Redis's
        // inline `GET key` on a port not declared opaque is HTTP, then).
        assert_eq!(classify(b"GET key\r\n", m), Some(Protocol::Http1));
        // A control byte before the line ends, after a standard method: a
        // lenient server still takes it once the line is complete, so the
        // line decides, whatever the target.
        assert_eq!(classify(b"GET /\x7f", m), None);
        assert_eq!(classify(b"GET /\x01", m), None);
        assert_eq!(classify(b"GET \x01/api", m), None);
        assert_eq!(classify(b"OPTIONS *\x01", m), None);
        assert_eq!(classify(b"GET x\x01", m), None);
        assert_eq!(
            classify(b"GET /\x7f HTTP/1.1\r\n", m),
            Some(Protocol::Http1)
        );
        // Lines that mention a version without being requests: a log line
        // shipped over TCP, a metric, a cache key.
        for line in [
            &b"10.0.0.1 - - [30/Nov/2026] \"GET /x HTTP/1.1\" 200 512\n"[..],
            b"http_requests proto=\"HTTP/1.1\" 1\n",
            b"get HTTP/a\r\n",
            b"SET k HTTP/1.1 EX 10\r\n",
            b"SET k v/1.2.3\r\n",
            b"SET k /1.2\r\n",
            b"SET k v/1.\r\n",
        ] {
            assert_eq!(classify(line, m), Some(Protocol::Opaque), "{line:?}");
        }
        // Binary protocols open with control bytes: opaque at once, unless
        // a whole request line follows them (which Netty would read).
        for binary in [
            &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
            b"\x04\x00\x00\x01\x05\x00\x00\x00\x00",
            b"\x05\x01\x00",
            b"\x00\x00\x00\x05hello",
            b"\x00GET / HT",
        ] {
            assert_eq!(classify(binary, m), Some(Protocol::Opaque), "{binary:?}");
        }
    }

    #[test]
    fn a_request_line_after_control_bytes_is_found_however_late() {
        let m = 8192;
        // What detection read: opaque at once.
        assert_eq!(classify(b"\x00GET / HT", m), Some(Protocol::Opaque));
        // What the stream then became, fed whole and a byte at a time.
        for (bytes, want) in [
            (&b"\x00"[..], Opening::Undecided),
            (b"\x00\x01 \r\n", Opening::Undecided),
            (b"\x00GET / HT", Opening::Undecided),
            (b"\x00GET / HTTP/1.1", Opening::Undecided),
            (
                b"\x00GET / HTTP/1.1\r\nstrait-client-id: x\r\n",
                Opening::Request,
            ),
            (b" \x00\x85G@T / HTTP/1.1\n", Opening::Request),
            (b"\x00\x00\x00\x05hello", Opening::Undecided),
            (b"\x00\x00\x00\x05hello\x00", Opening::NotARequest),
            (b"\x00\x00\x00\x05hello world\n", Opening::NotARequest),
            // Detection decided these from their first byte.
            (b"GET / HT", Opening::NotARequest),
            (b"hello\x00", Opening::NotARequest),
            // PostgreSQL's SSLRequest and startup message.
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Opening::NotARequest),
            (
                b"\x00\x00\x00\x4a\x00\x03\x00\x00user\x00postgres\x00",
                Opening::NotARequest,
            ),
        ] {
            assert_eq!(OpeningWatch::new(m).feed(bytes), want, "{bytes:?}");
            let mut w = OpeningWatch::new(m);
            let mut last = Opening::Undecided;
            for b in bytes {
                if last != Opening::Undecided {
                    break;
                }
                last = w.feed(std::slice::from_ref(b));
            }
            assert_eq!(last, want, "{bytes:?}, a byte at a time");
        }
        // However many controls come first: none is kept, and the line is
        // judged when it comes.
        let mut w = OpeningWatch::new(m);
        for _ in 0..10 {
            assert_eq!(w.feed(&[0u8; 4096]), Opening::Undecided);
        }
        assert_eq!(w.feed(b"GET / HTTP/1.1\r\n"), Opening::Request);
        // A line still undecided with all detection reads: taken for a request.
        let mut w = OpeningWatch::new(m);
        assert_eq!(w.feed(&[0u8; 100]), Opening::Undecided);
        assert_eq!(w.feed(&vec![b'a'; m]), Opening::Request);
    }

    /// Netty takes any bytes but whitespace and controls for a method, and
    /// reads `PRI * HTTP/2.0` as a request: after control bytes, on a stream
    /// carried as opaque, such a line is ended. Detection itself keeps to
    /// token methods, or unframed text would wait for the timeout and be
    /// answered 400.
    #[test]
    fn after_control_bytes_a_line_is_read_as_netty_reads_it() {
        let m = 8192;
        for line in [
            &b"\x00G@T / HTTP/1.1\r\n"[..],
            b"\x00{GET} /x HTTP/1.1\n",
            b"\x00\xe9 / HTTP/1.0\n",
            b"\x00PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(classify(line, m), Some(Protocol::Opaque), "{line:?}");
            assert_eq!(
                OpeningWatch::new(m).feed(line),
                Opening::Request,
                "{line:?}"
            );
        }
        // Unframed text is opaque at once, not waited on.
        for text in [
            &b"{\"id\":1,\"method\":\"x\"}"[..],
            b"<?xml version='1.0'?><stream:stream to='example.com' version='1.0'>",
        ] {
            assert_eq!(classify(text, m), Some(Protocol::Opaque), "{text:?}");
        }
        // Binary and text protocols that open with such bytes stay opaque.
        for line in [
            &b"*1\r\n$4\r\nPING\r\n"[..],
            b"?\x00\x00\x00\xd4\x07\x00\x00",
            b"{\"op\":\"sub\"}\n",
            b"<?xml version='1.0'?>\n",
        ] {
            assert_eq!(classify(line, m), Some(Protocol::Opaque), "{line:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_of_a_request_then_a_pause_is_http() {
        for (sent, protocol) in [
            (&b"G"[..], Protocol::Http1),
            (b"GET /x?a=", Protocol::Http1),
            (&H2_PREFACE[..6], Protocol::Http2),
        ] {
            let (mut client, mut server) = tokio::io::duplex(64);
            client.write_all(sent).await.unwrap();
            let d = detect(&mut server, Duration::from_millis(300), 8192)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.protocol, protocol, "{sent:?}");
            assert_eq!(&d.prefix[..], sent);
        }
    }

    #[tokio::test]
    async fn the_start_of_a_request_then_eof_is_carried_as_it_is() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /x").await.unwrap();
        drop(client);
        let d = detect(&mut server, Duration::from_secs(10), 8192)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_opaque_after_the_bounded_wait() {
        let (_client, mut server) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let d = detect(&mut server, Duration::from_millis(300), 8192)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.protocol, Protocol::Opaque);
        assert!(d.prefix.is_empty());
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn http_split_across_reads_is_detected_without_waiting() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /a HT").await.unwrap();
        let task =
            tokio::spawn(async move { detect(&mut server, Duration::from_secs(10), 8192).await });
        tokio::task::yield_now().await;
        client.write_all(b"TP/1.1\r\nHost: x\r\n").await.unwrap();
        let d = task.await.unwrap().unwrap().unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(&d.prefix[..], b"GET /a HTTP/1.1\r\nHost: x\r\n");
    }

    #[tokio::test]
    async fn client_that_closes_at_once_is_none() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(
            detect(&mut server, Duration::from_secs(1), 8192)
                .await
                .unwrap()
                .is_none()
        );
    }
}
