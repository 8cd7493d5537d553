//! What the specs of strait's and Gateway API's objects share: errors that name
//! the field, the object's key, Gateway API durations and DNS names.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::index::ObjKey;

/// A spec that fails validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// `Err` when a list holds more than `max` entries.
    pub fn at_most(field: impl Into<String>, len: usize, max: usize) -> Result<(), SpecError> {
        if len > max {
            return Err(SpecError::new(
                field,
                format!("{len} entries, more than the limit of {max}"),
            ));
        }
        Ok(())
    }

    /// From serde: the path it stopped at and its message.
    pub fn from_serde(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        SpecError::new(e.path().to_string(), e.inner().to_string())
    }
}

/// An object's namespace/name (namespace "default" when absent), validated as the
/// index's keys are: namespaces end up in identities and destination names,
/// and are DNS labels, as Kubernetes has them and as proxies ask by them.
pub fn key(meta: &ObjectMeta) -> Result<ObjKey, SpecError> {
    let name = meta
        .name
        .clone()
        .ok_or_else(|| SpecError::new("metadata.name", "missing"))?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    if !dns_label(&namespace) {
        return Err(SpecError::new(
            "metadata.namespace",
            format!("{namespace:?} is not a namespace name"),
        ));
    }
    Ok(ObjKey { namespace, name })
}

/// A Gateway API duration (GEP-2257): one to four components, each one to five
/// digits and a unit among h, m, s and ms (`1h`, `1m30s`, `200ms`, `0s`).
pub fn duration(field: &str, s: &str) -> Result<Duration, SpecError> {
    let bad = || {
        SpecError::new(
            field,
            format!(
                "{s:?} is not a duration (one to four of <1-5 digits><h|m|s|ms>, e.g. 1s, 1m30s, 200ms)"
            ),
        )
    };
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u32 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        // "ms" before "m": `1ms` is a millisecond, not a minute and an "s".
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes().first() {
                Some(b'h') => (Duration::from_secs(3600), 1),
                Some(b'm') => (Duration::from_secs(60), 1),
                Some(b's') => (Duration::from_secs(1), 1),
                _ => return Err(bad()),
            }
        };
        rest = &rest[len..];
        total += unit * n;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// As sent to the proxies.
pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below a billion by construction.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A DNS label (RFC 1123), as Service names are.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS name (RFC 1123 subdomain): labels joined by dots.
pub fn dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

/// A label's name part, or a value when not empty: at most 63 characters,
/// alphanumeric at both ends, `-`, `_` and `.` between.
fn label_name(s: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    !s.is_empty()
        && s.len() <= 63
        && alnum(s.as_bytes().first())
        && alnum(s.as_bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A label key as Kubernetes takes it: a name, after an optional DNS
/// subdomain prefix and `/`.
pub fn label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => dns_name(prefix) && label_name(name),
        None => label_name(s),
    }
}

/// A label value as Kubernetes takes it (empty is one).
pub fn label_value(s: &str) -> bool {
    s.is_empty() || label_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_are_kubernetes_own() {
        for k in ["app", "app.kubernetes.io/name", "a_b-c.d", "x/y"] {
            assert!(label_key(k), "{k}");
        }
        for k in [
            "",
            "*",
            "my app",
            "-app",
            "a/b/c",
            "Bad_Prefix/x",
            "/x",
            "x/",
        ] {
            assert!(!label_key(k), "{k}");
        }
        for v in ["", "web", "v1.2", "A_b"] {
            assert!(label_value(v), "{v}");
        }
        for v in ["*", "web*", "two words", "-web", &"x".repeat(64)] {
            assert!(!label_value(v), "{v}");
        }
    }

    #[test]
    fn gateway_durations_parse_and_others_are_refused() {
        for (s, want) in [
            ("0s", Duration::ZERO),
            ("200ms", Duration::from_millis(200)),
            ("1s", Duration::from_secs(1)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m30s500ms", Duration::from_millis(5_430_500)),
            ("00060m", Duration::from_secs(3600)),
        ] {
            assert_eq!(duration("f", s), Ok(want), "{s}");
        }
        for s in [
            "",
            "1",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "1us",
            "123456s",
            "1h1m1s1ms1h",
            " 1s",
            "1S",
        ] {
            let e = duration("spec.x", s).unwrap_err();
            assert_eq!(e.field, "spec.x", "{s}");
        }
    }

    #[test]
    fn durations_reach_the_proxies_exactly() {
        let d = proto_duration(Duration::from_millis(1_500));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
    }
}
