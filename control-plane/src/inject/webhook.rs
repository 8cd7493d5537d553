//! The admission webhooks: AdmissionReview v1 in; for pods the injection
//! patch (or the reason there is none) out, for policies the controller's
//! verdict (`validate`).
//!
//! Two paths, because a webhook is not told its namespace's labels: the
//! webhook configuration sends pods of namespaces labelled
//! `strait.dev/inject=enabled` to `/inject/enabled-namespace`, and every other
//! pod (outside the system namespaces) to `/inject`, where only the pod's own
//! annotation asks for injection.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use rustls::ServerConfig;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::budget::Budget;
use super::{Namespace, Outcome, Settings, inject};
use crate::defaults;

pub const PATH: &str = "/inject";
pub const ENABLED_NAMESPACE_PATH: &str = "/inject/enabled-namespace";

/// What happens to a pod that asks for injection and cannot have it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Refuse the pod, with the reason: a workload never runs unmeshed by accident.
    Fail,
    /// Admit it without the sidecar, with the reason as a warning.
    Ignore,
}

/// An acceptor for a certificate and key from files (a Secret mounted in the
/// pod), taken again when they change.
pub fn acceptor_from_files(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let files = super::cert_files::FromFiles::watch(cert, key)?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(files);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves the webhook on `listener`. From `draining` (the controller was told
/// to stop) connections are not kept alive: the review in flight on each is
/// answered, then it closes, so the API server's next call opens a new one,
/// which the Service sends to a replica that stays once this pod has left it.
/// At `stop` no more are accepted, and this returns once every connection
/// has closed.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    settings: Arc<Settings>,
    policy: FailurePolicy,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    // Any pod can reach the webhook's Service: connections are bounded, and
    // so is the time each may take, and the memory all of them hold; at the
    // bound a new connection takes the longest idle one's place.
    let places = super::places::Places::new(defaults::WEBHOOK_MAX_CONNECTIONS);
    let budget = Arc::new(Budget::new(defaults::WEBHOOK_BODY_BUDGET));
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                strait_otel::sampled!(warn, error = %e, "webhook accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let place = tokio::select! {
            p = places.take() => p,
            () = stop.cancelled() => break,
        };
        let (acceptor, settings, draining, budget) = (
            acceptor.clone(),
            settings.clone(),
            draining.clone(),
            budget.clone(),
        );
        conns.spawn(async move {
            let place = Arc::new(place);
            let close = place.close.clone();
            // Given to a new connection (it was idle the longest, and for
            // `places::GRACE` at least), or its body is late and a review
            // needs its room: closed at once.
            let reviews = async move {
                // A caller that stops reading its answers is cut off rather
                // than holding its place: hyper reads nothing while a write
                // waits.
                let tcp = strait_api::write_deadline::WriteDeadline::new(
                    tcp,
                    defaults::TLS_HANDSHAKE_TIMEOUT,
                );
                let handshake =
                    tokio::time::timeout(defaults::TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "webhook TLS handshake failed"),
                    Err(_) => return debug!(%peer, "webhook TLS handshake timed out"),
                };
                let svc = service_fn(move |req| {
                    let (settings, budget, place) =
                        (settings.clone(), budget.clone(), place.clone());
                    async move {
                        place.asked();
                        Ok::<_, Infallible>(handle(req, &settings, policy, &budget, &place).await)
                    }
                });
                // Made while draining: one review, then closed.
                let keep_alive = !draining.is_cancelled();
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(defaults::TLS_HANDSHAKE_TIMEOUT)
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(tls), svc);
                tokio::pin!(conn);
                if keep_alive {
                    tokio::select! {
                        biased;
                        _ = conn.as_mut() => return,
                        () = draining.cancelled() => {}
                    }
                    // The review in flight is answered, then the connection
                    // closes; an idle one closes at once.
                    conn.as_mut().graceful_shutdown();
                }
                let _ = conn.await;
            };
            tokio::select! {
                () = reviews => {}
                () = close.cancelled() => {
                    debug!(%peer, "webhook connection closed for another: idle the longest, or its body late");
                }
            }
        });
    }
    // No more connections: the listener closes, and callers are refused
    // rather than left in its backlog.
    drop(listener);
    conns.close();
    conns.wait().await;
}

async fn handle(
    req: Request<Incoming>,
    s: &Settings,
    policy: FailurePolicy,
    budget: &Budget,
    place: &super::places::Place,
) -> Response<Full<Bytes>> {
    let hook = match req.uri().path() {
        PATH => Hook::Inject(Namespace::NotEnabled),
        ENABLED_NAMESPACE_PATH => Hook::Inject(Namespace::Enabled),
        super::validate::PATH => Hook::Validate,
        _ => {
            return closing(text(
                StatusCode::NOT_FOUND,
                "not found; the webhooks are at /inject and /validate\n",
            ));
        }
    };
    if req.method() != Method::POST {
        return closing(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n",
        ));
    }
    let deadline = tokio::time::Instant::now() + defaults::TLS_HANDSHAKE_TIMEOUT;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > defaults::MAX_ADMISSION_REVIEW_BYTES as u64) {
        return closing(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the AdmissionReview is too large\n",
        ));
    }
    let Some(mut room) = budget.room(declared, deadline, place).await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many AdmissionReviews at once; try again\n",
        );
    };
    let read = Limited::new(req.into_body(), defaults::MAX_ADMISSION_REVIEW_BYTES).collect();
    let body = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            return closing(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the AdmissionReview is too large, too slow or cut short\n",
            ));
        }
    };
    room.body_read();
    // In a review from here: a connection that sent a head and holds back
    // its body is as idle as one that sends nothing, and gives way as soon.
    let _busy = place.busy();
    let Ok(Ok(_parsing)) = tokio::time::timeout_at(deadline, budget.parsing.acquire()).await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many AdmissionReviews at once; try again\n",
        );
    };
    let (status, review) = review(&body, hook, s, policy);
    let json = serde_json::to_vec(&review).unwrap_or_default();
    let mut rsp = Response::new(Full::new(Bytes::from(json)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // Not a review the API server would send.
    if status == StatusCode::BAD_REQUEST {
        return closing(rsp);
    }
    rsp
}

/// What a path of the webhook server does.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// Injects pods (`inject`).
    Inject(Namespace),
    /// Checks policies (`validate`).
    Validate,
}

/// The answer to one AdmissionReview: 200 with the response, or 400 with an
/// `invalid` response naming what is wrong with the review itself.
pub fn review(
    body: &[u8],
    hook: Hook,
    s: &Settings,
    policy: FailurePolicy,
) -> (StatusCode, AdmissionReview<DynamicObject>) {
    let invalid = |why: String| {
        // Anyone who reaches the port can send these, as often and as long
        // as they like (serde's message quotes what it could not read).
        strait_otel::sampled!(
            warn,
            reason = super::clipped(&why),
            "malformed AdmissionReview"
        );
        (
            StatusCode::BAD_REQUEST,
            AdmissionResponse::invalid(why).into_review(),
        )
    };
    if values_in(body) > defaults::MAX_ADMISSION_REVIEW_VALUES {
        return invalid(format!(
            "the AdmissionReview holds more than {} values",
            defaults::MAX_ADMISSION_REVIEW_VALUES
        ));
    }
    let Reviewed { req, object, old } = match read(body) {
        Ok(r) => r,
        Err(e) => return invalid(format!("not an AdmissionReview: {e}")),
    };
    let rsp = match hook {
        Hook::Inject(ns) => respond(&req, object, ns, s, policy),
        Hook::Validate => super::validate::respond(&req, object, old.as_ref()),
    };
    (StatusCode::OK, rsp.into_review())
}

/// At most how many values the JSON `body` holds: one more than its commas
/// and colons outside strings. Read in one pass, without allocating.
fn values_in(body: &[u8]) -> usize {
    let (mut n, mut in_string, mut escaped) = (1, false, false);
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if b == b',' || b == b':' {
            n += 1;
        }
    }
    n
}

/// A review's request, and its objects as JSON (in `req`, none).
pub struct Reviewed {
    pub req: AdmissionRequest<DynamicObject>,
    pub object: Option<Value>,
    pub old: Option<Value>,
}

/// Reads a review, its objects taken out before kube's types read the rest:
/// those flatten, which serde does by buffering the whole, then copying it,
/// so a 4 MiB review of small values (any pod may send one) held three
/// copies at once, 220 MiB, against the controller's memory limit. The
/// objects are read once, and moved.
pub fn read(body: &[u8]) -> Result<Reviewed, serde_json::Error> {
    fn take(v: &mut Value, at: &str) -> Option<Value> {
        v.pointer_mut(at).map(Value::take).filter(|o| !o.is_null())
    }
    let mut v: Value = serde_json::from_slice(body)?;
    let object = take(&mut v, "/request/object");
    let old = take(&mut v, "/request/oldObject");
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(v)?;
    let req = review.try_into().map_err(serde::de::Error::custom)?;
    Ok(Reviewed { req, object, old })
}

fn respond(
    req: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    ns: Namespace,
    s: &Settings,
    policy: FailurePolicy,
) -> AdmissionResponse {
    let rsp = AdmissionResponse::from(req);
    let meta = |k: &str| object.as_ref()?.get("metadata")?.get(k)?.as_str();
    let pod_name = meta("name").or(meta("generateName")).unwrap_or_default();
    let pod = format!(
        "{}/{pod_name}",
        req.namespace.as_deref().unwrap_or("default")
    );
    // Only pods are injected; anything else sent here passes untouched.
    let Some(object) = object.filter(|_| req.kind.kind == "Pod") else {
        return rsp;
    };
    let outcome = inject(&object, ns, s);
    match outcome {
        Ok(Outcome::Inject(patch)) => match rsp.clone().with_patch(patch) {
            Ok(r) => {
                // Sampled: the pod's name is the caller's word, and any pod
                // can send reviews.
                strait_otel::sampled!(info, pod = super::clipped(&pod), "injected");
                r
            }
            Err(e) => fail(rsp, policy, &pod, &e.to_string()),
        },
        Ok(Outcome::Skip(why)) => {
            debug!(pod = super::clipped(&pod), reason = why, "not injected");
            rsp
        }
        Err(e) => fail(rsp, policy, &pod, &e.to_string()),
    }
}

fn fail(
    mut rsp: AdmissionResponse,
    policy: FailurePolicy,
    pod: &str,
    why: &str,
) -> AdmissionResponse {
    let reason = format!("strait cannot inject the proxy: {why}");
    // A pod's annotation values (up to 256 KiB) may be in the reason.
    strait_otel::sampled!(
        warn,
        pod = super::clipped(pod),
        reason = super::clipped(&reason),
        ?policy,
        "injection failed"
    );
    match policy {
        FailurePolicy::Fail => rsp.deny(reason),
        FailurePolicy::Ignore => {
            rsp.warnings = Some(vec![reason]);
            rsp
        }
    }
}

/// Closes the connection after `rsp`: the API server sends nothing but
/// reviews it may read, and a connection sending anything else would
/// otherwise hold one of the webhook's places for as long as it kept at it.
fn closing(mut rsp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    rsp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    rsp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp
}
