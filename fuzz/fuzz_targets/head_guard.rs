//! A client's HTTP/1 bytes through the head guard as the proxy serves them
//! (the raw head scan, hyper's parser, then `check_head`): whatever arrives,
//! no panic, and no request with both Content-Length and Transfer-Encoding,
//! or with more than one Host, gets past the guard.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use strait_proxy::http::conn_guard::{ConnState, GuardedIo, InFlightBody, InFlightCap, InFlightLayer};
use strait_proxy::http::normalize::check_head;
use tokio::io::AsyncWriteExt;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

async fn guarded(mut req: Request<InFlightBody<Incoming>>) -> Result<Response<String>, Infallible> {
    let status = match check_head(&mut req) {
        Ok(()) => {
            let h = req.headers();
            assert!(
                !(h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING)),
                "both framings passed the guard"
            );
            assert!(h.get_all(header::HOST).iter().count() <= 1, "two Hosts passed");
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut rsp = Response::new(String::new());
    *rsp.status_mut() = status;
    Ok(rsp)
}

fuzz_target!(|data: &[u8]| {
    rt().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let state = Arc::new(ConnState::default());
        let io = GuardedIo::new(server, state.clone(), Duration::from_millis(50), Duration::from_millis(50));
        let svc = tower::ServiceBuilder::new()
            .layer(InFlightLayer::new(state, InFlightCap::new(usize::MAX)))
            .service(tower::service_fn(guarded));
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), hyper_util::service::TowerToHyperService::new(svc));
        let write = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Read what the server answers until it closes, so it never blocks.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(conn, write) }).await;
    });
});
