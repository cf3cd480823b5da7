//! Token logprobs in the shape of each endpoint.

use super::types::{TokenLogprob, TopLogprob};
use crate::AppState;

/// A token's logprob entry (chat shape): its text and alternatives read off
/// the tokenizer's byte table, no decoding; `bytes` are the token's own bytes,
/// part of a UTF-8 character for a token that splits one.
pub(crate) fn logprob_entry(
    state: &AppState,
    t: &retune_engine::TokenEvent,
) -> Option<TokenLogprob> {
    let tok = state.backend.tokenizer();
    let top = |id: u32, logprob: f32| {
        let bytes = tok.token_bytes(id).to_vec();
        TopLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    };
    t.logprob.map(|lp| {
        let own = top(t.id, lp);
        TokenLogprob {
            token: own.token,
            logprob: lp,
            bytes: own.bytes,
            top_logprobs: t.top.iter().map(|&(id, l)| top(id, l)).collect(),
        }
    })
}

/// Logprobs in the shape of the endpoint: chat's `{"content": [...]}`, or the
/// legacy completions' parallel lists, `text_offset` counting characters of
/// the completion from `offset`.
pub(crate) fn logprobs_json(
    chat: bool,
    entries: &[TokenLogprob],
    offset: &mut usize,
) -> serde_json::Value {
    if chat {
        return serde_json::json!({ "content": entries });
    }
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(*offset);
        *offset += e.token.chars().count();
    }
    let top: Vec<serde_json::Map<String, serde_json::Value>> = entries
        .iter()
        .map(|e| {
            e.top_logprobs
                .iter()
                .map(|t| (t.token.clone(), serde_json::json!(t.logprob)))
                .collect()
        })
        .collect();
    serde_json::json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}
