//! Follows the requests of an HTTP/1 connection through its bytes as they are
//! read, so that every head is scanned, pipelined ones and those read in the
//! same buffer as the body before them included. A head's framing fields and
//! line ends are noted; its body is skipped by its Content-Length or chunked
//! framing, as hyper reads it. hyper's own parse stays the one that counts:
//! where the two could part (framing hyper refuses), the scan stops.

/// The head names Content-Length.
pub const CONTENT_LENGTH: u8 = 1;
/// The head names Transfer-Encoding.
pub const TRANSFER_ENCODING: u8 = 2;
/// A line of the head ends in LF alone.
pub const BARE_LF: u8 = 4;

#[derive(Debug, Default)]
pub struct RequestScan {
    stage: Stage,
    /// Heads completed so far.
    heads: usize,
}

#[derive(Debug)]
enum Stage {
    Head(HeadScan),
    /// Bytes of a Content-Length body still to come.
    Body(u64),
    Chunked(Chunk),
    /// Framing hyper would refuse (and close on): nothing after it is read.
    Lost,
}

impl Default for Stage {
    fn default() -> Self {
        Stage::Head(HeadScan::default())
    }
}

impl RequestScan {
    /// Scans the next bytes of the connection; `head(n, flags)` is called for
    /// each head completed, `n` counting from 0.
    pub fn feed(&mut self, mut bytes: &[u8], mut head: impl FnMut(usize, u8)) {
        while !bytes.is_empty() {
            match &mut self.stage {
                Stage::Head(h) => {
                    let used = h.feed(bytes);
                    bytes = &bytes[used..];
                    if h.done {
                        head(self.heads, h.found);
                        self.heads += 1;
                        self.stage = h.body();
                    }
                }
                Stage::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.stage = Stage::default();
                    }
                }
                Stage::Chunked(c) => {
                    let (used, next) = c.feed(bytes);
                    bytes = &bytes[used..];
                    match next {
                        Some(ChunkEnd::Done) => self.stage = Stage::default(),
                        Some(ChunkEnd::Invalid) => self.stage = Stage::Lost,
                        None => {}
                    }
                }
                Stage::Lost => return,
            }
        }
    }
}

/// One request head: its field names as they arrive, however split, up to
/// the blank line that ends it, and the values of its framing fields.
#[derive(Debug, Default)]
struct HeadScan {
    /// Lower-cased start of the current line, up to the longest name we look for.
    name: [u8; 18],
    len: usize,
    /// The current line is past its name (or too long to be one we look for).
    in_value: bool,
    /// The framing field whose value the current line holds, if any.
    field: u8,
    /// The framing field's value as read so far.
    value: Value,
    done: bool,
    /// Bytes seen on the current line, to recognise the empty line.
    line_bytes: usize,
    /// The previous byte was CR.
    cr: bool,
    /// The request line has begun: empty lines before it are skipped, as
    /// hyper skips them, rather than taken for the end of the head.
    started: bool,
    found: u8,
    /// Content-Length's value, once every line of it agreed.
    length: Option<u64>,
    /// A Content-Length that is not one agreed number.
    length_invalid: bool,
    /// The last item of the last Transfer-Encoding is `chunked`.
    chunked_last: bool,
}

/// A framing field's value as read so far, in constant space however long:
/// Content-Length's number, or how much of `chunked` the current
/// Transfer-Encoding item has matched. `ended`: whitespace followed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Value {
    /// Only whitespace so far.
    #[default]
    Blank,
    Number {
        n: u64,
        ended: bool,
    },
    Coding {
        matched: u8,
        ended: bool,
    },
    /// Neither a length nor `chunked`.
    Other,
}

const CHUNKED: &[u8; 7] = b"chunked";

impl HeadScan {
    /// Reads up to the end of the head; returns the bytes used.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        for (i, &b) in bytes.iter().enumerate() {
            let cr = std::mem::replace(&mut self.cr, b == b'\r');
            match b {
                b'\n' => {
                    // hyper skips empty lines before a request line, however
                    // they end.
                    if !cr && self.started {
                        self.found |= BARE_LF;
                    }
                    if self.field != 0 {
                        self.end_value();
                    }
                    let empty = self.line_bytes == 0
                        || (self.line_bytes == 1 && self.len == 1 && self.name[0] == b'\r');
                    self.len = 0;
                    self.line_bytes = 0;
                    self.in_value = false;
                    self.field = 0;
                    if empty && self.started {
                        self.done = true;
                        return i + 1;
                    }
                }
                _ => {
                    self.line_bytes += 1;
                    if b != b'\r' {
                        self.started = true;
                    }
                    if self.in_value {
                        if self.field != 0 {
                            self.value_byte(b);
                        }
                        continue;
                    }
                    if b == b':' {
                        self.field = match &self.name[..self.len] {
                            b"content-length" => CONTENT_LENGTH,
                            b"transfer-encoding" => TRANSFER_ENCODING,
                            _ => 0,
                        };
                        self.found |= self.field;
                        self.in_value = true;
                        self.value = Value::Blank;
                    } else if self.len < self.name.len() {
                        self.name[self.len] = b.to_ascii_lowercase();
                        self.len += 1;
                    } else {
                        self.in_value = true;
                    }
                }
            }
        }
        bytes.len()
    }

    /// One byte of a framing field's value. httparse trims the value, and
    /// hyper reads Content-Length as digits only and a body as chunked when
    /// the last comma-separated coding is `chunked`, in any case.
    fn value_byte(&mut self, b: u8) {
        use Value::*;
        let ws = matches!(b, b' ' | b'\t' | b'\r');
        self.value = match (self.value, self.field) {
            (v, _) if ws => match v {
                Number { n, .. } => Number { n, ended: true },
                Coding { matched, .. } => Coding {
                    matched,
                    ended: true,
                },
                v => v,
            },
            (_, TRANSFER_ENCODING) if b == b',' => Blank,
            (Blank, CONTENT_LENGTH) if b.is_ascii_digit() => Number {
                n: u64::from(b - b'0'),
                ended: false,
            },
            (Number { n, ended: false }, _) if b.is_ascii_digit() => n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .map_or(Other, |n| Number { n, ended: false }),
            (Blank, TRANSFER_ENCODING) if b.eq_ignore_ascii_case(&CHUNKED[0]) => Coding {
                matched: 1,
                ended: false,
            },
            (
                Coding {
                    matched,
                    ended: false,
                },
                _,
            ) if (matched as usize) < CHUNKED.len()
                && b.eq_ignore_ascii_case(&CHUNKED[matched as usize]) =>
            {
                Coding {
                    matched: matched + 1,
                    ended: false,
                }
            }
            _ => Other,
        };
    }

    /// A framing field's line is whole.
    fn end_value(&mut self) {
        if self.field == TRANSFER_ENCODING {
            self.chunked_last = matches!(self.value, Value::Coding { matched: 7, .. });
            return;
        }
        match (self.value, self.length) {
            (Value::Number { n, .. }, None) => self.length = Some(n),
            (Value::Number { n, .. }, Some(m)) if n == m => {}
            _ => self.length_invalid = true,
        }
    }

    /// What follows the head, as hyper frames a request's body.
    fn body(&self) -> Stage {
        if self.found & TRANSFER_ENCODING != 0 {
            return if self.chunked_last {
                Stage::Chunked(Chunk::default())
            } else {
                Stage::Lost
            };
        }
        match (self.found & CONTENT_LENGTH != 0, self.length) {
            (false, _) => Stage::default(),
            _ if self.length_invalid => Stage::Lost,
            (true, Some(0)) => Stage::default(),
            (true, Some(n)) => Stage::Body(n),
            (true, None) => Stage::Lost,
        }
    }
}

/// Where a chunked body is, as hyper's decoder reads it.
#[derive(Debug, Default)]
enum Chunk {
    /// Before a chunk's size.
    #[default]
    Start,
    Size {
        size: u64,
    },
    SizeSpace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line or the final CRLF.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

enum ChunkEnd {
    Done,
    Invalid,
}

impl Chunk {
    /// Reads chunked framing; returns the bytes used, and how the body ended
    /// if it did.
    fn feed(&mut self, bytes: &[u8]) -> (usize, Option<ChunkEnd>) {
        let mut i = 0;
        while i < bytes.len() {
            if let Chunk::Data(left) = self {
                let n = (*left).min((bytes.len() - i) as u64);
                *left -= n;
                i += n as usize;
                if *left == 0 {
                    *self = Chunk::DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
            *self = match (&*self, b) {
                (Chunk::Start, _) => match hex(b) {
                    Some(d) => Chunk::Size { size: d },
                    None => return (i, Some(ChunkEnd::Invalid)),
                },
                (Chunk::Size { size }, _) if hex(b).is_some() => {
                    match size.checked_mul(16).zip(hex(b)) {
                        Some((s, d)) => Chunk::Size { size: s + d },
                        None => return (i, Some(ChunkEnd::Invalid)),
                    }
                }
                (Chunk::Size { size } | Chunk::SizeSpace { size }, b' ' | b'\t') => {
                    Chunk::SizeSpace { size: *size }
                }
                (
                    Chunk::Size { size } | Chunk::SizeSpace { size } | Chunk::Extension { size },
                    b';',
                ) => Chunk::Extension { size: *size },
                (
                    Chunk::Size { size } | Chunk::SizeSpace { size } | Chunk::Extension { size },
                    b'\r',
                ) => Chunk::SizeLf { size: *size },
                (Chunk::Extension { .. }, b'\n') => return (i, Some(ChunkEnd::Invalid)),
                (Chunk::Extension { size }, _) => Chunk::Extension { size: *size },
                (Chunk::SizeLf { size: 0 }, b'\n') => Chunk::EndCr,
                (Chunk::SizeLf { size }, b'\n') => Chunk::Data(*size),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Start,
                (Chunk::EndCr, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
                (Chunk::EndLf, b'\n') => return (i, Some(ChunkEnd::Done)),
                _ => return (i, Some(ChunkEnd::Invalid)),
            };
        }
        (i, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head of `bytes`, fed in two parts split at every place.
    fn heads(bytes: &[u8]) -> Vec<u8> {
        let whole = {
            let mut s = RequestScan::default();
            let mut got = Vec::new();
            s.feed(bytes, |n, f| {
                assert_eq!(n, got.len());
                got.push(f);
            });
            got
        };
        for split in 1..bytes.len() {
            let mut s = RequestScan::default();
            let mut got = Vec::new();
            s.feed(&bytes[..split], |_, f| got.push(f));
            s.feed(&bytes[split..], |_, f| got.push(f));
            assert_eq!(got, whole, "split at {split}");
        }
        whole
    }

    #[test]
    fn a_head_s_framing_fields_and_line_ends_are_found_however_split() {
        assert_eq!(
            heads(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            [CONTENT_LENGTH | TRANSFER_ENCODING]
        );
        assert_eq!(
            heads(b"GET / HTTP/1.1\r\nx-a: content-length:\r\n\r\n"),
            [0]
        );
        assert_eq!(
            heads(b"POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\nx"),
            [CONTENT_LENGTH]
        );
        assert_eq!(heads(b"GET / HTTP/1.1\r\nHost: a\nx: b\r\n\r\n"), [BARE_LF]);
        // Empty lines before the request line do not end the head.
        assert_eq!(
            heads(b"\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
            [CONTENT_LENGTH | TRANSFER_ENCODING]
        );
        assert_eq!(
            heads(b"\r\nGET / HTTP/1.1\r\nhost: a\nx: 1\r\n\r\n"),
            [BARE_LF]
        );
    }

    /// Requests sent one behind the other, in one read or across many: each
    /// head is scanned, and no body is taken for a head.
    #[test]
    fn every_pipelined_head_is_scanned_past_the_bodies_before_it() {
        let two = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(heads(two), [0, CONTENT_LENGTH | TRANSFER_ENCODING]);
        let bare = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\nx: 1\r\n\r\n";
        assert_eq!(heads(bare), [0, BARE_LF]);
        // A body of lines ended by LF alone, and naming framing fields, is
        // skipped by its length.
        let body = "transfer-encoding: x\ncontent-length: 1\n\n";
        let sized = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(heads(sized.as_bytes()), [CONTENT_LENGTH, 0]);
        // A chunked body, with an extension, spaces after a size and a
        // trailer, likewise.
        let chunk = "\nContent-Length: 9\r\n\r\n0123456789";
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5;x=y\r\nab\ncd\r\n{:X} \r\n{chunk}\r\n0\r\nx-t: content-length\r\n\r\nGET / HTTP/1.1\r\nHost: a\nb: c\r\n\r\n",
            chunk.len()
        );
        assert_eq!(heads(chunked.as_bytes()), [TRANSFER_ENCODING, BARE_LF]);
        // The same length named twice is one length.
        let twice = b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length:  3 \r\n\r\na\nbGET / HTTP/1.1\r\n\r\n";
        assert_eq!(heads(twice), [CONTENT_LENGTH, 0]);
        // However long a framing value, as hyper reads it.
        let zeros = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}1\r\n\r\nxGET / HTTP/1.1\r\nHost: a\nx: 1\r\n\r\n",
            "0".repeat(40)
        );
        assert_eq!(heads(zeros.as_bytes()), [CONTENT_LENGTH, BARE_LF]);
        let spaced = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: {}ChunKed{}\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\nx: 1\r\n\r\n",
            " ".repeat(30),
            "\t ".repeat(30)
        );
        assert_eq!(heads(spaced.as_bytes()), [TRANSFER_ENCODING, BARE_LF]);
        // Empty lines between requests, however they end, are skipped as
        // hyper skips them: not the next head's fault.
        let stray = b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\n\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(heads(stray), [CONTENT_LENGTH, 0]);
    }

    /// Framing hyper refuses ends the scan: what it would call the next
    /// head is not guessed at.
    #[test]
    fn framing_hyper_refuses_stops_the_scan() {
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3 4\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(heads(bad).len(), 1, "{}", String::from_utf8_lossy(bad));
        }
    }
}
