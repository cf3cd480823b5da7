//! JSONL import: OpenAI's fine-tuning format (`{"messages": [...]}` with optional
//! per-message `weight`) and prompt/completion lines. Every bad line is reported
//! by number; the good ones are kept.

use crate::record::{ExampleBody, ImportRow, Message};
use serde_json::Value;

/// A line that could not be imported (1-based).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn string(v: &Value, field: &str) -> Result<Option<String>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{field}` must be a string")),
    }
}

fn message(i: usize, m: &Value) -> Result<Message, String> {
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("messages[{i}].role must be a string"))?;
    if !ROLES.contains(&role) {
        return Err(format!(
            "messages[{i}].role `{role}` is not one of {ROLES:?}"
        ));
    }
    let content = m
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("messages[{i}].content must be a string"))?;
    let weight = match m.get("weight") {
        None | Some(Value::Null) => None,
        Some(w) => match w.as_u64() {
            Some(0) => Some(0),
            Some(1) => Some(1),
            _ => return Err(format!("messages[{i}].weight must be 0 or 1")),
        },
    };
    if weight.is_some() && role != "assistant" {
        return Err(format!(
            "messages[{i}].weight is only for assistant messages"
        ));
    }
    Ok(Message {
        role: role.into(),
        content: content.into(),
        weight,
    })
}

/// One line → a row, or why not.
pub fn parse_line(line: &str) -> Result<ImportRow, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("a line must be a JSON object".into());
    }
    let body = match (v.get("messages"), v.get("prompt")) {
        (Some(Value::Array(ms)), None) => {
            let messages = ms
                .iter()
                .enumerate()
                .map(|(i, m)| message(i, m))
                .collect::<Result<Vec<_>, _>>()?;
            if messages.last().map(|m| m.role.as_str()) != Some("assistant") {
                return Err("the last message must be the assistant's".into());
            }
            ExampleBody::Chat { messages }
        }
        (Some(_), None) => return Err("`messages` must be an array".into()),
        (None, Some(_)) => {
            let prompt = string(&v, "prompt")?.ok_or("`prompt` must be a string")?;
            let completion = string(&v, "completion")?.ok_or("`completion` is required")?;
            ExampleBody::Text { prompt, completion }
        }
        (Some(_), Some(_)) => return Err("a line has either `messages` or `prompt`".into()),
        (None, None) => return Err("neither `messages` nor `prompt/completion`".into()),
    };
    Ok(ImportRow {
        body,
        subject_id: string(&v, "subject_id")?,
        label: string(&v, "label")?,
    })
}

/// Parse a JSONL text: the good rows and the bad lines (blank lines are skipped).
pub fn parse_jsonl(text: &str) -> (Vec<ImportRow>, Vec<LineError>) {
    parse_jsonl_for(text, None)
}

/// The label an example carries: its `label`, else its answer.
pub fn label_of(r: &ImportRow) -> String {
    r.label.clone().unwrap_or_else(|| r.body.input_output().1)
}

/// [`parse_jsonl`] for a declared label task: a line whose label (or, without
/// one, answer) is not one of `labels` is refused by number too.
pub fn parse_jsonl_for(text: &str, labels: Option<&[String]>) -> (Vec<ImportRow>, Vec<LineError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(r) => match labels.map(|set| (set, label_of(&r))) {
                Some((set, label)) if !set.contains(&label) => errors.push(LineError {
                    line: i + 1,
                    reason: format!(
                        "label `{label}` is not one of the task's {} declared labels",
                        set.len()
                    ),
                }),
                _ => rows.push(r),
            },
            Err(reason) => errors.push(LineError {
                line: i + 1,
                reason,
            }),
        }
    }
    (rows, errors)
}

/// One exported line, in the format it was imported in.
pub fn to_line(body: &ExampleBody) -> String {
    serde_json::to_string(body).unwrap_or_default()
}
