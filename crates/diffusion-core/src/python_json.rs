//! Reading the JSON that diffusers writes, which is Python's JSON: non-finite floats appear as
//! the bare tokens `Infinity`, `-Infinity` and `NaN` (every saved `DPMSolverMultistepScheduler`
//! config has `"lambda_min_clipped": -Infinity`). Strict JSON parsers reject them, so they are
//! turned into strings before parsing, and the few fields that can hold them accept those
//! strings. [`crate::config::parse_json`] applies this to every config it reads.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
#[cfg(test)]
use serde_json::Value;

const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];

/// Quote Python's non-finite float tokens that stand outside strings, so that the text becomes
/// strict JSON. Text without them is returned unchanged.
pub fn quote_nonfinite_tokens(text: &str) -> Cow<'_, str> {
    if !TOKENS.iter().any(|t| text.contains(t)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

/// serde `deserialize_with` for a float that diffusers may write as `-Infinity`/`Infinity`/
/// `NaN` (quoted by [`quote_nonfinite_tokens`]); `null` means `-inf`, the one default for which
/// it occurs (`lambda_min_clipped`).
///
/// # Errors
/// A serde error for anything but a number, one of those strings, or null.
pub fn f64_or_nonfinite<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
        Null(()),
    }
    match Repr::deserialize(deserializer)? {
        Repr::Number(v) => Ok(v),
        Repr::Null(()) => Ok(f64::NEG_INFINITY),
        Repr::Text(s) => match s.as_str() {
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!(
                "expected a number or -Infinity, got the string {other:?}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_tokens_are_quoted_but_strings_are_left_alone() {
        let text = r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "say -Infinity \" NaN"}"#;
        let quoted = quote_nonfinite_tokens(text);
        let v: Value = serde_json::from_str(&quoted).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"][0], "Infinity");
        assert_eq!(v["b"][1], "NaN");
        assert_eq!(v["c"], "say -Infinity \" NaN");
        assert!(matches!(quote_nonfinite_tokens("{}"), Cow::Borrowed(_)));
    }
}
