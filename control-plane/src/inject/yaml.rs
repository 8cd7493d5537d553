//! Workload YAML written back after injection, so that kubectl reads what
//! was meant. kubectl reads YAML 1.1 and the parser here 1.2, and the two
//! disagree on plain scalars: `on` and `yes` are booleans to kubectl, a
//! plain `0644` an octal number. So every string is written double-quoted,
//! with escapes both read alike, and what kubectl would have read as a
//! number or a boolean where the API wants one (file modes, Kubernetes'
//! boolean fields) is made one.

use serde_json::Value;

/// A document in block style, every string quoted.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match scalar(v) {
        Some(s) => {
            out.push_str(&s);
            out.push('\n');
        }
        None => block(v, 0, &mut out),
    }
    out
}

/// A value that fits on its line: scalars and empty collections.
fn scalar(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => quoted(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        _ => return None,
    })
}

/// Double-quoted, with every character a YAML 1.1 reader refuses raw
/// (controls, DEL, C1) or folds (its line breaks U+0085, U+2028, U+2029)
/// escaped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A number both read alike: a float has a point and a signed exponent
/// (`1e100` is a string to a strict YAML 1.1 reader).
fn number(n: &serde_json::Number) -> String {
    let s = n.to_string();
    if !n.is_f64() {
        return s;
    }
    let (mantissa, exponent) = match s.split_once(['e', 'E']) {
        Some((m, e)) => (m.to_string(), Some(e.to_string())),
        None => (s.clone(), None),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa
    } else {
        format!("{mantissa}.0")
    };
    match exponent {
        Some(e) if e.starts_with(['+', '-']) => format!("{mantissa}e{e}"),
        Some(e) => format!("{mantissa}e+{e}"),
        None => mantissa,
    }
}

/// Words YAML 1.1 reads as something other than a string.
const SPECIAL: [&str; 11] = [
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "",
];

/// A key plain where no reader could take it for anything but a string
/// (`app.kubernetes.io/name`), quoted otherwise.
fn key(k: &str) -> String {
    let plain = k.starts_with(|c: char| c.is_ascii_alphabetic())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && !SPECIAL.contains(&k.to_ascii_lowercase().as_str());
    if plain { k.to_string() } else { quoted(k) }
}

/// A non-empty map or sequence, its lines indented by `indent`.
fn block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                out.push_str(&pad);
                out.push_str(&key(k));
                out.push(':');
                match scalar(val) {
                    Some(s) => {
                        out.push(' ');
                        out.push_str(&s);
                        out.push('\n');
                    }
                    None => {
                        out.push('\n');
                        block(val, indent + 2, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                match scalar(item) {
                    Some(s) => {
                        out.push_str(&s);
                        out.push('\n');
                    }
                    None => {
                        // The item's first line takes the dash in its indent.
                        let mut inner = String::new();
                        block(item, indent + 2, &mut inner);
                        out.push_str(&inner[indent + 2..]);
                    }
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other).unwrap_or_default());
            out.push('\n');
        }
    }
}

/// A pod's volumes' file modes (`defaultMode`, `items[].mode`) as kubectl
/// reads them: a plain `0644` is octal to YAML 1.1 (420), and a string to
/// this parser, which the API server would refuse where it wants a number.
pub fn octal_modes(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if STRING_MAPS.contains(&k.as_str()) {
                    continue;
                }
                let octal = match &*val {
                    Value::String(s) if k == "defaultMode" || k == "mode" => octal(s),
                    _ => None,
                };
                match octal {
                    Some(n) => *val = n.into(),
                    None => octal_modes(val),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(octal_modes),
        _ => {}
    }
}

/// Kubernetes' boolean fields of a pod (and of the workloads that hold one),
/// where YAML 1.1 reads a plain `yes`, `on`, `y`... as a boolean.
const BOOL_FIELDS: [&str; 20] = [
    "readOnly",
    "privileged",
    "allowPrivilegeEscalation",
    "runAsNonRoot",
    "readOnlyRootFilesystem",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "hostUsers",
    "stdin",
    "stdinOnce",
    "tty",
    "optional",
    "automountServiceAccountToken",
    "shareProcessNamespace",
    "setHostnameAsFQDN",
    "enableServiceLinks",
    "paused",
    "suspend",
    "publishNotReadyAddresses",
];

/// Fields whose values are strings whatever they look like (labels,
/// annotations, a ConfigMap's data, a CSI volume's attributes): neither
/// booleans nor modes are read into them.
const STRING_MAPS: [&str; 9] = [
    "labels",
    "annotations",
    "nodeSelector",
    "matchLabels",
    "data",
    "stringData",
    "binaryData",
    "volumeAttributes",
    "parameters",
];

/// Booleans as kubectl reads them: where the API wants one, a YAML 1.1
/// boolean word (a string to this parser) becomes the boolean it meant.
pub fn yaml11_booleans(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                if STRING_MAPS.contains(&k.as_str()) {
                    continue;
                }
                let b = match &*val {
                    Value::String(s) if BOOL_FIELDS.contains(&k.as_str()) => yaml11_bool(s),
                    _ => None,
                };
                match b {
                    Some(b) => *val = Value::Bool(b),
                    None => yaml11_booleans(val),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(yaml11_booleans),
        _ => {}
    }
}

fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            Some(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            Some(false)
        }
        _ => None,
    }
}

fn octal(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('0')?;
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What YAML 1.1 and 1.2 read differently stays what it was.
    #[test]
    fn every_value_reads_back_the_same() {
        let v = json!({
            "apiVersion": "apps/v1",
            "metadata": {"labels": {"app.kubernetes.io/name": "web", "on": "yes"},
                         "annotations": {"a: b": "line\nbreak \"quoted\" \\ é", "n": ""}},
            "spec": {"replicas": 3, "paused": false, "x": null, "ratio": 0.5, "big": 1e100,
                     "odd": "del\u{7f} c1\u{85} ls\u{2028} nul\u{0} tab\t",
                     "containers": [{"name": "web", "env": [{"name": "A", "value": "on"},
                                                            {"name": "B", "value": "0644"},
                                                            {"name": "C", "value": "2024-01-01"},
                                                            {"name": "D", "value": "1:20"}],
                                     "args": [], "ports": [{"containerPort": 80}]}],
                     "nested": [[1, 2], [], [{"a": {}}]]}
        });
        let yaml = to_yaml(&v);
        let back: Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(back, v, "{yaml}");
        for quoted in [
            "\"on\"",
            "\"0644\"",
            "\"2024-01-01\"",
            "\"1:20\"",
            "\"on\": \"yes\"",
        ] {
            assert!(yaml.contains(quoted), "{quoted} in {yaml}");
        }
        assert!(yaml.contains("app.kubernetes.io/name: \"web\""), "{yaml}");
        assert!(yaml.contains("big: 1.0e+100"), "{yaml}");
        assert!(
            yaml.contains("\\u007f") && yaml.contains("\\u0085") && yaml.contains("\\u2028"),
            "{yaml}"
        );
    }

    #[test]
    fn a_yaml_1_1_boolean_word_is_a_boolean_where_kubernetes_wants_one() {
        let mut v: Value = serde_norway::from_str(
            "volumeMounts: [{name: a, mountPath: /a, readOnly: yes}]\nsecurityContext: {privileged: off}\nenv: [{name: A, value: \"on\"}]\n",
        )
        .unwrap();
        yaml11_booleans(&mut v);
        assert_eq!(v["volumeMounts"][0]["readOnly"], true);
        assert_eq!(v["securityContext"]["privileged"], false);
        assert_eq!(
            v["env"][0]["value"], "on",
            "a string field keeps its string"
        );
        // Labels and annotations are strings whatever their keys.
        let mut v: Value = serde_norway::from_str(
            "metadata: {annotations: {paused: \"yes\", mode: \"0755\"}, labels: {suspend: \"on\"}}\nvolumes: [{csi: {driver: d, volumeAttributes: {readOnly: \"yes\", mode: \"0755\"}}}]\n",
        )
        .unwrap();
        yaml11_booleans(&mut v);
        octal_modes(&mut v);
        assert_eq!(v["metadata"]["annotations"]["paused"], "yes");
        assert_eq!(v["metadata"]["annotations"]["mode"], "0755");
        assert_eq!(v["metadata"]["labels"]["suspend"], "on");
        assert_eq!(
            v["volumes"][0]["csi"]["volumeAttributes"]["readOnly"],
            "yes"
        );
        assert_eq!(v["volumes"][0]["csi"]["volumeAttributes"]["mode"], "0755");
    }

    #[test]
    fn a_plain_octal_mode_is_the_number_kubectl_reads() {
        let mut v: Value = serde_norway::from_str(
            "volumes:\n- secret: {secretName: a, defaultMode: 0644, items: [{key: k, path: p, mode: 0400}]}\n- configMap: {name: b, defaultMode: 420}\n- name: c\n  mode: \"rw\"\n",
        )
        .unwrap();
        octal_modes(&mut v);
        assert_eq!(v["volumes"][0]["secret"]["defaultMode"], 420);
        assert_eq!(v["volumes"][0]["secret"]["items"][0]["mode"], 256);
        assert_eq!(v["volumes"][1]["configMap"]["defaultMode"], 420);
        assert_eq!(v["volumes"][2]["mode"], "rw");
    }
}
