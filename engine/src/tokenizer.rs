//! Tokenizer as a `tokenizers::Tokenizer`, built from GGUF metadata (BPE vocab,
//! merges, token types, bos/eos, add_bos) or read from `tokenizer.json`.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use serde_json::{json, Map, Value};
use std::path::Path;
use tokenizers::Tokenizer;

pub struct Tok {
    pub inner: Tokenizer,
    /// The same tokenizer with special tokens encoded as plain text: what users
    /// typed (message content) never becomes a control token.
    text_only: Tokenizer,
    pub bos: Option<u32>,
    /// Ids that end generation (eos, plus `<|im_end|>`/`<|eot_id|>`-style ids when present).
    pub eos: Vec<u32>,
    pub add_bos: bool,
    /// Each id's raw bytes (what it adds to the text; a special token's text),
    /// computed once: logprobs' `bytes` and the grammar engine's token trie.
    pieces: Vec<Box<[u8]>>,
    special: std::collections::HashSet<u32>,
    /// The grammar engine for this vocabulary, built on the first constrained request.
    grammars: std::sync::OnceLock<std::result::Result<crate::guide::Grammars, String>>,
}

fn terr(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

const EXTRA_STOPS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<|end|>",
];

impl Tok {
    /// Token ids the tokenizer knows (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(terr)?;
        let mut ids = enc.get_ids().to_vec();
        self.one_bos(&mut ids, add_special);
        Ok(ids)
    }

    /// A template that writes `bos_token` itself (Llama 3's) and a tokenizer
    /// that adds one would start the prompt with two: keep one, as llama.cpp does.
    fn one_bos(&self, ids: &mut Vec<u32>, add_special: bool) {
        if let (true, Some(b)) = (add_special, self.bos) {
            if ids.len() >= 2 && ids[0] == b && ids[1] == b {
                ids.remove(0);
            }
        }
    }

    /// Encode `text`, parsing special tokens only outside `plain` (sorted,
    /// disjoint byte ranges, e.g. the message contents of a rendered chat), which
    /// are encoded as text. `add_special` applies to the first piece only.
    pub fn encode_with_plain(
        &self,
        text: &str,
        plain: &[std::ops::Range<usize>],
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut first = add_special;
        let mut piece = |s: &str, as_text: bool, out: &mut Vec<u32>| -> Result<()> {
            if s.is_empty() && !first {
                return Ok(());
            }
            let t = if as_text {
                &self.text_only
            } else {
                &self.inner
            };
            out.extend(t.encode(s, first).map_err(terr)?.get_ids());
            first = false;
            Ok(())
        };
        for r in plain {
            let (start, end) = (r.start.clamp(at, text.len()), r.end.min(text.len()));
            if start >= end {
                continue;
            }
            piece(&text[at..start], false, &mut out)?;
            piece(&text[start..end], true, &mut out)?;
            at = end;
        }
        piece(&text[at..], false, &mut out)?;
        self.one_bos(&mut out, add_special);
        Ok(out)
    }

    /// A rendered chat prompt, its message contents encoded as text.
    pub fn encode_chat(&self, r: &crate::chat::Rendered, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with_plain(&r.text, &r.content, add_special)
    }

    /// The tokens of `r.text[range]` (content spans inside it encoded as text).
    pub fn encode_chat_range(
        &self,
        r: &crate::chat::Rendered,
        range: std::ops::Range<usize>,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let sub = &r.text[range.clone()];
        let spans: Vec<std::ops::Range<usize>> = r
            .content
            .iter()
            .filter(|c| c.end > range.start && c.start < range.end)
            .map(|c| c.start.max(range.start) - range.start..c.end.min(range.end) - range.start)
            .collect();
        self.encode_with_plain(sub, &spans, add_special)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(terr)
    }

    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes token `id` stands for (empty for an unknown id): part of a
    /// UTF-8 character for tokens that split one.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map(|b| &b[..]).unwrap_or(&[])
    }

    /// A control token (bos, eos, chat markers): its bytes are its name.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// Every id's bytes, in id order.
    pub(crate) fn pieces(&self) -> &[Box<[u8]>] {
        &self.pieces
    }

    /// The grammar engine (structured output) for this tokenizer, built once.
    pub fn grammars(&self) -> Result<&crate::guide::Grammars> {
        self.grammars
            .get_or_init(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::guide::Grammars::new(self)
                }))
                .unwrap_or_else(|_| Err("the grammar engine failed on this vocabulary".into()))
            })
            .as_ref()
            .map_err(|e| {
                EngineError::InvalidRequest(format!("structured output is unavailable: {e}"))
            })
    }

    fn with_stops(inner: Tokenizer, bos: Option<u32>, eos: Option<u32>, add_bos: bool) -> Self {
        let mut stops: Vec<u32> = eos.into_iter().collect();
        for s in EXTRA_STOPS {
            if let Some(id) = inner.token_to_id(s) {
                if !stops.contains(&id) && inner.get_added_vocabulary().is_special_token(s) {
                    stops.push(id);
                }
            }
        }
        let mut text_only = inner.clone();
        text_only.set_encode_special_tokens(true);
        let (pieces, special) = token_pieces(&inner);
        Self {
            inner,
            text_only,
            bos,
            eos: stops,
            add_bos,
            pieces,
            special,
            grammars: std::sync::OnceLock::new(),
        }
    }

    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let strings = |key: &str| -> Result<Vec<String>> {
            let v = g
                .meta(key)
                .ok_or_else(|| EngineError::Tokenizer(format!("GGUF lacks `{key}`")))?;
            v.to_vec()
                .map_err(terr)?
                .iter()
                .map(|s| s.to_string().cloned().map_err(terr))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(terr)?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| g.meta(key).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let model_kind = g.meta_str("tokenizer.ggml.model").unwrap_or("gpt2");
        let add_bos = g
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model_kind == "llama");
        let mut added = Vec::new();
        for (i, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == 3 || *ty == 4 {
                added.push(
                    json!({"id": i, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == 3}),
                );
            }
        }
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let (model, normalizer, pre, decoder) = match model_kind {
            "gpt2" => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
                (
                    bpe(vocab, merges, false),
                    Value::Null,
                    gpt2_pretokenizer(pre),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                )
            }
            "llama" => {
                let scores: Vec<f32> = match g.meta("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()
                        .map_err(terr)?
                        .iter()
                        .map(|s| s.to_f32().unwrap_or(0.0))
                        .collect(),
                    None => vec![0.0; tokens.len()],
                };
                let add_space = g
                    .meta("tokenizer.ggml.add_space_prefix")
                    .and_then(|v| v.to_bool().ok())
                    .unwrap_or(true);
                let mut norm = vec![
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
                ];
                if add_space {
                    norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    bpe(vocab, spm_merges(&tokens, &scores, &types), true),
                    json!({"type": "Sequence", "normalizers": norm}),
                    Value::Null,
                    json!({"type": "Sequence", "decoders": dec}),
                )
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported GGUF tokenizer model `{other}`"
                )))
            }
        };
        let post = match (add_bos, bos) {
            (true, Some(b)) => {
                let bs = tokens.get(b as usize).cloned().unwrap_or_default();
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bs, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bs, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bs.clone(): {"id": bs, "ids": [b], "tokens": [bs]}}})
            }
            _ => Value::Null,
        };
        let doc = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post, "decoder": decoder, "model": model});
        let inner = Tokenizer::from_bytes(doc.to_string().as_bytes()).map_err(terr)?;
        Ok(Self::with_stops(inner, bos, eos, add_bos))
    }

    /// `tokenizer.json` (+ `tokenizer_config.json` for bos/eos) from an HF directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::NotFound(path));
        }
        let inner = Tokenizer::from_file(&path).map_err(terr)?;
        let cfg = read_tokenizer_config(dir);
        let tok_id = |key: &str| {
            cfg.get(key)
                .and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(Value::as_str))
                })
                .and_then(|s| inner.token_to_id(s))
        };
        let bos = tok_id("bos_token");
        let eos = tok_id("eos_token");
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self::with_stops(inner, bos, eos, add_bos))
    }
}

pub(crate) fn read_tokenizer_config(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn bpe(vocab: Map<String, Value>, merges: Vec<String>, byte_fallback: bool) -> Value {
    json!({"type": "BPE", "dropout": null, "unk_token": if byte_fallback { json!("<unk>") } else { Value::Null },
        "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback, "ignore_merges": false, "vocab": vocab, "merges": merges})
}

/// Pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` names.
fn gpt2_pretokenizer(pre: &str) -> Value {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => byte_level(true),
    }
}

/// Merges for a SentencePiece-BPE vocab (llama/mistral GGUF): every way a piece
/// splits into two vocab pieces, ranked by the merged piece's score.
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<String> {
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((
                    scores.get(i).copied().unwrap_or(0.0),
                    li,
                    ri,
                    format!("{l} {r}"),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|m| m.3).collect()
}

/// GPT-2's byte-level alphabet: the char each byte is written as in the vocab.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let self_mapped =
        |c: char| matches!(c, '!'..='~' | '\u{00A1}'..='\u{00AC}' | '\u{00AE}'..='\u{00FF}');
    let mut map = std::collections::HashMap::new();
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        if self_mapped(c) {
            map.insert(c, b);
        } else if let Some(c) = char::from_u32(next) {
            map.insert(c, b);
            next += 1;
        }
    }
    map
}

/// Raw bytes of every id, and the special ids: byte-level vocabularies (GPT-2,
/// Llama 3, SmolLM) map each char back to its byte; SentencePiece ones read
/// `<0xNN>` as that byte and `▁` as a space. Added tokens are their content.
fn token_pieces(t: &Tokenizer) -> (Vec<Box<[u8]>>, std::collections::HashSet<u32>) {
    use tokenizers::DecoderWrapper as D;
    fn kinds(d: &D, level: &mut bool, fallback: &mut bool) {
        match d {
            D::ByteLevel(_) => *level = true,
            D::ByteFallback(_) => *fallback = true,
            D::Sequence(s) => s
                .get_decoders()
                .iter()
                .for_each(|d| kinds(d, level, fallback)),
            _ => {}
        }
    }
    let (mut level, mut fallback) = (false, false);
    if let Some(d) = t.get_decoder() {
        kinds(d, &mut level, &mut fallback);
    }
    let n = t.get_vocab_size(true);
    let chars = byte_level_chars();
    let mut special = std::collections::HashSet::new();
    let added = t.get_added_tokens_decoder();
    let mut pieces: Vec<Box<[u8]>> = Vec::with_capacity(n);
    for id in 0..n as u32 {
        if let Some(a) = added.get(&id) {
            if a.special {
                special.insert(id);
            }
            pieces.push(a.content.as_bytes().into());
            continue;
        }
        let Some(name) = t.id_to_token(id) else {
            pieces.push(Box::default());
            continue;
        };
        let hex = name
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        let bytes: Vec<u8> = if level {
            name.chars()
                .map(|c| chars.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| name.as_bytes().to_vec())
        } else if let (true, Some(b)) = (fallback, hex) {
            vec![b]
        } else {
            name.replace('\u{2581}', " ").into_bytes()
        };
        pieces.push(bytes.into());
    }
    (pieces, special)
}
