//! Chat messages in the engine's terms: roles and contents checked, the
//! declared task's system prompt joined in.

use super::types::ChatMessageIn;
use crate::api::generation::fields::{content_text, role};
use crate::errors::ApiError;
use retune_engine::ChatMessage;

/// The request's messages with their roles and contents checked, in order.
pub(crate) fn messages(ms: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    let mut msgs = Vec::with_capacity(ms.len());
    for (i, m) in ms.iter().enumerate() {
        msgs.push(ChatMessage::new(
            role(&m.role, i)?,
            &content_text(&m.content, i)?,
        ));
    }
    Ok(msgs)
}

/// The messages as captured: what the model was sent, before the declared
/// task's system prompt.
pub(crate) fn as_captured(msgs: &[ChatMessage]) -> serde_json::Value {
    let as_sent: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    serde_json::json!({ "messages": as_sent })
}

/// The task's system prompt first (joined with the request's own system
/// message), then the request's other messages — as the gate's base+prompt arm
/// renders them.
pub(crate) fn with_system_prompt(prompt: &str, msgs: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut system = prompt.to_string();
    let mut rest = Vec::with_capacity(msgs.len() + 1);
    let mut joined = false;
    for m in msgs {
        if m.role == "system" && !joined {
            system = format!("{system}\n\n{}", m.content);
            joined = true;
        } else {
            rest.push(m);
        }
    }
    let mut out = vec![ChatMessage::new("system", &system)];
    out.extend(rest);
    out
}
