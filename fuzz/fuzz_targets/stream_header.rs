//! What a peer proxy says about the target port of a request (the
//! `strait-target-port` and `strait-orig-proto` headers): either a refusal or
//! a port of the app that is not one of the proxy's own, with the headers gone.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};

use http::{HeaderValue, Request};
use libfuzzer_sys::fuzz_target;
use strait_proxy::addr::{DestAddr, OwnAddrs, TargetPort};
use strait_proxy::defaults::{MESH_PORTS, ORIG_PROTO_HEADER, TARGET_PORT_HEADER};
use strait_proxy::http::dst::ChooseDst;
use strait_proxy::inbound::dst::{InboundDst, TargetRules};

const OWN: [u16; 3] = [4143, 4140, 4191];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.split(|&b| b == b'\n');
    let redirected = parts
        .next()
        .filter(|p| p.len() >= 2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .filter(|p| *p != 0 && flags & 1 == 1)
        .map(TargetPort);
    let mut req = Request::builder().body(()).expect("request");
    for (i, value) in parts.enumerate().take(4) {
        let Ok(v) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = if i == 2 { ORIG_PROTO_HEADER } else { TARGET_PORT_HEADER };
        req.headers_mut().append(name, v);
    }
    let rules = TargetRules {
        own: OwnAddrs::new(OWN.map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))),
        trust_carried: flags & 2 == 2,
    };
    let dst = InboundDst::new(redirected, rules, Ipv4Addr::LOCALHOST.into());
    if let Ok(DestAddr::Socket(addr)) = dst.choose(&mut req) {
        let port = addr.port();
        assert!(port != 0 && !OWN.contains(&port) && !MESH_PORTS.contains(&port));
        assert!(!req.headers().contains_key(TARGET_PORT_HEADER));
        assert!(!req.headers().contains_key(ORIG_PROTO_HEADER));
    }
});
