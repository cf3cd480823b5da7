//! Structured output (grammar-constrained decoding), `n` samples of one prompt,
//! and token bytes, on a tiny random model: whatever the weights, constrained
//! output is valid by construction.

use retune_engine::guide::Constraint;
use retune_engine::tiny::{self, TinySpec};
use retune_engine::*;
use serde_json::{json, Value};
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retune-guide-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn engine(name: &str, cfg: EngineConfig) -> Engine {
    let dir = tmpdir(name);
    let (gguf, _) = tiny::write(&dir, &TinySpec::default()).unwrap();
    let l = load(&gguf).unwrap();
    Engine::start(l.model, l.tok, cfg).unwrap()
}

fn prompt() -> Vec<u32> {
    (0..12).map(|j| (j * 13 % 200 + 5) as u32).collect()
}

fn sampled(seed: u64, max_tokens: usize, c: Option<Constraint>) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        constraint: c,
        ..SamplingParams::greedy(max_tokens)
    }
}

fn run(e: &Engine, params: SamplingParams) -> Generated {
    e.generate_blocking(GenerateRequest::new(prompt(), params))
        .unwrap()
}

fn ticket_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "label": {"enum": ["refund", "card_lost", "other"]},
            "urgent": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 99}
        },
        "required": ["label", "urgent", "count"],
        "additionalProperties": false
    })
}

#[test]
fn json_schema_output_is_valid_whatever_the_weights() {
    let e = engine("schema", EngineConfig::default());
    for seed in 0..12 {
        let c = Constraint::JsonSchema {
            schema: ticket_schema(),
        };
        let g = run(&e, sampled(seed, 64, Some(c)));
        assert_eq!(g.completion.finish, FinishReason::Stop, "{:?}", g.text);
        let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|err| {
            panic!("seed {seed}: {:?} does not parse: {err}", g.text);
        });
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 3, "{v}");
        assert!(["refund", "card_lost", "other"].contains(&o["label"].as_str().unwrap()));
        assert!(o["urgent"].is_boolean());
        let n = o["count"].as_i64().unwrap();
        assert!((0..=99).contains(&n), "{v}");
    }
    // the same request unconstrained is not JSON (the contrast: the grammar did it)
    let free = run(&e, sampled(0, 64, None));
    assert!(
        serde_json::from_str::<Value>(&free.text).is_err(),
        "{:?}",
        free.text
    );
}

#[test]
fn json_object_output_parses_even_when_the_budget_runs_out() {
    let e = engine("object", EngineConfig::default());
    let (mut stopped, mut wrapped) = (0, 0);
    for max_tokens in [10, 24, 64] {
        for seed in 0..16 {
            let g = run(&e, sampled(seed, max_tokens, Some(Constraint::JsonObject)));
            let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|err| {
                panic!(
                    "max_tokens {max_tokens}: {:?} does not parse: {err}",
                    g.text
                )
            });
            assert!(v.is_object());
            assert!(g.completion.output.len() <= max_tokens);
            match g.completion.finish {
                FinishReason::Stop => stopped += 1,
                // closed early to fit: honest about it
                FinishReason::Length => wrapped += 1,
            }
        }
    }
    assert!(
        stopped > 0 && wrapped > 0,
        "stopped {stopped}, wrapped {wrapped}"
    );
}

#[test]
fn a_choice_is_always_one_of_the_choices() {
    let e = engine("choice", EngineConfig::default());
    let choices = vec![
        "refund".to_string(),
        "card_lost".to_string(),
        "card arrival (late)".to_string(),
    ];
    let mut seen = std::collections::HashSet::new();
    for seed in 0..24 {
        let c = Constraint::Choice {
            choices: choices.clone(),
        };
        let g = run(&e, sampled(seed, 32, Some(c)));
        assert_eq!(g.completion.finish, FinishReason::Stop);
        assert!(choices.contains(&g.text), "{:?}", g.text);
        seen.insert(g.text);
    }
    assert!(seen.len() > 1, "sampling picked one choice every time");
}

#[test]
fn schemas_that_cannot_compile_are_client_errors() {
    let e = engine("bad", EngineConfig::default());
    let bad = [
        Constraint::JsonSchema {
            schema: json!({"type": "frobnicate"}),
        },
        Constraint::JsonSchema {
            schema: json!({"$ref": "#/$defs/missing"}),
        },
        Constraint::JsonSchema { schema: json!(3) },
        Constraint::Regex {
            pattern: "(unclosed".into(),
        },
        Constraint::Choice { choices: vec![] },
    ];
    for c in bad {
        let err = e
            .validate(prompt(), sampled(0, 8, Some(c.clone())), None)
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Client, "{c:?}: {err}");
        assert!(!err.message.is_empty());
    }
}

#[test]
fn constrained_and_free_rows_share_a_batch_and_the_free_rows_are_unchanged() {
    let e = engine("mixed", EngineConfig::default());
    let alone = run(&e, sampled(7, 24, None));
    let mut streams = Vec::new();
    for k in 0..3 {
        let c = Constraint::JsonSchema {
            schema: ticket_schema(),
        };
        let v = e.validate(prompt(), sampled(k, 64, Some(c)), None).unwrap();
        streams.push(e.submit(v).unwrap());
    }
    let v = e.validate(prompt(), sampled(7, 24, None), None).unwrap();
    let free = e.submit(v).unwrap();
    let text = |mut s: GenerationStream| {
        let mut t = String::new();
        while let Some(ev) = s.blocking_next() {
            match ev {
                Event::Token(x) => t.push_str(&x.text),
                Event::Done(c) => {
                    t.push_str(&c.tail);
                    return t;
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        panic!("no end")
    };
    assert_eq!(
        text(free),
        alone.text,
        "a free row changed beside constrained ones"
    );
    for s in streams {
        let t = text(s);
        serde_json::from_str::<Value>(&t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
    }
}

fn collect(mut s: GenerationStream) -> (Vec<u32>, Completion) {
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(t) => ids.push(t.id),
            Event::Done(c) => return (ids, *c),
            Event::Error(e) => panic!("{e}"),
        }
    }
    panic!("no end")
}

#[test]
fn n_samples_prefill_once_and_each_replays_as_its_own_seed() {
    let e = engine("n", EngineConfig::default());
    let params = SamplingParams {
        stop_on_eos: false,
        ..sampled(40, 16, None)
    };
    let before = e.stats().prompt_tokens;
    let v = e.validate(prompt(), params.clone(), None).unwrap();
    let streams = e.submit_n(v, 3).unwrap();
    assert_eq!(streams.len(), 3);
    let outs: Vec<(Vec<u32>, Completion)> = streams.into_iter().map(collect).collect();
    // one prefill for the three samples
    assert_eq!(e.stats().prompt_tokens - before, prompt().len());
    for (k, (ids, c)) in outs.iter().enumerate() {
        assert_eq!(c.seed(), Some(40 + k as u64));
        assert_eq!(c.prompt, prompt());
        let alone = run(
            &e,
            SamplingParams {
                seed: Some(40 + k as u64),
                ..params.clone()
            },
        );
        assert_eq!(
            ids,
            &alone.ids(),
            "sample {k} differs from its seed run alone"
        );
    }
    assert_ne!(outs[0].0, outs[1].0, "two samples came out the same");
}

#[test]
fn n_samples_under_a_grammar_fork_its_state() {
    let e = engine("nguide", EngineConfig::default());
    let c = Constraint::JsonSchema {
        schema: ticket_schema(),
    };
    let v = e.validate(prompt(), sampled(3, 64, Some(c)), None).unwrap();
    for s in e.submit_n(v, 4).unwrap() {
        let (ids, c) = collect(s);
        let text = e.tokenizer().decode(&ids, true).unwrap();
        assert_eq!(c.finish, FinishReason::Stop);
        serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
}

#[test]
fn token_bytes_are_raw_bytes_even_inside_a_character() {
    let dir = tmpdir("bytes");
    let (gguf, _) = tiny::write(&dir, &TinySpec::default()).unwrap();
    let tok = load(&gguf).unwrap().tok;
    // "é" is two bytes; the tiny vocabulary has no merge for it: two tokens
    let ids = tok.encode("é", false).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(tok.token_bytes(ids[0]), &[0xC3]);
    assert_eq!(tok.token_bytes(ids[1]), &[0xA9]);
    // a space-prefixed merge
    let w = tok.encode(" world", false).unwrap();
    let joined: Vec<u8> = w
        .iter()
        .flat_map(|&i| tok.token_bytes(i).to_vec())
        .collect();
    assert_eq!(joined, b" world");
    let eos = tok.eos[0];
    assert!(tok.is_special(eos));
    assert!(!tok.is_special(ids[0]));
}
