//! Workload YAML written back after injection, so that kubectl reads what
//! was meant. kubectl reads YAML 1.1 and the parser here 1.2, and the two
//! disagree on plain scalars: `on` and `yes` are booleans to kubectl, a
//! plain `0644` an octal number. So every string is written double-quoted
//! (JSON's escapes, which both read alike), and a file mode written in
//! octal is read as kubectl would.

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
        Value::Number(n) => n.to_string(),
        Value::String(s) => quoted(s),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        _ => return None,
    })
}

fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
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

/// File modes (`defaultMode`, `mode`) as kubectl reads them: a plain `0644`
/// is octal to YAML 1.1 (420), and a string to this parser, which the API
/// server would refuse where it wants a number.
pub fn octal_modes(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
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
            "spec": {"replicas": 3, "paused": false, "x": null, "ratio": 0.5,
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
