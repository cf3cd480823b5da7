//! The tensor backend (the code the `cuda` feature runs on the GPU), checked on
//! candle's CPU device against the native CPU engine: same logits up to f32
//! summation order, same greedy tokens, mixed adapters, chunked prefill, KV and
//! adapter slots.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use retune_adapters::{load_peft, LoadLimits, LoraAdapter};
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-device-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spread(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> (u32, f32) {
    let mut best = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            best = (i, x, best.1);
        } else if x > best.2 {
            best.2 = x;
        }
    }
    (best.0 as u32, best.1 - best.2)
}

fn model_file(dir: &Path, dtype: GgmlDType) -> (PathBuf, TinySpec) {
    let spec = TinySpec {
        gguf_dtype: dtype,
        ..TinySpec::default()
    };
    let (gguf, _) = tiny::write(dir, &spec).unwrap();
    (gguf, spec)
}

fn adapter(
    dir: &Path,
    spec: &TinySpec,
    m: &Model,
    rank: usize,
    modules: &[usize],
    seed: u64,
) -> LoraAdapter {
    tiny::write_adapter(dir, spec, rank, modules, seed, 2.0 * rank as f32, 0.05).unwrap();
    load_peft(dir, &m.base_shapes(), &LoadLimits::default()).unwrap()
}

fn device_model(path: &Path, opts: DeviceOptions) -> DeviceModel {
    DeviceModel::from_model(load(path).unwrap().model, &Device::Cpu, &opts).unwrap()
}

fn f32_opts() -> DeviceOptions {
    DeviceOptions {
        dtype: DType::F32,
        slots: 8,
        slot_context: 256,
        adapter_slots: 8,
        max_rank: 16,
        ..DeviceOptions::default()
    }
}

/// One row of a multi-step run: tokens to feed per step (empty = skip this step).
struct Plan<'a> {
    steps: Vec<Vec<u32>>,
    adapter: Option<&'a LoraAdapter>,
}

/// Run the same schedule through both backends; compare every logit row.
/// Returns the largest difference relative to the logit range.
fn run_both(host: &Model, dev: &DeviceModel, plans: &[Plan<'_>], decode: usize, tie: f32) -> f32 {
    let mut hk: Vec<_> = plans.iter().map(|_| host.new_cache()).collect();
    let mut dk: Vec<_> = plans.iter().map(|_| dev.new_cache().unwrap()).collect();
    let mut last: Vec<Option<u32>> = vec![None; plans.len()];
    let steps = plans.iter().map(|p| p.steps.len()).max().unwrap_or(0);
    let mut worst = 0f32;
    for step in 0..steps + decode {
        let feed: Vec<Vec<u32>> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| match p.steps.get(step) {
                Some(t) => t.clone(),
                None if step >= p.steps.len() => last[i].map(|t| vec![t]).unwrap_or_default(),
                None => Vec::new(),
            })
            .collect();
        let want: Vec<bool> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| !feed[i].is_empty() && step + 1 >= p.steps.len())
            .collect();
        let active: Vec<usize> = (0..plans.len()).filter(|&i| !feed[i].is_empty()).collect();
        let mut hi: Vec<BatchItem<'_>> = Vec::new();
        let mut di: Vec<BatchItem<'_, device::DeviceKv>> = Vec::new();
        for ((i, h), d) in hk.iter_mut().enumerate().zip(dk.iter_mut()) {
            if feed[i].is_empty() {
                continue;
            }
            hi.push(BatchItem {
                tokens: &feed[i],
                adapter: plans[i].adapter,
                kv: h,
                want_logits: want[i],
                only: None,
            });
            di.push(BatchItem {
                tokens: &feed[i],
                adapter: plans[i].adapter,
                kv: d,
                want_logits: want[i],
                only: None,
            });
        }
        let a = host.forward(&mut hi).unwrap();
        let b = dev.forward(&mut di).unwrap();
        assert_eq!(a.len(), b.len());
        let mut k = 0;
        for &i in &active {
            if !want[i] {
                continue;
            }
            let (x, y) = (&a[k], &b[k]);
            let rel = max_diff(x, y) / spread(x);
            worst = worst.max(rel);
            let (tx, gap) = argmax(x);
            let (ty, _) = argmax(y);
            if gap > tie * spread(x) {
                assert_eq!(tx, ty, "step {step} row {i}: greedy token differs");
            }
            last[i] = Some(tx);
            k += 1;
        }
    }
    for (h, d) in hk.iter().zip(&dk) {
        assert_eq!(h.len(), d.len());
    }
    worst
}

#[test]
fn tensor_backend_equals_the_native_engine_with_mixed_adapters_and_chunked_prefill() {
    // the tensor backend keeps activations in f32: compare on the native
    // engine's f32-activation path (nextest runs each test in its own process)
    retune_engine::kernels_f32::set_path(retune_engine::kernels_f32::best_f32_path()).unwrap();
    let dir = tmpdir("equal");
    let (gguf, spec) = model_file(&dir, GgmlDType::Q4_1);
    let host = load(&gguf).unwrap().model;
    let dev = device_model(&gguf, f32_opts());
    assert_eq!(dev.fingerprint(), host.fingerprint());
    let a4 = adapter(&dir.join("r4"), &spec, &host, 4, &[0, 2], 1);
    let a8 = adapter(&dir.join("r8"), &spec, &host, 8, &[0, 1, 2, 3, 4, 5, 6], 2);
    let a16 = adapter(&dir.join("r16"), &spec, &host, 16, &[3, 4, 5, 6], 3);
    let plans = vec![
        // prefill in one chunk, base model
        Plan {
            steps: vec![(3..20).collect()],
            adapter: None,
        },
        // a one-token prompt: decodes from the first step
        Plan {
            steps: vec![vec![9]],
            adapter: Some(&a4),
        },
        // chunked prefill: 17 then 13 tokens onto the existing cache
        Plan {
            steps: vec![(20..37).collect(), (40..53).collect()],
            adapter: Some(&a8),
        },
        // joins late (nothing in step 0), shares a8 with the row above
        Plan {
            steps: vec![vec![], (60..71).collect()],
            adapter: Some(&a8),
        },
        Plan {
            steps: vec![(5..12).collect()],
            adapter: Some(&a16),
        },
    ];
    let worst = run_both(&host, &dev, &plans, 12, 1e-3);
    // same dequantized weights, f32 activations, f16 cache: only the order of f32
    // operations differs (candle's fused rms norm / rope / softmax; measured 1.0e-5)
    assert!(worst < 5e-5, "max relative logit difference {worst}");
    // every distinct adapter was uploaded once and reused across steps
    assert_eq!(dev.adapter_uploads(), 3);
}

#[test]
fn mixed_adapter_batch_on_the_tensor_backend_equals_each_row_alone() {
    let dir = tmpdir("mixed");
    let (gguf, spec) = model_file(&dir, GgmlDType::Q8_0);
    let host = load(&gguf).unwrap().model;
    let dev = device_model(&gguf, f32_opts());
    let a4 = adapter(&dir.join("r4"), &spec, &host, 4, &[0, 2], 1);
    let a16 = adapter(
        &dir.join("r16"),
        &spec,
        &host,
        16,
        &[0, 1, 2, 3, 4, 5, 6],
        3,
    );
    let rows: Vec<(Vec<u32>, Option<&LoraAdapter>)> = vec![
        ((3..20).collect(), None),
        ((5..9).collect(), Some(&a4)),
        ((7..40).collect(), Some(&a16)),
        (vec![11], Some(&a16)),
        ((40..47).collect(), None),
    ];
    let one = |t: &[u32], a: Option<&LoraAdapter>| {
        let mut kv = dev.new_cache().unwrap();
        dev.forward(&mut [BatchItem {
            tokens: t,
            adapter: a,
            kv: &mut kv,
            want_logits: true,
            only: None,
        }])
        .unwrap()
        .remove(0)
    };
    let alone: Vec<Vec<f32>> = rows.iter().map(|(t, a)| one(t, *a)).collect();
    let mut caches: Vec<_> = rows.iter().map(|_| dev.new_cache().unwrap()).collect();
    let mut items: Vec<BatchItem<'_, device::DeviceKv>> = rows
        .iter()
        .zip(caches.iter_mut())
        .map(|((t, a), kv)| BatchItem {
            tokens: t,
            adapter: *a,
            kv,
            want_logits: true,
            only: None,
        })
        .collect();
    let batched = dev.forward(&mut items).unwrap();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert!(
            // f32 matmuls of different shapes (measured up to 8.4e-6; 1.3e-5 below)
            max_diff(a, b) <= 5e-5 * spread(a),
            "row {i}: {}",
            max_diff(a, b)
        );
        assert_eq!(argmax(a).0, argmax(b).0, "row {i}");
    }
    assert!(
        max_diff(&alone[2], &one(&rows[2].0, None)) > 1e-2 * spread(&alone[2]),
        "adapter changes the row"
    );
    drop(items);
    drop(caches); // the KV slots go back
                  // reversed: the adapters' device slots are now out of order (gathered, not a view)
    let mut caches: Vec<_> = rows.iter().map(|_| dev.new_cache().unwrap()).collect();
    let mut items: Vec<BatchItem<'_, device::DeviceKv>> = rows
        .iter()
        .rev()
        .zip(caches.iter_mut())
        .map(|((t, a), kv)| BatchItem {
            tokens: t,
            adapter: *a,
            kv,
            want_logits: true,
            only: None,
        })
        .collect();
    let reversed = dev.forward(&mut items).unwrap();
    for (i, (a, b)) in alone.iter().rev().zip(&reversed).enumerate() {
        assert!(
            max_diff(a, b) <= 5e-5 * spread(a),
            "reversed row {i}: {}",
            max_diff(a, b)
        );
    }
    drop(items);
    drop(caches);
    // every row on one adapter, in order: the no-gather path
    let same: Vec<Vec<u32>> = vec![(3..20).collect(), vec![7], (30..41).collect()];
    let alone16: Vec<Vec<f32>> = same.iter().map(|t| one(t, Some(&a16))).collect();
    let mut caches: Vec<_> = same.iter().map(|_| dev.new_cache().unwrap()).collect();
    let mut items: Vec<BatchItem<'_, device::DeviceKv>> = same
        .iter()
        .zip(caches.iter_mut())
        .map(|(t, kv)| BatchItem {
            tokens: t,
            adapter: Some(&a16),
            kv,
            want_logits: true,
            only: None,
        })
        .collect();
    for (a, b) in alone16.iter().zip(&dev.forward(&mut items).unwrap()) {
        assert!(max_diff(a, b) <= 5e-5 * spread(a), "{}", max_diff(a, b));
    }
}

#[test]
fn quantized_weights_and_bf16_stay_close_to_the_native_engine() {
    let dir = tmpdir("quant");
    let (gguf, _) = model_file(&dir, GgmlDType::Q8_0);
    let host = load(&gguf).unwrap().model;
    let toks: Vec<u32> = (3..40).collect();
    let mut kv = host.new_cache();
    let want = host
        .forward(&mut [BatchItem {
            tokens: &toks,
            adapter: None,
            kv: &mut kv,
            want_logits: true,
            only: None,
        }])
        .unwrap()
        .remove(0);
    for opts in [
        DeviceOptions {
            weights: WeightMode::Quantized,
            ..f32_opts()
        },
        DeviceOptions {
            dtype: DType::BF16,
            ..f32_opts()
        },
    ] {
        let dev = device_model(&gguf, opts.clone());
        let mut kv = dev.new_cache().unwrap();
        let got = dev
            .forward(&mut [BatchItem {
                tokens: &toks,
                adapter: None,
                kv: &mut kv,
                want_logits: true,
                only: None,
            }])
            .unwrap()
            .remove(0);
        let rel = max_diff(&want, &got) / spread(&want);
        // int8 activations (candle's q8 matmul) or bf16 weights: close, not equal
        // (measured 0.011 and 0.0047)
        assert!(
            rel < 0.03,
            "{:?}/{:?}: relative difference {rel}",
            opts.weights,
            opts.dtype
        );
        assert!(
            rel > 0.0,
            "a different arithmetic path should not be bit-identical"
        );
    }
}

#[test]
fn adapter_slots_evict_the_least_recently_used_and_refuse_overflow() {
    let dir = tmpdir("slots");
    let (gguf, spec) = model_file(&dir, GgmlDType::F32);
    let host = load(&gguf).unwrap().model;
    let dev = device_model(
        &gguf,
        DeviceOptions {
            adapter_slots: 2,
            ..f32_opts()
        },
    );
    let ads: Vec<LoraAdapter> = (0..3)
        .map(|i| {
            adapter(
                &dir.join(format!("a{i}")),
                &spec,
                &host,
                4 + 4 * i,
                &[0, 1, 2, 3, 4, 5, 6],
                10 + i as u64,
            )
        })
        .collect();
    let toks: Vec<u32> = (3..15).collect();
    let check = |a: &LoraAdapter| {
        let mut hk = host.new_cache();
        let want = host
            .forward(&mut [BatchItem {
                tokens: &toks,
                adapter: Some(a),
                kv: &mut hk,
                want_logits: true,
                only: None,
            }])
            .unwrap()
            .remove(0);
        let mut kv = dev.new_cache().unwrap();
        let got = dev
            .forward(&mut [BatchItem {
                tokens: &toks,
                adapter: Some(a),
                kv: &mut kv,
                want_logits: true,
                only: None,
            }])
            .unwrap()
            .remove(0);
        assert!(
            max_diff(&want, &got) < 1e-4 * spread(&want),
            "{}",
            max_diff(&want, &got)
        );
    };
    check(&ads[0]);
    check(&ads[1]);
    assert_eq!(dev.adapter_uploads(), 2);
    check(&ads[0]); // cached
    assert_eq!(dev.adapter_uploads(), 2);
    check(&ads[2]); // evicts ads[1], the least recently used; a rank-12 into a slot a rank-8 held
    check(&ads[0]);
    assert_eq!(dev.adapter_uploads(), 3);
    check(&ads[1]); // evicted, uploaded again, still right
    assert_eq!(dev.adapter_uploads(), 4);
    // three distinct adapters in one step do not fit two slots: a clear error
    let mut caches: Vec<_> = (0..3).map(|_| dev.new_cache().unwrap()).collect();
    let mut items: Vec<BatchItem<'_, device::DeviceKv>> = caches
        .iter_mut()
        .zip(&ads)
        .map(|(kv, a)| BatchItem {
            tokens: &toks,
            adapter: Some(a),
            kv,
            want_logits: true,
            only: None,
        })
        .collect();
    let err = dev.forward(&mut items).unwrap_err().to_string();
    assert!(err.contains("device adapter slots"), "{err}");
    // rank above the slab's max_rank is refused by name
    let small = device_model(
        &gguf,
        DeviceOptions {
            max_rank: 4,
            ..f32_opts()
        },
    );
    let mut kv = small.new_cache().unwrap();
    let err = small
        .forward(&mut [BatchItem {
            tokens: &toks,
            adapter: Some(&ads[1]),
            kv: &mut kv,
            want_logits: true,
            only: None,
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_rank"), "{err}");
}

#[test]
fn kv_slots_are_owned_by_sequences_and_returned_on_drop() {
    let dir = tmpdir("kvslots");
    let (gguf, _) = model_file(&dir, GgmlDType::F32);
    let dev = device_model(
        &gguf,
        DeviceOptions {
            slots: 2,
            slot_context: 64,
            ..f32_opts()
        },
    );
    assert_eq!(dev.cfg.context, 64);
    let a = dev.new_cache().unwrap();
    let b = dev.new_cache().unwrap();
    assert!(dev
        .new_cache()
        .unwrap_err()
        .to_string()
        .contains("KV slots"));
    drop(a);
    let mut c = dev.new_cache().unwrap();
    // the slot's previous owner left nothing behind that the new one can see
    let toks: Vec<u32> = (3..70).collect();
    let err = dev
        .forward(&mut [BatchItem {
            tokens: &toks,
            adapter: None,
            kv: &mut c,
            want_logits: true,
            only: None,
        }])
        .unwrap_err();
    assert!(
        matches!(err, EngineError::PromptTooLong { context: 64, .. }),
        "{err}"
    );
    drop(b);
}

#[test]
fn the_scheduler_runs_the_tensor_backend_with_the_same_greedy_tokens() {
    let dir = tmpdir("sched");
    let (gguf, _) = model_file(&dir, GgmlDType::Q4_1);
    let greedy = |prompt: Vec<u32>| GenerateRequest {
        prompt,
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(20)
        },
        adapter: None,
    };
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..(2 + i * 11))
                .map(|j| ((i * 31 + j * 7) % 250 + 3) as u32)
                .collect()
        })
        .collect();
    let run = |engine: Engine| -> Vec<Vec<u32>> {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| engine.generate(greedy(p.clone())).unwrap())
            .collect();
        streams
            .into_iter()
            .map(|mut s| {
                let mut got = Vec::new();
                while let Some(ev) = s.blocking_next() {
                    match ev {
                        Event::Token(t) => got.push(t.id),
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                    }
                }
                got
            })
            .collect()
    };
    let cfg = EngineConfig {
        prefill_chunk: 16,
        ..EngineConfig::default()
    };
    let l = load(&gguf).unwrap();
    let host = run(Engine::start(l.model, l.tok, cfg.clone()).unwrap());
    let l = load(&gguf).unwrap();
    // 4 KV slots for 6 requests: the scheduler admits at most 4 at once
    let dev = DeviceModel::from_model(
        l.model,
        &Device::Cpu,
        &DeviceOptions {
            slots: 4,
            ..f32_opts()
        },
    )
    .unwrap();
    let got = run(Engine::start(dev, l.tok, cfg).unwrap());
    assert_eq!(host, got);
}

#[test]
fn bf16_decode_attends_on_the_bf16_cache_and_stays_close() {
    let dir = tmpdir("bf16");
    let (gguf, spec) = model_file(&dir, GgmlDType::Q8_0);
    let host = load(&gguf).unwrap().model;
    let dev = device_model(
        &gguf,
        DeviceOptions {
            dtype: DType::BF16,
            ..f32_opts()
        },
    );
    let a8 = adapter(&dir.join("r8"), &spec, &host, 8, &[0, 1, 2, 3, 4, 5, 6], 2);
    let plans = vec![
        Plan {
            steps: vec![(3..20).collect()],
            adapter: None,
        },
        Plan {
            steps: vec![vec![9]],
            adapter: Some(&a8),
        },
        Plan {
            steps: vec![(20..37).collect(), (40..53).collect()],
            adapter: Some(&a8),
        },
    ];
    // bf16 weights, activations into the projections and cache: close, greedy
    // tokens equal outside near ties (5% of the logit range)
    let worst = run_both(&host, &dev, &plans, 10, 0.05);
    assert!(worst < 0.03, "max relative logit difference {worst}");
}

#[test]
fn an_adapter_the_device_cannot_run_fails_only_its_own_request() {
    use retune_adapters::{AdapterPool, AdapterRef, DirSource, PoolConfig, Via};
    use std::sync::Arc;
    let dir = tmpdir("isolation");
    let (gguf, spec) = model_file(&dir, GgmlDType::F32);
    let root = dir.join("adapters");
    // three rank-4 adapters for two adapter slots, and one of rank 32 (max_rank 16)
    for (i, (name, rank)) in [("a", 4), ("b", 4), ("c", 4), ("big", 32)]
        .iter()
        .enumerate()
    {
        tiny::write_adapter(
            &root.join(name),
            &spec,
            *rank,
            &[0, 1, 2, 3, 4, 5, 6],
            20 + i as u64,
            2.0 * *rank as f32,
            0.05,
        )
        .unwrap();
    }
    let l = load(&gguf).unwrap();
    let pool = AdapterPool::new(
        Arc::new(DirSource { root }),
        l.model.base_shapes(),
        PoolConfig::default(),
    );
    let dev = DeviceModel::from_model(
        l.model,
        &Device::Cpu,
        &DeviceOptions {
            adapter_slots: 2,
            ..f32_opts()
        },
    )
    .unwrap();
    let engine = Engine::start_with_pool(dev, l.tok, EngineConfig::default(), Some(pool)).unwrap();
    let req = |name: Option<&str>| GenerateRequest {
        prompt: (3..20).collect(),
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(12)
        },
        adapter: name.map(|n| AdapterRef::new("t", n, "v1", Via::Pinned).unwrap()),
    };
    let names = [Some("a"), Some("b"), Some("c"), Some("big"), None];
    let streams: Vec<_> = names
        .iter()
        .map(|n| engine.generate(req(*n)).unwrap())
        .collect();
    for (name, mut s) in names.iter().zip(streams) {
        let mut tokens = 0;
        let outcome = loop {
            match s.blocking_next() {
                Some(Event::Token(_)) => tokens += 1,
                Some(Event::Done(_)) => break Ok(tokens),
                Some(Event::Error(e)) => break Err(e),
                None => panic!("stream of {name:?} ended without an event"),
            }
        };
        match *name {
            Some("big") => {
                let e = outcome.unwrap_err();
                assert_eq!(e.kind, ErrorKind::Adapter);
                assert!(e.message.contains("max_rank"), "{}", e.message);
            }
            // three distinct adapters for two slots: spread over steps, all served
            _ => assert_eq!(outcome.unwrap(), 12, "{name:?}"),
        }
    }
}

#[test]
fn gemma3_on_the_tensor_backend_equals_the_native_engine_past_its_window() {
    // the same family file runs on both backends: Gemma 3's norms, GELU,
    // embedding scale, two rope tables and its sliding window (8 here) in
    // prefill chunks and decode steps, with mixed adapters
    retune_engine::kernels_f32::set_path(retune_engine::kernels_f32::best_f32_path()).unwrap();
    let dir = tmpdir("gemma3");
    let spec = TinySpec::gemma3();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let host = load(&gguf).unwrap().model;
    let dev = device_model(&gguf, f32_opts());
    assert_eq!(dev.fingerprint(), host.fingerprint());
    let a4 = adapter(&dir.join("r4"), &spec, &host, 4, &[0, 1, 2, 3, 4, 5, 6], 1);
    let a8 = adapter(&dir.join("r8"), &spec, &host, 8, &[0, 3, 6], 2);
    let plans = vec![
        Plan {
            steps: vec![(3..23).collect()],
            adapter: None,
        },
        Plan {
            steps: vec![vec![9]],
            adapter: Some(&a4),
        },
        Plan {
            steps: vec![(20..26).collect(), (40..53).collect()],
            adapter: Some(&a8),
        },
        Plan {
            steps: vec![vec![], (60..71).collect()],
            adapter: None,
        },
    ];
    let worst = run_both(&host, &dev, &plans, 12, 1e-3);
    // as for llama, f32 summation order only; Gemma's scaled embeddings and
    // post-norms make an ulp of K more often land on another f16 in the cache
    // (measured 1.3e-4; a wrong window, rope table or norm is ≥ 1e-2)
    assert!(worst < 5e-4, "max relative logit difference {worst}");
}
