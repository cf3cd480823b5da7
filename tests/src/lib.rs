//! Shared helpers for the end-to-end tests in `tests/tests/`.

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

/// Reference outputs recorded from llama.cpp's llama-server (scripts/make-fixtures.py).
pub fn llamacpp_fixture() -> LlamaCppFixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/llamacpp_smollm2_q4_1.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
