//! Values as they arrive from a file or a command line, their typed reading, and the
//! unknown-key error with its typo suggestion.

use crate::error::{ensure, invalid, Result};

/// A configuration value as it arrives from a file or a command line.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    IntList(Vec<i64>),
    StrList(Vec<String>),
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::IntList(_) => "a list of integers",
            Value::StrList(_) => "a list of strings",
        }
    }

    pub(super) fn usize(&self, key: &str) -> Result<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            Value::Float(f) if f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15 => Ok(*f as usize),
            Value::Int(i) => Err(invalid(key, format!("must be >= 0, got {i}"))),
            other => Err(invalid(
                key,
                format!("expected a non-negative integer, got {}", other.kind()),
            )),
        }
    }

    pub(super) fn positive(&self, key: &str) -> Result<usize> {
        let v = self.usize(key)?;
        ensure(v >= 1, key, || format!("must be >= 1, got {v}"))?;
        Ok(v)
    }

    pub(super) fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self {
            Value::None => Ok(None),
            v => v.positive(key).map(Some),
        }
    }

    pub(super) fn f64(&self, key: &str) -> Result<f64> {
        let v = match self {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            other => {
                return Err(invalid(
                    key,
                    format!("expected a number, got {}", other.kind()),
                ))
            }
        };
        ensure(v.is_finite(), key, || format!("must be finite, got {v}"))?;
        Ok(v)
    }

    pub(super) fn pos_f64(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure(v > 0.0, key, || format!("must be > 0, got {v}"))?;
        Ok(v)
    }

    pub(super) fn nonneg_f64(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure(v >= 0.0, key, || format!("must be >= 0, got {v}"))?;
        Ok(v)
    }

    pub(super) fn fraction(&self, key: &str) -> Result<f64> {
        let v = self.f64(key)?;
        ensure((0.0..=1.0).contains(&v), key, || {
            format!("must be in [0, 1], got {v}")
        })?;
        Ok(v)
    }

    pub(super) fn bool(&self, key: &str) -> Result<bool> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            other => Err(invalid(
                key,
                format!("expected true or false, got {}", other.kind()),
            )),
        }
    }

    pub(super) fn str(&self, key: &str) -> Result<String> {
        match self {
            Value::Str(s) => Ok(s.clone()),
            other => Err(invalid(
                key,
                format!("expected a string, got {}", other.kind()),
            )),
        }
    }

    pub(super) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self {
            Value::None => Ok(None),
            Value::Str(s) if s.eq_ignore_ascii_case("none") || s.is_empty() => Ok(None),
            v => v.str(key).map(Some),
        }
    }

    pub(super) fn strs(&self, key: &str) -> Result<Vec<String>> {
        match self {
            Value::None => Ok(Vec::new()),
            Value::Str(s) => Ok(s
                .split([',', ' '])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()),
            Value::StrList(v) => Ok(v.clone()),
            Value::IntList(v) if v.is_empty() => Ok(Vec::new()),
            other => Err(invalid(
                key,
                format!("expected a list of strings, got {}", other.kind()),
            )),
        }
    }
}

/// Parses a dtype name of the optimizer options.
pub(super) fn dtype_bytes(s: &str, key: &str) -> Result<f64> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "float32" | "torch.float32" => Ok(4.0),
        "bf16" | "bfloat16" | "torch.bfloat16" | "fp16" | "float16" | "torch.float16" => Ok(2.0),
        "fp8" | "uint8" | "torch.uint8" => Ok(1.0),
        other => Err(invalid(
            key,
            format!("unknown dtype '{other}' (expected fp32, bf16, fp16 or fp8)"),
        )),
    }
}

pub(super) fn unknown(arg: &str, keys: &[&str]) -> crate::Error {
    let key = arg.rsplit('.').next().unwrap_or(arg);
    let close: Vec<&str> = keys.iter().copied().filter(|k| similar(k, key)).collect();
    if close.is_empty() {
        invalid(arg, "unknown key")
    } else {
        invalid(
            arg,
            format!("unknown key (did you mean {}?)", close.join(" or ")),
        )
    }
}

/// Cheap typo check: same words in another order, or an edit distance of at most 2.
fn similar(a: &str, b: &str) -> bool {
    if a.contains(b) || b.contains(a) {
        return b.len() >= 3;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let c = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + c);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}
