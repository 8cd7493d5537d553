//! Tokens checked with the API server's TokenReview: the namespace and service
//! account come from the review, never from the caller. Answers are cached
//! briefly (proxies present the same token on every call), keyed by the
//! token's digest: the token itself is never kept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::defaults;
use crate::identity::tokens::{Refusing, TokenError};
use crate::index::{ObjKey, TokenDigest};
use strait_api::per_source::PerSource;

/// How long an answer is reused at most: a revoked token (its pod deleted)
/// stops working within this, and an expired one at its expiry.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a refusal is reused: long enough that a flood of one made-up token
/// costs the API server one review in a while, short enough that a pod whose
/// brand-new token the API server did not know yet is not locked out a minute.
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// At most this many answers are kept (a flood of made-up tokens cannot grow it).
const CACHE_MAX: usize = 16 * 1024;

/// Refusals kept at most, apart from the answers that proved an account: a
/// flood of made-up tokens fills this, and the proxies' real answers stay.
const REFUSALS_MAX: usize = 1024;

/// Answers by token digest, with until when they hold.
type Cache = HashMap<TokenDigest, (Instant, Result<ObjKey, TokenError>)>;

#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    cache: Arc<Mutex<Cache>>,
    refused: Arc<Mutex<Cache>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Reviews in flight by the address that asked: one pod cannot take every
    /// turn, whatever tokens it makes up.
    by_source: PerSource,
    /// Nor can it have the API server review made-up tokens without end.
    refusing: Arc<Refusing>,
    /// Reviews under way, by token: their answers, once they come.
    pending: Arc<Mutex<Reviewing>>,
}

/// A review's answer, as its waiters see it: `None` until it comes.
type Pending = Option<Result<ObjKey, TokenError>>;

/// Reviews under way, by token digest.
type Reviewing = HashMap<TokenDigest, watch::Receiver<Pending>>;

/// Takes a review out of the pending ones when dropped.
struct Unlist(Arc<Mutex<Reviewing>>, TokenDigest);

impl Drop for Unlist {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Reviews one address may have in flight at once. A proxy asks once per
/// token (then the answer is cached), so a few suffice even for a node's
/// worth of pods starting behind one address.
const REVIEWS_PER_SOURCE: usize = 4;

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        TokenReviewer {
            api: Api::all(client),
            audience: defaults::TOKEN_AUDIENCE.to_string(),
            cache: Arc::default(),
            refused: Arc::default(),
            by_source: PerSource::new(REVIEWS_PER_SOURCE),
            refusing: Arc::default(),
            pending: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                defaults::TOKEN_REVIEWS_IN_FLIGHT,
            )),
        }
    }

    pub async fn review(&self, token: &[u8], source: Option<IpAddr>) -> Result<ObjKey, TokenError> {
        let answer = self.reviewed(token, source).await;
        // A review answered (or kept) a moment before the token's end proves
        // nothing past it: a review takes up to its timeout, and an answer is
        // kept from when it came.
        match answer {
            Ok(_) if expiry(token).is_some_and(|t| t <= std::time::SystemTime::now()) => {
                Err(TokenError::Unknown)
            }
            answer => answer,
        }
    }

    async fn reviewed(&self, token: &[u8], source: Option<IpAddr>) -> Result<ObjKey, TokenError> {
        let digest = TokenDigest::of(token);
        let now = Instant::now();
        for cache in [&self.cache, &self.refused] {
            if let Ok(cache) = cache.lock()
                && let Some((until, answer)) = cache.get(&digest)
                && now < *until
            {
                return answer.clone();
            }
        }
        let Ok(token) = std::str::from_utf8(token) else {
            return Err(TokenError::Unknown);
        };
        // What cannot be a live token of ours costs the API server nothing.
        let Some(expires_in) = plausible(token, &self.audience, std::time::SystemTime::now())
        else {
            return Err(TokenError::Unknown);
        };
        if let Some(s) = source
            && self.refusing.exhausted(s, now)
        {
            return Err(TokenError::Unavailable(
                "too many unknown tokens from this address lately; try again in a few seconds"
                    .into(),
            ));
        }
        let mut answer = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(&digest) {
                // Asked again while its review is under way (a proxy's first
                // certificate, policy and discovery calls come at once): one
                // review answers them all.
                Some(rx) => rx.clone(),
                None => {
                    let Some(turn) = self.by_source.take(source) else {
                        return Err(TokenError::Unavailable(
                            "too many token checks from this address at once".into(),
                        ));
                    };
                    let (tx, rx) = watch::channel(None);
                    pending.insert(digest, rx.clone());
                    // On its own: a caller that gives up (the proxy's deadline)
                    // does not throw the answer away, which its next call finds
                    // cached.
                    let this = self.clone();
                    let token = token.to_string();
                    tokio::spawn(async move {
                        // Taken out however the review ends (a panic too): the
                        // token's next call starts a review of its own.
                        let _unlisted = Unlist(this.pending.clone(), digest);
                        let answer = this.ask(token, digest, expires_in, source).await;
                        drop(turn);
                        let _ = tx.send(Some(answer));
                    });
                    rx
                }
            }
        };
        match answer.wait_for(Option::is_some).await {
            Ok(a) => a.clone().unwrap_or(Err(TokenError::Unknown)),
            Err(_) => Err(TokenError::Unavailable(
                "the token's review ended without an answer".into(),
            )),
        }
    }

    /// Has the API server review `token`, and keeps the answer. Bounded: a
    /// flood of made-up tokens costs the API server a few reviews at a time,
    /// each of them briefly; and the wait for a turn and the review together
    /// end before a proxy's own deadline for its call. The review has its
    /// own time, whatever the wait took: sharing one deadline, a review that
    /// waited long was sent with too little left and cut off, so under load
    /// the API server got nearly every review and answered almost none in time.
    async fn ask(
        &self,
        token: String,
        digest: TokenDigest,
        expires_in: Duration,
        source: Option<IpAddr>,
    ) -> Result<ObjKey, TokenError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        // Queued callers hold their requests, and a proxy's own check must not
        // wait behind a flood.
        let turn =
            tokio::time::timeout(defaults::TOKEN_REVIEW_QUEUE_WAIT, self.in_flight.acquire());
        let Ok(Ok(_permit)) = turn.await else {
            return Err(TokenError::Unavailable(
                "the controller is busy checking other tokens; try again".into(),
            ));
        };
        let params = PostParams::default();
        let call = self.api.create(&params, &review);
        let answer = match tokio::time::timeout(defaults::TOKEN_REVIEW_TIMEOUT, call).await {
            Ok(Ok(r)) => account(&r, &self.audience),
            // Not cached: the API server may answer the next time.
            // Sampled: an API server in trouble fails every review.
            Ok(Err(e)) => {
                strait_otel::sampled!(warn, error = %e, "TokenReview failed");
                return Err(review_failed(&e));
            }
            Err(_) => {
                strait_otel::sampled!(warn, "TokenReview timed out");
                return Err(TokenError::Unavailable(
                    "the API server did not answer the token's review in time".into(),
                ));
            }
        };
        let now = Instant::now();
        if let (Err(TokenError::Unknown), Some(s)) = (&answer, source) {
            self.refusing.refused(s, now);
        }
        let (cache, max, ttl) = match &answer {
            // Never past the token's own expiry.
            Ok(_) => (&self.cache, CACHE_MAX, CACHE_TTL.min(expires_in)),
            Err(_) => (&self.refused, REFUSALS_MAX, REFUSAL_TTL),
        };
        if let Ok(mut cache) = cache.lock() {
            if cache.len() >= max {
                cache.retain(|_, (until, _)| now < *until);
            }
            // Full of live answers: the new one is not kept (proxies' real
            // tokens, already there, are worth more than a flood's).
            if cache.len() < max {
                cache.insert(digest, (now + ttl, answer.clone()));
            }
        }
        answer
    }
}

/// Why a review the API server answered with an error proves nothing, in
/// words that tell a cluster without the controller's RBAC from one whose
/// API server is in trouble: every proxy's calls fail alike either way.
fn review_failed(e: &kube::Error) -> TokenError {
    TokenError::Unavailable(match e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => format!(
            "the API server refused the controller's TokenReview (HTTP {}): may the \
             controller's service account create tokenreviews.authentication.k8s.io?",
            s.code
        ),
        kube::Error::Api(s) => format!(
            "the API server answered the token's review with HTTP {} ({})",
            s.code, s.reason
        ),
        _ => "the controller could not reach the API server to review the token".into(),
    })
}

/// Whether `token` could be a service account token for `audience` that has
/// not expired: a JWT whose claims (read, not verified: the review verifies)
/// name the audience and a future expiry. `Some(time left)` when it could.
fn plausible(token: &str, audience: &str, now: std::time::SystemTime) -> Option<Duration> {
    let claims = claims(token)?;
    let ours = match &claims["aud"] {
        serde_json::Value::String(a) => a == audience,
        serde_json::Value::Array(a) => a.iter().any(|a| a == audience),
        _ => false,
    };
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let exp = claims["exp"].as_u64().filter(|exp| ours && *exp > now)?;
    Some(Duration::from_secs(exp - now))
}

/// A JWT's claims, read, not verified.
fn claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(_), Some(claims), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    serde_json::from_slice(&claims).ok()
}

/// When a token that was verified expires: its `exp`, for a JWT that has
/// one (a projected service-account token's hour), else never.
pub fn expiry(token: &[u8]) -> Option<std::time::SystemTime> {
    let exp = claims(std::str::from_utf8(token).ok()?.trim())?["exp"].as_u64()?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// The service account an answered review proves: authenticated, for our
/// audience, and a service account's user name.
fn account(r: &TokenReview, audience: &str) -> Result<ObjKey, TokenError> {
    let status = r.status.as_ref().ok_or(TokenError::Unknown)?;
    if status.authenticated != Some(true) {
        return Err(TokenError::Unknown);
    }
    // The API server echoes the audiences the token is valid for; a server that
    // ignores audiences would echo none, and then the token may be any token.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(TokenError::Unknown);
    }
    let user = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .ok_or(TokenError::Unknown)?;
    let rest = user
        .strip_prefix("system:serviceaccount:")
        .ok_or(TokenError::Unknown)?;
    let (namespace, name) = rest.split_once(':').ok_or(TokenError::Unknown)?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return Err(TokenError::Unknown);
    }
    Ok(ObjKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::tokens::{REFUSALS_PER_SOURCE, REFUSALS_WINDOW};
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn reviewed(authenticated: bool, user: &str, audiences: &[&str]) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(user.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn jwt(claims: serde_json::Value) -> String {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"signature")
        )
    }

    /// A reviewer whose API server answers every review, after `delay`,
    /// that the token is `shop/web`'s; with the count of reviews asked.
    fn reviewer_answering_web_after(
        delay: Duration,
    ) -> (TokenReviewer, Arc<std::sync::atomic::AtomicUsize>) {
        let aud = defaults::TOKEN_AUDIENCE;
        let body =
            serde_json::to_value(reviewed(true, "system:serviceaccount:shop:web", &[aud])).unwrap();
        reviewer_answering(201, body, delay)
    }

    /// A reviewer whose API server answers every review with `status` and
    /// `body` after `delay`; with the count of reviews asked.
    fn reviewer_answering(
        status: u16,
        body: serde_json::Value,
        delay: Duration,
    ) -> (TokenReviewer, Arc<std::sync::atomic::AtomicUsize>) {
        let posts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = posts.clone();
        let api = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = serde_json::to_vec(&body).unwrap();
            async move {
                tokio::time::sleep(delay).await;
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body))
            }
        });
        (TokenReviewer::new(kube::Client::new(api, "default")), posts)
    }

    /// A controller whose ClusterRole does not let it create TokenReviews
    /// says so to every proxy it refuses, rather than blaming the API
    /// server's speed; a slow API server is still named as such.
    #[tokio::test(start_paused = true)]
    async fn a_review_the_api_server_refuses_says_why() {
        let aud = defaults::TOKEN_AUDIENCE;
        let token = jwt(serde_json::json!({"aud": [aud], "exp": unix_now() + 3600}));
        let pod: Option<IpAddr> = Some("10.0.0.7".parse().unwrap());
        let forbidden = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
            "reason": "Forbidden",
            "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:strait:strait\" cannot create resource \"tokenreviews\"",
        });
        let (r, _) = reviewer_answering(403, forbidden, Duration::ZERO);
        let Err(TokenError::Unavailable(why)) = r.review(token.as_bytes(), pod).await else {
            panic!("not unavailable");
        };
        assert!(why.contains("HTTP 403"), "{why}");
        assert!(why.contains("tokenreviews"), "{why}");
        let busy = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429,
            "reason": "TooManyRequests", "message": "slow down",
        });
        let (r, _) = reviewer_answering(429, busy, Duration::ZERO);
        let Err(TokenError::Unavailable(why)) = r.review(token.as_bytes(), pod).await else {
            panic!("not unavailable");
        };
        assert!(why.contains("HTTP 429 (TooManyRequests)"), "{why}");
        let (r, _) = reviewer_answering_web_after(defaults::TOKEN_REVIEW_TIMEOUT * 2);
        let Err(TokenError::Unavailable(why)) = r.review(token.as_bytes(), pod).await else {
            panic!("not unavailable");
        };
        assert!(why.contains("did not answer"), "{why}");
    }

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Made-up tokens from one address are reviewed a few times per window,
    /// then not until it ends; other addresses are not affected.
    #[tokio::test(start_paused = true)]
    async fn an_address_refused_too_often_waits_for_its_window() {
        let r = Refusing::default();
        let (pod, other): (IpAddr, IpAddr) =
            ("10.0.0.7".parse().unwrap(), "10.0.0.8".parse().unwrap());
        let now = Instant::now();
        for _ in 0..REFUSALS_PER_SOURCE {
            assert!(!r.exhausted(pod, now));
            r.refused(pod, now);
        }
        assert!(r.exhausted(pod, now));
        assert!(!r.exhausted(other, now));
        tokio::time::advance(REFUSALS_WINDOW).await;
        let later = Instant::now();
        assert!(!r.exhausted(pod, later), "a new window");
        r.refused(pod, later);
        assert!(!r.exhausted(pod, later), "counted from 0 again");
    }

    /// Addresses past those the map keeps count together by network, and
    /// networks past as many all together: a host with thousands of
    /// addresses cannot guess uncounted from the next, nor hold up a new
    /// pod's first certificate elsewhere.
    #[tokio::test(start_paused = true)]
    async fn addresses_past_those_counted_share_one_window() {
        let r = Refusing::default();
        let now = Instant::now();
        let addr =
            |i: u32| IpAddr::from(std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)));
        for i in 0..4096 {
            r.refused(addr(i), now);
        }
        for i in 0..REFUSALS_PER_SOURCE {
            let next = addr(5000 + i);
            assert!(!r.exhausted(next, now), "{i}");
            r.refused(next, now);
        }
        assert!(
            r.exhausted(addr(9999), now),
            "the rest of its network waits with them"
        );
        assert!(
            !r.exhausted(addr(0), now),
            "a counted address keeps its own"
        );
        let net = |i: u128| IpAddr::from(std::net::Ipv6Addr::from(0xfd02_u128 << 112 | i << 64));
        assert!(
            !r.exhausted(net(0), now),
            "another network's new address is not held up"
        );
        // Past as many networks, the rest share one window: thousands of
        // networks guess no faster than one.
        for i in 0..4096 {
            r.refused(net(i), now);
        }
        for i in 0..REFUSALS_PER_SOURCE {
            r.refused(net(5000 + u128::from(i)), now);
        }
        assert!(r.exhausted(net(9999), now), "the rest wait together");
        tokio::time::advance(REFUSALS_WINDOW).await;
        assert!(!r.exhausted(addr(9999), Instant::now()), "a new window");
    }

    /// A token that expires while its review is under way proves nothing:
    /// neither the review's answer nor the answer kept is taken past its
    /// `exp` (a certificate signed for it would last a day).
    #[tokio::test]
    async fn a_token_that_expired_during_its_review_is_refused() {
        let aud = defaults::TOKEN_AUDIENCE;
        // Real time: the token's expiry is read from the clock.
        let (r, _) = reviewer_answering_web_after(Duration::from_millis(2100));
        let exp = unix_now() + 1;
        let token = jwt(serde_json::json!({"aud": [aud], "exp": exp}));
        let pod: Option<IpAddr> = Some("10.0.0.7".parse().unwrap());
        assert_eq!(
            r.review(token.as_bytes(), pod).await,
            Err(TokenError::Unknown)
        );
        assert_eq!(
            r.review(token.as_bytes(), pod).await,
            Err(TokenError::Unknown),
            "nor from what was kept"
        );
    }

    /// One review answers every call with a token while it is under way,
    /// and its answer is kept though its callers gave up waiting for it.
    #[tokio::test(start_paused = true)]
    async fn a_token_is_reviewed_once_whoever_waits_for_it() {
        use std::sync::atomic::Ordering;
        let aud = defaults::TOKEN_AUDIENCE;
        let (r, posts) = reviewer_answering_web_after(Duration::from_secs(3));
        let exp = unix_now() + 3600;
        let token = jwt(serde_json::json!({"aud": [aud], "exp": exp}));
        let pod: Option<IpAddr> = Some("10.0.0.7".parse().unwrap());
        let web = ObjKey {
            namespace: "shop".into(),
            name: "web".into(),
        };
        // Six calls at once, more than an address's share of reviews.
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let (r, token) = (r.clone(), token.clone());
                tokio::spawn(async move { r.review(token.as_bytes(), pod).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), Ok(web.clone()));
        }
        assert_eq!(posts.load(Ordering::SeqCst), 1);
        // A caller that gives up before the answer (a proxy's deadline)...
        let other = jwt(serde_json::json!({"aud": [aud], "exp": exp, "n": 1}));
        let gave_up =
            tokio::time::timeout(Duration::from_secs(1), r.review(other.as_bytes(), pod)).await;
        assert!(gave_up.is_err());
        // ...finds it when it asks again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(r.review(other.as_bytes(), pod).await, Ok(web));
        assert_eq!(posts.load(Ordering::SeqCst), 2);
    }

    /// More tokens at once than reviews may be in flight, with an API server
    /// slow to answer (a whole cluster starting): every review sent is
    /// answered in time and counts, and those left waiting are told the
    /// controller is busy without costing the API server a review.
    #[tokio::test(start_paused = true)]
    async fn a_crowd_of_tokens_costs_no_review_that_is_cut_off() {
        use std::sync::atomic::Ordering;
        let aud = defaults::TOKEN_AUDIENCE;
        let (r, posts) = reviewer_answering_web_after(Duration::from_millis(2500));
        let exp = unix_now() + 3600;
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let r = r.clone();
                let token = jwt(serde_json::json!({"aud": [aud], "exp": exp, "n": i}));
                let pod: Option<IpAddr> =
                    Some(format!("10.1.{}.{}", i / 200, i % 200).parse().unwrap());
                tokio::spawn(async move { r.review(token.as_bytes(), pod).await })
            })
            .collect();
        let mut answered = 0;
        for c in calls {
            if c.await.unwrap().is_ok() {
                answered += 1;
            }
        }
        assert_eq!(answered, defaults::TOKEN_REVIEWS_IN_FLIGHT);
        assert_eq!(
            posts.load(Ordering::SeqCst),
            answered,
            "reviews sent and cut off"
        );
    }

    #[test]
    fn only_a_token_that_could_be_ours_goes_to_the_api_server() {
        let aud = defaults::TOKEN_AUDIENCE;
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let live = serde_json::json!({"aud": [aud], "exp": 1_000_600});
        // How long it has left bounds how long its answer is kept.
        assert_eq!(
            plausible(&jwt(live), aud, now),
            Some(Duration::from_secs(600))
        );
        assert!(
            plausible(
                &jwt(serde_json::json!({"aud": aud, "exp": 1_000_600})),
                aud,
                now
            )
            .is_some()
        );
        for bad in [
            "not a token".to_string(),
            "a.b.c".to_string(),
            jwt(serde_json::json!({"aud": ["https://kubernetes.default.svc"], "exp": 1_000_600})),
            jwt(serde_json::json!({"aud": [aud], "exp": 999_999})),
            jwt(serde_json::json!({"aud": [aud]})),
            format!(
                "{}.extra",
                jwt(serde_json::json!({"aud": [aud], "exp": 1_000_600}))
            ),
        ] {
            assert!(plausible(&bad, aud, now).is_none(), "{bad}");
        }
    }

    #[test]
    fn only_an_authenticated_service_account_token_for_our_audience_proves_an_account() {
        let aud = defaults::TOKEN_AUDIENCE;
        let ok = account(
            &reviewed(true, "system:serviceaccount:shop:web", &[aud]),
            aud,
        )
        .unwrap();
        assert_eq!((ok.namespace.as_str(), ok.name.as_str()), ("shop", "web"));
        for bad in [
            reviewed(false, "system:serviceaccount:shop:web", &[aud]),
            reviewed(
                true,
                "system:serviceaccount:shop:web",
                &["https://kubernetes.default.svc"],
            ),
            reviewed(true, "system:serviceaccount:shop:web", &[]),
            reviewed(true, "alice@example.com", &[aud]),
            reviewed(true, "system:serviceaccount:shop", &[aud]),
            reviewed(true, "system:serviceaccount::web", &[aud]),
            TokenReview::default(),
        ] {
            assert_eq!(account(&bad, aud), Err(TokenError::Unknown));
        }
    }
}
