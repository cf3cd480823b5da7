//! Training examples as the server will see them: chat examples rendered with
//! the served model's chat template and tokenized as the server tokenizes a
//! prompt, loss only on assistant tokens (OpenAI's per-message `weight`), up to
//! and including the end-of-turn token; prompt/completion examples as raw text
//! with an end token after the completion.

use crate::error::{Result, TrainError};
use retune_datasets::{ExampleBody, Message};
use retune_engine::{ChatMessage, ChatTemplate, Tok};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One tokenized example: `weights[i]` is the loss weight of predicting
/// `tokens[i]` from the tokens before it (0 = context only).
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
    /// A classification example: the label's index, read by the head at the
    /// last token (`weights` is then 1 at the last position, 0 elsewhere).
    pub class: Option<u32>,
    /// A classification example's text as the classical classifier reads it
    /// ([`retune_datasets::snapshot::classifier_text`]).
    pub text: Option<String>,
}

impl Encoded {
    pub fn target_count(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }
}

/// What to do with examples longer than `max_len` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Leave the example out (counted).
    Drop,
    /// Keep the first `max_len` tokens (counted; dropped if no target is left).
    Truncate,
}

/// Examples ready to train on, with what was left out and why.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub examples: Vec<Encoded>,
    /// reason → count
    pub dropped: BTreeMap<String, usize>,
    pub truncated: usize,
}

impl Prepared {
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.tokens.len()).sum()
    }
}

fn chat(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect()
}

/// Tokenize one example.
pub fn encode(body: &ExampleBody, tok: &Tok, template: &ChatTemplate) -> Result<Encoded> {
    let bad = |m: String| TrainError::Data(m);
    let end =
        tok.eos.first().copied().ok_or_else(|| {
            TrainError::Setting("the tokenizer has no end-of-sequence token".into())
        })?;
    match body {
        ExampleBody::Text { prompt, completion } => {
            let mut tokens = tok.encode(prompt, true)?;
            let n = tokens.len();
            tokens.extend(tok.encode(completion, false)?);
            tokens.push(end);
            let mut weights = vec![0.0; tokens.len()];
            weights[n..].fill(1.0);
            Ok(Encoded {
                tokens,
                weights,
                class: None,
                text: None,
            })
        }
        ExampleBody::Chat { messages } => {
            let mut tokens = Vec::new();
            let mut weights = Vec::new();
            let mut rendered = String::new();
            for (i, m) in messages.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                // the prompt the server renders for this turn, then the turn itself
                let prefix_r = template.render_marked(&chat(&messages[..i]), true)?;
                let full_r = template.render_marked(&chat(&messages[..=i]), false)?;
                let (prefix, full) = (prefix_r.text.as_str(), full_r.text.as_str());
                if !prefix.starts_with(rendered.as_str()) {
                    return Err(bad(format!(
                        "the chat template renders message {i}'s history differently from the turn before"
                    )));
                }
                if !full.starts_with(prefix) {
                    return Err(bad(format!(
                        "the chat template's rendering of assistant message {i} does not extend its prompt"
                    )));
                }
                // contents as text, as the server tokenizes a prompt
                let p = tok.encode_chat_range(
                    &prefix_r,
                    rendered.len()..prefix.len(),
                    tokens.is_empty(),
                )?;
                weights.extend(std::iter::repeat(0.0).take(p.len()));
                tokens.extend(p);
                let w = m.weight.map_or(1.0, |w| w as f32);
                let mut t = tok.encode_chat_range(&full_r, prefix.len()..full.len(), false)?;
                // trained up to and including the end-of-turn token; what the
                // template adds after it (a newline) is context
                let stop = t.iter().position(|id| tok.eos.contains(id));
                let n_trained = match stop {
                    Some(s) => s + 1,
                    None => {
                        t.push(end);
                        t.len()
                    }
                };
                for k in 0..t.len() {
                    weights.push(if k < n_trained { w } else { 0.0 });
                }
                tokens.extend(t);
                rendered = full.to_string();
            }
            if tokens.is_empty() {
                return Err(bad("the example has no assistant message".into()));
            }
            Ok(Encoded {
                tokens,
                weights,
                class: None,
                text: None,
            })
        }
    }
}

/// Tokenize `bodies`, applying the length limit.
pub fn prepare(
    bodies: &[ExampleBody],
    tok: &Tok,
    template: &ChatTemplate,
    max_len: usize,
    overflow: Overflow,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    let drop = |why: &str, out: &mut Prepared| {
        *out.dropped.entry(why.to_string()).or_insert(0) += 1;
    };
    for b in bodies {
        let mut e = match encode(b, tok, template) {
            Ok(e) => e,
            Err(TrainError::Data(_)) | Err(TrainError::Engine(_)) => {
                drop("unrenderable", &mut out);
                continue;
            }
            Err(e) => return Err(e),
        };
        if e.tokens.len() > max_len {
            match overflow {
                Overflow::Drop => {
                    drop("longer than max_len", &mut out);
                    continue;
                }
                Overflow::Truncate => {
                    e.tokens.truncate(max_len);
                    e.weights.truncate(max_len);
                    out.truncated += 1;
                }
            }
        }
        // position 0 is never predicted
        if let Some(w) = e.weights.first_mut() {
            *w = 0.0;
        }
        if e.target_count() == 0 {
            drop("no trained tokens", &mut out);
            continue;
        }
        out.examples.push(e);
    }
    Ok(out)
}

/// Classification examples for a head over `labels`: the prompt the server
/// renders (up to the assistant's turn), the label's index as the target.
/// Examples whose answer is not one of `labels`, or whose prompt is longer than
/// `max_len`, are left out (counted): a prompt is never cut, its end is what the
/// head reads.
pub fn prepare_classes(
    bodies: &[ExampleBody],
    tok: &Tok,
    template: &ChatTemplate,
    max_len: usize,
    labels: &[String],
) -> Result<Prepared> {
    let index: BTreeMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u32))
        .collect();
    let mut out = Prepared::default();
    let drop = |why: &str, out: &mut Prepared| {
        *out.dropped.entry(why.to_string()).or_insert(0) += 1;
    };
    for b in bodies {
        let (tokens, answer) = match crate::eval::case(b, tok, template) {
            Ok(c) => c,
            Err(TrainError::Data(_)) | Err(TrainError::Engine(_)) => {
                drop("unrenderable", &mut out);
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some(&class) = index.get(answer.as_str()) else {
            drop("answer not a declared label", &mut out);
            continue;
        };
        if tokens.len() > max_len {
            drop("longer than max_len", &mut out);
            continue;
        }
        if tokens.is_empty() {
            drop("unrenderable", &mut out);
            continue;
        }
        let mut weights = vec![0.0; tokens.len()];
        if let Some(w) = weights.last_mut() {
            *w = 1.0;
        }
        out.examples.push(Encoded {
            tokens,
            weights,
            class: Some(class),
            text: Some(retune_datasets::snapshot::classifier_text(b)),
        });
    }
    Ok(out)
}
