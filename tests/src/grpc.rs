//! A gRPC echo server (tonic) that fails with a chosen status on request.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use strait_api::testing::echo_server::{Echo, EchoServer};
use strait_api::testing::{EchoReply, EchoRequest};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, Streaming};

#[derive(Debug, Default)]
struct EchoService {
    /// Counts unary calls; when set, every other one fails with UNAVAILABLE.
    flaky: Option<std::sync::atomic::AtomicUsize>,
}

fn check(req: &EchoRequest) -> Result<(), Status> {
    if req.fail_code != 0 {
        return Err(Status::new(
            Code::from(req.fail_code),
            format!("failing as asked: {}", req.message),
        ));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let req = req.into_inner();
        check(&req)?;
        if let Some(n) = &self.flaky
            && n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0
        {
            return Err(Status::unavailable("flaky: try again"));
        }
        Ok(Response::new(EchoReply {
            message: req.message,
            seq: 0,
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut input = req.into_inner();
        let output = async_stream(move |tx| async move {
            let mut seq = 0;
            while let Some(item) = input.next().await {
                let reply = item.and_then(|r| {
                    check(&r)?;
                    Ok(EchoReply {
                        message: r.message,
                        seq,
                    })
                });
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
                seq += 1;
            }
        });
        Ok(Response::new(output))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<EchoRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let req = req.into_inner();
        check(&req)?;
        let replies = (0..req.repeat).map(move |seq| {
            Ok(EchoReply {
                message: req.message.clone(),
                seq,
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(replies))))
    }
}

/// A stream fed by a task, so replies can be produced while requests still arrive.
fn async_stream<F, Fut>(f: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EchoReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Starts the echo server on an ephemeral loopback port.
pub async fn start_echo() -> SocketAddr {
    serve(EchoService::default()).await
}

/// An echo server whose unary calls fail with UNAVAILABLE every other time.
pub async fn start_flaky_echo() -> SocketAddr {
    serve(EchoService {
        flaky: Some(Default::default()),
    })
    .await
}

/// The echo service on `addr` (a pod's `0.0.0.0:PORT`, say).
pub async fn start_echo_on(addr: SocketAddr) -> SocketAddr {
    serve_on(EchoService::default(), addr).await
}

async fn serve(svc: EchoService) -> SocketAddr {
    serve_on(svc, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

async fn serve_on(svc: EchoService, addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("bind grpc");
    let addr = listener.local_addr().expect("grpc addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// A gRPC server whose streaming calls send one reply and then hang until
/// `lose` is notified, when every connection it has is dropped at once (its
/// process gone, as the caller sees it): no reset, no trailers.
pub async fn start_lost_mid_call() -> (SocketAddr, std::sync::Arc<tokio::sync::Notify>) {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind grpc");
    let addr = listener.local_addr().expect("grpc addr");
    let lose = std::sync::Arc::new(tokio::sync::Notify::new());
    let lost = lose.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let lost = lost.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    // EchoReply { message: "one" }, length-prefixed.
                    let reply =
                        bytes::Bytes::from_static(&[0, 0, 0, 0, 5, 0x0a, 3, b'o', b'n', b'e']);
                    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                        Frame::data(reply),
                    )])
                    .chain(futures_util::stream::pending());
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(StreamBody::new(frames))
                            .expect("response"),
                    )
                });
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = conn => {}
                    () = lost.notified() => {}
                }
            });
        }
    });
    (addr, lose)
}

/// A gRPC server that resets every call with `reason` before answering (as
/// grpc-java does with CANCEL when its own deadline passes), counting them.
pub async fn start_resetting(
    reason: h2::Reason,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind grpc");
    let addr = listener.local_addr().expect("grpc addr");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // hyper resets the stream with the code of the h2
                    // error a service fails with.
                    async move {
                        Err::<http::Response<http_body_util::Empty<bytes::Bytes>>, _>(
                            h2::Error::from(reason),
                        )
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (addr, calls)
}
