//! The webhook's connection places. Any pod can reach the webhook's Service,
//! and with every place held by connections that say nothing (a TLS handshake
//! never finished, a kept-alive connection never used) the API server's calls
//! would wait in the backlog, and pods of injected namespaces could not be
//! created. So when every place is taken, a newcomer gets the place of the
//! connection idle the longest: one not in a review, whose last review ended
//! (or which was accepted, if it has had none) before any other's, and at
//! least `GRACE` ago. A review counts from its whole body read: a head whose
//! body is held back is idle. The API server opens a new connection when a
//! kept-alive one is closed under it.
//!
//! A connection that has room in the reviews' budget (`budget`) for a body
//! still to come is also known here, so that a review finding no room can
//! close the one whose body is late the longest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A connection is not closed for another within this of being accepted or
/// of its last review's end: the answer it was writing is sent, and one just
/// accepted has time for its handshake and request before a flood of newer
/// ones can take its place.
pub const GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// A body that has held its room this long without all of it read is late:
/// its connection may be closed for a review that finds no room. The API
/// server writes a review's body right after its head, from an object it
/// already holds: over a cluster's network even the largest (4 MiB) comes
/// well within this. Over a slow path (a control plane far from its nodes,
/// a few MiB a second) a large one may not, and may then be closed, but only
/// while room is short.
pub const LATE_BODY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Places {
    free: Arc<Semaphore>,
    open: Mutex<Open>,
    /// A review ended: a newcomer waiting with every connection in a review
    /// may take that one's place.
    became_idle: tokio::sync::Notify,
}

#[derive(Default)]
struct Open {
    next: u64,
    conns: HashMap<u64, Conn>,
}

struct Conn {
    /// `None` while a review is under way.
    idle_since: Option<Instant>,
    /// Room held in the budget for a body not all read yet: since when, and
    /// in which of its shares.
    holding: Option<(Instant, Share)>,
    /// Cancelled to give the place up.
    close: CancellationToken,
}

/// Which of the budget's shares room is held in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// Reviews of pods as they usually are.
    Small,
    Large,
}

pub(super) enum Longest {
    /// Closed; it had been idle (or its body late) this long.
    Closed(std::time::Duration),
    /// The longest idle (or late) may be closed from then.
    TooRecent(Instant),
    /// None is idle (or holds room).
    Nobody,
}

/// A connection's place, given back when dropped.
pub struct Place {
    places: Arc<Places>,
    id: u64,
    pub close: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

/// A review under way on a connection: it is not idle until this drops.
pub struct Busy<'a>(&'a Place);

/// Room held in the budget for a body still coming, until this drops.
pub struct Holding<'a>(&'a Place);

impl Places {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Places {
            free: Arc::new(Semaphore::new(max)),
            open: Mutex::default(),
            became_idle: tokio::sync::Notify::new(),
        })
    }

    /// A place for a connection accepted now: a free one, or the longest
    /// idle connection's, closed for it. With every connection in a review
    /// it waits for one to end.
    pub async fn take(self: &Arc<Self>) -> Place {
        let permit = loop {
            if let Ok(p) = self.free.clone().try_acquire_owned() {
                break p;
            }
            let became_idle = self.became_idle.notified();
            tokio::pin!(became_idle);
            became_idle.as_mut().enable();
            // Woken by a review's end only while no connection is idle: one
            // closed gives its place back soon, and one not idle long
            // enough yet is older than any that becomes idle now.
            let (closed, wait) = match self.close_longest_idle(Instant::now()) {
                Longest::Closed(idle) => {
                    tracing::debug!(
                        ?idle,
                        "webhook connections at the limit: the longest idle closed for a new one"
                    );
                    (true, None)
                }
                Longest::TooRecent(until) => (false, Some(until)),
                Longest::Nobody => (false, None),
            };
            tokio::select! {
                p = self.free.clone().acquire_owned() => {
                    // The semaphore is never closed.
                    if let Ok(p) = p {
                        break p;
                    }
                }
                () = &mut became_idle, if !closed && wait.is_none() => {}
                () = tokio::time::sleep_until(wait.unwrap_or_else(Instant::now)), if wait.is_some() => {}
            }
        };
        let close = CancellationToken::new();
        let mut open = self.lock();
        let id = open.next;
        open.next += 1;
        open.conns.insert(
            id,
            Conn {
                idle_since: Some(Instant::now()),
                holding: None,
                close: close.clone(),
            },
        );
        Place {
            places: self.clone(),
            id,
            close,
            _permit: permit,
        }
    }

    /// Closes the connection idle the longest, if it has been idle for
    /// `GRACE` at least.
    fn close_longest_idle(&self, now: Instant) -> Longest {
        self.close_longest(|c| c.idle_since, GRACE, now)
    }

    /// Closes the connection that has held room in `share` the longest for
    /// a body not all read, if that is `LATE_BODY` at least.
    pub(super) fn close_longest_late(&self, share: Share, now: Instant) -> Longest {
        let late = |c: &Conn| c.holding.filter(|(_, s)| *s == share).map(|(t, _)| t);
        self.close_longest(late, LATE_BODY, now)
    }

    /// Closes the connection whose `since` is the earliest, if it is `after`
    /// before `now`.
    fn close_longest(
        &self,
        since: impl Fn(&Conn) -> Option<Instant>,
        after: std::time::Duration,
        now: Instant,
    ) -> Longest {
        let open = self.lock();
        let Some((since, conn)) = open
            .conns
            .values()
            .filter(|c| !c.close.is_cancelled())
            .filter_map(|c| Some((since(c)?, c)))
            .min_by_key(|(since, _)| *since)
        else {
            return Longest::Nobody;
        };
        if since + after > now {
            return Longest::TooRecent(since + after);
        }
        conn.close.cancel();
        Longest::Closed(now - since)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_idle(&self, id: u64, idle: bool) {
        if let Some(c) = self.lock().conns.get_mut(&id) {
            c.idle_since = idle.then(Instant::now);
        }
        if idle {
            self.became_idle.notify_waiters();
        }
    }
}

impl Place {
    /// A request's head came: idle from now (so a connection sending its
    /// body ranks behind those that send nothing, and has its `GRACE`),
    /// until its body is read and it is `busy`.
    pub fn asked(&self) {
        self.places.set_idle(self.id, true);
    }

    pub fn busy(&self) -> Busy<'_> {
        self.places.set_idle(self.id, false);
        Busy(self)
    }

    /// Room in `share` is held from now for a body still to be read.
    pub fn holding(&self, share: Share) -> Holding<'_> {
        if let Some(c) = self.places.lock().conns.get_mut(&self.id) {
            c.holding = Some((Instant::now(), share));
        }
        Holding(self)
    }

    pub(super) fn places(&self) -> &Places {
        &self.places
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.places.lock().conns.get_mut(&self.0.id) {
            c.holding = None;
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.places.set_idle(self.0.id, true);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.lock().conns.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A place taken in a task of its own: it may wait for one.
    fn taking(places: &Arc<Places>) -> tokio::task::JoinHandle<Place> {
        let places = places.clone();
        tokio::spawn(async move { places.take().await })
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_takes_the_place_of_the_longest_idle_connection() {
        let second = Duration::from_secs(1);
        let places = Places::new(3);
        let first = places.take().await;
        tokio::time::advance(second).await;
        let second_in = places.take().await;
        tokio::time::advance(second).await;
        let third = places.take().await;
        // The first is in a review; the second in, idle the longest, goes.
        let reviewing = first.busy();
        tokio::time::advance(second).await;
        let waiting = taking(&places);
        tokio::task::yield_now().await;
        assert!(!first.close.is_cancelled());
        assert!(second_in.close.is_cancelled());
        assert!(!third.close.is_cancelled());
        assert!(
            !waiting.is_finished(),
            "given a place before one was given back"
        );
        // Its place is given when the closed connection ends.
        drop(second_in);
        let fourth = waiting.await.unwrap();
        // The first's review ends after the third and fourth came: the
        // third goes next.
        tokio::time::advance(second).await;
        drop(reviewing);
        let waiting = taking(&places);
        tokio::task::yield_now().await;
        assert!(third.close.is_cancelled());
        assert!(!first.close.is_cancelled() && !fourth.close.is_cancelled());
        assert!(
            !waiting.is_finished(),
            "given a place before one was given back"
        );
        drop(third);
        let fifth = waiting.await.unwrap();
        assert!(!fifth.close.is_cancelled());
    }

    /// A newcomer closes one connection, however many become idle while
    /// that one gives its place back.
    #[tokio::test(start_paused = true)]
    async fn a_newcomer_closes_one_connection_only() {
        let places = Places::new(2);
        let a = places.take().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = places.take().await;
        let review = b.busy();
        tokio::time::advance(Duration::from_secs(1)).await;
        let waiting = taking(&places);
        tokio::task::yield_now().await;
        assert!(a.close.is_cancelled());
        drop(review);
        tokio::time::sleep(GRACE * 2).await;
        assert!(
            !b.close.is_cancelled(),
            "a second connection closed for one newcomer"
        );
        drop(a);
        assert!(!waiting.await.unwrap().close.is_cancelled());
        assert!(!b.close.is_cancelled());
    }

    /// A request's head makes its connection newly idle: one sending its
    /// body ranks behind those that sent nothing since.
    #[tokio::test(start_paused = true)]
    async fn a_connection_sending_a_request_is_not_the_first_to_go() {
        let places = Places::new(2);
        let kept_alive = places.take().await;
        tokio::time::advance(Duration::from_secs(5)).await;
        let silent = places.take().await;
        tokio::time::advance(Duration::from_secs(1)).await;
        kept_alive.asked();
        tokio::time::advance(GRACE * 2).await;
        let waiting = taking(&places);
        tokio::task::yield_now().await;
        assert!(silent.close.is_cancelled());
        assert!(!kept_alive.close.is_cancelled());
        drop(silent);
        waiting.await.unwrap();
    }

    /// With every connection in a review a newcomer waits, and takes the
    /// place of the first whose review ends, once its answer is sent.
    #[tokio::test(start_paused = true)]
    async fn with_every_connection_in_a_review_a_newcomer_waits() {
        let places = Places::new(1);
        let only = places.take().await;
        let busy = only.busy();
        let waiting = taking(&places);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "took the place of a connection in a review"
        );
        assert!(!only.close.is_cancelled());
        drop(busy);
        tokio::task::yield_now().await;
        assert!(
            !only.close.is_cancelled(),
            "closed while its answer may be written"
        );
        tokio::time::sleep(GRACE).await;
        tokio::task::yield_now().await;
        assert!(
            only.close.is_cancelled(),
            "idle now, and closed for the newcomer"
        );
        drop(only);
        let next = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(next.is_ok());
    }
}
