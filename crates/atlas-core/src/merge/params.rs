//! Method parameters read from a JSON object by FusionBench's names, each error naming the
//! parameter at fault; unknown names are errors too, so a misspelt parameter never silently
//! falls back to its default.

use crate::{CoreError, Result};
use serde_json::{Map, Value};

pub(crate) struct Params<'a> {
    method: &'a str,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Params<'a> {
    pub fn new(method: &'a str, map: &'a Map<String, Value>) -> Self {
        Params {
            method,
            map,
            known: Vec::new(),
        }
    }

    pub fn bad(&self, key: &str, why: impl std::fmt::Display) -> CoreError {
        CoreError::Invalid(format!("params.{key} of {}: {why}", self.method))
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.known.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The parameter's raw value, if given (to pick how to read it).
    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A finite number within `ok` (described by `range`), or `default` when absent.
    pub fn number(
        &mut self,
        key: &'static str,
        default: f64,
        ok: impl Fn(f64) -> bool,
        range: &str,
    ) -> Result<f64> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(x),
            _ => Err(self.bad(key, format!("must be a number {range}, got {v}"))),
        }
    }

    pub fn boolean(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, format!("must be true or false, got {v}"))),
        }
    }

    pub fn seed(&mut self, key: &'static str) -> Result<u64> {
        match self.get(key) {
            None => Ok(0),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.bad(key, format!("must be an integer ≥ 0, got {v}"))),
        }
    }

    /// An integer in [0, max], or `default` when absent.
    pub fn integer(&mut self, key: &'static str, default: u64, max: u64) -> Result<u64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= max)
                .ok_or_else(|| self.bad(key, format!("must be an integer in [0, {max}], got {v}"))),
        }
    }

    /// A list of strings; absent or null is the empty list.
    pub fn strings(&mut self, key: &'static str) -> Result<Vec<String>> {
        let bad = |p: &Self, v: &Value| p.bad(key, format!("must be a list of strings, got {v}"));
        match self.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v @ Value::Array(xs)) => xs
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(self, v)),
            Some(v) => Err(bad(self, v)),
        }
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice(
        &mut self,
        key: &'static str,
        default: &'static str,
        choices: &[&'static str],
    ) -> Result<&'static str> {
        let Some(v) = self.get(key) else {
            return Ok(default);
        };
        let found = v.as_str().and_then(|s| choices.iter().find(|c| **c == s));
        found
            .copied()
            .ok_or_else(|| self.bad(key, format!("must be one of {choices:?}, got {v}")))
    }

    /// One number per input task vector: a single number applies to all.
    pub fn per_input(&mut self, key: &'static str, n: usize) -> Result<Vec<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(vec![1.0; n]);
        };
        let bad = || self.bad(key, format!("must be a number or {n} numbers, got {v}"));
        let values: Vec<f64> = match v {
            Value::Array(xs) if xs.len() == n => xs
                .iter()
                .map(Value::as_f64)
                .collect::<Option<_>>()
                .ok_or_else(bad)?,
            Value::Number(x) => vec![x.as_f64().ok_or_else(bad)?; n],
            _ => return Err(bad()),
        };
        if values.iter().all(|x| x.is_finite()) {
            Ok(values)
        } else {
            Err(bad())
        }
    }

    /// A parameter FusionBench has but this server only takes at its default value.
    pub fn only_default(&mut self, key: &'static str, default: &Value) -> Result<()> {
        match self.get(key) {
            Some(v) if v != default => {
                Err(self.bad(key, format!("only {default} is supported here, got {v}")))
            }
            _ => Ok(()),
        }
    }

    /// Fails on any parameter the method does not have.
    pub fn finish(self) -> Result<()> {
        let mut unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(k) => Err(self.bad(
                k,
                format!(
                    "is not a parameter of this method (it has {:?})",
                    self.known
                ),
            )),
        }
    }
}

/// How many of a task's examples a data-dependent merge reads, and in what batches:
/// FusionBench's `num_*_examples` and `dataloader_kwargs.batch_size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Examples {
    pub count: usize,
    pub batch_size: usize,
}

/// Most examples per input a data merge may ask for; the server bounds what is uploaded.
pub const MAX_EXAMPLES: u64 = 1 << 20;
/// Largest batch a data merge runs.
pub const MAX_BATCH: u64 = 1024;

impl Examples {
    /// Reads `key` (default 256) and `dataloader_kwargs` ({"batch_size": 32, "num_workers": …};
    /// the workers are threads here, so their number is read and ignored).
    pub(crate) fn parse(p: &mut Params, key: &'static str) -> Result<Examples> {
        let count = p.integer(key, 256, MAX_EXAMPLES)? as usize;
        if count == 0 {
            return Err(p.bad(key, "must be at least 1"));
        }
        let kwargs = "dataloader_kwargs";
        let batch_size = match p.get(kwargs) {
            None => 32,
            Some(Value::Object(m)) => {
                let mut inner = Params::new(kwargs, m);
                let read = |inner: &mut Params| -> Result<u64> {
                    let bs = inner.integer("batch_size", 32, MAX_BATCH)?;
                    inner.integer("num_workers", 0, u64::MAX)?;
                    Ok(bs)
                };
                let bs = read(&mut inner).map_err(|e| p.bad(kwargs, e))?;
                inner.finish().map_err(|e| p.bad(kwargs, e))?;
                if bs == 0 {
                    return Err(p.bad(kwargs, "batch_size must be at least 1"));
                }
                bs as usize
            }
            Some(v) => return Err(p.bad(kwargs, format!("must be an object, got {v}"))),
        };
        Ok(Examples { count, batch_size })
    }

    /// How many of `available` examples are read: whole batches until `count` are seen, as
    /// FusionBench's loops stop.
    pub fn used(&self, available: usize) -> usize {
        let batches = self.count.div_ceil(self.batch_size);
        available.min(batches * self.batch_size)
    }

    pub fn params(&self, key: &str) -> Value {
        serde_json::json!({ key: self.count, "dataloader_kwargs": { "batch_size": self.batch_size } })
    }
}
