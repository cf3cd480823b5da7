//! The eval gate: a candidate reaches traffic only if, on its snapshot's eval
//! split, it beats the live version and every baseline — the base model with the
//! adapter's prompt (system prompt + k examples from the train split) and the
//! most common training answer — by the paired difference (the lower end of its
//! 95% paired-bootstrap interval above the configured gain), reaches the minimum
//! score, and forgets little: the mean per-token KL(base || candidate) along the
//! base model's own answers to general prompts stays under a bound.
//!
//! Every arm is decoded greedily by the serving engine's forward, with the
//! adapter exactly as it is served.

use crate::error::{Result, TrainError};
use crate::eval::{generate, generate_ids};
use crate::stats::{bootstrap_mean, mcnemar_exact, mean, paired_bootstrap, wilson};
use retune_adapters::LoraAdapter;
use retune_config::{ClassicalMode, GateOptions};
use retune_datasets::classical::{ClassicalOptions, TextClassifier};
use retune_datasets::snapshot::classifier_text;
use retune_datasets::SnapshotRow;
use retune_engine::{BatchItem, ChatMessage, ChatTemplate, Model, Tok};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// General prompts the forgetting check asks (none is about any tenant's task).
pub const GENERAL_PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is in one sentence.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Name three planets of the solar system.",
    "What should I pack for a weekend hiking trip?",
    "Describe a cat to someone who has never seen one.",
];

pub use crate::scoring::{choose_metric, json_score, score, token_f1, Metric};
use crate::scoring::{expected, split_example};

#[derive(Clone, Debug, Serialize)]
pub struct Arm {
    pub name: String,
    pub score: f64,
    /// 95% interval of the score (Wilson for 0/1 scores, bootstrap otherwise).
    pub interval: (f64, f64),
    pub n: usize,
    pub seconds: f64,
    /// A few (expected, answer) pairs, to see what the arm does.
    pub samples: Vec<(String, String)>,
    #[serde(skip)]
    pub scores: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub against: String,
    /// Mean paired difference candidate - other.
    pub gain: f64,
    /// Its 95% paired-bootstrap interval.
    pub interval: (f64, f64),
    /// McNemar's exact two-sided p-value (0/1 metrics).
    pub mcnemar_p: Option<f64>,
    /// The lower end of the interval must exceed this.
    pub required: f64,
    pub beats: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Forgetting {
    pub prompts: usize,
    pub tokens: usize,
    /// Mean per-token KL(base || candidate), nats.
    pub kl: f64,
    pub max_prompt_kl: f64,
    pub bound: f64,
    pub ok: bool,
    /// Why the check did not apply (a classifier answers only its labels: it
    /// has no free text to drift).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The classical arm of a label task: a TF-IDF classifier trained on the
/// snapshot's train split and scored on the same eval rows as every arm.
#[derive(Clone, Debug, Serialize)]
pub struct ClassicalArm {
    pub mode: ClassicalMode,
    /// Train rows it learnt from and the labels it chooses among.
    pub train_rows: usize,
    pub labels: usize,
    /// Labels with too few train rows to learn (it never answers them).
    pub skipped_labels: Vec<String>,
    pub train_seconds: f64,
    /// Candidate against it, paired like the other baselines.
    pub comparison: Option<Comparison>,
    /// In words: what it scored, what the candidate scored, what that means;
    /// or why it could not run.
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct GateReport {
    pub metric: Metric,
    /// Eval examples scored (a seeded sample when the split is larger than `max_eval`).
    pub eval_examples: usize,
    pub eval_split: usize,
    pub arms: Vec<Arm>,
    pub vs_live: Option<Comparison>,
    pub vs_baselines: Vec<Comparison>,
    /// The classical arm (label tasks, unless `gate.classical` is `off`).
    pub classical: Option<ClassicalArm>,
    pub forgetting: Forgetting,
    pub passed: bool,
    pub reasons: Vec<String>,
    pub seconds: f64,
}

impl GateReport {
    /// One line for the journal.
    pub fn summary(&self) -> String {
        let arm = |n: &str| {
            self.arms
                .iter()
                .find(|a| a.name == n)
                .map(|a| format!("{n} {:.3}", a.score))
        };
        let mut parts: Vec<String> = [
            "candidate",
            "head alone",
            "live",
            "base+prompt",
            "constant",
            "classical",
        ]
        .iter()
        .filter_map(|n| arm(n))
        .collect();
        parts.push(format!("KL {:.3}", self.forgetting.kl));
        let head = format!(
            "{} {:?} on {} eval examples: {}",
            if self.passed { "pass" } else { "fail" },
            self.metric,
            self.eval_examples,
            parts.join(", ")
        );
        if self.reasons.is_empty() {
            head
        } else {
            format!("{head}; {}", self.reasons.join("; "))
        }
    }
}

pub struct GateInputs<'a> {
    pub model: &'a Model,
    pub tok: &'a Tok,
    pub template: &'a ChatTemplate,
    pub train: &'a [SnapshotRow],
    pub eval: &'a [SnapshotRow],
    pub candidate: &'a LoraAdapter,
    /// The live version (its id) when there is one.
    pub live: Option<(&'a str, &'a LoraAdapter)>,
    pub options: &'a GateOptions,
    /// A declared label task's labels: every arm that generates answers only
    /// these, as the task is served.
    pub labels: Option<&'a [String]>,
    pub seed: u64,
    /// Prompts per forward.
    pub batch: usize,
}

fn hash64(seed: u64, s: &str) -> u64 {
    let d = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(s.as_bytes())
        .finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn is_binary(x: &[f64]) -> bool {
    x.iter().all(|v| *v == 0.0 || *v == 1.0)
}

fn arm(
    name: &str,
    answers: &[String],
    wants: &[String],
    m: Metric,
    keys: &[String],
    seed: u64,
    b: usize,
    secs: f64,
) -> Arm {
    let scores: Vec<f64> = answers
        .iter()
        .zip(wants)
        .map(|(a, w)| score(m, a, w, keys))
        .collect();
    let interval = if is_binary(&scores) {
        wilson(scores.iter().filter(|s| **s == 1.0).count(), scores.len())
    } else {
        bootstrap_mean(&scores, b, seed)
    };
    Arm {
        name: name.into(),
        score: mean(&scores),
        interval,
        n: scores.len(),
        seconds: secs,
        samples: wants
            .iter()
            .zip(answers)
            .take(3)
            .map(|(w, a)| (w.clone(), a.clone()))
            .collect(),
        scores,
    }
}

fn compare(cand: &Arm, other: &Arm, required: f64, b: usize, seed: u64) -> Comparison {
    let interval = paired_bootstrap(&cand.scores, &other.scores, b, seed);
    let mcnemar_p = (is_binary(&cand.scores) && is_binary(&other.scores)).then(|| {
        let only_c = cand
            .scores
            .iter()
            .zip(&other.scores)
            .filter(|(c, o)| **c > **o)
            .count();
        let only_o = cand
            .scores
            .iter()
            .zip(&other.scores)
            .filter(|(c, o)| **c < **o)
            .count();
        mcnemar_exact(only_c, only_o)
    });
    Comparison {
        against: other.name.clone(),
        gain: cand.score - other.score,
        interval,
        mcnemar_p,
        required,
        beats: interval.0 > required,
    }
}

/// The prompt tokens exactly as the server makes them (contents as text).
fn render(template: &ChatTemplate, tok: &Tok, msgs: &[ChatMessage]) -> Result<Vec<u32>> {
    Ok(tok.encode_chat(&template.render_marked(msgs, true)?, true)?)
}

/// The adapter's prompt for the base model: the system prompt, then `shots`
/// train examples (seeded, distinct answers first) as earlier turns.
fn prompt_prefix(opt: &GateOptions, train: &[SnapshotRow], seed: u64) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::new();
    if let Some(s) = &opt.system_prompt {
        out.push(ChatMessage::new("system", s));
    }
    let mut order: Vec<&SnapshotRow> = train.iter().collect();
    order.sort_by_key(|r| hash64(seed, &r.input_key));
    let mut seen = std::collections::BTreeSet::new();
    let mut picked: Vec<&SnapshotRow> = Vec::new();
    for r in &order {
        if picked.len() == opt.shots {
            break;
        }
        let (_, a) = split_example(&r.body)?;
        if seen.insert(a) {
            picked.push(r);
        }
    }
    for r in &order {
        if picked.len() >= opt.shots {
            break;
        }
        if !picked.iter().any(|p| p.input_key == r.input_key) {
            picked.push(r);
        }
    }
    for r in picked {
        let (msgs, a) = split_example(&r.body)?;
        out.extend(msgs.into_iter().filter(|m| m.role != "system"));
        out.push(ChatMessage::new("assistant", &a));
    }
    Ok(out)
}

fn with_prefix(prefix: &[ChatMessage], msgs: &[ChatMessage]) -> Vec<ChatMessage> {
    // the example's own system message joins the adapter's prompt
    let (sys, rest): (Vec<&ChatMessage>, Vec<&ChatMessage>) =
        msgs.iter().partition(|m| m.role == "system");
    let mut out: Vec<ChatMessage> = prefix.to_vec();
    if let Some(s) = sys.first() {
        match out.first_mut().filter(|m| m.role == "system") {
            Some(first) => first.content = format!("{}\n\n{}", first.content, s.content),
            None => out.insert(0, (*s).clone()),
        }
    }
    out.extend(rest.into_iter().cloned());
    out
}

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let z = l.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln() + m;
    l.iter().map(|x| *x as f64 - z).collect()
}

fn kl(base: &[f32], cand: &[f32]) -> f64 {
    let (p, q) = (log_softmax(base), log_softmax(cand));
    p.iter()
        .zip(&q)
        .map(|(lp, lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        .max(0.0)
}

/// Mean per-token KL(base || candidate) along the base model's greedy answers
/// to [`GENERAL_PROMPTS`] (at most `max_new` tokens each, the end-of-turn included).
pub fn forgetting(
    model: &Model,
    tok: &Tok,
    template: &ChatTemplate,
    candidate: &LoraAdapter,
    max_new: usize,
    bound: f64,
) -> Result<Forgetting> {
    if candidate.head.is_some() {
        return Ok(Forgetting {
            prompts: 0,
            tokens: 0,
            kl: 0.0,
            max_prompt_kl: 0.0,
            bound,
            ok: true,
            skipped: Some(
                "the candidate is a classifier: it answers only its labels, so no free text can drift"
                    .into(),
            ),
        });
    }
    let prompts = GENERAL_PROMPTS
        .iter()
        .map(|p| render(template, tok, &[ChatMessage::new("user", p)]))
        .collect::<Result<Vec<_>>>()?;
    let answers = generate_ids(
        model,
        tok,
        None,
        &prompts,
        (max_new, prompts.len()),
        None,
        None,
    )?;
    let (mut total, mut tokens, mut worst) = (0.0f64, 0usize, 0.0f64);
    for (p, a) in prompts.iter().zip(&answers) {
        let (mut kb, mut kc) = (model.new_cache(), model.new_cache());
        let mut feed = p.clone();
        let mut sum = 0.0;
        for step in 0..=a.len() {
            let lb = model.forward(&mut [BatchItem {
                tokens: &feed,
                adapter: None,
                kv: &mut kb,
                want_logits: true,
                only: None,
            }])?;
            let lc = model.forward(&mut [BatchItem {
                tokens: &feed,
                adapter: Some(candidate),
                kv: &mut kc,
                want_logits: true,
                only: None,
            }])?;
            let (Some(lb), Some(lc)) = (lb.first(), lc.first()) else {
                return Err(TrainError::Setting("the model returned no logits".into()));
            };
            sum += kl(lb, lc);
            if step < a.len() {
                feed = vec![a[step]];
            }
        }
        let n = a.len() + 1;
        total += sum;
        tokens += n;
        worst = worst.max(sum / n as f64);
    }
    let kl = total / tokens.max(1) as f64;
    Ok(Forgetting {
        prompts: prompts.len(),
        tokens,
        kl,
        max_prompt_kl: worst,
        bound,
        ok: kl <= bound,
        skipped: None,
    })
}

/// Train the classical classifier on `train` and answer every eval row;
/// `Err` carries the reason it could not run, in words.
fn classical_answers(
    train: &[SnapshotRow],
    eval_msgs: &[&SnapshotRow],
    seed: u64,
) -> Result<std::result::Result<(TextClassifier, Vec<String>, f64), String>> {
    let texts: Vec<String> = train.iter().map(|r| classifier_text(&r.body)).collect();
    let labels = train
        .iter()
        .map(|r| expected(Metric::Label, r))
        .collect::<Result<Vec<_>>>()?;
    let t = std::time::Instant::now();
    let c = match TextClassifier::train(
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
        &labels.iter().map(String::as_str).collect::<Vec<_>>(),
        &ClassicalOptions {
            seed,
            ..ClassicalOptions::default()
        },
    ) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let secs = t.elapsed().as_secs_f64();
    let answers = eval_msgs
        .iter()
        .map(|r| c.predict(&classifier_text(&r.body)).to_string())
        .collect();
    Ok(Ok((c, answers, secs)))
}

/// Run the gate.
pub fn run_gate(g: &GateInputs<'_>) -> Result<GateReport> {
    let started = std::time::Instant::now();
    let opt = g.options;
    if g.eval.is_empty() {
        return Err(TrainError::Data(
            "the snapshot's eval split is empty: the gate has nothing to judge on".into(),
        ));
    }
    let metric = choose_metric(opt, g.eval)?;
    // a seeded sample when the split is larger than max_eval
    let mut rows: Vec<&SnapshotRow> = g.eval.iter().collect();
    if rows.len() > opt.max_eval {
        rows.sort_by_key(|r| hash64(g.seed, &r.input_key));
        rows.truncate(opt.max_eval);
    }
    let wants = rows
        .iter()
        .map(|r| expected(metric, r))
        .collect::<Result<Vec<_>>>()?;
    let msgs = rows
        .iter()
        .map(|r| split_example(&r.body).map(|(m, _)| m))
        .collect::<Result<Vec<_>>>()?;
    let plain = msgs
        .iter()
        .map(|m| render(g.template, g.tok, m))
        .collect::<Result<Vec<_>>>()?;
    let keys = &opt.json_keys;
    let b = opt.bootstrap;
    // a label is never cut by the token cap: the answer is a whole label
    let mut max_new = opt.max_new_tokens;
    for l in g.labels.unwrap_or_default() {
        max_new = max_new.max(g.tok.encode(l, false)?.len() + 1);
    }
    // what a classifier's classical prior reads: each row's user turns
    let texts: Vec<String> = rows.iter().map(|r| classifier_text(&r.body)).collect();
    let timed = |adapter: Option<&LoraAdapter>,
                 prompts: &[Vec<u32>],
                 texts: Option<&[String]>|
     -> Result<(Vec<String>, f64)> {
        let t = std::time::Instant::now();
        let out = generate(
            g.model,
            g.tok,
            adapter,
            prompts,
            (max_new, g.batch),
            g.labels,
            texts,
        )?;
        Ok((out, t.elapsed().as_secs_f64()))
    };
    let mut arms = Vec::new();
    let (ans, s) = timed(Some(g.candidate), &plain, Some(&texts))?;
    arms.push(arm("candidate", &ans, &wants, metric, keys, g.seed, b, s));
    if g.candidate.head.as_ref().is_some_and(|h| h.prior.is_some()) {
        // reported only: what the head scores without its classical prior
        let (ans, s) = timed(Some(g.candidate), &plain, None)?;
        arms.push(arm("head alone", &ans, &wants, metric, keys, g.seed, b, s));
    }
    if let Some((_, live)) = g.live {
        let (ans, s) = timed(Some(live), &plain, Some(&texts))?;
        arms.push(arm("live", &ans, &wants, metric, keys, g.seed, b, s));
    }
    let prefix = prompt_prefix(opt, g.train, g.seed)?;
    let prompted = msgs
        .iter()
        .map(|m| render(g.template, g.tok, &with_prefix(&prefix, m)))
        .collect::<Result<Vec<_>>>()?;
    let (ans, s) = timed(None, &prompted, None)?;
    arms.push(arm("base+prompt", &ans, &wants, metric, keys, g.seed, b, s));
    // the most common training answer, for every input
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in g.train {
        *counts.entry(expected(metric, r)?).or_default() += 1;
    }
    if let Some((constant, _)) = counts
        .iter()
        .max_by_key(|(a, n)| (**n, std::cmp::Reverse(a.as_str())))
    {
        let ans = vec![constant.clone(); wants.len()];
        arms.push(arm("constant", &ans, &wants, metric, keys, g.seed, b, 0.0));
    }
    // the classical arm: label tasks only
    let mut classical = None;
    if metric == Metric::Label && opt.classical != ClassicalMode::Off {
        let t = std::time::Instant::now();
        match classical_answers(g.train, &rows, g.seed)? {
            Ok((c, ans, train_seconds)) => {
                let a = arm(
                    "classical",
                    &ans,
                    &wants,
                    metric,
                    keys,
                    g.seed,
                    b,
                    t.elapsed().as_secs_f64(),
                );
                let mut cmp = compare(&arms[0], &a, opt.min_gain_over_baseline, b, g.seed);
                // a choice between two working classifiers: the better one on
                // these rows (the point estimate), its interval and McNemar's p
                // reported; the baselines above must be beaten beyond doubt
                cmp.beats = cmp.gain > cmp.required;
                let pct = |x: f64| format!("{:.1}%", 100.0 * x);
                let verdict = if cmp.beats {
                    "the fine-tune beats it"
                } else {
                    "fine-tuning does not pay here yet"
                };
                let p = cmp
                    .mcnemar_p
                    .map(|p| format!(", McNemar p {p:.3}"))
                    .unwrap_or_default();
                let note = format!(
                    "a TF-IDF classifier (trained in {train_seconds:.1} s on {} rows) scores {} on these rows; the candidate {}: {verdict} (paired difference {:+.3}, 95% interval [{:+.3}, {:+.3}]{p})",
                    g.train.len(),
                    pct(a.score),
                    pct(arms[0].score),
                    cmp.gain,
                    cmp.interval.0,
                    cmp.interval.1
                );
                classical = Some(ClassicalArm {
                    mode: opt.classical,
                    train_rows: g.train.len(),
                    labels: c.labels().len(),
                    skipped_labels: c.skipped_labels.clone(),
                    train_seconds,
                    comparison: Some(cmp),
                    note,
                });
                arms.push(a);
            }
            Err(why) => {
                classical = Some(ClassicalArm {
                    mode: opt.classical,
                    train_rows: g.train.len(),
                    labels: 0,
                    skipped_labels: Vec::new(),
                    train_seconds: 0.0,
                    comparison: None,
                    note: format!("the classical arm did not run: {why}"),
                })
            }
        }
    }
    let forgetting = forgetting(
        g.model,
        g.tok,
        g.template,
        g.candidate,
        opt.max_new_tokens,
        opt.max_forgetting,
    )?;
    let cand = &arms[0];
    let vs_live = arms
        .iter()
        .find(|a| a.name == "live")
        .map(|l| compare(cand, l, opt.min_gain_over_live, b, g.seed));
    let vs_baselines: Vec<Comparison> = arms
        .iter()
        .filter(|a| a.name == "base+prompt" || a.name == "constant")
        .map(|o| compare(cand, o, opt.min_gain_over_baseline, b, g.seed))
        .collect();
    let mut reasons = Vec::new();
    if cand.score < opt.min_score {
        reasons.push(format!(
            "score {:.3} below the minimum {:.3}",
            cand.score, opt.min_score
        ));
    }
    for c in vs_live.iter().chain(&vs_baselines) {
        if !c.beats {
            reasons.push(format!(
                "does not beat {}: gain {:+.3}, 95% interval [{:+.3}, {:+.3}], needs the lower end above {:+.3}",
                c.against, c.gain, c.interval.0, c.interval.1, c.required
            ));
        }
    }
    if let Some(c) = &classical {
        if c.mode == ClassicalMode::Require && c.comparison.as_ref().is_some_and(|cmp| !cmp.beats) {
            reasons.push(c.note.clone());
        }
    }
    if !forgetting.ok {
        reasons.push(format!(
            "forgets: KL to the base {:.3} nats/token on general prompts, bound {:.3}",
            forgetting.kl, forgetting.bound
        ));
    }
    Ok(GateReport {
        metric,
        eval_examples: rows.len(),
        eval_split: g.eval.len(),
        passed: reasons.is_empty(),
        arms,
        vs_live,
        vs_baselines,
        classical,
        forgetting,
        reasons,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use retune_datasets::ExampleBody;

    fn labelled(text: &str, label: &str) -> SnapshotRow {
        SnapshotRow {
            split: retune_datasets::curate::Split::Train,
            body: ExampleBody::Chat {
                messages: vec![
                    retune_datasets::Message {
                        role: "system".into(),
                        content: "Classify.".into(),
                        weight: None,
                    },
                    retune_datasets::Message {
                        role: "user".into(),
                        content: text.into(),
                        weight: None,
                    },
                    retune_datasets::Message {
                        role: "assistant".into(),
                        content: label.into(),
                        weight: None,
                    },
                ],
            },
            origins: vec![],
            subject_ids: vec![],
            label: Some(label.into()),
            input_key: text.into(),
            reviewed: false,
        }
    }

    #[test]
    fn the_classical_arm_names_why_it_cannot_run_and_answers_when_it_can() {
        let one = vec![labelled("card lost", "lost"), labelled("lost it", "lost")];
        let eval = [&one[0]];
        let why = classical_answers(&one, &eval, 0).unwrap().unwrap_err();
        assert!(
            why.contains("at least 2 labels") && why.contains("same label"),
            "{why}"
        );
        let rare = vec![
            labelled("card lost", "lost"),
            labelled("lost my card", "lost"),
            labelled("top up failed", "top_up"),
        ];
        let why = classical_answers(&rare, &eval, 0).unwrap().unwrap_err();
        assert!(why.contains("1 of 2 labels"), "{why}");
        let two = vec![
            labelled("card lost", "lost"),
            labelled("lost my card", "lost"),
            labelled("top up failed", "top_up"),
            labelled("my top up failed again", "top_up"),
        ];
        let q = labelled("the top up failed", "top_up");
        let (c, answers, _) = classical_answers(&two, &[&q, &two[0]], 0).unwrap().unwrap();
        assert_eq!(c.labels(), ["lost", "top_up"]);
        // the system prompt is not part of the classifier's input
        assert_eq!(classifier_text(&q.body), "the top up failed");
        assert_eq!(answers, ["top_up", "lost"]);
    }

    #[test]
    fn metrics() {
        assert_eq!(
            score(Metric::Exact, " card_arrival\n", "card_arrival", &[]),
            1.0
        );
        assert_eq!(
            score(Metric::Exact, "Card_arrival", "card_arrival", &[]),
            0.0
        );
        assert_eq!(
            score(Metric::Label, "\"Card_Arrival\".", "card_arrival", &[]),
            1.0
        );
        let keys = vec!["intent".to_string(), "urgency".to_string()];
        let want = r#"{"intent": "refund", "urgency": "high"}"#;
        assert_eq!(
            json_score(r#"{"intent": "refund", "urgency": "low"}"#, want, &keys),
            0.5
        );
        assert_eq!(json_score(r#"{"intent": "refund"}"#, want, &keys), 0.0);
        assert_eq!(json_score("intent: refund", want, &keys), 0.0);
        assert_eq!(
            json_score(r#"{"intent": "x", "urgency": "y"}"#, "free text", &keys),
            1.0
        );
        // SQuAD: pred "the cat sat" vs "a cat sat down": 2 shared, P 2/3, R 2/4
        assert!(
            (token_f1("the cat sat", "a cat sat down")
                - 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5))
                .abs()
                < 1e-12
        );
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("x", ""), 0.0);
    }
}
