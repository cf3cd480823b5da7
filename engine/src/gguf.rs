//! GGUF loading: metadata → [`ModelConfig`], tensors → [`Linear`]s. Native block
//! formats (Q4_0, Q4_1, Q8_0) and f32 are read as raw bytes and stay quantized;
//! other quantized types run through candle's `QMatMul`.

use crate::error::{EngineError, Result};
use crate::kernels::BlockFormat;
use crate::kquants::KFormat;
use crate::linear::{Linear, Weight};
use crate::model::{Arch, Layer, Model, ModelConfig};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::Device;
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EngineError::NotFound(path.to_path_buf()),
            _ => EngineError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| EngineError::invalid(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| EngineError::invalid(&self.path, format!("missing metadata `{key}`")))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
            .map(|x| x as usize)
            .map_err(|e| EngineError::invalid(&self.path, format!("metadata `{key}`: {e}")))
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| v.to_f32().ok())
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let arch = Arch::parse(self.meta_str("general.architecture").unwrap_or(""))?;
        let a = |k: &str| format!("{arch}.{k}");
        let hidden = self.meta_usize(&a("embedding_length"))?;
        let n_head = self.meta_usize(&a("attention.head_count"))?;
        let n_kv_head = self
            .meta_usize(&a("attention.head_count_kv"))
            .unwrap_or(n_head);
        // llama.cpp's n_embd_head_k: the key length, else the rope width
        let head_dim = self
            .meta_usize(&a("attention.key_length"))
            .or_else(|_| self.meta_usize(&a("rope.dimension_count")))
            .unwrap_or(hidden / n_head.max(1));
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims().first().copied().unwrap_or(0),
            None => return Err(EngineError::MissingTensor("token_embd.weight".into())),
        };
        let rope_freq_divisors = match self.meta_str(&a("rope.scaling.type")) {
            None | Some("none") => Vec::new(),
            Some("linear") => {
                vec![self.meta_f32(&a("rope.scaling.factor")).unwrap_or(1.0); head_dim / 2]
            }
            Some(other) => {
                return Err(EngineError::invalid(
                    &self.path,
                    format!("rope scaling `{other}` is not supported"),
                ))
            }
        };
        let cfg = ModelConfig {
            rope_freq_divisors,
            n_layer: self.meta_usize(&a("block_count"))?,
            hidden,
            ffn: self.meta_usize(&a("feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            vocab,
            rms_eps: self
                .meta_f32(&a("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self.meta_f32(&a("rope.freq_base")).unwrap_or(10_000.0),
            context: self.meta_usize(&a("context_length")).unwrap_or(4096),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            swa_pattern: 0,
            rope_theta_swa: None,
            arch,
        };
        let cfg = match arch {
            Arch::Gemma3 => ModelConfig {
                // a Gemma 3 GGUF without a window attends globally in every layer
                // (llama.cpp's LLAMA_SWA_TYPE_NONE)
                sliding_window: self
                    .meta_usize(&a("attention.sliding_window"))
                    .ok()
                    .filter(|&w| w > 0),
                swa_pattern: self
                    .meta_usize(&a("attention.sliding_window_pattern"))
                    .unwrap_or(crate::family::gemma3::SWA_PATTERN),
                rope_theta_swa: Some(self.meta_f32(&a("rope.freq_base_swa")).unwrap_or(10_000.0)),
                rms_eps: self
                    .meta_f32(&a("attention.layer_norm_rms_epsilon"))
                    .unwrap_or(1e-6),
                ..cfg
            },
            _ => cfg,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn info(&self, name: &str) -> Result<&gguf_file::TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    fn raw(&mut self, name: &str, bytes: usize) -> Result<Vec<u8>> {
        let off = self.content.tensor_data_offset + self.info(name)?.offset;
        let mut buf = vec![0u8; bytes];
        let path = self.path.clone();
        self.reader
            .seek(SeekFrom::Start(off))
            .and_then(|_| self.reader.read_exact(&mut buf))
            .map_err(|e| {
                EngineError::invalid(
                    &path,
                    format!("tensor `{name}` data unreadable (truncated file?): {e}"),
                )
            })?;
        Ok(buf)
    }

    /// A 1-D f32 vector (norm weights, biases).
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let dims = info.shape.dims().to_vec();
        if dims.iter().product::<usize>() != len {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                got: dims,
                expected: vec![len],
            });
        }
        match info.ggml_dtype {
            GgmlDType::F32 => Ok(self
                .raw(name, len * 4)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            _ => self.dequantized(name),
        }
    }

    fn dequantized(&mut self, name: &str) -> Result<Vec<f32>> {
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::invalid(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// A `[rows, cols]` matrix as a linear; `perm` reorders its rows (new row `i`
    /// = stored row `perm[i]`).
    pub fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<&str>,
        perm: Option<&[usize]>,
    ) -> Result<Linear> {
        let info = self.info(name)?;
        let dims = info.shape.dims().to_vec();
        if dims != [rows, cols] {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                got: dims,
                expected: vec![rows, cols],
            });
        }
        let dtype = info.ggml_dtype;
        if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) || cols % dtype.block_size() != 0 {
            return Err(EngineError::UnsupportedQuantization {
                tensor: name.into(),
                dtype: format!("{dtype:?}"),
            });
        }
        let weight = match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let mut w = self.dequantized(name)?;
                if let Some(p) = perm {
                    w = permute_rows(&w, cols, p);
                }
                Weight::F32(w)
            }
            _ => {
                let row_bytes = cols / dtype.block_size() * dtype.type_size();
                let mut data = self.raw(name, rows * row_bytes)?;
                if let Some(p) = perm {
                    data = permute_rows(&data, row_bytes, p);
                }
                match dtype {
                    GgmlDType::Q4_0 => Weight::Blocks {
                        format: BlockFormat::Q4_0,
                        data,
                    },
                    GgmlDType::Q4_1 => Weight::Blocks {
                        format: BlockFormat::Q4_1,
                        data,
                    },
                    GgmlDType::Q8_0 => Weight::Blocks {
                        format: BlockFormat::Q8_0,
                        data,
                    },
                    // every Q5_0 value is a 5-bit integer times the block's
                    // f16 scale: the same integer in a Q8_0 block with the
                    // same scale is the same value, and runs on the native
                    // kernels (candle's Q5_0 dot product is scalar)
                    GgmlDType::Q5_0 => Weight::Blocks {
                        format: BlockFormat::Q8_0,
                        data: q5_0_as_q8_0(&data),
                    },
                    // the embedding table needs row lookups, which candle's
                    // QMatMul lacks; projections stay on its K-quant dot
                    // products, 3-10x faster than dequantizing rows into the
                    // f32 tiles (BENCHMARKS.md, "K-quants")
                    GgmlDType::Q4K if name == "token_embd.weight" => Weight::KBlocks {
                        format: KFormat::Q4K,
                        data,
                    },
                    GgmlDType::Q5K if name == "token_embd.weight" => Weight::KBlocks {
                        format: KFormat::Q5K,
                        data,
                    },
                    GgmlDType::Q6K if name == "token_embd.weight" => Weight::KBlocks {
                        format: KFormat::Q6K,
                        data,
                    },
                    _ => {
                        let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, dtype)?;
                        Weight::Candle(QMatMul::from_qtensor(QTensor::new(storage, (rows, cols))?)?)
                    }
                }
            }
        };
        let mut bias = match bias {
            Some(b) if self.content.tensor_infos.contains_key(b) => Some(self.vector(b, rows)?),
            _ => None,
        };
        if let (Some(b), Some(p)) = (&mut bias, perm) {
            *b = permute_rows(b, 1, p);
        }
        Linear::new(rows, cols, weight, bias)
    }

    pub fn load_model(&mut self) -> Result<Model> {
        let mut cfg = self.config()?;
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            cfg.rope_freq_divisors = self.vector("rope_freqs.weight", cfg.head_dim / 2)?;
        }
        let (h, qd, kd, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
        // llama.cpp's converter permutes Q/K rows of llama-arch models for its
        // interleaved rope; undo that so rope (and LoRA) use the HF layout.
        let family = cfg.arch.family();
        let permuted = family.gguf_qk_permuted;
        let q_perm = permuted.then(|| unpermute(cfg.n_head, cfg.head_dim));
        let k_perm = permuted.then(|| unpermute(cfg.n_kv_head, cfg.head_dim));
        let embed = self.linear("token_embd.weight", cfg.vocab, h, None, None)?;
        if matches!(embed.weight, Weight::Candle(_)) {
            return Err(EngineError::UnsupportedQuantization {
                tensor: "token_embd.weight".into(),
                dtype: format!("{:?}", self.info("token_embd.weight")?.ggml_dtype),
            });
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let q = self.linear(
                &p("attn_q.weight"),
                qd,
                h,
                Some(&p("attn_q.bias")),
                q_perm.as_deref(),
            )?;
            let k = self.linear(
                &p("attn_k.weight"),
                kd,
                h,
                Some(&p("attn_k.bias")),
                k_perm.as_deref(),
            )?;
            let norms = family
                .norms
                .iter()
                .map(|n| self.vector(&p(&format!("{}.weight", n.gguf)), n.len(&cfg)))
                .collect::<Result<Vec<_>>>()?;
            layers.push(Layer {
                norms,
                q,
                k,
                v: self.linear(&p("attn_v.weight"), kd, h, Some(&p("attn_v.bias")), None)?,
                o: self.linear(&p("attn_output.weight"), h, qd, None, None)?,
                gate: self.linear(&p("ffn_gate.weight"), f, h, None, None)?,
                up: self.linear(&p("ffn_up.weight"), f, h, None, None)?,
                down: self.linear(&p("ffn_down.weight"), h, f, None, None)?,
            });
        }
        let norm = self.vector("output_norm.weight", h)?;
        let lm_head = if self.content.tensor_infos.contains_key("output.weight") {
            Some(self.linear("output.weight", cfg.vocab, h, None, None)?)
        } else {
            None
        };
        Model::new(cfg, embed, layers, norm, lm_head)
    }
}

/// Q5_0 blocks (f16 d, 32 fifth bits, 16 nibble bytes: value `(q − 16)·d`)
/// rewritten as Q8_0 blocks (f16 d, 32 i8: value `q·d`) holding the same values.
pub fn q5_0_as_q8_0(data: &[u8]) -> Vec<u8> {
    const Q5: usize = 22;
    const Q8: usize = 34;
    let mut out = Vec::with_capacity(data.len() / Q5 * Q8);
    for b in data.chunks_exact(Q5) {
        out.extend_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut hi = [0u8; 16];
        for j in 0..16 {
            // ggml's dequantize_row_q5_0
            let lo = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10) as u8;
            hi[j] = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10) as u8;
            out.push((lo as i8 - 16) as u8);
        }
        out.extend(hi.iter().map(|&h| (h as i8 - 16) as u8));
    }
    out
}

fn permute_rows<T: Copy>(v: &[T], row: usize, perm: &[usize]) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for &p in perm {
        out.extend_from_slice(&v[p * row..(p + 1) * row]);
    }
    out
}

/// Row order that maps llama.cpp's permuted Q/K back to HF order:
/// HF row `h*d + s*d/2 + i` is GGUF row `h*d + 2*i + s`.
pub fn unpermute(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(heads * head_dim);
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                perm.push(h * head_dim + 2 * i + s);
            }
        }
    }
    perm
}

/// The inverse of [`unpermute`]: what llama.cpp's converter does (used by tests
/// that write GGUF files).
pub fn permute(heads: usize, head_dim: usize) -> Vec<usize> {
    let un = unpermute(heads, head_dim);
    let mut inv = vec![0; un.len()];
    for (i, &p) in un.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dequant_row_reference;
    use candle_core::Tensor;

    /// The Q8_0 blocks hold every value of the Q5_0 blocks bit for bit (against
    /// candle's Q5_0 dequantization, ggml's definition), the fifth bit of
    /// both halves included.
    #[test]
    fn q5_0_rewritten_as_q8_0_keeps_every_value() {
        let n = 32 * 64;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 32) as f32))
            .collect();
        let t = Tensor::from_vec(v, (2, n / 2), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let data = q.data().unwrap().to_vec();
        assert_eq!(data.len(), n / 32 * 22);
        let q8 = q5_0_as_q8_0(&data);
        assert_eq!(q8.len(), n / 32 * 34);
        let mut got = vec![0f32; n];
        dequant_row_reference(BlockFormat::Q8_0, &q8, &mut got);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        // values use all 32 levels, so both fifth-bit halves were exercised
        let levels: std::collections::BTreeSet<i8> = q8
            .chunks_exact(34)
            .flat_map(|b| b[2..].iter().map(|&x| x as i8))
            .collect();
        assert_eq!(levels.len(), 32, "{levels:?}");
    }
}
