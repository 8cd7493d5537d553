//! `/metrics` answers, for the proxy's and the controller's admin ports.
//! Encoding every series takes the time of many requests, and an admin port
//! answers other pods (the kubelet's probes and Prometheus come from other
//! addresses): a caller scraping without pause must not take the serving
//! thread's time, nor a core. So the text is written on a blocking thread, one encoding
//! at a time; scrapes asked while one is under way wait for the next and share
//! it; and encodings are spaced so that they take at most a tenth of the time.
//! No answer is older than its request: a scrape waits rather than being
//! served an encoding that began before it was asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Encodings take at most one part in this of the time: after one that took
/// `d`, the next starts no sooner than `d * (SPACING - 1)` after it ended.
const SPACING: u32 = 10;
/// The wait before an encoding, at most: one slowed down (its process held
/// back by a CPU limit) does not hold the next scrape past its timeout. So
/// an encoding longer than `MAX_WAIT / (SPACING - 1)` (111 ms) takes more
/// than a tenth of the time: `d / (d + 1 s)`.
const MAX_WAIT: Duration = Duration::from_secs(1);

type Encode = dyn Fn(String) -> String + Send + Sync;

pub struct Scrapes {
    encode: Arc<Encode>,
    /// Encodings started so far: a scrape shares an encoding numbered past
    /// what it read when asked (a clock may read the same twice).
    started: Arc<AtomicU64>,
    last: Arc<tokio::sync::Mutex<Last>>,
}

#[derive(Default)]
struct Last {
    /// The number of the encoding `text` is, 0 for none.
    number: u64,
    /// When the last encoding ended, and how long it took.
    ended: Option<Instant>,
    took: Duration,
    text: Bytes,
}

/// The encoding did not finish (it panicked, or the process is stopping).
/// What went wrong is logged, not told to the caller.
#[derive(Debug, thiserror::Error)]
#[error("the metrics could not be encoded")]
pub struct Failed;

impl Scrapes {
    /// `encode` appends the text to the string it is given (sized from the
    /// last encoding, allocated here rather than on the blocking thread).
    pub fn new(encode: impl Fn(String) -> String + Send + Sync + 'static) -> Self {
        Scrapes {
            encode: Arc::new(encode),
            started: Arc::default(),
            last: Arc::default(),
        }
    }

    /// The text of an encoding that started after this call.
    pub async fn scrape(&self) -> Result<Bytes, Failed> {
        let seen = self.started.load(Ordering::SeqCst);
        // Fair: scrapes are answered in the order they came.
        let last = self.last.clone().lock_owned().await;
        if last.number > seen {
            return Ok(last.text.clone());
        }
        // A task of its own, which holds the lock until the encoding is
        // done: a scrape given up (its caller gone) does not let the next
        // one start another encoding beside it.
        let encoding = tokio::spawn(encode(last, self.started.clone(), self.encode.clone()));
        encoding.await.map_err(|e| {
            tracing::warn!(error = %e, "metrics encoding failed");
            Failed
        })?
    }
}

/// Waits for the last encoding's share of the time to pass, encodes on a
/// blocking thread, and keeps the text for the scrapes waiting on `last`.
async fn encode(
    mut last: tokio::sync::OwnedMutexGuard<Last>,
    started: Arc<AtomicU64>,
    encode: Arc<Encode>,
) -> Result<Bytes, Failed> {
    if let Some(ended) = last.ended {
        tokio::time::sleep_until(ended + (last.took * (SPACING - 1)).min(MAX_WAIT)).await;
    }
    let number = started.fetch_add(1, Ordering::SeqCst) + 1;
    let at = Instant::now();
    let out = String::with_capacity(last.text.len() + last.text.len() / 4 + 1024);
    // Measured on the blocking thread: the time the encoding took, not the
    // time this task waited to be polled again.
    let done = tokio::task::spawn_blocking(move || {
        let at = std::time::Instant::now();
        let text = encode(out);
        (text, at.elapsed())
    })
    .await;
    match done {
        Ok((text, took)) => {
            *last = Last {
                number,
                ended: Some(Instant::now()),
                took,
                text: Bytes::from(text),
            };
            Ok(last.text.clone())
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics encoding failed");
            // Spaced as any other: failing encodings run back to back are
            // still work; the text kept is not shared (its number is old).
            last.ended = Some(Instant::now());
            last.took = at.elapsed();
            Err(Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting(work: Duration) -> (Arc<Scrapes>, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        let scrapes = Scrapes::new(move |mut out| {
            let i = count.fetch_add(1, Ordering::SeqCst) + 1;
            // The work an encoding does, on its own thread.
            std::thread::sleep(work);
            out.push_str(&format!("encodings {i}\n"));
            out
        });
        (Arc::new(scrapes), n)
    }

    /// Scrapes asked together share an encoding (two at most: the one under
    /// way when they came began before some of them were asked).
    #[tokio::test]
    async fn scrapes_asked_together_share_an_encoding() {
        let (scrapes, n) = counting(Duration::from_millis(5));
        let answers = futures_util::future::join_all((0..32).map(|_| {
            let s = scrapes.clone();
            tokio::spawn(async move { s.scrape().await.unwrap() })
        }))
        .await;
        let encoded = n.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&encoded),
            "{encoded} encodings for 32 scrapes"
        );
        for a in answers {
            let a = a.unwrap();
            assert!(a.starts_with(b"encodings "), "{a:?}");
        }
    }

    /// A scrape after another is encoded again (what it shows counts what
    /// happened before it was asked), once the last encoding's share of
    /// the time has passed.
    #[tokio::test]
    async fn each_scrape_in_turn_is_encoded_afresh_within_a_tenth_of_the_time() {
        let work = Duration::from_millis(30);
        let (scrapes, n) = counting(work);
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"encodings 1\n");
        let started = std::time::Instant::now();
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"encodings 2\n");
        let spaced = started.elapsed();
        assert!(spaced >= work * SPACING, "next encoding after {spaced:?}");
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    /// A scrape given up while its encoding runs does not let the next one
    /// start another beside it: the next waits for it, and for its share of
    /// the time.
    #[tokio::test]
    async fn a_scrape_given_up_does_not_start_a_second_encoding() {
        let work = Duration::from_millis(100);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let scrapes = Arc::new(Scrapes::new(move |mut out| {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(work);
            r.fetch_sub(1, Ordering::SeqCst);
            out.push_str("ok\n");
            out
        }));
        for _ in 0..3 {
            let given_up = tokio::time::timeout(Duration::from_millis(10), scrapes.scrape()).await;
            assert!(given_up.is_err(), "answered within 10 ms");
        }
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"ok\n");
        assert_eq!(most.load(Ordering::SeqCst), 1, "encodings at once");
    }

    /// An encoding that fails is an error for the scrape (a 500, so that
    /// the scraper sees the target down), not an empty page; the next one
    /// is encoded afresh.
    #[tokio::test]
    async fn a_failed_encoding_is_an_error_and_not_kept() {
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        let scrapes = Scrapes::new(move |mut out| {
            if count.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a family that cannot be encoded");
            }
            out.push_str("ok\n");
            out
        });
        assert!(scrapes.scrape().await.is_err());
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"ok\n");
    }

    /// Each scrape in turn gets an encoding of its own even where the clock
    /// reads the same for both (paused here).
    #[tokio::test(start_paused = true)]
    async fn a_scrape_after_another_is_encoded_afresh_whatever_the_clock_reads() {
        let (scrapes, _) = counting(Duration::ZERO);
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"encodings 1\n");
        assert_eq!(&scrapes.scrape().await.unwrap()[..], b"encodings 2\n");
    }

    /// The serving thread goes on while an encoding runs.
    #[tokio::test(flavor = "current_thread")]
    async fn the_serving_thread_is_not_held_by_an_encoding() {
        let (scrapes, _) = counting(Duration::from_millis(300));
        let scrape = tokio::spawn({
            let s = scrapes.clone();
            async move { s.scrape().await.unwrap() }
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = std::time::Instant::now();
        tokio::spawn(async move { tx.send(()) });
        rx.await.unwrap();
        // Run while the encoding (300 ms) is still under way.
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(150), "ran after {waited:?}");
        assert!(!scrape.is_finished());
        assert_eq!(&scrape.await.unwrap()[..], b"encodings 1\n");
    }
}
