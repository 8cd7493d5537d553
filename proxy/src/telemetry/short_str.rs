//! A string kept inline when short. What a span records of each request (its
//! path, the host the caller addressed) is usually a few dozen bytes; kept in
//! the record rather than on the heap, it costs the serving thread no
//! allocation and the export thread no free of another thread's memory.

use super::access_log::bounded_str;

/// Bytes kept inline at most (the whole value is 48 bytes).
const INLINE: usize = 46;

#[derive(Clone)]
pub enum ShortStr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl ShortStr {
    /// `s`, cut to `MAX_FIELD` bytes as the access log cuts it.
    pub fn bounded(s: &str) -> ShortStr {
        if s.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            return ShortStr::Inline {
                len: s.len() as u8,
                bytes,
            };
        }
        ShortStr::Heap(bounded_str(s).into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Copied whole from a `&str`, so always UTF-8.
            ShortStr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            ShortStr::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl From<ShortStr> for String {
    fn from(s: ShortStr) -> String {
        match s {
            ShortStr::Inline { .. } => s.as_str().to_string(),
            ShortStr::Heap(h) => h.into_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::access_log::MAX_FIELD;

    #[test]
    fn short_strings_stay_inline_and_long_ones_are_cut_like_log_fields() {
        let s = ShortStr::bounded("/api/v1/orders");
        assert!(matches!(s, ShortStr::Inline { .. }));
        assert_eq!(s.as_str(), "/api/v1/orders");
        let edge = "é".repeat(INLINE / 2);
        assert_eq!(ShortStr::bounded(&edge).as_str(), edge);
        let long = format!("/{}", "ü".repeat(MAX_FIELD));
        let cut = ShortStr::bounded(&long);
        assert_eq!(cut.as_str(), bounded_str(&long));
        assert!(cut.as_str().len() <= MAX_FIELD + '…'.len_utf8());
        let mid = "x".repeat(INLINE + 1);
        assert_eq!(String::from(ShortStr::bounded(&mid)), mid);
    }
}
