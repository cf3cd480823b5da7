//! The classical classifier against scikit-learn on a committed fixture
//! (`scripts/make-classical-fixture.py`: 3,000 Banking77 rows to train, 1,000 to
//! test, the same features and C), and the suspect-label finder on flipped labels.

use retune_classical::{find_suspects, ClassicalOptions, TextClassifier};
use serde::Deserialize;
use std::collections::BTreeSet;

#[derive(Deserialize)]
struct Fixture {
    train: Vec<(String, String)>,
    test: Vec<(String, String)>,
    n_features: usize,
    first_test_rows: Vec<Vec<(u32, f64)>>,
    predictions: Vec<String>,
    accuracy: f64,
}

fn fixture() -> Fixture {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/classical_banking77.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture")).expect("fixture json")
}

#[test]
fn agrees_with_scikit_learn_on_the_fixture() {
    let fx = fixture();
    let texts: Vec<&str> = fx.train.iter().map(|r| r.0.as_str()).collect();
    let labels: Vec<&str> = fx.train.iter().map(|r| r.1.as_str()).collect();
    let t = std::time::Instant::now();
    let c = TextClassifier::train(&texts, &labels, &ClassicalOptions::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    // the same features, value for value
    assert_eq!(c.features().len(), fx.n_features, "number of features");
    for (i, want) in fx.first_test_rows.iter().enumerate() {
        let got = c.features().transform(&fx.test[i].0);
        assert_eq!(got.len(), want.len(), "test row {i}: non-zero features");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "test row {i}: feature index");
            assert!(
                (g.1 as f64 - w.1).abs() < 1e-5,
                "test row {i} feature {}: {} against {}",
                w.0,
                g.1,
                w.1
            );
        }
    }
    let pred: Vec<&str> = fx.test.iter().map(|r| c.predict(&r.0)).collect();
    let right = pred
        .iter()
        .zip(&fx.test)
        .filter(|(p, r)| **p == r.1)
        .count();
    let acc = right as f64 / fx.test.len() as f64;
    let same = pred
        .iter()
        .zip(&fx.predictions)
        .filter(|(a, b)| **a == b.as_str())
        .count();
    println!(
        "ours {:.1}% against scikit-learn {:.1}% on {} rows; the same prediction on {same}; trained in {secs:.2} s",
        100.0 * acc,
        100.0 * fx.accuracy,
        fx.test.len()
    );
    assert!(
        (acc - fx.accuracy).abs() <= 0.005,
        "accuracy {acc} against {}",
        fx.accuracy
    );
    assert!(
        same as f64 >= 0.98 * fx.test.len() as f64,
        "only {same} predictions agree"
    );
}

#[test]
fn suspect_finder_recalls_flipped_labels() {
    let fx = fixture();
    let names: Vec<String> = fx
        .train
        .iter()
        .map(|r| r.1.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // flip 5% of the labels, seeded, each to another label
    let mut state = 7u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut labels: Vec<String> = fx.train.iter().map(|r| r.1.clone()).collect();
    let mut flipped = BTreeSet::new();
    while flipped.len() < fx.train.len() / 20 {
        let i = (next() % labels.len() as u64) as usize;
        if flipped.insert(i) {
            let mut l = names[(next() % names.len() as u64) as usize].clone();
            while l == labels[i] {
                l = names[(next() % names.len() as u64) as usize].clone();
            }
            labels[i] = l;
        }
    }
    let texts: Vec<&str> = fx.train.iter().map(|r| r.0.as_str()).collect();
    let lrefs: Vec<&str> = labels.iter().map(String::as_str).collect();
    let t = std::time::Instant::now();
    let r = find_suspects(&texts, &lrefs, 5, &ClassicalOptions::default()).unwrap();
    let flagged: BTreeSet<usize> = r.suspects.iter().map(|s| s.index).collect();
    let hit = flagged.intersection(&flipped).count();
    let recall = hit as f64 / flipped.len() as f64;
    let precision = hit as f64 / flagged.len().max(1) as f64;
    let back = r
        .suspects
        .iter()
        .filter(|s| flipped.contains(&s.index) && s.suggested == fx.train[s.index].1)
        .count();
    println!(
        "{} flips of {} rows: {} flagged, {hit} of them flips: recall {:.1}%, precision {:.1}% \
         (the rest includes Banking77's own label errors); {back} suggest the original label; \
         out-of-fold accuracy {:.1}%, temperature {}, {:.1} s",
        flipped.len(),
        texts.len(),
        flagged.len(),
        100.0 * recall,
        100.0 * precision,
        100.0 * r.oof_accuracy,
        r.temperature,
        t.elapsed().as_secs_f64()
    );
    // measured: recall 77.3%, precision 38.3% (flagged rows that are not flips
    // are mostly Banking77's own doubtful labels: requiring a margin between the
    // suggested and the given label's probability of up to 0.5 raised precision
    // only to 41.7%)
    assert!(recall >= 0.6, "recall {recall}");
    assert!(precision >= 0.25, "precision {precision}");
    // the labels' own names are never rewritten
    assert!(r.suspects.iter().all(|s| labels[s.index] == s.given));
}

/// A measurement on Banking77 (not in CI): the classical arm's holdout accuracy,
/// the suspects found in the train rows, and the accuracy without them. The split
/// is `scripts/banking77.py split DIR --system ""` (1,000 held-out rows, seed 77).
///
/// `RETUNE_B77_SPLIT=DIR cargo nextest run --release -p retune-classical --run-ignored only banking77 --no-capture`
/// (with `RETUNE_B77_KEPT=FILE`, the train rows without the suspects are written to FILE).
#[test]
#[ignore = "a measurement on Banking77: needs RETUNE_B77_SPLIT"]
fn banking77_suspects_and_accuracy_without_them() {
    let dir =
        std::path::PathBuf::from(std::env::var("RETUNE_B77_SPLIT").expect("RETUNE_B77_SPLIT"));
    let read = |f: &str| -> Vec<(String, String)> {
        std::fs::read_to_string(dir.join(f))
            .expect("split file")
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let user = v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["role"] == "user")
                    .unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_string();
                (user, v["label"].as_str().unwrap().to_string())
            })
            .collect()
    };
    let (train, hold) = (read("train.jsonl"), read("holdout.jsonl"));
    let acc = |rows: &[&(String, String)]| {
        let t = std::time::Instant::now();
        let c = TextClassifier::train(
            &rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            &rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            &ClassicalOptions::default(),
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let right = hold.iter().filter(|r| c.predict(&r.0) == r.1).count();
        (right as f64 / hold.len() as f64, secs)
    };
    let all: Vec<&(String, String)> = train.iter().collect();
    let (a_all, s_all) = acc(&all);
    println!(
        "classical arm: {:.1}% on {} held-out rows, trained on {} rows in {s_all:.1} s",
        100.0 * a_all,
        hold.len(),
        all.len()
    );
    let t = std::time::Instant::now();
    let r = find_suspects(
        &train.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        &train.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        5,
        &ClassicalOptions::default(),
    )
    .unwrap();
    println!(
        "suspects: {} of {} train rows ({:.1}%) in {:.1} s (5 folds, out-of-fold accuracy {:.1}%, temperature {})",
        r.suspects.len(),
        train.len(),
        100.0 * r.suspects.len() as f64 / train.len() as f64,
        t.elapsed().as_secs_f64(),
        100.0 * r.oof_accuracy,
        r.temperature
    );
    for s in r.suspects.iter().take(8) {
        println!(
            "  {:?}: given {} ({:.2}), suggested {} ({:.2})",
            train[s.index].0, s.given, s.given_p, s.suggested, s.suggested_p
        );
    }
    let out: BTreeSet<usize> = r.suspects.iter().map(|s| s.index).collect();
    let kept: Vec<&(String, String)> = train
        .iter()
        .enumerate()
        .filter(|(i, _)| !out.contains(i))
        .map(|(_, r)| r)
        .collect();
    if let Ok(path) = std::env::var("RETUNE_B77_KEPT") {
        // The train rows without the suspects, verbatim, for training an adapter on them.
        let text = std::fs::read_to_string(dir.join("train.jsonl")).expect("split file");
        let lines: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| !out.contains(i))
            .map(|(_, l)| l)
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").expect("write kept rows");
        println!("{} kept rows written to {path}", lines.len());
    }
    let (a_kept, _) = acc(&kept);
    println!(
        "classical arm without the suspects: {:.1}% ({:+.1} points)",
        100.0 * a_kept,
        100.0 * (a_kept - a_all)
    );
}
