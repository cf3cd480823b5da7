//! Gemma 3 (text): embeddings scaled by √hidden, RMS norms `x·(1+w)` before
//! and after both attention and MLP, RMS norm on each q and k head, a
//! GELU(tanh)-gated MLP, and sliding-window layers (their own rope base) with a
//! global layer every `swa_pattern`-th. References: llama.cpp
//! `src/models/gemma3.cpp`, HF transformers `modeling_gemma3.py`.

use super::{outs, Act, Family, Norm, NormName, Ops, Proj};
use crate::error::Result;
use crate::model::ModelConfig;

/// Norm indices within a layer.
pub const ATTN_NORM: usize = 0;
pub const Q_NORM: usize = 1;
pub const K_NORM: usize = 2;
pub const POST_ATTN_NORM: usize = 3;
pub const FFN_NORM: usize = 4;
pub const POST_FFN_NORM: usize = 5;

// HF's `post_attention_layernorm` is the norm *after* attention here (in
// llama it is the one before the MLP)
const NORMS: &[NormName] = &[
    NormName::row("attn_norm", "input_layernorm"),
    NormName::head("attn_q_norm", "self_attn.q_norm"),
    NormName::head("attn_k_norm", "self_attn.k_norm"),
    NormName::row("post_attention_norm", "post_attention_layernorm"),
    NormName::row("ffn_norm", "pre_feedforward_layernorm"),
    NormName::row("post_ffw_norm", "post_feedforward_layernorm"),
];

pub static FAMILY: Family = Family {
    norms: NORMS,
    norm_plus_one: true,
    gguf_qk_permuted: false,
    scale_embeddings: true,
};

/// The default sliding-window pattern: five local layers to a global one.
pub const SWA_PATTERN: usize = 6;

pub fn block<O: Ops>(o: &mut O, c: &ModelConfig, li: usize, x: O::X) -> Result<O::X> {
    let attn = c.layer_attn(li);
    let h = o.norm(&x, Norm::Layer(li, ATTN_NORM))?;
    let [q, k, v] = outs(o.linear(li, &[Proj::Q, Proj::K, Proj::V], &h)?)?;
    let q = o.norm(&q, Norm::Layer(li, Q_NORM))?;
    let k = o.norm(&k, Norm::Layer(li, K_NORM))?;
    let q = o.rope(q, attn.rope)?;
    let k = o.rope(k, attn.rope)?;
    let a = o.attention(li, q, k, v, attn)?;
    let [a] = outs(o.linear(li, &[Proj::O], &a)?)?;
    let a = o.norm(&a, Norm::Layer(li, POST_ATTN_NORM))?;
    let x = o.add(x, a)?;
    let h = o.norm(&x, Norm::Layer(li, FFN_NORM))?;
    let [gate, up] = outs(o.linear(li, &[Proj::Gate, Proj::Up], &h)?)?;
    let m = o.gated(gate, up, Act::GeluTanh)?;
    let [down] = outs(o.linear(li, &[Proj::Down], &m)?)?;
    let down = o.norm(&down, Norm::Layer(li, POST_FFN_NORM))?;
    o.add(x, down)
}
