//! A request's sampling parameters and output constraint, checked before any
//! expensive work, and the context it must fit.

use super::types::{Common, Stop};
use crate::errors::ApiError;
use crate::AppState;
use actix_web::web;
use retune_adapters::AdapterRef;
use retune_engine::guide::Constraint;
use retune_engine::{SamplingParams, ValidRequest};

/// Sampling parameters from the request, checked before any expensive work.
pub(crate) fn params(
    state: &AppState,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let max_n = state.settings.engine.max_n;
    if c.n.is_some_and(|n| n == 0 || n > max_n) {
        return Err(ApiError::InvalidParam {
            param: "n".into(),
            message: format!("must be 1 to {max_n} (the server's `engine.max_n`)"),
        });
    }
    let cap = state.settings.engine.max_tokens_cap;
    let max_tokens = c
        .max_completion_tokens
        .or(c.max_tokens)
        .unwrap_or(cap.min(256));
    if max_tokens > cap {
        return Err(ApiError::BadRequest(format!(
            "max_tokens {max_tokens} is above the cap {cap}"
        )));
    }
    let bad = |param: &str, message: String| ApiError::InvalidParam {
        param: param.into(),
        message,
    };
    let vocab = state.backend.tokenizer().vocab_size();
    let mut logit_bias = Vec::new();
    for (k, &b) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                bad(
                    "logit_bias",
                    format!(
                        "`{k}` is not a token id of this model (0 to {})",
                        vocab.saturating_sub(1)
                    ),
                )
            })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(bad(
                "logit_bias",
                format!("bias {b} of token {id} is outside [-100, 100]"),
            ));
        }
        logit_bias.push((id, b));
    }
    logit_bias.sort_by_key(|x| x.0);
    for (name, v) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(bad(name, "must be in [-2, 2]".into()));
        }
    }
    if c.min_p.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
        return Err(bad("min_p", "must be in [0, 1]".into()));
    }
    if c.repetition_penalty
        .is_some_and(|r| !(r > 0.0 && r <= 10.0))
    {
        return Err(bad("repetition_penalty", "must be in (0, 10]".into()));
    }
    let (constraint, _) = constraint(c)?;
    let p = SamplingParams {
        constraint,
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        logit_bias,
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed,
        max_tokens,
        stop: c
            .stop
            .as_ref()
            .map(|s| match s {
                Stop::One(x) => vec![x.clone()],
                Stop::Many(v) => v.clone(),
            })
            .unwrap_or_default(),
        logprobs,
        top_k: c.top_k.unwrap_or(0),
        stop_on_eos: !c.ignore_eos,
        ..SamplingParams::default()
    };
    p.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(p)
}

/// The structured-output constraint a request asks for, and the field that
/// asked: `response_format` (OpenAI) or vLLM's `guided_*`; at most one.
pub(crate) fn constraint(c: &Common) -> Result<(Option<Constraint>, &'static str), ApiError> {
    let bad = |param: &str, message: &str| ApiError::InvalidParam {
        param: param.into(),
        message: message.into(),
    };
    let mut found: Vec<(Constraint, &'static str)> = Vec::new();
    if let Some(rf) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        match rf.get("type").and_then(serde_json::Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((Constraint::JsonObject, "response_format")),
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| !s.is_null())
                    .ok_or_else(|| {
                        bad(
                            "response_format.json_schema.schema",
                            "a `json_schema` response format needs `json_schema.schema`",
                        )
                    })?;
                found.push((
                    Constraint::JsonSchema {
                        schema: schema.clone(),
                    },
                    "response_format",
                ));
            }
            Some(other) => {
                return Err(bad(
                    "response_format.type",
                    &format!("unknown type `{other}` (text, json_object, json_schema)"),
                ))
            }
            None => return Err(bad("response_format.type", "`type` is required")),
        }
    }
    if let Some(choices) = &c.guided_choice {
        found.push((
            Constraint::Choice {
                choices: choices.clone(),
            },
            "guided_choice",
        ));
    }
    if let Some(pattern) = &c.guided_regex {
        found.push((
            Constraint::Regex {
                pattern: pattern.clone(),
            },
            "guided_regex",
        ));
    }
    if let Some(schema) = c.guided_json.as_ref().filter(|s| !s.is_null()) {
        found.push((
            Constraint::JsonSchema {
                schema: schema.clone(),
            },
            "guided_json",
        ));
    }
    match found.len() {
        0 => Ok((None, "response_format")),
        1 => {
            let (c, field) = found.remove(0);
            Ok((Some(c), field))
        }
        _ => Err(bad(
            found[1].1,
            &format!("give one output constraint; `{}` is set too", found[0].1),
        )),
    }
}

/// A constraint that does not compile is named by the field that carried it;
/// compiling one (a grammar, the vocabulary's trie the first time) runs off
/// the async runtime.
pub(crate) async fn validated(
    state: &AppState,
    prompt: Vec<u32>,
    params: SamplingParams,
    adapter: Option<AdapterRef>,
    c: &Common,
) -> Result<ValidRequest, ApiError> {
    let r = if params.constraint.is_some() {
        let backend = state.backend.clone();
        web::block(move || backend.validate(prompt, params, adapter))
            .await
            .map_err(|e| ApiError::Internal(format!("validation task: {e}")))?
    } else {
        state.backend.validate(prompt, params, adapter)
    };
    r.map_err(|mut e| {
        if e.param.as_deref() == Some("constraint") {
            // (parsed again only here, on the error path)
            e.param = constraint(c).ok().map(|(_, f)| f.to_string());
        }
        e.into()
    })
}

/// A prompt and an explicit `max_tokens` beyond the context are a 400 (as
/// OpenAI answers); the default `max_tokens` shrinks to what fits.
pub(crate) fn fit_context(
    state: &AppState,
    params: &mut SamplingParams,
    prompt: usize,
    c: &Common,
) -> Result<(), ApiError> {
    let context = state.backend.context();
    let room = context.saturating_sub(prompt);
    if params.max_tokens <= room || room == 0 {
        return Ok(()); // a prompt that fills the context is the engine's 400
    }
    match (c.max_completion_tokens, c.max_tokens) {
        (Some(_), _) | (None, Some(_)) => Err(ApiError::InvalidParam {
            param: if c.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            }
            .into(),
            message: format!(
                "this model's context is {context} tokens: the prompt has {prompt} and {} more were asked for",
                params.max_tokens
            ),
        }),
        (None, None) => {
            params.max_tokens = room;
            Ok(())
        }
    }
}
