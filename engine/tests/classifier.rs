//! Classifier adapters (PEFT `SEQ_CLS`: LoRA plus a `score` head over labels):
//! loading and what bad ones get, the head's scores on both backends and in
//! mixed batches, and the scheduler answering a label for any weights.

use candle_core::{DType, Device};
use retune_adapters::{load_peft, AdapterError, LoadLimits, LoraAdapter};
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-cls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const LABELS: [&str; 4] = ["refund", "card lost", "exchange rate", "other"];
const ALL: [usize; 7] = [0, 1, 2, 3, 4, 5, 6];

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn setup(name: &str) -> (PathBuf, PathBuf, Model, LoraAdapter) {
    let dir = tmpdir(name);
    let (gguf, _) = tiny::write(&dir, &TinySpec::default()).unwrap();
    let model = load(&gguf).unwrap().model;
    let ad = dir.join("cls");
    tiny::write_classifier_adapter(&ad, &model.base_shapes(), 4, &ALL, 7, &LABELS, 0.5).unwrap();
    let a = load_peft(&ad, &model.base_shapes(), &LoadLimits::default()).unwrap();
    (dir, gguf, model, a)
}

fn scores(model: &Model, tokens: &[u32], adapter: Option<&LoraAdapter>) -> Vec<f32> {
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

#[test]
fn a_classifier_adapter_loads_with_its_labels() {
    let (_d, _g, model, a) = setup("load");
    let h = a.head.as_ref().expect("head");
    assert_eq!(h.labels, LABELS);
    assert_eq!(h.hidden, model.cfg.hidden);
    assert_eq!(h.weight.len(), LABELS.len() * model.cfg.hidden);
    assert_eq!(a.config.task_type.as_deref(), Some("SEQ_CLS"));
}

#[test]
fn bad_classifier_adapters_are_refused_with_the_reason() {
    let (dir, _g, model, _) = setup("bad");
    let shapes = model.base_shapes();
    let fresh = |n: &str| {
        let p = dir.join(n);
        tiny::write_classifier_adapter(&p, &shapes, 4, &ALL, 7, &LABELS, 0.5).unwrap();
        p
    };
    let edit_cfg = |p: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let c = p.join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&c).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&c, v.to_string()).unwrap();
    };
    let err = |p: &Path| {
        load_peft(p, &shapes, &LoadLimits::default())
            .map(|_| ())
            .unwrap_err()
    };
    // a CAUSAL_LM adapter holding a head tensor: not a LoRA tensor it knows
    let p = fresh("as-causal");
    edit_cfg(&p, &|v| {
        v["task_type"] = "CAUSAL_LM".into();
        v["modules_to_save"] = serde_json::Value::Null;
    });
    assert!(
        matches!(err(&p), AdapterError::Unsupported { .. }),
        "{}",
        err(&p)
    );
    // modules_to_save other than the head
    let p = fresh("lm-head");
    edit_cfg(&p, &|v| {
        v["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    assert!(
        err(&p).to_string().contains("modules_to_save"),
        "{}",
        err(&p)
    );
    // SEQ_CLS that says it saves nothing
    let p = fresh("no-save");
    edit_cfg(&p, &|v| v["modules_to_save"] = serde_json::Value::Null);
    assert!(err(&p).to_string().contains("score"), "{}", err(&p));
    // the head without its labels, or with labels that do not match its rows
    for (name, meta, want) in [
        ("no-labels", None, "no `retune.labels`"),
        ("not-json", Some("refund,other"), "not a JSON list"),
        ("one-label", Some(r#"["refund"]"#), "1 labels"),
        (
            "repeated",
            Some(r#"["a","b","a","c"]"#),
            "empty or repeated",
        ),
        ("rows", Some(r#"["a","b","c"]"#), "4 rows for 3 labels"),
    ] {
        let p = fresh(name);
        let st = p.join("adapter_model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        let t = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let views: Vec<_> = t.tensors().into_iter().collect();
        let m = meta.map(|m| {
            std::collections::HashMap::from([(
                retune_adapters::LABELS_METADATA.to_string(),
                m.to_string(),
            )])
        });
        let out = ::safetensors::serialize(views, m).unwrap();
        std::fs::write(&st, out).unwrap();
        let e = err(&p).to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn the_head_scores_match_on_both_backends_and_in_mixed_batches() {
    let (dir, gguf, model, cls) = setup("scores");
    let plain_dir = dir.join("plain");
    tiny::write_random_adapter(&plain_dir, &model.base_shapes(), 4, &ALL, 9, 8.0, 0.05).unwrap();
    let plain = load_peft(&plain_dir, &model.base_shapes(), &LoadLimits::default()).unwrap();
    let p1: Vec<u32> = (5..25).collect();
    let p2: Vec<u32> = (30..41).collect();
    let alone = scores(&model, &p1, Some(&cls));
    assert_eq!(alone.len(), LABELS.len());
    assert!(alone.iter().all(|x| x.is_finite()));
    let spread = alone.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 1e-3, "the head's scores are all ~0: {alone:?}");
    // the same prompt without the head is the vocabulary's logits
    let mut no_head = cls.clone();
    no_head.head = None;
    assert_eq!(scores(&model, &p1, Some(&no_head)).len(), model.cfg.vocab);
    // one batch: the classifier, a plain adapter, the base
    let (mut k1, mut k2, mut k3) = (model.new_cache(), model.new_cache(), model.new_cache());
    let out = model
        .forward(&mut [
            BatchItem {
                tokens: &p1,
                adapter: Some(&cls),
                kv: &mut k1,
                want_logits: true,
                only: None,
            },
            BatchItem {
                tokens: &p2,
                adapter: Some(&plain),
                kv: &mut k2,
                want_logits: true,
                only: None,
            },
            BatchItem {
                tokens: &p2,
                adapter: None,
                kv: &mut k3,
                want_logits: true,
                only: None,
            },
        ])
        .unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], alone, "a classifier row depends on its batch");
    assert_eq!(out[1], scores(&model, &p2, Some(&plain)));
    assert_eq!(out[2], scores(&model, &p2, None));
    // the tensor backend (what CUDA runs), on candle's CPU device
    let opts = DeviceOptions {
        dtype: DType::F32,
        slots: 4,
        slot_context: 128,
        adapter_slots: 4,
        max_rank: 8,
        ..DeviceOptions::default()
    };
    let dm = DeviceModel::from_model(load(&gguf).unwrap().model, &Device::Cpu, &opts).unwrap();
    let mut kv = dm.new_cache().unwrap();
    let dev = dm
        .forward(&mut [BatchItem {
            tokens: &p1,
            adapter: Some(&cls),
            kv: &mut kv,
            want_logits: true,
            only: None,
        }])
        .unwrap()
        .remove(0);
    assert_eq!(dev.len(), LABELS.len());
    let d = max_diff(&dev, &alone);
    assert!(
        d < 1e-3 * spread.max(1.0),
        "backends differ by {d}: {dev:?} vs {alone:?}"
    );
}

fn engine(gguf: &Path, dir: &Path, cls: &Path, seed: u64) -> (Engine, AdapterRef) {
    let l = load(gguf).unwrap();
    let shapes = l.model.base_shapes();
    let root = dir.join(format!("store{seed}"));
    let dst = root.join("cls");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(cls.join(f), dst.join(f)).unwrap();
    }
    let pool = AdapterPool::new(Arc::new(DirSource { root }), shapes, PoolConfig::default());
    let e = Engine::start_with_pool(l.model, l.tok, EngineConfig::default(), Some(pool)).unwrap();
    (e, AdapterRef::new("t", "cls", "v1", Via::Pinned).unwrap())
}

use retune_adapters::{AdapterPool, AdapterRef, DirSource, PoolConfig, Via};
use std::sync::Arc;

#[test]
fn the_scheduler_answers_a_label_with_its_probability() {
    let (dir, gguf, model, _) = setup("sched");
    let mut rights = 0;
    // several random heads: the answer is a label whatever the weights
    for seed in 0..4u64 {
        let ad = dir.join(format!("cls{seed}"));
        tiny::write_classifier_adapter(&ad, &model.base_shapes(), 4, &ALL, seed, &LABELS, 2.0)
            .unwrap();
        let (e, r) = engine(&gguf, &dir, &ad, seed);
        let a = load_peft(&ad, &model.base_shapes(), &LoadLimits::default()).unwrap();
        let prompt: Vec<u32> = (3..19).map(|x| x + seed as u32).collect();
        let want = scores(&model, &prompt, Some(&a));
        let best = (0..want.len())
            .max_by(|&i, &j| want[i].total_cmp(&want[j]))
            .unwrap();
        let z = want
            .iter()
            .map(|x| (x - want[best]).exp())
            .sum::<f32>()
            .ln();
        let params = SamplingParams {
            // a classifier answers its best label whatever the temperature
            temperature: 1.0,
            logprobs: Some(0),
            ..SamplingParams::greedy(16)
        };
        let req = |prompt: Vec<u32>, params: SamplingParams| GenerateRequest {
            prompt,
            params,
            adapter: Some(r.clone()),
        };
        let got = e.generate_blocking(req(prompt.clone(), params)).unwrap();
        assert_eq!(got.text, LABELS[best], "seed {seed}");
        let lps: Vec<f32> = got.tokens.iter().filter_map(|t| t.logprob).collect();
        let sum: f32 = lps.iter().sum();
        assert!((sum - (-z)).abs() < 1e-3, "label logprob {sum} vs {}", -z);
        assert_eq!(got.completion.finish, FinishReason::Stop);
        rights += 1;
        // max_tokens cuts the label like any answer
        let cut = e
            .generate_blocking(req(prompt, SamplingParams::greedy(1)))
            .unwrap();
        assert!(LABELS[best].starts_with(&cut.text), "{:?}", cut.text);
        assert_eq!(cut.tokens.len(), 1);
        if got.tokens.len() > 2 {
            assert_eq!(cut.completion.finish, FinishReason::Length);
        }
    }
    assert_eq!(rights, 4);
}

/// A head near uniform, then the classical prior trained on `texts`: the
/// served answer follows the request's text (as the classical classifier reads
/// it), its log-probability is the fused one, and without a text the head
/// alone answers.
#[test]
fn a_classical_prior_weighs_the_labels_by_the_request_text() {
    use retune_classical::{ClassicalOptions, TextClassifier};
    let (dir, gguf, model, _) = setup("prior");
    let ad = dir.join("cls-prior");
    tiny::write_classifier_adapter(&ad, &model.base_shapes(), 4, &ALL, 3, &LABELS, 0.01).unwrap();
    let rows: &[(&str, &str)] = &[
        ("i want my money back", "refund"),
        ("refund my order please", "refund"),
        ("how do i get a refund", "refund"),
        ("give me my money back now", "refund"),
        ("i lost my card", "card lost"),
        ("my card is lost", "card lost"),
        ("someone stole my card", "card lost"),
        ("card missing since yesterday", "card lost"),
        ("what is the exchange rate", "exchange rate"),
        ("euro to dollar rate today", "exchange rate"),
        ("exchange rate for pounds", "exchange rate"),
        ("which rate do you use to exchange", "exchange rate"),
    ];
    let texts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let labels: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let prior =
        TextClassifier::train_calibrated(&texts, &labels, 2, &ClassicalOptions::default()).unwrap();
    let st_path = ad.join("adapter_model.safetensors");
    let st = std::fs::read(&st_path).unwrap();
    std::fs::write(
        &st_path,
        retune_adapters::head::with_prior(&st, &prior).unwrap(),
    )
    .unwrap();
    let a = load_peft(&ad, &model.base_shapes(), &LoadLimits::default()).unwrap();
    let head = a.head.as_ref().unwrap();
    assert!(head.prior.is_some(), "the prior loads with the head");
    let (e, r) = engine(&gguf, &dir, &ad, 9);
    let prompt: Vec<u32> = (3..19).collect();
    let logits = scores(&model, &prompt, Some(&a));
    let ask = |text: Option<&str>| {
        let params = SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy(16)
        };
        let mut v = e.validate(prompt.clone(), params, Some(r.clone())).unwrap();
        if let Some(t) = text {
            v = v.with_text(t);
        }
        Generated::wait(e.submit(v).unwrap()).unwrap()
    };
    for (text, want) in [
        ("please refund me, i want my money back", "refund"),
        ("my card is lost, someone stole it", "card lost"),
        ("the exchange rate today", "exchange rate"),
    ] {
        let got = ask(Some(text));
        assert_eq!(got.text, want, "{text}");
        let lp = head.log_probs(&logits, Some(text));
        let k = LABELS.iter().position(|l| *l == want).unwrap();
        let sum: f32 = got.tokens.iter().filter_map(|t| t.logprob).sum();
        assert!((sum - lp[k]).abs() < 1e-3, "{sum} vs {}", lp[k]);
        // "other" was never in the prior's rows: it gets the prior's least
        // (the stored prior: its weights are f16)
        let stored = &head.prior.as_ref().unwrap().classifier;
        let q = stored.log_probs(text);
        let least = q.iter().copied().fold(f32::INFINITY, f32::min);
        let plain = head.log_probs(&logits, None);
        let fused: Vec<f32> = plain
            .iter()
            .zip(LABELS)
            .map(|(p, l)| {
                p + stored
                    .labels()
                    .iter()
                    .position(|x| x == l)
                    .map_or(least, |i| q[i])
            })
            .collect();
        let z = fused.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!(
            (lp[3] - (fused[3] - z)).abs() < 1e-4,
            "{} vs {}",
            lp[3],
            fused[3] - z
        );
    }
    // no text: the head alone
    let best = (0..logits.len())
        .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
        .unwrap();
    assert_eq!(ask(None).text, LABELS[best]);

    // a damaged prior is refused at load, naming it
    let bytes = std::fs::read(&st_path).unwrap();
    let json = String::from_utf8_lossy(&bytes);
    // the description is a JSON string inside the header's JSON: quotes escaped
    let key = r#"temperature\":"#;
    let at = json.find(key).unwrap() + key.len();
    let mut bad = bytes.clone();
    bad[at] = b'-';
    std::fs::write(&st_path, &bad).unwrap();
    let err = load_peft(&ad, &model.base_shapes(), &LoadLimits::default()).unwrap_err();
    assert!(
        err.to_string().contains(retune_adapters::PRIOR_TENSOR),
        "{err}"
    );
}
