//! Which request fields retune honours, which it refuses and which it ignores.
//!
//! Policy: a field that would change the output and is not implemented is a
//! 400 naming it (never silently dropped); a field that changes nothing here
//! (`metadata`, `store`, ...) is accepted; a field retune does not know is
//! ignored and named in the `x-retune-ignored-params` response header.

use crate::errors::ApiError;
use serde_json::Value;

/// Fields of both endpoints that retune reads.
const HONOURED: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "ignore_eos",
    "logprobs",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "min_p",
    "repetition_penalty",
    "response_format",
    "guided_choice",
    "guided_regex",
    "guided_json",
];
const HONOURED_CHAT: &[&str] = &["messages", "top_logprobs"];
const HONOURED_COMPLETIONS: &[&str] = &["prompt"];
/// Accepted, and without effect on the output here.
const NO_EFFECT: &[&str] = &["metadata", "store", "service_tier", "parallel_tool_calls"];

fn refuse(param: &str, why: &str) -> ApiError {
    ApiError::InvalidParam {
        param: param.into(),
        message: why.into(),
    }
}

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Check the body's fields; the ignored (unknown) ones, sorted.
pub fn check(body: &Value, chat: bool) -> Result<Vec<String>, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("the request body must be a JSON object".into()))?;
    let mut ignored = Vec::new();
    for (k, v) in obj {
        let k = k.as_str();
        let own = if chat {
            HONOURED_CHAT
        } else {
            HONOURED_COMPLETIONS
        };
        if HONOURED.contains(&k) || own.contains(&k) || NO_EFFECT.contains(&k) {
            continue;
        }
        let not_yet = |what: &str| refuse(k, &format!("{what} is not implemented by retune yet"));
        match k {
            "tools" | "functions" if !is_off(v) => {
                return Err(not_yet("tool calling"));
            }
            "tool_choice" | "function_call" if !(is_off(v) || v.as_str() == Some("none")) => {
                return Err(not_yet("tool calling"));
            }
            "tools" | "functions" | "tool_choice" | "function_call" => {}
            "echo" | "suffix" if !chat && !is_off(v) => return Err(not_yet(&format!("`{k}`"))),
            "best_of" if !chat && !(v.is_null() || v.as_u64() == Some(1)) => {
                return Err(not_yet("`best_of` above 1"))
            }
            "echo" | "suffix" | "best_of" if !chat => {}
            "modalities" => {
                let text_only = v.is_null()
                    || v.as_array()
                        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")));
                if !text_only {
                    return Err(refuse(k, "this model produces text only"));
                }
            }
            "audio" if !v.is_null() => return Err(refuse(k, "this model produces text only")),
            "prediction" if !v.is_null() => return Err(not_yet("`prediction`")),
            _ => ignored.push(k.to_string()),
        }
    }
    ignored.sort();
    Ok(ignored)
}

/// A message's `content` as text: a string, or text parts joined by newlines
/// (as vLLM joins them); `null` is empty. Other parts are refused by name.
pub fn content_text(content: &Value, at: usize) -> Result<String, ApiError> {
    let param = |j: Option<usize>| match j {
        Some(j) => format!("messages[{at}].content[{j}]"),
        None => format!("messages[{at}].content"),
    };
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => match p.get("text").and_then(Value::as_str) {
                        Some(t) => texts.push(t),
                        None => return Err(refuse(&param(Some(j)), "a text part needs `text`")),
                    },
                    Some(other) => {
                        return Err(refuse(
                            &param(Some(j)),
                            &format!(
                                "`{other}` parts are not supported: this model reads text only"
                            ),
                        ))
                    }
                    None => return Err(refuse(&param(Some(j)), "a content part needs `type`")),
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(refuse(
            &param(None),
            "must be a string or an array of parts",
        )),
    }
}

/// A message's role as the chat template knows it.
pub fn role(role: &str, at: usize) -> Result<&'static str, ApiError> {
    let param = format!("messages[{at}].role");
    match role {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        "tool" | "function" => Err(refuse(
            &param,
            &format!("`{role}` messages answer tool calls, and tool calling is not implemented by retune yet"),
        )),
        other => Err(refuse(
            &param,
            &format!("unknown role `{other}` (system, developer, user, assistant)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_honoured_refused_or_ignored_by_name() {
        let ok = json!({"model": "m", "messages": [], "temperature": 0.5, "metadata": {"a": 1},
                        "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                        "frequency_penalty": 0.5, "logit_bias": {"3": 1}, "mystery": 1, "another": null});
        assert_eq!(check(&ok, true).unwrap(), vec!["another", "mystery"]);
        for (field, value) in [
            (
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", json!("required")),
            ("modalities", json!(["text", "audio"])),
        ] {
            let body = json!({"model": "m", field: value});
            match check(&body, true) {
                Err(ApiError::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {:?}", other.map_err(|e| e.to_string())),
            }
        }
        // completions-only fields
        assert!(check(&json!({"prompt": "x", "echo": true}), false).is_err());
        assert!(check(&json!({"prompt": "x", "best_of": 2}), false).is_err());
        assert!(
            check(&json!({"prompt": "x", "best_of": 1, "echo": false}), false)
                .unwrap()
                .is_empty()
        );
        // on chat, `echo` is unknown: ignored and named
        assert_eq!(check(&json!({"echo": true}), true).unwrap(), vec!["echo"]);
        assert!(check(&json!([1, 2]), true).is_err());
    }

    #[test]
    fn contents_and_roles() {
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(content_text(&parts, 0).unwrap(), "a\nb");
        assert_eq!(content_text(&json!("x"), 0).unwrap(), "x");
        assert_eq!(content_text(&Value::Null, 0).unwrap(), "");
        let image = json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]);
        match content_text(&image, 3) {
            Err(ApiError::InvalidParam { param, message }) => {
                assert_eq!(param, "messages[3].content[1]");
                assert!(message.contains("image_url"), "{message}");
            }
            _ => panic!("image parts are refused"),
        }
        assert!(content_text(&json!(5), 0).is_err());
        assert_eq!(role("developer", 0).unwrap(), "system");
        assert!(role("tool", 0).is_err());
        assert!(role("wizard", 0).is_err());
    }
}
