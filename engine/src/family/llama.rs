//! The llama family (Llama 2/3, Mistral, Qwen2, SmolLM): a pre-norm block,
//! rope on q and k, SiLU-gated MLP.

use super::{outs, Act, Family, Norm, NormName, Ops, Proj};
use crate::error::Result;
use crate::model::ModelConfig;

/// Norm indices within a layer.
pub const ATTN_NORM: usize = 0;
pub const FFN_NORM: usize = 1;

const NORMS: &[NormName] = &[
    NormName::row("attn_norm", "input_layernorm"),
    NormName::row("ffn_norm", "post_attention_layernorm"),
];

pub static FAMILY: Family = Family {
    norms: NORMS,
    norm_plus_one: false,
    gguf_qk_permuted: true,
    scale_embeddings: false,
};

/// Qwen2 is the llama block with q/k/v biases, stored unpermuted in GGUF.
pub static QWEN2: Family = Family {
    gguf_qk_permuted: false,
    ..FAMILY
};

pub fn block<O: Ops>(o: &mut O, c: &ModelConfig, li: usize, x: O::X) -> Result<O::X> {
    let h = o.norm(&x, Norm::Layer(li, ATTN_NORM))?;
    let [q, k, v] = outs(o.linear(li, &[Proj::Q, Proj::K, Proj::V], &h)?)?;
    let attn = c.layer_attn(li);
    let q = o.rope(q, attn.rope)?;
    let k = o.rope(k, attn.rope)?;
    let a = o.attention(li, q, k, v, attn)?;
    let [a] = outs(o.linear(li, &[Proj::O], &a)?)?;
    let x = o.add(x, a)?;
    let h = o.norm(&x, Norm::Layer(li, FFN_NORM))?;
    let [gate, up] = outs(o.linear(li, &[Proj::Gate, Proj::Up], &h)?)?;
    let m = o.gated(gate, up, Act::Silu)?;
    let [down] = outs(o.linear(li, &[Proj::Down], &m)?)?;
    o.add(x, down)
}
