//! Protocol detection on whatever a client sends first: never a panic, the
//! bytes read are kept whole for the next reader, and HTTP/2 only on the
//! complete preface.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strait_proxy::detect::{Protocol, detect};

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let got = rt()
        .block_on(detect(&mut input, Duration::from_millis(10), 8 * 1024))
        .expect("reading a slice cannot fail");
    match got {
        None => assert!(data.is_empty()),
        Some(d) => {
            assert!(data.starts_with(&d.prefix), "the prefix is what was read");
            if d.protocol == Protocol::Http2 {
                assert!(d.prefix.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
            }
        }
    }
});
