//! strait's BackendPolicy (`policy.strait.dev/v1alpha1`): how the endpoints of a
//! Service are reached (connect timeout, load balancing, outlier ejection, retry
//! budget) and which of its ports are opaque. Attached by `targetRef` to a Service
//! of the policy's namespace. Unknown fields are errors: a misspelt setting
//! silently ignored would look applied and not be.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use strait_api::v1 as api;

use crate::authz::TargetRef;
use crate::defaults;
use crate::index::ObjKey;
use crate::spec::{self, SpecError, dns_label, proto_duration};

/// A BackendPolicy, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendPolicySpec {
    pub connect_timeout: Option<Duration>,
    pub load_balancer: Option<LoadBalancer>,
    pub outlier_detection: Option<OutlierDetection>,
    pub retry_budget: Option<RetryBudget>,
    pub opaque_ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadBalancer {
    PeakEwma,
    RoundRobin,
    ConsistentHash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 0: never eject.
    pub consecutive_failures: u32,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_retries_per_second: u32,
    pub ttl: Option<Duration>,
}

#[derive(Deserialize)]
struct Doc {
    metadata: ObjectMeta,
    spec: SpecDoc,
}

/// A BackendPolicy: the Service it governs, and how its endpoints are
/// reached.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, CustomResource)]
#[kube(
    group = "policy.strait.dev",
    version = "v1alpha1",
    kind = "BackendPolicy",
    namespaced,
    doc = "How a Service's endpoints are reached: connect timeout, load balancing, outlier ejection, retry budget, opaque ports.",
    status = "crate::crds::PolicyStatus",
    shortname = "bp",
    category = "strait",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpecDoc {
    /// The Service (in the policy's namespace) whose endpoints this policy governs.
    pub target_ref: TargetRef,
    /// Timeout of a TCP connect to an endpoint (e.g. 500ms, 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerDoc>,
    /// Circuit breaking: endpoints that fail in a row are ejected for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDoc>,
    /// How many retries callers may add on top of their requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetDoc>,
    /// Ports of the Service carried as opaque TCP (no protocol detection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opaque_ports: Vec<i64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
pub enum LoadBalancerType {
    #[serde(rename = "PeakEWMA")]
    PeakEwma,
    RoundRobin,
    ConsistentHash,
}

/// How requests are spread over the endpoints.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerDoc {
    /// PeakEWMA (the default), RoundRobin or ConsistentHash.
    #[serde(rename = "type")]
    pub kind: LoadBalancerType,
    /// ConsistentHash: the request header whose value picks the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// ConsistentHash: the cookie whose value picks the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDoc {
    /// Failures in a row that eject an endpoint (0: never eject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<i64>,
    /// The first ejection's length; each further one doubles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The longest an ejection lasts, however often the endpoint fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// At most this share of the endpoints is ejected at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetDoc {
    /// Retries allowed per request, on average (0.2: one retry per five requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries always allowed, whatever the ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<i64>,
    /// The window over which the ratio is measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// Parses and validates one BackendPolicy: its own key, the Service it targets,
/// and its spec.
pub fn parse(v: &serde_json::Value) -> Result<(ObjKey, ObjKey, BackendPolicySpec), SpecError> {
    let doc: Doc = serde_path_to_error::deserialize(v).map_err(SpecError::from_serde)?;
    let key = spec::key(&doc.metadata)?;
    let s = doc.spec;
    let t = &s.target_ref;
    if t.kind != "Service" || !(t.group.is_empty() || t.group == "core") {
        return Err(SpecError::new(
            "spec.targetRef.kind",
            format!("{:?}/{:?}: only a Service can be targeted", t.group, t.kind),
        ));
    }
    if !dns_label(&t.name) {
        return Err(SpecError::new(
            "spec.targetRef.name",
            format!("{:?} is not a Service name", t.name),
        ));
    }
    let target = ObjKey {
        namespace: key.namespace.clone(),
        name: t.name.clone(),
    };
    let connect_timeout = s
        .connect_timeout
        .as_ref()
        .map(|d| positive("spec.connectTimeout", d))
        .transpose()?;
    let load_balancer = s.load_balancer.as_ref().map(load_balancer).transpose()?;
    let outlier_detection = s.outlier_detection.as_ref().map(outlier).transpose()?;
    let retry_budget = s.retry_budget.as_ref().map(retry_budget).transpose()?;
    // Bounded, as a Service's ports are: the duplicates check below is
    // quadratic in the list.
    crate::spec::SpecError::at_most(
        "spec.opaquePorts",
        s.opaque_ports.len(),
        crate::defaults::MAX_SERVICE_PORTS,
    )?;
    let mut opaque_ports = Vec::new();
    for (i, p) in s.opaque_ports.iter().enumerate() {
        let port = u16::try_from(*p).ok().filter(|p| *p != 0).ok_or_else(|| {
            SpecError::new(
                format!("spec.opaquePorts[{i}]"),
                format!("{p} is not a port (1-65535)"),
            )
        })?;
        if !opaque_ports.contains(&port) {
            opaque_ports.push(port);
        }
    }
    let policy = BackendPolicySpec {
        connect_timeout,
        load_balancer,
        outlier_detection,
        retry_budget,
        opaque_ports,
    };
    Ok((key, target, policy))
}

/// A duration that must be more than zero (zero would read as "the default").
fn positive(field: &str, v: &str) -> Result<Duration, SpecError> {
    let d = spec::duration(field, v)?;
    if d.is_zero() {
        return Err(SpecError::new(field, "must be more than 0s"));
    }
    Ok(d)
}

fn load_balancer(lb: &LoadBalancerDoc) -> Result<LoadBalancer, SpecError> {
    let keys = (lb.hash_header.as_ref(), lb.hash_cookie.as_ref());
    match lb.kind {
        LoadBalancerType::ConsistentHash => match keys {
            (Some(h), None) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                Ok(LoadBalancer::ConsistentHash(HashKey::Header(h.clone())))
            }
            (Some(h), None) => Err(SpecError::new(
                "spec.loadBalancer.hashHeader",
                format!("{h:?} is not a header name"),
            )),
            (None, Some(c)) if cookie_name(c) => {
                Ok(LoadBalancer::ConsistentHash(HashKey::Cookie(c.clone())))
            }
            (None, Some(c)) => Err(SpecError::new(
                "spec.loadBalancer.hashCookie",
                format!("{c:?} is not a cookie name"),
            )),
            _ => Err(SpecError::new(
                "spec.loadBalancer",
                "ConsistentHash needs exactly one of hashHeader and hashCookie",
            )),
        },
        _ if keys != (None, None) => Err(SpecError::new(
            "spec.loadBalancer",
            "hashHeader and hashCookie apply only to type ConsistentHash",
        )),
        LoadBalancerType::PeakEwma => Ok(LoadBalancer::PeakEwma),
        LoadBalancerType::RoundRobin => Ok(LoadBalancer::RoundRobin),
    }
}

/// RFC 6265: a cookie name is an HTTP token.
fn cookie_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn outlier(o: &OutlierDoc) -> Result<OutlierDetection, SpecError> {
    const AT: &str = "spec.outlierDetection";
    // Required: left out, it would read as 0, which turns ejection off.
    let consecutive_failures = match o.consecutive_failures {
        None => {
            return Err(SpecError::new(
                format!("{AT}.consecutiveFailures"),
                "missing: how many failures in a row eject an endpoint (0 never ejects)",
            ));
        }
        Some(n) => u32::try_from(n).map_err(|_| {
            SpecError::new(
                format!("{AT}.consecutiveFailures"),
                format!("{n} is not 0 or more"),
            )
        })?,
    };
    let base_ejection_time = o
        .base_ejection_time
        .as_ref()
        .map(|d| positive(&format!("{AT}.baseEjectionTime"), d))
        .transpose()?;
    let max_ejection_time = o
        .max_ejection_time
        .as_ref()
        .map(|d| positive(&format!("{AT}.maxEjectionTime"), d))
        .transpose()?;
    // Against the proxies' default base too: a shorter maximum would be
    // raised to it, unsaid.
    if let Some(max) = max_ejection_time
        && max < base_ejection_time.unwrap_or(defaults::BREAKER_BASE_EJECTION)
    {
        return Err(SpecError::new(
            format!("{AT}.maxEjectionTime"),
            match base_ejection_time {
                Some(_) => "shorter than baseEjectionTime".to_string(),
                None => format!(
                    "shorter than baseEjectionTime, {}s when not given",
                    defaults::BREAKER_BASE_EJECTION.as_secs()
                ),
            },
        ));
    }
    let max_ejection_percent = o
        .max_ejection_percent
        .map(|p| {
            u32::try_from(p)
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| {
                    SpecError::new(
                        format!("{AT}.maxEjectionPercent"),
                        format!("{p} is not 1-100 (to never eject, set consecutiveFailures: 0)"),
                    )
                })
        })
        .transpose()?;
    Ok(OutlierDetection {
        consecutive_failures,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent,
    })
}

fn retry_budget(b: &RetryBudgetDoc) -> Result<RetryBudget, SpecError> {
    const AT: &str = "spec.retryBudget";
    // Both required: left out, each would read as 0 and allow no retries.
    let ratio = b
        .ratio
        .ok_or_else(|| SpecError::new(format!("{AT}.ratio"), "missing (0 to 1)"))?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(SpecError::new(
            format!("{AT}.ratio"),
            format!("{ratio} is not between 0 and 1"),
        ));
    }
    let max = defaults::MAX_RETRY_BUDGET_MIN_PER_SECOND;
    let min_retries_per_second = match b.min_retries_per_second {
        None => {
            return Err(SpecError::new(
                format!("{AT}.minRetriesPerSecond"),
                format!("missing (0 to {max})"),
            ));
        }
        Some(n) => u32::try_from(n).ok().filter(|n| *n <= max).ok_or_else(|| {
            SpecError::new(
                format!("{AT}.minRetriesPerSecond"),
                format!("{n} is not 0 to {max}"),
            )
        })?,
    };
    let ttl = match &b.ttl {
        None => None,
        Some(t) => {
            let field = format!("{AT}.ttl");
            let d = spec::duration(&field, t)?;
            if !defaults::RETRY_BUDGET_TTL.contains(&d) {
                return Err(SpecError::new(
                    field,
                    format!(
                        "{t} is not between {:?} and {:?}",
                        defaults::RETRY_BUDGET_TTL.start(),
                        defaults::RETRY_BUDGET_TTL.end()
                    ),
                ));
            }
            Some(d)
        }
    };
    Ok(RetryBudget {
        ratio,
        min_retries_per_second,
        ttl,
    })
}

impl BackendPolicySpec {
    pub fn to_api(&self) -> api::BackendPolicy {
        let (load_balancer, consistent_hash) = match &self.load_balancer {
            None => (api::LoadBalancer::Unspecified, None),
            Some(LoadBalancer::PeakEwma) => (api::LoadBalancer::PeakEwma, None),
            Some(LoadBalancer::RoundRobin) => (api::LoadBalancer::RoundRobin, None),
            Some(LoadBalancer::ConsistentHash(k)) => {
                use api::consistent_hash::Key;
                let key = match k {
                    HashKey::Header(h) => Key::Header(h.clone()),
                    HashKey::Cookie(c) => Key::Cookie(c.clone()),
                };
                (
                    api::LoadBalancer::ConsistentHash,
                    Some(api::ConsistentHash { key: Some(key) }),
                )
            }
        };
        api::BackendPolicy {
            connect_timeout: self.connect_timeout.map(proto_duration),
            circuit_breaker: self
                .outlier_detection
                .as_ref()
                .map(|o| api::CircuitBreaker {
                    consecutive_failures: o.consecutive_failures,
                    base_ejection_time: o.base_ejection_time.map(proto_duration),
                    max_ejection_percent: o.max_ejection_percent.unwrap_or(0),
                    max_ejection_time: o.max_ejection_time.map(proto_duration),
                }),
            retry_budget: self.retry_budget.as_ref().map(|b| api::RetryBudget {
                ratio: b.ratio,
                min_retries_per_second: b.min_retries_per_second,
                ttl: b.ttl.map(proto_duration),
            }),
            load_balancer: load_balancer as i32,
            consistent_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn policy() -> Value {
        json!({
            "apiVersion": "policy.strait.dev/v1alpha1", "kind": "BackendPolicy",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {
                "targetRef": {"group": "", "kind": "Service", "name": "api"},
                "connectTimeout": "1s",
                "loadBalancer": {"type": "ConsistentHash", "hashHeader": "x-user"},
                "outlierDetection": {"consecutiveFailures": 5, "baseEjectionTime": "5s", "maxEjectionTime": "5m", "maxEjectionPercent": 50},
                "retryBudget": {"ratio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s"},
                "opaquePorts": [5432]
            }
        })
    }

    #[test]
    fn a_full_policy_reaches_the_proxies_as_written() {
        let (key, target, spec) = parse(&policy()).unwrap();
        assert_eq!(
            (key.to_string(), target.to_string()),
            ("shop/api".into(), "shop/api".into())
        );
        assert_eq!(spec.opaque_ports, vec![5432]);
        let p = spec.to_api();
        assert_eq!(p.connect_timeout.map(|d| d.seconds), Some(1));
        assert_eq!(p.load_balancer, api::LoadBalancer::ConsistentHash as i32);
        assert_eq!(
            p.consistent_hash.and_then(|h| h.key),
            Some(api::consistent_hash::Key::Header("x-user".into()))
        );
        let cb = p.circuit_breaker.unwrap();
        assert_eq!((cb.consecutive_failures, cb.max_ejection_percent), (5, 50));
        assert_eq!(cb.max_ejection_time.map(|d| d.seconds), Some(300));
        let rb = p.retry_budget.unwrap();
        assert_eq!((rb.ratio, rb.min_retries_per_second), (0.2, 10));
        assert_eq!(rb.ttl.map(|d| d.seconds), Some(10));

        // Every field is optional.
        let mut v = policy();
        v["spec"] = json!({"targetRef": {"kind": "Service", "name": "api"}});
        let (_, _, spec) = parse(&v).unwrap();
        assert_eq!(spec.to_api(), api::BackendPolicy::default());
    }

    #[test]
    fn a_misspelt_or_out_of_range_setting_is_refused_naming_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("/spec/connectTimeOut", json!("1s"), "spec.connectTimeOut"),
            (
                "/spec/outlierDetection/consecutiveFailure",
                json!(5),
                "spec.outlierDetection.consecutiveFailure",
            ),
            ("/spec/connectTimeout", json!("0s"), "spec.connectTimeout"),
            ("/spec/connectTimeout", json!("1 s"), "spec.connectTimeout"),
            (
                "/spec/loadBalancer/type",
                json!("Random"),
                "spec.loadBalancer.type",
            ),
            (
                "/spec/loadBalancer/hashCookie",
                json!("session"),
                "spec.loadBalancer",
            ),
            (
                "/spec/loadBalancer/hashHeader",
                json!("x user"),
                "spec.loadBalancer.hashHeader",
            ),
            (
                "/spec/outlierDetection/maxEjectionPercent",
                json!(101),
                "spec.outlierDetection.maxEjectionPercent",
            ),
            (
                "/spec/outlierDetection/maxEjectionTime",
                json!("1s"),
                "spec.outlierDetection.maxEjectionTime",
            ),
            (
                "/spec/outlierDetection/consecutiveFailures",
                json!(-1),
                "spec.outlierDetection.consecutiveFailures",
            ),
            (
                "/spec/retryBudget/ratio",
                json!(1.5),
                "spec.retryBudget.ratio",
            ),
            (
                "/spec/retryBudget/ttl",
                json!("61s"),
                "spec.retryBudget.ttl",
            ),
            (
                "/spec/retryBudget/ttl",
                json!("500ms"),
                "spec.retryBudget.ttl",
            ),
            (
                "/spec/retryBudget/minRetriesPerSecond",
                json!(-3),
                "spec.retryBudget.minRetriesPerSecond",
            ),
            ("/spec/opaquePorts/0", json!(70000), "spec.opaquePorts[0]"),
            (
                "/spec/opaquePorts",
                json!(vec![5432; 257]),
                "spec.opaquePorts",
            ),
            (
                "/spec/targetRef/kind",
                json!("Deployment"),
                "spec.targetRef.kind",
            ),
        ];
        for (ptr, value, field) in cases {
            let mut v = policy();
            let (parent, last) = ptr.rsplit_once('/').unwrap();
            match v.pointer_mut(parent).unwrap() {
                Value::Object(m) => {
                    m.insert(last.into(), value);
                }
                Value::Array(a) => a[last.parse::<usize>().unwrap()] = value,
                other => panic!("{other}"),
            }
            let e = parse(&v).unwrap_err();
            assert_eq!(e.field, field, "{ptr}: {e}");
        }
        // A maximum below the base the proxies would use is refused, not raised.
        let mut v = policy();
        v["spec"]["outlierDetection"] = json!({"consecutiveFailures": 5, "maxEjectionTime": "2s"});
        let e = parse(&v).unwrap_err();
        assert_eq!(e.field, "spec.outlierDetection.maxEjectionTime", "{e}");
        assert!(e.to_string().contains("5s when not given"), "{e}");
        v["spec"]["outlierDetection"]["maxEjectionTime"] = json!("5s");
        assert!(parse(&v).is_ok());
        let mut v = policy();
        v["spec"]["loadBalancer"] = json!({"type": "RoundRobin", "hashHeader": "x"});
        assert_eq!(parse(&v).unwrap_err().field, "spec.loadBalancer");
        v["spec"]["loadBalancer"] = json!({"type": "ConsistentHash"});
        assert_eq!(parse(&v).unwrap_err().field, "spec.loadBalancer");
        v["spec"]["loadBalancer"] = json!({"type": "PeakEWMA"});
        v["spec"]["outlierDetection"] = json!({"baseEjectionTime": "5s"});
        assert_eq!(
            parse(&v).unwrap_err().field,
            "spec.outlierDetection.consecutiveFailures"
        );
    }
}
