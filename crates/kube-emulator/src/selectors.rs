//! Label and field selectors, as in `?labelSelector=app=x,tier in (a,b),!legacy`.

use serde_json::Value;

use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

impl LabelSelector {
    /// Parse; errors are 400s naming the bad term.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |t: &str| ApiError::bad_request(&format!("unable to parse requirement: {t:?}"));
        let mut reqs = Vec::new();
        for term in split_top(s) {
            let set = |rest: &str| -> Option<Vec<String>> {
                let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some(
                    inner
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect(),
                )
            };
            if let Some(k) = term.strip_prefix('!') {
                reqs.push(Req::NotExists(k.trim().to_string()));
            } else if let Some((k, v)) = term.split_once("!=") {
                reqs.push(Req::Ne(k.trim().into(), v.trim().into()));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                reqs.push(Req::Eq(k.trim().into(), v.trim().into()));
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                reqs.push(Req::NotIn(k.trim().into(), set(rest).ok_or_else(|| bad(term))?));
            } else if let Some((k, rest)) = term.split_once(" in ") {
                reqs.push(Req::In(k.trim().into(), set(rest).ok_or_else(|| bad(term))?));
            } else if term
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                reqs.push(Req::Exists(term.to_string()));
            } else {
                return Err(bad(term));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object's labels match.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::Ne(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector (`=`, `==`, `!=` on dotted paths such as `spec.nodeName`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// Parse.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for term in split_top(s) {
            let (k, v, eq) = if let Some((k, v)) = term.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(&format!(
                    "invalid field selector: {term:?}"
                )));
            };
            out.push((k.trim().to_string(), v.trim().to_string(), eq));
        }
        Ok(FieldSelector(out))
    }

    /// Whether the object's fields match (a missing field counts as "").
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, want, eq)| {
            let got = path.split('.').fold(object, |v, seg| &v[seg]);
            let got = got.as_str().unwrap_or_default();
            (got == want) == *eq
        })
    }
}

/// Whether one `matchExpressions` entry (`{key, operator, values}`: `In`, `NotIn`, `Exists`,
/// `DoesNotExist`) holds for a `labels` object. Used by node affinity and PDB selectors alike.
pub fn expression_holds(expr: &Value, labels: &Value) -> bool {
    let got = labels
        .get(expr["key"].as_str().unwrap_or_default())
        .and_then(Value::as_str);
    let values: Vec<&str> = expr["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    match expr["operator"].as_str().unwrap_or_default() {
        "In" => got.is_some_and(|g| values.contains(&g)),
        "NotIn" => got.is_none_or(|g| !values.contains(&g)),
        "Exists" => got.is_some(),
        "DoesNotExist" => got.is_none(),
        _ => false,
    }
}
