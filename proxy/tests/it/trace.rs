//! The proxies' own trace exports.

use std::time::Duration;

use strait_tests::backend::Backend;
use strait_tests::client;
use strait_tests::otlp::{Mode, OtlpCollector};

use crate::support;

/// A collector behind a proxy that traces everything (a meshed collector's
/// sidecar; here an upstream listener in front of it) gets a request's span
/// and none for the exports that carried it: each export says its trace is
/// not sampled, which the proxy follows. Traced, each export would make a
/// span, exported in turn, and so on for ever.
#[tokio::test]
async fn exports_are_not_traced_by_a_proxy_they_pass() {
    let collector = OtlpCollector::start(Mode::Accept).await;
    let mut c = support::with_upstream(support::config(), collector.addr);
    c.otlp_endpoint = Some(collector.endpoint());
    c.trace_sampling = 1.0;
    let sidecar = support::start(c).await;
    let backend = Backend::start().await;
    let mut c = support::with_upstream(support::config(), backend.addr);
    c.otlp_endpoint = Some(format!("http://{}", sidecar.upstream()));
    c.trace_sampling = 1.0;
    let app = support::start(c).await;
    let url = format!("http://{}/traced", app.upstream());
    let (status, _) = client::get(&client::http1(), &url).await.unwrap();
    assert_eq!(status, 200);
    let path = |s: &strait_tests::otlp::Received| s.attr("url.path").unwrap_or_default();
    collector
        .wait_until(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| path(s) == "/traced")
        })
        .await;
    // Each sends what it has queued as it stops: the sidecar last, with
    // the spans of every export it carried, were they traced.
    assert!(app.stop().await);
    assert!(sidecar.stop().await);
    let spans = collector.spans();
    assert!(spans.iter().any(|s| path(s) == "/traced"), "{spans:#?}");
    let traced: Vec<_> = spans
        .iter()
        .filter(|s| path(s).ends_with("/Export"))
        .collect();
    assert!(traced.is_empty(), "exports traced: {traced:#?}");
}
