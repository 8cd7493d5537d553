//! What web-0's proxy says it did to the traffic, read from its admin `/metrics`
//! (Prometheus text): the retries, timeouts and ejections behind the live table.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

/// How long a tick waits for the metrics before showing the table without them.
const FETCH_TIMEOUT: Duration = Duration::from_millis(500);

/// The traffic-policy counters of one proxy, each summed over its labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub retries: u64,
    pub timeouts: u64,
    pub ejections: u64,
    pub ejected_now: u64,
}

impl PolicyCounters {
    pub fn parse(text: &str) -> Self {
        PolicyCounters {
            retries: sample_sum(text, "strait_proxy_route_retries_total"),
            timeouts: sample_sum(text, "strait_proxy_route_timeouts_total"),
            ejections: sample_sum(text, "strait_proxy_backend_ejections_total"),
            ejected_now: sample_sum(text, "strait_proxy_backend_ejected_endpoints"),
        }
    }
}

/// The sum of every sample of metric `name` (any labels), rounded to a whole
/// number; lines that are not samples of it, or whose value does not parse, are
/// skipped.
fn sample_sum(text: &str, name: &str) -> u64 {
    let total: f64 = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                '{' => after_labels(rest)?,
                ' ' => rest,
                _ => return None, // another metric sharing the prefix
            };
            let v: f64 = value.split_whitespace().next()?.parse().ok()?;
            v.is_finite().then_some(v)
        })
        .sum();
    total.max(0.0).round() as u64
}

/// What follows a `{...}` label set, `}` inside quoted values included.
fn after_labels(s: &str) -> Option<&str> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return s.get(i + 1..),
            _ => {}
        }
    }
    None
}

/// Fetches and parses a proxy's metrics; `None` if it did not answer in time.
pub async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &http::Uri,
) -> Option<PolicyCounters> {
    let get = async {
        let rsp = client.get(url.clone()).await.ok()?;
        if !rsp.status().is_success() {
            return None;
        }
        let body = rsp.into_body().collect().await.ok()?.to_bytes();
        Some(PolicyCounters::parse(&String::from_utf8_lossy(&body)))
    };
    tokio::time::timeout(FETCH_TIMEOUT, get)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_their_labels() {
        let text = r#"# HELP strait_proxy_route_retries Retries sent per route rule.
# TYPE strait_proxy_route_retries counter
strait_proxy_route_retries_total{service="demo/api:80",route="demo/api",rule="catch-all"} 12
strait_proxy_route_retries_total{service="demo/api:80",route="demo/api",rule="odd}\"name"} 3
# TYPE strait_proxy_route_retries_skipped counter
strait_proxy_route_retries_skipped_total{service="demo/api:80",route="demo/api",rule="catch-all",reason="budget_exhausted"} 100
# TYPE strait_proxy_route_timeouts counter
strait_proxy_route_timeouts_total{service="demo/api:80",route="demo/api",rule="slow",reason="request"} 7 1700000000
# TYPE strait_proxy_backend_ejections counter
strait_proxy_backend_ejections_total{service="demo/api:80",backend="demo/api:80"} 2
strait_proxy_backend_ejections_total{service="demo/api:80",backend="demo/api-v2:80"} 0
# TYPE strait_proxy_backend_ejected_endpoints gauge
strait_proxy_backend_ejected_endpoints{service="demo/api:80",backend="demo/api:80"} 1
strait_proxy_backend_ejected_endpoints_created 5
strait_proxy_http_requests_total{direction="outbound"} not-a-number
# EOF
"#;
        assert_eq!(
            PolicyCounters::parse(text),
            PolicyCounters {
                retries: 15,
                timeouts: 7,
                ejections: 2,
                ejected_now: 1,
            }
        );
    }

    #[test]
    fn metrics_without_traffic_policy_read_as_zero() {
        let text = "# TYPE strait_proxy_http_requests counter\nstrait_proxy_http_requests_total{direction=\"outbound\"} 40\n# EOF\n";
        assert_eq!(PolicyCounters::parse(text), PolicyCounters::default());
    }
}
