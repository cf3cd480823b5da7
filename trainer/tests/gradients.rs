//! The training forward is right to the gradient:
//! - against HF `peft` + `torch` (tests/fixtures/trainer, made once by
//!   scripts/make-trainer-fixture.py): loss, every parameter's gradient norm,
//!   full gradients of four tensors, the clipped AdamW step and the loss after it;
//! - against finite differences, every module of every layer, A and B;
//! - with B = 0 it equals the serving engine's logits; an adapter the trainer
//!   saved, registered and served reproduces the trainer's logits.

use candle_core::{Device, Tensor, Var};
use retune_engine::{smoothed_nll, weighted_nll, DeviceModel};
use retune_trainer::batches::MicroBatch;
use retune_trainer::optim::{clip, global_norm, AdamW, AdamWConfig};
use retune_trainer::{Adapter, Encoded};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trainer")
}

/// The Gemma 3 fixture: the same step by peft on the tiny Gemma 3 that
/// `TinySpec::gemma3()` writes (sliding window 8: the 14-token row passes it).
fn gemma_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/trainer_gemma3")
}

fn gemma_model(fused: bool) -> DeviceModel {
    let dir =
        std::env::temp_dir().join(format!("retune-gemma-grad-{}-{fused}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_, hf) =
        retune_engine::tiny::write(&dir, &retune_engine::tiny::TinySpec::gemma3()).expect("tiny");
    let m = retune_engine::safetensors::load_model(&hf).expect("tiny gemma");
    let d = DeviceModel::for_training(m, &Device::Cpu, 64).expect("training model");
    d.set_fused_training(fused);
    d
}

#[derive(Deserialize)]
struct Batch {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
}

#[derive(Deserialize)]
struct AdamWFx {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    max_grad_norm: f64,
}

#[derive(Deserialize)]
struct FirstStep {
    batch: Batch,
    loss: f64,
    grad_norms: HashMap<String, f64>,
    grads: HashMap<String, Vec<Vec<f64>>>,
    total_grad_norm: f64,
    adamw: AdamWFx,
    loss_after_step: f64,
}

fn read_fixture() -> FirstStep {
    read_fixture_at(&fixture())
}

fn read_fixture_at(dir: &Path) -> FirstStep {
    let p = dir.join("first_step.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
}

fn examples(b: &Batch) -> Vec<Encoded> {
    b.input_ids
        .iter()
        .zip(&b.attention_mask)
        .zip(&b.labels)
        .map(|((ids, m), l)| {
            let n = m.iter().filter(|&&v| v == 1).count();
            Encoded {
                tokens: ids[..n].to_vec(),
                weights: l[..n]
                    .iter()
                    .map(|&v| if v == -100 { 0.0 } else { 1.0 })
                    .collect(),
                class: None,
                text: None,
            }
        })
        .collect()
}

fn fixture_model(fused: bool) -> DeviceModel {
    let m = retune_engine::safetensors::load_model(&fixture().join("base")).expect("base");
    let d = DeviceModel::for_training(m, &Device::Cpu, 64).expect("training model");
    d.set_fused_training(fused);
    d
}

fn loss_of(model: &DeviceModel, ad: &Adapter, mb: &MicroBatch) -> Tensor {
    let logits = model
        .train_logits(&mb.batch, Some(&ad.lora), &mb.rows, None, 0)
        .expect("forward");
    weighted_nll(&logits, &mb.targets, &mb.weights, mb.weight()).expect("loss")
}

fn short(name: &str) -> &str {
    name.strip_prefix("base_model.model.model.").unwrap_or(name)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Label smoothing: the loss is `(1 − eps)·nll + eps·mean(−log p)` per row,
/// weighted, and its gradient on the logits is `w/norm · (softmax − target)`
/// with the smoothed target; eps = 0 is the plain weighted NLL.
#[test]
fn label_smoothing_has_the_smoothed_targets_loss_and_gradient() {
    let rows: [[f64; 4]; 3] = [
        [1.0, 2.0, 3.0, -1.0],
        [0.0, 0.0, 5.0, 0.5],
        [-2.0, 1.5, 0.0, 0.25],
    ];
    let (targets, weights, norm, eps) = ([2u32, 0, 3], [1.0f32, 0.5, 2.0], 3.5, 0.1);
    let flat: Vec<f32> = rows.iter().flatten().map(|&x| x as f32).collect();
    let logits = Var::from_vec(flat, (3, 4), &Device::Cpu).unwrap();
    let loss = smoothed_nll(logits.as_tensor(), &targets, &weights, norm, eps).unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<Vec<f32>> = grads.get(logits.as_tensor()).unwrap().to_vec2().unwrap();
    let (mut want, mut plain) = (0f64, 0f64);
    for (i, r) in rows.iter().enumerate() {
        let z = r.iter().map(|x| x.exp()).sum::<f64>().ln();
        let lp: Vec<f64> = r.iter().map(|x| x - z).collect();
        let t = targets[i] as usize;
        let w = weights[i] as f64;
        want += w * ((1.0 - eps) * -lp[t] + eps * -lp.iter().sum::<f64>() / 4.0) / norm;
        plain += w * -lp[t] / norm;
        for k in 0..4 {
            let target = eps / 4.0 + if k == t { 1.0 - eps } else { 0.0 };
            let dg = w / norm * (lp[k].exp() - target);
            assert!(
                (g[i][k] as f64 - dg).abs() < 1e-6,
                "row {i} class {k}: {} vs {dg}",
                g[i][k]
            );
        }
    }
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(rel(got, want) < 1e-6, "{got} vs {want}");
    let zero = weighted_nll(logits.as_tensor(), &targets, &weights, norm).unwrap();
    assert!(rel(zero.to_scalar::<f32>().unwrap() as f64, plain) < 1e-6);
    assert!((want - plain).abs() > 1e-3, "smoothing changes the loss");
}

#[test]
fn one_step_agrees_with_hf_peft_and_torch() {
    one_step(true);
}

#[test]
fn gemma3_one_step_agrees_with_hf_peft_and_torch() {
    one_step_at(&gemma_fixture(), gemma_model(true));
}

#[test]
fn gemma3_one_step_agrees_with_hf_peft_and_torch_composed_ops() {
    one_step_at(&gemma_fixture(), gemma_model(false));
}

/// The composed differentiable ops (what CUDA runs) on the CPU.
#[test]
fn one_step_agrees_with_hf_peft_and_torch_composed_ops() {
    one_step(false);
}

#[test]
fn gradients_match_finite_differences_for_every_module_and_layer() {
    finite_differences(true);
}

#[test]
fn gradients_match_finite_differences_composed_ops() {
    finite_differences(false);
}

fn one_step(fused: bool) {
    one_step_at(&fixture(), fixture_model(fused));
}

fn one_step_at(dir: &Path, model: DeviceModel) {
    let fx = read_fixture_at(dir);
    let shapes = model.base_shapes();
    let ad = Adapter::from_peft(&dir.join("adapter_init"), &shapes, &Device::Cpu).unwrap();
    assert_eq!(
        ad.named().len(),
        fx.grad_norms.len(),
        "every PEFT parameter is trained"
    );
    let ex = examples(&fx.batch);
    let refs: Vec<&Encoded> = ex.iter().collect();
    let mb = MicroBatch::new(&refs, 0);
    let loss = loss_of(&model, &ad, &mb);
    let lv = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(rel(lv, fx.loss) < 1e-5, "loss {lv} vs peft {}", fx.loss);

    let gs = loss.backward().unwrap();
    let mut grads = Vec::new();
    for (name, var) in ad.named() {
        let g = gs
            .get(var.as_tensor())
            .expect("a gradient for every parameter")
            .clone();
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        let want = fx.grad_norms[short(&name)];
        assert!(rel(n, want) < 1e-3, "{name}: |grad| {n} vs peft {want}");
        if let Some(full) = fx.grads.get(short(&name)) {
            let ours: Vec<Vec<f32>> = g.to_vec2().unwrap();
            let mut worst = 0f64;
            for (r, w) in ours.iter().zip(full) {
                for (a, b) in r.iter().zip(w) {
                    worst = worst.max((*a as f64 - b).abs());
                }
            }
            assert!(
                worst < 1e-3 * want,
                "{name}: max elementwise diff {worst} (|g| {want})"
            );
        }
        grads.push(g);
    }
    let total = global_norm(&grads).unwrap();
    assert!(
        rel(total, fx.total_grad_norm) < 1e-3,
        "total norm {total} vs {}",
        fx.total_grad_norm
    );

    // clipping engages in this fixture (max norm below the total), then AdamW
    assert!(fx.adamw.max_grad_norm < total);
    clip(&mut grads, total, fx.adamw.max_grad_norm).unwrap();
    let vars: Vec<&Var> = ad.lora.vars().collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: fx.adamw.lr,
            beta1: fx.adamw.betas.0,
            beta2: fx.adamw.betas.1,
            eps: fx.adamw.eps,
            weight_decay: fx.adamw.weight_decay,
        },
        &vars,
    )
    .unwrap();
    opt.step(&vars, &grads, fx.adamw.lr).unwrap();
    let after = loss_of(&model, &ad, &mb).to_scalar::<f32>().unwrap() as f64;
    assert!(
        rel(after, fx.loss_after_step) < 1e-4,
        "loss after step {after} vs peft {}",
        fx.loss_after_step
    );
    let stepped = Adapter::from_peft(&dir.join("adapter_step1"), &shapes, &Device::Cpu).unwrap();
    for ((name, ours), (_, theirs)) in ad.named().into_iter().zip(stepped.named()) {
        let d = (ours.as_tensor() - theirs.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d < 2e-5,
            "{name}: parameters after the step differ from peft's by {d}"
        );
    }
}

/// The gradient `g` of `var` along a ±1 direction drawn from `seed`, and the
/// loss's derivative along it by finite differences: Richardson extrapolation of
/// two central differences with steps `eps` and `eps / 2` (small enough for a
/// random tiny model's loss, which bends sharply at h ≈ 1e-2 along some
/// directions; large enough that f32 rounding of the loss stays small).
fn directional(var: &Var, g: &Tensor, seed: u64, eps: f64, loss: &dyn Fn() -> f64) -> (f64, f64) {
    let theta = var.as_tensor().copy().unwrap();
    let mut s = seed;
    let d: Vec<f32> = (0..theta.elem_count())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (s >> 33) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    let d = Tensor::from_vec(d, theta.shape(), &Device::Cpu).unwrap();
    let analytic = (g * &d)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let central = |h: f64| {
        var.set(&(&theta + (&d * h).unwrap()).unwrap()).unwrap();
        let up = loss();
        var.set(&(&theta - (&d * h).unwrap()).unwrap()).unwrap();
        let down = loss();
        var.set(&theta).unwrap();
        (up - down) / (2.0 * h)
    };
    (analytic, (4.0 * central(eps / 2.0) - central(eps)) / 3.0)
}

fn finite_differences(fused: bool) {
    let fx = read_fixture();
    let model = fixture_model(fused);
    let shapes = model.base_shapes();
    let ad = Adapter::from_peft(&fixture().join("adapter_init"), &shapes, &Device::Cpu).unwrap();
    let ex = examples(&fx.batch);
    let refs: Vec<&Encoded> = ex.iter().collect();
    let mb = MicroBatch::new(&refs, 0);
    let loss = loss_of(&model, &ad, &mb);
    let gs = loss.backward().unwrap();
    let eps = 4e-3f64;
    let mut checked = 0;
    for (k, (name, var)) in ad.named().into_iter().enumerate() {
        let g = gs.get(var.as_tensor()).expect("gradient").clone();
        let (analytic, numeric) = directional(var, &g, 0x9E37_79B9u64 + k as u64, eps, &|| {
            loss_of(&model, &ad, &mb).to_scalar::<f32>().unwrap() as f64
        });
        // a cut gradient (zero) would fail here: every directional derivative is sizeable
        assert!(
            numeric.abs() > 3e-3,
            "{name}: finite difference {numeric} too small to check"
        );
        assert!(
            (numeric - analytic).abs() < 0.03 * numeric.abs() + 1e-3,
            "{name}: analytic {analytic} vs finite difference {numeric}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * 7 * shapes.n_layers);
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-trainer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Logits of the serving engine (the native CPU model) at every position of
/// `tokens`, fed one token at a time through its KV cache.
fn served_logits(
    m: &retune_engine::Model,
    tokens: &[u32],
    adapter: Option<&retune_adapters::LoraAdapter>,
) -> Vec<Vec<f32>> {
    let mut kv = m.new_cache();
    let mut out = Vec::new();
    for t in tokens {
        let mut items = [retune_engine::BatchItem {
            tokens: std::slice::from_ref(t),
            adapter,
            kv: &mut kv,
            want_logits: true,
            only: None,
        }];
        out.push(m.forward(&mut items).unwrap().remove(0));
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn training_forward_equals_serving_and_a_saved_adapter_serves_the_same_logits() {
    let dir = tmpdir("serve");
    let spec = retune_engine::tiny::TinySpec::default();
    let (gguf, _) = retune_engine::tiny::write(&dir, &spec).unwrap();
    let serve = retune_engine::load(&gguf).unwrap().model;
    let model =
        DeviceModel::for_training(retune_engine::load(&gguf).unwrap().model, &Device::Cpu, 64)
            .unwrap();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 37 % 200 + 3) as u32).collect();
    let ex = Encoded {
        tokens: tokens.clone(),
        weights: vec![1.0; tokens.len()],
        class: None,
        text: None,
    };
    let mb = MicroBatch::new(&[&ex], 0);
    let rows: Vec<u32> = (0..tokens.len() as u32).collect();
    let shapes = model.base_shapes();
    let spec_l = retune_trainer::LoraSpec {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        modules: (0..7).collect(),
        first_layer: 0,
    };
    // PEFT init: B = 0, so the adapter changes nothing
    let ad = Adapter::init(&spec_l, &shapes, 7, &Device::Cpu).unwrap();
    let train: Vec<Vec<f32>> = model
        .train_logits(&mb.batch, Some(&ad.lora), &rows, None, 0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let served = served_logits(&serve, &tokens, None);
    let d = max_diff(&train, &served);
    let scale = served.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
    assert!(scale > 0.5, "logits are not trivially small ({scale})");
    // the serving engine keeps K/V in f16: agreement to f16 rounding
    assert!(
        d < 5e-3 * scale,
        "B = 0 training logits vs serving: max diff {d} (max |logit| {scale})"
    );

    // give B values, save, register, load the served version, compare
    for v in ad.lora.vars() {
        let t = v.as_tensor();
        let r = Tensor::randn(0f32, 0.2, t.shape(), &Device::Cpu).unwrap();
        v.set(&(t + r).unwrap()).unwrap();
    }
    let trained: Vec<Vec<f32>> = model
        .train_logits(&mb.batch, Some(&ad.lora), &rows, None, 0)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!(
        max_diff(&trained, &served) > 0.1,
        "the adapter changes the logits"
    );
    let out = dir.join("adapter");
    ad.save_peft(&out, "tiny").unwrap();
    let record: retune_trainer::TrainingRecord = serde_json::from_value(serde_json::json!({
        "settings": retune_trainer::TrainSettings::default(), "snapshot": "snap-1", "data_source": "test",
        "data_hash": "h", "base_fingerprint": model.fingerprint(), "seed": 7, "examples": 1, "eval_examples": 0,
        "dropped": {}, "truncated": 0, "steps": 0, "planned_steps": 0, "epochs_done": 0.0, "loss_curve": [],
        "eval_curve": [], "best_eval": null, "stopped": "", "wall_seconds": 0.0, "tokens_per_second": 0.0,
        "trained_tokens": 0, "steady_tokens_per_second": null, "peak_rss_mib": 0.0, "threads": 1, "resumed_from": null
    }))
    .unwrap();
    let root = dir.join("root");
    let v = retune_trainer::register(
        &root,
        &Default::default(),
        "acme",
        "tone",
        &out,
        &record,
        &model,
        None,
    )
    .unwrap();
    let store = std::sync::Arc::new(retune_registry::LocalStore::new(&root.join("store")).unwrap());
    let reg = retune_registry::Registry::open(&root.join("registry.db"), store, 1 << 30).unwrap();
    assert_eq!(
        reg.trained_on("acme", &["snap-1".into()]).unwrap().len(),
        1,
        "lineage recorded"
    );
    let r = retune_adapters::AdapterRef::new("acme", "tone", &v.id, retune_adapters::Via::Pinned)
        .unwrap();
    let served_dir = reg.servable_dir(&r).unwrap();
    let la =
        retune_adapters::load_peft(&served_dir, &serve.base_shapes(), &Default::default()).unwrap();
    let with_adapter = served_logits(&serve, &tokens, Some(&la));
    let d = max_diff(&trained, &with_adapter);
    let scale = trained.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
    // f16 K/V rounding in the serving cache, relative to the logits' size
    assert!(
        d < 5e-3 * scale,
        "served trained adapter vs trainer logits: max diff {d} (max |logit| {scale})"
    );
}

/// A rank-4 adapter on all 7 modules of layers `first_layer..`, PEFT's init from
/// `seed` with B drawn random (≠ 0), so A's gradient is not zero by construction.
fn rank4_with_b(model: &DeviceModel, first_layer: usize, seed: u64) -> Adapter {
    let spec = retune_trainer::LoraSpec {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        modules: (0..7).collect(),
        first_layer,
    };
    let ad = Adapter::init(&spec, &model.base_shapes(), seed, &Device::Cpu).unwrap();
    for p in ad.lora.layers.iter().flatten().flatten() {
        let b = p.b.as_tensor();
        p.b.set(&Tensor::randn(0f32, 0.05, b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    ad
}

/// A classifier (LoRA + a head over labels on the last prompt token): every
/// module's A and B and the head against finite differences, and the trained
/// forward's label scores against the serving engine's for the saved adapter.
#[test]
fn classifier_gradients_match_finite_differences_and_serving() {
    let dir = tmpdir("cls");
    let spec = retune_engine::tiny::TinySpec::default();
    let (gguf, _) = retune_engine::tiny::write(&dir, &spec).unwrap();
    let l = retune_engine::load(&gguf).unwrap();
    let model =
        DeviceModel::for_training(retune_engine::load(&gguf).unwrap().model, &Device::Cpu, 64)
            .unwrap();
    let shapes = model.base_shapes();
    let mut ad = rank4_with_b(&model, 0, 11);
    let labels: Vec<String> = ["alpha", "beta gamma", "delta"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ad.head = Some(retune_trainer::lora::ClassHead::init(&labels, &model, &l.tok).unwrap());
    let ex: Vec<Encoded> = (0..4)
        .map(|i| {
            let tokens: Vec<u32> = (0..10 + i)
                .map(|k| ((k * 31 + i * 7) % 200 + 3) as u32)
                .collect();
            let mut weights = vec![0.0; tokens.len()];
            *weights.last_mut().unwrap() = 1.0;
            Encoded {
                tokens,
                weights,
                class: Some((i % 3) as u32),
                text: None,
            }
        })
        .collect();
    let refs: Vec<&Encoded> = ex.iter().collect();
    let mb = MicroBatch::new(&refs, 0);
    // one row per example: its last token
    assert_eq!(mb.rows.len(), 4);
    let loss_of = |ad: &Adapter| {
        let x = model.train_embed(&mb.batch).unwrap();
        let x = model
            .train_layers(x, &mb.batch, Some(&ad.lora), 0..shapes.n_layers, None, 0)
            .unwrap();
        let logits = retune_trainer::train::output_logits(&model, ad, &x, &mb.rows).unwrap();
        weighted_nll(&logits, &mb.targets, &mb.weights, 4.0).unwrap()
    };
    let gs = loss_of(&ad).backward().unwrap();
    let mut checked = 0;
    for (k, (name, var)) in ad.named().into_iter().enumerate() {
        let g = gs.get(var.as_tensor()).expect("gradient").clone();
        let (analytic, numeric) = directional(var, &g, 0x51u64 + k as u64, 4e-3, &|| {
            loss_of(&ad).to_scalar::<f32>().unwrap() as f64
        });
        assert!(
            numeric.abs() > 1e-4,
            "{name}: finite difference {numeric} too small to check"
        );
        assert!(
            (numeric - analytic).abs() < 0.03 * numeric.abs() + 2e-4,
            "{name}: analytic {analytic} vs finite difference {numeric}"
        );
        checked += 1;
    }
    // every pair of every layer, and the head
    assert_eq!(checked, 2 * 7 * shapes.n_layers + 1);
    assert_eq!(ad.named().last().unwrap().0, retune_adapters::HEAD_TENSOR);

    // saved as PEFT SEQ_CLS, loaded and served: the same label scores
    let out = dir.join("cls-adapter");
    ad.save_peft(&out, "tiny").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let served_ad =
        retune_adapters::load_peft(&out, &l.model.base_shapes(), &Default::default()).unwrap();
    assert_eq!(served_ad.head.as_ref().unwrap().labels, labels);
    let x = model.train_embed(&mb.batch).unwrap();
    let x = model
        .train_layers(x, &mb.batch, Some(&ad.lora), 0..shapes.n_layers, None, 0)
        .unwrap();
    let trained: Vec<Vec<f32>> = retune_trainer::train::output_logits(&model, &ad, &x, &mb.rows)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (e, want) in ex.iter().zip(&trained) {
        let mut kv = l.model.new_cache();
        let got = l
            .model
            .forward(&mut [retune_engine::BatchItem {
                tokens: &e.tokens,
                adapter: Some(&served_ad),
                kv: &mut kv,
                want_logits: true,
                only: None,
            }])
            .unwrap()
            .remove(0);
        assert_eq!(got.len(), labels.len());
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // the serving engine keeps K/V in f16 (as the test above): to f16 rounding
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(d < 5e-3 * scale, "served {got:?} vs trained {want:?}");
    }
    // and continued from, head included
    let again = Adapter::from_peft(&out, &shapes, &Device::Cpu).unwrap();
    assert_eq!(again.head.as_ref().unwrap().labels, labels);
}

/// Rows that share a prefix (a chat template's system prompt) have it computed
/// once: the loss and every gradient equal those of the rows run whole, on the
/// fused ops and the composed ones, for generated answers and a classifier.
#[test]
fn a_shared_prefix_computed_once_changes_nothing() {
    let dir = tmpdir("prefix");
    let spec = retune_engine::tiny::TinySpec::default();
    let (gguf, _) = retune_engine::tiny::write(&dir, &spec).unwrap();
    let l = retune_engine::load(&gguf).unwrap();
    let model = DeviceModel::for_training(l.model, &Device::Cpu, 64).unwrap();
    let shapes = model.base_shapes();
    let mut ad = rank4_with_b(&model, 1, 5);
    // a 9-token shared start, then rows of different lengths (padded)
    let shared: Vec<u32> = (0..9).map(|k| (k * 13 % 150 + 3) as u32).collect();
    let rows: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            let mut t = shared.clone();
            t.extend((0..3 + 2 * i).map(|k| ((k * 29 + i * 11) % 180 + 5) as u32));
            t
        })
        .collect();
    let gen: Vec<Encoded> = rows
        .iter()
        .map(|t| Encoded {
            tokens: t.clone(),
            // loss on the tail, and on one position inside the shared start
            weights: (0..t.len())
                .map(|k| if k >= 10 || k == 4 { 1.0 } else { 0.0 })
                .collect(),
            class: None,
            text: None,
        })
        .collect();
    let cls: Vec<Encoded> = rows
        .iter()
        .enumerate()
        .map(|(i, t)| Encoded {
            tokens: t.clone(),
            weights: (0..t.len())
                .map(|k| if k + 1 == t.len() { 1.0 } else { 0.0 })
                .collect(),
            class: Some((i % 3) as u32),
            text: None,
        })
        .collect();
    let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let head = retune_trainer::lora::ClassHead::init(&labels, &model, &l.tok).unwrap();
    for (what, ex, with_head) in [("generated", &gen, false), ("classifier", &cls, true)] {
        ad.head = None;
        if with_head {
            ad.head = Some(retune_trainer::lora::ClassHead {
                labels: head.labels.clone(),
                weight: Var::from_tensor(head.weight.as_tensor()).unwrap(),
            });
        }
        let refs: Vec<&Encoded> = ex.iter().collect();
        let shared_mb = MicroBatch::new(&refs, 0);
        let whole_mb = MicroBatch::unshared(&refs, 0);
        assert_eq!(shared_mb.batch.prefix, 9, "{what}");
        assert_eq!(whole_mb.batch.prefix, 0);
        assert!(shared_mb.batch.stream_rows() < whole_mb.batch.stream_rows());
        for fused in [true, false] {
            model.set_fused_training(fused);
            let run = |mb: &MicroBatch| {
                let x = model.train_embed(&mb.batch).unwrap();
                // frozen layer 0, then the LoRA layers
                let x = model
                    .train_layers(x, &mb.batch, None, 0..1, None, 0)
                    .unwrap();
                let x = model
                    .train_layers(x, &mb.batch, Some(&ad.lora), 1..shapes.n_layers, None, 0)
                    .unwrap();
                let logits =
                    retune_trainer::train::output_logits(&model, &ad, &x, &mb.rows).unwrap();
                let loss = weighted_nll(&logits, &mb.targets, &mb.weights, 7.0).unwrap();
                let gs = loss.backward().unwrap();
                let grads: Vec<Vec<f32>> = ad
                    .vars()
                    .into_iter()
                    .map(|v| {
                        gs.get(v.as_tensor())
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    })
                    .collect();
                (loss.to_scalar::<f32>().unwrap(), grads)
            };
            let (ls, gs) = run(&shared_mb);
            let (lw, gw) = run(&whole_mb);
            assert!(
                (ls - lw).abs() < 1e-5 * lw.abs().max(1.0),
                "{what} fused={fused}: loss {ls} vs {lw}"
            );
            for (k, (a, b)) in gs.iter().zip(&gw).enumerate() {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-4 * scale,
                    "{what} fused={fused}: gradient {k} differs by {d} (scale {scale})"
                );
            }
        }
    }
    model.set_fused_training(true);
    // rows that do not share what the batch claims are refused
    let mut bad = MicroBatch::new(&gen.iter().collect::<Vec<_>>(), 0);
    bad.batch.tokens[bad.batch.len + 2] ^= 1;
    assert!(model.train_embed(&bad.batch).is_err());
}
