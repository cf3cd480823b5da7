//! Gemma 3 on the host engine: the tiny random Gemma 3 of `TinySpec::gemma3()`
//! against HF transformers and peft (`tests/fixtures/gemma3`, made by
//! `scripts/make-gemma-fixture.py`), its GGUF against its safetensors, per-row
//! LoRA in mixed batches, and the sliding window.

use retune_adapters::{load_peft, LoadLimits, LoraAdapter};
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-gemma-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gemma3")
}

/// Last-position logits of each sequence, all in one batch.
fn batch_logits(model: &Model, seqs: &[(&[u32], Option<&LoraAdapter>)]) -> Vec<Vec<f32>> {
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut items: Vec<BatchItem> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|((tokens, adapter), kv)| BatchItem {
            tokens,
            adapter: *adapter,
            kv,
            want_logits: true,
            only: None,
        })
        .collect();
    model.forward(&mut items).unwrap()
}

/// Relative to the logits' range: what the engine's f16 KV cache costs
/// against HF's f32 one (as for llama, `tiny_model.rs`).
const TOL: f32 = 2e-3;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn spread(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

struct Fixture {
    seqs: Vec<Vec<u32>>,
    base: Vec<Vec<f32>>,
    adapter: Vec<Vec<f32>>,
}

fn fixture() -> Fixture {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("hf_logits.json")).unwrap())
            .unwrap();
    let f32s = |x: &serde_json::Value| -> Vec<Vec<f32>> {
        serde_json::from_value::<Vec<Vec<f64>>>(x.clone())
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect()
    };
    Fixture {
        seqs: serde_json::from_value(v["seqs"].clone()).unwrap(),
        base: f32s(&v["base"]),
        adapter: f32s(&v["adapter"]),
    }
}

/// Writes the tiny model for `scripts/make-gemma-fixture.py` (not a test).
#[test]
#[ignore]
fn write_tiny_gemma() {
    let out = PathBuf::from(std::env::var("RETUNE_TINY_OUT").expect("RETUNE_TINY_OUT"));
    std::fs::create_dir_all(&out).unwrap();
    tiny::write(&out, &TinySpec::gemma3()).unwrap();
}

#[test]
fn tiny_gemma3_matches_hf_transformers_from_safetensors_and_gguf() {
    let dir = tmpdir("hf");
    let (gguf, hf) = tiny::write(&dir, &TinySpec::gemma3()).unwrap();
    let fx = fixture();
    for path in [&hf, &gguf] {
        let model = load(path).unwrap().model;
        assert_eq!(model.cfg.arch, Arch::Gemma3);
        assert_eq!(model.cfg.head_dim, 32);
        assert_eq!(model.cfg.sliding_window, Some(8));
        let seqs: Vec<(&[u32], Option<&LoraAdapter>)> =
            fx.seqs.iter().map(|s| (s.as_slice(), None)).collect();
        let got = batch_logits(&model, &seqs);
        for (i, (g, want)) in got.iter().zip(&fx.base).enumerate() {
            eprintln!(
                "{} seq {i}: {}",
                path.display(),
                max_diff(g, want) / spread(want)
            );
            // f32 weights on both sides; the host cache holds K and V in f16
            // (2^-11 relative rounding), HF in f32
            assert!(
                max_diff(g, want) < TOL * spread(want),
                "{} sequence {i} ({} tokens): {} (spread {})",
                path.display(),
                fx.seqs[i].len(),
                max_diff(g, want),
                spread(want)
            );
        }
    }
}

#[test]
fn the_fixture_exercises_the_sliding_window_and_the_gemma_parts() {
    // the same weights with a window longer than every sequence must miss
    // HF's logits on the sequences longer than 8 (and only there): the
    // reference saw the window
    let dir = tmpdir("window");
    let (_, hf) = tiny::write(&dir, &TinySpec::gemma3()).unwrap();
    let fx = fixture();
    let mut model = load(&hf).unwrap().model;
    model.cfg.sliding_window = Some(1_000);
    let seqs: Vec<(&[u32], Option<&LoraAdapter>)> =
        fx.seqs.iter().map(|s| (s.as_slice(), None)).collect();
    let got = batch_logits(&model, &seqs);
    for (i, (g, want)) in got.iter().zip(&fx.base).enumerate() {
        let d = max_diff(g, want) / spread(want);
        if fx.seqs[i].len() <= 8 {
            assert!(d < TOL, "short sequence {i} changed: {d}");
        } else {
            assert!(d > 1e-2, "window made no difference on sequence {i}: {d}");
        }
    }
}

#[test]
fn peft_gemma_lora_per_row_beside_base_and_another_adapter_matches_peft() {
    let dir = tmpdir("lora");
    let spec = TinySpec::gemma3();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let model = load(&gguf).unwrap().model;
    let shapes = model.base_shapes();
    assert_eq!(shapes.dims, spec.base_shapes().dims);
    let peft = load_peft(
        &fixture_dir().join("adapter"),
        &shapes,
        &LoadLimits::default(),
    )
    .expect("peft's Gemma adapter loads");
    tiny::write_adapter(
        &dir.join("other"),
        &spec,
        8,
        &[0, 1, 2, 3, 4, 5, 6],
        9,
        16.0,
        0.2,
    )
    .unwrap();
    let other = load_peft(&dir.join("other"), &shapes, &LoadLimits::default()).unwrap();
    let fx = fixture();
    // every sequence three times: base, peft's adapter, another adapter
    let mut seqs: Vec<(&[u32], Option<&LoraAdapter>)> = Vec::new();
    for s in &fx.seqs {
        seqs.push((s, None));
        seqs.push((s, Some(&peft)));
        seqs.push((s, Some(&other)));
    }
    let got = batch_logits(&model, &seqs);
    for (i, s) in fx.seqs.iter().enumerate() {
        let (base, with, oth) = (&got[3 * i], &got[3 * i + 1], &got[3 * i + 2]);
        let tol = TOL * spread(&fx.adapter[i]);
        assert!(max_diff(base, &fx.base[i]) < tol, "base row {i}");
        assert!(
            max_diff(with, &fx.adapter[i]) < tol,
            "peft row {i} ({} tokens): {}",
            s.len(),
            max_diff(with, &fx.adapter[i])
        );
        assert!(
            max_diff(&fx.adapter[i], &fx.base[i]) > 1e-2 * spread(&fx.base[i]),
            "peft's adapter too weak to test anything"
        );
        // the other adapter's row is its own, not peft's or the base's
        let alone = batch_logits(&model, &[(s, Some(&other))]).remove(0);
        assert_eq!(oth, &alone, "row {i}: batch-invariant");
        assert!(max_diff(oth, with) > 1e-2 * spread(with));
    }
}

#[test]
fn gemma3_decode_step_by_step_equals_one_prefill() {
    let dir = tmpdir("decode");
    let (gguf, _) = tiny::write(&dir, &TinySpec::gemma3()).unwrap();
    let model = load(&gguf).unwrap().model;
    let toks: Vec<u32> = (3..33).collect();
    let whole = batch_logits(&model, &[(&toks, None)]).remove(0);
    let mut kv = model.new_cache();
    let mut last = Vec::new();
    for t in &toks {
        let one = [*t];
        let mut items = [BatchItem {
            tokens: &one,
            adapter: None,
            kv: &mut kv,
            want_logits: true,
            only: None,
        }];
        last = model.forward(&mut items).unwrap().remove(0);
    }
    assert!(
        max_diff(&whole, &last) < 1e-4 * spread(&whole),
        "{}",
        max_diff(&whole, &last)
    );
}

#[test]
fn an_architecture_not_served_is_refused_by_name_with_the_served_ones() {
    let e = Arch::parse("gemma4").unwrap_err().to_string();
    assert!(
        e.contains("gemma4") && e.contains("gemma3") && e.contains("llama"),
        "{e}"
    );
}

#[test]
fn a_row_narrowed_to_a_few_tokens_computes_their_logits_alone_on_every_path() {
    use candle_core::quantized::GgmlDType;
    use retune_engine::kernels_f32::{available_paths, set_path};
    let dir = tmpdir("sparse");
    let spec = TinySpec {
        gguf_dtype: GgmlDType::Q8_0,
        embed_dtype: GgmlDType::Q8_0,
        ..TinySpec::gemma3()
    };
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let toks: Vec<u32> = (3..30).collect();
    let ids = [5u32, 17, 200, 4];
    for p in available_paths() {
        set_path(p).unwrap();
        let model = load(&gguf).unwrap().model;
        let mut k1 = model.new_cache();
        let mut k2 = model.new_cache();
        let mut items = [
            BatchItem {
                tokens: &toks,
                adapter: None,
                kv: &mut k1,
                want_logits: true,
                only: None,
            },
            BatchItem {
                tokens: &toks,
                adapter: None,
                kv: &mut k2,
                want_logits: true,
                only: Some(&ids),
            },
        ];
        let out = model.forward(&mut items).unwrap();
        let (dense, sparse) = (&out[0], &out[1]);
        assert_eq!(sparse.len(), dense.len());
        for (t, (&d, &s)) in dense.iter().zip(sparse).enumerate() {
            if !ids.contains(&(t as u32)) {
                assert_eq!(s, f32::NEG_INFINITY, "{}: token {t}", p.key());
            } else if p.int8() {
                // the full projection rounds the hidden row to 8 bits here
                assert!(
                    (d - s).abs() < 2e-2 * spread(dense),
                    "{}: token {t}: {d} vs {s}",
                    p.key()
                );
            } else {
                assert_eq!(
                    d.to_bits(),
                    s.to_bits(),
                    "{}: token {t}: {d} vs {s}",
                    p.key()
                );
            }
        }
    }
}
