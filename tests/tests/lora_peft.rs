//! A real PEFT-made adapter (tests/fixtures/lora/adapter, made by
//! scripts/make-lora-fixture.py with HF peft) on the real Q4_1 GGUF, checked
//! against transformers+peft and against llama.cpp serving the same adapter
//! converted by its convert_lora_to_gguf.py; every numeric check on every kernel
//! path this machine can run.

use retune_adapters::{load_peft, LoadLimits, LoraAdapter};
use retune_e2e::{
    exact_reference, fixture_path, model_path, on_every_path, read_fixture, teacher_forced, Bounds,
    LlamaCppFixture,
};
use retune_engine::sampler::log_sum_exp;
use retune_engine::*;
use serde::Deserialize;

/// The model packed for the path in use, and the adapter.
fn setup() -> (Model, LoraAdapter) {
    let m = load(&model_path()).expect("model").model;
    let a = load_peft(
        &fixture_path("lora/adapter"),
        &m.base_shapes(),
        &LoadLimits::default(),
    )
    .expect("adapter");
    (m, a)
}

#[derive(Deserialize)]
struct HfChat {
    prompt_tokens: Vec<u32>,
    top: Vec<(u32, f64)>,
}

#[derive(Deserialize)]
struct HfRef {
    chats: Vec<HfChat>,
}

#[test]
fn peft_adapter_matches_transformers_peft_on_the_same_weights() {
    // transformers computes in f32 on the dequantized weights: on an f32 path
    // only summation order differs; an int8 path is held to its measured
    // rounding (Bounds::first_step_vs_exact)
    let hf: HfRef = read_fixture("lora/hf_peft_first_step.json");
    on_every_path(|p| {
        let (m, a) = setup();
        let mut worst = 0f64;
        let mut moved = 0f64;
        for chat in &hf.chats {
            let logp = |adapter: Option<&LoraAdapter>| {
                let mut kv = m.new_cache();
                let l = m
                    .forward(&mut [BatchItem {
                        tokens: &chat.prompt_tokens,
                        adapter,
                        kv: &mut kv,
                        want_logits: true,
                        only: None,
                    }])
                    .unwrap()
                    .remove(0);
                let lse = log_sum_exp(&l);
                l.iter().map(|v| (v - lse) as f64).collect::<Vec<_>>()
            };
            let (with, without) = (logp(Some(&a)), logp(None));
            for &(id, lp) in &chat.top {
                worst = worst.max((with[id as usize] - lp).abs());
                moved = moved.max((without[id as usize] - lp).abs());
            }
        }
        let bound = Bounds::of(p).first_step_vs_exact;
        let msg = format!(
            "max |ours − transformers+peft| = {worst:.5} (bound {bound}); base without adapter is {moved:.3} away"
        );
        if worst >= bound {
            return Err(msg);
        }
        if moved <= 0.1 {
            return Err(format!("the adapter should move the distribution: {msg}"));
        }
        Ok(msg)
    });
}

/// The engine issue's check against llama.cpp serving the converted adapter. One
/// amendment, printed when used: a first-step logprob more than 0.35 from
/// llama.cpp still passes if transformers+peft (the exact reference on the same
/// weights) puts llama.cpp more than 0.35 away and us within 0.02 of it — then the
/// gap is llama.cpp's own error, not ours.
#[test]
fn peft_adapter_on_q4_1_gguf_agrees_with_llamacpp_serving_it() {
    let fx: LlamaCppFixture = read_fixture("lora/llamacpp_lora.json");
    let exact = exact_reference("lora/llamacpp_lora.json");
    let hf: HfRef = read_fixture("lora/hf_peft_first_step.json");
    on_every_path(|p| {
        let (m, a) = setup();
        // the first step against llama.cpp is checked below, with the amendment
        let b = Bounds {
            first_step_vs_llamacpp: None,
            ..Bounds::of(p)
        };
        let r = teacher_forced(&m, Some(&a), &fx, &exact, &b);
        r.check(&b)?;
        let Some(lim) = Bounds::of(p).first_step_vs_llamacpp else {
            return Ok(format!("{r:?}"));
        };
        let mut notes = Vec::new();
        for (ci, (chat, h)) in fx.chats.iter().zip(&hf.chats).enumerate() {
            assert_eq!(chat.prompt_tokens, h.prompt_tokens);
            let mut kv = m.new_cache();
            let l = m
                .forward(&mut [BatchItem {
                    tokens: &chat.prompt_tokens,
                    adapter: Some(&a),
                    kv: &mut kv,
                    want_logits: true,
                    only: None,
                }])
                .unwrap()
                .remove(0);
            let lse = log_sum_exp(&l);
            for &(id, lp) in &chat.steps[0].top {
                let ours = (l[id as usize] - lse) as f64;
                let lp = lp as f64;
                if (ours - lp).abs() <= lim {
                    continue;
                }
                let exact = h.top.iter().find(|t| t.0 == id).map(|t| t.1);
                match exact {
                    Some(e) if (lp - e).abs() > lim && (ours - e).abs() < 0.02 => notes.push(format!(
                        "chat {ci} token {id}: ours {ours:.3}, llama.cpp {lp:.3}, transformers+peft {e:.3} -> llama.cpp's error"
                    )),
                    _ => return Err(format!(
                        "chat {ci} first step token {id}: ours {ours}, llama.cpp {lp}, transformers+peft {exact:?}"
                    )),
                }
            }
        }
        Ok(format!("{r:?}; {}", notes.join("; ")))
    });
}

/// The same check, literally (no amendment), against llama.cpp run with an f32 KV
/// cache and flash attention off (`-ctk f32 -ctv f32 -fa off`), its most exact path.
#[test]
fn peft_adapter_passes_the_literal_check_against_llamacpp_f32_kv() {
    let fx: LlamaCppFixture = read_fixture("lora/llamacpp_lora_f32kv.json");
    let exact = exact_reference("lora/llamacpp_lora_f32kv.json");
    on_every_path(|p| {
        let (m, a) = setup();
        let r = teacher_forced(&m, Some(&a), &fx, &exact, &Bounds::of(p));
        r.check(&Bounds::of(p)).map(|_| format!("{r:?}"))
    });
}
