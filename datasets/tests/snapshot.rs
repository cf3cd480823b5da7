//! Import, curation into snapshots, lineage and erasure.

use retune_datasets::curate::Split;
use retune_datasets::*;

mod common;
use common::backends;
use std::collections::BTreeMap;

fn chat_line(q: &str, a: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
}

fn captured(id: &str, q: &str, out: &str) -> CapturedCompletion {
    CapturedCompletion {
        id: id.into(),
        tenant: "acme".into(),
        adapter: Some("tickets".into()),
        version: Some("v1".into()),
        base_fingerprint: "base".into(),
        request: serde_json::json!({"messages": [{"role": "user", "content": q}]}),
        params: serde_json::json!({"seed": 1}),
        output_text: out.into(),
        output_ids: vec![1],
        finish: retune_datasets::Finish::Stop,
        prompt_tokens: 3,
        completion_tokens: 1,
        ttft_ms: 1.0,
        total_ms: 2.0,
        user: None,
        created_at: 1,
    }
}

fn fb(
    id: &str,
    rating: Option<Rating>,
    correction: Option<&str>,
    subject: Option<&str>,
) -> Feedback {
    Feedback {
        completion_id: id.into(),
        rating,
        correction: correction.map(str::to_string),
        subject_id: subject.map(str::to_string),
        ..Feedback::default()
    }
}

#[test]
fn ten_thousand_lines_with_bad_ones_report_their_numbers_and_import_the_rest() {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for i in 0..10_000 {
        let line = match i % 1000 {
            7 => "{not json".to_string(),
            8 => r#"{"messages": [{"role": "user", "content": "q"}]}"#.to_string(), // no assistant turn
            9 => r#"{"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}"#.to_string(),
            10 => r#"{"prompt": "p"}"#.to_string(),
            11 => r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}"#.to_string(),
            12 => serde_json::json!({"prompt": format!("p{i}"), "completion": "c"}).to_string(),
            _ => chat_line(&format!("question {i}"), "answer"),
        };
        if (7..=11).contains(&(i % 1000)) {
            bad.push(i + 1);
        }
        lines.push(line);
    }
    let (rows, errors) = parse_jsonl(&lines.join("\n"));
    assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), bad);
    assert!(errors[0].reason.contains("JSON"), "{:?}", errors[0]);
    assert!(errors[2].reason.contains("wizard"), "{:?}", errors[2]);
    assert_eq!(rows.len(), 10_000 - bad.len());
    for b in backends("import") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        assert_eq!(
            s.import("acme", "tickets", "import:test", &rows).unwrap(),
            rows.len()
        );
        let m = s.snapshot("acme", "tickets", &Policy::default()).unwrap();
        assert_eq!(m.train + m.eval, rows.len(), "{m:?}");
        let exported = s.snapshot_rows("acme", &m.id).unwrap();
        let text = exported
            .iter()
            .filter(|r| matches!(r.body, ExampleBody::Text { .. }))
            .count();
        assert_eq!(text, 10);
    }
}

#[test]
fn curation_keeps_corrections_drops_what_it_must_and_holds_conflicts_out() {
    for b in backends("curate") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let (rows, errors) = parse_jsonl(
            &[
                chat_line("Where is my card?", "card_arrival"),
                chat_line("  where is   my card? ", "card_arrival"), // same input once normalised... (case differs)
                chat_line("Where is my card?", "card_arrival"),      // exact duplicate
                chat_line("Refund please", "refund_request"),
                chat_line("Refund please", "request_refund"), // conflict
                chat_line("Mail me at ann@example.com", "contact"),
            ]
            .join("\n"),
        );
        assert!(errors.is_empty());
        s.import("acme", "tickets", "import:a", &rows).unwrap();
        s.record(&[
            captured(
                "c1",
                "my card was charged twice",
                "card_payment_fee_charged",
            ),
            captured("c2", "exchange rate?", "exchange_rate"),
            captured("c3", "top up failed", "wrong"),
            captured("c4", "no feedback here", "x"),
        ])
        .unwrap();
        s.add_feedback(
            "acme",
            &fb(
                "c1",
                Some(Rating::Down),
                Some("transaction_charged_twice"),
                None,
            ),
        )
        .unwrap();
        s.add_feedback("acme", &fb("c2", Some(Rating::Up), None, None))
            .unwrap();
        s.add_feedback("acme", &fb("c3", Some(Rating::Down), None, None))
            .unwrap();
        let m = s.snapshot("acme", "tickets", &Policy::default()).unwrap();
        let rows = s.snapshot_rows("acme", &m.id).unwrap();
        let outputs: BTreeMap<String, String> =
            rows.iter().map(|r| r.body.input_output()).collect();
        assert_eq!(
            outputs["user: my card was charged twice"], "transaction_charged_twice",
            "the correction wins"
        );
        assert_eq!(
            outputs["user: exchange rate?"], "exchange_rate",
            "+1 counts by policy"
        );
        assert!(
            !outputs.contains_key("user: top up failed"),
            "-1 without a correction never counts"
        );
        assert!(!outputs.contains_key("user: no feedback here"));
        assert!(
            !outputs.contains_key("user: Refund please"),
            "a conflict is held out"
        );
        assert_eq!(outputs["user: Mail me at [EMAIL]"], "contact", "scrubbed");
        assert_eq!(m.conflicts.len(), 1);
        assert_eq!(
            m.conflicts[0].outputs,
            vec!["refund_request", "request_refund"]
        );
        assert_eq!(m.dropped["rated_down_without_correction"], 1);
        assert_eq!(m.dropped["no_feedback"], 1);
        assert_eq!(m.dropped["duplicate"], 1);
        assert_eq!(m.dropped["conflict"], 2);
        assert_eq!(m.scrubbed.emails, 1);
        // same data, same snapshot; +1 outputs excluded by policy change the content
        assert_eq!(
            s.snapshot("acme", "tickets", &Policy::default())
                .unwrap()
                .id,
            m.id
        );
        let strict = Policy {
            include_positive: false,
            ..Policy::default()
        };
        let m2 = s.snapshot("acme", "tickets", &strict).unwrap();
        assert_ne!(m2.id, m.id);
        assert_eq!(m2.dropped["rated_up_excluded_by_policy"], 1);
        assert_eq!(s.snapshots("acme", Some("tickets")).unwrap().len(), 2);
    }
}

#[test]
fn an_input_never_changes_side_across_reimports_and_snapshots() {
    for b in backends("split") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let first: Vec<String> = (0..500).map(|i| chat_line(&format!("q{i}"), "a")).collect();
        s.import("acme", "t", "import:1", &parse_jsonl(&first.join("\n")).0)
            .unwrap();
        let m1 = s.snapshot("acme", "t", &Policy::default()).unwrap();
        let side = |rows: Vec<SnapshotRow>| -> BTreeMap<String, Split> {
            rows.into_iter()
                .map(|r| (r.body.input_output().0, r.split))
                .collect()
        };
        let s1 = side(s.snapshot_rows("acme", &m1.id).unwrap());
        assert!(m1.eval > 20 && m1.eval < 80, "about 10% eval: {}", m1.eval);
        // the same lines again (duplicates) plus new ones, reformatted
        let more: Vec<String> = (0..1000)
            .map(|i| chat_line(&format!("  q{i} "), "a"))
            .collect();
        s.import("acme", "t", "import:2", &parse_jsonl(&more.join("\n")).0)
            .unwrap();
        let m2 = s.snapshot("acme", "t", &Policy::default()).unwrap();
        assert_ne!(m1.id, m2.id);
        let s2 = side(s.snapshot_rows("acme", &m2.id).unwrap());
        assert_eq!(s2.len(), 1000);
        for (input, split) in &s1 {
            assert_eq!(s2[input], *split, "{input} changed side");
        }
    }
}

#[test]
fn labelled_inputs_are_split_per_label_and_keep_their_side() {
    for b in backends("strat") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let labelled = |label: &str, n: usize, from: usize| -> Vec<String> {
            (from..from + n)
            .map(|i| serde_json::json!({"messages": [{"role": "user", "content": format!("{label} question {i}")},
                {"role": "assistant", "content": label}], "label": label}).to_string())
            .collect()
        };
        let mut lines = labelled("card_arrival", 200, 0);
        lines.extend(labelled("refund", 50, 0));
        lines.extend(labelled("rare", 20, 0));
        s.import("acme", "t", "import:1", &parse_jsonl(&lines.join("\n")).0)
            .unwrap();
        let m1 = s.snapshot("acme", "t", &Policy::default()).unwrap();
        for (label, n) in [("card_arrival", 200), ("refund", 50), ("rare", 20)] {
            let (train, eval) = m1.labels[label];
            assert_eq!(train + eval, n);
            assert_eq!(eval, n / 10, "{label}: exactly 10% of each label is eval");
        }
        let side = |id: &str| -> BTreeMap<String, Split> {
            s.snapshot_rows("acme", id)
                .unwrap()
                .into_iter()
                .map(|r| (r.body.input_output().0, r.split))
                .collect()
        };
        let before = side(&m1.id);
        s.import(
            "acme",
            "t",
            "import:2",
            &parse_jsonl(&labelled("refund", 50, 50).join("\n")).0,
        )
        .unwrap();
        let m2 = s.snapshot("acme", "t", &Policy::default()).unwrap();
        assert_eq!(m2.labels["refund"], (90, 10));
        let after = side(&m2.id);
        for (input, split) in &before {
            assert_eq!(after[input], *split, "{input} changed side");
        }
    }
}

#[test]
fn erasure_leaves_no_row_of_the_subject_and_names_the_snapshots_it_touched() {
    for b in backends("erase") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let lines = [
        serde_json::json!({"messages": [{"role": "user", "content": "ZED-SECRET-1 lost card"}, {"role": "assistant", "content": "lost_or_stolen_card"}], "subject_id": "zed"}).to_string(),
        chat_line("someone else", "other"),
    ];
        s.import(
            "acme",
            "tickets",
            "import:a",
            &parse_jsonl(&lines.join("\n")).0,
        )
        .unwrap();
        s.record(&[
            captured("z1", "ZED-SECRET-2 refund", "refund"),
            captured("o1", "other person", "x"),
        ])
        .unwrap();
        s.add_feedback("acme", &fb("z1", None, Some("ZED-SECRET-3"), Some("zed")))
            .unwrap();
        s.add_feedback("acme", &fb("o1", None, Some("y"), Some("olga")))
            .unwrap();
        let with_zed = s.snapshot("acme", "tickets", &Policy::default()).unwrap();
        s.import(
            "acme",
            "other",
            "import:b",
            &parse_jsonl(&chat_line("x", "y")).0,
        )
        .unwrap();
        let without = s.snapshot("acme", "other", &Policy::default()).unwrap();
        assert_eq!(
            s.lineage("acme", "zed").unwrap().snapshots,
            vec![with_zed.id.clone()]
        );
        assert!(s.lineage("globex", "zed").unwrap().snapshots.is_empty());
        let e = s.erase("acme", "zed").unwrap();
        assert_eq!(
            (e.completions, e.feedback, e.examples, e.snapshot_rows),
            (1, 1, 1, 2)
        );
        assert_eq!(e.snapshots, vec![with_zed.id.clone()]);
        // nothing of zed anywhere, in any table
        let hits: Vec<_> = b
            .dump()
            .into_iter()
            .filter(|(_, row)| {
                row.contains("ZED-SECRET")
                    || row.contains("\"zed\"")
                    || row.contains("Text(\"zed\")")
            })
            .collect();
        assert!(hits.is_empty(), "zed's data is still stored: {hits:?}");
        let rows = s.snapshot_rows("acme", &with_zed.id).unwrap();
        assert!(rows
            .iter()
            .all(|r| !r.subject_ids.contains(&"zed".to_string())));
        assert_eq!(rows.len(), with_zed.train + with_zed.eval - 2);
        assert_eq!(s.manifest("acme", &with_zed.id).unwrap().erased, 2);
        assert_eq!(s.manifest("acme", &without.id).unwrap().erased, 0);
        assert!(s.feedback("acme", "o1").is_ok(), "others' data stays");
        assert!(s.lineage("acme", "zed").unwrap().snapshots.is_empty());
    }
}

/// Banking77 rows from the classical fixture, 5% of their labels flipped.
fn flipped_banking77(n: usize) -> (Vec<String>, std::collections::BTreeSet<String>) {
    #[derive(serde::Deserialize)]
    struct Fx {
        train: Vec<(String, String)>,
    }
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../classical/tests/fixtures/classical_banking77.json"
    );
    let fx: Fx = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let rows = &fx.train[..n];
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.1.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut flipped = std::collections::BTreeSet::new();
    let lines = rows
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let label = if i % 20 == 7 {
                flipped.insert(q.clone());
                let j = (names.iter().position(|x| x == a).unwrap() + 1 + i % 5) % names.len();
                names[j]
            } else {
                a.as_str()
            };
            serde_json::json!({"messages": [{"role": "system", "content": "Classify."},
                {"role": "user", "content": q}, {"role": "assistant", "content": label}], "label": label})
            .to_string()
        })
        .collect();
    (lines, flipped)
}

#[test]
fn suspect_labels_are_listed_by_the_snapshot_step_and_held_out_by_policy() {
    // the default policy's serialisation (and so every earlier snapshot id) is unchanged
    let js = serde_json::to_value(Policy::default()).unwrap();
    assert!(js.get("suspects").is_none(), "{js}");
    for b in backends("suspects") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let (lines, flipped) = flipped_banking77(2000);
        s.import("acme", "b77", "import:1", &parse_jsonl(&lines.join("\n")).0)
            .unwrap();
        let m = snapshot_with_suspects(s.as_ref(), "acme", "b77", &Policy::default()).unwrap();
        let sus = m.suspects.clone().expect("suspects looked for");
        let text: BTreeMap<String, String> = s
            .snapshot_rows("acme", &m.id)
            .unwrap()
            .into_iter()
            .map(|r| (r.input_key.clone(), snapshot::classifier_text(&r.body)))
            .collect();
        let found = sus
            .rows
            .iter()
            .filter(|r| flipped.contains(&text[&r.input_key]))
            .count();
        eprintln!(
            "{} rows, {} flips, {} suspects, {found} of them flips, out-of-fold accuracy {:.3}, {:.1} s",
            sus.checked,
            flipped.len(),
            sus.rows.len(),
            sus.oof_accuracy,
            sus.seconds
        );
        assert_eq!(sus.checked, 2000);
        assert!(
            found * 10 >= flipped.len() * 6,
            "{found} of {}",
            flipped.len()
        );
        assert_eq!(sus.held_out, 0, "report only");
        // stored with the manifest, listed by the store (the timing compared
        // apart: serde_json's default float parsing may differ in the last bit)
        let mut stored = s.manifest("acme", &m.id).unwrap().suspects.unwrap();
        assert!((stored.seconds - sus.seconds).abs() < 1e-9);
        stored.seconds = sus.seconds;
        assert_eq!(stored, sus);
        assert_eq!(
            training_rows(s.as_ref(), "acme", &m.id).unwrap().len(),
            2000
        );
        // the same content again: the same snapshot, not looked at twice
        let again = snapshot_with_suspects(s.as_ref(), "acme", "b77", &Policy::default()).unwrap();
        assert_eq!(again.id, m.id);
        assert_eq!(again.suspects.map(|a| a.rows), Some(sus.rows.clone()));

        // holdout: the suspect train rows are left out of training, eval rows stay
        let hold = Policy {
            suspects: SuspectPolicy::Holdout,
            ..Policy::default()
        };
        let mh = snapshot_with_suspects(s.as_ref(), "acme", "b77", &hold).unwrap();
        assert_ne!(mh.id, m.id, "the policy is part of the snapshot");
        let sh = mh.suspects.clone().unwrap();
        let train_suspects: std::collections::BTreeSet<&str> = sh
            .rows
            .iter()
            .filter(|r| r.split == Split::Train)
            .map(|r| r.input_key.as_str())
            .collect();
        assert!(sh.held_out > 0 && sh.held_out == train_suspects.len());
        let rows = training_rows(s.as_ref(), "acme", &mh.id).unwrap();
        assert_eq!(rows.len(), 2000 - sh.held_out);
        assert!(rows
            .iter()
            .all(|r| r.split == Split::Eval || !train_suspects.contains(r.input_key.as_str())));
        assert_eq!(
            rows.iter().filter(|r| r.split == Split::Eval).count(),
            mh.eval,
            "eval rows are never held out"
        );

        // off: none looked for; one label only: a reason, not a crash
        let off = Policy {
            suspects: SuspectPolicy::Off,
            ..Policy::default()
        };
        assert!(snapshot_with_suspects(s.as_ref(), "acme", "b77", &off)
            .unwrap()
            .suspects
            .is_none());
        let one: Vec<String> = (0..30)
            .map(|i| {
                serde_json::json!({"messages": [{"role": "user", "content": format!("q {i}")},
                {"role": "assistant", "content": "yes"}], "label": "yes"})
                .to_string()
            })
            .collect();
        s.import("acme", "one", "import:1", &parse_jsonl(&one.join("\n")).0)
            .unwrap();
        let m1 = snapshot_with_suspects(s.as_ref(), "acme", "one", &Policy::default()).unwrap();
        let note = m1.suspects.unwrap().note.unwrap();
        assert!(note.contains("at least 2 labels"), "{note}");
    }
}

/// `review`: suspect train rows stay out of training until a person labels
/// them; the queue lists what is left; a verdict is an example of its own that
/// wins over the other outputs for its input (no conflict), trains, is never
/// suspect again, and is erased with its subject.
#[test]
fn the_review_queue_holds_suspects_out_until_a_person_labels_them() {
    for b in backends("review") {
        eprintln!("store: {}", b.name());
        let s = b.open();
        let (lines, _) = flipped_banking77(2000);
        // every row from one subject, so the verdict must follow the subject
        let rows: Vec<ImportRow> = parse_jsonl(&lines.join("\n"))
            .0
            .into_iter()
            .map(|mut r| {
                r.subject_id = Some("user-1".into());
                r
            })
            .collect();
        s.import("acme", "b77", "import:1", &rows).unwrap();
        let review = Policy {
            suspects: SuspectPolicy::Review,
            ..Policy::default()
        };
        let m = snapshot_with_suspects(s.as_ref(), "acme", "b77", &review).unwrap();
        let sus = m.suspects.clone().unwrap();
        assert!(sus.held_out > 0, "review holds the suspect train rows out");
        assert_eq!(
            training_rows(s.as_ref(), "acme", &m.id).unwrap().len(),
            2000 - sus.held_out
        );
        let q = review::queue(s.as_ref(), "acme", "b77").unwrap();
        assert_eq!(q.snapshot.as_deref(), Some(m.id.as_str()));
        assert_eq!(q.items.len(), sus.rows.len());
        assert_eq!(q.reviewed, 0);
        let item = q
            .items
            .iter()
            .find(|i| i.split == Split::Train)
            .unwrap()
            .clone();
        assert!(!item.input.is_empty() && item.given != item.suggested);

        // bad verdicts: nothing written
        let labels: Vec<String> = vec![item.given.clone(), item.suggested.clone()];
        let e = review::review(
            s.as_ref(),
            "acme",
            "b77",
            &item.input_key,
            "nope",
            Some(&labels),
        )
        .unwrap_err();
        assert!(
            matches!(&e, DataError::Invalid { field, .. } if field == "label"),
            "{e}"
        );
        let e = review::review(
            s.as_ref(),
            "acme",
            "b77",
            "no-such-key",
            &item.suggested,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, DataError::NotFound(_)), "{e}");
        assert!(s.reviewed_keys("acme", "b77").unwrap().is_empty());

        // the person takes the suggestion
        let done = review::review(
            s.as_ref(),
            "acme",
            "b77",
            &item.input_key,
            &item.suggested,
            Some(&labels),
        )
        .unwrap();
        assert_eq!(done.written, 1);
        let q2 = review::queue(s.as_ref(), "acme", "b77").unwrap();
        assert_eq!((q2.items.len(), q2.reviewed), (q.items.len() - 1, 1));
        assert!(q2.items.iter().all(|i| i.input_key != item.input_key));

        // the next snapshot: the verdict wins without a conflict and trains
        let m2 = snapshot_with_suspects(s.as_ref(), "acme", "b77", &review).unwrap();
        assert_ne!(m2.id, m.id);
        assert!(m2.conflicts.is_empty(), "{:?}", m2.conflicts);
        assert_eq!(m2.dropped.get("superseded by review"), Some(&1));
        assert_eq!(m2.train + m2.eval, 2000);
        let row = s
            .snapshot_rows("acme", &m2.id)
            .unwrap()
            .into_iter()
            .find(|r| r.input_key == item.input_key)
            .unwrap();
        assert!(row.reviewed);
        assert_eq!(row.label.as_deref(), Some(item.suggested.as_str()));
        assert_eq!(row.body.input_output().1, item.suggested);
        let sus2 = m2.suspects.unwrap();
        assert!(sus2.rows.iter().all(|r| r.input_key != item.input_key));
        assert!(training_rows(s.as_ref(), "acme", &m2.id)
            .unwrap()
            .iter()
            .any(|r| r.input_key == item.input_key));

        // the verdict belongs to the row's subject: erased with it
        s.erase("acme", "user-1").unwrap();
        assert!(s.reviewed_keys("acme", "b77").unwrap().is_empty());
    }
}
