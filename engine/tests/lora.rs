//! Multi-LoRA on tiny random models: merged-weight reference, mixed batches,
//! GGUF Q/K layout, the adapter pool, and bad adapters.

use retune_adapters::{
    load_peft, Acquire, AdapterError, AdapterPool, AdapterRef, DirSource, LoadLimits, LoraAdapter,
    PoolConfig, Via,
};
use retune_engine::linear::Weight;
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(model: &Model, tokens: &[u32], adapter: Option<&LoraAdapter>) -> Vec<f32> {
    let mut kv = model.new_cache();
    model
        .forward(&mut [BatchItem {
            tokens,
            adapter,
            kv: &mut kv,
            want_logits: true,
            only: None,
        }])
        .unwrap()
        .remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const ALL: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

/// W ← W + s·B·A in every adapted f32 linear.
fn merge(model: &mut Model, a: &LoraAdapter) {
    for (li, layer) in model.layers.iter_mut().enumerate() {
        let lins = [
            &mut layer.q,
            &mut layer.k,
            &mut layer.v,
            &mut layer.o,
            &mut layer.gate,
            &mut layer.up,
            &mut layer.down,
        ];
        for (m, lin) in lins.into_iter().enumerate() {
            let Some(p) = a.pair(li, m) else { continue };
            let Weight::F32(w) = &mut lin.weight else {
                panic!("f32 base expected")
            };
            for o in 0..lin.rows {
                for i in 0..lin.cols {
                    let d: f32 = (0..p.rank)
                        .map(|k| p.b[o * p.rank + k] * p.a[k * lin.cols + i])
                        .sum();
                    w[o * lin.cols + i] += p.scale * d;
                }
            }
        }
    }
}

fn adapter(
    dir: &Path,
    spec: &TinySpec,
    model: &Model,
    rank: usize,
    modules: &[usize],
    seed: u64,
) -> LoraAdapter {
    tiny::write_adapter(dir, spec, rank, modules, seed, 2.0 * rank as f32, 0.05).unwrap();
    load_peft(dir, &model.base_shapes(), &LoadLimits::default()).unwrap()
}

#[test]
fn adapter_output_equals_merged_dense_reference_for_hf_and_permuted_gguf_bases() {
    let dir = tmpdir("merged");
    let spec = TinySpec::default();
    let (gguf, hf) = tiny::write(&dir, &spec).unwrap();
    let base = load(&hf).unwrap().model;
    let a = adapter(&dir.join("a"), &spec, &base, 8, &ALL, 7);
    let toks: Vec<u32> = (3..60).collect();
    let plain = logits(&base, &toks, None);
    let with = logits(&base, &toks, Some(&a));
    let mut merged = load(&hf).unwrap().model;
    merge(&mut merged, &a);
    let reference = logits(&merged, &toks, None);
    let spread = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    // tolerance: f32 rounding of two summation orders, 1e-4 of the logit range
    assert!(
        max_diff(&with, &reference) < 1e-4 * spread,
        "{}",
        max_diff(&with, &reference)
    );
    assert!(
        max_diff(&plain, &reference) > 1e-2 * spread,
        "adapter too weak to test anything"
    );
    // GGUF stores Q/K rows permuted; the adapter must land on the same rows
    let g = load(&gguf).unwrap().model;
    let via_gguf = logits(&g, &toks, Some(&a));
    assert!(
        max_diff(&via_gguf, &reference) < 1e-3 * spread,
        "{}",
        max_diff(&via_gguf, &reference)
    );
}

#[test]
fn mixed_batch_with_base_and_three_ranks_equals_each_row_alone() {
    let dir = tmpdir("mixed");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(
        &dir,
        &TinySpec {
            gguf_dtype: candle_core::quantized::GgmlDType::Q4_1,
            ..spec.clone()
        },
    )
    .unwrap();
    let m = load(&gguf).unwrap().model;
    let a4 = adapter(&dir.join("r4"), &spec, &m, 4, &[0, 2], 1);
    let a8 = adapter(&dir.join("r8"), &spec, &m, 8, &ALL, 2);
    let a16 = adapter(&dir.join("r16"), &spec, &m, 16, &[3, 4, 5, 6], 3);
    let rows: Vec<(Vec<u32>, Option<&LoraAdapter>)> = vec![
        ((3..20).collect(), None),
        ((5..9).collect(), Some(&a4)),
        ((7..40).collect(), Some(&a8)),
        ((11..12).collect(), Some(&a16)),
        ((20..31).collect(), Some(&a8)),
        ((40..47).collect(), None),
    ];
    let alone: Vec<Vec<f32>> = rows.iter().map(|(t, a)| logits(&m, t, *a)).collect();
    let mut caches: Vec<_> = rows.iter().map(|_| m.new_cache()).collect();
    let mut items: Vec<BatchItem<'_>> = rows
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
    let batched = m.forward(&mut items).unwrap();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "row {i}");
    }
    assert_ne!(
        alone[2],
        logits(&m, &rows[2].0, None),
        "adapter changes the row"
    );
}

fn pool_for(root: &Path, m: &Model, cfg: PoolConfig) -> Arc<AdapterPool> {
    AdapterPool::new(
        Arc::new(DirSource {
            root: root.to_path_buf(),
        }),
        m.base_shapes(),
        cfg,
    )
}

/// The adapter in directory `name` of a [`DirSource`].
fn aref(name: &str) -> AdapterRef {
    AdapterRef::new("t", name, "v1", Via::Pinned).unwrap()
}

fn wait_ready(
    pool: &AdapterPool,
    h: &str,
) -> std::result::Result<Arc<LoraAdapter>, Arc<AdapterError>> {
    let t = Instant::now();
    loop {
        match pool.acquire(&aref(h)) {
            Acquire::Ready(a) => return Ok(a),
            Acquire::Failed(e) => return Err(e),
            Acquire::Pending => {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "load of {h} never finished"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[test]
fn pool_evicts_lru_never_in_use_and_reloads_transparently() {
    let dir = tmpdir("pool");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let m = load(&gguf).unwrap().model;
    for (i, h) in ["a", "b", "c"].iter().enumerate() {
        tiny::write_adapter(
            &dir.join("adapters").join(h),
            &spec,
            4,
            &ALL,
            i as u64,
            8.0,
            0.05,
        )
        .unwrap();
    }
    let pool = pool_for(
        &dir.join("adapters"),
        &m,
        PoolConfig {
            max_adapters: 2,
            ..PoolConfig::default()
        },
    );
    let held_a = wait_ready(&pool, "a").unwrap();
    drop(wait_ready(&pool, "b").unwrap());
    drop(wait_ready(&pool, "c").unwrap()); // over the limit: b is LRU and free, a is held
    assert_eq!(
        pool.resident(),
        vec!["t/a/v1".to_string(), "t/c/v1".to_string()]
    );
    assert_eq!(
        pool.stats()
            .evictions
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(held_a);
    let b = wait_ready(&pool, "b").unwrap(); // reload: a is now LRU and free
    assert_eq!(
        pool.resident(),
        vec!["t/b/v1".to_string(), "t/c/v1".to_string()]
    );
    assert_eq!(
        pool.stats()
            .loads
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert!(
        b.bytes > 0
            && pool
                .stats()
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                >= b.bytes
    );
    assert!(pool.load_latency_us().is_some());
}

#[test]
fn engine_serves_mixed_adapters_and_isolates_a_bad_one() {
    let dir = tmpdir("engine");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    tiny::write_adapter(&root.join("good"), &spec, 8, &ALL, 5, 16.0, 0.5).unwrap();
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(
        root.join("broken/adapter_config.json"),
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    std::fs::write(
        root.join("broken/adapter_model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let l = load(&gguf).unwrap();
    let pool = pool_for(&root, &l.model, PoolConfig::default());
    let engine =
        Engine::start_with_pool(l.model, l.tok, EngineConfig::default(), Some(pool.clone()))
            .unwrap();
    let req = |adapter: Option<&str>| GenerateRequest {
        prompt: vec![5, 6, 7, 8],
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(12)
        },
        adapter: adapter.map(aref),
    };
    let base = engine.generate_blocking(req(None)).unwrap().ids();
    let good = engine.generate_blocking(req(Some("good"))).unwrap().ids();
    assert_ne!(base, good, "adapter changes greedy output");
    // all at once, the broken adapter among them
    let streams: Vec<_> = [None, Some("good"), Some("broken"), Some("good"), None]
        .iter()
        .map(|a| engine.generate(req(*a)).unwrap())
        .collect();
    let mut results = Vec::new();
    for mut s in streams {
        let mut ids = Vec::new();
        let outcome = loop {
            match s.blocking_next() {
                Some(Event::Token(t)) => ids.push(t.id),
                Some(Event::Done(_)) => break Ok(ids),
                Some(Event::Error(e)) => break Err(e),
                None => panic!("stream ended"),
            }
        };
        results.push(outcome);
    }
    assert_eq!(results[0].as_ref().unwrap(), &base);
    assert_eq!(results[1].as_ref().unwrap(), &good);
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Adapter);
    assert!(
        err.message.contains("broken") && err.message.contains("corrupt"),
        "{err}"
    );
    assert_eq!(results[3].as_ref().unwrap(), &good);
    assert_eq!(results[4].as_ref().unwrap(), &base);
    // an unknown adapter is an adapter error, a path trick cannot even be named,
    // and the engine keeps serving
    let mut s = engine.generate(req(Some("missing"))).unwrap();
    assert!(matches!(
        s.blocking_next(),
        Some(Event::Error(GenError {
            kind: ErrorKind::Adapter,
            ..
        }))
    ));
    assert!(AdapterRef::new("t", "../x", "v1", Via::Pinned).is_err());
    assert_eq!(
        engine.generate_blocking(req(Some("good"))).unwrap().ids(),
        good
    );
}

#[test]
fn bad_adapters_get_typed_errors() {
    let dir = tmpdir("bad");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let m = load(&gguf).unwrap().model;
    let shapes = m.base_shapes();
    let lim = LoadLimits::default();
    let good = dir.join("good");
    tiny::write_adapter(&good, &spec, 8, &ALL, 1, 16.0, 0.05).unwrap();
    let st = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(good.join("adapter_config.json")).unwrap();
    let variant = |name: &str, cfg_text: &str, st_bytes: &[u8]| -> AdapterError {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), cfg_text).unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), st_bytes).unwrap();
        load_peft(&d, &shapes, &lim).unwrap_err()
    };
    assert!(matches!(
        load_peft(&dir.join("nowhere"), &shapes, &lim),
        Err(AdapterError::NotFound(_))
    ));
    assert!(matches!(
        variant("trunc", &cfg, &st[..st.len() / 2]),
        AdapterError::Corrupt { .. }
    ));
    let mut bomb = (u64::MAX / 2).to_le_bytes().to_vec();
    bomb.extend_from_slice(b"{}");
    assert!(matches!(
        variant("bomb", &cfg, &bomb),
        AdapterError::Corrupt { .. }
    ));
    let e = variant(
        "dora",
        &cfg.replace("\"bias\":\"none\"", "\"bias\":\"none\",\"use_dora\":true"),
        &st,
    );
    assert!(
        matches!(&e, AdapterError::Unsupported { field, .. } if field == "use_dora"),
        "{e}"
    );
    let e = variant(
        "bias",
        &cfg.replace("\"bias\":\"none\"", "\"bias\":\"all\""),
        &st,
    );
    assert!(
        matches!(&e, AdapterError::Unsupported { field, .. } if field == "bias"),
        "{e}"
    );
    let e = variant(
        "lora_bias",
        &cfg.replace("\"bias\":\"none\"", "\"bias\":\"none\",\"lora_bias\":true"),
        &st,
    );
    assert!(
        matches!(&e, AdapterError::Unsupported { field, .. } if field == "lora_bias"),
        "{e}"
    );
    let e = variant("rank", &cfg.replace("\"r\":8", "\"r\":4"), &st);
    assert!(matches!(&e, AdapterError::Config { .. }), "{e}");
    let e = load_peft(
        &good,
        &shapes,
        &LoadLimits {
            max_rank: 4,
            ..LoadLimits::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AdapterError::RankTooLarge {
                rank: 8,
                max: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = load_peft(
        &good,
        &shapes,
        &LoadLimits {
            max_file_bytes: 100,
            ..LoadLimits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, AdapterError::TooLarge { .. }), "{e}");
    // adapter made for another base (wider hidden size)
    let other = TinySpec {
        hidden: 128,
        ..spec.clone()
    };
    tiny::write_adapter(&dir.join("other"), &other, 8, &ALL, 1, 16.0, 0.05).unwrap();
    assert!(matches!(
        load_peft(&dir.join("other"), &shapes, &lim),
        Err(AdapterError::Shape { .. })
    ));
    // NaN weights and an lm_head adapter
    let dev = candle_core::Device::Cpu;
    let mut ts =
        candle_core::safetensors::load(good.join("adapter_model.safetensors"), &dev).unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let shape = ts[name].dims().to_vec();
    ts.insert(
        name.into(),
        candle_core::Tensor::full(f32::NAN, shape, &dev).unwrap(),
    );
    let nan_dir = dir.join("nan");
    std::fs::create_dir_all(&nan_dir).unwrap();
    std::fs::write(nan_dir.join("adapter_config.json"), &cfg).unwrap();
    candle_core::safetensors::save(&ts, nan_dir.join("adapter_model.safetensors")).unwrap();
    assert!(matches!(
        load_peft(&nan_dir, &shapes, &lim),
        Err(AdapterError::NonFinite { .. })
    ));
    let mut ts =
        candle_core::safetensors::load(good.join("adapter_model.safetensors"), &dev).unwrap();
    ts.insert(
        "base_model.model.lm_head.lora_A.weight".into(),
        candle_core::Tensor::zeros((8, 64), candle_core::DType::F32, &dev).unwrap(),
    );
    let lm = dir.join("lm");
    std::fs::create_dir_all(&lm).unwrap();
    std::fs::write(lm.join("adapter_config.json"), &cfg).unwrap();
    candle_core::safetensors::save(&ts, lm.join("adapter_model.safetensors")).unwrap();
    assert!(matches!(
        load_peft(&lm, &shapes, &lim),
        Err(AdapterError::Unsupported { .. })
    ));
}

/// A source that takes its time, like a cold network volume.
struct SlowSource {
    root: PathBuf,
    delay: Duration,
}

impl retune_adapters::AdapterSource for SlowSource {
    fn locate(&self, adapter: &AdapterRef) -> std::result::Result<PathBuf, AdapterError> {
        std::thread::sleep(self.delay);
        DirSource {
            root: self.root.clone(),
        }
        .locate(adapter)
    }
}

#[test]
fn a_loading_adapter_does_not_block_other_sequences() {
    let dir = tmpdir("slow");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    tiny::write_adapter(&root.join("late"), &spec, 8, &ALL, 5, 16.0, 0.5).unwrap();
    let l = load(&gguf).unwrap();
    let source = Arc::new(SlowSource {
        root,
        delay: Duration::from_millis(400),
    });
    let pool = AdapterPool::new(source, l.model.base_shapes(), PoolConfig::default());
    let engine =
        Engine::start_with_pool(l.model, l.tok, EngineConfig::default(), Some(pool)).unwrap();
    let req = |adapter: Option<&str>| GenerateRequest {
        prompt: vec![5, 6, 7],
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(8)
        },
        adapter: adapter.map(aref),
    };
    let start = Instant::now();
    let mut late = engine.generate(req(Some("late"))).unwrap();
    let base = engine.generate_blocking(req(None)).unwrap();
    let base_done = start.elapsed();
    assert_eq!(base.tokens.len(), 8);
    assert!(
        base_done < Duration::from_millis(300),
        "base waited for the adapter load: {base_done:?}"
    );
    let mut n = 0;
    while let Some(ev) = late.blocking_next() {
        match ev {
            Event::Token(_) => n += 1,
            Event::Done(_) => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(n, 8);
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "adapter sequence ran before its adapter loaded"
    );
}

#[test]
fn a_job_whose_adapter_loaded_waits_for_room_in_the_batch() {
    let dir = tmpdir("slow-batch");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    tiny::write_adapter(&root.join("late"), &spec, 8, &ALL, 5, 16.0, 0.5).unwrap();
    let l = load(&gguf).unwrap();
    let delay = Duration::from_millis(1);
    let source = Arc::new(SlowSource { root, delay });
    let pool = AdapterPool::new(source, l.model.base_shapes(), PoolConfig::default());
    let cfg = EngineConfig {
        max_batch: 1,
        ..EngineConfig::default()
    };
    let engine = Engine::start_with_pool(l.model, l.tok, cfg, Some(pool)).unwrap();
    let req = |adapter: Option<&str>, n| GenerateRequest {
        prompt: vec![5, 6, 7],
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(n)
        },
        adapter: adapter.map(aref),
    };
    let start = Instant::now();
    let mut late = engine.generate(req(Some("late"), 4)).unwrap();
    let mut base = engine.generate(req(None, 240)).unwrap();
    let mut max_running = 0;
    let mut base_done = None;
    while let Some(ev) = base.blocking_next() {
        max_running = max_running.max(engine.stats().running);
        match ev {
            Event::Done(_) => {
                base_done = Some(start.elapsed());
                break;
            }
            Event::Error(e) => panic!("{e}"),
            Event::Token(_) => {}
        }
    }
    let base_done = base_done.unwrap();
    assert!(
        base_done > delay * 2,
        "the base sequence must outlast the load ({base_done:?}) for this test to mean anything"
    );
    assert_eq!(max_running, 1, "max_batch 1 was exceeded");
    let mut n = 0;
    while let Some(ev) = late.blocking_next() {
        match ev {
            Event::Token(_) => n += 1,
            Event::Done(_) => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(n, 4);
}

struct CountingSource {
    root: PathBuf,
    calls: std::sync::atomic::AtomicUsize,
}

impl retune_adapters::AdapterSource for CountingSource {
    fn locate(&self, adapter: &AdapterRef) -> std::result::Result<PathBuf, AdapterError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        DirSource {
            root: self.root.clone(),
        }
        .locate(adapter)
    }
}

#[test]
fn a_failing_version_is_not_reloaded_by_every_request() {
    let dir = tmpdir("negative-cache");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(root.join("broken").join("adapter_config.json"), "{not json").unwrap();
    std::fs::write(root.join("broken").join("adapter_model.safetensors"), b"x").unwrap();
    let l = load(&gguf).unwrap();
    let source = Arc::new(CountingSource {
        root: root.clone(),
        calls: Default::default(),
    });
    let pool = AdapterPool::new(source.clone(), l.model.base_shapes(), PoolConfig::default());
    assert!(wait_ready(&pool, "broken").is_err());
    // 200 more requests within the backoff: answered from the negative cache
    for _ in 0..200 {
        assert!(matches!(pool.acquire(&aref("broken")), Acquire::Failed(_)));
    }
    assert_eq!(source.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    // after the backoff (1 s after a first failure) it is tried again, and a
    // version that now loads is served
    tiny::write_adapter(&root.join("broken"), &spec, 4, &ALL, 1, 8.0, 0.1).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert!(wait_ready(&pool, "broken").is_ok());
    assert_eq!(source.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Records when each load started.
struct StampingSource {
    root: PathBuf,
    started: std::sync::Mutex<Vec<Instant>>,
}

impl retune_adapters::AdapterSource for StampingSource {
    fn locate(&self, adapter: &AdapterRef) -> std::result::Result<PathBuf, AdapterError> {
        self.started.lock().unwrap().push(Instant::now());
        DirSource {
            root: self.root.clone(),
        }
        .locate(adapter)
    }
}

#[test]
fn a_queued_requests_adapter_loads_while_the_batch_is_full() {
    let dir = tmpdir("prefetch");
    let spec = TinySpec {
        context: 4096,
        ..TinySpec::default()
    };
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    tiny::write_adapter(&root.join("next"), &spec, 8, &ALL, 6, 16.0, 0.5).unwrap();
    let l = load(&gguf).unwrap();
    let source = Arc::new(StampingSource {
        root,
        started: Default::default(),
    });
    let pool = AdapterPool::new(source.clone(), l.model.base_shapes(), PoolConfig::default());
    let cfg = EngineConfig {
        max_batch: 1,
        ..EngineConfig::default()
    };
    let engine = Engine::start_with_pool(l.model, l.tok, cfg, Some(pool.clone())).unwrap();
    let req = |adapter: Option<&str>, n| GenerateRequest {
        prompt: vec![5, 6, 7],
        params: SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(n)
        },
        adapter: adapter.map(aref),
    };
    let submitted = Instant::now();
    let mut base = engine.generate(req(None, 4000)).unwrap();
    // wait until the base sequence runs, so the next one queues behind it
    assert!(matches!(base.blocking_next(), Some(Event::Token(_))));
    let mut next = engine.generate(req(Some("next"), 4)).unwrap();
    // the gateway's view: the base runs, `next` waits
    let t = Instant::now();
    loop {
        let st = engine.stats();
        if st.waiting_adapters == ["next"] {
            assert!(st.running_adapters.is_empty(), "{st:?}");
            assert!(st.kv_reserved_tokens > 0 && st.kv_capacity_tokens >= st.kv_reserved_tokens);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never reported waiting: {st:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let base_end = loop {
        match base.blocking_next() {
            Some(Event::Done(c)) => break submitted + c.timings.total,
            Some(Event::Token(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert!(
        base_end - submitted > Duration::from_millis(20),
        "the base sequence must run long enough for this test to mean anything"
    );
    let out = loop {
        match next.blocking_next() {
            Some(Event::Done(c)) => break c,
            Some(Event::Token(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(out.output.len(), 4);
    let started = source.started.lock().unwrap().clone();
    assert_eq!(started.len(), 1, "loaded once");
    assert!(
        started[0] < base_end,
        "the load started {:?} after the batch had room: not ahead of admission",
        started[0] - base_end
    );
    assert_eq!(
        pool.stats()
            .prefetches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_pinned_adapter_is_never_evicted() {
    let dir = tmpdir("pinned");
    let spec = TinySpec::default();
    let (gguf, _) = tiny::write(&dir, &spec).unwrap();
    let root = dir.join("adapters");
    for (i, n) in ["keep", "a", "b", "c"].iter().enumerate() {
        tiny::write_adapter(&root.join(n), &spec, 4, &[0, 2], i as u64, 8.0, 0.5).unwrap();
    }
    let m = load(&gguf).unwrap().model;
    for pinned in [true, false] {
        let pool = pool_for(
            &root,
            &m,
            PoolConfig {
                max_adapters: 2,
                pinned: if pinned {
                    vec![("t".into(), "keep".into())]
                } else {
                    Vec::new()
                },
                ..PoolConfig::default()
            },
        );
        wait_ready(&pool, "keep").unwrap();
        for n in ["a", "b", "c"] {
            wait_ready(&pool, n).unwrap();
        }
        let resident = pool.resident();
        assert_eq!(resident.len(), 2, "{resident:?}");
        assert_eq!(
            resident.contains(&"t/keep/v1".to_string()),
            pinned,
            "pinned {pinned}: {resident:?}"
        );
        assert_eq!(pool.pinned_resident().0, usize::from(pinned));
    }
}
