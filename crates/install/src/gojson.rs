//! Go `encoding/json` `MarshalIndent(v, "", "  ")` rendering of a `serde_json::Value`.
//!
//! The reference installer round-trips CNI config files through Go's generic
//! `map[string]interface{}` and writes them with `json.MarshalIndent`, so byte-identical output
//! needs Go's exact conventions:
//! * object keys sorted by byte order at every level ([`KeyOrder::Sorted`]) — or kept in
//!   insertion order for documents that Go marshals from a struct ([`KeyOrder::Insertion`]);
//! * 2-space indent, `": "` after keys, `{}` / `[]` for empty containers;
//! * HTML-safe string escaping: `<`, `>`, `&` as `\u003c`, `\u003e`, `\u0026`, U+2028/U+2029
//!   escaped, control characters as `\n`, `\r`, `\t`, `\b`, `\f` or `\u00XX` (lowercase hex);
//! * numbers: integers that fit 64 bits keep their digits (Go would round integers above 2^53
//!   through float64; we keep them exact rather than corrupt a user's config), other numbers use
//!   Go's float64 formatting (`1.0` → `1`, `1e21` → `1e+21`, `1e-7` → `1e-7`).
//!
//! The caller appends the trailing newline the installer writes.

use serde_json::{Number, Value};

/// How object keys are ordered in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Go `map[string]interface{}`: keys sorted by their UTF-8 bytes.
    Sorted,
    /// Go struct: fields in declaration order (the `Value` must have been built in that order;
    /// the workspace enables serde_json's `preserve_order`).
    Insertion,
}

/// Render `v` like Go's `json.MarshalIndent(v, "", "  ")` (no trailing newline).
pub fn marshal_indent(v: &Value, order: KeyOrder) -> String {
    let mut out = String::with_capacity(256);
    write_value(&mut out, v, order, 0);
    out
}

fn indent(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push_str("  ");
    }
}

fn write_value(out: &mut String, v: &Value, order: KeyOrder, depth: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_value(out, item, order, depth + 1);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if order == KeyOrder::Sorted {
                entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            }
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, val, order, depth + 1);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&go_float(f));
    } else {
        // Unreachable without serde_json's arbitrary_precision; keep serde's text.
        out.push_str(&n.to_string());
    }
}

/// Go's `encoding/json` float64 encoding (`floatEncoder.encode` with bits = 64).
pub fn go_float(f: f64) -> String {
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        // strconv 'e' format with shortest digits; Go writes at least two exponent digits and
        // then strips the leading zero of a negative two-digit exponent ("e-07" -> "e-7").
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((mant, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', exp),
                };
                let digits = if sign == '+' && digits.len() < 2 {
                    format!("0{digits}")
                } else {
                    digits.to_string()
                };
                format!("{mant}e{sign}{digits}")
            }
            None => s,
        }
    } else {
        // Rust's Display for f64 is the shortest round-trip decimal without exponent, which is
        // strconv.FormatFloat(f, 'f', -1, 64).
        format!("{f}")
    }
}

fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                let b = c as u32 as u8;
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            _ => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_float_formatting() {
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(1.5), "1.5");
        assert_eq!(go_float(0.000001), "0.000001");
        assert_eq!(go_float(1e-7), "1e-7");
        assert_eq!(go_float(1.25e-10), "1.25e-10");
        assert_eq!(go_float(1e21), "1e+21");
        assert_eq!(go_float(1.5e300), "1.5e+300");
        assert_eq!(go_float(123456789.0), "123456789");
        assert_eq!(go_float(-2.5), "-2.5");
        assert_eq!(go_float(0.0), "0");
    }

    #[test]
    fn escapes_like_go() {
        let v = json!({"a<b": "x&y>z\u{1}\u{2028}\"\\\n\t"});
        assert_eq!(
            marshal_indent(&v, KeyOrder::Sorted),
            "{\n  \"a\\u003cb\": \"x\\u0026y\\u003ez\\u0001\\u2028\\\"\\\\\\n\\t\"\n}"
        );
    }

    #[test]
    fn sorted_nested_and_empty() {
        let v: Value =
            serde_json::from_str(r#"{"b":{"z":1,"a":[]},"a":[{"y":{},"x":null}],"c":1.0}"#)
                .expect("valid json");
        assert_eq!(
            marshal_indent(&v, KeyOrder::Sorted),
            "{\n  \"a\": [\n    {\n      \"x\": null,\n      \"y\": {}\n    }\n  ],\n  \"b\": {\n    \"a\": [],\n    \"z\": 1\n  },\n  \"c\": 1\n}"
        );
        // Insertion order keeps the document's order.
        assert!(marshal_indent(&v, KeyOrder::Insertion).starts_with("{\n  \"b\""));
    }

    #[test]
    fn big_integers_keep_their_digits() {
        let v: Value = serde_json::from_str(r#"[18446744073709551615, -9223372036854775808]"#)
            .expect("valid json");
        assert_eq!(
            marshal_indent(&v, KeyOrder::Sorted),
            "[\n  18446744073709551615,\n  -9223372036854775808\n]"
        );
    }
}
