//! How the gate scores an answer: the metric a task gets, and exact, label,
//! JSON (per key) and token-F1 scores.

use crate::error::{Result, TrainError};
use retune_config::{GateMetric, GateOptions};
use retune_datasets::{ExampleBody, SnapshotRow};
use retune_engine::ChatMessage;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Exact,
    Label,
    Json,
    TokenF1,
}

fn norm_label(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '.' || c == '`')
        .trim()
        .to_lowercase()
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// SQuAD-style token F1 of a bag of words.
pub fn token_f1(pred: &str, want: &str) -> f64 {
    let (p, w) = (words(pred), words(want));
    if p.is_empty() || w.is_empty() {
        return (p.is_empty() && w.is_empty()) as u8 as f64;
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for t in &w {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (pr, rc) = (same as f64 / p.len() as f64, same as f64 / w.len() as f64);
    2.0 * pr * rc / (pr + rc)
}

/// JSON answer score: 0 unless it is a JSON object holding every required key;
/// then the share of required keys whose values equal the expected answer's
/// (1 when the expected answer is not JSON).
pub fn json_score(pred: &str, want: &str, keys: &[String]) -> f64 {
    let Ok(serde_json::Value::Object(p)) = serde_json::from_str::<serde_json::Value>(pred.trim())
    else {
        return 0.0;
    };
    if !keys.iter().all(|k| p.contains_key(k)) {
        return 0.0;
    }
    match serde_json::from_str::<serde_json::Value>(want.trim()) {
        Ok(serde_json::Value::Object(w)) if !keys.is_empty() => {
            keys.iter().filter(|k| p.get(*k) == w.get(*k)).count() as f64 / keys.len() as f64
        }
        _ => 1.0,
    }
}

pub fn score(metric: Metric, pred: &str, want: &str, keys: &[String]) -> f64 {
    match metric {
        Metric::Exact => (pred.trim() == want.trim()) as u8 as f64,
        Metric::Label => (norm_label(pred) == norm_label(want)) as u8 as f64,
        Metric::Json => json_score(pred, want, keys),
        Metric::TokenF1 => token_f1(pred, want),
    }
}

/// The metric for `auto`: labels when every eval row has one, JSON when keys are
/// declared, exact match for short answers (median at most 8 words), token F1 else.
pub fn choose_metric(opt: &GateOptions, eval: &[SnapshotRow]) -> Result<Metric> {
    Ok(match opt.metric {
        GateMetric::Exact => Metric::Exact,
        GateMetric::Label => Metric::Label,
        GateMetric::Json => Metric::Json,
        GateMetric::TokenF1 => Metric::TokenF1,
        GateMetric::Auto => {
            if !eval.is_empty() && eval.iter().all(|r| r.label.is_some()) {
                Metric::Label
            } else if !opt.json_keys.is_empty() {
                Metric::Json
            } else {
                let mut lens = eval
                    .iter()
                    .map(|r| split_example(&r.body).map(|(_, a)| words(&a).len()))
                    .collect::<Result<Vec<_>>>()?;
                lens.sort_unstable();
                if lens.get(lens.len() / 2).copied().unwrap_or(0) <= 8 {
                    Metric::Exact
                } else {
                    Metric::TokenF1
                }
            }
        }
    })
}

pub(crate) fn expected(metric: Metric, row: &SnapshotRow) -> Result<String> {
    let (_, answer) = split_example(&row.body)?;
    Ok(match (metric, &row.label) {
        (Metric::Label, Some(l)) => l.clone(),
        _ => answer,
    })
}

/// The messages before the answer and the answer, of a chat or text example.
pub(crate) fn split_example(body: &ExampleBody) -> Result<(Vec<ChatMessage>, String)> {
    match body {
        ExampleBody::Chat { messages } => {
            let Some((last, before)) = messages
                .split_last()
                .filter(|(l, b)| l.role == "assistant" && !b.is_empty())
            else {
                return Err(TrainError::Data(
                    "an eval example does not end with an assistant answer".into(),
                ));
            };
            Ok((
                before
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect(),
                last.content.clone(),
            ))
        }
        ExampleBody::Text { prompt, completion } => {
            Ok((vec![ChatMessage::new("user", prompt)], completion.clone()))
        }
    }
}
