//! Model families. A family is one file: what it reads from a GGUF's keys or an
//! HF `config.json`, its per-layer tensor names, and one block written against
//! [`Ops`] — the few operations (norm, linear with per-row LoRA, rope,
//! attention with a window and a scale, gated activation, add) that each
//! backend implements once. The loaders are plain weight readers driven by a
//! family's [`Family`] table; [`Arch`] dispatches to the family once per block.
//!
//! Adding a family means one new file here, an [`Arch`] variant, and its tests
//! (plus, where it has config keys of its own, their reading in the GGUF and HF
//! loaders, as Gemma 3's window and rope bases are read there today).

pub mod gemma3;
pub mod llama;

use crate::error::{EngineError, Result};
use crate::model::ModelConfig;

/// The architectures the engine serves (GGUF `general.architecture`, HF
/// `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gemma3,
}

/// Every name [`Arch::parse`] accepts, for the refusal of any other.
pub const SERVED: &str = "llama, mistral, qwen2, smollm (llama), gemma3, gemma3_text";

impl Arch {
    /// The name GGUF gives it (and the base fingerprint carries).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Gemma3 => "gemma3",
        }
    }

    /// The family `name` names (HF `gemma3_text` is the text model of
    /// `gemma3`); another is [`EngineError::UnsupportedArchitecture`].
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "gemma3" | "gemma3_text" => Self::Gemma3,
            other => return Err(EngineError::UnsupportedArchitecture(other.to_string())),
        })
    }

    /// The family's table: tensor names and conventions.
    pub fn family(self) -> &'static Family {
        match self {
            Self::Llama | Self::Mistral => &llama::FAMILY,
            Self::Qwen2 => &llama::QWEN2,
            Self::Gemma3 => &gemma3::FAMILY,
        }
    }

    /// Layer `li` of a model of this family, on backend `o`.
    pub fn block<O: Ops>(self, o: &mut O, c: &ModelConfig, li: usize, x: O::X) -> Result<O::X> {
        match self {
            Self::Llama | Self::Mistral | Self::Qwen2 => llama::block(o, c, li, x),
            Self::Gemma3 => gemma3::block(o, c, li, x),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a family declares besides its block.
#[derive(Debug)]
pub struct Family {
    /// Per-layer norm weights, in the order the block names them by index.
    pub norms: &'static [NormName],
    /// Whether the norms are `x·(1+w)`: HF stores `w`, GGUF stores `1+w`
    /// (llama.cpp's converter adds the one), so an HF load adds it.
    pub norm_plus_one: bool,
    /// Whether llama.cpp's converter permuted the Q/K rows for its
    /// interleaved rope (undone at load: every backend ropes in HF's layout).
    pub gguf_qk_permuted: bool,
    /// Embeddings are scaled by √hidden before the first block.
    pub scale_embeddings: bool,
}

/// A per-layer norm weight's names (each without `.weight`) and width.
#[derive(Debug)]
pub struct NormName {
    /// After `blk.N.` in a GGUF.
    pub gguf: &'static str,
    /// After `model.layers.N.` in HF safetensors.
    pub hf: &'static str,
    /// One head wide (a q or k norm) rather than one hidden row.
    pub per_head: bool,
}

impl NormName {
    pub const fn row(gguf: &'static str, hf: &'static str) -> Self {
        Self {
            gguf,
            hf,
            per_head: false,
        }
    }
    pub const fn head(gguf: &'static str, hf: &'static str) -> Self {
        Self {
            gguf,
            hf,
            per_head: true,
        }
    }

    /// Its length in a model of config `c`.
    pub fn len(&self, c: &ModelConfig) -> usize {
        if self.per_head {
            c.head_dim
        } else {
            c.hidden
        }
    }
}

/// The seven projections of a block, in the adapters' module order (PEFT's
/// `q_proj` … `down_proj`; `retune_adapters` indexes pairs by this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A norm weight: layer `li`'s norm number `n` in its family's
/// [`Family::norms`] order, or the final one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Layer(usize, usize),
    Final,
}

/// The gated unit's activation: `act(gate) · up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`).
    GeluTanh,
}

/// How a layer attends: the rope table its q and k turn by, how far back it
/// sees, and the score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attn {
    /// Index into [`ModelConfig::rope_bases`].
    pub rope: usize,
    /// A token sees itself and the `window − 1` before it; `None`: all.
    pub window: Option<usize>,
    pub scale: f32,
}

/// The operations a family's block is written against; each backend (the host
/// kernels, candle on a device, candle in training) implements them once.
/// `X` is a batch of activations, one row per token.
pub trait Ops {
    type X;
    /// RMS norm of every `w.len()`-wide piece of each row (a whole row, or each
    /// head of a q/k row) by weight `w`.
    fn norm(&mut self, x: &Self::X, w: Norm) -> Result<Self::X>;
    /// Layer `li`'s projections `ps` of `x` (one input, read once), each with
    /// the per-row adapter deltas of the rows' adapters.
    fn linear(&mut self, li: usize, ps: &[Proj], x: &Self::X) -> Result<Vec<Self::X>>;
    /// Rotary position embedding of each `head_dim` head (HF's half-split
    /// layout) at each row's position, by table `rope`.
    fn rope(&mut self, x: Self::X, rope: usize) -> Result<Self::X>;
    /// Causal attention of the rows' queries over their own sequences, after
    /// appending `k` and `v` to layer `li`'s cache.
    fn attention(
        &mut self,
        li: usize,
        q: Self::X,
        k: Self::X,
        v: Self::X,
        a: Attn,
    ) -> Result<Self::X>;
    /// `act(gate) · up`, elementwise.
    fn gated(&mut self, gate: Self::X, up: Self::X, act: Act) -> Result<Self::X>;
    fn add(&mut self, x: Self::X, y: Self::X) -> Result<Self::X>;
    fn scale(&mut self, x: Self::X, s: f32) -> Result<Self::X>;
}

/// The `N` outputs of one [`Ops::linear`] call, by value.
pub(crate) fn outs<X, const N: usize>(v: Vec<X>) -> Result<[X; N]> {
    let got = v.len();
    v.try_into()
        .map_err(|_| EngineError::Internal(format!("{got} projections where {N} were asked")))
}

/// The scale of the embedding rows entering the first block, if the family
/// scales them: √hidden in f32, as llama.cpp multiplies (`sqrtf(n_embd)`) and
/// HF keeps it in an f32 model.
pub fn embed_scale(c: &ModelConfig) -> Option<f32> {
    c.arch
        .family()
        .scale_embeddings
        .then(|| (c.hidden as f32).sqrt())
}
