//! What the webhook's reviews may hold in memory at once. A review's body
//! reserves its declared length (the most, undeclared) before it is read, and
//! one review is parsed at a time: a parse can take tens of times its text
//! (a long array of small numbers), and takes a millisecond or so. Reviews
//! of pods as they usually are (under 256 KiB) have half the room to
//! themselves: a few slow senders of large bodies cannot take it all.
//!
//! Any pod can reach the webhook, and room is reserved before a body comes,
//! so connections that declare bodies and send none could hold it all. A
//! review that finds no room closes the connection whose body is the latest
//! (`places::LATE_BODY` at least), one at a time until it has room; the API
//! server sends a body with its head, so its own are never late.

use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::places::{Holding, Longest, Place, Share};
use crate::defaults;

pub struct Budget {
    large: Pool,
    small: Pool,
    pub parsing: Semaphore,
}

/// One share of the room.
struct Pool {
    bytes: Semaphore,
    /// Room was given back to `bytes`: a review waiting for it looks again.
    given_back: Notify,
    share: Share,
}

/// A review at most this large takes its room from the small ones' share.
const SMALL_REVIEW_BYTES: u64 = 256 * 1024;

/// Room for one review's body. While the body is still coming its
/// connection may be closed for another review; not once it is read.
pub struct Room<'a> {
    permit: Option<SemaphorePermit<'a>>,
    holding: Option<Holding<'a>>,
    given_back: &'a Notify,
}

impl Room<'_> {
    pub fn body_read(&mut self) {
        self.holding = None;
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        // No longer holding, then the room, then the word: a review told
        // finds the room, and does not take this connection for a late one
        // still to close (and wait for room it has already had word of).
        self.holding = None;
        drop(self.permit.take());
        self.given_back.notify_waiters();
    }
}

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let pool = |share| Pool {
            bytes: Semaphore::new(bytes / 2),
            given_back: Notify::new(),
            share,
        };
        Budget {
            large: pool(Share::Large),
            small: pool(Share::Small),
            parsing: Semaphore::new(1),
        }
    }

    /// Room for a body of `declared` bytes on `place`'s connection, waited
    /// for until `deadline`. Waiting, it closes connections whose bodies
    /// are late, one at a time, each once the one before has given its room
    /// back: room freed goes to reviews in the order they asked.
    pub async fn room<'a>(
        &'a self,
        declared: Option<u64>,
        deadline: Instant,
        place: &'a Place,
    ) -> Option<Room<'a>> {
        let max = defaults::MAX_ADMISSION_REVIEW_BYTES;
        let n = declared.map_or(max, |n| usize::try_from(n).unwrap_or(max).min(max));
        let n = u32::try_from(n).ok()?;
        let pool = if declared.is_some_and(|d| d <= SMALL_REVIEW_BYTES) {
            &self.small
        } else {
            &self.large
        };
        let places = place.places();
        let acquire = pool.bytes.acquire_many(n);
        tokio::pin!(acquire);
        let mut look = Some(Instant::now());
        let permit = loop {
            let given_back = pool.given_back.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            // Acquired at once: nothing closed.
            if let Some(Ok(p)) = futures_util::FutureExt::now_or_never(acquire.as_mut()) {
                break p;
            }
            if let Some(at) = look.filter(|at| *at <= Instant::now()) {
                look = match places.close_longest_late(pool.share, at) {
                    Longest::Closed(late) => {
                        tracing::debug!(
                            ?late,
                            "webhook reviews' room taken: the latest body's connection closed"
                        );
                        None
                    }
                    Longest::TooRecent(until) => Some(until),
                    // A body that starts now is late from then at the soonest.
                    Longest::Nobody => Some(Instant::now() + super::places::LATE_BODY),
                };
            }
            tokio::select! {
                p = acquire.as_mut() => break p.ok()?,
                () = tokio::time::sleep_until(deadline) => return None,
                () = &mut given_back => look = Some(Instant::now()),
                () = tokio::time::sleep_until(look.unwrap_or(deadline)), if look.is_some() => {}
            }
        };
        Some(Room {
            permit: Some(permit),
            holding: Some(place.holding(pool.share)),
            given_back: &pool.given_back,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::inject::places::Places;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// However many connections send large reviews, the bytes held at once
    /// stay within the budget: past it a review waits for room, and is
    /// refused if none comes in time.
    #[tokio::test(start_paused = true)]
    async fn reviews_hold_no_more_than_the_budget() {
        let max = defaults::MAX_ADMISSION_REVIEW_BYTES;
        let budget = Budget::new(6 * max);
        let places = Places::new(8);
        let conns: Vec<_> = futures_util::future::join_all((0..5).map(|_| places.take())).await;
        let mut held = Vec::new();
        for c in &conns[..3] {
            let mut room = budget
                .room(Some(max as u64), soon(), c)
                .await
                .expect("room");
            // Read: no longer late, whatever the wait.
            room.body_read();
            held.push(room);
        }
        // Undeclared: the most is reserved.
        assert!(budget.room(None, soon(), &conns[3]).await.is_none());
        // Small reviews (pods as they are) still have their share.
        let small = budget.room(Some(10_000), soon(), &conns[4]).await;
        assert!(small.is_some());
        assert_eq!(budget.small.bytes.available_permits(), 3 * max - 10_000);
        assert!(conns.iter().all(|c| !c.close.is_cancelled()));
        drop(held);
        assert!(budget.room(None, soon(), &conns[3]).await.is_some());
    }

    /// A review that finds no room closes the connections whose bodies are
    /// late, the latest first and one at a time, and takes the room they
    /// give back; bodies not yet late, read ones and the other share's are
    /// left alone, and neither a body read nor the other share's room given
    /// back closes another.
    #[tokio::test(start_paused = true)]
    async fn a_review_without_room_closes_connections_whose_bodies_are_late() {
        let budget = Arc::new(Budget::new(2 * 4 * SMALL_REVIEW_BYTES as usize));
        let places = Places::new(8);
        let each = Some(SMALL_REVIEW_BYTES);
        // Four hold all the small share; the first reads its body.
        let a = places.take().await;
        let mut read = budget.room(each, soon(), &a).await.expect("room");
        read.body_read();
        let b = places.take().await;
        let late = budget.room(each, soon(), &b).await.expect("room");
        tokio::time::advance(Duration::from_millis(500)).await;
        let (c, g) = (places.take().await, places.take().await);
        let mut later = budget.room(each, soon(), &c).await.expect("room");
        let also_later = budget.room(each, soon(), &g).await.expect("room");
        // A large body, later than them all, is in the other share.
        let d = places.take().await;
        let large = budget
            .room(Some(SMALL_REVIEW_BYTES + 1), soon(), &d)
            .await
            .expect("room");
        tokio::time::advance(Duration::from_millis(100)).await;

        let e = Arc::new(places.take().await);
        let waiting = {
            let (budget, e) = (budget.clone(), e.clone());
            tokio::spawn(async move { budget.room(each, soon(), &e).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !b.close.is_cancelled(),
            "closed before its body was late (900 ms)"
        );
        // At 1 s the first unread body is late: its connection is closed,
        // and only it, while it has not given its room back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(b.close.is_cancelled());
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Both later bodies are late now. One is read, which gives no room
        // back, and the large body's room comes back, which is no room for
        // a small review: neither closes the other late one.
        later.body_read();
        drop(large);
        tokio::task::yield_now().await;
        assert!(
            !g.close.is_cancelled(),
            "a second closed before the first's room came back"
        );
        assert!(!a.close.is_cancelled() && !c.close.is_cancelled() && !d.close.is_cancelled());
        // Closed, its review goes, and with it its room.
        drop(late);
        assert!(waiting.await.unwrap(), "the room given back was taken");
        assert!(!c.close.is_cancelled() && !g.close.is_cancelled());
        drop((read, later, also_later));
    }
}
