//! A request body that can be sent again: it streams to the first attempt while
//! keeping a copy of what passed, up to a limit. A retry replays the copy, so it
//! is possible only when the whole body fitted, or when the request was never
//! sent (no connection took it) and what was read of the body fitted: the copy
//! goes first, then the rest of the body. Larger or streaming bodies are never
//! held back: past the limit the copy is dropped and the body streams on
//! untouched.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::http::{BoxBody, BoxError};

/// What a chunk of the copy costs at least (its slot and the buffer it keeps).
const CHUNK_COST: usize = 256;

/// Why a body cannot be replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReplayable {
    /// Larger than the limit.
    TooLarge,
    /// Partly sent and not finished when the response came (a streaming request).
    Unfinished,
}

impl NotReplayable {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReplayable::TooLarge => "body_too_large",
            NotReplayable::Unfinished => "body_unfinished",
        }
    }
}

#[derive(Debug)]
struct State {
    /// The original body; taken by nobody, polled under the lock by whichever
    /// attempt reaches the end of the copy.
    rest: BoxBody,
    copy: Vec<Bytes>,
    copied: usize,
    /// What the copy costs: its bytes, and at least `CHUNK_COST` a chunk, so a
    /// body sent a byte at a time cannot hold far more memory than the limit.
    cost: usize,
    limit: usize,
    /// The copy was dropped (the body outgrew the limit).
    overflow: bool,
    /// Some of the body was read.
    started: bool,
    /// The original body ended (its trailers, if any, are in `trailers`).
    complete: bool,
    /// Told when it ended (`end_noted`).
    end: Option<BodyEnd>,
    trailers: Option<HeaderMap>,
}

impl State {
    fn completed(&mut self) {
        self.complete = true;
        if let Some(e) = &self.end {
            e.ended();
        }
    }
}

/// When a request's body ended, once it has: an attempt the route's
/// `backendRequest` timeout gives up on is the endpoint's failure only if the
/// endpoint had the whole request for long enough.
#[derive(Clone, Debug, Default)]
pub struct BodyEnd(Arc<std::sync::OnceLock<tokio::time::Instant>>);

impl BodyEnd {
    pub fn at(&self) -> Option<tokio::time::Instant> {
        self.0.get().copied()
    }

    /// The body ended now (once: later calls change nothing).
    pub fn ended(&self) {
        let _ = self.0.set(tokio::time::Instant::now());
    }
}

pub struct ReplayBody {
    /// None for a body that had ended before it started (a GET's): nothing to
    /// copy, so nothing is allocated or locked for it.
    state: Option<Arc<Mutex<State>>>,
    /// Index of the next chunk of the copy this attempt sends.
    pos: usize,
    trailers_sent: bool,
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .finish()
    }
}

impl ReplayBody {
    pub fn new(body: BoxBody, limit: usize) -> Self {
        if body.is_end_stream() {
            return ReplayBody {
                state: None,
                pos: 0,
                trailers_sent: true,
            };
        }
        // Known to be too large: no copy is ever started.
        let overflow = body.size_hint().lower() > limit as u64;
        ReplayBody {
            state: Some(Arc::new(Mutex::new(State {
                rest: body,
                copy: Vec::new(),
                copied: 0,
                cost: 0,
                limit,
                overflow,
                started: false,
                complete: false,
                end: None,
                trailers: None,
            }))),
            pos: 0,
            trailers_sent: false,
        }
    }

    /// What will say when the body ended; `None` for one that had ended
    /// before it started.
    pub fn end_noted(&self) -> Option<BodyEnd> {
        let mut s = self.state()?;
        Some(s.end.get_or_insert_with(BodyEnd::default).clone())
    }

    /// Known from its declared length to be over the limit: no copy of it is
    /// kept, so only a body never read can be sent again.
    pub fn too_large(&self) -> bool {
        self.state().is_some_and(|s| s.overflow)
    }

    fn state(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        self.state
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether another attempt may send this body from the start: one whose
    /// body ended within the limit; or, when the last attempt surely is gone
    /// (`not_sent`: it never had a connection), one not read yet or read only
    /// within the limit (the copy has what was read, the rest follows it).
    /// Otherwise the last attempt's connection may still read the body, and
    /// two attempts would share it.
    pub fn replayable(&self, not_sent: bool) -> Result<(), NotReplayable> {
        let Some(s) = self.state() else {
            return Ok(());
        };
        if (not_sent && !s.started) || ((not_sent || s.complete) && !s.overflow) {
            Ok(())
        } else if s.overflow {
            Err(NotReplayable::TooLarge)
        } else {
            Err(NotReplayable::Unfinished)
        }
    }

    /// A new attempt, from the start of the body.
    pub fn again(&self) -> Self {
        ReplayBody {
            state: self.state.clone(),
            pos: 0,
            trailers_sent: self.state.is_none(),
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(state) = &this.state else {
            return Poll::Ready(None);
        };
        // No other handle: no attempt can follow this one (the retry layer
        // dropped its copy of the request at the answer), so what it sends
        // on (a long-lived stream's messages) need not be kept.
        let alone = Arc::strong_count(state) == 1;
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(chunk) = s.copy.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.complete {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        s.started = true;
        let frame = match Pin::new(&mut s.rest).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.completed();
                this.trailers_sent = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(f))) => f,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                if !s.overflow {
                    let cost = data.len().max(CHUNK_COST);
                    if alone || s.cost + cost > s.limit {
                        // Too large to replay, or no attempt can follow:
                        // stop copying, free the copy.
                        s.overflow = true;
                        s.copy = Vec::new();
                        this.pos = 0;
                    } else {
                        s.copied += data.len();
                        s.cost += cost;
                        // Copied, not shared: a chunk shares the buffer it
                        // was read into, and a few bytes kept would hold the
                        // whole of it (8 KiB and more a read), far past what
                        // the limit counts.
                        s.copy.push(Bytes::copy_from_slice(&data));
                        this.pos = s.copy.len();
                    }
                }
                Frame::data(data)
            }
            Err(frame) => match frame.into_trailers() {
                Ok(t) => {
                    s.trailers = Some(t.clone());
                    s.completed();
                    this.trailers_sent = true;
                    Frame::trailers(t)
                }
                Err(_) => return Poll::Ready(None),
            },
        };
        if !s.complete && s.rest.is_end_stream() {
            // The data just sent was the last frame: no trailers follow.
            s.completed();
            this.trailers_sent = true;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let Some(s) = self.state() else {
            return true;
        };
        self.pos >= s.copy.len() && s.complete && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let Some(s) = self.state() else {
            return SizeHint::with_exact(0);
        };
        if s.complete && !s.overflow {
            return SizeHint::with_exact(s.copied as u64);
        }
        if !s.started {
            return s.rest.size_hint();
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streamed(chunks: &[&'static str]) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        crate::http::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_small_body_is_sent_again_whole() {
        let first = ReplayBody::new(streamed(&["ab", "cd"]), 1024);
        let second = first.again();
        let got = first.collect().await.unwrap().to_bytes();
        assert_eq!(got, "abcd");
        assert_eq!(second.replayable(false), Ok(()));
        let again = second.collect().await.unwrap().to_bytes();
        assert_eq!(again, "abcd");
    }

    /// Once no attempt can follow (the retry layer let its copy of the
    /// request go at the answer), a long-lived stream's messages are not
    /// kept: a bidirectional call would otherwise hold up to the limit for
    /// its whole life.
    #[tokio::test]
    async fn nothing_is_kept_once_no_attempt_can_follow() {
        let chunks = ["0123456789"; 100];
        let mut first = ReplayBody::new(streamed(&chunks), 64 * 1024);
        let kept = first.again();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "0123456789");
        assert_eq!(
            first.state().unwrap().copy.len(),
            1,
            "kept while a retry may come"
        );
        drop(kept);
        while let Some(f) = first.frame().await {
            f.unwrap();
        }
        assert!(first.state().unwrap().copy.is_empty());
    }

    #[tokio::test]
    async fn the_copy_does_not_hold_the_buffers_its_chunks_were_read_into() {
        // As a connection's reads hand them out: a few bytes of a large buffer.
        let buffer = Bytes::from(vec![7u8; 64 * 1024]);
        let (start, end) = (
            buffer.as_ptr() as usize,
            buffer.as_ptr() as usize + buffer.len(),
        );
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(buffer.slice(0..10)))];
        drop(buffer);
        let body = crate::http::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let first = ReplayBody::new(body, 1024);
        let mut second = first.again();
        assert_eq!(first.collect().await.unwrap().to_bytes().len(), 10);
        let kept = second.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(kept, [7u8; 10][..]);
        let at = kept.as_ptr() as usize;
        assert!(
            !(start..end).contains(&at),
            "the copy shares the 64 KiB read"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_through_and_is_never_replayed() {
        let first = ReplayBody::new(streamed(&["abc", "def", "ghi"]), 600);
        let second = first.again();
        let got = first.collect().await.unwrap().to_bytes();
        assert_eq!(got, "abcdefghi");
        assert_eq!(second.replayable(false), Err(NotReplayable::TooLarge));
    }

    #[tokio::test]
    async fn trailers_are_sent_once_and_replayed() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = crate::http::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let first = ReplayBody::new(body, 1024);
        let second = first.again();
        let got = first.collect().await.unwrap();
        assert_eq!(got.trailers().map(|t| t.len()), Some(1));
        assert_eq!(got.to_bytes(), "ab");
        let again = second.collect().await.unwrap();
        assert_eq!(again.trailers().map(|t| t.len()), Some(1));
        assert_eq!(again.to_bytes(), "ab");
    }

    #[tokio::test]
    async fn a_body_never_read_can_always_be_sent() {
        let first = ReplayBody::new(crate::http::full(vec![7u8; 1000]), 4);
        let second = first.again();
        drop(first);
        assert_eq!(second.replayable(true), Ok(()));
        assert_eq!(second.replayable(false), Err(NotReplayable::TooLarge));
        assert_eq!(second.collect().await.unwrap().to_bytes().len(), 1000);
    }

    #[tokio::test]
    async fn a_body_read_in_part_before_its_connection_failed_is_sent_again_whole() {
        // The forwarder reads a first frame before an HTTP/1 pool connects.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        let body = crate::http::boxed(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let mut first = ReplayBody::new(body, 1024);
        let second = first.again();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        drop(first);
        // Had the connection taken it, it might still be reading it.
        assert_eq!(second.replayable(false), Err(NotReplayable::Unfinished));
        assert_eq!(second.replayable(true), Ok(()));
        tx.send(Ok(Frame::data(Bytes::from_static(b"cd"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn an_empty_body_is_sent_again_as_empty() {
        let first = ReplayBody::new(crate::http::empty(), 1024);
        assert!(first.state.is_none(), "nothing kept for an empty body");
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        let second = first.again();
        assert!(first.collect().await.unwrap().to_bytes().is_empty());
        assert_eq!(second.replayable(false), Ok(()));
        assert!(second.is_end_stream());
        assert!(second.collect().await.unwrap().to_bytes().is_empty());
    }

    #[tokio::test]
    async fn a_body_cut_short_by_the_response_is_not_replayed() {
        let (sender, body) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
        let body = crate::http::boxed(http_body_util::StreamBody::new(
            tokio_stream_shim::ReceiverStream::new(body),
        ));
        let mut first = ReplayBody::new(body, 1024);
        let second = first.again();
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "x");
        assert_eq!(second.replayable(false), Err(NotReplayable::Unfinished));
    }

    mod tokio_stream_shim {
        use std::pin::Pin;
        use std::task::{Context, Poll};
        pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);
        impl<T> ReceiverStream<T> {
            pub fn new(r: tokio::sync::mpsc::Receiver<T>) -> Self {
                ReceiverStream(r)
            }
        }
        impl<T> futures_util::Stream for ReceiverStream<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }
}
