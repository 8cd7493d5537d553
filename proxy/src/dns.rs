//! Names that discovery does not answer for (a `Host` outside the mesh, a fixed
//! destination on a proxy without a control plane) go to the system resolver.
//! `getaddrinfo` blocks, so every lookup is a hop to Tokio's blocking pool and
//! often a query to the cluster's DNS server: done per request, it cost more
//! than the rest of the request. An answer is kept for `TTL`, and the requests
//! and streams to that name meanwhile take its addresses in turn. One lookup of
//! a name runs at a time, whatever the requests waiting for it; a failure is
//! kept for `FAILURE_TTL`, and meanwhile (or while a lookup is slow) the last
//! answer, for up to `MAX_STALE` past its expiry, is used rather than none. At
//! most `MAX_LOOKUPS` calls run at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::addr::{DestAddr, NameAddr};
use crate::http::error::ProxyError;

/// How long an answer is used. `getaddrinfo` does not say how long a record
/// may be kept; five seconds is Envoy's default refresh for DNS clusters: a
/// moved name is followed within that (on top of the record's own TTL in the
/// resolver's caches), and a busy one is looked up once per interval rather
/// than per request.
pub const TTL: Duration = Duration::from_secs(5);

/// How long a failed lookup is the answer: a name that does not resolve is not
/// looked up again for every request, and one that starts to is reachable
/// within this.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);

/// How long past its expiry an answer is still used when the lookups that
/// should renew it fail or are slow: a resolver's outage does not take every
/// name with it the moment their answers expire (Envoy keeps the last answer
/// of a DNS cluster too).
pub const MAX_STALE: Duration = Duration::from_secs(300);

/// How long one lookup may take before it counts as failed.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Names kept at most: they come from apps' `Host` headers, so the cache must
/// not grow with whatever an app sends. Past it, a new answer takes the place
/// of the one that expired longest ago.
pub const MAX_NAMES: usize = 1024;

/// Addresses kept per name at most; a name with more is spread over these.
pub const MAX_ADDRS: usize = 16;

/// `getaddrinfo` calls under way at most. Each holds a thread of Tokio's
/// blocking pool until it returns, however long after its request gave up: a
/// resolver that hangs would otherwise take a thread for every request to a
/// new name. Past these, a lookup waits for one to finish; its requests wait
/// within their own timeout. One name takes at most one.
pub const MAX_LOOKUPS: usize = 16;

/// Names whose lookups may be under way or waiting for a turn at once; past
/// these a new name fails at once ("resolver busy").
pub const MAX_PENDING: usize = 256;

/// How names are looked up: `getaddrinfo`, or a stand-in in tests.
type Resolver = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

/// A lookup's outcome, as its waiters see it: `None` until it comes.
type Outcome = Option<Result<Vec<SocketAddr>, String>>;

/// The answers in use, shared by a proxy's stacks.
#[derive(Clone)]
pub struct Names {
    kept: Arc<Mutex<Kept>>,
    resolver: Resolver,
    /// The `MAX_LOOKUPS` slots.
    lookups: Arc<tokio::sync::Semaphore>,
    lookup_timeout: Duration,
    failure_ttl: Duration,
}

impl Default for Names {
    fn default() -> Self {
        Names::with_resolver(Arc::new(|host: &str, port| {
            std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map(|f| f.collect())
        }))
    }
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Names(..)")
    }
}

#[derive(Default)]
struct Kept {
    answers: HashMap<NameAddr, Answer>,
    /// Lookups under way, one per name.
    pending: HashMap<NameAddr, watch::Receiver<Outcome>>,
}

#[derive(Clone, Debug)]
struct Answer {
    /// Empty only while the name has never resolved.
    addrs: Vec<SocketAddr>,
    /// Which address the next connection takes: a name with several addresses
    /// has its connections spread over them, in turn, as a resolver that
    /// shuffles its answers would spread them, and one of them that refuses
    /// connections holds up only every n-th.
    next: usize,
    /// Used freely until then.
    until: Instant,
    /// The last lookup failed: not looked up again until then.
    failed: Option<(Instant, String)>,
}

impl Answer {
    /// The next address, if the answer is fresh, or `stale` and not too old.
    fn take(&mut self, now: Instant, stale: bool) -> Option<SocketAddr> {
        let usable = if stale {
            self.until + MAX_STALE
        } else {
            self.until
        };
        if self.addrs.is_empty() || usable <= now {
            return None;
        }
        let addr = self.addrs[self.next % self.addrs.len()];
        self.next = self.next.wrapping_add(1);
        Some(addr)
    }

    /// Of no more use: no failure to remember, and no answer, or one too old.
    fn forgotten(&self, now: Instant) -> bool {
        self.failed.as_ref().is_none_or(|(t, _)| *t <= now)
            && (self.addrs.is_empty() || self.until + MAX_STALE <= now)
    }
}

impl Names {
    pub(crate) fn with_resolver(resolver: Resolver) -> Self {
        Names {
            kept: Arc::default(),
            resolver,
            lookups: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)),
            lookup_timeout: LOOKUP_TIMEOUT,
            failure_ttl: FAILURE_TTL,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address to connect to: as given, or one of the addresses the name
    /// resolves to, each in turn.
    pub async fn resolve(
        &self,
        dst: &DestAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, ProxyError> {
        let n = match dst {
            DestAddr::Socket(a) => return Ok(*a),
            DestAddr::Name(n) => n,
        };
        let fail = |reason: String| ProxyError::Resolve {
            name: dst.clone(),
            reason,
        };
        let mut outcome = {
            let now = Instant::now();
            let mut kept = self.kept();
            if let Some(a) = kept.answers.get_mut(n) {
                if let Some(addr) = a.take(now, false) {
                    return Ok(addr);
                }
                if let Some((until, reason)) = &a.failed
                    && *until > now
                {
                    let reason = reason.clone();
                    return a.take(now, true).ok_or_else(|| fail(reason));
                }
            }
            // Expired or never known: looked up once, for every request; the
            // last answer, if any, serves them meanwhile.
            let rx = match kept.pending.get(n) {
                Some(rx) => Some(rx.clone()),
                None if kept.pending.len() >= MAX_PENDING => None,
                None => {
                    let (tx, rx) = watch::channel(None);
                    kept.pending.insert(n.clone(), rx.clone());
                    tokio::spawn(self.clone().look_up(n.clone(), tx));
                    Some(rx)
                }
            };
            if let Some(addr) = kept.answers.get_mut(n).and_then(|a| a.take(now, true)) {
                return Ok(addr);
            }
            rx.ok_or_else(|| fail("resolver busy".into()))?
        };
        let waited = tokio::time::timeout(timeout, outcome.wait_for(Option::is_some)).await;
        // Taken again from what is kept, for the turn of addresses.
        let mut kept = self.kept();
        let kept = kept
            .answers
            .get_mut(n)
            .and_then(|a| a.take(Instant::now(), false));
        match waited {
            Ok(Ok(o)) => match o.as_ref() {
                Some(Ok(addrs)) => kept
                    .or(addrs.first().copied())
                    .ok_or_else(|| fail("no addresses".into())),
                Some(Err(reason)) => Err(fail(reason.clone())),
                None => Err(fail("lookup abandoned".into())),
            },
            Ok(Err(_)) => Err(fail("lookup abandoned".into())),
            Err(_) => Err(fail(format!("timed out after {timeout:?}"))),
        }
    }

    /// Looks `n` up once, for every request waiting on `tx`, and keeps what
    /// comes: its own task, so the answer is kept however early they give up.
    /// Past `lookup_timeout` the waiters are told it failed, but the name
    /// stays looked up until the call returns (an answer that comes late is
    /// kept): no second lookup of it takes another slot meanwhile.
    async fn look_up(self, n: NameAddr, tx: watch::Sender<Outcome>) {
        let Ok(permit) = self.lookups.clone().acquire_owned().await else {
            self.settle(&n, Err("resolver closed".into()), &tx, true);
            return;
        };
        let (host, port, resolver) = (n.host().to_string(), n.port(), self.resolver.clone());
        // The permit goes with the call: freed when getaddrinfo returns.
        let mut call = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            resolver(&host, port)
        });
        tokio::select! {
            r = &mut call => self.settle(&n, answer(r), &tx, true),
            () = tokio::time::sleep(self.lookup_timeout) => {
                let late = format!("lookup timed out after {:?}", self.lookup_timeout);
                self.settle(&n, Err(late), &tx, false);
                let r = call.await;
                self.settle(&n, answer(r), &tx, true);
            }
        }
    }

    /// Keeps a lookup's outcome and tells its waiters; `done` when the call
    /// has returned.
    fn settle(
        &self,
        n: &NameAddr,
        outcome: Result<Vec<SocketAddr>, String>,
        tx: &watch::Sender<Outcome>,
        done: bool,
    ) {
        let now = Instant::now();
        let mut kept = self.kept();
        if done {
            kept.pending.remove(n);
        }
        let answers = &mut kept.answers;
        if answers.len() >= MAX_NAMES && !answers.contains_key(n) {
            answers.retain(|_, a| !a.forgotten(now));
            if answers.len() >= MAX_NAMES {
                let oldest = answers
                    .iter()
                    .min_by_key(|(_, a)| a.until)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    answers.remove(&oldest);
                }
            }
        }
        let a = answers.entry(n.clone()).or_insert_with(|| Answer {
            addrs: Vec::new(),
            next: 0,
            until: now,
            failed: None,
        });
        match &outcome {
            Ok(addrs) => {
                *a = Answer {
                    addrs: addrs.clone(),
                    // On in turn: started over, a name used now and then
                    // would send nearly every connection to its first.
                    next: a.next,
                    until: now + TTL,
                    failed: None,
                }
            }
            Err(reason) => a.failed = Some((now + self.failure_ttl, reason.clone())),
        }
        drop(kept);
        tx.send_replace(Some(outcome));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept().answers.len()
    }
}

/// What a lookup found: the addresses of the family the resolver puts first
/// (a dual-stack name's server may listen on one only, and the resolver's
/// order is the system's preference), in its order, without repeats, at most
/// `MAX_ADDRS`; never empty.
fn answer(
    r: Result<std::io::Result<Vec<SocketAddr>>, tokio::task::JoinError>,
) -> Result<Vec<SocketAddr>, String> {
    let found = r
        .map_err(|e| format!("lookup failed: {e}"))?
        // getaddrinfo's own text varies by libc; say what it means.
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => "lookup timed out".to_string(),
            _ => "no such name, or no address for it".to_string(),
        })?;
    let addrs = usable(found);
    if addrs.is_empty() {
        return Err("no addresses".into());
    }
    Ok(addrs)
}

/// What `answer` keeps of a resolver's.
fn usable(found: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for a in found {
        if addrs.len() == MAX_ADDRS {
            break;
        }
        let family = addrs
            .first()
            .is_none_or(|f: &SocketAddr| f.is_ipv4() == a.is_ipv4());
        if family && !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn name(s: &str) -> NameAddr {
        match s.parse::<DestAddr>().expect("name") {
            DestAddr::Name(n) => n,
            DestAddr::Socket(_) => panic!("{s} is an address"),
        }
    }

    fn dest(s: &str) -> DestAddr {
        s.parse().expect("name")
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// A resolver answering what `answer` says, counting its calls.
    fn counted(
        answer: impl Fn(&str) -> std::io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> (Names, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let names = Names::with_resolver(Arc::new(move |host: &str, _| {
            c.fetch_add(1, Ordering::SeqCst);
            answer(host)
        }));
        (names, calls)
    }

    fn no_such_name() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "NXDOMAIN")
    }

    /// Makes the kept answer of `n` as old as `age` past its expiry.
    fn age(names: &Names, n: &str, age: Duration) {
        let mut kept = names.kept();
        let a = kept.answers.get_mut(&name(n)).expect("kept");
        a.until = Instant::now() - age;
    }

    /// Waits for the lookup of `n` under way, if any, to end.
    async fn settled(names: &Names, n: &str) {
        let rx = names.kept().pending.get(&name(n)).cloned();
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(Option::is_some).await;
        }
    }

    /// With every lookup slot taken (a resolver that hangs), a new lookup
    /// waits within its timeout and fails, rather than take another thread.
    #[tokio::test]
    async fn lookups_under_way_are_bounded() {
        let names = Names::default();
        let ok = names.resolve(&dest("localhost:80"), WAIT).await;
        assert!(ok.is_ok(), "{ok:?}");
        let held = names
            .lookups
            .acquire_many(MAX_LOOKUPS as u32)
            .await
            .unwrap();
        let other = dest("localhost:81");
        let e = names
            .resolve(&other, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        drop(held);
        assert!(names.resolve(&other, WAIT).await.is_ok());
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_for_every_request_waiting_on_it() {
        let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered_tx, released) = (Mutex::new(entered_tx), Mutex::new(released));
        let (names, calls) = counted(move |_| {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = released.lock().unwrap().recv();
            Ok(vec![at(80)])
        });
        let waiting: Vec<_> = (0..20)
            .map(|_| {
                let names = names.clone();
                tokio::spawn(async move { names.resolve(&dest("web.example:80"), WAIT).await })
            })
            .collect();
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        release.send(()).unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), at(80));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A name whose lookups hang holds one lookup slot, not all of them,
    /// however many requests it gets.
    #[tokio::test]
    async fn a_name_that_hangs_holds_one_lookup_slot() {
        let (_hold, hung) = std::sync::mpsc::channel::<()>();
        let hung = Mutex::new(hung);
        let (names, calls) = counted(move |host| {
            if host == "hung.example" {
                let _ = hung.lock().unwrap().recv();
            }
            Ok(vec![at(80)])
        });
        for _ in 0..(2 * MAX_LOOKUPS) {
            let e = names
                .resolve(&dest("hung.example:80"), Duration::from_millis(10))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("timed out"), "{e}");
        }
        assert_eq!(
            names.resolve(&dest("fine.example:80"), WAIT).await.unwrap(),
            at(80)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(names.lookups.available_permits(), MAX_LOOKUPS - 1);
    }

    /// Nor when it hangs past the lookup's timeout: its waiters are told it
    /// failed, and it is not looked up again while the call is under way.
    #[tokio::test]
    async fn a_name_that_hangs_past_the_timeout_is_not_looked_up_again() {
        let (_hold, hung) = std::sync::mpsc::channel::<()>();
        let hung = Mutex::new(hung);
        let (names, calls) = counted(move |_| {
            let _ = hung.lock().unwrap().recv();
            Ok(vec![at(80)])
        });
        let names = Names {
            lookup_timeout: Duration::from_millis(50),
            failure_ttl: Duration::ZERO,
            ..names
        };
        let hung = dest("hung.example:80");
        for _ in 0..20 {
            let e = names.resolve(&hung, WAIT).await.unwrap_err();
            assert!(e.to_string().contains("timed out after 50ms"), "{e}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(names.lookups.available_permits(), MAX_LOOKUPS - 1);
    }

    #[tokio::test]
    async fn the_last_answer_serves_while_its_renewal_fails() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = failing.clone();
        let (names, calls) = counted(move |_| {
            if f.load(Ordering::SeqCst) {
                Err(no_such_name())
            } else {
                Ok(vec![at(80)])
            }
        });
        let names = Names {
            failure_ttl: Duration::from_secs(3600),
            ..names
        };
        let web = dest("web.example:80");
        assert_eq!(names.resolve(&web, WAIT).await.unwrap(), at(80));
        // Expired, and the resolver down: the old answer at once, renewed
        // in the background, and kept while the renewal fails.
        failing.store(true, Ordering::SeqCst);
        age(&names, "web.example:80", Duration::from_secs(1));
        assert_eq!(names.resolve(&web, WAIT).await.unwrap(), at(80));
        settled(&names, "web.example:80").await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(names.resolve(&web, WAIT).await.unwrap(), at(80));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a failure is kept a while");
        // Too old to use: the failure is the answer.
        age(&names, "web.example:80", MAX_STALE);
        let e = names.resolve(&web, WAIT).await.unwrap_err();
        assert!(e.to_string().contains("no such name"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failure_is_kept_briefly() {
        let (names, calls) = counted(|_| Err(no_such_name()));
        let names = Names {
            failure_ttl: Duration::from_secs(3600),
            ..names
        };
        let gone = dest("gone.example:80");
        for _ in 0..3 {
            let e = names.resolve(&gone, WAIT).await.unwrap_err();
            assert_eq!(e.reason(), "resolve");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        {
            let mut kept = names.kept();
            let a = kept.answers.get_mut(&name("gone.example:80")).unwrap();
            a.failed.as_mut().unwrap().0 = Instant::now();
        }
        assert!(names.resolve(&gone, WAIT).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "looked up again");
    }

    #[tokio::test]
    async fn connections_take_a_names_addresses_in_turn() {
        let (names, _) = counted(|_| Ok(vec![at(1), at(2), at(3)]));
        let web = dest("web.example:80");
        let mut taken = Vec::new();
        for _ in 0..6 {
            taken.push(names.resolve(&web, WAIT).await.unwrap());
        }
        assert_eq!(taken, [1, 2, 3, 1, 2, 3].map(at));
        let other = names.resolve(&dest("web.example:81"), WAIT).await;
        assert_eq!(other.unwrap(), at(1), "ports apart");
    }

    /// A name looked up again goes on in turn from where it was: started
    /// over at each refresh, a name used once every few seconds would send
    /// nearly every connection to its first address, dead or not.
    #[tokio::test]
    async fn a_refreshed_answer_goes_on_in_turn() {
        let (names, _) = counted(|_| Ok(vec![at(1), at(2)]));
        let web = dest("web.example:80");
        let mut taken = vec![names.resolve(&web, WAIT).await.unwrap()];
        for _ in 0..5 {
            age(&names, "web.example:80", Duration::from_millis(1));
            taken.push(names.resolve(&web, WAIT).await.unwrap());
            settled(&names, "web.example:80").await;
        }
        assert_eq!(taken, [1, 2, 1, 2, 1, 2].map(at));
    }

    #[test]
    fn an_answer_keeps_the_first_family_once_each_and_at_most_max_addrs() {
        let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 80));
        assert_eq!(usable([at(1), v6, at(2), at(1)]), [at(1), at(2)]);
        assert_eq!(usable([v6, at(1)]), [v6]);
        assert_eq!(usable((0..100).map(at)).len(), MAX_ADDRS);
        assert!(usable([]).is_empty());
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_is_forgotten_with_its_failure() {
        let (names, _) = counted(|_| Err(no_such_name()));
        let names = Names {
            failure_ttl: Duration::ZERO,
            ..names
        };
        for i in 0..10 {
            let _ = names
                .resolve(&dest(&format!("bad{i}.example:80")), WAIT)
                .await;
        }
        let (ok, _) = counted(|_| Ok(vec![at(80)]));
        let names = Names {
            resolver: ok.resolver,
            ..names
        };
        // Filling up, the failures make room before any answer would.
        for i in 0..MAX_NAMES {
            names
                .resolve(&dest(&format!("n{i}.example:80")), WAIT)
                .await
                .unwrap();
        }
        assert_eq!(names.len(), MAX_NAMES);
        assert!(names.kept().answers.values().all(|a| !a.addrs.is_empty()));
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_forgotten_answers_make_room() {
        let (names, _) = counted(|_| Ok(vec![at(80)]));
        for i in 0..MAX_NAMES {
            let n = dest(&format!("n{i}.example:80"));
            names.resolve(&n, WAIT).await.unwrap();
        }
        // Full: the answer that expired longest ago makes room.
        age(&names, "n7.example:80", Duration::from_secs(1));
        let late = dest("late.example:80");
        assert_eq!(names.resolve(&late, WAIT).await.unwrap(), at(80));
        assert_eq!(names.len(), MAX_NAMES);
        assert!(names.kept().answers.contains_key(&name("late.example:80")));
        assert!(!names.kept().answers.contains_key(&name("n7.example:80")));
        // Answers too old to serve go first, all of them.
        for i in 0..MAX_NAMES {
            if i != 7 {
                age(&names, &format!("n{i}.example:80"), MAX_STALE);
            }
        }
        names
            .resolve(&dest("later.example:80"), WAIT)
            .await
            .unwrap();
        assert_eq!(names.len(), 2, "the forgotten answers went");
    }

    #[tokio::test]
    async fn the_system_resolver_answers() {
        let names = Names::default();
        let addr = names
            .resolve(&dest("localhost:8080"), Duration::from_secs(10))
            .await
            .expect("localhost resolves");
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 8080);
        let err = names
            .resolve(&dest("no-such-name.invalid:80"), Duration::from_secs(10))
            .await
            .expect_err("an .invalid name never resolves");
        assert_eq!(err.reason(), "resolve");
        let ip = "10.1.2.3:80".parse::<DestAddr>().expect("address");
        let same = names.resolve(&ip, Duration::from_secs(10)).await;
        assert_eq!(same.ok(), Some(SocketAddr::from(([10, 1, 2, 3], 80))));
        assert_eq!(names.len(), 2, "addresses are not kept");
    }
}
