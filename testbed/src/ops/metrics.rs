//! The Prometheus text format as the tests read it: samples with labels, selected and summed.
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name as exposed (with `_total` for counters).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed `/metrics` document.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    /// Parses the Prometheus / OpenMetrics text format (comments skipped).
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(parse_sample(line).with_context(|| format!("metrics line `{line}`"))?);
        }
        Ok(Self(out))
    }

    /// Samples of `name` whose labels include every `(key, value)` of `with`.
    pub fn select(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the samples [`Metrics::select`] picks (0 when none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.select(name, with).iter().map(|s| s.value).sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => bail!("no value"),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let close;
        loop {
            // key
            let mut key = String::new();
            loop {
                match chars.next() {
                    Some((_, '=')) => break,
                    Some((i, '}')) if key.is_empty() => {
                        close = i;
                        return finish(name, labels, &body[close + 1..]);
                    }
                    Some((_, ',')) if key.is_empty() => {}
                    Some((_, c)) => key.push(c),
                    None => bail!("unterminated labels"),
                }
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {key} has no quoted value");
            }
            let mut val = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => bail!("bad escape"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => val.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            labels.insert(key.trim().to_string(), val);
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => {
                    close = i;
                    break;
                }
                other => bail!("unexpected {other:?} after a label"),
            }
        }
        &body[close + 1..]
    } else {
        rest
    };
    finish(name, labels, rest)
}

fn finish(name: &str, labels: BTreeMap<String, String>, rest: &str) -> Result<Sample> {
    let value = rest
        .split_whitespace()
        .next()
        .context("no value")?
        .parse::<f64>()
        .context("value")?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "unit tests")]
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_plain_samples() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE a counter\na_total{k=\"v\",q=\"a\\\"b,c}\"} 12\nb 3.5\n# EOF\n",
        )
        .unwrap();
        assert_eq!(m.0.len(), 2);
        assert_eq!(m.0[0].name, "a_total");
        assert_eq!(m.0[0].labels["q"], "a\"b,c}");
        assert_eq!(m.sum("a_total", &[("k", "v")]), 12.0);
        assert_eq!(m.sum("b", &[]), 3.5);
        assert_eq!(m.sum("a_total", &[("k", "w")]), 0.0);
    }
}
