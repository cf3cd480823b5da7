//! One entry point: a `.gguf` file or an HF safetensors directory.

use crate::chat::{ChatTemplate, CHATML, GEMMA3};
use crate::error::{EngineError, Result};
use crate::family::Arch;
use crate::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::{read_tokenizer_config, Tok};
use std::path::Path;

pub struct Loaded {
    pub model: Model,
    pub tok: Tok,
    pub template: ChatTemplate,
}

pub fn load(path: &Path) -> Result<Loaded> {
    if !path.exists() {
        return Err(EngineError::NotFound(path.to_path_buf()));
    }
    let (model, tok, template_src) = if path.is_dir() {
        let model = crate::safetensors::load_model(path)?;
        let tok = Tok::from_dir(path)?;
        let cfg = read_tokenizer_config(path);
        let src = cfg
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        (model, tok, src)
    } else {
        let mut g = GgufFile::open(path)?;
        let tok = Tok::from_gguf(&g)?;
        let src = g.meta_str("tokenizer.chat_template").map(str::to_string);
        (g.load_model()?, tok, src)
    };
    if tok.inner.get_vocab_size(true) > model.cfg.vocab {
        return Err(EngineError::invalid(
            path,
            format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tok.inner.get_vocab_size(true),
                model.cfg.vocab
            ),
        ));
    }
    let piece = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or_default();
    // a model without a template gets its family's, else ChatML
    let fallback = match model.cfg.arch {
        Arch::Gemma3 => GEMMA3,
        _ => CHATML,
    };
    let template = ChatTemplate::new(
        template_src.as_deref().unwrap_or(fallback),
        &piece(tok.bos),
        &piece(tok.eos.first().copied()),
    )?;
    Ok(Loaded {
        model,
        tok,
        template,
    })
}
