//! HTTP/2 and gRPC through the proxy: unary and streaming calls, status codes in
//! trailers, and many concurrent streams on one connection.

use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use http_body_util::BodyExt;
use strait_api::testing::EchoRequest;
use strait_api::testing::echo_client::EchoClient;
use strait_tests::backend::Backend;
use strait_tests::client;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{self, metric};

async fn echo_client() -> (EchoClient<Channel>, support::TestProxy) {
    let server = strait_tests::grpc::start_echo().await;
    let proxy = support::start_to(server).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.upstream()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    (EchoClient::new(channel), proxy)
}

fn req(message: &str, fail_code: i32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        fail_code,
        repeat: 0,
    }
}

#[tokio::test]
async fn grpc_unary_ok_and_error_statuses() {
    let (mut c, proxy) = echo_client().await;
    let rsp = c.unary(req("hi", 0)).await.unwrap();
    assert_eq!(rsp.into_inner().message, "hi");

    let err = c
        .unary(req("nope", Code::PermissionDenied as i32))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("nope"), "{err}");
    let err = c
        .unary(req("gone", Code::Unavailable as i32))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_protocol_detected_connections_total{direction=\"outbound\",protocol=\"http2\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn grpc_bidi_streaming_interleaves_and_ends_with_status() {
    let (mut c, _proxy) = echo_client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Each reply arrives before the next request is sent: true streaming, no buffering.
    for i in 0..20 {
        tx.send(req(&format!("m{i}"), 0)).await.unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!((r.message.as_str(), r.seq), (format!("m{i}").as_str(), i));
    }
    tx.send(req("boom", Code::ResourceExhausted as i32))
        .await
        .unwrap();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn grpc_server_streaming_delivers_every_message() {
    let (mut c, _proxy) = echo_client().await;
    let mut s = c
        .server_stream(EchoRequest {
            message: "tick".into(),
            fail_code: 0,
            repeat: 500,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(r) = s.message().await.unwrap() {
        assert_eq!(r.seq, n);
        n += 1;
    }
    assert_eq!(n, 500);
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let (c, proxy) = echo_client().await;
    let calls = (0..800).map(|i| {
        let mut c = c.clone();
        async move {
            c.unary(req(&format!("{i}"), 0))
                .await
                .map(|r| r.into_inner().message)
        }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i.to_string());
    }
    let m = proxy.metrics_text();
    assert_eq!(
        metric(
            &m,
            "strait_proxy_tcp_connections_total{direction=\"outbound\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn http2_trailers_pass_through() {
    let backend = Backend::start().await;
    let proxy = support::start_to(backend.addr).await;
    let c = client::http2();
    let rsp = c
        .get(
            format!("http://{}/trailers", proxy.upstream())
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(
        rsp.headers()["x-seen-version"],
        "HTTP/2.0",
        "HTTP/2 end to end"
    );
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(collected.to_bytes().as_ref(), b"body");
    let mut frames = 0;
    let mut body = c
        .get(
            format!("http://{}/bytes/300000", proxy.upstream())
                .parse()
                .unwrap(),
        )
        .await
        .unwrap()
        .into_body()
        .into_data_stream();
    let mut total = 0;
    while let Some(d) = body.next().await {
        total += d.unwrap().len();
        frames += 1;
    }
    assert_eq!(total, 300000);
    assert!(frames > 1, "streamed, not one buffered blob");
}

/// A gRPC call the proxy answers itself (its upstream refuses connections)
/// is UNAVAILABLE to the caller, answered as HTTP 200 with a grpc-status, and
/// still counted as the proxy's own answer, by why.
#[tokio::test]
async fn a_grpc_call_the_proxy_answers_is_counted_as_its_own() {
    let gone = support::refused_addr();
    let proxy = support::start_to(gone).await;
    let channel = Channel::from_shared(format!("http://{}", proxy.upstream()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = EchoClient::new(channel)
        .unary(req("hi", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(
        support::outbound_proxy_errors(&proxy, "connect"),
        Some(1.0),
        "{}",
        proxy.metrics_text()
    );
}
