//! Tiny random-weight llama models written to disk as a GGUF file and as an HF
//! safetensors directory, for fast tests (here and in other crates). Both files
//! hold the same weights: GGUF with llama.cpp's Q/K row permutation, safetensors
//! in HF layout, so loading both and comparing checks the whole load path.

use crate::error::{EngineError, Result};
use crate::gguf::permute;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct TinySpec {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub context: usize,
    pub seed: u64,
    /// Weight type of the GGUF projections.
    pub gguf_dtype: GgmlDType,
    /// Weight type of the GGUF embedding table (tied output projection too).
    pub embed_dtype: GgmlDType,
    pub arch: &'static str,
    /// Llama 3 rope scaling (factor 8, low 1, high 4, original context 32).
    pub llama3_rope: bool,
    /// Head width, when not `hidden / n_head` (Gemma's are wider).
    pub head_dim: Option<usize>,
    /// Gemma 3: (window, pattern) of its sliding-window layers.
    pub sliding_window: Option<(usize, usize)>,
}

impl TinySpec {
    /// A tiny Gemma 3: heads wider than hidden / n_head, one kv head, and
    /// sliding-window layers (window 8, every second layer global), so a
    /// prompt of a few dozen tokens exercises every part of the block.
    pub fn gemma3() -> Self {
        Self {
            arch: "gemma3",
            n_layer: 4,
            hidden: 64,
            ffn: 96,
            n_head: 4,
            n_kv_head: 1,
            head_dim: Some(32),
            sliding_window: Some((8, 2)),
            ..Self::default()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.n_head)
    }

    fn is_gemma(&self) -> bool {
        self.arch == "gemma3"
    }

    /// Rope base of the global layers (Gemma's sliding layers keep 10,000).
    fn rope_theta(&self) -> f32 {
        if self.is_gemma() {
            1_000_000.0
        } else {
            10_000.0
        }
    }

    fn rms_eps(&self) -> f32 {
        if self.is_gemma() {
            1e-6
        } else {
            1e-5
        }
    }

    /// The projection shapes adapters for this model are validated against.
    pub fn base_shapes(&self) -> retune_adapters::BaseShapes {
        let hd = self.head_dim();
        let (h, q, kv, f) = (self.hidden, self.n_head * hd, self.n_kv_head * hd, self.ffn);
        retune_adapters::BaseShapes {
            n_layers: self.n_layer,
            dims: [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)],
        }
    }
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layer: 2,
            hidden: 64,
            ffn: 128,
            n_head: 4,
            n_kv_head: 2,
            context: 256,
            seed: 1,
            gguf_dtype: GgmlDType::F32,
            embed_dtype: GgmlDType::F32,
            arch: "llama",
            llama3_rope: false,
            head_dim: None,
            sliding_window: None,
        }
    }
}

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 9] = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
];

/// GPT-2 byte-to-unicode table (the ByteLevel alphabet).
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    out
}

/// (tokens, token types, merges): specials first, then the 256 byte symbols, then merges.
pub fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; SPECIALS.len()];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(format!("{a} {b}"));
    }
    (tokens, types, merges)
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * self.next()).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// HF-named f32 tensors.
fn weights(s: &TinySpec, vocab: usize) -> Result<BTreeMap<String, Tensor>> {
    let mut r = Lcg(s.seed);
    let hd = s.head_dim();
    let (h, qd, kd, f) = (s.hidden, s.n_head * hd, s.n_kv_head * hd, s.ffn);
    // HF's Gemma norms hold w of x·(1+w): near 0 rather than near 1
    let norm_at = if s.is_gemma() { 0.0 } else { 1.0 };
    let mut m = BTreeMap::new();
    m.insert(
        "model.embed_tokens.weight".into(),
        r.tensor(&[vocab, h], if s.is_gemma() { 0.2 } else { 1.0 }, 0.0)?,
    );
    for i in 0..s.n_layer {
        let p = format!("model.layers.{i}");
        let lin = |r: &mut Lcg, rows: usize, cols: usize| {
            r.tensor(&[rows, cols], 1.7 / (cols as f32).sqrt(), 0.0)
        };
        m.insert(
            format!("{p}.input_layernorm.weight"),
            r.tensor(&[h], 0.1, norm_at)?,
        );
        m.insert(format!("{p}.self_attn.q_proj.weight"), lin(&mut r, qd, h)?);
        m.insert(format!("{p}.self_attn.k_proj.weight"), lin(&mut r, kd, h)?);
        m.insert(format!("{p}.self_attn.v_proj.weight"), lin(&mut r, kd, h)?);
        m.insert(format!("{p}.self_attn.o_proj.weight"), lin(&mut r, h, qd)?);
        m.insert(
            format!("{p}.post_attention_layernorm.weight"),
            r.tensor(&[h], 0.1, norm_at)?,
        );
        m.insert(format!("{p}.mlp.gate_proj.weight"), lin(&mut r, f, h)?);
        m.insert(format!("{p}.mlp.up_proj.weight"), lin(&mut r, f, h)?);
        m.insert(format!("{p}.mlp.down_proj.weight"), lin(&mut r, h, f)?);
        if s.is_gemma() {
            for n in ["self_attn.q_norm", "self_attn.k_norm"] {
                m.insert(format!("{p}.{n}.weight"), r.tensor(&[hd], 0.1, 0.0)?);
            }
            for n in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                m.insert(format!("{p}.{n}.weight"), r.tensor(&[h], 0.1, 0.0)?);
            }
        }
    }
    m.insert("model.norm.weight".into(), r.tensor(&[h], 0.1, norm_at)?);
    Ok(m)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |e| EngineError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Write `dir/model.gguf` and `dir/hf/` (config.json, model.safetensors,
/// tokenizer.json, tokenizer_config.json). Returns (gguf path, hf dir).
pub fn write(dir: &Path, s: &TinySpec) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (tokens, types, merges) = vocab();
    let w = weights(s, tokens.len())?;
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).map_err(io(&hf))?;
    let hm: std::collections::HashMap<String, Tensor> = w.clone().into_iter().collect();
    candle_core::safetensors::save(&hm, hf.join("model.safetensors"))?;
    let hd = s.head_dim();
    let cfg = serde_json::json!({
        "model_type": if s.is_gemma() { "gemma3_text" } else { s.arch }, "hidden_size": s.hidden,
        "intermediate_size": s.ffn, "num_hidden_layers": s.n_layer, "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_kv_head, "head_dim": hd, "vocab_size": tokens.len(),
        "rms_norm_eps": s.rms_eps(), "rope_theta": s.rope_theta(),
        "max_position_embeddings": s.context, "tie_word_embeddings": true});
    let mut cfg = cfg;
    if s.is_gemma() {
        let (window, pattern) = s.sliding_window.unwrap_or((s.context, 1));
        let types: Vec<&str> = (0..s.n_layer)
            .map(|i| {
                if i % pattern < pattern - 1 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        cfg["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
        cfg["query_pre_attn_scalar"] = serde_json::json!(hd);
        cfg["sliding_window"] = serde_json::json!(window);
        cfg["layer_types"] = serde_json::json!(types);
        cfg["rope_local_base_freq"] = serde_json::json!(10000.0);
        cfg["hidden_activation"] = serde_json::json!("gelu_pytorch_tanh");
        cfg["final_logit_softcapping"] = serde_json::Value::Null;
        cfg["attn_logit_softcapping"] = serde_json::Value::Null;
        cfg["rope_scaling"] = serde_json::Value::Null;
        cfg["bos_token_id"] = serde_json::json!(1);
        cfg["eos_token_id"] = serde_json::json!(2);
        cfg["pad_token_id"] = serde_json::json!(0);
    }
    if s.llama3_rope {
        cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
    }
    std::fs::write(hf.join("config.json"), cfg.to_string()).map_err(io(&hf))?;

    // GGUF
    use gguf_file::Value as V;
    let a = s.arch;
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.into())),
        (format!("{a}.block_count"), V::U32(s.n_layer as u32)),
        (format!("{a}.context_length"), V::U32(s.context as u32)),
        (format!("{a}.embedding_length"), V::U32(s.hidden as u32)),
        (format!("{a}.feed_forward_length"), V::U32(s.ffn as u32)),
        (format!("{a}.attention.head_count"), V::U32(s.n_head as u32)),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(s.n_kv_head as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(s.rms_eps()),
        ),
        (format!("{a}.rope.freq_base"), V::F32(s.rope_theta())),
        (format!("{a}.attention.key_length"), V::U32(hd as u32)),
        (format!("{a}.attention.value_length"), V::U32(hd as u32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.iter().map(|t| V::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|t| V::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(merges.iter().map(|t| V::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::String(crate::chat::CHATML.into()),
        ),
    ];
    if let (true, Some((window, pattern))) = (s.is_gemma(), s.sliding_window) {
        meta.push((
            format!("{a}.attention.sliding_window"),
            V::U32(window as u32),
        ));
        meta.push((
            format!("{a}.attention.sliding_window_pattern"),
            V::U32(pattern as u32),
        ));
    }
    // llama.cpp's converter names, and its Gemma norms stored as 1+w
    // an architecture the engine does not serve is written llama-shaped (for
    // the tests of its refusal)
    let family = crate::family::Arch::parse(a)
        .map(crate::family::Arch::family)
        .unwrap_or(&crate::family::llama::FAMILY);
    let gname = |hf: &str| -> String {
        let hf = hf.strip_prefix("model.").unwrap_or(hf);
        if hf == "embed_tokens.weight" {
            return "token_embd.weight".into();
        }
        if hf == "norm.weight" {
            return "output_norm.weight".into();
        }
        let rest = hf.strip_prefix("layers.").unwrap_or(hf);
        let (idx, name) = rest.split_once('.').unwrap_or(("0", rest));
        if let Some(n) = family
            .norms
            .iter()
            .find(|n| name.strip_suffix(".weight") == Some(n.hf))
        {
            return format!("blk.{idx}.{}.weight", n.gguf);
        }
        let name = name
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down");
        format!("blk.{idx}.{name}")
    };
    let mut qts = Vec::new();
    for (name, t) in &w {
        let mut t = t.clone();
        if family.norm_plus_one && t.rank() == 1 {
            t = (t + 1.0)?;
        }
        let perm = if name.ends_with("q_proj.weight") {
            Some(permute(s.n_head, hd))
        } else if name.ends_with("k_proj.weight") {
            Some(permute(s.n_kv_head, hd))
        } else {
            None
        };
        if let (Some(p), true) = (perm, family.gguf_qk_permuted) {
            let idx = Tensor::from_vec(
                p.iter().map(|&x| x as u32).collect::<Vec<_>>(),
                p.len(),
                &Device::Cpu,
            )?;
            t = t.index_select(&idx, 0)?;
        }
        let dtype = match (t.rank(), name.contains("embed")) {
            (2, false) => s.gguf_dtype,
            (2, true) => s.embed_dtype,
            _ => GgmlDType::F32,
        };
        qts.push((gname(name), QTensor::quantize(&t, dtype)?));
    }
    if s.llama3_rope {
        let d = crate::model::llama3_rope_divisors(10000.0, hd, 8.0, 1.0, 4.0, 32.0);
        let t = Tensor::from_vec(d, hd / 2, &Device::Cpu)?;
        qts.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let path = dir.join("model.gguf");
    let mut f = std::fs::File::create(&path).map_err(io(&path))?;
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs)?;

    // tokenizer files for the HF directory, from the same vocabulary
    let g = crate::gguf::GgufFile::open(&path)?;
    let tok = crate::tokenizer::Tok::from_gguf(&g)?;
    tok.inner
        .save(hf.join("tokenizer.json"), false)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let tc = serde_json::json!({"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "chat_template": crate::chat::CHATML});
    std::fs::write(hf.join("tokenizer_config.json"), tc.to_string()).map_err(io(&hf))?;
    Ok((path, hf))
}

/// A PEFT-format LoRA adapter for a tiny model: `rank` on each module of
/// `modules` (indices into [`retune_adapters::MODULES`]), B scaled by `b_scale`.
pub fn write_adapter(
    dir: &Path,
    s: &TinySpec,
    rank: usize,
    modules: &[usize],
    seed: u64,
    alpha: f32,
    b_scale: f32,
) -> Result<()> {
    write_random_adapter(dir, &s.base_shapes(), rank, modules, seed, alpha, b_scale)
}

/// Tensor dtypes for [`write_random_adapter_as`].
pub use candle_core::DType;

/// A random PEFT-format LoRA adapter for any base (tests and benchmarks).
pub fn write_random_adapter(
    dir: &Path,
    shapes: &retune_adapters::BaseShapes,
    rank: usize,
    modules: &[usize],
    seed: u64,
    alpha: f32,
    b_scale: f32,
) -> Result<()> {
    write_random_adapter_as(
        dir,
        shapes,
        rank,
        modules,
        seed,
        (alpha, b_scale),
        candle_core::DType::F32,
    )
}

/// [`write_random_adapter`] with tensors stored as `dtype` (f32, f16 or bf16;
/// `scales` is (alpha, B's scale)).
pub fn write_random_adapter_as(
    dir: &Path,
    shapes: &retune_adapters::BaseShapes,
    rank: usize,
    modules: &[usize],
    seed: u64,
    scales: (f32, f32),
    dtype: candle_core::DType,
) -> Result<()> {
    use retune_adapters::MODULES;
    let (alpha, b_scale) = scales;
    let mut r = Lcg(seed);
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..shapes.n_layers {
        for &m in modules {
            let (out, inp) = shapes.dims[m];
            let path = if m < 4 { "self_attn" } else { "mlp" };
            let base = format!(
                "base_model.model.model.layers.{layer}.{path}.{}",
                MODULES[m]
            );
            tensors.insert(
                format!("{base}.lora_A.weight"),
                r.tensor(&[rank, inp], 1.0 / (inp as f32).sqrt(), 0.0)?
                    .to_dtype(dtype)?,
            );
            tensors.insert(
                format!("{base}.lora_B.weight"),
                r.tensor(&[out, rank], b_scale, 0.0)?.to_dtype(dtype)?,
            );
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    let targets: Vec<&str> = modules.iter().map(|&m| MODULES[m]).collect();
    let cfg = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "bias": "none", "use_rslora": false, "base_model_name_or_path": "random"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).map_err(io(dir))?;
    Ok(())
}

/// A random PEFT `SEQ_CLS` adapter (a classifier): [`write_random_adapter`]'s
/// LoRA pairs plus a `score` head over `labels` (rows uniform in ±`head_scale`),
/// its labels in the weights file's metadata.
#[allow(clippy::too_many_arguments)]
pub fn write_classifier_adapter(
    dir: &Path,
    shapes: &retune_adapters::BaseShapes,
    rank: usize,
    modules: &[usize],
    seed: u64,
    labels: &[&str],
    head_scale: f32,
) -> Result<()> {
    write_random_adapter(dir, shapes, rank, modules, seed, 2.0 * rank as f32, 0.05)?;
    let st_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(io(dir))?;
    let bad = |e: String| EngineError::InvalidRequest(format!("classifier adapter: {e}"));
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let hidden = shapes.dims[0].1;
    let mut r = Lcg(seed ^ 0x5eed);
    let head: Vec<u8> = (0..labels.len() * hidden)
        .flat_map(|_| (head_scale * r.next()).to_le_bytes())
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().collect();
    views.push((
        retune_adapters::HEAD_TENSOR.to_string(),
        safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![labels.len(), hidden],
            &head,
        )
        .map_err(|e| bad(e.to_string()))?,
    ));
    let meta = std::collections::HashMap::from([(
        retune_adapters::LABELS_METADATA.to_string(),
        serde_json::to_string(labels).map_err(|e| bad(e.to_string()))?,
    )]);
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| bad(e.to_string()))?;
    std::fs::write(&st_path, out).map_err(io(dir))?;
    let cfg_path = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).map_err(io(dir))?)
            .map_err(|e| bad(e.to_string()))?;
    cfg["task_type"] = serde_json::json!("SEQ_CLS");
    cfg["modules_to_save"] = serde_json::json!(["score"]);
    std::fs::write(&cfg_path, cfg.to_string()).map_err(io(dir))?;
    Ok(())
}
