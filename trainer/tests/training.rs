//! The training loop on a tiny model: what is trained on, that it learns, that
//! it is reproducible and resumable to the same bytes, early stopping, and what
//! bad input gets (a clear error, nothing registered).

use candle_core::Device;
use retune_datasets::{ExampleBody, Message};
use retune_engine::tiny::{write, TinySpec};
use retune_engine::DeviceModel;
use retune_trainer::{
    encode, prepare, train, Overflow, Prepared, Progress, RunInputs, TrainError, TrainSettings,
};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-training-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Tiny {
    model: DeviceModel,
    tok: retune_engine::Tok,
    template: retune_engine::ChatTemplate,
}

fn tiny(dir: &Path, seed: u64) -> Tiny {
    let spec = TinySpec {
        seed,
        ..TinySpec::default()
    };
    let (gguf, _) = write(dir, &spec).unwrap();
    let l = retune_engine::load(&gguf).unwrap();
    Tiny {
        model: DeviceModel::for_training(l.model, &Device::Cpu, 128).unwrap(),
        tok: l.tok,
        template: l.template,
    }
}

fn msg(role: &str, content: &str, weight: Option<u8>) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
        weight,
    }
}

fn chat(user: &str, answer: &str) -> ExampleBody {
    ExampleBody::Chat {
        messages: vec![msg("user", user, None), msg("assistant", answer, None)],
    }
}

fn dataset(n: usize) -> Vec<ExampleBody> {
    let answers = ["hello", "world", "hello world"];
    (0..n)
        .map(|i| chat(&format!("query {i} about {}", i % 3), answers[i % 3]))
        .collect()
}

fn settings() -> TrainSettings {
    let mut s = TrainSettings::default();
    s.lora.rank = 4;
    s.lora.alpha = 8.0;
    s.optim.lr = 1e-2;
    s.warmup_steps = 2;
    s.max_steps = Some(12);
    s.batch_size = 4;
    s.min_examples = 1;
    s.seed = 3;
    s.max_len = 128;
    s
}

fn inputs<'a>(
    train: &'a Prepared,
    eval: &'a Prepared,
    s: &'a TrainSettings,
    ckpt: Option<&'a Path>,
) -> RunInputs<'a> {
    RunInputs {
        train,
        eval,
        settings: s,
        init: None,
        checkpoint_dir: ckpt,
        out_dir: None,
        base_name: "tiny",
        snapshot: None,
        data_source: "test".into(),
        tok: None,
    }
}

fn go(_: &Progress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn adapter_bytes(a: &retune_trainer::Adapter, dir: &Path) -> Vec<u8> {
    a.save_peft(dir, "tiny").unwrap();
    let mut b = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    b.extend(std::fs::read(dir.join("adapter_config.json")).unwrap());
    b
}

#[test]
fn loss_only_on_assistant_tokens_with_weights() {
    let dir = tmpdir("encode");
    let t = tiny(&dir, 1);
    let body = ExampleBody::Chat {
        messages: vec![
            msg("system", "be brief", None),
            msg("user", "hello", None),
            msg("assistant", "world", Some(0)),
            msg("user", "again", None),
            msg("assistant", "hello world", None),
        ],
    };
    let e = encode(&body, &t.tok, &t.template).unwrap();
    let trained: Vec<u32> = e
        .tokens
        .iter()
        .zip(&e.weights)
        .filter(|(_, w)| **w > 0.0)
        .map(|(t, _)| *t)
        .collect();
    let text = t.tok.decode(&trained, false).unwrap();
    // the weighted assistant turn and its end-of-turn token, nothing else
    assert_eq!(text, "hello world<|im_end|>");
    // what precedes it is exactly the prompt the server renders for that turn
    let first = e.weights.iter().position(|w| *w > 0.0).unwrap();
    let prompt = t
        .template
        .render(
            &[
                retune_engine::ChatMessage::new("system", "be brief"),
                retune_engine::ChatMessage::new("user", "hello"),
                retune_engine::ChatMessage::new("assistant", "world"),
                retune_engine::ChatMessage::new("user", "again"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(t.tok.decode(&e.tokens[..first], false).unwrap(), prompt);

    let text_ex = ExampleBody::Text {
        prompt: "hello".into(),
        completion: " world".into(),
    };
    let e = encode(&text_ex, &t.tok, &t.template).unwrap();
    let n = e.weights.iter().filter(|w| **w > 0.0).count();
    assert_eq!(
        n,
        t.tok.encode(" world", false).unwrap().len() + 1,
        "completion + end token"
    );

    // over-long examples: dropped or truncated, counted
    let long = chat(&"hello ".repeat(200), "world");
    let p = prepare(
        &[long.clone(), chat("a", "b")],
        &t.tok,
        &t.template,
        64,
        Overflow::Drop,
    )
    .unwrap();
    assert_eq!(p.examples.len(), 1);
    assert_eq!(p.dropped.get("longer than max_len"), Some(&1));
    let p = prepare(&[long], &t.tok, &t.template, 64, Overflow::Truncate).unwrap();
    // truncation cut the answer away: nothing left to train on
    assert_eq!(
        (p.truncated, p.dropped.get("no trained tokens")),
        (1, Some(&1))
    );
    let no_answer = ExampleBody::Chat {
        messages: vec![msg("user", "hi", None)],
    };
    let p = prepare(&[no_answer], &t.tok, &t.template, 64, Overflow::Drop).unwrap();
    assert_eq!(p.dropped.get("unrenderable"), Some(&1));
}

#[test]
fn learns_reproducibly_and_resumes_to_the_same_bytes() {
    let dir = tmpdir("repro");
    let t = tiny(&dir, 1);
    let s = settings();
    let train_set = prepare(&dataset(24), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let none = Prepared::default();
    let a = train(&t.model, inputs(&train_set, &none, &s, None), go).unwrap();
    let first = a.record.loss_curve[0];
    let last = a.record.loss_curve[a.record.loss_curve.len() - 3..]
        .iter()
        .sum::<f32>()
        / 3.0;
    assert!(last < 0.6 * first, "loss {first} → {last}");
    assert_eq!(a.record.steps, 12);
    let bytes_a = adapter_bytes(&a.adapter, &dir.join("a"));

    let b = train(&t.model, inputs(&train_set, &none, &s, None), go).unwrap();
    assert_eq!(
        bytes_a,
        adapter_bytes(&b.adapter, &dir.join("b")),
        "same seed, same bytes"
    );
    let mut s2 = s.clone();
    s2.seed = 4;
    let c = train(&t.model, inputs(&train_set, &none, &s2, None), go).unwrap();
    assert_ne!(
        bytes_a,
        adapter_bytes(&c.adapter, &dir.join("c")),
        "another seed differs"
    );

    // interrupted after step 6 (an eval step), then resumed from its checkpoint:
    // the same losses, evals and bytes as a run never stopped
    let ckpt = dir.join("ckpt");
    let mut sc = s.clone();
    sc.checkpoint_every = 4;
    sc.eval_every = 3;
    let eval_set = prepare(&dataset(30)[24..], &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let straight = train(&t.model, inputs(&train_set, &eval_set, &sc, None), go).unwrap();
    let bytes_s = adapter_bytes(&straight.adapter, &dir.join("s"));
    assert_eq!(straight.record.eval_curve.len(), 4);
    let stop = |p: &Progress| match p {
        Progress::Step { step: 6, .. } => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    match train(
        &t.model,
        inputs(&train_set, &eval_set, &sc, Some(&ckpt)),
        stop,
    ) {
        Err(TrainError::Interrupted {
            step: 6,
            checkpoint: Some(_),
        }) => {}
        Err(e) => panic!("expected an interruption, got {e}"),
        Ok(_) => panic!("expected an interruption"),
    }
    let r = train(
        &t.model,
        inputs(&train_set, &eval_set, &sc, Some(&ckpt)),
        go,
    )
    .unwrap();
    assert_eq!(r.record.resumed_from, Some(6));
    assert_eq!(r.record.loss_curve.len(), 12);
    assert_eq!(r.record.loss_curve[..], straight.record.loss_curve[..]);
    assert_eq!(r.record.eval_curve, straight.record.eval_curve);
    assert_eq!(r.record.best_eval, straight.record.best_eval);
    assert_eq!(
        bytes_s,
        adapter_bytes(&r.adapter, &dir.join("r")),
        "resumed run, same bytes"
    );

    // a checkpoint from other settings is refused, not silently mixed in
    let mut other = sc.clone();
    other.optim.lr = 2e-2;
    match train(
        &t.model,
        inputs(&train_set, &eval_set, &other, Some(&ckpt)),
        go,
    ) {
        Err(TrainError::Checkpoint { .. }) => {}
        Err(e) => panic!("expected a checkpoint mismatch, got {e}"),
        Ok(_) => panic!("expected a checkpoint mismatch"),
    }
}

#[test]
fn eval_loss_early_stopping_keeps_the_best() {
    let dir = tmpdir("early");
    let t = tiny(&dir, 1);
    let mut s = settings();
    s.max_steps = Some(40);
    s.eval_every = 2;
    s.patience = 2;
    let train_set = prepare(&dataset(24), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    // eval asks for other answers to the same queries: training makes it worse
    let eval_bodies: Vec<ExampleBody> = (0..6)
        .map(|i| chat(&format!("query {i} about {}", i % 3), "ll ll"))
        .collect();
    let eval = prepare(&eval_bodies, &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let o = train(&t.model, inputs(&train_set, &eval, &s, None), go).unwrap();
    assert!(
        o.record.stopped.starts_with("early stop"),
        "{}",
        o.record.stopped
    );
    assert!(o.record.steps < 40);
    let (best_step, best) = o.record.best_eval.unwrap();
    let min = o
        .record
        .eval_curve
        .iter()
        .map(|e| e.1)
        .fold(f32::INFINITY, f32::min);
    assert_eq!(best, min);
    // the returned adapter is the best one: its eval loss is the best eval loss
    let again =
        retune_trainer::train::eval_loss_of(&t.model, &o.adapter, &eval, s.batch_size).unwrap();
    assert!(
        (again - best).abs() < 1e-5,
        "returned adapter eval {again} vs best {best} at {best_step}"
    );
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tmpdir("bad");
    let t = tiny(&dir, 1);
    let s = settings();
    let none = Prepared::default();
    let expect_data =
        |r: retune_trainer::Result<retune_trainer::train::Outcome>, what: &str| match r {
            Err(TrainError::Data(m)) => assert!(m.contains(what), "{m}"),
            Err(e) => panic!("expected a data error, got {e}"),
            Ok(_) => panic!("expected a data error"),
        };
    expect_data(
        train(&t.model, inputs(&none, &none, &s, None), go),
        "no training examples",
    );
    let few = prepare(&dataset(3), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let mut s8 = s.clone();
    s8.min_examples = 8;
    expect_data(
        train(&t.model, inputs(&few, &none, &s8, None), go),
        "at least 8",
    );

    // a learning rate that blows the parameters up: stop at the first
    // non-finite loss, the last good state saved
    let set = prepare(&dataset(24), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let mut boom = s.clone();
    boom.optim.lr = 1e30;
    boom.warmup_steps = 0;
    boom.max_grad_norm = 0.0;
    let ckpt = dir.join("ckpt");
    match train(&t.model, inputs(&set, &none, &boom, Some(&ckpt)), go) {
        Err(TrainError::NonFinite {
            step,
            checkpoint: Some(p),
            ..
        }) => {
            assert!(step >= 1);
            let st =
                candle_core::safetensors::load(p.join("state.safetensors"), &Device::Cpu).unwrap();
            for (k, v) in st.iter().filter(|(k, _)| k.starts_with("p.")) {
                let m = v
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(m.is_finite(), "{k} in the saved state is not finite");
            }
        }
        Err(e) => panic!("expected a non-finite stop, got {e}"),
        Ok(_) => panic!("expected a non-finite stop"),
    }
}

#[test]
fn a_different_base_is_refused_and_nothing_registered() {
    let dir = tmpdir("base");
    let a = tiny(&dir.join("a"), 1);
    let b = tiny(&dir.join("b"), 2);
    assert_ne!(a.model.fingerprint(), b.model.fingerprint());
    let s = settings();
    let set = prepare(&dataset(8), &a.tok, &a.template, 128, Overflow::Drop).unwrap();
    let none = Prepared::default();
    let oa = train(&a.model, inputs(&set, &none, &s, None), go).unwrap();
    let ob = train(&b.model, inputs(&set, &none, &s, None), go).unwrap();
    let (da, db) = (dir.join("out-a"), dir.join("out-b"));
    oa.adapter.save_peft(&da, "a").unwrap();
    ob.adapter.save_peft(&db, "b").unwrap();
    let root = dir.join("root");
    retune_trainer::register(
        &root,
        &Default::default(),
        "acme",
        "tone",
        &da,
        &oa.record,
        &a.model,
        None,
    )
    .unwrap();
    match retune_trainer::register(
        &root,
        &Default::default(),
        "acme",
        "tone",
        &db,
        &ob.record,
        &b.model,
        None,
    ) {
        Err(TrainError::BaseMismatch(m)) => assert!(m.contains("acme/tone"), "{m}"),
        Err(e) => panic!("expected a base mismatch, got {e}"),
        Ok(_) => panic!("expected a base mismatch"),
    }
    let store = std::sync::Arc::new(retune_registry::LocalStore::new(&root.join("store")).unwrap());
    let reg = retune_registry::Registry::open(&root.join("registry.db"), store, 1 << 30).unwrap();
    assert_eq!(reg.versions("acme", "tone").unwrap().len(), 1);

    // starting from an adapter made for other shapes: refused at load
    let other = tmpdir("base-other");
    let big = TinySpec {
        hidden: 128,
        ffn: 256,
        ..TinySpec::default()
    };
    retune_engine::tiny::write_adapter(&other, &big, 4, &[0, 1], 1, 8.0, 0.1).unwrap();
    let mut si = s.clone();
    si.lora.modules = vec![0, 1];
    let mut inp = inputs(&set, &none, &si, None);
    inp.init = Some(&other);
    match train(&a.model, inp, go) {
        Err(TrainError::Adapter(_)) => {}
        Err(e) => panic!("expected an adapter error, got {e}"),
        Ok(_) => panic!("expected an adapter error"),
    }
}

#[test]
fn dropout_is_reproducible_and_changes_training() {
    let dir = tmpdir("dropout");
    let t = tiny(&dir, 1);
    let set = prepare(&dataset(16), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    let none = Prepared::default();
    let mut s = settings();
    s.max_steps = Some(4);
    let plain = train(&t.model, inputs(&set, &none, &s, None), go).unwrap();
    s.dropout = 0.3;
    let d1 = train(&t.model, inputs(&set, &none, &s, None), go).unwrap();
    let d2 = train(&t.model, inputs(&set, &none, &s, None), go).unwrap();
    let (b0, b1, b2) = (
        adapter_bytes(&plain.adapter, &dir.join("p")),
        adapter_bytes(&d1.adapter, &dir.join("d1")),
        adapter_bytes(&d2.adapter, &dir.join("d2")),
    );
    assert_eq!(b1, b2, "dropout masks come from the seed");
    assert_ne!(b0, b1, "dropout changes what is learned");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("d1/adapter_config.json")).unwrap())
            .unwrap();
    assert!((cfg["lora_dropout"].as_f64().unwrap() - 0.3).abs() < 1e-6);
}

/// A label task trained as a classifier: the head reads the last prompt token,
/// it learns, it resumes to the same bytes (head and its moments included), and
/// examples whose answer is not a label are left out, counted.
#[test]
fn a_label_task_trains_a_classifier_head() {
    let dir = tmpdir("classifier");
    let t = tiny(&dir, 1);
    let labels: Vec<String> = ["hello", "world", "hello world"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut s = settings();
    s.labels = Some(labels.clone());
    s.max_steps = Some(40);
    let mut data = dataset(30);
    data.push(chat("an odd one", "goodbye"));
    let train_set =
        retune_trainer::examples::prepare_classes(&data, &t.tok, &t.template, 128, &labels)
            .unwrap();
    assert_eq!(train_set.examples.len(), 30);
    assert_eq!(
        train_set.dropped.get("answer not a declared label"),
        Some(&1)
    );
    // the target is the label's index; the prompt ends where the answer would start
    let first = &train_set.examples[0];
    assert_eq!(first.class, Some(0));
    assert_eq!(first.target_count(), 1);
    let (prompt, _) = {
        let full = encode(&data[0], &t.tok, &t.template).unwrap();
        let n = full.weights.iter().position(|w| *w > 0.0).unwrap();
        (full.tokens[..n].to_vec(), ())
    };
    assert_eq!(first.tokens, prompt);

    let none = Prepared::default();
    let tok = &t.tok;
    let with_tok = |ck| RunInputs {
        tok: Some(tok),
        ..inputs(&train_set, &none, &s, ck)
    };
    let a = train(&t.model, with_tok(None), go).unwrap();
    let c = &a.record.loss_curve;
    let (head, tail) = (c[0], c[c.len() - 3..].iter().sum::<f32>() / 3.0);
    assert!(tail < 0.5 * head, "loss {head} → {tail}");
    let h = a.adapter.head.as_ref().expect("a head");
    assert_eq!(h.labels, labels);
    // its training accuracy, through the serving engine
    let ad_dir = dir.join("a");
    a.adapter.save_peft(&ad_dir, "tiny").unwrap();
    let serve = retune_engine::load(&dir.join("model.gguf")).unwrap();
    let la = retune_adapters::load_peft(&ad_dir, &serve.model.base_shapes(), &Default::default())
        .unwrap();
    let acc = retune_trainer::eval::exact_match(
        &serve.model,
        &serve.tok,
        &serve.template,
        Some(&la),
        &data[..30],
        (8, 8),
        None,
    )
    .unwrap();
    assert!(acc.accuracy >= 0.9, "training accuracy {}", acc.accuracy);
    // the classical prior trained on the same rows travels in the weights file
    let note = a.record.classical_prior.as_deref().unwrap_or_default();
    assert!(
        note.starts_with("a TF-IDF classifier over 3 labels trained on 30 rows"),
        "{note}"
    );
    let p = la
        .head
        .as_ref()
        .and_then(|h| h.prior.as_ref())
        .expect("a prior");
    assert_eq!(p.classifier.labels().len(), 3);
    let mut off = s.clone();
    off.classical_prior = false;
    off.max_steps = Some(2);
    let b = train(
        &t.model,
        RunInputs {
            tok: Some(tok),
            ..inputs(&train_set, &none, &off, None)
        },
        go,
    )
    .unwrap();
    assert!(b.adapter.prior.is_none() && b.record.classical_prior.is_none());

    // without the tokenizer a head cannot start; a resumed run lands on the same bytes
    assert!(matches!(
        train(&t.model, inputs(&train_set, &none, &s, None), go),
        Err(TrainError::Setting(_))
    ));
    let ckpt = dir.join("ckpt");
    let mut sc = s.clone();
    sc.checkpoint_every = 4;
    let straight = train(
        &t.model,
        RunInputs {
            tok: Some(tok),
            ..inputs(&train_set, &none, &sc, None)
        },
        go,
    )
    .unwrap();
    let stop = |p: &Progress| match p {
        Progress::Step { step: 8, .. } => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    assert!(matches!(
        train(
            &t.model,
            RunInputs {
                tok: Some(tok),
                ..inputs(&train_set, &none, &sc, Some(&ckpt))
            },
            stop
        ),
        Err(TrainError::Interrupted { step: 8, .. })
    ));
    let r = train(
        &t.model,
        RunInputs {
            tok: Some(tok),
            ..inputs(&train_set, &none, &sc, Some(&ckpt))
        },
        go,
    )
    .unwrap();
    assert_eq!(r.record.resumed_from, Some(8));
    assert_eq!(
        adapter_bytes(&straight.adapter, &dir.join("s")),
        adapter_bytes(&r.adapter, &dir.join("r"))
    );

    // generation examples with classifier settings (or the reverse) are refused
    let gen_set = prepare(&dataset(12), &t.tok, &t.template, 128, Overflow::Drop).unwrap();
    assert!(matches!(
        train(
            &t.model,
            RunInputs {
                tok: Some(tok),
                ..inputs(&gen_set, &none, &s, None)
            },
            go
        ),
        Err(TrainError::Setting(_))
    ));
    // nothing left when no answer is a label
    let off: Vec<ExampleBody> = (0..10).map(|i| chat(&format!("q{i}"), "nope")).collect();
    let empty =
        retune_trainer::examples::prepare_classes(&off, &t.tok, &t.template, 128, &labels).unwrap();
    match train(
        &t.model,
        RunInputs {
            tok: Some(tok),
            ..inputs(&empty, &none, &s, None)
        },
        go,
    ) {
        Err(TrainError::Data(m)) => assert!(m.contains("answer not a declared label"), "{m}"),
        Err(e) => panic!("expected a data error, got {e}"),
        Ok(_) => panic!("expected a data error"),
    }
}
