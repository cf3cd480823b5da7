//! Shared helpers for the end-to-end tests in `tests/tests/`.

use retune_adapters::LoraAdapter;
use retune_engine::kv::KvCache;
use retune_engine::sampler::{argmax, log_sum_exp};
use retune_engine::{BatchItem, Model};
use serde::Deserialize;
use std::path::PathBuf;

/// The real model: `$RETUNE_MODEL`, else the fetch script's cache location.
pub fn model_path() -> PathBuf {
    let p = std::env::var_os("RETUNE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("RETUNE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let base = std::env::var_os("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| {
                            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                                .join(".cache")
                        });
                    base.join("retune")
                });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "model not found at {} — run ./scripts/fetch-model.sh (./scripts/test.sh does)",
        p.display()
    );
    p
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Deserialize)]
pub struct Step {
    pub id: u32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Deserialize)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub rendered: String,
    pub prompt_tokens: Vec<u32>,
    pub continuation: Vec<u32>,
    pub steps: Vec<Step>,
    pub text: String,
}

#[derive(Deserialize)]
pub struct TokenizeCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub detokenized: String,
}

#[derive(Deserialize)]
pub struct LlamaCppFixture {
    pub chats: Vec<Chat>,
    pub tokenize: Vec<TokenizeCase>,
}

/// A file under `tests/fixtures/`.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Reference outputs recorded from llama.cpp's llama-server (scripts/make-fixtures.py).
pub fn llamacpp_fixture() -> LlamaCppFixture {
    read_fixture("llamacpp_smollm2_q4_1.json")
}

pub fn read_fixture<T: serde::de::DeserializeOwned>(rel: &str) -> T {
    let path = fixture_path(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Outcome of feeding llama.cpp's greedy continuations back into our model.
#[derive(Debug, Default)]
pub struct TeacherForced {
    /// Steps where llama.cpp's top-1 leads its top-2 by more than 0.3 nats.
    pub decisive: usize,
    /// (chat, step, our top-1, llama.cpp's top-1) at decisive steps that disagree.
    pub violations: Vec<(usize, usize, u32, u32)>,
    /// Largest |ours - llama.cpp| over the first step's top-5 logprobs.
    pub max_first_step_diff: f32,
    /// (tokens our free-running greedy output matches, llama.cpp's length) per chat.
    pub free_agreement: Vec<(usize, usize)>,
}

fn feed(m: &Model, adapter: Option<&LoraAdapter>, tokens: &[u32], kv: &mut KvCache) -> Vec<f32> {
    let mut items = [BatchItem {
        tokens,
        adapter,
        kv,
        want_logits: true,
    }];
    m.forward(&mut items).expect("forward").remove(0)
}

/// The engine issue's agreement check, with or without an adapter.
pub fn teacher_forced(
    m: &Model,
    adapter: Option<&LoraAdapter>,
    fx: &LlamaCppFixture,
) -> TeacherForced {
    let mut r = TeacherForced::default();
    for (ci, chat) in fx.chats.iter().enumerate() {
        let mut kv = m.new_cache();
        let mut logits = feed(m, adapter, &chat.prompt_tokens, &mut kv);
        for (si, step) in chat.steps.iter().enumerate() {
            if si == 0 {
                let lse = log_sum_exp(&logits);
                for &(id, lp) in &step.top {
                    r.max_first_step_diff = r
                        .max_first_step_diff
                        .max((logits[id as usize] - lse - lp).abs());
                }
            }
            if step.top.len() >= 2 && step.top[0].1 - step.top[1].1 > 0.3 {
                r.decisive += 1;
                let ours = argmax(&logits);
                if ours != step.top[0].0 {
                    r.violations.push((ci, si, ours, step.top[0].0));
                }
            }
            if si + 1 < chat.steps.len() {
                logits = feed(m, adapter, &[step.id], &mut kv);
            }
        }
        let mut kv = m.new_cache();
        let mut l = feed(m, adapter, &chat.prompt_tokens, &mut kv);
        let mut n = 0;
        for &want in &chat.continuation {
            let t = argmax(&l);
            if t != want {
                break;
            }
            n += 1;
            l = feed(m, adapter, &[t], &mut kv);
        }
        r.free_agreement.push((n, chat.continuation.len()));
    }
    r
}
