//! prost's gRPC codec with a smaller buffer per call. tonic allocates a call's
//! buffer size as the call starts and keeps it for the call's life: a
//! controller holds every proxy's long-lived watches (2,000 proxies with 21
//! streams each hold 330 MiB at tonic's 8 KiB, 41 MiB at 1 KiB), and a proxy
//! one per destination it calls. A larger message grows its own call's
//! buffer as it must.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes a call's encode or decode buffer starts with: most discovery and
/// policy updates fit (a Service of ten endpoints is under 1 KiB).
pub const CALL_BUFFER: usize = 1024;
/// A streaming call's encoded messages are handed on past this many bytes
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder as _, Encoder as _};

    use super::*;

    /// The generated services use it, both ways.
    #[test]
    fn calls_start_with_small_buffers() {
        let mut c =
            SmallBuffers::<crate::v1::DestinationUpdate, crate::v1::WatchDestination>::default();
        let small = format!("buffer_size: {CALL_BUFFER},");
        assert!(format!("{:?}", c.encoder().buffer_settings()).contains(&small));
        assert!(format!("{:?}", c.decoder().buffer_settings()).contains(&small));
        let generated = include_str!(concat!(env!("OUT_DIR"), "/strait.api.v1.rs"));
        assert!(!generated.contains("tonic_prost::ProstCodec"));
        assert!(generated.contains("crate::codec::SmallBuffers"));
    }
}
