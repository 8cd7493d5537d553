//! The encoded size of a view, as protobuf puts it on the wire (prost's
//! `encoded_len`): what a proxy must take in one message.

/// What a message of `len` bytes adds as one entry of a repeated field: its
/// key (every field of the protocol is numbered under 16: one byte), its
/// length, its contents.
pub fn entry(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use strait_api::v1 as api;

    use super::*;

    /// A Service as an update's one field adds up as its entry does.
    #[test]
    fn an_entry_is_what_a_message_adds_to_its_parent() {
        for n in [0, 1, 100, 200, 20_000] {
            let s = api::Service {
                name: "x".repeat(n),
                ..Default::default()
            };
            let u = api::DestinationUpdate {
                kind: Some(api::destination_update::Kind::Service(s.clone())),
            };
            assert_eq!(u.encoded_len(), entry(s.encoded_len()), "{n}");
        }
    }
}
